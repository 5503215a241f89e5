"""The agent under exactly the least-privilege ACL of docs/redis-acl.md, end to end, and what
that user cannot do to other agents."""

from __future__ import annotations

import time
import uuid

import pytest
import redis

from conftest import SECRET, agent_py, denials, documented_rules, sql, wait_for


def install_user(admin: redis.Redis, agent_id: str) -> tuple[str, str]:
    password = f"agent-pw-{uuid.uuid4().hex}"
    username, rules = documented_rules(agent_id, password)
    admin.execute_command("ACL", "SETUSER", username, *rules)
    return username, password


@pytest.fixture
def acl_agent(redis_server, agent_env, agent_process):
    """``python agent.py`` logged in as its documented ACL user, signing on."""
    admin = redis_server.client()
    admin.acl_log_reset()
    username, password = install_user(admin, agent_env["AGENT_ID"])
    env = {**agent_env, "REDIS_USERNAME": username, "REDIS_PASSWORD": password, "COCKPIT_SHARED_SECRET": SECRET}
    agent = agent_process(env).start()
    agent.wait_subscribed(redis_server)
    return agent, username, password


def test_acl_agent_works_end_to_end_under_the_documented_user(acl_agent, redis_server, make_backend, fake_docker):
    agent, username, _ = acl_agent
    agent_id = agent.env["AGENT_ID"]
    admin = redis_server.client()
    backend = make_backend(agent_id, secret=SECRET)

    assert backend.call("echo", {"message": "least privilege"})["output"] == "least privilege"
    assert backend.call("docker_restart", {"container_name": "grafana"})["output"] == "grafana"
    assert backend.call("git_status")["status"] == "success"
    refused = backend.call("docker_restart", {"container_name": "db"})
    assert refused["status"] == "error" and "not whitelisted" in refused["error"]

    # Everything it writes is where the contract says, under its own names only.
    registry = wait_for(lambda: (lambda h: int(h.get(b"commands_executed", 0)) >= 3 and h)(
        admin.hgetall(f"agents:{agent_id}")), message="a heartbeat counting the commands")
    assert registry[b"status"] == b"online"
    assert 0 < admin.ttl(f"agents:{agent_id}") <= 3 * int(agent.env["HEARTBEAT_INTERVAL"])
    for response in backend.responses:
        assert admin.exists(f"cockpit-agent-result:{agent_id}:{response['command_id']}")
    assert [c["name"] for c in admin.client_list() if c.get("user") == username][:1] == [f"cockpit-agent:{agent_id}"]

    # Nothing it did was refused by the ACL, and a clean stop still writes status=offline.
    assert denials(admin, username) == []
    assert agent.terminate() == 0
    assert admin.hget(f"agents:{agent_id}", "status") == b"offline"
    assert denials(admin, username) == []
    assert "NOPERM" not in agent.log() and "iteration failed" not in agent.log()


