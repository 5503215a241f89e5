"""The heartbeat: the registry hash ``cockpit-agent-registry:{agent_id}`` the backend reads.

Written only while the subscription is confirmed (so "online" means commands are heard), with
an expiry of three intervals; it also notices another agent writing the same hash (a twin).
"""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Callable

import redis

import protocol
from config import VERSION, Config
from runtime.loop import Loop


class Heartbeat(Loop):
    """Keeps the registry hash current (and re-creates it after Redis lost its data)."""

    def __init__(self, name: str, config: Config, client: redis.Redis, *, capabilities: list[str], started_at: float,
                 instance: str, executed: Callable[[], int], connected: threading.Event,
                 stopping: threading.Event, now: threading.Event, every_beat: Callable[[], None] = lambda: None):
        """``connected``: the subscription is confirmed; ``stopping``: a stop was asked for;
        ``now``: beat at once (set by the listener when it is back online, and by the stop);
        ``every_beat``: called each interval (the audit's summary of suppressed lines)."""
        super().__init__(name, config)
        self.client, self.capabilities, self.started_at, self.instance = client, capabilities, started_at, instance
        self.executed, self.connected, self.stopping, self.now, self.every_beat = (
            executed, connected, stopping, now, every_beat)
        self.last_heartbeat: float | None = None  # unix s of the last successful write
        self.twin: str | None = None  # the other agent writing our registry hash, while there is one
        self.twin_unseen = 0

    def stall_allowance(self) -> float:
        """An iteration waits up to one interval."""
        return float(self.config.heartbeat_interval)

    def loop_once(self) -> None:
        self.now.clear()
        if self.stop.is_set():  # a stop that came just before the clear: no "online" after it
            return
        self.every_beat()
        # "online" means commands are heard: only while Redis has confirmed the subscription.
        # Until then nothing is written (not even to a Redis that accepts the connection but
        # does not answer yet: it would run the write later); the listener wakes us once it is.
        # Nor once a stop was asked for: the listener no longer reads; shutdown writes offline.
        if self.connected.is_set() and not self.stopping.is_set():
            self.beat("online")
        self.now.wait(self.config.heartbeat_interval)

    def beat(self, status: str) -> None:
        """Write every registry field and renew its expiry."""
        key, interval = self.config.registry_key, self.config.heartbeat_interval
        fields = {
            "status": status,
            "last_heartbeat": int(time.time()),
            "version": VERSION,
            "hostname": socket.gethostname(),
            "capabilities": ",".join(self.capabilities),
            "started_at": int(self.started_at),
            "commands_executed": self.executed(),
            "agent_id": self.config.agent_id,
            "instance": self.instance,
            "twin": self.twin or "",
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
        self.last_heartbeat = time.time()
        if watch:
            self._note_writer(*replies[0])

    watch_twins = True  # False once the ACL refused the HMGET
    twin_clears_after = 3  # beats without a sign of the other agent

    def _note_writer(self, instance: bytes | None, hostname: bytes | None) -> None:
        """Say once, loudly, when another agent writes our registry hash, and when it went away."""
        if instance is not None and instance != self.instance.encode():
            other = f"{protocol.preview(_text(hostname), 80)} (instance {protocol.preview(_text(instance), 40)})"
            self.twin_unseen = 0
            if self.twin != other:
                self.twin = other
                self.log.error(
                    "another agent runs as %s on this Redis: %s wrote %s since this one's last heartbeat (this is "
                    "%r, instance %s); both receive and run every command: stop one, or give each its own AGENT_ID",
                    self.config.agent_id, other, self.config.registry_key, socket.gethostname(), self.instance)
        elif self.twin is not None:
            self.twin_unseen += 1
            if self.twin_unseen >= self.twin_clears_after:
                self.log.warning("the other agent running as %s, %s, has not written %s for %d heartbeats: gone",
                                 self.config.agent_id, self.twin, self.config.registry_key, self.twin_unseen)
                self.twin, self.twin_unseen = None, 0


def _text(value: bytes | None) -> str:
    return "?" if value is None else value.decode("utf-8", "replace")
