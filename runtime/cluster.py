"""Where each of the agent's Redis commands goes: one Redis, or a Redis Cluster's masters.

Every command the agent sends carries one key or one channel: the heartbeat's ``BEAT`` the
registry hash, an answer its result key (SET) and the response channel (PUBLISH), the stream
reader its stream, the subscription the command channel. ``Routes`` hands out the client for
that name; with one Redis (or Sentinel) it is the agent's one command connection for all of
them, and nothing changes. ``ClusterRoutes`` (REDIS_CLUSTER_NODES) asks redis-py's cluster
client which master holds the name's slot, and keeps one plain client per master, each made
into one connection taken in turns (``OneConnection``): at most one connection per master, and
the subscription's own. A node that cannot be reached, or answers MOVED/ASK/CLUSTERDOWN, makes
the slot map stale: it is read again (at most twice a second) before the next command, so a
failover lands every thread on the new master the way an outage lands it on a restarted Redis.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any, TypeVar

import redis
from redis import exceptions

from config import Config
from outbox import Message
from runtime.connection import OneConnection
from runtime.loop import REDIS_DOWN
from runtime.publish import RUN_ID_SHA, load_scripts, publish_messages, read_run_id

T = TypeVar("T")

# The cluster telling us that the slot is elsewhere, or not served right now (a failover).
REDIRECTS = (exceptions.MovedError, exceptions.AskError, exceptions.TryAgainError, exceptions.ClusterDownError,
             exceptions.ReadOnlyError, exceptions.SlotNotCoveredError, exceptions.RedisClusterException)


def moved(name: str, exc: BaseException) -> redis.ConnectionError:
    """A redirect (REDIRECTS) for ``name``'s slot, as the outage every loop already retries."""
    return redis.ConnectionError(f"the cluster moved the slot of {name}: {exc}")


class Routes:
    """One Redis: every command goes on ``client`` (the agent's one command connection)."""

    cluster = False
    sharded = False  # SSUBSCRIBE / SPUBLISH (PUBSUB_SHARDED=on; cluster only)

    def __init__(self, client: redis.Redis):
        self.client = client

    @classmethod
    def of(cls, client: redis.Redis | Routes) -> Routes:
        """``client`` as Routes: the agent's Routes as they are, a plain client (tests, tools) wrapped."""
        return client if isinstance(client, Routes) else cls(client)

    def for_key(self, name: str) -> redis.Redis:
        """The client for the node holding ``name``'s slot (a key or a channel)."""
        return self.client

    def on(self, name: str, call: Callable[[redis.Redis], T]) -> T:
        """``call(client)`` on the node of ``name``; a redirect or an unreachable node marks the
        slot map stale and is raised as ``redis.ConnectionError`` (retried like an outage)."""
        return call(self.for_key(name))

    def suspect(self) -> None:
        """A node failed or redirected us: read the slot map again before the next command."""

    def publish(self, messages: list[Message], ttl: int, read_run_id: bool = True) -> tuple[list[Any], str | None]:
        """As ``runtime.publish.publish_messages``."""
        return publish_messages(self.client, messages, ttl, read_run_id)

    def run_id(self, channel: str) -> str | None:
        """The run_id of the Redis that publishes on ``channel`` (confirms a PUBLISH: Flusher.confirm)."""
        return read_run_id(self.client)

    def publish_raw(self, channel: str, payload: bytes | str) -> int:
        """One PUBLISH (SPUBLISH when sharded), with no result key."""
        return self.client.publish(channel, payload)


