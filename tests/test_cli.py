"""The operator CLI (``python agent.py check|send|status|outbox|history``) against a running
agent and a real redis-server. ``check`` and ``send`` run as child processes, the way an
operator runs them; the SQLite-reading commands run in-process through ``agent.main``."""

from __future__ import annotations

import io
import json
import subprocess
import sys
import threading
import time
import uuid

import pytest

import agent as agent_module
import protocol
from conftest import PASSWORD, ROOT, SECRET, GitRepos, outbox_table, stuck_response, wait_for
from conftest import agent_py as cli

# -- check --------------------------------------------------------------------------------------


def test_check_passes_and_hides_credentials_in_the_origin_url(agent_env, git_repos):
    GitRepos.git("remote", "set-url", "origin", "https://deploy:s3cr3t-token@git.example.com/app.git",
                 cwd=git_repos.clone)
    result = cli(agent_env, "check")
    assert result.returncode == 0, result.stdout + result.stderr
    lines = result.stdout.splitlines()
    names = [line.split(":", 1)[0].split(None, 1)[1] for line in lines]
    assert names == ["configuration", "commands", "redis", f"repository {git_repos.clone}", "docker", "state"]
    assert all(line.startswith("ok    ") for line in lines), lines
    assert "https://deploy:***@git.example.com/app.git" in result.stdout
    assert "s3cr3t-token" not in result.stdout + result.stderr
    assert PASSWORD not in result.stdout + result.stderr


def test_check_reports_every_failure_and_exits_1(agent_env, tmp_path):
    not_a_repo = tmp_path / "plain-dir"
    not_a_repo.mkdir()
    no_origin = tmp_path / "no-origin"
    GitRepos.git("init", "-q", str(no_origin), cwd=tmp_path)
    env = {**agent_env, "REDIS_PASSWORD": "wrong-password-123", "DOCKER_BIN": str(tmp_path / "no-docker"),
           "GIT_REPO_PATH": f"{not_a_repo},{no_origin},{tmp_path / 'missing'}"}
    result = cli(env, "check")
    assert result.returncode == 1
    out = result.stdout
    assert "FAIL  redis:" in out and "authentication failed" in out
    assert f"FAIL  repository {not_a_repo}: not a git work tree" in out
    assert f"FAIL  repository {no_origin}: git work tree without an origin remote" in out
    assert f"FAIL  repository {tmp_path / 'missing'}: does not exist" in out
    assert "FAIL  docker:" in out
    assert "ok    configuration:" in out
    assert "wrong-password-123" not in out + result.stderr


def test_check_reports_a_binary_it_may_not_run_instead_of_crashing(agent_env, git_repos, tmp_path):
    # Found by running the installed agent under a real systemd: `check` died with a traceback
    # (PermissionError) where docker could not be run; the handlers already said why.
    not_executable = tmp_path / "docker"
    not_executable.write_text("#!/bin/sh\necho never\n")
    not_executable.chmod(0o644)
    result = cli({**agent_env, "DOCKER_BIN": str(not_executable)}, "check")
    assert result.returncode == 1, result.stdout + result.stderr
    assert f"FAIL  docker: {not_executable} version failed: cannot run {not_executable}: Permission denied" \
        in result.stdout
    assert "Traceback" not in result.stderr
    assert "ok    state:" in result.stdout  # the checks after it still ran


