"""The listener, driven by loop_once against a real redis-server."""

from __future__ import annotations

import pytest
import redis

from conftest import wait_for
from runtime.inbox import Inbox
from runtime.listener import PROBE_PREFIX, Listener, Probe


@pytest.fixture
def listener(agent_env, config_from):
    calls: list[str] = []
    part = Listener("listener", config_from(agent_env), Inbox(1 << 20), Probe(), online=lambda: calls.append("online"),
                    offline=lambda: calls.append("offline"), lost=lambda: calls.append("lost"))
    part.calls = calls
    part.setup()
    yield part
    part.teardown()


def run_until(listener: Listener, condition, message: str) -> None:
    wait_for(lambda: listener.loop_once() or condition(), 15, interval=0, message=message)


def test_a_confirmed_subscription_calls_online_and_commands_reach_the_inbox(listener, redis_server):
    run_until(listener, lambda: "online" in listener.calls, "the subscription confirmed")
    client = redis_server.client()
    assert client.publish(listener.config.command_channel, PROBE_PREFIX + b"not-ours") == 1
    assert client.publish(listener.config.command_channel, b'{"command_id": "c1"}') == 1
    run_until(listener, lambda: len(listener.inbox) == 1, "the command in the inbox")
    assert [data for data, _ in listener.inbox.take(10, 0)] == [b'{"command_id": "c1"}']  # the probe never is


def test_a_subscription_killed_by_redis_is_counted_lost_then_online_again(listener, redis_server):
    run_until(listener, lambda: "online" in listener.calls, "the subscription confirmed")
    listener.calls.clear()
    assert redis_server.client().client_kill_filter(_type="pubsub") >= 1
    run_until(listener, lambda: "online" in listener.calls, "online again")
    assert listener.calls[:2] == ["lost", "offline"]


def test_an_abandoned_listener_no_longer_speaks_for_the_subscription(listener, redis_server):
    run_until(listener, lambda: "online" in listener.calls, "the subscription confirmed")
    listener.calls.clear()
    listener.abandon()
    listener.on_error(ConnectionError("gone"))
    assert listener.stop.is_set() and listener.calls == []


def test_a_probe_heard_back_is_answered_and_never_reaches_the_inbox(listener, redis_server):
    run_until(listener, lambda: "online" in listener.calls, "the subscription confirmed")
    payload = listener.probe.next()  # what the heartbeat publishes inside its beat
    receivers = redis_server.client().publish(listener.config.command_channel, payload)
    listener.probe.published(payload, receivers)
    run_until(listener, lambda: listener.probe.pending is None, "the probe heard back")
    assert len(listener.inbox) == 0 and listener.calls == ["online"]


def test_a_probe_no_one_received_tears_the_subscription_down(listener, redis_server):
    run_until(listener, lambda: "online" in listener.calls, "the subscription confirmed")
    listener.probe.published(listener.probe.next(), 0)  # PUBLISH counted no subscriber
    with pytest.raises(redis.ConnectionError, match="counts no subscriber"):
        listener.loop_once()


def test_a_probe_that_never_comes_back_tears_the_subscription_down(listener, redis_server):
    """Someone else holds the subscription: Redis answers, our probe does not arrive."""
    run_until(listener, lambda: "online" in listener.calls, "the subscription confirmed")
    listener.probe.next()  # pending, never published
    listener.probe_deadline = 0.2
    with pytest.raises(redis.ConnectionError, match="did not come back"):
        wait_for(lambda: listener.loop_once(), 10, interval=0)


def test_an_idle_listener_sends_nothing_while_the_probes_come(listener, redis_server):
    """Between probes the subscription costs Redis nothing: no PING of its own."""
    run_until(listener, lambda: "online" in listener.calls, "the subscription confirmed")
    client = redis_server.client()
    client.config_resetstat()
    listener.last_pong -= listener.liveness_interval - 0.5  # a probe came just under an interval ago
    listener.last_ping -= 10  # and its own last PING is long past
    for _ in range(2):
        listener.loop_once()
    assert "cmdstat_ping" not in client.info("commandstats")
    listener.last_pong -= 1  # now it is late: one PING of its own
    listener.loop_once()
    assert client.info("commandstats")["cmdstat_ping"]["calls"] == 1
