"""A command's timeout counts from the backend's timestamp, less a margin, so that its error
reaches a backend that still waits (it waits as long as the timeout, from its PUBLISH); a
command whose deadline passed while it waited is not started. Timeouts are scaled down here:
DOCKER_TIMEOUT=6 stands for the backend's 60 s wait."""

import json
import os
import socket
import subprocess
import time

import pytest

from conftest import in_time, sql
from handlers import Action, execute
from handlers.base import ANSWER_MARGIN, answer_deadline
from outbox import Store
from protocol import SIGNATURE_MAX_AGE

SLOW = Action(argv=("sleep", "30"), timeout=30, timeout_setting="COMMAND_TIMEOUT")


def call_at(backend, command, params=None, timestamp=None, timeout=20.0, **fields):
    """Send with the backend's timestamp ``timestamp``; the response and when it arrived."""
    message = backend.message(command, params, **fields)
    if timestamp is not None:
        message["timestamp"] = timestamp
    backend.publish(message)
    response = backend.wait(message["command_id"], timeout)
    return response, time.time()


def test_a_docker_restart_that_waited_is_answered_before_the_backend_gives_up(running_agent, make_backend,
                                                                             fake_docker):
    agent = running_agent(DOCKER_TIMEOUT=6)
    backend = make_backend(agent.config.agent_id)
    fake_docker.behave("sleep 30")

    def attempt():
        sent = time.time() - 3  # the backend published it 3 s ago: it waits 3 s more
        response, arrived = call_at(backend, "docker_restart", timestamp=sent)
        return response, arrived - sent

    response, attempts = in_time(attempt, 6, "answered after the backend's PUBLISH:")
    assert response["status"] == "error"
    assert response["error"].startswith("timed out after ")
    assert ("(DOCKER_TIMEOUT=6 s counted from the command's timestamp, less a 1.5 s margin so that this answer "
            "reaches the backend while it still waits); the process was killed") in response["error"]
    assert fake_docker.calls() == [["restart", "--", "grafana"]] * attempts


