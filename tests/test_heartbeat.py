"""The heartbeat, driven by loop_once against a real redis-server."""

from __future__ import annotations

import threading

from conftest import wait_for
from runtime.heartbeat import Heartbeat
from runtime.listener import PROBE_PREFIX


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


def test_a_beat_is_one_round_trip_carrying_the_probe(agent_env, config_from, redis_server):
    """Registry fields, expiry, twin check and the subscription's probe: one EVALSHA."""
    config, client = config_from(agent_env), redis_server.client()
    beat = heartbeat(config, client)
    beat.beat("online")  # loads the script on first use
    subscriber = redis_server.client().pubsub()
    subscriber.subscribe(config.command_channel)
    wait_for(lambda: subscriber.get_message(timeout=0.1) is not None, 5)
    client.config_resetstat()
    beat.beat("online")
    stats = client.info("commandstats")
    sent = {name for name in stats if name.startswith("cmdstat_")} - {"cmdstat_config|resetstat"}
    assert stats["cmdstat_evalsha"]["calls"] == 1
    assert sent == {"cmdstat_evalsha", "cmdstat_hmget", "cmdstat_hset", "cmdstat_expire", "cmdstat_publish"}
    message = subscriber.get_message(timeout=2)
    assert message["data"].startswith(PROBE_PREFIX) and beat.probe.heard(message["data"])
    assert beat.probe.pending is None
    subscriber.close()


def test_a_failed_beat_waits_for_the_listener_not_out_its_backoff(agent_env, config_from, redis_server):
    config = config_from(agent_env)
    beat = heartbeat(config, redis_server.client())
    waited = threading.Thread(target=beat.pause, args=(30.0,))
    waited.start()
    beat.now.set()  # the listener is back online
    waited.join(2)
    assert not waited.is_alive()


def test_a_finished_command_brings_commands_executed_up_to_date_within_a_second(agent_env, config_from,
                                                                                  redis_server):
    config, client = config_from(agent_env | {"HEARTBEAT_INTERVAL": "30"}), redis_server.client()
    count = [0]
    beat = Heartbeat("heartbeat", config, client, capabilities=["echo"], started_at=1000.0, instance="one",
                     executed=lambda: count[0], connected=threading.Event(), stopping=threading.Event(),
                     now=threading.Event())
    beat.connected.set()
    beat.start()
    try:
        wait_for(lambda: client.hget(config.registry_key, "commands_executed") == b"0", 5)
        count[0] = 3
        beat.executed_changed()
        wait_for(lambda: client.hget(config.registry_key, "commands_executed") == b"3", 3,
                 message="commands_executed to follow without waiting for the 30 s beat")
    finally:
        beat.stop.set()
        beat.now.set()
        beat.join(5)
