"""The one snapshot of the agent's health that sd_notify, the metrics and the registry read.

The Agent builds a ``Health`` on demand (``Agent.health``) from its parts; readers never look
into a thread's fields themselves, so "queued" or "online" means the same thing everywhere.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Protocol

from config import Config


class Watched(Protocol):
    """What a thread shows the health check: runtime.loop.Loop has all of it."""

    name: str
    last_progress: float

    def is_alive(self) -> bool: ...

    def stall_allowance(self) -> float: ...


@dataclass(frozen=True)
class Health:
    """The agent at one moment."""

    stopping: bool  # a stop was asked for
    redis_connected: bool  # the subscription is confirmed: commands are heard
    redis_down_since: float | None  # monotonic s: since when the listener cannot reach Redis
    queued: int  # accepted commands waiting for a worker (on the queue or behind their target)
    outbox: int | None  # messages waiting in the outbox; None: not read, or unreadable
    problems: tuple[str, ...]  # one phrase per dead or wedged thread
    executed: int  # commands run since the database was created (the registry's commands_executed)
    last_heartbeat: float | None  # unix s of the last registry write
    twin: str | None  # another agent writing our registry hash, while there is one
    rejections: dict[str, int] = field(default_factory=dict)  # messages refused before parsing, by kind


def stall_limit(thread: Watched, config: Config) -> float:
    """How long ``thread`` may go without finishing an iteration before it counts as wedged.

    Everything answers within a socket timeout or SQLite's busy timeout, which STALL_SECONDS
    covers; a thread that waits on purpose (the heartbeat its interval, a worker its command's
    timeout) says how much longer in ``stall_allowance``.
    """
    return float(config.stall_seconds) + 3 * config.redis_socket_timeout + thread.stall_allowance()


def problems(threads: Iterable[Watched], config: Config, now: float | None = None) -> tuple[str, ...]:
    """One phrase per thread that is not running or made no progress for too long."""
    now = time.monotonic() if now is None else now
    found = []
    for thread in threads:
        if not thread.is_alive():
            found.append(f"{thread.name} is not running")
            continue
        silent = now - thread.last_progress
        if silent > stall_limit(thread, config):
            found.append(f"{thread.name} made no progress for {silent:.0f} s")
    return tuple(found)


class Tally:
    """A counter any thread may add to."""

    def __init__(self, start: int = 0):
        self._lock = threading.Lock()
        self.value = start

    def add(self, n: int = 1) -> None:
        """Count ``n`` more."""
        with self._lock:
            self.value += n

    def set(self, value: int) -> None:
        """Start again from ``value`` (what the database says at start)."""
        with self._lock:
            self.value = value
