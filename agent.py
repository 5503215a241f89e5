#!/usr/bin/env python3
"""cockpit-agent: runs whitelisted commands published by the Cockpit backend over Redis.

A message's whole path, in call order:

    Listener.loop_once -> Inbox -> IntakeLoop.loop_once -> Intake.handle_many -> Store.accept (commands row) -> queue
    -> Worker.loop_once -> handlers.execute -> Store.finish (outbox row)
    -> Flusher.loop_once -> PUBLISH (and SET of the result key)

Each thread is a small Loop; SIGTERM/SIGINT only set a flag that the main thread acts on.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import queue
import random
import select
import signal
import socket
import sqlite3
import ssl
import sys
import threading
import time
import traceback
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import redis
from redis._parsers import _RESP2Parser as PythonParser  # listed in redis._parsers.__all__

import logs
import protocol
import sealed
from audit import Audit, Throttle
from config import VERSION, Config, RedactSecrets, load, secrets_of
from errors import ConfigError, DatabaseInUse, ValidationError
from handlers import REGISTRY, Action, Children, Registry, Result, execute
from handlers.base import Deadline, answer_deadline, monotonic_ms
from handlers.loader import registry_with_dir
from notify import Notifier
from outbox import Message, Store
from outbox.owner import DatabaseLock, instance_id

log = logging.getLogger("cockpit_agent")

EX_CONFIG = 78  # sysexits.h; the unit does not restart on it (RestartPreventExitStatus)
EX_SOFTWARE = 70  # sysexits.h; a thread died: systemd restarts the agent (Restart=on-failure)
REDIS_DOWN = (redis.ConnectionError, redis.TimeoutError, OSError)

# Publishes a response and stores it at its result key in one step. The "delivered" marker
# (``delivered_key``) makes a retry after a lost reply (Redis answered, the connection died
# before we read it) a no-op instead of a second copy. Returns the number of receivers, or -1
# if already delivered.
PUBLISH_ONCE = """
if #KEYS == 2 and redis.call('EXISTS', KEYS[2]) == 1 then return -1 end
local receivers = redis.call('PUBLISH', ARGV[1], ARGV[2])
if #KEYS == 2 then
  redis.call('SET', KEYS[1], ARGV[2], 'EX', ARGV[3])
  if receivers > 0 then redis.call('SET', KEYS[2], '1', 'EX', ARGV[3]) end
end
return receivers
"""

# Which Redis answered: its run_id, read inside Redis so the client parses 40 characters, not
# the whole INFO text (redis-py's INFO parser cost more than the PUBLISH). false if INFO is
# refused (ACL without +info): a PUBLISH with receivers is then taken as final.
RUN_ID = """
local info = redis.pcall('INFO', 'server')
if type(info) ~= 'string' then return false end
return string.match(info, 'run_id:(%x+)')
"""
PUBLISH_ONCE_SHA = hashlib.sha1(PUBLISH_ONCE.encode()).hexdigest()
RUN_ID_SHA = hashlib.sha1(RUN_ID.encode()).hexdigest()


RESULT_PREFIX = "cockpit-agent-result:"
DELIVERED_PREFIX = "cockpit-agent-delivered:"


def delivered_key(result_key: str) -> str:
    """The delivered marker of the response stored at ``result_key``:
    ``cockpit-agent-delivered:{agent_id}:{command_id}``. Under a prefix of its own, because as
    ``{result_key}:delivered`` the marker of command X was the result key of command
    ``X:delivered``, and publishing that one silenced X's answer."""
    return DELIVERED_PREFIX + (result_key[len(RESULT_PREFIX):] if result_key.startswith(RESULT_PREFIX) else result_key)


def publish_once_args(message: Message, ttl: int) -> list[Any]:
    """The EVALSHA arguments of PUBLISH_ONCE for ``message``."""
    keys = [message.result_key, delivered_key(message.result_key)] if message.result_key else []
    return [PUBLISH_ONCE_SHA, len(keys), *keys, message.channel, message.payload, ttl]


def publish_messages(client: redis.Redis, messages: list[Message], ttl: int,
                     read_run_id: bool = True) -> tuple[list[Any], str | None]:
    """PUBLISH ``messages`` (each also SET at its result key) in one round trip, in order.

    Returns each message's result (receivers, -1 if already delivered, or the exception Redis
    answered with, e.g. NoScriptError: nothing was published for that one) and the run_id of
    the Redis that did it: None if INFO is refused (or ``read_run_id`` is False), "" if it
    could not be read (it then never matches, and the message is published again rather than
    trusted). Raises if Redis cannot be reached. EVALSHA straight away: registered Scripts
    would first ask SCRIPT EXISTS, a second round trip each time; a Redis that forgot them
    (restarted) gets them loaded here.
    """
    for attempt in (1, 2):
        pipe = client.pipeline(transaction=False)
        for message in messages:
            pipe.evalsha(*publish_once_args(message, ttl))
        if read_run_id:
            pipe.evalsha(RUN_ID_SHA, 0)
        results = pipe.execute(raise_on_error=False)
        run_id = results.pop() if read_run_id else None
        for result in (run_id, *results):
            if isinstance(result, REDIS_DOWN):
                raise result
        missing = [isinstance(result, redis.exceptions.NoScriptError) for result in (*results, run_id)]
        if not any(missing):
            break
        load_scripts(client)
        if attempt == 2 or not all(missing[:len(results)]):
            break  # some did run: the caller sends the others again, in its own order
    if isinstance(run_id, Exception):
        return results, ""
    return results, run_id.decode() if run_id is not None else None


def load_scripts(client: redis.Redis) -> None:
    """Load the Lua scripts into a Redis that does not have them (restarted, SCRIPT FLUSH)."""
    client.script_load(PUBLISH_ONCE)
    client.script_load(RUN_ID)


class AnswerPublisher:
    """The intake's own Redis connection, for publishing answers as soon as they are committed.

    It reads the run_id of the Redis it is connected to once per connection, not once per
    answer (INFO, even inside Lua, cost more than the PUBLISH): a TCP connection cannot
    outlive the redis-server it reached, so every PUBLISH on it went to that run_id. A
    reconnection during a call leaves the run_id unknown ("": confirmed only by publishing
    again). Owned by one thread.
    """

    def __init__(self, config: Config):
        self.config = config
        self.client: redis.Redis | None = None
        self.run_id: str | None = None
        self.run_id_known = False  # False until read on the current connection
        self.connects = 0

    def _connected(self, connection: Any) -> None:
        self.connects += 1
        self.run_id_known = False

    def publish(self, messages: list[Message]) -> tuple[list[Any], str | None]:
        """As ``publish_messages``."""
        if self.client is None:
            client = self.config.redis_client(single_connection_client=True)  # connects now
            client.connection.register_connect_callback(self._connected)
            self.client = client
        if not self.client.connection.is_connected:
            self.client.connection.connect()  # now, not inside the call: the run_id is then read in it
        connects, known = self.connects, self.run_id_known
        if known and len(messages) == 1:
            results, run_id = [self._publish_one(messages[0])], None
        else:
            results, run_id = publish_messages(self.client, messages, self.config.result_ttl, read_run_id=not known)
        if self.connects != connects:
            return results, ""
        if known:
            return results, self.run_id
        if run_id != "":
            self.run_id, self.run_id_known = run_id, True
        return results, run_id

    def confirm(self) -> bool:
        """True if a PING on the connection of the last ``publish`` is answered by the same
        server: the PUBLISHes before it are then final. False if that cannot be told."""
        if self.client is None or not self.run_id_known:
            return False
        connects, connection = self.connects, self.client.connection
        try:
            connection.send_command("PING")
            connection.read_response()
        except Exception:
            connection.disconnect()
            return False
        return self.connects == connects

    def _publish_one(self, message: Message) -> Any:
        """One answer, the common case, straight on the connection: redis-py's command path
        (retries, pooling, metrics hooks) cost a quarter of the round trip before the bytes left."""
        connection = self.client.connection
        try:
            for attempt in (1, 2):
                connection.send_command("EVALSHA", *publish_once_args(message, self.config.result_ttl))
                try:
                    return connection.read_response()
                except redis.exceptions.NoScriptError as exc:  # nothing ran; a Redis that forgot it
                    load_scripts(self.client)
                    if attempt == 2:
                        return exc
        except redis.ResponseError as exc:
            return exc
        except BaseException:
            connection.disconnect()  # whatever was in flight on it is lost; reconnects on next use
            raise

    def close(self) -> None:
        """Close the connection."""
        if self.client is not None:
            try:
                self.client.close()
            except Exception:
                pass
            self.client = None


class Backoff:
    """Capped exponential backoff with full jitter; ``reset`` after a success."""

    def __init__(self, base: float = 0.5, cap: float = 5.0):
        self.base, self.cap, self.failures = base, cap, 0

    def next(self) -> float:
        """The next delay (seconds)."""
        delay = min(self.cap, self.base * (2 ** min(self.failures, 16)))
        self.failures += 1
        return delay / 2 + random.uniform(0, delay / 2)

    def reset(self) -> None:
        """Start again from the base delay."""
        self.failures = 0