def test_check_says_when_the_unit_would_not_let_the_service_write_a_repository(agent_env, git_repos, tmp_path):
    # check runs outside the service's sandbox; under ProtectSystem=strict a repository left out
    # of ReadWritePaths= is read-only for the service and git_pull there fails. A stand-in for
    # systemctl (no systemd runs here) answers `systemctl show` as an installed unit would.
    fake = tmp_path / "fakebin"
    fake.mkdir()

    def unit(read_write: str) -> dict:
        (fake / "systemctl").write_text("#!/bin/sh\nprintf '%s\\n' LoadState=loaded ProtectSystem=strict "
                                        f"'ReadWritePaths={read_write}' StateDirectory=cockpit-agent\n")
        (fake / "systemctl").chmod(0o755)
        return {**agent_env, "PATH": f"{fake}:{agent_env.get('PATH', '/usr/bin:/bin')}"}

    left_out = cli(unit("-/opt/app/config"), "check")
    assert left_out.returncode == 1, left_out.stdout + left_out.stderr
    assert (f"FAIL  repository {git_repos.clone}: git work tree, but the unit cockpit-agent.service does not let "
            f"the service write it, so git_pull there will fail: systemctl edit cockpit-agent.service, "
            f"add ReadWritePaths={git_repos.clone}") in left_out.stdout
    listed = cli(unit(f"-/opt/app/config {git_repos.clone.parent}"), "check")
    assert f"ok    repository {git_repos.clone}: git work tree" in listed.stdout, listed.stdout


def test_check_over_a_unix_socket_names_the_socket(agent_env, unix_redis_server):
    result = cli({**agent_env, "REDIS_URL": f"unix://{unix_redis_server.socket}"}, "check")
    assert f"ok    redis: {unix_redis_server.socket} as default" in result.stdout, result.stdout + result.stderr


def test_check_with_a_bad_setting_names_it_and_exits_78(agent_env):
    result = cli({**agent_env, "REDIS_PORT": "sixty"}, "check")
    assert result.returncode == 78
    assert result.stdout.startswith("FAIL  configuration: REDIS_PORT: expected a whole number")


# -- send ---------------------------------------------------------------------------------------


def test_send_echo_signed_round_trip(running_agent, agent_env):
    running_agent(COCKPIT_SHARED_SECRET=SECRET)
    result = cli({**agent_env, "COCKPIT_SHARED_SECRET": SECRET}, "send", "echo", "message=hi")
    assert result.returncode == 0, result.stderr
    response = json.loads(result.stdout)
    assert response["status"] == "success" and response["output"] == "hi" and response["error"] is None
    assert set(response) >= {"command_id", "status", "output", "error", "execution_time_ms", "timestamp"}

    # Unsigned, it is refused and never answered (PROTOCOL.md): send waits in vain.
    unsigned = cli(agent_env, "send", "echo", "message=hi", "--timeout", "2")
    assert unsigned.returncode == 3 and unsigned.stdout == ""
    assert "no response to" in unsigned.stderr
    assert SECRET not in result.stdout + result.stderr + unsigned.stdout + unsigned.stderr


def test_send_refuses_a_parameter_the_command_does_not_take(running_agent, agent_env, fake_docker):
    # Found trying the installed agent by hand: `send docker_restart container=nope` restarted
    # the default container, because the agent ignores unknown parameters (forward compatible).
    agent = running_agent()
    result = cli(agent_env, "send", "docker_restart", "container=nope")
    assert result.returncode == 2, result.stdout + result.stderr
    assert "docker_restart takes container_name, not container" in result.stderr
    assert "Nothing was sent" in result.stderr and result.stdout == ""
    store = agent.open_store()
    assert store.counts() == {"queued": 0, "running": 0, "done": 0, "outbox": 0}
    store.close()
    assert fake_docker.calls() == []
    right = cli(agent_env, "send", "docker_restart", "container_name=grafana")
    assert right.returncode == 0, right.stderr
    assert [call[-1] for call in fake_docker.calls()] == ["grafana"]
    # Another agent (--agent) may be a newer version that takes more: not judged here.
    other = cli(agent_env, "send", "docker_restart", "container=nope", "--agent", "other-host", "--timeout", "2")
    assert other.returncode == 3 and "no agent is subscribed to cockpit-agent:other-host" in other.stderr


def test_send_exits_1_on_an_error_response_and_sends_typed_params(running_agent, agent_env):
    running_agent()
    refused = cli(agent_env, "send", "git_pull", "repository_path=/etc", "branch=main")
    assert refused.returncode == 1
    assert "is not whitelisted" in json.loads(refused.stdout)["error"]
    typed = cli(agent_env, "send", "echo", "message:=42")
    assert typed.returncode == 1
    assert "message must be a string, got int" in json.loads(typed.stdout)["error"]
    bad = cli(agent_env, "send", "echo", "message")
    assert bad.returncode == 2 and "expected key=value" in bad.stderr


