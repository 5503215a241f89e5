"""One agent per database: a second ``python agent.py`` on the same OUTBOX_DB refuses to start
(exit 78, one line naming the first), and the first is left to finish its work, answered once.
Before the lock the second one's start-up recovery answered the first's running docker_restart
"interrupted, not run again" while the first was running it, and both answered every echo."""

from __future__ import annotations

import os

import pytest

from conftest import agent_py as cli
from conftest import wait_for
from errors import DatabaseInUse
from outbox.owner import DatabaseLock, holder


def test_a_second_agent_on_the_same_database_exits_78_and_the_first_answers_once(
        agent_process, agent_env, redis_server, make_backend, fake_docker):
    fake_docker.behave("sleep 3")
    first = agent_process().start()
    first.wait_subscribed(redis_server)
    backend = make_backend(agent_env["AGENT_ID"])
    restart = backend.send("docker_restart")
    wait_for(fake_docker.calls, message="the restart to start")

    second = agent_process().start()
    assert second.proc.wait(20) == 78, second.log()
    lines = [line for line in second.log().splitlines() if line.strip()]
    naming = [line for line in lines if f"pid {first.proc.pid}" in line]
    assert len(naming) == 1, second.log()
    assert "another agent already uses the database" in naming[0] and agent_env["OUTBOX_DB"] in naming[0]
    assert "agent.py" in naming[0]  # what /proc/PID/cmdline says
    assert "Traceback" not in second.log()

    # The first agent finishes the restart and answers it, once, as a success.
    response = backend.wait(restart, 15)
    assert (response["status"], response["output"]) == ("success", "grafana"), response
    echo = backend.send("echo", {"message": "once"})
    assert backend.wait(echo)["output"] == "once"

    # The operator's commands work beside the running agent: they never take the lock.
    status = cli(agent_env, "status")
    assert status.returncode == 0, status.stdout + status.stderr
    assert "local:        0 queued, 0 running" in status.stdout
    history = cli(agent_env, "history")
    assert history.returncode == 0 and restart in history.stdout and " success " in history.stdout
    outbox = cli(agent_env, "outbox", "list")
    assert outbox.returncode == 0, outbox.stderr
    check = cli(agent_env, "check")
    assert check.returncode == 0, check.stdout + check.stderr
    assert f"ok    state: an agent (pid {first.proc.pid} (" in check.stdout, check.stdout

    # A last echo through the first agent: anything the second had answered would be in by now.
    assert backend.call("echo", {"message": "last"})["output"] == "last"
    for command_id in (restart, echo):
        assert len(backend.responses_for(command_id)) == 1, backend.responses_for(command_id)
    assert [c for c in fake_docker.calls() if c[0] == "restart"] == [["restart", "--", "grafana"]]
    assert first.proc.poll() is None
    assert first.terminate() == 0

    # Stopped, it let go of the lock: the next agent on this database starts, and check says
    # nothing about a holder.
    assert "an agent (pid" not in cli(agent_env, "check").stdout
    third = agent_process().start()
    third.wait_subscribed(redis_server)
    assert third.terminate() == 0


def test_the_lock_names_its_holder_and_is_free_again_once_released(tmp_path):
    db = str(tmp_path / "state" / "outbox.db")
    lock = DatabaseLock(db)
    lock.acquire()
    assert holder(db) == os.getpid()
    assert (tmp_path / "state" / "outbox.db.lock").read_text().strip() == str(os.getpid())
    with pytest.raises(DatabaseInUse, match=f"pid {os.getpid()} "):
        DatabaseLock(db).acquire()
    lock.release()
    assert holder(db) is None  # the stale pid left in the file is not taken for a holder
    again = DatabaseLock(db)
    again.acquire()
    again.release()
