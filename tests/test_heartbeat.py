"""The heartbeat, driven by loop_once against a real redis-server."""

from __future__ import annotations

import threading

from runtime.heartbeat import Heartbeat


def heartbeat(config, client, instance="one", executed=7):
    return Heartbeat("heartbeat", config, client, capabilities=["echo", "git_pull"], started_at=1000.0,
                     instance=instance, executed=lambda: executed, connected=threading.Event(),
                     stopping=threading.Event(), now=threading.Event())


def beat_once(beat: Heartbeat) -> None:
    beat.now.set()  # its wait at the end returns at once
    threading.Timer(0.05, beat.now.set).start()
    beat.loop_once()


def test_online_is_written_only_while_the_subscription_is_confirmed(agent_env, config_from, redis_server):
    config, client = config_from(agent_env), redis_server.client()
    beat = heartbeat(config, client)
    beat_once(beat)
    assert not client.exists(config.registry_key)
    beat.connected.set()
    beat_once(beat)
    fields = {k.decode(): v.decode() for k, v in client.hgetall(config.registry_key).items()}
    assert fields["status"] == "online" and fields["capabilities"] == "echo,git_pull"
    assert fields["commands_executed"] == "7" and fields["agent_id"] == config.agent_id
    assert fields["instance"] == "one" and fields["started_at"] == "1000"
    assert 0 < client.ttl(config.registry_key) <= 3 * config.heartbeat_interval
    beat.stopping.set()
    client.hset(config.registry_key, "status", "marker")
    beat_once(beat)
    assert client.hget(config.registry_key, "status") == b"marker"  # nothing written once stopping
    beat.beat("offline")
    assert client.hget(config.registry_key, "status") == b"offline"


def test_two_agents_writing_one_hash_both_see_a_twin_and_it_clears(agent_env, config_from, redis_server):
    config, client = config_from(agent_env), redis_server.client()
    a, b = heartbeat(config, client, "a"), heartbeat(config, client, "b")
    for _ in range(2):
        a.beat("online")
        b.beat("online")
    assert a.twin and "instance 'b'" in a.twin and b.twin and "instance 'a'" in b.twin
    for _ in range(a.twin_clears_after + 1):  # the first still finds b's last write
        a.beat("online")
    assert a.twin is None