def test_send_to_an_agent_nobody_runs_exits_3_at_once(agent_env, redis_server):
    start = time.monotonic()
    result = cli(agent_env, "send", "echo", "--agent", "nobody-here", "--timeout", "30")
    assert result.returncode == 3
    assert "no agent is subscribed to cockpit-agent:nobody-here" in result.stderr
    assert time.monotonic() - start < 25  # it did not sit out the timeout


def test_send_reads_the_result_key_when_the_reply_was_missed(agent_env, redis_server):
    """A stand-in agent that stores its response at the result key but never publishes it."""
    agent_id = f"fake-agent-{uuid.uuid4().hex[:6]}"
    subscribed, done = threading.Event(), threading.Event()

    def fake_agent():
        pubsub = redis_server.client().pubsub(ignore_subscribe_messages=True)
        pubsub.subscribe(f"cockpit-agent:{agent_id}")
        while not pubsub.subscribed:
            pubsub.get_message(timeout=0.1)
        subscribed.set()
        while not done.is_set():
            message = pubsub.get_message(timeout=0.2)
            if message and message["type"] == "message":
                command = json.loads(message["data"])
                response = protocol.response(command["command_id"], "success", "from the key", None, 1, agent_id)
                redis_server.client().set(f"cockpit-agent-result:{agent_id}:{command['command_id']}",
                                          protocol.encode(response))
        pubsub.close()

    thread = threading.Thread(target=fake_agent, daemon=True)
    thread.start()
    try:
        assert subscribed.wait(10)
        result = cli(agent_env, "send", "echo", "--agent", agent_id, "--timeout", "1")
    finally:
        done.set()
        thread.join(5)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["output"] == "from the key"
    assert "the reply was missed on the channel" in result.stderr


# -- status, history ----------------------------------------------------------------------------


def test_status_and_history_of_a_running_then_stopped_agent(running_agent, make_backend, main, redis_server):
    agent = running_agent()
    backend = make_backend(agent.config.agent_id)
    assert backend.call("echo", {"message": "one"})["status"] == "success"
    assert backend.call("git_pull", {"repository_path": "/etc"})["status"] == "error"
    wait_for(lambda: agent.heartbeat.last_heartbeat is not None, message="a heartbeat")

    # A published response leaves the outbox once confirmed (within Flusher.delete_after).
    wait_for(lambda: "0 waiting in outbox" in main("status")[1], message="the outbox to be empty")
    code, out, _ = main("status")
    assert code == 0, out
    assert f"agent:        {agent.config.agent_id}" in out
    assert "registry:     online; heartbeat" in out and "(online for the backend)" in out
    assert "local:        0 queued, 0 running, 2 done; 0 waiting in outbox" in out

    code, out, _ = main("history", "-n", "5")
    assert code == 0
    rows = out.splitlines()[1:]
    assert len(rows) == 2
    assert " echo " in rows[0] and " success " in rows[0]
    assert " git_pull " in rows[1] and " error " in rows[1] and "not whitelisted" in rows[1]

    agent.stop_requested.set()
    agent.shutdown()
    code, out, _ = main("status")
    assert code == 1
    assert "registry:     offline;" in out

    redis_server.kill()
    code, out, _ = main("status")
    assert code == 69
    assert "unreachable" in out and "local:        0 queued, 0 running, 2 done" in out
    redis_server.start()  # so the fixture's second shutdown does not wait on a dead server


# -- outbox -------------------------------------------------------------------------------------


