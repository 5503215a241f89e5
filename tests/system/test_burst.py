"""Bursts against Redis's pub/sub output buffer (client-output-buffer-limit pubsub, 32 MB hard,
8 MB for 60 s soft by default): past it Redis closes the agent's subscription, redis-py makes a
new one without a word, and everything Redis had queued for the old one is gone although
PUBLISH counted a receiver."""

from __future__ import annotations

import json
import logging
import time
import urllib.request

import pytest
from prometheus_client.parser import text_string_to_metric_families

from conftest import free_port, wait_for

MESSAGE_BYTES = 64 * 1024


def burst(backend, client, channel: str, count: int, size: int = MESSAGE_BYTES) -> list[str]:
    """Publish ``count`` echo commands of about ``size`` bytes each in one pipeline."""
    ids, pipe = [], client.pipeline(transaction=False)
    for i in range(count):
        message = backend.message("echo", {"message": ""})
        message["params"]["message"] = f"{i}:".ljust(size - len(json.dumps(message)), "x")
        ids.append(message["command_id"])
        pipe.publish(channel, json.dumps(message))
    assert pipe.execute() == [1] * count  # Redis counted the agent as a receiver of every one
    return ids


def subscription_lost(port: int) -> float:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as reply:
        text = reply.read().decode()
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == "cockpit_agent_subscription_lost_total":
                return sample.value
    raise AssertionError("no cockpit_agent_subscription_lost_total on /metrics")


@pytest.mark.burst  # run alone by make test, after the rest
def test_a_burst_of_800_commands_of_64_kib_is_all_answered(running_agent, make_backend, redis_server):
    """800 × 64 KiB published in one pipeline (50 MB, past Redis's 32 MB hard limit): the old
    listener read 200, then parsed and committed them while nobody read the socket; Redis
    closed the connection and 252 of 1,000 arrived (PUBLISH counted no receiver from about the
    650th on). 1,000 pass in most runs but not all: loopback outruns any redis-py reader."""
    port = free_port()
    agent = running_agent(METRICS_PORT=port)
    backend = make_backend(agent.config.agent_id)
    client = redis_server.client(socket_timeout=30)
    started = time.monotonic()
    ids = burst(backend, client, agent.config.command_channel, 800)
    wait_for(lambda: all(backend.responses_for(cid) for cid in ids), 60, interval=0.2,
             message="an answer to every command of the burst")
    took = time.monotonic() - started
    for cid in ids:
        [response] = backend.responses_for(cid)
        assert response["status"] == "success" and len(response["output"]) > MESSAGE_BYTES - 300
    assert subscription_lost(port) == 0
    print(f"800 x 64 KiB answered in {took:.1f} s")


def test_redis_closing_the_subscription_is_logged_and_counted(running_agent, make_backend, redis_server, caplog):
    """Redis closes the agent's subscription (as it does past client-output-buffer-limit pubsub;
    here CLIENT KILL, the same event on the agent's side): redis-py connected and subscribed
    again without a word. Now it is said at ERROR, naming the Redis setting and its value, and
    counted; the agent says online again only once Redis confirms the new subscription."""
    port = free_port()
    agent = running_agent(METRICS_PORT=port)
    backend = make_backend(agent.config.agent_id)
    admin = redis_server.client()
    admin.config_set("client-output-buffer-limit", "pubsub 1mb 512kb 5")
    # Its own handler on the listener's logger: caplog's, on the root, depends on what earlier
    # tests in this worker did to propagation and levels.
    records: list[logging.LogRecord] = []
    handler = logging.Handler(logging.ERROR)
    handler.emit = records.append
    listener_log = logging.getLogger("cockpit_agent.listener")
    listener_log.addHandler(handler)
    listener_log.setLevel(logging.INFO)
    listener, pubsub = agent.listener, agent.listener.pubsub
    name = f"cockpit-agent:{agent.config.agent_id}"
    [subscription] = wait_for(lambda: [c for c in admin.client_list(_type="pubsub") if c["name"] == name], 10,
                              message="the agent's subscription in CLIENT LIST")
    assert admin.client_kill_filter(_id=subscription["id"]) == 1
    wait_for(lambda: subscription_lost(port) == 1, 20, message="the lost subscription to be counted")
    [line] = wait_for(lambda: [r.getMessage() for r in records if "closed the subscription" in r.getMessage()], 10,
                      message="the ERROR line")
    listener_log.removeHandler(handler)
    assert "client-output-buffer-limit pubsub" in line and "(now: 1048576 524288 5)" in line, line
    assert "commands published meanwhile are lost" in line
    wait_for(agent.redis_connected.is_set, 15, message="the agent to be online again")
    assert backend.call("echo", {"message": "after the loss"})["output"] == "after the loss"
    assert agent.listener is listener and listener.pubsub is pubsub  # redis-py's own reconnection
    assert subscription_lost(port) == 1


def test_messages_are_not_turned_into_redis_py_debug_lines(running_agent, make_backend, caplog):
    """redis-py's default RESP3 push handler builds "Push response: " + str(message) for every
    message, whatever the log level: ~0.25 ms per 64 KiB, the listener's biggest cost in a burst
    (and the whole message, unescaped, in a debug log). The subscription handles them as they are."""
    agent = running_agent()
    backend = make_backend(agent.config.agent_id)
    caplog.set_level(logging.DEBUG, logger="push_response")
    assert backend.call("echo", {"message": "quiet"})["output"] == "quiet"
    # The backend fixture's own subscription (to the responses) keeps redis-py's handler: only commands count.
    assert not [r for r in caplog.records if r.name == "push_response" and '"command"' in r.getMessage()]

