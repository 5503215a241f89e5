"""The flusher: publishes the outbox in order, pipelined, and confirms each PUBLISH is final.

What the workers wrote, and what the intake could not publish itself on arrival, goes out
from here: due rows in one pipeline (``publish_messages``), then held until a later round trip
to the same redis-server (same run_id) proves the receivers have their copies, and only then
deleted. Without a receiver a row is retried with backoff, for RESPONSE_RETRY_SECONDS.
"""

from __future__ import annotations

import random
import threading
import time
from collections.abc import Callable
from typing import Any

import redis

from config import Config
from errors import StoreUnavailable
from outbox import Message, Store
from outbox.retention import Retention
from protocol import preview
from runtime.cluster import Routes
from runtime.loop import REDIS_DOWN, Loop
from runtime.publish import HOLD_SECONDS

# A message Redis refused (NOPERM: an ACL without its channel) is tried again this often, until
# the ACL is fixed; ``outbox.last_error`` says why it waits.
REFUSED_RETRY = 30.0
REFUSAL_PREVIEW = 200


class Flusher(Loop):
    """Publishes the outbox in order, pipelined; waits on an event, not a hot poll.

    It also confirms what was published (``confirm``), its own messages and those the intake
    published itself on arrival (``handover``).
    """

    reports_outages = False  # the listener says it for the agent

    batch = 500

    def __init__(self, name: str, config: Config, client: redis.Redis | Routes, open_store: Callable[[], Store],
                 wake: threading.Event, retry_now: threading.Event):
        """``client``: the agent's command connection, or its Routes (runtime/cluster.py);
        ``wake`` is set by whoever left something for it (a response written, Redis back);
        ``retry_now`` asks it to make every waiting message due at once (Redis is back)."""
        super().__init__(name, config)
        self.routes = Routes.of(client)
        self.open_store, self.wake, self.retry_now = open_store, wake, retry_now
        self._handed: list[tuple[int, str | None, float]] = []  # from other threads, see ``handover``
        self._handed_lock = threading.Lock()
        self._confirm_timer = False  # the flusher's wait ends in time to confirm (no wake needed)

    def setup(self) -> None:
        self.store = self.open_store()
        # outbox id -> (Redis run_id it was published on, monotonic time); see ``confirm``
        self.unconfirmed: dict[int, tuple[str | None, float]] = {}
        # Pruning rides on this thread: it writes the database anyway, and is idle most of the time.
        self.retention = Retention(self.store, self.config.command_retention)
        # While Redis cannot be reached: since when (unix s), and the last outbox row told so.
        self.unreachable: tuple[float, int] | None = None

    def pause(self, delay: float) -> None:
        """Wait on ``wake``: the listener's reconnect (flush_now) ends a backoff, so a backlog
        goes out as soon as Redis is back, not after the rest of up to 5 s.

        A stop sets ``stop``, then the wake-up. If both came before loop_once cleared the
        wake-up, it is gone: without the check the stop waited out the whole wait (5 s) and the
        joins timed out before the last confirmations (seen under systemd).
        """
        if not self.stop.is_set():
            self.wake.wait(delay)

    def loop_once(self) -> None:
        self.retention.run_if_due()
        self._take_handed()
        if self.retry_now.is_set():
            self.retry_now.clear()
            self.store.retry_all_now(keep=list(self.unconfirmed))
        self.wake.clear()
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
            self.wake.set()

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
            run_id = self.routes.run_id(self.config.response_channel)
        done, again = [], []
        for outbox_id in ready:
            published_on, _ = self.unconfirmed.pop(outbox_id)
            (done if published_on is None or published_on == run_id else again).append(outbox_id)
        self.store.delivered(done)
        if again:
            self.log.warning("Redis restarted (run_id changed) since %d responses were published; "
                             "publishing them again", len(again))
            self.store.due_now(again)

    def on_error(self, exc: Exception) -> None:
        """Also say why the outbox waits: each row gets ``Redis unreachable since HH:MM:SS UTC``
        (``outbox list``, the sqlite3 shell), until a publish gets through again."""
        super().on_error(exc)
        if not isinstance(exc, REDIS_DOWN):
            return
        since, marked = self.unreachable or (time.time(), 0)
        try:
            self.unreachable = (since, self.store.mark_unreachable(since, marked))
        except StoreUnavailable as store_exc:
            self.log.debug("cannot note the outage on the outbox rows: %s", store_exc)

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
        results, run_id = self.routes.publish(messages, self.config.result_ttl)
        now = time.time()
        delivered, retries, refused = [], [], []
        for row, result in zip(rows, results):
            if isinstance(result, redis.exceptions.NoScriptError):
                self.wake.set()  # nothing ran: still due, it goes out on the next pass
            elif isinstance(result, Exception):
                reason = f"Redis refused it: {preview(str(result), REFUSAL_PREVIEW)}"
                self.log.error("outbox %d (%s): %s", row["id"], row["command_id"], reason)
                refused.append((row["id"], now + REFUSED_RETRY, reason))
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
            self.store.hold(delivered, now + HOLD_SECONDS)
            published_at = time.monotonic()
            for outbox_id in delivered:
                self.unconfirmed[outbox_id] = (run_id, published_at)
        self.store.unheard(retries, now)
        self.store.refused(refused)
        if self.unreachable is not None:  # Redis answered: the rows no longer wait for it
            self.unreachable = None
            self.store.clear_unreachable()
        if delivered and run_id is not None and self.confirm_after <= 0:
            self.confirm()
        if delivered:
            self.log.debug("published %d of %d", len(delivered), len(rows))
        return len(delivered)
