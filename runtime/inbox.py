"""The inbox: raw messages the listener has read and the intake has not taken yet."""

from __future__ import annotations

import threading
import time
from collections import deque


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
