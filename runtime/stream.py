"""The command stream (COMMAND_STREAM=on): commands that wait in Redis while the agent is away.

Read from ``cockpit-agent-stream:{agent_id}`` with a consumer group, beside the pub/sub path,
through an Intake of its own (docs/stream.md).
"""

from __future__ import annotations

from collections.abc import Callable

import redis

from config import Config
from errors import StoreUnavailable
from outbox import Store
from runtime.cluster import REDIRECTS, Routes, moved
from runtime.intake import Intake
from runtime.loop import REDIS_DOWN, Loop

STREAM_GROUP = "cockpit-agent"


class StreamReader(Loop):
    """Reads the durable command stream ``cockpit-agent-stream:{agent_id}`` with a consumer group.

    An entry is acknowledged (XACK) only once its command is committed to SQLite (or answered
    without being kept); a crash before that leaves it pending, and pending entries are read
    again (from ID 0) after every (re)connection. The pub/sub path is unchanged; a command that
    comes both ways runs once and is answered once (``Intake._duplicate``).
    """

    batch = 50
    block_ms = 1000

    def __init__(self, name: str, config: Config, open_store: Callable[[], Store],
                 make_intake: Callable[[Store, redis.Redis], Intake], pending: Callable[[], int],
                 routes: Routes | None = None):
        """``make_intake`` builds this thread's Intake (``via="stream"``); ``pending`` is how
        many Jobs wait for a worker (it reads only while there is room); ``routes``: in a Redis
        Cluster, where the stream's slot is (found again after every failure)."""
        super().__init__(name, config)
        self.open_store, self.make_intake, self.pending = open_store, make_intake, pending
        self.routes = routes if routes is not None and routes.cluster else None
        self.node: str | None = None

    def _new_client(self) -> redis.Redis:
        timeout = self.config.redis_socket_timeout + self.block_ms / 1000
        if self.routes is None:
            return self.config.redis_client(socket_timeout=timeout)
        host, port, self.node = self.routes.node(self.config.stream_key)
        return self.config.redis_node_client(host, port, socket_timeout=timeout)

    def setup(self) -> None:
        self.client = self._new_client() if self.routes is None else None
        self.store = self.open_store()
        self.intake = self.make_intake(self.store, self.client)  # in a cluster it answers through the routes
        self.key, self.group, self.consumer = self.config.stream_key, STREAM_GROUP, self.config.agent_id
        self.reclaim = True  # read our own pending entries first

    def teardown(self) -> None:
        if self.client is not None:
            self.client.close()  # its own connection (its intake publishes on it too, but in a cluster)
        self.store.close()

    def on_error(self, exc: Exception) -> None:
        self.reclaim = True
        if self.routes is not None and isinstance(exc, (*REDIS_DOWN, *REDIRECTS)):
            self.routes.suspect()
            if self.client is not None:
                self.client.close()
            self.client = None  # made again on the slot's master as it is then
            if not isinstance(exc, REDIS_DOWN):
                exc = moved(self.config.stream_key, exc)
        if isinstance(exc, StoreUnavailable):
            # Raised by _consume for a database that cannot be written: the intake said so
            # already, one line a minute; a traceback at every retry would flood the log.
            return
        super().on_error(exc)

    def loop_once(self) -> None:
        if self.client is None:
            self.client = self._new_client()
        if self.reclaim:
            self._ensure_group()
            self._consume("0")
            self.reclaim = False
        if self.pending() >= self.config.queue_max:
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
                    raise StoreUnavailable("the database cannot be written; stream entries stay pending")
                self.client.xack(self.key, self.group, entry_id)
            if start != "0":
                return
