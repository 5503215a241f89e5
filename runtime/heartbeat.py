"""The heartbeat: the registry hash ``agents:{agent_id}`` the backend reads.

Written only while the subscription is confirmed (so "online" means commands are heard), with
an expiry of three intervals; it also notices another agent writing the same hash (a twin).
Each beat is one round trip, the ``BEAT`` script: it reads who wrote the hash last, writes it,
renews its expiry and publishes the listener's probe (the subscription self-check), so an idle
agent sends Redis one command per interval.
"""

from __future__ import annotations

import hashlib
import socket
import threading
import time
from collections.abc import Callable

import redis

import protocol
from config import VERSION, Config
from runtime.cluster import Routes
from runtime.listener import Probe
from runtime.loop import Loop

# KEYS[1] the registry hash; ARGV: expiry (s), the command channel, the probe ("" for none),
# then the fields and values. Returns {instance, hostname} as the hash held them before (what
# an ACL refuses reads as absent, and a fourth reply says so), the probe's receivers (-1: not
# sent or refused), and the refusals ("hmget", "publish", or ""). HMGET and PUBLISH with pcall:
# an ACL written without them costs only the twin check or the self-check, never the beat.
BEAT = """
local refused = {}
local before = redis.pcall('HMGET', KEYS[1], 'instance', 'hostname')
if type(before) == 'table' and before.err then
  table.insert(refused, 'hmget')
  before = {false, false}
end
local fields = {}
for i = 4, #ARGV do fields[#fields + 1] = ARGV[i] end
redis.call('HSET', KEYS[1], unpack(fields))
redis.call('EXPIRE', KEYS[1], ARGV[1])
local receivers = -1
if ARGV[3] ~= '' then
  local published = redis.pcall('PUBLISH', ARGV[2], ARGV[3])
  if type(published) == 'table' and published.err then table.insert(refused, 'publish')
  else receivers = published end
end
return {before[1], before[2], receivers, table.concat(refused, ',')}
"""
BEAT_SHA = hashlib.sha1(BEAT.encode()).hexdigest()


class Heartbeat(Loop):
    """Keeps the registry hash current (and re-creates it after Redis lost its data)."""

    reports_outages = False  # the listener says it for the agent

    def __init__(self, name: str, config: Config, client: redis.Redis | Routes, *, capabilities: list[str], started_at: float,
                 instance: str, executed: Callable[[], int], connected: threading.Event,
                 stopping: threading.Event, now: threading.Event, probe: Probe | None = None,
                 every_beat: Callable[[], None] = lambda: None):
        """``connected``: the subscription is confirmed; ``stopping``: a stop was asked for;
        ``now``: beat at once (set by the listener when it is back online, and by the stop);
        ``probe``: the listener's self-check, published with each online beat;
        ``every_beat``: called each interval (the audit's summary of suppressed lines)."""
        super().__init__(name, config)
        self.probe = probe or Probe()
        self.routes = Routes.of(client)
        self.capabilities, self.started_at, self.instance = capabilities, started_at, instance
        self.executed, self.connected, self.stopping, self.now, self.every_beat = (
            executed, connected, stopping, now, every_beat)
        self.last_heartbeat: float | None = None  # unix s of the last successful write
        self.twin: str | None = None  # the other agent writing our registry hash, while there is one
        self.twin_unseen = 0
        self.soon = False  # a command finished since the last beat (executed_changed)
        self.beat_at = 0.0  # monotonic, the last loop_once's beat
        self.reported_at = -float("inf")  # monotonic, the last every_beat

    def stall_allowance(self) -> float:
        """An iteration waits up to one interval."""
        return float(self.config.heartbeat_interval)

    def pause(self, delay: float) -> None:
        """After a failed beat: the listener's reconnect (``now``) ends the backoff, so the
        registry is back as soon as the subscription is, not up to 5 s later."""
        if not self.stop.is_set():
            self.now.wait(delay)

    executed_every = 1.0  # s: the least time between two beats that only bring commands_executed up to date

    def executed_changed(self) -> None:
        """A command finished: beat soon, so ``commands_executed`` is current within a second
        instead of an interval (one beat a second at most while commands come; none while idle)."""
        self.soon = True
        self.now.set()

    def loop_once(self) -> None:
        if self.soon:
            # At most one beat a second while commands finish (a reconnect waits that long at most).
            self.soon = False
            self.stop.wait(max(0.0, self.executed_every - (time.monotonic() - self.beat_at)))
        self.now.clear()
        if self.stop.is_set():  # a stop that came just before the clear: no "online" after it
            return
        if time.monotonic() - self.reported_at >= self.config.heartbeat_interval:  # not at the extra beats
            self.reported_at = time.monotonic()
            self.every_beat()
        # "online" means commands are heard: only while Redis has confirmed the subscription.
        # Until then nothing is written (not even to a Redis that accepts the connection but
        # does not answer yet: it would run the write later); the listener wakes us once it is.
        # Nor once a stop was asked for: the listener no longer reads; shutdown writes offline.
        if self.connected.is_set() and not self.stopping.is_set():
            self.beat("online")
        self.beat_at = time.monotonic()
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
        probe = self.probe.next() if status == "online" else b""
        # In a cluster the probe's PUBLISH inside BEAT runs on the registry's master: it reaches
        # the listener on any node, but counts only that node's subscribers (no "no receiver"
        # judgement then). Sharded, it must go to the command channel's own master: a second
        # command, SPUBLISH, after the beat.
        sharded = self.routes.sharded and bool(probe)
        args = [3 * interval, self.config.command_channel, b"" if sharded else probe]
        for name, value in fields.items():
            args += [name, value]

        def send(client: redis.Redis) -> list:
            try:
                return client.evalsha(BEAT_SHA, 1, key, *args)
            except redis.exceptions.NoScriptError:
                client.script_load(BEAT)
                return client.evalsha(BEAT_SHA, 1, key, *args)

        try:
            reply = list(self.routes.on(key, send))
            if sharded:
                try:
                    reply[2] = self.routes.publish_raw(self.config.command_channel, probe)
                except redis.exceptions.NoPermissionError:
                    reply[3] = _text(reply[3] or b"") + ",publish"
        except BaseException:
            self.probe.published(probe, None)
            raise
        instance, hostname, receivers, refused = reply
        refused = set((refused.decode() if isinstance(refused, bytes) else str(refused or "")).split(",")) - {""}
        self.last_heartbeat = time.time()
        # In a cluster a classic probe's count is its node's, not the listener's: it stays pending
        # until the listener hears it (or not).
        if not (self.routes.cluster and not sharded and receivers >= 0):
            self.probe.published(probe, None if receivers < 0 else receivers)
        if "publish" in refused and probe and not self.probe.refused:
            self.probe.refused = True
            self.log.warning("subscription self-check disabled: Redis refused the probe's PUBLISH on %s "
                             "(docs/redis-acl.md); the listener checks the connection with PING instead",
                             self.config.command_channel)
        if "hmget" in refused:
            if self.watch_twins:
                self.watch_twins = False
                self.log.warning("the Redis ACL refuses HMGET on %s, so another agent running as %s would go "
                                 "unnoticed; add +hmget to the agent's rules (docs/redis-acl.md)", key,
                                 self.config.agent_id)
        else:
            self._note_writer(instance, hostname)

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
