"""The listener: reads the command channel and hands every command to the inbox.

It does nothing else with a command, so that it reads as fast as Redis writes. It also keeps
the subscription honest: a PING that confirms each new subscription, and the probe that the
heartbeat publishes on the command channel with every beat (``Probe``): heard back here, it
proves the subscription is live and the connection answers, so an idle agent costs Redis one
round trip per interval. Only when the probes stop coming does the listener PING by itself.
"""

from __future__ import annotations

import os
import random
import select
import ssl
import threading
import time
from collections.abc import Callable
from typing import Any

import redis
from redis._parsers import _RESP2Parser as PythonParser  # listed in redis._parsers.__all__

from config import Config
from runtime.cluster import REDIRECTS, Routes, moved
from runtime.inbox import Inbox
from runtime.loop import REDIS_DOWN, Loop

PROBE_PREFIX = b"cockpit-agent-probe:"


class Probe:
    """The subscription self-check, shared by the heartbeat (which publishes a probe on the
    command channel inside each beat) and the listener (which looks for it on its subscription).

    A PING answered on the subscriber connection proves the connection, not the subscription: a
    server that dropped it (or a connection that came back without it) leaves a listener that
    answers PINGs and hears nothing. PUBLISH counting no receiver means no subscription at all;
    a probe that does not come back on our own subscription within the deadline means someone
    else holds it. Either way the listener tears the subscription down and makes it again.
    Probes are not JSON and never reach the Intake. Any thread.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.generation = 0  # the listener's subscription, counted: a probe is judged on its own
        self.pending: tuple[bytes, float, int] | None = None  # payload, monotonic sent, generation
        self.unheard = False  # PUBLISH counted no receiver: no subscription at all
        self.refused = False  # the ACL refuses PUBLISH on the command channel: no self-check

    def next(self) -> bytes:
        """The payload for the next beat ("" once refused): a nonce, pending until heard."""
        if self.refused:
            return b""
        payload = PROBE_PREFIX + f"{os.getpid()}-{random.getrandbits(64):016x}".encode()
        with self._lock:
            self.pending = (payload, time.monotonic(), self.generation)
        return payload

    def published(self, payload: bytes, receivers: int | None) -> None:
        """The beat's PUBLISH of ``payload`` counted ``receivers``; None: refused, or not sent."""
        with self._lock:
            if self.pending is None or self.pending[0] != payload:
                return
            if receivers is None:
                self.pending = None
            elif receivers == 0 and self.pending[2] == self.generation:
                self.pending, self.unheard = None, True

    def heard(self, data: bytes | None = None) -> bool:
        """Something came on the subscription (``data``: a probe): a probe waiting is answered by
        it, and so is any command (one queued behind a flood is not lost). True if ``data`` is a probe."""
        if self.pending is not None:  # no lock per command while no probe waits (a burst)
            with self._lock:
                if data is None or (self.pending is not None and data == self.pending[0]):
                    self.pending = None
        return data is not None and data.startswith(PROBE_PREFIX)

    def subscribed(self) -> None:
        """The listener made a new subscription: what was pending was for the old one."""
        with self._lock:
            self.generation += 1
            self.pending, self.unheard = None, False

    def overdue(self, deadline: float) -> float | None:
        """Seconds the pending probe of this subscription has waited, if past ``deadline``."""
        with self._lock:
            if self.pending is None or self.pending[2] != self.generation:
                return None
            waited = time.monotonic() - self.pending[1]
            if waited <= deadline:
                return None
            self.pending = None
            return waited


def _as_pushed(response: Any) -> Any:
    """The subscription's handler of RESP3 push messages (every message on it): the message as
    it came. redis-py's default handler builds a debug line of every message, ``str()`` of its
    bytes, even where debug logging is off: a quarter of a millisecond for each of 64 KiB."""
    return response


