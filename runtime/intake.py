"""The intake: turns what the listener read into ``commands`` rows and queued Jobs.

Each message is size-checked, parsed and verified (protocol), its params opened (sealed) and
checked by its handler (``Registry.prepare``), then recorded in one transaction per group.
A command that runs nothing (echo), a refusal, and a duplicate's stored response are answered
here, on arrival; everything else becomes a Job for the workers.
"""

from __future__ import annotations

import logging
import os
import threading
import time
import traceback
from collections.abc import Callable
from typing import Any

import redis

import protocol
import sealed
from config import Config
from errors import StoreUnavailable, ValidationError
from handlers import Action, Registry, execute
from handlers.base import answer_deadline
from outbox import Message, Store
from runtime.answers import Answers
from runtime.cluster import ClusterAnswerPublisher, Routes
from runtime.inbox import Inbox
from runtime.loop import REDIS_DOWN, Loop
from runtime.publish import HOLD_SECONDS, AnswerPublisher
from runtime.workers import Job, WorkerPool
from service.audit import Audit, Throttle


class Intake:
    """Turns a raw message into a ``commands`` row and a queued Job, or into an error answer.

    Owned by the thread that reads the messages (it holds that thread's Store): the listener
    (``via="pubsub"``) or the stream reader (``via="stream"``).
    """

    def __init__(self, config: Config, store: Store, client: redis.Redis | Routes, *, registry: Registry, answers: Answers,
                 audit: Audit, pool: WorkerPool, wake_flusher: Callable[[], None],
                 handover: Callable[[list[int], str | None], None], on_done: Callable[[str, str, int], None],
                 stream_twins: StreamTwins, via: str = "pubsub"):
        """``pool`` takes the Jobs; ``wake_flusher`` and ``handover`` reach the flusher (an answer
        due, answers published here to confirm); ``on_done`` counts a command answered on arrival.
        ``client``: the connection answers go out on, or the agent's Routes (runtime/cluster.py)."""
        self.routes = Routes.of(client)
        self.config, self.store = config, store
        self.registry, self.answers, self.audit, self.pool = registry, answers, audit, pool
        self.wake_flusher, self.handover, self.on_done = wake_flusher, handover, on_done
        self.stream_twins = stream_twins
        self.via = via
        self.log = logging.getLogger("cockpit_agent.intake")
        self.publisher: AnswerPublisher | ClusterAnswerPublisher = (
            ClusterAnswerPublisher(config, self.routes) if self.routes.cluster else AnswerPublisher(config, self.routes.client))
        # What a transaction produced, acted on only once it is committed (see ``_accept``):
        self._jobs: list[Job] = []  # to queue for the workers
        self._answers: list[tuple[int, Message]] = []  # outbox rows to publish at once
        self._after_commit: list[tuple[Callable[..., Any], tuple[Any, ...]]] = []  # audit, metrics
        self._on_arrival = True  # this transaction's answers are published by this thread
        self._read_at: list[float] | None = None  # see handle_many
        self._received: float | None = None  # when the message being handled was read
        # Problems that come once per message, so one log line a minute each, with a count: a
        # full disk refuses every message, and a bug hit by a message is hit by all its copies.
        self._unwritable = Throttle(60.0)
        self._failed = Throttle(60.0)
        self._check_failed = Throttle(60.0)

    def handle_many(self, batch: list[bytes], read_at: list[float] | None = None) -> None:
        """Accept messages that arrived together in one transaction (one commit, not one each).

        ``read_at``: when each was read off the subscription (unix s), if not just now; a
        timeout without the backend's timestamp counts from then, not from after its wait.
        If anything in the group fails, nothing of it is kept and each message is handled again
        on its own, with the usual per-message error handling.
        """
        self._read_at = read_at
        if len(batch) > 1:
            try:
                self._accept(batch)
            except Exception as exc:
                # DEBUG, and no text of it: the one-by-one pass below logs each message's problem,
                # rate-limited (a full disk fails every group), and an error's text can quote a
                # handler's decrypted params.
                self.log.debug("a group of %d messages failed (%s); handling them one by one",
                               len(batch), type(exc).__name__)
            else:
                self._committed()
                return
        for i, data in enumerate(batch):
            self._read_at = None if read_at is None else read_at[i:i + 1]
            self.handle(data)
        self._read_at = None

    def handle(self, data: bytes) -> bool:
        """Accept one message; never raises, so one bad message cannot stop the listener.

        Returns False only for a stream message that could not be written to the database: it
        stays unacknowledged in the stream and is read again, instead of being refused.
        """
        try:
            self._accept([data])
        except StoreUnavailable as exc:
            if self.via == "stream":
                suppressed = self._unwritable.take()
                if suppressed is not None:
                    self.log.error("cannot write %s (%s): the stream entry stays pending and is read again%s",
                                   self.config.outbox_db, exc, _more(suppressed, "stream entries left pending"))
                return False
            self._store_failed(data, exc)
            return True
        except Exception:
            suppressed = self._failed.take()
            if suppressed is not None:
                self.log.exception("could not handle a message of %d bytes%s", len(data),
                                   _more(suppressed, "messages failed since the last line"))
            return True
        self._committed()
        return True

    # A group of at most this many messages has its answers published by this thread on
    # arrival (the latency of a lone command); a bigger one (a burst) leaves them to the
    # flusher, which publishes in parallel while this thread accepts the next group.
    publish_on_arrival_max = 8

    def _accept(self, batch: list[bytes]) -> None:
        """Record ``batch`` in one transaction. On failure nothing of it is kept, and nothing is done:
        its jobs, answers and audit lines wait in lists that only ``_committed`` acts on (and the
        next ``_accept`` clears)."""
        self._jobs, self._answers, self._after_commit = [], [], []
        self._on_arrival = len(batch) <= self.publish_on_arrival_max
        read_at = self._read_at
        with self.store.immediate():
            for i, data in enumerate(batch):
                self._received = read_at[i] if read_at is not None and i < len(read_at) else None
                self._handle(data)
        self._received = None

    def _committed(self) -> None:
        """What the last transaction recorded, now that it is committed: queue its jobs, publish
        its answers, then audit and count (after the answers: the backend is waiting for them)."""
        jobs, answers, after = self._jobs, self._answers, self._after_commit
        self._jobs, self._answers, self._after_commit = [], [], []
        if self._unwritable.count:
            self.log.warning("%s can be written again; %d messages were refused or left pending meanwhile",
                             self.config.outbox_db, self._unwritable.over())
        for job in jobs:
            self.pool.submit(job)
        if answers and self._on_arrival:
            self._publish(answers)
        elif answers:
            self.wake_flusher()
        for fn, args in after:
            fn(*args)

    def _publish(self, answers: list[tuple[int, Message]]) -> None:
        """Publish answers recorded in the outbox (held there, so the flusher leaves them alone)
        straight from this thread: no hand-over to the flusher on the way to the backend. What
        does not go out is made due and left to the flusher, with its retries; what does is
        handed to it to confirm (``Flusher.confirm``)."""
        ids = [outbox_id for outbox_id, _ in answers]
        try:
            results, run_id = self.publisher.publish([message for _, message in answers])
        except Exception as exc:
            self.log.debug("publishing %d answers on arrival failed (%s); the flusher takes them", len(ids), exc)
            results, run_id = [None] * len(ids), None
        published = [i for i, result in zip(ids, results) if isinstance(result, int) and result != 0]
        if published:
            # A later round trip on the same connection (so the same redis-server) proves the
            # event-loop turn that queued the receivers' copies is over (see Flusher.confirm).
            # Done here, at once: waiting would widen the window in which a Redis restart makes
            # the flusher publish a response again that was in fact delivered.
            self.handover(published, None if self.publisher.confirm() else run_id)
        if len(published) < len(ids):
            # No receiver (the flusher retries with backoff), refused, or Redis unreachable.
            went_out = set(published)
            try:
                self.store.due_now([i for i in ids if i not in went_out])
            except StoreUnavailable as exc:  # they stay held, and are due once the hold ends
                self.log.warning("could not hand %d answers to the flusher (%s); they go out within %d s",
                                 len(ids) - len(published), exc, HOLD_SECONDS)
            self.wake_flusher()

    def _hold(self) -> float:
        """``next_attempt_at`` of an answer: held while this thread publishes it itself once it
        is committed, due at once for the flusher otherwise."""
        return time.time() + HOLD_SECONDS if self._on_arrival else 0.0

    def _handle(self, data: bytes) -> None:
        try:
            cmd = protocol.parse(
                data, max_bytes=self.config.max_message_bytes, secret=self.config.shared_secret
            )
        except protocol.Rejected as rejected:
            self._rejected(rejected, data)
            return
        if self.via == "stream":
            self.stream_twins.seen(cmd.command_id)
        # The handler sees the decrypted params; cmd.params (the tokens) is what is stored and audited.
        plain: tuple[str, ...] = ()
        try:
            params, plain = sealed.open_params(cmd.params, self.config.shared_secret)
            action = self.registry.prepare(cmd.command, params, self.config)
        except Exception as exc:
            if isinstance(exc, ValidationError):
                error = self.answers.mask(str(exc), plain)
            else:
                # A handler's check that failed by itself: answered, not a traceback, whose text
                # (unmasked, the log filter knows only the configured secrets) could quote the
                # decrypted params. The innermost frame says where, for the handler's author.
                where = traceback.extract_tb(exc.__traceback__)[-1]
                error = self.answers.mask(
                    f"the agent failed to check {protocol.preview(cmd.command)}: {type(exc).__name__}: {exc} "
                    f"(at {os.path.basename(where.filename)}:{where.lineno})", plain)
                suppressed = self._check_failed.take()  # a bug hit by one message is hit by all its copies
                if suppressed is not None:
                    self.log.error("%s: %s%s", cmd.command_id, error,
                                   _more(suppressed, "checks failed the same way since the last line"))
            response, message = self.answers.error_answer(cmd.command_id, error)
            accepted = self.store.accept(cmd.command_id, cmd.command, cmd.params, cmd.sender, (response, message),
                                         hold_until=self._hold())
            if accepted.new:
                self.log.warning("%s: %s refused: %s", cmd.command_id, protocol.preview(cmd.command), error)
                self._answers.append((accepted.outbox_id, message))
                self._after_commit.append((self.audit.command, (
                    cmd.command_id, cmd.sender, cmd.command, cmd.params, "error", 0, error)))
        else:
            if action.argv is None:
                self._answer_now(cmd, action, plain)
                return
            # A command seen before is never "busy": it is answered as a duplicate.
            existing = self.store.get(cmd.command_id)
            if existing is not None:
                self._duplicate(existing)
                return
            if self._busy(cmd):
                return
            accepted = self.store.accept(cmd.command_id, cmd.command, cmd.params, cmd.sender)
            if accepted.new:
                # Nothing for the flusher yet: the worker wakes it once the response is written.
                # Only pub/sub has a backend waiting; a stream command may wait for the agent.
                deadline = answer_deadline(action, cmd.timestamp, self._received or time.time()) if self.via == "pubsub" else None
                self._jobs.append(Job(cmd.command_id, cmd.command, action, cmd.sender, cmd.params, deadline, plain))
                self.log.info("%s: %s accepted from %s", cmd.command_id, cmd.command, cmd.sender or "?")
        if not accepted.new:
            self._duplicate(accepted.row)

    def _busy(self, cmd: protocol.Command) -> bool:
        """Refuse a command that needs a worker when QUEUE_MAX already wait.

        The refusal is recorded like a validation refusal (done, with its answer): the backend
        never sends an id again (it makes a new one), so a replay of a captured signed command
        within the signature window is then a known id, answered "busy" again, never run.
        Only pub/sub: the stream reader bounds itself (it reads only while there is room), and
        a command that runs nothing (echo) never waits for a worker, so it is never busy.
        """
        if self.via != "pubsub":
            return False
        waiting = self.pool.pending() + len(self._jobs)
        if waiting < self.config.queue_max:
            return False
        error = (f"busy: {waiting} commands are already waiting (QUEUE_MAX={self.config.queue_max}); "
                 "send it again later")
        response, message = self.answers.error_answer(cmd.command_id, error)
        accepted = self.store.accept(cmd.command_id, cmd.command, cmd.params, cmd.sender, (response, message),
                                     hold_until=self._hold())
        if not accepted.new:
            self._duplicate(accepted.row)
            return True
        self.log.warning("%s: refused, %d commands already waiting", cmd.command_id, waiting)
        self._answers.append((accepted.outbox_id, message))
        self._after_commit.append((self.audit.command, (
            cmd.command_id, cmd.sender, cmd.command, cmd.params, "error", 0, error)))
        return True

    def _answer_now(self, cmd: protocol.Command, action: Action, plain: tuple[str, ...] = ()) -> None:
        """A command that runs nothing (echo) is answered on arrival, without a worker.

        It is recorded done, with its response in the outbox, in the one transaction that
        accepts it: nothing ran that a crash could interrupt, and the health check is answered
        even while every worker is busy with a long git_pull.
        """
        result = self.answers.redacted(execute(action), plain)
        response, message = self.answers.answer(cmd.command_id, result.status, result.output, result.error, 0)
        accepted = self.store.accept(cmd.command_id, cmd.command, cmd.params, cmd.sender, (response, message),
                                     output=result.full_output, hold_until=self._hold())
        if not accepted.new:
            self._duplicate(accepted.row)
            return
        self._answers.append((accepted.outbox_id, message))
        self._after_commit.append((self.audit.command, (
            cmd.command_id, cmd.sender, cmd.command, cmd.params, result.status, 0, result.error)))
        self._after_commit.append((self.on_done, (cmd.command, result.status, 0)))
        # DEBUG, not INFO: health checks can be frequent, a line each was a quarter of the
        # listener's time in a burst; the commands table keeps every one of them.
        self.log.debug("%s: %s from %s %s on arrival", cmd.command_id, cmd.command, cmd.sender or "?", result.status)

    def _rejected(self, rejected: protocol.Rejected, data: bytes) -> None:
        # Costs the sender nothing, so a flood of these is rate-limited in the log (audit.py),
        # and counted there for the metrics.
        loud = self.audit.rejected(rejected.reason, rejected.command_id, len(data), kind=rejected.kind)
        if rejected.command_id is None:
            if loud:
                self.log.warning("dropped a message of %d bytes that cannot be answered: %s", len(data), rejected.reason)
            return
        if not rejected.stored:
            # Unauthenticated: its command_id is unverified, and an answer under it would let
            # anyone add an answer to a real command. Not answered, nothing written.
            if loud:
                self.log.warning("%s: dropped, not answered: %s", rejected.command_id, rejected.reason)
            return
        if loud:
            self.log.warning("%s: refused: %s", rejected.command_id, rejected.reason)
        existing = self.store.get(rejected.command_id)
        if existing is not None:
            self._duplicate(existing)
            return
        response, message = self.answers.error_answer(rejected.command_id, rejected.reason)
        accepted = self.store.accept(rejected.command_id, "(malformed)", {}, None, (response, message),
                                     hold_until=self._hold())
        if accepted.new:
            self._answers.append((accepted.outbox_id, message))

    def _duplicate(self, row: dict[str, Any]) -> None:
        command_id = row["command_id"]
        if self.via == "stream" or self.stream_twins.twin(command_id):
            # The same command by the other path (a backend sending both ways), or a stream entry
            # read again after a restart: it already has its one response.
            self.log.info("%s: %s; already %s, no second answer", command_id,
                          "also delivered by the stream" if self.via == "pubsub"
                          else "read from the stream but already known (its pub/sub copy, or read again)",
                          row["state"])
            return
        if row["state"] != "done":
            self.log.info("%s: seen before and still %s; its response will follow", command_id, row["state"])
            return
        # Its response still to go out (due, waiting for a receiver, or in this very group) is
        # answer enough; one already published, held only until confirmed, is not.
        this_group = {outbox_id for outbox_id, _ in self._answers}
        if self.store.response_waiting(command_id, this_group):
            self.log.info("%s: seen before; its response is already waiting to be published", command_id)
            return
        self.log.info("%s: seen before; publishing its stored response again, not running it", command_id)
        message = Message(self.config.response_channel, row["response"], command_id, None)
        self._answers.append((self.store.enqueue(message, self._hold()), message))

    def _store_failed(self, data: bytes, exc: StoreUnavailable) -> None:
        """The database cannot be written: refuse loudly and directly, keep nothing we cannot keep.

        Loudly, but one line a minute: every message is refused, and each refusal is its answer.
        """
        suppressed = self._unwritable.take()
        if suppressed is not None:
            self.log.error("cannot write %s (%s): refusing commands until it is writable%s", self.config.outbox_db,
                           exc, _more(suppressed, "refused since the last line"))
        try:
            cmd = protocol.parse(data, max_bytes=self.config.max_message_bytes, secret=self.config.shared_secret)
        except protocol.Rejected:
            return
        # A command seen before may well have run: "not run, send it again" would be a lie that
        # gets it run twice. Reading still works on a full disk.
        try:
            known = self.store.get(cmd.command_id)
        except StoreUnavailable:
            known = None
        if known is not None:
            if known["state"] != "done" or not known["response"]:
                self.log.info("%s: seen before and still %s; its response will follow", cmd.command_id, known["state"])
                return
            payload = known["response"]  # its stored response again, as for any duplicate
        else:
            payload = self.answers.error_answer(
                cmd.command_id,
                f"the agent cannot write its database ({exc}); the command was not run, send it again later",
                result_key=False,
            )[1].payload
        try:
            self.routes.publish_raw(self.config.response_channel, payload)
        except REDIS_DOWN:
            pass


