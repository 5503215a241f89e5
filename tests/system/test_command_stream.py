"""The durable command stream (COMMAND_STREAM=on): commands XADDed while the agent is away all
run once it is back, pending entries are reclaimed, and a command sent both ways runs once."""

from __future__ import annotations

import json

from conftest import wait_for


def stream_env(agent_env):
    return {**agent_env, "COMMAND_STREAM": "on"}


def xadd(server, agent_id: str, message: dict) -> bytes:
    return server.client().xadd(f"cockpit-agent-stream:{agent_id}", {"message": json.dumps(message)}, maxlen=10000)


def pending(server, agent_id: str) -> int:
    try:
        return server.client().xpending(f"cockpit-agent-stream:{agent_id}", "cockpit-agent")["pending"]
    except Exception:
        return -1


def test_commands_xadded_while_the_agent_is_down_all_run_once(agent_env, agent_process, redis_server, make_backend,
                                                             fake_docker):
    env = stream_env(agent_env)
    agent_id = env["AGENT_ID"]
    backend = make_backend(agent_id)
    # Never started before: the group does not exist yet; entries written now must still run.
    early = backend.message("echo", {"message": "before the first start"})
    xadd(redis_server, agent_id, early)
    agent = agent_process(env).start()
    agent.wait_subscribed(redis_server)
    assert backend.wait(early["command_id"])["output"] == "before the first start"

    assert agent.terminate() == 0
    sent = []
    for i in range(6):
        if i % 2:
            message = backend.message("docker_restart", {"container_name": "grafana"})
        else:
            message = backend.message("echo", {"message": f"while away {i}"})
        xadd(redis_server, agent_id, message)
        sent.append(message)
    # A pub/sub publish now reaches no one: that is why the stream exists.
    assert backend.publish(backend.message("echo")) == 0

    agent = agent_process(env).start()
    for message in sent:
        assert backend.wait(message["command_id"], 30)["status"] == "success"
    wait_for(lambda: pending(redis_server, agent_id) == 0, 15, message="every entry acknowledged")
    assert len(fake_docker.calls()) == 3
    for message in [early, *sent]:
        assert len(backend.responses_for(message["command_id"])) == 1
    assert agent.terminate() == 0


def test_pending_entries_of_a_crashed_reader_are_reclaimed(agent_env, agent_process, redis_server, make_backend):
    env = stream_env(agent_env)
    agent_id = env["AGENT_ID"]
    key = f"cockpit-agent-stream:{agent_id}"
    backend = make_backend(agent_id)
    client = redis_server.client()
    client.xgroup_create(key, "cockpit-agent", id="0", mkstream=True)
    message = backend.message("echo", {"message": "read, never acknowledged"})
    xadd(redis_server, agent_id, message)
    # What an agent killed between XREADGROUP and its SQLite commit leaves behind: a pending entry.
    read = client.xreadgroup("cockpit-agent", agent_id, {key: ">"}, count=10)
    assert len(read[0][1]) == 1 and pending(redis_server, agent_id) == 1

    agent = agent_process(env).start()
    assert backend.wait(message["command_id"], 30)["output"] == "read, never acknowledged"
    wait_for(lambda: pending(redis_server, agent_id) == 0, 15, message="the reclaimed entry acknowledged")
    assert "reclaiming 1 pending stream entries" in agent.log()
    assert len(backend.responses_for(message["command_id"])) == 1
    assert agent.terminate() == 0


def test_a_command_sent_both_ways_runs_once_and_is_answered_once(running_agent, redis_server, make_backend,
                                                                fake_docker):
    agent = running_agent(COMMAND_STREAM="on")
    agent_id = agent.config.agent_id
    backend = make_backend(agent_id)
    messages = [backend.message("docker_restart", {"container_name": "web-1"}) for _ in range(5)]
    for i, message in enumerate(messages):
        # Both orders: stream first, pub/sub first.
        if i % 2:
            xadd(redis_server, agent_id, message)
            backend.publish(message)
        else:
            backend.publish(message)
            xadd(redis_server, agent_id, message)
    for message in messages:
        assert backend.wait(message["command_id"], 30)["status"] == "success"
    wait_for(lambda: pending(redis_server, agent_id) == 0, 15, message="every entry acknowledged")
    wait_for(lambda: agent.open_store().counts()["outbox"] == 0, 15, message="the outbox to drain")
    assert len(fake_docker.calls()) == 5
    for message in messages:
        assert len(backend.responses_for(message["command_id"])) == 1, "a twin must not get a second answer"

    # A backend retry by pub/sub long after is still answered from the stored response.
    agent.stream_twins.window = 0.0
    backend.publish(messages[0])
    wait_for(lambda: len(backend.responses_for(messages[0]["command_id"])) == 2, 15)
    assert len(fake_docker.calls()) == 5


def test_a_full_disk_leaves_stream_commands_pending_until_they_can_be_kept(tmp_path, agent_env, agent_process,
                                                                        redis_server, make_backend):
    import subprocess

    from test_faults import _fill

    mount = tmp_path / "tiny"
    mount.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mount)], check=True)
    try:
        env = {**stream_env(agent_env), "OUTBOX_DB": str(mount / "outbox.db")}
        agent_id = env["AGENT_ID"]
        backend = make_backend(agent_id)
        agent = agent_process(env).start()
        agent.wait_subscribed(redis_server)
        filler = _fill(mount)
        # Pages SQLite already holds may take a few; then an entry must stay pending, unanswered.
        waiting = None
        for i in range(300):
            message = backend.message("echo", {"message": f"full-{i}"})
            xadd(redis_server, agent_id, message)
            if not wait_for(lambda m=message: backend.responses_for(m["command_id"])
                            or "stream entry stays pending" in agent.log(), 20):
                continue
            if not backend.responses_for(message["command_id"]):
                waiting = message
                break
            assert backend.responses_for(message["command_id"])[0]["status"] == "success"
        assert waiting is not None, "the agent never ran out of space"
        assert pending(redis_server, agent_id) >= 1
        filler.unlink()
        response = backend.wait(waiting["command_id"], 40)
        assert response["status"] == "success" and response["output"] == waiting["params"]["message"]
        wait_for(lambda: pending(redis_server, agent_id) == 0, 20, message="the entry acknowledged")
        assert len(backend.responses_for(waiting["command_id"])) == 1
        assert agent.terminate() == 0
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)