@pytest.fixture
def silent_origin(git_repos):
    """origin is an http server that accepts the connection and never answers: git pull hangs."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(8)
    git_repos.git("remote", "set-url", "origin", f"http://127.0.0.1:{server.getsockname()[1]}/repo.git",
                  cwd=git_repos.clone)
    yield server
    server.close()


def test_a_hanging_git_pull_is_answered_before_the_backend_gives_up(running_agent, make_backend, silent_origin):
    agent = running_agent(COMMAND_TIMEOUT=8)
    backend = make_backend(agent.config.agent_id)

    def attempt():
        sent = time.time() - 4
        response, arrived = call_at(backend, "git_pull", timestamp=sent)
        return response, arrived - sent

    response, _ = in_time(attempt, 8, "answered after the backend's PUBLISH:")
    assert response["status"] == "error"
    assert "(COMMAND_TIMEOUT=8 s counted from the command's timestamp, less a 2 s margin" in response["error"]


def test_a_command_whose_backend_stopped_waiting_is_not_started(running_agent, make_backend, fake_docker, git_repos):
    agent = running_agent(DOCKER_TIMEOUT=6)
    backend = make_backend(agent.config.agent_id)
    response, _ = call_at(backend, "docker_restart", timestamp=time.time() - 10)  # not int(): floored, it was 11 s old at times
    assert response["status"] == "error" and response["output"] is None
    assert response["error"].startswith("not started: the backend stopped waiting 4.")
    assert response["error"].endswith(
        "(DOCKER_TIMEOUT=6 s counted from the command's timestamp; it arrived 0.0 s ago); nothing was run")
    assert fake_docker.calls() == []

    # The same with the seed's defaults: a git pull 40 s old (COMMAND_TIMEOUT 30).
    git_repos.commit("news")
    counter = git_repos.count_pulls_hook()
    response, _ = call_at(backend, "git_pull", timestamp=int(time.time()) - 40)
    assert response["error"].startswith("not started: the backend stopped waiting 1")
    assert "COMMAND_TIMEOUT=30 s" in response["error"]
    assert not counter.exists() and not (git_repos.clone / "news").exists()
    # Within the margin is too late too: the answer could not arrive in time.
    response, _ = call_at(backend, "docker_restart", timestamp=time.time() - 5)
    assert response["error"].startswith("not started: the backend stops waiting in ")
    assert "within the 1.5 s this answer needs to reach it" in response["error"]
    assert fake_docker.calls() == []
    # A timely one runs.
    fake_docker.behave("ok")
    assert call_at(backend, "docker_restart")[0]["status"] == "success"


def test_without_a_timestamp_the_timeout_counts_from_arrival(running_agent, make_backend, fake_docker):
    agent = running_agent(DOCKER_TIMEOUT=4)
    backend = make_backend(agent.config.agent_id)
    fake_docker.behave("sleep 30")

    def attempt():
        message = backend.message("docker_restart")
        del message["timestamp"]
        sent = time.time()
        backend.publish(message)
        response = backend.wait(message["command_id"], 20)
        return response, time.time() - sent

    response, _ = in_time(attempt, 4, "answered after its PUBLISH:")
    assert "(DOCKER_TIMEOUT=4 s counted from its arrival (it has no usable timestamp), less a 1 s margin" \
        in response["error"]


@pytest.mark.parametrize("timestamp, origin", [
    (None, "its arrival (it has no usable timestamp)"),
    ("1795870000", "its arrival (it has no usable timestamp)"),
    (True, "its arrival (it has no usable timestamp)"),
    (float("nan"), "its arrival (it has no usable timestamp)"),
    (float("inf"), "its arrival (it has no usable timestamp)"),
    (10**400, "its arrival (it has no usable timestamp)"),
    (1000.0 + 3600, "its arrival (its timestamp is in the future)"),
])
def test_hostile_timestamps_count_from_arrival(timestamp, origin):
    deadline = answer_deadline(SLOW, timestamp, 1000.0)
    assert (deadline.ends, deadline.margin, deadline.origin) == (1030.0, ANSWER_MARGIN, origin)


def test_plausible_timestamps_are_used_and_old_ones_clamped_to_the_signature_window():
    assert answer_deadline(SLOW, 990, 1000.0).ends == 1020.0
    assert answer_deadline(SLOW, -10**9, 1000.0).ends == 1000.0 - SIGNATURE_MAX_AGE + 30
    # A short timeout keeps most of itself: the margin is at most a quarter of it.
    assert answer_deadline(Action(argv=("x",), timeout=2), 1000, 1000.0).at == 1001.5
    # Nothing to wait for: an echo, or a custom action without a timeout.
    assert answer_deadline(Action(output="pong"), 1000, 1000.0) is None
    assert answer_deadline(Action(argv=("x",)), 1000, 1000.0) is None


def test_execute_runs_only_until_the_deadline():
    deadline = answer_deadline(SLOW, time.time() - 27.5, time.time())  # 0.5 s left before the margin
    start = time.monotonic()
    result = execute(SLOW, deadline=deadline)
    assert time.monotonic() - start < 3
    assert result.error.startswith("timed out after 0.")
    late = answer_deadline(SLOW, time.time() - 31, time.time())
    result = execute(Action(argv=("touch", "/nonexistent/must-not-run"), timeout=30), deadline=late)
    assert result.error.startswith("not started: the backend stopped waiting 1.")


def test_a_queued_command_recovered_after_a_restart_runs_with_its_full_timeout(agent_env, running_agent,
                                                                                 make_backend, fake_docker):
    """PROTOCOL.md: queued ones run at start. The backend stopped waiting when the agent went
    down, so a recovered command has no deadline: it runs, answered by its result key."""
    os.makedirs(os.path.dirname(agent_env["OUTBOX_DB"]), exist_ok=True)
    store = Store(agent_env["OUTBOX_DB"])
    store.accept("left-queued", "docker_restart", {"container_name": "web-1"}, "cockpit-backend")
    store.close()
    sql(agent_env["OUTBOX_DB"], "UPDATE commands SET received_at = received_at - 3600")
    agent = running_agent()
    backend = make_backend(agent.config.agent_id)
    client = backend.server.client()
    key = f"cockpit-agent-result:{agent.config.agent_id}:left-queued"

    def stored():
        value = client.get(key)
        return json.loads(value) if value else None

    from conftest import wait_for

    response = wait_for(stored, 15, message="the recovered command's result")
    assert (response["status"], response["output"]) == ("success", "web-1")
    assert fake_docker.calls() == [["restart", "--", "web-1"]]
    assert subprocess.run(["sqlite3", agent_env["OUTBOX_DB"], "SELECT state FROM commands"],
                          capture_output=True, text=True).stdout.strip() == "done"


def test_a_stream_command_that_waited_for_the_agent_still_runs(running_agent, make_backend, fake_docker,
                                                               redis_server):
    """The stream exists so that commands wait for an agent that is away: no deadline there."""
    agent = running_agent(COMMAND_STREAM="on", DOCKER_TIMEOUT=6)
    backend = make_backend(agent.config.agent_id)
    message = backend.message("docker_restart", timestamp=int(time.time()) - 120)
    redis_server.client().xadd(f"cockpit-agent-stream:{agent.config.agent_id}", {"message": json.dumps(message)})
    response = backend.wait(message["command_id"], 20)
    assert (response["status"], response["output"]) == ("success", "grafana")
    assert fake_docker.calls() == [["restart", "--", "grafana"]]
