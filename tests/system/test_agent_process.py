"""``python agent.py`` as the real process: registry and heartbeat, SIGTERM, Redis dying under
it, the agent itself SIGKILLed, and signed messages."""

import json
import signal
import subprocess
import sys
import time

import pytest

from conftest import ROOT, SECRET, wait_for


def registry(server, agent_id):
    try:
        return {k.decode(): v.decode() for k, v in server.client().hgetall(f"agents:{agent_id}").items()}
    except Exception:
        return {}


def outbox_count(env) -> int:
    """What an operator would run: sqlite3 <OUTBOX_DB> 'SELECT count(*) FROM outbox'."""
    out = subprocess.run(["sqlite3", env["OUTBOX_DB"], "SELECT count(*) FROM outbox"], capture_output=True, text=True)
    return int(out.stdout.strip() or 0)


def test_registry_heartbeat_and_clean_stop(agent_process, agent_env, redis_server):
    agent = agent_process().start()
    agent.wait_subscribed(redis_server)
    agent_id = agent_env["AGENT_ID"]
    fields = wait_for(lambda: registry(redis_server, agent_id).get("status") == "online" and registry(redis_server, agent_id))
    assert fields["capabilities"] == "docker_restart,echo,git_pull,git_status"
    assert fields["version"] and fields["hostname"] and fields["commands_executed"] == "0"
    assert abs(int(fields["started_at"]) - time.time()) < 30
    ttl = redis_server.client().ttl(f"agents:{agent_id}")
    assert 0 < ttl <= 3 * 2  # 3 x HEARTBEAT_INTERVAL
    first = int(fields["last_heartbeat"])
    wait_for(lambda: int(registry(redis_server, agent_id)["last_heartbeat"]) > first, 10, message="a newer heartbeat")
    assert agent.terminate() == 0
    assert registry(redis_server, agent_id)["status"] == "offline"
    assert "stopped;" in agent.log()


def test_registry_comes_back_after_redis_loses_its_data(agent_process, agent_env, redis_server, make_backend):
    agent = agent_process().start()
    agent.wait_subscribed(redis_server)
    agent_id = agent_env["AGENT_ID"]
    redis_server.client().flushall()
    wait_for(lambda: registry(redis_server, agent_id).get("status") == "online", 10, message="re-registration")


def test_sigterm_lets_a_running_command_finish(agent_process, agent_env, redis_server, make_backend, fake_docker):
    fake_docker.behave("sleep 1.5")
    agent = agent_process().start()
    agent.wait_subscribed(redis_server)
    backend = make_backend(agent_env["AGENT_ID"])
    command_id = backend.send("docker_restart")
    wait_for(lambda: fake_docker.calls(), message="the restart to start")
    assert agent.terminate() == 0
    response = backend.wait(command_id, 10)
    assert (response["status"], response["output"]) == ("success", "grafana")


def test_redis_killed_while_commands_run(agent_process, agent_env, redis_server, make_backend, fake_docker):
    fake_docker.behave("sleep 1")
    agent = agent_process().start()
    agent.wait_subscribed(redis_server)
    agent_id = agent_env["AGENT_ID"]
    backend = make_backend(agent_id)
    ids = [backend.send("docker_restart", {"container_name": name}) for name in ("grafana", "web-1")]
    ids += [backend.send("git_status")]
    wait_for(lambda: len(fake_docker.calls()) == 2, message="both restarts to start")
    redis_server.kill()
    # the answers wait in the outbox while Redis is away
    wait_for(lambda: outbox_count(agent_env) >= 2, 15, message="responses buffered in the outbox")
    assert not [r for r in backend.responses if r["command_id"] in ids[:2]]
    redis_server.start()  # an empty Redis: registry and subscriptions are gone
    for command_id in ids:
        backend.wait(command_id, 30)
    wait_for(lambda: outbox_count(agent_env) == 0, 15, message="the outbox to drain")
    wait_for(lambda: registry(redis_server, agent_id).get("status") == "online", 15, message="re-registration")
    agent.wait_subscribed(redis_server)
    assert backend.call("echo", {"message": "after"})["output"] == "after"
    assert sorted(r["command_id"] for r in backend.responses if r["command_id"] in ids) == sorted(ids)
    assert len(fake_docker.calls()) == 2