class Loop(threading.Thread):
    """A thread that runs ``loop_once`` until ``stop`` is set, and never dies of an error.

    An iteration that raises is logged, then the loop backs off (capped, jittered) and tries
    again; the backoff resets after a success. ``last_progress`` tells the watchdog it lives.
    """

    backoff_cap = 5.0  # the longest wait after a failed iteration
    reconnect_cap = 5.0  # the same, when it failed because Redis could not be reached

    def __init__(self, name: str, agent: Agent):
        super().__init__(name=f"cockpit-agent-{name}", daemon=True)
        self.agent = agent
        self.config = agent.config
        self.log = logging.getLogger(f"cockpit_agent.{name}")
        self.stop = threading.Event()
        self.backoff = Backoff(cap=self.backoff_cap)
        self.reconnect_backoff = Backoff(cap=self.reconnect_cap)
        self.last_progress = time.monotonic()
        self.failing_since: float | None = None

    def setup(self) -> None:
        """Open what this thread owns (its Store, its Redis connection)."""

    def teardown(self) -> None:
        """Close what ``setup`` opened."""

    def loop_once(self) -> None:
        """One unit of work; waits with ``self.stop.wait`` or an event, never ``time.sleep``."""
        raise NotImplementedError

    def pause(self, delay: float) -> None:
        """Wait ``delay`` s after a failed iteration (a Loop may also end it early)."""
        self.stop.wait(delay)

    def on_error(self, exc: Exception) -> None:
        """Log a failed iteration: Redis outages once per outage, anything else in full."""
        if isinstance(exc, REDIS_DOWN):
            hint = self.config.explain_redis_error(exc)
            if hint and self.failing_since is None:
                self.log.error("cannot use Redis: %s (%s); retrying with backoff", hint, exc)
            elif self.failing_since is None:
                self.log.warning("Redis unreachable: %s", exc)
        else:
            self.log.exception("iteration failed; retrying")

    def retry_delay(self, exc: Exception) -> float:
        """How long to wait after an iteration failed with ``exc``."""
        return (self.reconnect_backoff if isinstance(exc, REDIS_DOWN) else self.backoff).next()

    def run(self) -> None:
        while not self.stop.is_set():
            try:
                self.setup()
                break
            except Exception as exc:  # e.g. the database directory is not writable yet
                self.log.error("cannot start: %s", exc)
                self.stop.wait(self.backoff.next())
        while not self.stop.is_set():
            try:
                self.loop_once()
            except Exception as exc:
                self.on_error(exc)
                if self.failing_since is None:
                    self.failing_since = time.monotonic()
                self.pause(self.retry_delay(exc))
            else:
                if self.failing_since is not None:
                    self.log.info("recovered after %.0f s", time.monotonic() - self.failing_since)
                    self.failing_since = None
                self.backoff.reset()
                self.reconnect_backoff.reset()
            self.last_progress = time.monotonic()
        try:
            self.teardown()
        except Exception:
            self.log.exception("teardown failed")


@dataclass(frozen=True)
class Job:
    """An accepted, validated command waiting for a worker."""

    command_id: str
    command: str
    action: Action
    sender: str | None = None
    params: dict[str, Any] | None = None  # as received, for the audit line
    deadline: Deadline | None = None  # when the backend stops waiting for it; None: the full timeout
    # Its decrypted params, masked in what the child prints; never in repr.
    secrets: tuple[str, ...] = field(default=(), repr=False)