def test_outbox_list_show_and_retry_on_a_running_agent(running_agent, make_backend, main, redis_server):
    agent = running_agent()
    command_id, row_id = stuck_response(agent, redis_server)

    code, out, _ = main("outbox", "list")
    assert code == 0
    assert command_id in out and "1 waiting" in out and "no receiver" in out

    code, out, _ = main("outbox", "show", str(row_id))
    assert code == 0
    assert f"command_id:      {command_id}" in out
    assert '"output": "waiting"' in out and "attempts:" in out

    assert main("outbox", "show", "999999")[0] == 1

    backend = make_backend(agent.config.agent_id)
    code, out, _ = main("outbox", "retry")
    assert code == 0 and "1 message(s) due now" in out
    # Without the retry this response would wait an hour; the running agent sends it now.
    assert backend.wait(command_id, timeout=15)["output"] == "waiting"
    wait_for(lambda: not outbox_table(agent.config.outbox_db), message="the outbox to empty")
    code, out, _ = main("outbox")
    assert code == 0 and "the outbox is empty" in out


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_outbox_purge_asks_first(running_agent, main, redis_server, monkeypatch):
    agent = running_agent()
    command_id, row_id = stuck_response(agent, redis_server)

    code, _, err = main("outbox", "purge")  # stdin is not a terminal: refuse rather than guess
    assert code == 1 and "add --yes" in err
    monkeypatch.setattr("sys.stdin", _Terminal("n\n"))
    code, out, _ = main("outbox", "purge")
    assert code == 1 and "nothing purged" in out
    assert [r["id"] for r in outbox_table(agent.config.outbox_db)] == [row_id]

    monkeypatch.setattr("sys.stdin", _Terminal("y\n"))
    code, out, _ = main("outbox", "purge", str(row_id))
    assert code == 0 and "purged 1 message(s)" in out
    assert outbox_table(agent.config.outbox_db) == []

    stuck_response(agent, redis_server)
    code, out, _ = main("outbox", "purge", "--yes")
    assert code == 0 and "purged 1 message(s)" in out
    assert outbox_table(agent.config.outbox_db) == []


@pytest.mark.parametrize("command", ["run", "check", "send", "status", "outbox", "history"])
def test_every_command_has_help_with_exit_codes(command, main):
    with pytest.raises(SystemExit) as exit_info:
        main(command, "--help")
    assert exit_info.value.code == 0


def test_help_documents_the_exit_codes(capsys):
    with pytest.raises(SystemExit):
        agent_module.main(["status", "--help"])
    out = capsys.readouterr().out
    for code in ("0 ", "1 ", "2 ", "3 ", "69 ", "78 "):
        assert f"\n  {code}" in out


def test_send_without_redis_exits_69(agent_env):
    from conftest import free_port

    result = cli({**agent_env, "REDIS_PORT": str(free_port())}, "send", "echo", "--timeout", "5")
    assert result.returncode == 69
    assert "cannot reach Redis at 127.0.0.1:" in result.stderr
    assert PASSWORD not in result.stderr


def test_as_root_the_database_commands_run_as_the_files_owner(agent_env):
    """Root must not leave root-owned -wal/-shm files that would lock the agent out of its database."""
    import os
    import shutil
    import tempfile

    from outbox import Message, Store

    nobody = 65534
    base = tempfile.mkdtemp(prefix="ca-owner-", dir="/tmp")  # traversable by nobody, unlike pytest's tmp
    try:
        os.chmod(base, 0o755)
        state = os.path.join(base, "state")
        store = Store(os.path.join(state, "outbox.db"))
        store.enqueue(Message("cockpit-agent-response:x", "{}", "cmd-1", None))
        store.close()
        for path in [state, *(os.path.join(state, name) for name in os.listdir(state))]:
            os.chown(path, nobody, nobody)
        env = {**agent_env, "OUTBOX_DB": os.path.join(state, "outbox.db")}
        retried = cli(env, "outbox", "retry")
        assert retried.returncode == 0 and "1 message(s) due now" in retried.stdout, retried.stderr
        listed = cli(env, "outbox", "list")
        assert listed.returncode == 0 and "cmd-1" in listed.stdout
        probe = subprocess.run(
            [sys.executable, "-c", "import os, cli.common, config; cli.common.open_db(config.load().outbox_db); print(os.geteuid(), os.getegid())"],
            cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
        assert probe.stdout.split() == [str(nobody), str(nobody)], probe.stderr
    finally:
        shutil.rmtree(base)