class Listener(Loop):
    """Reads the command channel and puts every command on the inbox for the intake thread.

    It does nothing else with a command, so that it reads as fast as Redis writes. Probes,
    PONGs, the liveness checks and the subscription's confirmation are handled here.
    """

    liveness_message = b"cockpit-agent-liveness"
    # Its reconnect is what sends the backlog out once Redis is back (it wakes the flusher, the
    # heartbeat writes the registry), so while Redis cannot be reached it tries again after a
    # delay drawn anew each time, uniformly from 0.2 to 4 s: each try is one refused TCP
    # connect, an agent is back at most ~4 s after Redis, and a fleet's agents arrive spread
    # over those 4 s instead of in one instant (10,000 agents: about 2,600 subscriptions a
    # second, each with the command connection behind it), also after a restart of a moment.
    reconnect_spread = (0.2, 4.0)
    # Bytes per recv() on the subscription (redis-py's default is 64 KiB): a burst is read in
    # fewer, larger reads.
    socket_read_size = 1024 * 1024

    def __init__(self, name: str, config: Config, inbox: Inbox, probe: Probe, online: Callable[[], None],
                 offline: Callable[[], None], lost: Callable[[], None], client: redis.Redis | None = None,
                 routes: Routes | None = None):
        """``probe``: the self-check the heartbeat publishes; ``online``: Redis confirmed the
        subscription; ``offline``: it is down or silent; ``lost``: Redis closed it under us (what
        it held is gone). Never called by a listener the watchdog abandoned: its successor speaks
        for the subscription. ``client``: the agent's command connection, for the rare question
        (CONFIG GET) asked beside the subscription. ``routes``: in a Redis Cluster, where the
        command channel's slot is (the subscription goes to that master, found anew at every
        subscribe, so a failover moves it)."""
        super().__init__(name, config)
        self.inbox, self.probe, self.shared = inbox, probe, client
        self.routes = routes if routes is not None and routes.cluster else None
        self.node: str | None = None  # host:port subscribed to, in a cluster
        self.online, self.offline, self.lost = online, offline, lost
        self.abandoned = False

    def setup(self) -> None:
        # No health-check PING of redis-py's: the probes (and, without them, _check_liveness) judge.
        self.client = self._new_client() if self.routes is None else None
        # _buffered looks into redis-py's pure-Python parser to tell a message that has partly
        # arrived from none at all. hiredis, where installed, replaces that parser by default
        # and would bring back the loss _next_message prevents, so these connections keep it
        # (redis-py swaps _RESP2Parser for its RESP3 twin when it speaks RESP3, its default).
        self.pubsub: redis.client.PubSub | None = None
        interval = max(1.0, float(self.config.heartbeat_interval))
        # The heartbeat's probe comes every interval: a PING of our own only when it is late.
        self.liveness_interval = interval
        # Silent this long: not online (as before the probes, at most 40 s at the default 30 s).
        self.silence_limit = max(2 * min(15.0, interval), interval + 2) + self.config.redis_socket_timeout
        # A probe not back this long after it was published: the subscription is not live.
        self.probe_deadline = min(15.0, interval) + self.config.redis_socket_timeout
        self.confirm_nonce: str | None = None  # the PING that confirms a new subscription
        self.confirm_sent_at = 0.0
        self.confirmed = False  # Redis has confirmed the current subscription once
        self.silenced = False  # silent past the limit, the subscription kept (see _check_liveness)
        self.last_check = 0.0
        self.reconnects = self.reconnects_seen = 0  # by redis-py, on its own (see _reconnected)

    def _new_client(self, node: tuple[str, int] | None = None) -> redis.Redis:
        if node is None:
            client = self.config.redis_client(health_check_interval=0)
        else:
            client = self.config.redis_node_client(*node, health_check_interval=0)
        client.connection_pool.connection_kwargs["parser_class"] = PythonParser
        client.connection_pool.connection_kwargs["socket_read_size"] = self.socket_read_size
        return client

    def teardown(self) -> None:
        self._close()
        if self.client is not None:
            self.client.close()

    def _close(self) -> None:
        if self.pubsub is not None:
            try:
                if self.pubsub.connection is not None:
                    # The connection goes back to the pool, for other commands.
                    self.pubsub.connection.deregister_connect_callback(self._reconnected)
                self.pubsub.close()
            except Exception:
                pass
            self.pubsub = None

    def _subscribe(self) -> None:
        if self.routes is not None:
            host, port, name = self.routes.node(self.config.command_channel)
            if name != self.node or self.client is None:
                if self.client is not None:
                    self.client.close()
                self.client, self.node = self._new_client((host, port)), name
        self.pubsub = self.client.pubsub(ignore_subscribe_messages=True, push_handler_func=_as_pushed)
        if self.routes is not None and self.routes.sharded:
            self.pubsub.ssubscribe(self.config.command_channel)
        else:
            self.pubsub.subscribe(self.config.command_channel)
        # Connected now: any later connect of this connection is redis-py's own reconnection.
        self.pubsub.connection.register_connect_callback(self._reconnected)
        self.reconnects_seen = self.reconnects
        now = time.monotonic()
        self.confirmed = self.silenced = False
        self.probe.subscribed()
        self._confirm(now)
        self.last_pong = self.last_ping = now

    def _confirm(self, now: float) -> None:
        # "online" must mean that commands are really heard. redis-py 8 counts a SUBSCRIBE as
        # done once it is sent, so a PING follows it on the same connection: Redis answers in
        # order, and its PONG is read by loop_once like any message (a command that arrives
        # before it is accepted as usual), which then calls _online.
        self.confirm_nonce = f"cockpit-agent-subscribed-{random.getrandbits(64):016x}"
        self.confirm_sent_at = now
        self.pubsub.ping(self.confirm_nonce)

    def _online(self) -> None:
        """Redis confirmed the subscription: say so, and send what waits."""
        self.confirm_nonce = None
        self.confirmed = True
        self.log.info("subscribed to %s%s", self.config.command_channel,
                      f" on {self.node} ({'sharded' if self.routes.sharded else 'classic'})" if self.routes else "")
        self.online()

    def _other(self, message: dict[str, Any]) -> None:
        """A message that is not a command: the PONG that confirms the subscription."""
        if (self.confirm_nonce is not None and message["type"] == "pong"
                and message["data"] == self.confirm_nonce.encode()):
            self._online()

    def loop_once(self) -> None:
        try:
            self._loop_once()
        except REDIRECTS as exc:  # a cluster's failover, or a slot moved: subscribe again where it is
            raise moved(self.config.command_channel, exc) from None

    def _loop_once(self) -> None:
        if self.pubsub is None:
            self._subscribe()
        # Half a second: how long a stop waits for this thread, at two idle wake-ups a second.
        message = self._next_message(0.5)
        now = time.monotonic()
        if self.reconnects != self.reconnects_seen:
            self._subscription_lost(now)
        if message is not None:
            self.last_pong = now  # any traffic proves the connection lives
            if self.silenced:
                self.silenced = False
                self.log.info("Redis answers on the subscription again")
                self._confirm(now)
            if message["type"] in ("message", "smessage"):
                self._received(message["data"], now)
            else:
                self._other(message)
        if self.confirm_nonce is not None and now - self.confirm_sent_at > self.config.redis_socket_timeout:
            if not self.confirmed:
                raise redis.TimeoutError("no confirmation of SUBSCRIBE from Redis")
            self.confirm_nonce = None  # a kept subscription, silent again: _check_liveness goes on
        self._check_liveness(now)
        if self.confirm_nonce is None and not self.silenced:
            self._check_probe()

    def _received(self, data: bytes, now: float) -> None:
        """A message on the command channel: a probe of ours, or a command for the intake."""
        if data.startswith(PROBE_PREFIX):
            self.probe.heard(data)
            return
        # A message heard proves the subscription; a probe queued behind a flood of
        # commands must not be taken for a lost one (reconnecting would drop some).
        self.probe.heard()
        if not self.inbox.put(data, 0.5):
            self._wait_for_room(data)

    def _wait_for_room(self, data: bytes) -> None:
        """The inbox is full: read nothing more (Redis holds the rest) until the intake has
        taken enough. A stop lets the message in regardless: nothing read may be dropped."""
        self.log.warning("%d bytes read and not yet accepted (LISTENER_BUFFER_BYTES=%d): reading paused",
                         self.inbox.bytes, self.inbox.max_bytes)
        while not self.inbox.put(data, 0.5, force=self.stop.is_set()):
            self.last_progress = time.monotonic()  # waiting for the intake thread, not stuck
        # Not reading was our choice, not Redis's silence.
        self.last_pong = time.monotonic()
        self.probe.heard()

    def _next_message(self, wait: float) -> dict[str, Any] | None:
        """The next message from the subscription: waits up to ``wait`` s for one to start
        arriving, then up to the socket timeout for the rest of it.

        redis-py's get_message(timeout=t) spends the same t on both, and when a message has
        only partly arrived by then (split across TCP segments or TLS records, the rest a few
        ms behind) it reconnects, silently dropping that message and everything behind it.
        With t = 0, to see whether more had arrived, a network that split a burst lost most of
        it. So the wait for a message to start is done here, and redis-py is only asked once
        there is something to read. A parser this does not know gets the old call; setup
        makes sure the listener's connections use the one it knows, even where hiredis is
        installed.
        """
        buffered = self._buffered()
        if buffered is None:
            return self.pubsub.get_message(timeout=wait)
        if not buffered and not self._readable(wait):
            return None
        return self.pubsub.get_message(timeout=self.config.redis_socket_timeout)

    def _buffered(self) -> bool | None:
        """Has redis-py read bytes of a message it has not returned yet? None if its parser
        is not the pure-Python one this knows. No system call."""
        buffer = getattr(getattr(self.pubsub.connection, "_parser", None), "_buffer", None)
        if not hasattr(buffer, "unread_bytes"):
            return None
        return buffer.unread_bytes() > 0

    def _readable(self, wait: float) -> bool:
        """Is there something to read on the subscription within ``wait`` s? (True when not
        connected: redis-py then reconnects, or says why it cannot.)"""
        sock = getattr(self.pubsub.connection, "_sock", None)
        if sock is None:
            return True
        if isinstance(sock, ssl.SSLSocket) and sock.pending():  # decrypted, not read yet
            return True
        poller = select.poll()  # not select.select: it refuses descriptors above 1023
        poller.register(sock, select.POLLIN)
        return bool(poller.poll(wait * 1000))

    def _check_liveness(self, now: float) -> None:
        """A connection that neither answers nor closes: a frozen server, or a broken connection.

        While it is silent the agent is not online. The subscription is torn down only if Redis
        answers on another connection: a frozen redis-server keeps its connections and, once it
        thaws, delivers on them everything published meanwhile, which a new subscription made
        at that moment would miss. A dead peer whose connection never closes is left to TCP
        keepalive and TCP_USER_TIMEOUT (config.redis_kwargs), which close it within ~25 s.
        """
        silent = now - self.last_pong
        if silent > self.silence_limit and now - self.last_check >= min(15.0, self.liveness_interval):
            self.last_check = now
            if not self.silenced:
                self.silenced = True
                if not self.abandoned:
                    self.offline()
                self.log.warning("no answer from Redis on the subscription for %.0f s; "
                                 "asking on another connection whether Redis lives", silent)
            # Answered there, and still nothing here (even a moment later: a server that thaws
            # answers both): the subscription's connection is the broken one.
            if self._server_answers() and not self._readable(1.0):
                raise redis.ConnectionError(f"no answer from Redis on the subscription for {silent:.0f} s, "
                                            "while it answers on another connection")
        # Only when the heartbeat's probe is late (not confirmed yet, a stop, or its beat failed).
        if silent >= self.liveness_interval + 1 and now - self.last_ping >= self.liveness_interval:
            self.pubsub.ping(self.liveness_message)
            self.last_ping = now

    def _server_answers(self) -> bool:
        """Does Redis answer a PING on a new connection of its own, with short timeouts? Through
        the sentinels if there are any: after a failover, that is the new master."""
        from redis.backoff import NoBackoff
        from redis.retry import Retry

        timeout = min(2.0, self.config.redis_socket_timeout)
        settings = dict(socket_timeout=timeout, socket_connect_timeout=timeout, retry=Retry(NoBackoff(), 0),
                        health_check_interval=0)
        if self.routes is not None:  # the master of the command channel's slot, as it is now
            try:
                self.routes.suspect()
                host, port, _ = self.routes.node(self.config.command_channel)
            except REDIS_DOWN:
                return False
            client = self.config.redis_node_client(host, port, **settings)
        else:
            client = self.config.redis_client(**settings)
        try:
            client.ping()
            return True
        except (redis.AuthenticationError, redis.ResponseError):
            return True  # it answered, if only to refuse
        except REDIS_DOWN:
            return False
        finally:
            client.connection_pool.disconnect()

    def _reconnected(self, connection: Any) -> None:
        """redis-py's connect callback on the subscription's connection (registered once it is
        up): redis-py made it again by itself, inside a read or a PING, and subscribed again.
        Only counted here, inside redis-py's call; loop_once acts on it."""
        self.reconnects += 1

    def _subscription_lost(self, now: float) -> None:
        """The old connection was closed (by Redis, or the network broke it): what was published
        meanwhile, and what Redis still held for it, is gone although PUBLISH counted us."""
        self.reconnects_seen = self.reconnects
        self.lost()
        self.log.error("Redis closed the subscription connection (redis-py connected and subscribed again); "
                       "commands published meanwhile are lost. If this happened during a burst, raise "
                       "client-output-buffer-limit pubsub on the Redis server (now: %s)", self._pubsub_limit())
        if not self.abandoned:
            self.offline()
        self.confirmed = self.silenced = False
        self._confirm(now)  # online again once Redis confirms the new subscription

    def _pubsub_limit(self) -> str:
        """Redis's client-output-buffer-limit for pub/sub clients (hard, soft, seconds)."""
        try:
            value = (self.shared or self.client).config_get("client-output-buffer-limit").get("client-output-buffer-limit", "")
        except redis.RedisError:  # an ACL without CONFIG, or a renamed CONFIG
            value = ""
        words = (value.decode(errors="replace") if isinstance(value, bytes) else str(value)).split()
        for i, word in enumerate(words[:-3]):
            if word == "pubsub" and all(w.isdigit() for w in words[i + 1:i + 4]):
                return " ".join(words[i + 1:i + 4])
        return "unknown: CONFIG GET was refused; the default is 32mb 8mb 60"

    def retry_delay(self, exc: Exception) -> float:
        if isinstance(exc, REDIS_DOWN):
            return random.uniform(*self.reconnect_spread)
        return super().retry_delay(exc)

    def on_error(self, exc: Exception) -> None:
        if self.routes is not None and isinstance(exc, REDIS_DOWN):
            self.routes.suspect()
        if not self.abandoned:  # an abandoned listener must not speak for its replacement
            self.offline()
        self._close()
        super().on_error(exc)

    def _check_probe(self) -> None:
        """The heartbeat's probe (``Probe``): no receiver, or not back in time, means the
        subscription is not live; it is then torn down and made again."""
        if self.probe.unheard:
            self.probe.unheard = False
            raise redis.ConnectionError(f"subscription to {self.config.command_channel} is not live: "
                                        "Redis counts no subscriber on it")
        waited = self.probe.overdue(self.probe_deadline)
        if waited is not None and self._server_answers():  # else frozen since: _check_liveness judges
            raise redis.ConnectionError(f"subscription to {self.config.command_channel} is not live: "
                                        f"our own probe did not come back within {waited:.0f} s")

    def abandon(self) -> None:
        """Called from another thread on a stuck listener: stop it and close its sockets, so a
        blocked read returns and Redis stops counting it as a subscriber."""
        self.abandoned = True
        self.stop.set()
        pubsub = getattr(self, "pubsub", None)
        if pubsub is not None and pubsub.connection is not None:
            try:
                pubsub.connection.disconnect()
            except Exception:
                pass
