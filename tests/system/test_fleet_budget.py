"""What each agent costs the Cockpit's Redis, for a few real agent processes: the budgets of
``make fleet`` (bench/fleet.py), which are counts, not timings.

- at most 2 connections per agent, idle and after commands of every kind and a Redis restart;
- at most one command per heartbeat interval while idle (0.04/s at the default 30 s), with the
  registry, its expiry, the twin check and the subscription's probe all in it;
- one Redis key per answered command, and no key without an expiry.
The docker handler runs against the stand-in ``docker`` of conftest (no Docker engine here).
"""

from __future__ import annotations

import json
import sys
import time
import uuid

import pytest

from conftest import PASSWORD, ROOT, Backend, wait_for

sys.path.insert(0, str(ROOT / "bench"))
import fleet  # noqa: E402  (bench/fleet.py: the same measures as `make fleet`)

AGENTS = 3


@pytest.fixture
def three_agents(agent_process, agent_env, tmp_path, redis_server):
    agents = []
    for i in range(AGENTS):
        env = {**agent_env, "AGENT_ID": f"budget-{i}-{uuid.uuid4().hex[:6]}",
               "OUTBOX_DB": str(tmp_path / f"db{i}" / "outbox.db"), "LOG_LEVEL": "WARNING"}
        agents.append(agent_process(env).start())
    client = redis_server.client()
    ids = [a.env["AGENT_ID"] for a in agents]
    wait_for(lambda: fleet.all_online(client, ids) == AGENTS, 30, message="the agents online")
    return agents


def per_agent_connections(redis_server, agents) -> dict[str, int]:
    counts = fleet.agent_connections(redis_server.client())
    return {a.env["AGENT_ID"]: counts.get(a.env["AGENT_ID"], 0) for a in agents}


def test_each_agent_holds_two_connections_idle_working_and_after_a_restart(three_agents, redis_server):
    agents, ids = three_agents, [a.env["AGENT_ID"] for a in three_agents]
    assert set(per_agent_connections(redis_server, agents).values()) == {2}
    for agent in agents:  # commands of every kind, a refusal and junk
        backend = Backend(redis_server, agent.env["AGENT_ID"])
        try:
            assert backend.call("echo", {"message": "hi"})["status"] == "success"
            assert backend.call("git_status")["status"] == "success"
            assert backend.call("git_pull")["status"] == "success"
            assert backend.call("docker_restart", {"container_name": "grafana"})["output"] == "grafana"
            assert backend.call("rm_rf")["status"] == "error"
            backend.publish(b"not json")
        finally:
            backend.close()
    assert max(per_agent_connections(redis_server, agents).values()) <= 2
    wait_for(lambda: int(redis_server.client().hget(f"agents:{ids[0]}", "commands_executed") or 0) >= 4, 10,
             message="a beat after the commands")
    assert max(per_agent_connections(redis_server, agents).values()) <= 2

    redis_server.restart()
    wait_for(lambda: fleet.all_online(redis_server.client(), ids) == AGENTS, 20, message="all back")
    wait_for(lambda: set(per_agent_connections(redis_server, agents).values()) == {2}, 10,
             message="two connections each after the restart")
    # And no more after a few beats.
    until = time.monotonic() + 2 * int(agents[0].env["HEARTBEAT_INTERVAL"])
    while time.monotonic() < until:
        assert max(per_agent_connections(redis_server, agents).values()) <= 2
        time.sleep(0.2)


def test_an_idle_agent_sends_one_command_per_heartbeat_interval(three_agents, redis_server):
    agents = three_agents
    interval = int(agents[0].env["HEARTBEAT_INTERVAL"])
    client = redis_server.client()
    addresses = fleet.agent_addresses(client)
    window = 3 * interval
    with fleet.Monitor(redis_server.port, PASSWORD) as monitor:
        deadline = time.monotonic() + window
        while time.monotonic() < deadline:  # the measured window itself, not a synchronisation
            time.sleep(0.1)
    sent, scripted = monitor.by_agent(addresses)
    for agent in agents:
        commands = sent.get(agent.env["AGENT_ID"], {})
        # Beats are more than one interval apart, so a window of three intervals holds at most 3.
        assert 2 <= sum(commands.values()) <= window / interval, commands
        assert set(commands) <= {"EVALSHA"}, commands
    # Inside the beat script: the twin check, the registry and its expiry, the probe.
    assert set(scripted) == {"HMGET", "HSET", "EXPIRE", "PUBLISH"}, scripted


def test_an_answered_command_leaves_one_key_and_every_key_expires(three_agents, redis_server):
    agent = three_agents[0]
    agent_id = agent.env["AGENT_ID"]
    client = redis_server.client()
    backend = Backend(redis_server, agent_id)
    try:
        ids = [backend.send("echo", {"message": f"k{i}"}) for i in range(10)]
        for command_id in ids:
            assert backend.wait(command_id)["status"] == "success"
    finally:
        backend.close()
    keys = [k.decode() for k in client.scan_iter(f"*{agent_id}*")]
    answered = [k for k in keys if not k.startswith("agents:")]
    assert sorted(answered) == sorted(f"cockpit-agent-result:{agent_id}:{c}" for c in ids)
    assert all(client.ttl(k) > 0 for k in client.scan_iter("*")), "a key without an expiry"
    # The result key is the answer as published (its trailing newline marks it delivered).
    stored = client.get(f"cockpit-agent-result:{agent_id}:{ids[0]}")
    assert stored.endswith(b"\n") and json.loads(stored)["output"] == "k0"
