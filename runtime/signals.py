"""SIGTERM and SIGINT, turned into calls on a thread of their own (the handler itself does nothing)."""

from __future__ import annotations

import os
import signal
import threading
from collections.abc import Callable
from typing import Any


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
