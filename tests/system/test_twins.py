"""Two agents with one agent id on one Redis (two hosts, or two databases) both receive and run
every command. Each notices the other through the registry hash (the ``instance`` field it
reads inside its heartbeat transaction) and says so: an ERROR line once per episode, the
``cockpit_agent_twin_detected`` gauge, and a FAIL line in ``check``. The same agent restarted on
its own database is not a twin."""

from __future__ import annotations

import logging

from test_metrics import scrape

from conftest import agent_py as cli
from conftest import free_port, wait_for


def beats(agent, n: int) -> None:
    """Wait for ``n`` more heartbeats of ``agent``."""
    for _ in range(n):
        last = agent.heartbeat.last_heartbeat
        wait_for(lambda last=last: agent.heartbeat.last_heartbeat != last, 10, message="a heartbeat")


def twin_errors(caplog, agent) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR
            and "another agent runs as" in r.getMessage() and f"instance {agent.instance});" in r.getMessage()]


def test_two_agents_with_one_id_both_say_so(running_agent, agent_env, tmp_path, caplog):
    env_a = {**agent_env, "OUTBOX_DB": str(tmp_path / "a" / "outbox.db")}
    port_a, port_b = free_port(), free_port()
    env_a["HEARTBEAT_INTERVAL"] = "1"  # beats are what this test waits on
    a = running_agent(OUTBOX_DB=env_a["OUTBOX_DB"], METRICS_PORT=port_a, HEARTBEAT_INTERVAL=1)
    b = running_agent(OUTBOX_DB=str(tmp_path / "b" / "outbox.db"), METRICS_PORT=port_b, HEARTBEAT_INTERVAL=1)

    def said() -> set[str]:
        return {r.getMessage() for r in caplog.records
                if r.levelno == logging.ERROR and "another agent runs as" in r.getMessage()}

    wait_for(lambda: len(said()) == 2, 15, message="both agents to log the other at ERROR")
    assert a.instance != b.instance and a.config.agent_id == b.config.agent_id
    assert a.heartbeat.twin and b.heartbeat.twin
    assert f"instance '{b.instance}'" in a.heartbeat.twin and f"instance '{a.instance}'" in b.heartbeat.twin
    beats(a, 3)
    beats(b, 3)  # seen on most beats, said once
    assert len(twin_errors(caplog, a)) == 1 and len(twin_errors(caplog, b)) == 1, caplog.text
    assert a.config.registry_key in twin_errors(caplog, a)[0]
    assert scrape(port_a)[("cockpit_agent_twin_detected", ())] == 1
    assert scrape(port_b)[("cockpit_agent_twin_detected", ())] == 1

    check = cli(env_a, "check")
    assert check.returncode == 1, check.stdout
    assert f"FAIL  registry: two agents run as {a.config.agent_id} on this Redis" in check.stdout, check.stdout

    # The twin goes away: after a few beats without a sign of it, the detection clears.
    b.stop_requested.set()
    b.shutdown()
    wait_for(lambda: a.heartbeat.twin is None, 30, message="the detection to clear")
    assert scrape(port_a)[("cockpit_agent_twin_detected", ())] == 0
    assert any("has not written" in r.getMessage() and r.levelno == logging.WARNING for r in caplog.records)
    beats(a, 1)  # the beat that cleared it still wrote the twin it knew
    assert "registry:" not in cli(env_a, "check").stdout


def test_the_same_agent_restarted_on_its_database_is_not_a_twin(running_agent, agent_env, caplog, redis_server):
    first = running_agent()
    wait_for(lambda: first.heartbeat.last_heartbeat, message="a heartbeat")
    first.stop_requested.set()
    first.shutdown()  # its registry hash, with its instance, stays until it expires
    assert redis_server.client().hget(first.config.registry_key, "instance") == first.instance.encode()
    again = running_agent()
    assert again.instance == first.instance
    beats(again, 3)
    assert again.heartbeat.twin is None
    assert not [r for r in caplog.records if "another agent runs as" in r.getMessage()]
    check = cli(agent_env, "check")
    assert check.returncode == 0 and "registry:" not in check.stdout, check.stdout


def test_an_acl_from_before_hmget_still_beats_with_one_warning(running_agent, redis_server, agent_env, caplog):
    """Rules written for an older version lack +hmget: Redis then aborts the whole heartbeat
    transaction. The agent must keep its registry entry (the backend's "online") and say once
    what the ACL lacks."""
    from test_acl import documented_rules

    admin = redis_server.client()
    username, rules = documented_rules(agent_env["AGENT_ID"], "old-acl-pw")
    admin.execute_command("ACL", "SETUSER", username, *[r for r in rules if r != "+hmget"])
    agent = running_agent(REDIS_USERNAME=username, REDIS_PASSWORD="old-acl-pw")
    beats(agent, 2)
    assert admin.hget(agent.config.registry_key, "status") == b"online"
    warnings = [r.getMessage() for r in caplog.records if "refuses HMGET" in r.getMessage()]
    assert len(warnings) == 1 and "+hmget" in warnings[0]