def test_agent_sigkilled_with_work_queued_and_running(agent_process, agent_env, redis_server, make_backend, fake_docker):
    env = {**agent_env, "WORKER_COUNT": "1"}
    fake_docker.behave("sleep 30")
    agent = agent_process(env).start()
    agent.wait_subscribed(redis_server)
    backend = make_backend(agent_env["AGENT_ID"])
    running = backend.send("docker_restart")
    wait_for(lambda: fake_docker.calls(), message="the restart to start")
    queued = [backend.send("git_status") for _ in range(3)]
    # echo runs nothing, so it is answered on arrival even while the only worker is busy
    assert backend.call("echo", {"message": "alive"})["output"] == "alive"
    wait_for(lambda: subprocess.run(["sqlite3", env["OUTBOX_DB"], "SELECT count(*) FROM commands WHERE state='queued'"],
                                    capture_output=True, text=True).stdout.strip() == "3", message="3 queued rows")
    agent.proc.send_signal(signal.SIGKILL)
    agent.proc.wait(10)
    fake_docker.behave("ok")
    agent_process(env).start()
    interrupted = backend.wait(running, 20)
    assert interrupted["status"] == "error" and interrupted["error"].startswith("interrupted:")
    for command_id in queued:
        assert backend.wait(command_id, 20)["status"] == "success"
    wait_for(lambda: outbox_count(env) == 0, 15, message="the outbox to drain")
    for command_id in [running, *queued]:
        assert len(backend.responses_for(command_id)) == 1
    assert len(fake_docker.calls()) == 1  # the interrupted restart was not run again


@pytest.fixture
def signed_agent(agent_process, agent_env, redis_server, make_backend):
    env = {**agent_env, "COCKPIT_SHARED_SECRET": SECRET}
    agent = agent_process(env).start()
    agent.wait_subscribed(redis_server)
    return agent, make_backend(agent_env["AGENT_ID"], secret=SECRET)


def test_signed_messages(signed_agent, fake_docker, redis_server):
    agent, backend = signed_agent
    assert backend.call("echo", {"message": "signed"})["output"] == "signed"

    unsigned = backend.message("docker_restart", command_id="unsigned")
    del unsigned["auth"]
    stale = backend.message("docker_restart", command_id="stale", timestamp=int(time.time()) - 600)
    stale["auth"] = {"signature": __import__("protocol").sign({k: v for k, v in stale.items() if k != "auth"}, SECRET)}
    tampered = backend.message("docker_restart", command_id="tampered")
    tampered["params"] = {"container_name": "web-1"}
    for message in (unsigned, stale, tampered):
        backend.publish(message)
    # refused and never answered (PROTOCOL.md), but logged
    for command_id, reason in [("unsigned", "no auth.signature"), ("stale", "at most 300 s is accepted"),
                               ("tampered", "does not match")]:
        wait_for(lambda: any(f"{command_id}: dropped, not answered: " in line and reason in line  # noqa: B023
                             for line in agent.log().splitlines()), 10, message=f"{command_id} logged")
    assert fake_docker.calls() == []
    assert [r for r in backend.responses if r["command_id"] in ("unsigned", "stale", "tampered")] == []

    # a refused message does not claim its command_id: the real, signed one still runs
    real = backend.message("docker_restart", command_id="unsigned")
    backend.publish(real)
    assert backend.wait("unsigned")["status"] == "success"
    # a replay of it is answered from the store, never run twice
    backend.publish(real)
    wait_for(lambda: len(backend.responses_for("unsigned")) == 2, message="the replay's answer")
    assert len(fake_docker.calls()) == 1
    assert SECRET not in agent.log()
    assert all(SECRET not in json.dumps(r) for r in backend.responses)


def test_a_repository_the_agent_cannot_write_is_named_at_start(agent_env, git_repos, tmp_path, redis_server):
    """Under the unit (ProtectSystem=strict) a repository left out of ReadWritePaths= is
    read-only for the agent, while check, run outside the service, finds it writable: git_pull
    then failed with 'Read-only file system' and nothing had said so before. The agent runs
    here in a private mount namespace with the repository bind-mounted read-only, as systemd
    would leave it."""
    repo = git_repos.clone
    log_path = tmp_path / "agent.log"
    script = (f"mount --make-rprivate / && mount --bind {repo} {repo} && mount -o remount,bind,ro {repo} && "
              f"exec {sys.executable} {ROOT / 'agent.py'} run")
    with open(log_path, "w") as log:
        proc = subprocess.Popen(["unshare", "--mount", "sh", "-c", script], env=agent_env, stdout=log, stderr=log,
                                stdin=subprocess.DEVNULL)
    try:
        wait_for(lambda: "started:" in log_path.read_text() or proc.poll() is not None, 30, message="the start")
        wait_for(lambda: "is not writable here" in log_path.read_text(), 5, message="the warning")
        text = log_path.read_text()
        assert f"repository {repo} is not writable here (read-only file system)" in text, text
        assert f"add ReadWritePaths={repo} (systemctl edit cockpit-agent)" in text
    finally:
        proc.terminate()
        proc.wait(30)

