"""``Loop``: one thread, one ``loop_once``, never dead of an error; and its ``Backoff``."""

from __future__ import annotations

import logging
import random
import threading
import time

import redis

from config import Config

# What "Redis cannot be reached" looks like from redis-py and the socket below it.
REDIS_DOWN = (redis.ConnectionError, redis.TimeoutError, OSError)


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
    again; the backoff resets after a success. ``last_progress`` tells the watchdogs it lives.
    """

    backoff_cap = 5.0  # the longest wait after a failed iteration
    # Whether this thread logs a plain Redis outage (and its end): the listener does, for the
    # agent, so one outage is one line; the others fail quietly alongside it (debug).
    reports_outages = True
    reconnect_cap = 5.0  # the same, when it failed because Redis could not be reached

    def __init__(self, name: str, config: Config):
        super().__init__(name=f"cockpit-agent-{name}", daemon=True)
        self.config = config
        self.log = logging.getLogger(f"cockpit_agent.{name}")
        self.stop = threading.Event()
        self.ready = threading.Event()  # set once ``setup`` has run: what it opened exists
        self.backoff = Backoff(cap=self.backoff_cap)
        self.reconnect_backoff = Backoff(cap=self.reconnect_cap)
        self.last_progress = time.monotonic()
        self.failing_since: float | None = None
        self.quiet = False  # the failure going on was only logged at debug

    def setup(self) -> None:
        """Open what this thread owns (its Store, its Redis connection)."""

    def teardown(self) -> None:
        """Close what ``setup`` opened."""

    def loop_once(self) -> None:
        """One unit of work; waits with ``self.stop.wait`` or an event, never ``time.sleep``."""
        raise NotImplementedError

    def stall_allowance(self) -> float:
        """Seconds an iteration may take beyond the usual (systemd's watchdog judges by it):
        0, except where one iteration waits on purpose (the heartbeat, a worker's command)."""
        return 0.0

    def pause(self, delay: float) -> None:
        """Wait ``delay`` s after a failed iteration (a Loop may also end it early)."""
        self.stop.wait(delay)

    def on_error(self, exc: Exception) -> None:
        """Log a failed iteration: Redis outages once per outage, anything else in full."""
        if isinstance(exc, REDIS_DOWN):
            hint = self.config.explain_redis_error(exc)
            if hint and self.failing_since is None and self.reports_outages:
                self.log.error("cannot use Redis: %s (%s); retrying with backoff", hint, exc)
            elif self.failing_since is None and self.reports_outages:
                self.log.warning("Redis unreachable: %s", exc)
            else:
                self.log.debug("Redis unreachable: %s", exc)
                self.quiet = self.quiet or not self.reports_outages
        elif isinstance(exc, redis.ResponseError) and (hint := self.config.explain_redis_error(exc)):
            # Refused by the ACL: the same line at every retry says nothing new, and a traceback
            # hides the hint; once per failing streak, like an outage.
            if self.failing_since is None:
                self.log.error("cannot use Redis: %s (%s); retrying with backoff", hint, exc)
            else:
                self.log.debug("still refused: %s", exc)
        else:
            self.log.exception("iteration failed; retrying")

    def retry_delay(self, exc: Exception) -> float:
        """How long to wait after an iteration failed with ``exc``."""
        return (self.reconnect_backoff if isinstance(exc, REDIS_DOWN) else self.backoff).next()

    def run(self) -> None:
        while not self.stop.is_set():
            try:
                self.setup()
                self.ready.set()
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
                    if not self.quiet:
                        self.log.info("recovered after %.0f s", time.monotonic() - self.failing_since)
                    self.failing_since, self.quiet = None, False
                self.backoff.reset()
                self.reconnect_backoff.reset()
            self.last_progress = time.monotonic()
        try:
            self.teardown()
        except Exception:
            self.log.exception("teardown failed")