class ClusterRoutes(Routes):
    """A Redis Cluster: each command on the master of its key's or channel's slot."""

    cluster = True
    refresh_every = 0.5  # s: the least time between two reads of the slot map

    def __init__(self, config: Config, wait: float):
        self.config, self.wait = config, wait
        self.sharded = config.pubsub_sharded
        self.publish_command = "SPUBLISH" if self.sharded else "PUBLISH"
        self._topology: Any = None  # redis.cluster.RedisCluster, made on first use (Redis may be down at start)
        self._clients: dict[str, redis.Redis] = {}
        self._lock = threading.Lock()
        self._stale = False
        self._refreshed = 0.0

    def node(self, name: str) -> tuple[str, int, str]:
        """(host, port, "host:port") of the master holding ``name``'s slot."""
        with self._lock:
            try:
                if self._topology is None:
                    self._topology = self.config.redis_client(health_check_interval=0)
                    self._refreshed, self._stale = time.monotonic(), False
                elif self._stale and time.monotonic() - self._refreshed >= self.refresh_every:
                    self._refreshed, self._stale = time.monotonic(), False
                    self._topology.nodes_manager.initialize()
                node = self._topology.get_node_from_key(name)
            except (*REDIRECTS, redis.RedisError) as exc:
                self._stale = True
                raise redis.ConnectionError(f"cannot read the Redis Cluster's slots: {exc}") from None
        return node.host, node.port, node.name

    def for_key(self, name: str) -> redis.Redis:
        host, port, node_name = self.node(name)
        with self._lock:
            client = self._clients.get(node_name)
            if client is None:
                client = self.config.redis_node_client(host, port, health_check_interval=0)
                OneConnection(client, self.wait)
                self._clients[node_name] = client
        return client

    def on(self, name: str, call: Callable[[redis.Redis], T]) -> T:
        client = self.for_key(name)
        try:
            return call(client)
        except REDIRECTS as exc:
            self.suspect()
            raise moved(name, exc) from None
        except REDIS_DOWN:
            self.suspect()
            raise

    def suspect(self) -> None:
        self._stale = True

    def publish(self, messages: list[Message], ttl: int, read_run_id: bool = True) -> tuple[list[Any], str | None]:
        """``publish_messages`` for a cluster, where an answer's result key and its channel hash to
        different slots (the key names are the backend's): three round trips instead of one.

        1. GET each result key on its master: one that ends in the newline was delivered
           already (a retry after a lost reply) and is not published again (-1);
        2. PUBLISH (SPUBLISH) the rest, in order, on the response channel's master, with its
           run_id; classic PUBLISH counts only the receivers on that node, which is where a
           cluster client (redis-py's among them) subscribes to the channel;
        3. SET each result key on its master, with the newline where a receiver was counted.
        """
        results: list[Any] = [None] * len(messages)
        keyed = [i for i, message in enumerate(messages) if message.result_key]
        stored = self._per_node([messages[i].result_key for i in keyed], lambda pipe, key: pipe.get(key))
        for i, value in zip(keyed, stored):
            if value == (messages[i].payload + "\n").encode():
                results[i] = -1
        todo = [i for i, result in enumerate(results) if result is None]
        if not todo:
            return results, None
        channels = {messages[i].channel for i in todo}
        if len(channels) != 1:
            raise ValueError(f"one response channel per batch, got {len(channels)}")
        channel = channels.pop()

        def send(client: redis.Redis) -> list[Any]:
            pipe = client.pipeline(transaction=False)
            for i in todo:
                pipe.execute_command(self.publish_command, channel, messages[i].payload)
            if read_run_id:
                pipe.evalsha(RUN_ID_SHA, 0)
            replies = pipe.execute(raise_on_error=False)
            if read_run_id and isinstance(replies[-1], exceptions.NoScriptError):
                load_scripts(client)  # a master that never ran it (new, or promoted): the PUBLISHes went out
                replies[-1] = client.evalsha(RUN_ID_SHA, 0)
            return replies

        replies = self._checked([channel] * (len(todo) + read_run_id), self.on(channel, send))
        rid = replies.pop() if read_run_id else None
        for i, reply in zip(todo, replies):
            results[i] = reply
        run_id = None if rid is None else ("" if isinstance(rid, Exception) else rid.decode())
        marks = {messages[i].result_key: messages[i].payload + ("\n" if results[i] > 0 else "")
                 for i in todo if messages[i].result_key and isinstance(results[i], int)}
        keys = list(marks)
        self._per_node(keys, lambda pipe, key: pipe.set(key, marks[key], ex=ttl))
        return results, run_id

    def _checked(self, names: list[str], replies: list[Any]) -> list[Any]:
        """``replies`` of a pipeline, raising what says the node is gone or the slot moved."""
        for name, reply in zip(names, replies):
            if isinstance(reply, REDIS_DOWN):
                self.suspect()
                raise reply
            if isinstance(reply, REDIRECTS):
                self.suspect()
                raise moved(name, reply)
        return replies

    def _per_node(self, keys: list[str], add: Callable[[Any, str], Any]) -> list[Any]:
        """Run ``add(pipe, key)`` for each key, one pipeline per master; replies in ``keys``' order."""
        groups: dict[str, list[int]] = {}
        for index, key in enumerate(keys):
            groups.setdefault(self.node(key)[2], []).append(index)
        replies: list[Any] = [None] * len(keys)
        for indexes in groups.values():
            def run(client: redis.Redis, indexes: list[int] = indexes) -> list[Any]:
                pipe = client.pipeline(transaction=False)
                for index in indexes:
                    add(pipe, keys[index])
                return pipe.execute(raise_on_error=False)

            names = [keys[index] for index in indexes]
            for index, reply in zip(indexes, self._checked(names, self.on(names[0], run))):
                replies[index] = reply
        return replies

    def run_id(self, channel: str) -> str | None:
        return self.on(channel, read_run_id)

    def publish_raw(self, channel: str, payload: bytes | str) -> int:
        return self.on(channel, lambda client: client.execute_command(self.publish_command, channel, payload))


class ClusterAnswerPublisher:
    """The intake's ``AnswerPublisher`` in a cluster: answers go out through the routes at once
    (``ClusterRoutes.publish``); their confirmation is left to the flusher (``confirm`` says
    False), which asks the response channel's master for its run_id."""

    def __init__(self, config: Config, routes: Routes):
        self.config, self.routes = config, routes

    def publish(self, messages: list[Message]) -> tuple[list[Any], str | None]:
        return self.routes.publish(messages, self.config.result_ttl)

    def confirm(self) -> bool:
        return False