def _more(count: int, what: str) -> str:
    """The tail of a rate-limited log line: how many it stands for."""
    return f" ({count} more {what})" if count else ""


class IntakeLoop(Loop):
    """Takes what the listener read, everything buffered (up to ``group_max``) as one group,
    and hands it to its Intake: one transaction per group. Owns the Intake and its Store.

    A thread of its own so that the subscription is read while a group is parsed, checked and
    committed: a listener that did that itself left its socket unread meanwhile, Redis's
    buffer for it overflowed in a burst, and Redis closed the subscription with all it held.
    """

    group_max = 200  # messages accepted in one transaction, at most

    def __init__(self, name: str, config: Config, inbox: Inbox, open_store: Callable[[], Store],
                 make_intake: Callable[[Store], Intake]):
        super().__init__(name, config)
        self.inbox, self.open_store, self.make_intake = inbox, open_store, make_intake
        self.retired = False  # replaced by the watchdog: the inbox is its successor's

    def setup(self) -> None:
        self.store = self.open_store()
        self.intake = self.make_intake(self.store)

    def loop_once(self) -> None:
        batch = self.inbox.take(self.group_max, 0.5)
        if batch:
            self.intake.handle_many([data for data, _ in batch], [read_at for _, read_at in batch])

    def teardown(self) -> None:
        try:
            # A graceful stop (Agent.shutdown stops the listener first): what it read is still
            # accepted, since pub/sub never delivers it again. Not by a thread the watchdog
            # replaced: the inbox is its successor's.
            while not self.retired:
                batch = self.inbox.take(self.group_max, 0)
                if not batch:
                    break
                self.intake.handle_many([data for data, _ in batch], [read_at for _, read_at in batch])
        finally:
            self.store.close()

    def retire(self) -> None:
        """Called by the watchdog on a stuck intake: stop once the call it is stuck in returns,
        leaving the inbox to its successor."""
        self.retired = True
        self.stop.set()


class StreamTwins:
    """command_ids read from the stream, remembered for ``window`` s: a pub/sub copy of one
    arriving meanwhile is the backend's second path, not a retry asking for the response again.
    Shared by the intake and the stream reader's intake; any thread."""

    window = 60.0

    def __init__(self) -> None:
        self._seen: dict[str, float] = {}
        self._lock = threading.Lock()

    def seen(self, command_id: str) -> None:
        """``command_id`` was just read from the stream."""
        now = time.monotonic()
        with self._lock:
            self._seen[command_id] = now
            if len(self._seen) > 10000:
                self._seen = {k: t for k, t in self._seen.items() if now - t < self.window}

    def twin(self, command_id: str) -> bool:
        """Was ``command_id`` read from the stream within the window?"""
        with self._lock:
            seen = self._seen.get(command_id)
        return seen is not None and time.monotonic() - seen < self.window