def test_acl_user_cannot_touch_another_agent(redis_server):
    admin = redis_server.client()
    admin.acl_log_reset()
    mine, other = "host-a", "host-b"
    username, password = install_user(admin, mine)
    install_user(admin, other)
    admin.hset(f"agents:{other}", "status", "online")
    admin.set(f"cockpit-agent-result:{other}:c1", "secret result")
    admin.xadd(f"cockpit-agent-stream:{other}", {"m": "1"})
    admin.xadd(f"cockpit-agent-stream:{mine}", {"m": "1"})
    me = redis.Redis(port=redis_server.port, username=username, password=password, socket_timeout=5)

    # What it may do, on its own names.
    assert me.ping()
    me.hset(f"agents:{mine}", "status", "online")
    me.set(f"cockpit-agent-result:{mine}:c1", "x", ex=60)
    assert me.get(f"cockpit-agent-result:{mine}:c1") == b"x"  # its own: the result key is its delivered mark
    me.xgroup_create(f"cockpit-agent-stream:{mine}", "agent", id="0")
    assert me.xreadgroup("agent", "c", {f"cockpit-agent-stream:{mine}": ">"}, count=1)
    assert me.xautoclaim(f"cockpit-agent-stream:{mine}", "agent", "c", 0)[0] is not None

    forbidden = [
        ("HSET", f"agents:{other}", "status", "offline"),
        ("EXPIRE", f"agents:{other}", "1"),
        ("GET", f"cockpit-agent-result:{other}:c1"),
        ("SET", f"cockpit-agent-result:{other}:c2", "forged"),
        ("EXISTS", f"cockpit-agent-result:{mine}:c1"),
        ("PUBLISH", f"cockpit-agent-response:{other}", "forged"),
        ("PUBLISH", f"cockpit-agent:{other}", "{}"),              # cannot command another agent
        ("XREADGROUP", "GROUP", "agent", "c", "STREAMS", f"cockpit-agent-stream:{other}", ">"),
        ("XADD", f"cockpit-agent-stream:{mine}", "*", "m", "forged"),
        ("EVAL", "return redis.call('SET', KEYS[1], 'x')", "1", f"agents:{other}"),
        ("EVAL", "return redis.call('PUBLISH', ARGV[1], 'x')", "0", f"cockpit-agent:{other}"),
        ("KEYS", "*"),
        ("SCAN", "0"),
        ("FLUSHALL",),
        ("CONFIG", "GET", "requirepass"),
        ("ACL", "LIST"),
        ("DEL", f"agents:{other}"),
    ]
    for command in forbidden:
        # NOPERM, or for a script "The user executing the script can't ..."
        with pytest.raises(redis.ResponseError, match=r"no permissions|can't (publish|access)"):
            me.execute_command(*command)
            raise AssertionError(f"allowed: {command}")
    pubsub = me.pubsub()
    with pytest.raises(redis.exceptions.NoPermissionError):
        pubsub.subscribe(f"cockpit-agent:{other}")
        pubsub.get_message(timeout=2)
    pubsub.close()

    # The other agent's data is untouched.
    assert admin.hget(f"agents:{other}", "status") == b"online"
    assert admin.get(f"cockpit-agent-result:{other}:c1") == b"secret result"
    assert admin.exists(f"cockpit-agent-result:{other}:c2") == 0
    # Redis kept a record of the attempts for the operator (ACL LOG merges repeats).
    objects = {entry["object"] for entry in denials(admin, username)}
    assert {f"agents:{other}", f"cockpit-agent:{other}", f"cockpit-agent-response:{other}",
            f"cockpit-agent-result:{other}:c2", f"cockpit-agent-stream:{other}", "flushall"} <= objects


def test_an_answer_the_acl_refuses_says_so_in_the_outbox_and_goes_out_once_allowed(acl_agent, redis_server,
                                                                                   make_backend):
    """The response channel taken out of the agent's ACL: its answer waits, and the outbox (and
    `outbox list`) says Redis refused it, with Redis's words, not 'no receiver'; `outbox retry`
    after the fix delivers it."""
    agent, username, _ = acl_agent
    agent_id = agent.env["AGENT_ID"]
    admin = redis_server.client()
    backend = make_backend(agent_id, secret=SECRET)
    assert backend.call("echo", {"message": "before"})["output"] == "before"
    admin.execute_command("ACL", "SETUSER", username, "clearselectors", f"(+publish &cockpit-agent:{agent_id})")

    command_id = backend.send("echo", {"message": "refused"})
    db = agent.env["OUTBOX_DB"]
    row = wait_for(lambda: (sql(db, "SELECT * FROM outbox WHERE command_id = ? AND last_error IS NOT NULL",
                                (command_id,)) or [None])[0], 15, message="the refusal on the outbox row")
    assert row["last_error"].startswith("Redis refused it: ") and "publish" in row["last_error"], row["last_error"]
    assert row["unheard_since"] is None and row["next_attempt_at"] > time.time() + 20
    listed = agent_py(agent.env, "outbox", "list")
    assert listed.returncode == 0 and "Redis refused it" in listed.stdout and "no receiver" not in listed.stdout
    assert backend.responses_for(command_id) == []

    admin.execute_command("ACL", "SETUSER", username, "clearselectors",
                          f"(+publish &cockpit-agent-response:{agent_id} &cockpit-agent:{agent_id})")
    assert agent_py(agent.env, "outbox", "retry").returncode == 0
    assert backend.wait(command_id, 15)["output"] == "refused"
    assert agent.terminate() == 0