class Intake:
    """Turns a raw message into a ``commands`` row and a queued Job, or into an error answer.

    Owned by the thread that reads the messages (it holds that thread's Store): the listener
    (``via="pubsub"``) or the stream reader (``via="stream"``).
    """

    def __init__(self, agent: Agent, store: Store, client: redis.Redis, via: str = "pubsub"):
        self.agent, self.config, self.store, self.client = agent, agent.config, store, client
        self.via = via
        self.log = logging.getLogger("cockpit_agent.intake")
        self.publisher = AnswerPublisher(self.config)
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
        except sqlite3.Error as exc:
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
            self.agent.pool.submit(job)
        if answers and self._on_arrival:
            self._publish(answers)
        elif answers:
            self.agent.outbox_wake.set()
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
            self.agent.flusher.handover(published, None if self.publisher.confirm() else run_id)
        if len(published) < len(ids):
            # No receiver (the flusher retries with backoff), refused, or Redis unreachable.
            went_out = set(published)
            try:
                self.store.due_now([i for i in ids if i not in went_out])
            except sqlite3.Error as exc:  # they stay held, and are due once the hold ends
                self.log.warning("could not hand %d answers to the flusher (%s); they go out within %d s",
                                 len(ids) - len(published), exc, Flusher.hold_seconds)
            self.agent.outbox_wake.set()

    def _hold(self) -> float:
        """``next_attempt_at`` of an answer: held while this thread publishes it itself once it
        is committed, due at once for the flusher otherwise."""
        return time.time() + Flusher.hold_seconds if self._on_arrival else 0.0

    def _handle(self, data: bytes) -> None:
        try:
            cmd = protocol.parse(
                data, max_bytes=self.config.max_message_bytes, secret=self.config.shared_secret
            )
        except protocol.Rejected as rejected:
            self._rejected(rejected, data)
            return
        if self.via == "stream":
            self.agent.seen_on_stream(cmd.command_id)
        # The handler sees the decrypted params; cmd.params (the tokens) is what is stored and audited.
        plain: tuple[str, ...] = ()
        try:
            params, plain = sealed.open_params(cmd.params, self.config.shared_secret)
            action = self.agent.registry.prepare(cmd.command, params, self.config)
        except Exception as exc:
            if isinstance(exc, ValidationError):
                error = self.agent.mask(str(exc), plain)
            else:
                # A handler's check that failed by itself: answered, not a traceback, whose text
                # (unmasked, the log filter knows only the configured secrets) could quote the
                # decrypted params. The innermost frame says where, for the handler's author.
                where = traceback.extract_tb(exc.__traceback__)[-1]
                error = self.agent.mask(
                    f"the agent failed to check {protocol.preview(cmd.command)}: {type(exc).__name__}: {exc} "
                    f"(at {os.path.basename(where.filename)}:{where.lineno})", plain)
                suppressed = self._check_failed.take()  # a bug hit by one message is hit by all its copies
                if suppressed is not None:
                    self.log.error("%s: %s%s", cmd.command_id, error,
                                   _more(suppressed, "checks failed the same way since the last line"))
            response, message = self.agent.error_answer(cmd.command_id, error)
            accepted = self.store.accept(cmd.command_id, cmd.command, cmd.params, cmd.sender, (response, message),
                                         hold_until=self._hold())
            if accepted.new:
                self.log.warning("%s: %s refused: %s", cmd.command_id, protocol.preview(cmd.command), error)
                self._answers.append((accepted.outbox_id, message))
                self._after_commit.append((self.agent.audit.command, (
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
        waiting = self.agent.pool.pending() + len(self._jobs)
        if waiting < self.config.queue_max:
            return False
        error = (f"busy: {waiting} commands are already waiting (QUEUE_MAX={self.config.queue_max}); "
                 "send it again later")
        response, message = self.agent.error_answer(cmd.command_id, error)
        accepted = self.store.accept(cmd.command_id, cmd.command, cmd.params, cmd.sender, (response, message),
                                     hold_until=self._hold())
        if not accepted.new:
            self._duplicate(accepted.row)
            return True
        self.log.warning("%s: refused, %d commands already waiting", cmd.command_id, waiting)
        self._answers.append((accepted.outbox_id, message))
        self._after_commit.append((self.agent.audit.command, (
            cmd.command_id, cmd.sender, cmd.command, cmd.params, "error", 0, error)))
        return True

    def _answer_now(self, cmd: protocol.Command, action: Action, plain: tuple[str, ...] = ()) -> None:
        """A command that runs nothing (echo) is answered on arrival, without a worker.

        It is recorded done, with its response in the outbox, in the one transaction that
        accepts it: nothing ran that a crash could interrupt, and the health check is answered
        even while every worker is busy with a long git_pull.
        """
        result = self.agent.redacted(execute(action), plain)
        response, message = self.agent.answer(cmd.command_id, result.status, result.output, result.error, 0)
        accepted = self.store.accept(cmd.command_id, cmd.command, cmd.params, cmd.sender, (response, message),
                                     output=result.full_output, hold_until=self._hold())
        if not accepted.new:
            self._duplicate(accepted.row)
            return
        self._answers.append((accepted.outbox_id, message))
        self._after_commit.append((self.agent.audit.command, (
            cmd.command_id, cmd.sender, cmd.command, cmd.params, result.status, 0, result.error)))
        if self.agent.metrics is not None:
            self._after_commit.append((self.agent.metrics.command_done, (cmd.command, result.status, 0)))
        self._after_commit.append((self.agent.count_executed, ()))
        # DEBUG, not INFO: health checks can be frequent, a line each was a quarter of the
        # listener's time in a burst; the commands table keeps every one of them.
        self.log.debug("%s: %s from %s %s on arrival", cmd.command_id, cmd.command, cmd.sender or "?", result.status)

    def _rejected(self, rejected: protocol.Rejected, data: bytes) -> None:
        # Costs the sender nothing, so a flood of these is rate-limited in the log (audit.py),
        # and counted there for the metrics.
        loud = self.agent.audit.rejected(rejected.reason, rejected.command_id, len(data), kind=rejected.kind)
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
        response, message = self.agent.error_answer(rejected.command_id, rejected.reason)
        accepted = self.store.accept(rejected.command_id, "(malformed)", {}, None, (response, message),
                                     hold_until=self._hold())
        if accepted.new:
            self._answers.append((accepted.outbox_id, message))

    def _duplicate(self, row: dict[str, Any]) -> None:
        command_id = row["command_id"]
        if self.via == "stream" or self.agent.twin_of_stream(command_id):
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
        waiting = any(
            outbox_id in this_group or next_attempt_at <= time.time() or unheard_since is not None
            for outbox_id, next_attempt_at, unheard_since in self.store.db.execute(
                "SELECT id, next_attempt_at, unheard_since FROM outbox WHERE command_id = ? AND result_key IS NOT NULL",
                [command_id],
            )
        )
        if waiting:
            self.log.info("%s: seen before; its response is already waiting to be published", command_id)
            return
        self.log.info("%s: seen before; publishing its stored response again, not running it", command_id)
        message = Message(self.config.response_channel, row["response"], command_id, None)
        self._answers.append((self.store.enqueue(message, self._hold()), message))

    def _store_failed(self, data: bytes, exc: sqlite3.Error) -> None:
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
        except sqlite3.Error:
            known = None
        if known is not None:
            if known["state"] != "done" or not known["response"]:
                self.log.info("%s: seen before and still %s; its response will follow", cmd.command_id, known["state"])
                return
            payload = known["response"]  # its stored response again, as for any duplicate
        else:
            payload = self.agent.error_answer(
                cmd.command_id,
                f"the agent cannot write its database ({exc}); the command was not run, send it again later",
                result_key=False,
            )[1].payload
        try:
            self.client.publish(self.config.response_channel, payload)
        except REDIS_DOWN:
            pass


def _more(count: int, what: str) -> str:
    """The tail of a rate-limited log line: how many it stands for."""
    return f" ({count} more {what})" if count else ""


class Inbox:
    """Raw messages the listener has read and the intake thread has not taken yet.

    Bounded in bytes (LISTENER_BUFFER_BYTES), not in messages: when it is full the listener
    stops reading and Redis holds the rest (up to its client-output-buffer-limit pubsub), as
    it did before reading and handling were split. One message always gets in, however big.
    """

    def __init__(self, max_bytes: int):
        self.max_bytes = max_bytes
        self.bytes = 0
        self._messages: deque[tuple[bytes, float]] = deque()  # with when it was read (unix s)
        lock = threading.Lock()
        self._arrived = threading.Condition(lock)
        self._room = threading.Condition(lock)

    def __len__(self) -> int:
        return len(self._messages)

    def _full_for(self, data: bytes) -> bool:
        return bool(self._messages) and self.bytes + len(data) > self.max_bytes

    def put(self, data: bytes, wait: float, force: bool = False) -> bool:
        """Add ``data``, waiting up to ``wait`` s for room; False if there was none.
        ``force`` adds it regardless (a stopping listener drops nothing it has read)."""
        with self._room:
            if not force and self._full_for(data):
                self._room.wait(wait)
                if self._full_for(data):
                    return False
            self._messages.append((data, time.time()))
            self.bytes += len(data)
            self._arrived.notify()
        return True

    def take(self, limit: int, wait: float) -> list[tuple[bytes, float]]:
        """Up to ``limit`` messages in arrival order, each with when it was read, waiting up to
        ``wait`` s for the first."""
        with self._arrived:
            if not self._messages and wait > 0:
                self._arrived.wait(wait)
            batch = []
            while self._messages and len(batch) < limit:
                data, read_at = self._messages.popleft()
                self.bytes -= len(data)
                batch.append((data, read_at))
            if batch:
                self._room.notify()
        return batch

    def wake(self) -> None:
        """End a ``take`` that waits (a stop)."""
        with self._arrived:
            self._arrived.notify_all()


class IntakeLoop(Loop):
    """Takes what the listener read, everything buffered (up to ``group_max``) as one group,
    and hands it to its Intake: one transaction per group. Owns the Intake and its Store.

    A thread of its own so that the subscription is read while a group is parsed, checked and
    committed: a listener that did that itself left its socket unread meanwhile, Redis's
    buffer for it overflowed in a burst, and Redis closed the subscription with all it held.
    """

    group_max = 200  # messages accepted in one transaction, at most

    def setup(self) -> None:
        self.inbox = self.agent.inbox
        self.store = self.agent.open_store()
        # The client only answers when the database cannot be written; it connects on that first use.
        self.intake = Intake(self.agent, self.store, self.agent.redis)

    def loop_once(self) -> None:
        batch = self.inbox.take(self.group_max, 0.5)
        if batch:
            self.intake.handle_many([data for data, _ in batch], [read_at for _, read_at in batch])

    def teardown(self) -> None:
        try:
            # A graceful stop (Agent.shutdown stops the listener first): what it read is still
            # accepted, since pub/sub never delivers it again. Not by a thread the watchdog
            # replaced: the inbox is its successor's.
            while self.agent.intake_loop is self:
                batch = self.inbox.take(self.group_max, 0)
                if not batch:
                    break
                self.intake.handle_many([data for data, _ in batch], [read_at for _, read_at in batch])
        finally:
            self.intake.publisher.close()
            self.store.close()


def _as_pushed(response: Any) -> Any:
    """The subscription's handler of RESP3 push messages (every message on it): the message as
    it came. redis-py's default handler builds a debug line of every message, ``str()`` of its
    bytes, even where debug logging is off: a quarter of a millisecond for each of 64 KiB."""
    return response


class Listener(Loop):
    """Reads the command channel and puts every command on the inbox for the intake thread.

    It does nothing else with a command, so that it reads as fast as Redis writes. Probes,
    PONGs, the liveness checks and the subscription's confirmation are handled here.
    """

    liveness_message = b"cockpit-agent-liveness"
    # Its reconnect is what sends the backlog out once Redis is back (it wakes the flusher),
    # so while Redis cannot be reached it tries again every 0.5-1 s, not every 2.5-5 s: each
    # try is then one refused TCP connect, and the jitter spreads a fleet's reconnects.
    reconnect_cap = 1.0
    # Bytes per recv() on the subscription (redis-py's default is 64 KiB): a burst is read in
    # fewer, larger reads.
    socket_read_size = 1024 * 1024

    def setup(self) -> None:
        self.client = self.config.redis_client()
        # _buffered looks into redis-py's pure-Python parser to tell a message that has partly
        # arrived from none at all. hiredis, where installed, replaces that parser by default
        # and would bring back the loss _next_message prevents, so these connections keep it
        # (redis-py swaps _RESP2Parser for its RESP3 twin when it speaks RESP3, its default).
        self.client.connection_pool.connection_kwargs["parser_class"] = PythonParser
        self.client.connection_pool.connection_kwargs["socket_read_size"] = self.socket_read_size
        self.inbox = self.agent.inbox
        self.pubsub: redis.client.PubSub | None = None
        self.liveness_interval = max(1.0, min(15.0, float(self.config.heartbeat_interval)))
        self.probes_refused = False
        self.confirm_nonce: str | None = None  # the PING that confirms a new subscription
        self.confirm_sent_at = 0.0
        self.confirmed = False  # Redis has confirmed the current subscription once
        self.silenced = False  # silent past the limit, the subscription kept (see _check_liveness)
        self.last_check = 0.0
        self.reconnects = self.reconnects_seen = 0  # by redis-py, on its own (see _reconnected)

    @property
    def intake(self) -> Intake:
        """The Intake the commands read here go to (the intake thread's)."""
        return self.agent.intake_loop.intake

    def teardown(self) -> None:
        self._close()

    def _close(self) -> None:
        if self.pubsub is not None:
            try:
                if self.pubsub.connection is not None:
                    # The connection goes back to the pool, for other commands.
                    self.pubsub.connection.deregister_connect_callback(self._reconnected)
                self.pubsub.close()
            except Exception:
                pass
            self.pubsub = None

    def _subscribe(self) -> None:
        self.pubsub = self.client.pubsub(ignore_subscribe_messages=True, push_handler_func=_as_pushed)
        self.pubsub.subscribe(self.config.command_channel)
        # Connected now: any later connect of this connection is redis-py's own reconnection.
        self.pubsub.connection.register_connect_callback(self._reconnected)
        self.reconnects_seen = self.reconnects
        now = time.monotonic()
        self.confirmed = self.silenced = False
        self._confirm(now)
        self.last_pong = self.last_ping = now
        self.probe_sent_at, self.probe_nonce = now, None  # first self-check one interval from now

    def _confirm(self, now: float) -> None:
        # "online" must mean that commands are really heard. redis-py 8 counts a SUBSCRIBE as
        # done once it is sent, so a PING follows it on the same connection: Redis answers in
        # order, and its PONG is read by loop_once like any message (a command that arrives
        # before it is accepted as usual), which then calls _online.
        self.confirm_nonce = f"cockpit-agent-subscribed-{random.getrandbits(64):016x}"
        self.confirm_sent_at = now
        self.pubsub.ping(self.confirm_nonce)

    def _online(self) -> None:
        """Redis confirmed the subscription: say so, and send what waits."""
        self.confirm_nonce = None
        self.confirmed = True
        self.log.info("subscribed to %s", self.config.command_channel)
        self.agent.redis_connected.set()
        self.agent.heartbeat_now.set()
        self.agent.flush_now()

    def _other(self, message: dict[str, Any]) -> None:
        """A message that is not a command: the PONG that confirms the subscription."""
        if (self.confirm_nonce is not None and message["type"] == "pong"
                and message["data"] == self.confirm_nonce.encode()):
            self._online()

    def loop_once(self) -> None:
        if self.pubsub is None:
            self._subscribe()
        # Half a second: how long a stop waits for this thread, at two idle wake-ups a second.
        message = self._next_message(0.5)
        now = time.monotonic()
        if self.reconnects != self.reconnects_seen:
            self._subscription_lost(now)
        if message is not None:
            self.last_pong = now  # any traffic proves the connection lives
            if self.silenced:
                self.silenced = False
                self.log.info("Redis answers on the subscription again")
                self._confirm(now)
            if message["type"] == "message":
                self._received(message["data"], now)
            else:
                self._other(message)
        if self.confirm_nonce is not None and now - self.confirm_sent_at > self.config.redis_socket_timeout:
            if not self.confirmed:
                raise redis.TimeoutError("no confirmation of SUBSCRIBE from Redis")
            self.confirm_nonce = None  # a kept subscription, silent again: _check_liveness goes on
        self._check_liveness(now)
        if self.confirm_nonce is None and not self.silenced:
            self._check_subscription(time.monotonic())

    def _received(self, data: bytes, now: float) -> None:
        """A message on the command channel: a probe of ours, or a command for the intake."""
        if data.startswith(PROBE_PREFIX):
            self._probe_received(data)
            return
        # A message heard proves the subscription; a probe queued behind a flood of
        # commands must not be taken for a lost one (reconnecting would drop some).
        self.probe_sent_at, self.probe_nonce = now, None
        if not self.inbox.put(data, 0.5):
            self._wait_for_room(data)

    def _wait_for_room(self, data: bytes) -> None:
        """The inbox is full: read nothing more (Redis holds the rest) until the intake has
        taken enough. A stop lets the message in regardless: nothing read may be dropped."""
        self.log.warning("%d bytes read and not yet accepted (LISTENER_BUFFER_BYTES=%d): reading paused",
                         self.inbox.bytes, self.inbox.max_bytes)
        while not self.inbox.put(data, 0.5, force=self.stop.is_set()):
            self.last_progress = time.monotonic()  # waiting for the intake thread, not stuck
        # Not reading was our choice, not Redis's silence.
        self.last_pong = self.probe_sent_at = time.monotonic()

    def _next_message(self, wait: float) -> dict[str, Any] | None:
        """The next message from the subscription: waits up to ``wait`` s for one to start
        arriving, then up to the socket timeout for the rest of it.

        redis-py's get_message(timeout=t) spends the same t on both, and when a message has
        only partly arrived by then (split across TCP segments or TLS records, the rest a few
        ms behind) it reconnects, silently dropping that message and everything behind it.
        With t = 0, to see whether more had arrived, a network that split a burst lost most of
        it. So the wait for a message to start is done here, and redis-py is only asked once
        there is something to read. A parser this does not know gets the old call; setup
        makes sure the listener's connections use the one it knows, even where hiredis is
        installed.
        """
        buffered = self._buffered()
        if buffered is None:
            return self.pubsub.get_message(timeout=wait)
        if not buffered and not self._readable(wait):
            return None
        return self.pubsub.get_message(timeout=self.config.redis_socket_timeout)

    def _buffered(self) -> bool | None:
        """Has redis-py read bytes of a message it has not returned yet? None if its parser
        is not the pure-Python one this knows. No system call."""
        buffer = getattr(getattr(self.pubsub.connection, "_parser", None), "_buffer", None)
        if not hasattr(buffer, "unread_bytes"):
            return None
        return buffer.unread_bytes() > 0

    def _readable(self, wait: float) -> bool:
        """Is there something to read on the subscription within ``wait`` s? (True when not
        connected: redis-py then reconnects, or says why it cannot.)"""
        sock = getattr(self.pubsub.connection, "_sock", None)
        if sock is None:
            return True
        if isinstance(sock, ssl.SSLSocket) and sock.pending():  # decrypted, not read yet
            return True
        poller = select.poll()  # not select.select: it refuses descriptors above 1023
        poller.register(sock, select.POLLIN)
        return bool(poller.poll(wait * 1000))

    def _check_liveness(self, now: float) -> None:
        """A connection that neither answers nor closes: a frozen server, or a broken connection.

        While it is silent the agent is not online. The subscription is torn down only if Redis
        answers on another connection: a frozen redis-server keeps its connections and, once it
        thaws, delivers on them everything published meanwhile, which a new subscription made
        at that moment would miss. A dead peer whose connection never closes is left to TCP
        keepalive and TCP_USER_TIMEOUT (config.redis_kwargs), which close it within ~25 s.
        """
        silent = now - self.last_pong
        if (silent > 2 * self.liveness_interval + self.config.redis_socket_timeout
                and now - self.last_check >= self.liveness_interval):
            self.last_check = now
            if not self.silenced:
                self.silenced = True
                if self.agent.listener is self:
                    self.agent.redis_connected.clear()
                self.log.warning("no answer from Redis on the subscription for %.0f s; "
                                 "asking on another connection whether Redis lives", silent)
            # Answered there, and still nothing here (even a moment later: a server that thaws
            # answers both): the subscription's connection is the broken one.
            if self._server_answers() and not self._readable(1.0):
                raise redis.ConnectionError(f"no answer from Redis on the subscription for {silent:.0f} s, "
                                            "while it answers on another connection")
        if now - self.last_ping >= self.liveness_interval:
            self.pubsub.ping(self.liveness_message)
            self.last_ping = now

    def _server_answers(self) -> bool:
        """Does Redis answer a PING on a new connection of its own, with short timeouts? Through
        the sentinels if there are any: after a failover, that is the new master."""
        from redis.backoff import NoBackoff
        from redis.retry import Retry

        timeout = min(2.0, self.config.redis_socket_timeout)
        client = self.config.redis_client(socket_timeout=timeout, socket_connect_timeout=timeout,
                                          retry=Retry(NoBackoff(), 0), health_check_interval=0)
        try:
            client.ping()
            return True
        except (redis.AuthenticationError, redis.ResponseError):
            return True  # it answered, if only to refuse
        except REDIS_DOWN:
            return False
        finally:
            client.connection_pool.disconnect()

    def _reconnected(self, connection: Any) -> None:
        """redis-py's connect callback on the subscription's connection (registered once it is
        up): redis-py made it again by itself, inside a read or a PING, and subscribed again.
        Only counted here, inside redis-py's call; loop_once acts on it."""
        self.reconnects += 1

    def _subscription_lost(self, now: float) -> None:
        """The old connection was closed (by Redis, or the network broke it): what was published
        meanwhile, and what Redis still held for it, is gone although PUBLISH counted us."""
        self.reconnects_seen = self.reconnects
        if self.agent.metrics is not None:
            self.agent.metrics.subscription_lost.inc()
        self.log.error("Redis closed the subscription connection (redis-py connected and subscribed again); "
                       "commands published meanwhile are lost. If this happened during a burst, raise "
                       "client-output-buffer-limit pubsub on the Redis server (now: %s)", self._pubsub_limit())
        if self.agent.listener is self:
            self.agent.redis_connected.clear()
        self.confirmed = self.silenced = False
        self._confirm(now)  # online again once Redis confirms the new subscription

    def _pubsub_limit(self) -> str:
        """Redis's client-output-buffer-limit for pub/sub clients (hard, soft, seconds)."""
        try:
            value = self.client.config_get("client-output-buffer-limit").get("client-output-buffer-limit", "")
        except redis.RedisError:  # an ACL without CONFIG, or a renamed CONFIG
            value = ""
        words = (value.decode(errors="replace") if isinstance(value, bytes) else str(value)).split()
        for i, word in enumerate(words[:-3]):
            if word == "pubsub" and all(w.isdigit() for w in words[i + 1:i + 4]):
                return " ".join(words[i + 1:i + 4])
        return "unknown: CONFIG GET was refused; the default is 32mb 8mb 60"

    def on_error(self, exc: Exception) -> None:
        if self.agent.listener is self:  # an abandoned listener must not speak for its replacement
            self.agent.redis_connected.clear()
        self._close()
        super().on_error(exc)

    # -- self-check: is the subscription really live? ------------------------------------------
    #
    # A PING answered on the subscriber connection proves the connection, not the subscription:
    # a server that dropped it (or a connection that came back without it) leaves a listener that
    # answers PINGs and hears nothing. So every few liveness intervals the listener publishes a
    # probe on its own command channel through the normal client: PUBLISH counting no receiver
    # means no subscription at all (PUBSUB NUMSUB would say the same); a probe that does not come
    # back on our own subscription within the deadline means someone else holds it. Either way
    # the subscription is torn down and made again. Probes are not JSON and never reach the Intake.

    def _check_subscription(self, now: float) -> None:
        interval = PROBE_EVERY * self.liveness_interval
        if self.probe_nonce is not None:
            if now - self.probe_sent_at > self.liveness_interval + self.config.redis_socket_timeout:
                self.probe_nonce = None
                if self._server_answers():  # else frozen since the PUBLISH: _check_liveness judges
                    raise redis.ConnectionError(
                        f"subscription to {self.config.command_channel} is not live: "
                        f"our own probe did not come back within {now - self.probe_sent_at:.0f} s"
                    )
            return
        if now - self.probe_sent_at < interval:
            return
        if self.probes_refused:
            return
        nonce = f"{os.getpid()}-{random.getrandbits(64):016x}"
        self.probe_sent_at, self.probe_nonce = now, nonce
        try:
            receivers = self.client.publish(self.config.command_channel, PROBE_PREFIX + nonce.encode())
        except redis.ResponseError as exc:  # e.g. an ACL without PUBLISH on the command channel
            self.log.warning("subscription self-check disabled: Redis refused the probe (%s)", exc)
            self.probes_refused, self.probe_nonce = True, None
            return
        except REDIS_DOWN:  # frozen or unreachable: no sign against the subscription; _check_liveness judges
            self.probe_nonce = None
            return
        if receivers == 0:
            self.probe_nonce = None
            raise redis.ConnectionError(f"subscription to {self.config.command_channel} is not live: "
                                        "Redis counts no subscriber on it")

    def _probe_received(self, data: bytes) -> None:
        if self.probe_nonce is not None and data == PROBE_PREFIX + self.probe_nonce.encode():
            self.probe_nonce = None
            self.probe_sent_at = time.monotonic()

    def abandon(self) -> None:
        """Called from another thread on a stuck listener: stop it and close its sockets, so a
        blocked read returns and Redis stops counting it as a subscriber."""
        self.stop.set()
        pubsub = getattr(self, "pubsub", None)
        if pubsub is not None and pubsub.connection is not None:
            try:
                pubsub.connection.disconnect()
            except Exception:
                pass


# -- command stream: commands that wait in Redis while the agent is away (COMMAND_STREAM=on) --


class StreamReader(Loop):
    """Reads the durable command stream ``cockpit-agent-stream:{agent_id}`` with a consumer group.

    An entry is acknowledged (XACK) only once its command is committed to SQLite (or answered
    without being kept); a crash before that leaves it pending, and pending entries are read
    again (from ID 0) after every (re)connection. The pub/sub path is unchanged; a command that
    comes both ways runs once and is answered once (``Intake._duplicate``).
    """

    batch = 50
    block_ms = 1000

    def setup(self) -> None:
        self.client = self.config.redis_client(socket_timeout=self.config.redis_socket_timeout + self.block_ms / 1000)
        self.store = self.agent.open_store()
        self.intake = Intake(self.agent, self.store, self.client, via="stream")
        self.key, self.group, self.consumer = self.config.stream_key, STREAM_GROUP, self.config.agent_id
        self.reclaim = True  # read our own pending entries first

    def teardown(self) -> None:
        self.intake.publisher.close()
        self.store.close()

    def on_error(self, exc: Exception) -> None:
        self.reclaim = True
        if isinstance(exc, sqlite3.Error):
            # Raised by _consume for a database that cannot be written: the intake said so
            # already, one line a minute; a traceback at every retry would flood the log.
            return
        super().on_error(exc)

    def loop_once(self) -> None:
        if self.reclaim:
            self._ensure_group()
            self._consume("0")
            self.reclaim = False
        if self.agent.pool.pending() >= self.config.queue_max:
            self.stop.wait(0.2)  # back-pressure: leave the commands in Redis until there is room
            return
        self._consume(">")

    def _ensure_group(self) -> None:
        try:
            # From ID 0: entries XADDed before the agent ever ran are commands for it too; any
            # already run are known by command_id and not run again.
            self.client.xgroup_create(self.key, self.group, id="0", mkstream=True)
            self.log.info("created consumer group %s on %s", self.group, self.key)
        except redis.ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise

    def _consume(self, start: str) -> None:
        """Read and handle entries; ``0`` re-reads our pending ones (until none are left)."""
        while not self.stop.is_set():
            block = None if start == "0" else self.block_ms
            reply = self.client.xreadgroup(self.group, self.consumer, {self.key: start}, count=self.batch, block=block)
            entries = reply[0][1] if reply else []
            if start == "0":
                if not entries:
                    return
                self.log.info("reclaiming %d pending stream entries", len(entries))
            for entry_id, fields in entries:
                data = (fields or {}).get(b"message")
                if not fields:  # pending, but trimmed from the stream (XADD MAXLEN) meanwhile
                    self.log.warning("pending stream entry %s was trimmed before it was read; acknowledged",
                                     entry_id.decode())
                elif data is None:
                    self.log.warning("stream entry %s has no 'message' field; acknowledged and ignored",
                                     entry_id.decode())
                elif not self.intake.handle(data):
                    raise sqlite3.OperationalError("the database cannot be written; stream entries stay pending")
                self.client.xack(self.key, self.group, entry_id)
            if start != "0":
                return


STREAM_GROUP = "cockpit-agent"


# -- watchdog: a listener that stopped making progress is replaced ----------------------------

PROBE_PREFIX = b"cockpit-agent-probe:"
PROBE_EVERY = 3  # liveness intervals between two subscription self-checks


class Watchdog(Loop):
    """Replaces a listener or intake thread that stopped looping (blocked in a call that never
    returns).

    A listener iteration takes at most a few seconds (a 1 s read, a PING, a reconnect bounded
    by socket timeouts), an intake iteration one group; one silent for LISTENER_STALL_TIMEOUT s
    is stuck. A stuck listener is told to stop and its sockets are closed; a fresh Listener
    takes over the subscription. A stuck intake is told to stop (it ends once its call returns);
    a fresh one, with its own Store, takes over the inbox.
    """

    def loop_once(self) -> None:
        self.check()
        self.check_intake()
        self.stop.wait(1.0)

    def check_intake(self) -> bool:
        """Replace the intake thread if it stalled; True if it did."""
        intake = self.agent.intake_loop
        if not intake.is_alive():
            return False
        stalled = time.monotonic() - intake.last_progress
        if stalled < self.config.listener_stall_timeout:
            return False
        if self.agent.intakes_replaced:
            # Its predecessor is still stuck, most likely inside a write transaction, holding
            # the write lock every replacement waits for: one more would only leak a thread.
            self.log.critical("the intake made no progress for %.0f s, after a replacement too; "
                              "stopping so that systemd restarts the agent", stalled)
            self.agent.unrecoverable.set()
            self.agent.stop_requested.set()
            return False
        self.log.critical("the intake made no progress for %.0f s; replacing it", stalled)
        self.agent.intakes_replaced += 1
        intake.stop.set()
        replacement = IntakeLoop("intake", self.agent)
        replacement.start()  # before it is published: Agent.run stops the agent on a thread not alive
        self.agent.intake_loop = replacement
        return True

    def check(self) -> bool:
        """Replace the listener if it stalled; True if it did."""
        listener = self.agent.listener
        if not listener.is_alive():
            return False  # not started yet, or stopping; a dead thread is Agent.run's business
        stalled = time.monotonic() - listener.last_progress
        if stalled < self.config.listener_stall_timeout:
            return False
        self.log.critical("the listener made no progress for %.0f s; replacing it", stalled)
        listener.abandon()
        self.agent.redis_connected.clear()
        replacement = Listener("listener", self.agent)
        replacement.start()  # before it is published: Agent.run stops the agent on a listener not alive
        self.agent.listener = replacement
        self.agent.listeners_replaced += 1
        return True


class WorkerPool:
    """Hands Jobs to workers; Jobs with the same target run one at a time, in arrival order.

    ``submit`` is called in arrival order. A Job whose target already has one in flight waits
    in that target's lane, so at most one Job per target is ever on the queue or running; the
    worker that finishes it moves the next one from the lane to the queue.
    """

    def __init__(self, agent: Agent):
        self.agent = agent
        self._lock = threading.Lock()
        self._lanes: dict[str, deque[Job]] = {}
        self.workers = [Worker(f"worker-{i + 1}", agent, self) for i in range(agent.config.worker_count)]
        self.draining = threading.Event()

    def submit(self, job: Job) -> None:
        """Queue a Job now, or behind the Job already in flight for its target."""
        target = job.action.target
        if target is not None:
            with self._lock:
                if target in self._lanes:
                    self._lanes[target].append(job)
                    return
                self._lanes[target] = deque()
        self.agent.queue.put(job)

    def pending(self) -> int:
        """Jobs accepted but not yet started (on the queue or waiting in a lane)."""
        with self._lock:
            waiting = sum(len(lane) for lane in self._lanes.values())
        return self.agent.queue.qsize() + waiting

    def take(self, timeout: float) -> Job | None:
        """The next Job to run, or None after ``timeout`` s or once draining."""
        if self.draining.is_set():
            return None
        try:
            return self.agent.queue.get(timeout=timeout)  # None: drain() woke us
        except queue.Empty:
            return None

    def drain(self) -> None:
        """Stop handing out Jobs (they stay queued in SQLite) and wake the idle workers now."""
        self.draining.set()
        for _ in self.workers:
            self.agent.queue.put(None)

    def done(self, job: Job) -> None:
        """Release ``job``'s target: the next Job waiting for it goes on the queue."""
        target = job.action.target
        if target is None:
            return
        with self._lock:
            lane = self._lanes[target]
            if not lane:
                del self._lanes[target]
                return
            following = lane.popleft()
        self.agent.queue.put(following)

    def forget(self) -> None:
        """Drop every Job not yet taken (before the workers start): a start-up recovery that
        failed midway queues them all again."""
        with self._lock:
            self._lanes.clear()
        while True:
            try:
                self.agent.queue.get_nowait()
            except queue.Empty:
                return

    def start(self) -> None:
        for worker in self.workers:
            worker.start()


class Worker(Loop):
    """Runs Jobs: claim the row, run the handler, record the result and its response."""

    def __init__(self, name: str, agent: Agent, pool: WorkerPool):
        super().__init__(name, agent)
        self.pool = pool
        self.current: Job | None = None

    def setup(self) -> None:
        self.store = self.agent.open_store()

    def teardown(self) -> None:
        self.store.close()

    def loop_once(self) -> None:
        job = self.pool.take(timeout=0.5)
        if job is None:
            return
        self.current = job
        try:
            self.run_job(job)
        finally:
            self.current = None
            self.pool.done(job)

    def run_job(self, job: Job) -> None:
        """Run one Job exactly once and leave its response in the outbox."""
        claimed = self._claim(job.command_id)
        if not claimed:
            if claimed is False:
                self.log.warning("%s: not queued any more; not running it", job.command_id)
            return
        start = time.monotonic()
        try:
            result = execute(job.action, self.agent.children, job.deadline)
        except Exception as exc:  # a bug must still end in an answer, not a silent 'running' row
            self.log.exception("%s: %s failed inside the agent", job.command_id, job.command)
            result = Result("error", None, f"the agent failed to run {job.command}: {type(exc).__name__}: {exc}")
        result = self.agent.redacted(result, job.secrets)
        elapsed = monotonic_ms(start)
        response, message = self.agent.answer(job.command_id, result.status, result.output, result.error, elapsed)
        backoff = Backoff()
        while True:
            try:
                if not self.store.finish(job.command_id, result.status, result.full_output, result.error, elapsed,
                                         message):
                    self.log.error("%s: ran, but its row was no longer running (answered already); this result "
                                   "was not recorded or sent", job.command_id)
                break
            except sqlite3.Error as exc:
                # The command ran; keep trying to record it rather than lose its answer.
                self.log.error("%s: cannot record the result (%s); retrying", job.command_id, exc)
                if self.agent.force_stop.wait(backoff.next()):
                    return
        self.agent.count_executed()
        if self.agent.metrics is not None:
            self.agent.metrics.command_done(job.command, result.status, elapsed)
        self.agent.outbox_wake.set()
        self.agent.audit.command(job.command_id, job.sender, job.command, job.params, result.status, elapsed, result.error)
        self.log.info(
            "%s: %s %s in %d ms%s", job.command_id, job.command, result.status, elapsed,
            f": {protocol.preview(result.error, 300)}" if result.error else "",
        )

    def _claim(self, command_id: str) -> bool | None:
        """Claim the row, retrying while the database cannot be written (a full disk): the job
        exists only in memory here, so giving up would leave it queued and unanswered until the
        next start. None when a forced stop interrupts the retries."""
        backoff = Backoff()
        while True:
            try:
                return self.store.claim(command_id)
            except sqlite3.Error as exc:
                self.log.error("%s: cannot mark it running (%s); retrying", command_id, exc)
                if self.agent.force_stop.wait(backoff.next()):
                    return None


class Flusher(Loop):
    """Publishes the outbox in order, pipelined; waits on an event, not a hot poll.

    It also confirms what was published (``confirm``), its own messages and those the intake
    published itself on arrival (``handover``).
    """

    batch = 500

    def __init__(self, name: str, agent: Agent):
        super().__init__(name, agent)
        self._handed: list[tuple[int, str | None, float]] = []  # from other threads, see ``handover``
        self._handed_lock = threading.Lock()
        self._confirm_timer = False  # the flusher's wait ends in time to confirm (no wake needed)

    def setup(self) -> None:
        self.store = self.agent.open_store()
        self.client = self.agent.redis
        # outbox id -> (Redis run_id it was published on, monotonic time); see ``confirm``
        self.unconfirmed: dict[int, tuple[str | None, float]] = {}

    def pause(self, delay: float) -> None:
        """Wait on outbox_wake: the listener's reconnect (flush_now) ends a backoff, so a backlog
        goes out as soon as Redis is back, not after the rest of up to 5 s.

        A stop sets ``stop``, then the wake-up. If both came before loop_once cleared the
        wake-up, it is gone: without the check the stop waited out the whole wait (5 s) and the
        joins timed out before the last confirmations (seen under systemd).
        """
        if not self.stop.is_set():
            self.agent.outbox_wake.wait(delay)

    def loop_once(self) -> None:
        self._take_handed()
        if self.agent.retry_now.is_set():
            self.agent.retry_now.clear()
            self.store.retry_all_now(keep=list(self.unconfirmed))
        self.agent.outbox_wake.clear()
        self.confirm()
        rows = self.store.due(self.batch)
        if not rows:
            next_due = self.store.next_due()
            wait = 5.0 if next_due is None else min(5.0, max(0.0, next_due - time.time()))
            if self.unconfirmed:
                soonest = min(when + self._delay(run_id) for run_id, when in self.unconfirmed.values())
                wait = min(wait, max(0.01, soonest - time.monotonic()))
                with self._handed_lock:
                    self._confirm_timer = not self._handed
            self.pause(wait)
            return
        self.publish(rows)

    # -- confirmation: a PUBLISH is only final once the same Redis answers again afterwards ------
    #
    # PUBLISH counts a receiver when the message is queued in that receiver's output buffer; the
    # buffer is written to its socket after the command, in the same event-loop turn that writes
    # our reply. A redis-server killed inside that turn (and restarted empty, the delivered marker
    # and the result key gone with it) leaves a response that no one got, its outbox row already
    # deleted: chaos runs lost one that way. So a published row is held, not deleted, until a
    # later round trip (after the replies came back) finds the same run_id: that turn is then
    # over and the receivers' copies are in their sockets. If the run_id changed, the row is
    # published again: the worst case is the same response bytes twice (the backend dedupes by
    # command_id), never none. A crash of the agent meanwhile leaves the row in the outbox; the
    # delivered marker makes its re-publication a no-op while that Redis lives.

    confirm_after = 0.0  # seconds between the PUBLISH replies and the confirming round trip (tests widen it)
    # Rows the intake published and confirmed itself are only deleted, in one DELETE for all
    # that came in this long: one per echo, in another thread, slowed the next echo down.
    delete_after = 0.1
    hold_seconds = 30.0

    def _delay(self, run_id: str | None) -> float:
        return self.delete_after if run_id is None else self.confirm_after

    def handover(self, ids: list[int], run_id: str | None) -> None:
        """Rows another thread published (held): to confirm on ``run_id``, or, with None,
        already confirmed and only to delete (in batches, ``delete_after``). Any thread."""
        now = time.monotonic()
        with self._handed_lock:
            # Rows to delete: one wake-up per batch, none while the flusher's wait already ends
            # within ``delete_after`` (it takes these then). Rows to confirm: at once.
            wake = run_id is not None or (not self._handed and not self._confirm_timer)
            self._handed.extend((outbox_id, run_id, now) for outbox_id in ids)
        if wake:
            self.agent.outbox_wake.set()

    def _take_handed(self) -> None:
        with self._handed_lock:
            handed, self._handed = self._handed, []
            self._confirm_timer = False
        for outbox_id, run_id, when in handed:
            self.unconfirmed[outbox_id] = (run_id, when)

    def confirm(self) -> None:
        """Delete the held rows whose Redis is still the same; publish again those it is not.

        Rows already confirmed by the thread that published them go together, all of them, once
        the oldest has waited ``delete_after``. Taking each as it came of age woke this thread
        every 10 ms during a stream of echos, and every DELETE made the listener read its pages
        again at its next commit.
        """
        now = time.monotonic()
        batch = any(run_id is None and now - when >= self.delete_after for run_id, when in self.unconfirmed.values())
        ready = [i for i, (run_id, when) in self.unconfirmed.items()
                 if (batch if run_id is None else now - when >= self.confirm_after)]
        if not ready:
            return
        if all(self.unconfirmed[i][0] is None for i in ready):
            run_id = None  # all confirmed already (or INFO refused): nothing to ask Redis
        else:
            run_id = self._run_id(self.client)
        done, again = [], []
        for outbox_id in ready:
            published_on, _ = self.unconfirmed.pop(outbox_id)
            (done if published_on is None or published_on == run_id else again).append(outbox_id)
        self.store.delivered(done)
        if again:
            self.log.warning("Redis restarted (run_id changed) since %d responses were published; "
                             "publishing them again", len(again))
            self.store.due_now(again)

    @staticmethod
    def _run_id(client) -> str | None:
        try:
            run_id = client.evalsha(RUN_ID_SHA, 0)
        except redis.exceptions.NoScriptError:
            load_scripts(client)
            run_id = client.evalsha(RUN_ID_SHA, 0)
        return run_id.decode() if run_id is not None else None

    def teardown(self) -> None:
        try:
            self._take_handed()
            self.confirm_after = self.delete_after = 0.0
            self.confirm()
        except Exception as exc:
            self.log.info("%d published responses left unconfirmed (%s); they are sent again at the next start",
                          len(self.unconfirmed), exc)
        self.store.close()

    def publish(self, rows: list[dict[str, Any]]) -> int:
        """Publish ``rows`` in one pipeline; returns how many were delivered."""
        messages = [Message(row["channel"], row["payload"], row["command_id"], row["result_key"]) for row in rows]
        results, run_id = publish_messages(self.client, messages, self.config.result_ttl)
        now = time.time()
        delivered, retries = [], []
        for row, result in zip(rows, results):
            if isinstance(result, redis.exceptions.NoScriptError):
                self.agent.outbox_wake.set()  # nothing ran: still due, it goes out on the next pass
            elif isinstance(result, Exception):
                self.log.error("outbox %d (%s): Redis refused it: %s", row["id"], row["command_id"], result)
                retries.append((row["id"], now + 30.0))
            elif result != 0:
                delivered.append(row["id"])
            elif row["unheard_since"] and now - row["unheard_since"] > self.config.response_retry_seconds:
                delivered.append(row["id"])
                self.log.warning(
                    "%s: no one received its response for %d s; giving up on the channel%s",
                    row["command_id"], self.config.response_retry_seconds,
                    f", it stays at {row['result_key']} for {self.config.result_ttl} s" if row["result_key"] else "",
                )
            else:
                delay = min(10.0, 0.25 * 2 ** min(row["attempts"], 10))
                retries.append((row["id"], now + delay / 2 + random.uniform(0, delay / 2)))
        if run_id is None:  # no way to confirm (INFO refused): a PUBLISH with receivers is final
            self.store.delivered(delivered)
        else:
            # Held until confirmed, even for the instant of an immediate confirmation: a row
            # still due reads as "not published yet", and a replay of its command arriving in
            # that instant got no answer (Intake._duplicate waits for a due one).
            self.store.hold(delivered, now + self.hold_seconds)
            published_at = time.monotonic()
            for outbox_id in delivered:
                self.unconfirmed[outbox_id] = (run_id, published_at)
        self.store.unheard(retries, now)
        if delivered and run_id is not None and self.confirm_after <= 0:
            self.confirm()
        if delivered:
            self.log.debug("published %d of %d", len(delivered), len(rows))
        return len(delivered)


class Heartbeat(Loop):
    """Keeps the registry hash current (and re-creates it after Redis lost its data)."""

    def setup(self) -> None:
        self.client = self.agent.redis

    def loop_once(self) -> None:
        self.agent.heartbeat_now.clear()
        if self.stop.is_set():  # a stop that came just before the clear: no "online" after it
            return
        self.agent.audit.report_suppressed()
        # "online" means commands are heard: only while Redis has confirmed the subscription.
        # Until then nothing is written (not even to a Redis that accepts the connection but
        # does not answer yet: it would run the write later); the listener wakes us once it is.
        # Nor once a stop was asked for: the listener no longer reads; shutdown writes offline.
        if self.agent.redis_connected.is_set() and not self.agent.stop_requested.is_set():
            self.beat("online")
        self.agent.heartbeat_now.wait(self.config.heartbeat_interval)

    def beat(self, status: str) -> None:
        """Write every registry field and renew its expiry."""
        key, interval = self.config.registry_key, self.config.heartbeat_interval
        fields = {
            "status": status,
            "last_heartbeat": int(time.time()),
            "version": VERSION,
            "hostname": socket.gethostname(),
            "capabilities": ",".join(self.agent.registry.names()),
            "started_at": int(self.agent.started_at),
            "commands_executed": self.agent.executed,
            "agent_id": self.config.agent_id,
            "instance": self.agent.instance,
            "twin": self.agent.twin or "",
        }
        pipe = self.client.pipeline(transaction=True)
        watch = self.watch_twins
        if watch:
            # Who wrote the hash last, read inside the same transaction before our HSET: a third
            # command per beat, no extra round trip. Another instance there is a twin.
            pipe.hmget(key, "instance", "hostname")
        pipe.hset(key, mapping=fields)
        pipe.expire(key, 3 * interval)
        try:
            replies = pipe.execute()
        except redis.exceptions.NoPermissionError:
            if not watch:
                raise
            # An ACL written before HMGET was needed aborts the whole transaction: beat without it.
            self.watch_twins = False
            self.log.warning("the Redis ACL refuses HMGET on %s, so another agent running as %s would go "
                             "unnoticed; add +hmget to the agent's rules (docs/redis-acl.md)", key, self.config.agent_id)
            return self.beat(status)
        self.agent.last_heartbeat = time.time()
        if watch:
            self._note_writer(*replies[0])

    watch_twins = True  # False once the ACL refused the HMGET
    twin_clears_after = 3  # beats without a sign of the other agent

    def _note_writer(self, instance: bytes | None, hostname: bytes | None) -> None:
        """Say once, loudly, when another agent writes our registry hash, and when it went away."""
        agent = self.agent
        if instance is not None and instance != agent.instance.encode():
            other = f"{protocol.preview(_text(hostname), 80)} (instance {protocol.preview(_text(instance), 40)})"
            agent.twin_unseen = 0
            if agent.twin != other:
                agent.twin = other
                self.log.error(
                    "another agent runs as %s on this Redis: %s wrote %s since this one's last heartbeat (this is "
                    "%r, instance %s); both receive and run every command: stop one, or give each its own AGENT_ID",
                    self.config.agent_id, other, self.config.registry_key, socket.gethostname(), agent.instance)
        elif agent.twin is not None:
            agent.twin_unseen += 1
            if agent.twin_unseen >= self.twin_clears_after:
                self.log.warning("the other agent running as %s, %s, has not written %s for %d heartbeats: gone",
                                 self.config.agent_id, agent.twin, self.config.registry_key, agent.twin_unseen)
                agent.twin, agent.twin_unseen = None, 0


def _text(value: bytes | None) -> str:
    return "?" if value is None else value.decode("utf-8", "replace")


class Agent:
    """Wires the threads together and owns what they share."""

    def __init__(self, config: Config, registry: Registry = REGISTRY):
        self.config = config
        self.registry = registry
        self.secrets = sealed.maskable(secrets_of(config))  # masked in every output and error
        self.queue: queue.Queue[Job | None] = queue.Queue()  # None wakes a worker to stop
        self.children = Children()
        self.audit = Audit()
        self.redis = config.redis_client()
        self.outbox_wake = threading.Event()
        self.retry_now = threading.Event()
        self.heartbeat_now = threading.Event()
        self.redis_connected = threading.Event()
        self.stop_requested = threading.Event()
        self.force_stop = threading.Event()
        self.started_at = time.time()
        self.last_heartbeat: float | None = None
        self._executed_lock = threading.Lock()
        self.executed = 0
        self.db_lock = DatabaseLock(config.outbox_db)  # taken by start, before anything opens the store
        self.instance = instance_id(config.outbox_db)  # this machine + this database, in the registry
        self.twin: str | None = None  # the other agent writing our registry hash, while there is one
        self.twin_unseen = 0
        self.pool = WorkerPool(self)
        self.inbox = Inbox(config.listener_buffer_bytes)  # from the listener to the intake thread
        self.intake_loop = IntakeLoop("intake", self)
        self.listener = Listener("listener", self)
        self.flusher = Flusher("flusher", self)
        self.heartbeat = Heartbeat("heartbeat", self)
        self.notifier = Notifier(self)  # sd_notify: READY, STATUS, WATCHDOG (a no-op outside systemd)
        self.metrics = None
        if config.metrics_port:
            from metrics import Metrics  # prometheus-client only when METRICS_PORT is set

            self.metrics = Metrics(self)
        self.watchdog = Watchdog("watchdog", self)
        self.listeners_replaced = 0
        self.intakes_replaced = 0
        self.unrecoverable = threading.Event()  # a part is stuck for good: exit non-zero (systemd restarts)
        self.stream_reader = StreamReader("stream", self) if config.command_stream else None
        self._stream_seen: dict[str, float] = {}
        self._stream_seen_lock = threading.Lock()

    # -- shared helpers -------------------------------------------------------------------------

    def open_store(self) -> Store:
        """A new Store for the calling thread."""
        return Store(self.config.outbox_db, self.config.outbox_synchronous)

    # A command_id read from the stream, remembered for a minute: a pub/sub copy of it arriving
    # meanwhile is the backend's second path, not a retry asking for the response again.
    twin_window = 60.0

    def seen_on_stream(self, command_id: str) -> None:
        now = time.monotonic()
        with self._stream_seen_lock:
            self._stream_seen[command_id] = now
            if len(self._stream_seen) > 10000:
                self._stream_seen = {k: t for k, t in self._stream_seen.items() if now - t < self.twin_window}

    def twin_of_stream(self, command_id: str) -> bool:
        with self._stream_seen_lock:
            seen = self._stream_seen.get(command_id)
        return seen is not None and time.monotonic() - seen < self.twin_window

    def count_executed(self) -> None:
        with self._executed_lock:
            self.executed += 1

    def flush_now(self) -> None:
        """Redis is back: publish what waits without sitting out its backoff."""
        self.retry_now.set()
        self.outbox_wake.set()

    def answer(self, command_id: str, status: str, output: str | None, error: str | None,
               elapsed_ms: int, result_key: bool = True) -> tuple[dict[str, Any], Message]:
        """The response for a command and the outbox Message that carries it."""
        extra: dict[str, Any] = {}
        limit = self.config.output_limit
        if output is not None and len(output) > limit:
            extra = {"truncated": True, "output_size": len(output)}
            half = limit // 2
            output = f"{output[:half]}\n[... {len(output) - 2 * half} characters omitted ...]\n{output[-half:]}"
        response = protocol.response(command_id, status, output, error, elapsed_ms, self.config.agent_id, **extra)
        if self.config.shared_secret:
            response = protocol.sign_response(response, self.config.shared_secret)
        key = self.config.result_key(command_id) if result_key else None
        return response, Message(self.config.response_channel, protocol.encode(response), command_id, key)

    def error_answer(self, command_id: str, error: str, result_key: bool = True) -> tuple[dict[str, Any], Message]:
        """An error response for a command that will not run."""
        return self.answer(command_id, "error", None, self.mask(error), 0, result_key)

    def mask(self, text: str | None, plain: tuple[str, ...] = ()) -> str | None:
        """``text`` with the configured secrets and a command's decrypted params (``plain``) as ``***``."""
        if not plain:
            return sealed.mask(text, self.secrets)
        # Also as the agent's own errors quote a value (preview: repr), escapes and all.
        forms = [form for value in plain for form in (value, repr(value)[1:-1])]
        return sealed.mask(text, sealed.maskable((*self.secrets, *forms)))

    def redacted(self, result: Result, plain: tuple[str, ...] = ()) -> Result:
        """``result`` with every secret masked (``mask``): its output, error and full output.

        Applied once, right after a command ran, before its Result becomes a response or a row:
        a child can print the secrets, and the agent's own error texts quote the child's stderr.
        """
        if not self.secrets and not plain:
            return result
        return Result(result.status, self.mask(result.output, plain), self.mask(result.error, plain),
                      self.mask(result.full_output, plain), result.exit_code)

    # -- life cycle -----------------------------------------------------------------------------

    def recover(self) -> None:
        """Answer what an earlier run left running (interrupted) and queue what it left queued."""
        store = self.open_store()
        try:
            running, queued = store.pending()
            for row in running:
                error = "interrupted: the agent stopped while this command was running; it was not run again"
                response, message = self.error_answer(row["command_id"], error)
                if not store.finish(row["command_id"], "error", None, error, 0, message):
                    log.warning("%s: no longer running when recovered; not answered again", row["command_id"])
                    continue
                log.warning("%s: %s was interrupted by an agent stop; answered with an error", row["command_id"], row["command"])
                self.audit.command(row["command_id"], row["sender"], row["command"], json.loads(row["params"]), "error", 0, error)
            for row in queued:
                plain: tuple[str, ...] = ()
                try:
                    # Stored as received: the sealed params are decrypted again, exactly as on arrival.
                    params, plain = sealed.open_params(json.loads(row["params"]), self.config.shared_secret)
                    action = self.registry.prepare(row["command"], params, self.config)
                except ValidationError as exc:
                    error = self.mask(str(exc), plain)
                    response, message = self.error_answer(row["command_id"], error)
                    if not store.refuse(row["command_id"], error, message):
                        log.warning("%s: no longer queued when recovered; not answered again", row["command_id"])
                        continue
                    self.audit.command(row["command_id"], row["sender"], row["command"], json.loads(row["params"]),
                                       "error", 0, error)
                    continue
                # No deadline: the backend stopped waiting when the agent went down; queued ones
                # run (PROTOCOL.md), with their full timeout, answered by the result key and retries.
                self.pool.submit(Job(row["command_id"], row["command"], action, row["sender"], json.loads(row["params"]),
                                     secrets=plain))
            self.executed = store.db.execute(
                "SELECT count(*) FROM commands WHERE started_at IS NOT NULL AND state = 'done'"
            ).fetchone()[0]
            if running or queued:
                log.info("recovered %d interrupted and %d queued commands", len(running), len(queued))
        finally:
            store.close()

    def threads(self) -> list[Loop]:
        optional = [self.stream_reader] if self.stream_reader is not None else []
        return [*self.pool.workers, self.flusher, self.heartbeat, self.intake_loop, self.listener, self.watchdog,
                *optional]

    def start(self) -> bool:
        """Lock the database, recover, then start every thread (workers first, the listener last).

        Raises DatabaseInUse when another agent holds the database; False, with nothing
        started, when a stop was asked for while recovery waited for the database.
        """
        # The listener must read the subscription as fast as Redis writes it (past Redis's
        # client-output-buffer-limit pubsub the server closes it, with what it held): with the
        # default 5 ms it waited that long for the interpreter lock behind the intake thread at
        # each read; 0.5 ms let a 64 MB burst from another process through in 8 of 10 runs (5 of 10).
        sys.setswitchinterval(0.0005)
        self.db_lock.acquire()
        if not self._recover_when_writable():
            return False
        self.pool.start()
        self.flusher.start()
        self.heartbeat.start()
        self.intake_loop.start()
        self.listener.start()
        self.watchdog.start()
        if self.stream_reader is not None:
            self.stream_reader.start()
        # Last: the notifier says READY and judges every thread above, so all must be running.
        if self.metrics is not None:
            self.metrics.start()
        self.notifier.start()
        log.info("cockpit-agent %s started: %s", VERSION, self.config.describe())
        self.warn_unwritable_repos()
        return True

    def _recover_when_writable(self) -> bool:
        """``recover``, retried with capped backoff while the database cannot be written (a full
        disk): exiting would only make systemd restart the agent into the same error, in a loop.
        One ERROR line, then quiet retries; False if a stop is asked for meanwhile."""
        backoff, since = Backoff(base=1.0, cap=10.0), None
        while True:
            try:
                self.recover()
            except sqlite3.OperationalError as exc:
                self.pool.forget()  # what it queued before failing is queued again on the next try
                if since is None:
                    since = time.monotonic()
                    log.error("cannot recover the work left in %s (OUTBOX_DB): %s; not starting until it can be "
                              "written, retrying every few seconds", self.config.outbox_db, exc)
                delay = backoff.next()
                # Still starting, as systemd sees it: keep TimeoutStartSec= from killing us meanwhile.
                self.notifier.notify.send(f"STATUS=waiting for {self.config.outbox_db} to be writable: {exc}",
                                          f"EXTEND_TIMEOUT_USEC={int((delay + 60) * 1_000_000)}")
                if self.stop_requested.wait(delay):
                    return False
                continue
            if since is not None:
                log.info("recovered the work left in %s after %.0f s", self.config.outbox_db, time.monotonic() - since)
            return True

    def warn_unwritable_repos(self) -> None:
        """Say at start which whitelisted repositories the agent cannot write: git_pull there
        would fail. Under the unit (ProtectSystem=strict) that is a repository left out of
        ReadWritePaths=, which the agent's own user, outside the service, could write."""
        for repo in self.config.git_repo_paths:
            if os.path.isdir(repo) and not os.access(repo, os.W_OK):
                log.warning("repository %s is not writable here (%s), so git_pull there will fail; under "
                            "systemd, add ReadWritePaths=%s (systemctl edit cockpit-agent)",
                            repo, "read-only file system" if _read_only_mount(repo) else "permissions", repo)

    def request_stop(self, signum: int, frame: Any = None) -> None:
        """The first SIGTERM/SIGINT asks for a graceful stop, the second for an immediate one.

        Called by the SignalWatcher's thread, never inside a signal handler (it takes locks).
        """
        if self.stop_requested.is_set():
            self.force_stop.set()
        self.stop_requested.set()

    def run(self) -> int:
        """Run until SIGTERM/SIGINT; returns the process exit code."""
        signals = SignalWatcher(self.request_stop)
        signals.install()
        try:
            try:
                started = self.start()
            except DatabaseInUse as exc:
                log.critical("%s", exc)
                return EX_CONFIG
            if not started:
                self.db_lock.release()
                log.info("stopped before starting; the work left stays in %s", self.config.outbox_db)
                return 0
            died = False
            while not self.stop_requested.wait(1.0):
                for thread in self.threads():
                    if not thread.is_alive():
                        log.critical("%s died; stopping so that systemd restarts the agent", thread.name)
                        died = True
                        self.stop_requested.set()
            code = self.shutdown()
        finally:
            signals.close()
        # A non-zero exit is what makes Restart=on-failure restart us; 0 would mean "done".
        died = died or self.unrecoverable.is_set()
        return EX_SOFTWARE if died and code == 0 else code

    def _close_service(self) -> None:
        """Stop the notifier and the metrics endpoint; a failure is logged, the stop goes on."""
        for part in (self.notifier, self.metrics):
            if part is not None:
                try:
                    part.close()
                except Exception as exc:
                    log.warning("could not close %s: %s", type(part).__name__, exc)

    def _wait(self, condition, timeout: float) -> bool:
        """Wait for ``condition()`` up to ``timeout`` s, giving up early on a forced stop."""
        deadline = time.monotonic() + timeout
        while not condition():
            if self.force_stop.is_set() or time.monotonic() >= deadline:
                return False
            self.force_stop.wait(0.05)
        return True

    def shutdown(self) -> int:
        """Stop taking commands, let running ones finish, flush, say offline."""
        self.notifier.stopping()
        busy = [w.current.command_id for w in self.pool.workers if w.current is not None]
        log.info("stopping: no new commands; %d running, up to %g s to finish", len(busy), self.config.shutdown_grace)
        self.watchdog.stop.set()
        self.watchdog.join(5.0)  # before anything below reads agent.listener or agent.intake_loop
        self.listener.stop.set()
        if self.stream_reader is not None:
            self.stream_reader.stop.set()
        for worker in self.pool.workers:
            worker.stop.set()
        self.pool.drain()
        if not self._wait(lambda: not any(w.is_alive() for w in self.pool.workers), self.config.shutdown_grace):
            killed = self.children.kill_all()
            log.warning("grace period over: interrupted %d running commands", killed)
            self._wait(lambda: not any(w.is_alive() for w in self.pool.workers), 5.0)
        if self.force_stop.is_set():
            self._close_service()
            self.children.kill_all()
            log.warning("second signal: stopping at once; unfinished work stays in %s", self.config.outbox_db)
            return 1
        # What the listener read is accepted before the last flush: once the listener has
        # stopped reading, the intake thread takes everything left in the inbox as it stops.
        self.listener.join(5.0)
        self.intake_loop.stop.set()
        self.inbox.wake()
        self.intake_loop.join(10.0)
        if self.stream_reader is not None:
            self.stream_reader.join(5.0)  # its last answers too go out in the last flush
        self.flush_now()
        store = self.open_store()
        try:
            # Up to 5 s for what can go out now. Not for answers no one was subscribed to hear
            # (due again only after their backoff) nor for those already out and held until
            # confirmed (the flusher confirms them as it stops): they stay in the outbox, and
            # waiting for them only made every stop take 5 s while the backend was away.
            def nothing_due() -> bool:
                next_due = store.next_due()
                return next_due is None or next_due > time.time()

            self._wait(lambda: nothing_due() or not self.redis_connected.is_set(), 5.0)
            for thread in (self.flusher, self.heartbeat, self.listener):
                thread.stop.set()
            self.outbox_wake.set()
            self.heartbeat_now.set()
            for thread in (self.flusher, self.heartbeat, self.listener, self.watchdog, self.stream_reader):
                if thread is not None and thread.is_alive():
                    thread.join(5.0)
            # Counted after the flusher's last round, which deletes the answers it has confirmed.
            left = store.counts()
            # The notifier's read-only connection must not be the last one open: only a writer's
            # close checkpoints the WAL and deletes it, leaving the database in one file.
            self._close_service()
        finally:
            store.close()
        try:
            self.heartbeat.client = self.redis
            self.heartbeat.beat("offline")
        except Exception as exc:
            log.warning("could not write status=offline: %s", exc)
        self.db_lock.release()
        log.info("stopped; %d queued commands and %d unsent messages kept in %s",
                 left["queued"], left["outbox"], self.config.outbox_db)
        return 0


def _read_only_mount(path: str) -> bool:
    try:
        return bool(os.statvfs(path).f_flag & os.ST_RDONLY)
    except OSError:
        return False


class SignalWatcher(threading.Thread):
    """Turns SIGTERM and SIGINT into calls of ``on_signal`` on a thread of its own.

    A Python signal handler runs on the main thread between two bytecodes, possibly while that
    thread holds the lock inside ``Event.wait``; a handler that called ``Event.set()`` on the
    same event deadlocked the agent (a SIGTERM that landed as the main loop's 1 s wait ended:
    the process never stopped). So the handler does nothing, and ``signal.set_wakeup_fd``
    writes each signal's number to a pipe (in C, async-signal-safe), read here. Install and
    close from the main thread.
    """

    def __init__(self, on_signal: Callable[[int], Any], signums: tuple[int, ...] = (signal.SIGTERM, signal.SIGINT)):
        super().__init__(name="cockpit-agent-signals", daemon=True)
        self.on_signal, self.signums = on_signal, signums
        self._read, self._write = os.pipe()
        os.set_blocking(self._write, False)  # a full pipe drops a byte, never blocks the handler
        self._previous: dict[int, Any] = {}
        self._previous_fd = -1

    @staticmethod
    def _noted(signum: int, frame: Any) -> None:
        """The Python-level handler: nothing (the wake-up fd carries the signal)."""

    def install(self) -> None:
        """Route the signals here; until ``close``."""
        self._previous_fd = signal.set_wakeup_fd(self._write, warn_on_full_buffer=False)
        for signum in self.signums:
            self._previous[signum] = signal.signal(signum, self._noted)
        self.start()

    def run(self) -> None:
        while True:
            try:
                data = os.read(self._read, 64)
            except OSError:
                return
            if not data:  # close(): the write end is gone
                return
            for signum in data:
                if signum in self.signums:
                    self.on_signal(signum)

    def close(self) -> None:
        """Restore the previous handlers and stop the thread."""
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        signal.set_wakeup_fd(self._previous_fd)
        os.close(self._write)
        self.join(5.0)
        os.close(self._read)


def setup_logging(config: Config | None, level: str = "INFO") -> None:
    """Readable lines (or JSON, LOG_FORMAT=json) on stderr; under journald, without a second timestamp."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logs.formatter(config.log_format if config else "text"))
    if config is not None:
        handler.addFilter(RedactSecrets(secrets_of(config)))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(config.log_level if config else level)


def main(argv: list[str] | None = None) -> int:
    """The command line: ``agent.py [run]`` runs the agent; the operator commands are in cli.py."""
    import cli

    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--env-file", default=argparse.SUPPRESS,
                        help="read variables from this file (default: $COCKPIT_AGENT_ENV_FILE or ./.env)")
    parser = argparse.ArgumentParser(
        prog="cockpit-agent",
        description="Run whitelisted commands published by the Cockpit backend over Redis.",
        epilog=cli.EXIT_CODES, formatter_class=argparse.RawDescriptionHelpFormatter, parents=[common],
    )
    parser.add_argument("--version", action="version", version=f"cockpit-agent {VERSION}")
    sub = parser.add_subparsers(dest="cmd", metavar="COMMAND")
    sub.add_parser("run", help="run the agent in the foreground (the default)", parents=[common],
                   description="Run the agent in the foreground, configured by the environment (and .env).")
    cli.add_commands(sub, common)
    args = parser.parse_args(argv)
    args.env_file = getattr(args, "env_file", None)
    if args.cmd not in (None, "run"):
        return cli.run(args)
    try:
        config = load(args.env_file)
    except ConfigError as exc:
        print(f"cockpit-agent: configuration error: {exc}", file=sys.stderr)
        return EX_CONFIG
    setup_logging(config)
    try:
        registry = registry_with_dir(REGISTRY, config.handlers_dir, env_file=args.env_file)
    except ConfigError as exc:
        log.critical("configuration error: %s", exc)
        return EX_CONFIG
    return Agent(config, registry).run()


if __name__ == "__main__":
    sys.exit(main())
