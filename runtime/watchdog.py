"""The watchdog: replaces a listener or intake thread that stopped looping.

A listener iteration takes at most a few seconds (a 0.5 s read, a PING, a reconnect bounded by
socket timeouts), an intake iteration one group; one silent for LISTENER_STALL_TIMEOUT s is
stuck (blocked in a call that never returns). A stuck listener is told to stop and its sockets
are closed; a fresh Listener takes over the subscription. A stuck intake is told to stop (it
ends once its call returns); a fresh one, with its own Store, takes over the inbox.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Generic, TypeVar

from config import Config
from runtime.loop import Loop

T = TypeVar("T", bound=Loop)


class Slot(Generic[T]):
    """The thread currently doing one job, and how to make its successor.

    ``retire`` is called on the stuck one, then ``make`` builds the replacement, which is
    started before it becomes ``current`` (the agent stops on a current thread not alive).
    """

    def __init__(self, make: Callable[[], T], retire: Callable[[T], None]):
        self.make, self.retire = make, retire
        self.current: T = make()
        self.replaced = 0

    def replace(self) -> T:
        """Retire the current thread and start a new one in its place."""
        self.retire(self.current)
        replacement = self.make()
        replacement.start()
        self.current = replacement
        self.replaced += 1
        return replacement


class Watchdog(Loop):
    """Watches the listener's and the intake's ``last_progress`` once a second."""

    def __init__(self, name: str, config: Config, listener: Slot, intake: Slot, give_up: Callable[[], None]):
        """``give_up``: a stuck part cannot be replaced (the agent then exits, and systemd restarts it)."""
        super().__init__(name, config)
        self.listener, self.intake, self.give_up = listener, intake, give_up

    def loop_once(self) -> None:
        self.check()
        self.check_intake()
        self.stop.wait(1.0)

    def _stalled(self, thread: Loop) -> float | None:
        """Seconds ``thread`` made no progress, if past the limit; None while it is fine (or not
        started yet, or stopping: a dead thread is the agent's business, not the watchdog's)."""
        if not thread.is_alive():
            return None
        stalled = time.monotonic() - thread.last_progress
        return stalled if stalled >= self.config.listener_stall_timeout else None

    def check_intake(self) -> bool:
        """Replace the intake thread if it stalled; True if it did."""
        stalled = self._stalled(self.intake.current)
        if stalled is None:
            return False
        if self.intake.replaced:
            # Its predecessor is still stuck, most likely inside a write transaction, holding
            # the write lock every replacement waits for: one more would only leak a thread.
            self.log.critical("the intake made no progress for %.0f s, after a replacement too; "
                              "stopping so that systemd restarts the agent", stalled)
            self.give_up()
            return False
        self.log.critical("the intake made no progress for %.0f s; replacing it", stalled)
        self.intake.replace()
        return True

    def check(self) -> bool:
        """Replace the listener if it stalled; True if it did."""
        stalled = self._stalled(self.listener.current)
        if stalled is None:
            return False
        self.log.critical("the listener made no progress for %.0f s; replacing it", stalled)
        self.listener.replace()
        return True
