"""The listener, driven by loop_once against a real redis-server."""

from __future__ import annotations

import pytest

from conftest import wait_for
from runtime.inbox import Inbox
from runtime.listener import PROBE_PREFIX, Listener


@pytest.fixture
def listener(agent_env, config_from):
    calls: list[str] = []
    part = Listener("listener", config_from(agent_env), Inbox(1 << 20), online=lambda: calls.append("online"),
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
