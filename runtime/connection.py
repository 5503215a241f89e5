"""The agent's one command connection: every Redis command but the subscription goes over it.

A fleet multiplies what each agent holds open on the Cockpit's Redis, so the flusher, the
heartbeat and the intake (answers on arrival, refusals) take turns on a single connection
rather than each keeping its own: with the listener's subscription that makes two per agent.
A turn is one command or one pipeline; nothing on it blocks (the command stream, which waits in
XREADGROUP, keeps a connection of its own).
"""

from __future__ import annotations

import threading
from typing import Any

import redis


class OneConnection:
    """Makes ``client``'s pool hand out its one connection to one caller at a time.

    redis-py takes a connection from the pool for each command or pipeline and gives it back
    after; here the second caller waits for it (up to ``wait`` s, then a ConnectionError as if
    Redis were down, which every caller handles) instead of the pool opening another one.
    """

    def __init__(self, client: redis.Redis, wait: float):
        self.client, self.wait = client, wait
        self.pool = client.connection_pool
        self._turn = threading.Lock()
        self._held: Any = None
        self._get, self._release = self.pool.get_connection, self.pool.release
        self.pool.get_connection = self.get_connection  # type: ignore[method-assign]
        self.pool.release = self.release  # type: ignore[method-assign]

    def get_connection(self, *args: Any, **kwargs: Any) -> Any:
        if not self._turn.acquire(timeout=self.wait):
            raise redis.ConnectionError(f"the agent's Redis connection stayed busy for {self.wait:g} s")
        try:
            connection = self._get(*args, **kwargs)
        except BaseException:
            self._turn.release()
            raise
        self._held = connection
        return connection

    def release(self, connection: Any) -> None:
        try:
            self._release(connection)
        finally:
            if self._held is connection:
                self._held = None
                self._turn.release()

    def __enter__(self) -> Any:
        """``with one:`` holds the connection for a turn of several commands sent by hand."""
        return self.get_connection()

    def __exit__(self, *exc: Any) -> None:
        self.release(self._held)
