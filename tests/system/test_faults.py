"""Single faults, each injected for real: a flood past QUEUE_MAX, huge output, a command that
hangs with a grandchild holding its pipe, a full disk under the database, and a Redis that dies
right after a PUBLISH."""

from __future__ import annotations

import inspect
import json
import os
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest
from redis._parsers import _RESP3Parser
from redis.connection import AbstractConnection

from conftest import wait_for


def rows(db: str) -> dict[str, dict]:
    conn = sqlite3.connect(db, timeout=10)
    conn.row_factory = sqlite3.Row
    try:
        return {r["command_id"]: dict(r) for r in conn.execute("SELECT * FROM commands")}
    finally:
        conn.close()


# -- back-pressure and the output cap -----------------------------------------------------------


def test_queue_full_answers_busy_at_once_and_runs_the_rest(running_agent, make_backend, fake_docker):
    fake_docker.behave("sleep 4")
    agent = running_agent(QUEUE_MAX=2, WORKER_COUNT=1)
    backend = make_backend(agent.config.agent_id)
    blocker = backend.send("docker_restart", {"container_name": "grafana"})
    wait_for(lambda: fake_docker.calls(), 15, message="the blocking docker restart to start")
    queued = [backend.send("git_status") for _ in range(2)]
    wait_for(lambda: agent.pool.pending() == 2, 10, message="two commands queued")
    refused = backend.send("git_status")

    busy = backend.wait(refused, 3)  # answered while the worker is still blocked
    assert not backend.responses_for(blocker), "the busy answer should not wait for the queue"
    assert busy["status"] == "error"
    assert busy["error"].startswith("busy:") and "QUEUE_MAX=2" in busy["error"]
    # Recorded like any refusal, so the id is known from now on (see the replay below).
    row = wait_for(lambda: rows(agent.config.outbox_db).get(refused), 5, message="the refusal recorded")
    assert (row["state"], row["status"], row["command"]) == ("done", "error", "git_status")
    assert json.loads(row["response"])["error"] == busy["error"] and row["started_at"] is None
    # echo needs no worker: the health check is answered even with the queue full
    assert backend.call("echo", {"message": "alive"}, timeout=3)["output"] == "alive"
    # a command with bad parameters gets its real error, not "busy"
    assert backend.call("docker_restart", {"container_name": "postgres"}, timeout=3)["error"].startswith(
        "container_name 'postgres' is not whitelisted")

    assert backend.wait(blocker, 20)["status"] == "success"
    assert [backend.wait(cid, 20)["status"] for cid in queued] == ["success", "success"]
    # The backend never sends an id again (it makes a new one), so the same id again is a
    # replay (a captured signed command, after the backend gave up on it): answered with the
    # stored busy answer, never run, now that there is room.
    backend.send("git_status", command_id=refused)
    again = wait_for(lambda: backend.responses_for(refused)[1:], 15, message="the replay's answer")[0]
    assert again == busy
    assert rows(agent.config.outbox_db)[refused]["started_at"] is None


def test_output_is_capped_head_and_tail_with_the_full_output_kept(running_agent, make_backend):
    agent = running_agent(OUTPUT_LIMIT=256)
    backend = make_backend(agent.config.agent_id)
    message = "HEAD-" + "x" * 20000 + "-TAIL"
    response = backend.call("echo", {"message": message})
    assert response["status"] == "success"
    assert response["truncated"] is True and response["output_size"] == len(message)
    assert response["output"].startswith("HEAD-") and response["output"].endswith("-TAIL")
    assert len(response["output"]) < 400
    assert "characters omitted" in response["output"]
    stored = wait_for(lambda: rows(agent.config.outbox_db)[response["command_id"]]["output"], 10)
    assert stored == message

    small = backend.call("echo", {"message": "short"})
    assert small["output"] == "short" and "truncated" not in small


# -- timeouts kill the whole process group ------------------------------------------------------


def test_timeout_kills_the_grandchild_holding_the_pipe_and_frees_the_worker(
    tmp_path, running_agent, make_backend, fake_docker
):
    pids = tmp_path / "grandchild.pid"
    hanging = tmp_path / "hanging-docker"
    # A docker that starts a helper (like git starting ssh) which inherits stdout and outlives it.
    hanging.write_text(f"""#!{sys.executable}
import os, subprocess, sys, time
child = subprocess.Popen(["sleep", "300"])  # inherits our stdout/stderr pipes
open({str(pids)!r}, "w").write(str(child.pid))
time.sleep(300)
""")
    hanging.chmod(0o755)
    agent = running_agent(DOCKER_BIN=str(hanging), DOCKER_TIMEOUT=3, WORKER_COUNT=1)
    backend = make_backend(agent.config.agent_id)

    started = time.monotonic()
    response = backend.call("docker_restart", {"container_name": "grafana"}, timeout=30)
    took = time.monotonic() - started
    assert response["status"] == "error"
    assert response["error"].startswith("timed out after ") and "(DOCKER_TIMEOUT=3 s counted from" in response["error"]
    assert took < 15, f"the answer took {took:.1f} s: something still held the pipe"

    grandchild = int(wait_for(lambda: pids.exists() and pids.read_text(), 5))
    wait_for(lambda: not _alive(grandchild), 10, message="the grandchild to be killed with its group")

    # The only worker is free again: the next command runs at once.
    fast = backend.call("echo", {"message": "free"}, timeout=10)
    assert fast["output"] == "free"


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return False
    return state != "Z"  # a killed process waiting to be reaped by init is gone for our purposes


# -- a database that cannot be written ----------------------------------------------------------


@pytest.fixture
def tiny_disk(tmp_path):
    """A 1 MiB tmpfs (tests run as root, so chmod cannot make a file unwritable; a full disk can)."""
    mount = tmp_path / "tiny"
    mount.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mount)], check=True)
    yield mount
    subprocess.run(["umount", "-l", str(mount)], check=False)


def _fill(mount: Path) -> Path:
    filler = mount / "filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT)
    try:
        while True:
            os.write(fd, b"\0" * 4096)
    except OSError:
        pass
    finally:
        os.close(fd)
    return filler


def test_full_disk_refuses_new_commands_loudly_and_recovers(tiny_disk, agent_env, agent_process, make_backend,
                                                            redis_server):
    env = {**agent_env, "OUTBOX_DB": str(tiny_disk / "outbox.db")}
    agent = agent_process(env).start()
    agent.wait_subscribed(redis_server)
    backend = make_backend(env["AGENT_ID"])
    assert backend.call("echo", {"message": "before"})["output"] == "before"

    filler = _fill(tiny_disk)
    # Pages SQLite already holds can still take a few commands; every command gets an answer,
    # and soon the answer is the refusal, not an accepted command it could not keep.
    answers = []
    for i in range(300):
        response = backend.call("echo", {"message": f"full-{i}"}, timeout=20)
        answers.append(response)
        if response["status"] == "error":
            break
    refused = answers[-1]
    assert refused["status"] == "error", "the agent kept accepting commands on a full disk"
    assert "cannot write its database" in refused["error"] and "send it again later" in refused["error"]
    assert all(a["status"] == "success" for a in answers[:-1])
    wait_for(lambda: "refusing commands until it is writable" in agent.log(), 10, message="a loud log line")
    assert "ERROR" in agent.log()

    filler.unlink()
    # Recovers by itself: no restart, the next command is accepted, run and kept.
    after = wait_for(lambda: _try(backend, "after"), 30, interval=0.5, message="the agent to accept again")
    assert after["status"] == "success"
    table = rows(env["OUTBOX_DB"])
    assert table[after["command_id"]]["state"] == "done"
    assert refused["command_id"] not in table
    assert agent.terminate() == 0


def test_a_known_command_sent_again_on_a_full_disk_gets_its_answer_not_a_refusal(
        tiny_disk, agent_env, agent_process, make_backend, redis_server):
    """A command that ran, sent again while the database cannot be written: its stored answer,
    not "not run, send it again later", which would have it run a second time."""
    env = {**agent_env, "OUTBOX_DB": str(tiny_disk / "outbox.db")}
    agent = agent_process(env).start()
    agent.wait_subscribed(redis_server)
    backend = make_backend(env["AGENT_ID"])
    first = backend.message("docker_restart", {"container_name": "web-1"})
    backend.publish(first)
    assert backend.wait(first["command_id"])["status"] == "success"
    filler = _fill(tiny_disk)
    try:
        wait_for(lambda: backend.call("echo", timeout=20)["status"] == "error", 30, message="the first refusal")
        again = len(backend.responses_for(first["command_id"]))
        backend.publish(first)
        wait_for(lambda: len(backend.responses_for(first["command_id"])) > again, 15, message="its answer again")
        answers = backend.responses_for(first["command_id"])
        assert [a["status"] for a in answers] == ["success"] * len(answers), answers
    finally:
        filler.unlink()
    assert agent.terminate() == 0


def _try(backend, message):
    response = backend.call("echo", {"message": message}, timeout=20)
    return response if response["status"] == "success" else None


def _left_work(db: str) -> None:
    """What an agent killed mid-command leaves: one row running, one queued, one queued whose
    parameters no longer pass (its container left the whitelist)."""
    from outbox import Store

    store = Store(db)
    store.accept("left-running", "docker_restart", {"container_name": "grafana"})
    store.claim("left-running")
    store.accept("left-queued", "git_status", {})
    store.accept("left-refused", "docker_restart", {"container_name": "gone"})
    store.close()


def test_full_disk_at_start_waits_with_one_line_then_recovers(tiny_disk, agent_env, agent_process, make_backend,
                                                             redis_server, fake_docker):
    """recover() raised 'database or disk is full': a traceback and exit 1, and systemd
    restarted the agent into the same error in a loop."""
    env = {**agent_env, "OUTBOX_DB": str(tiny_disk / "outbox.db")}
    _left_work(env["OUTBOX_DB"])
    backend = make_backend(env["AGENT_ID"])
    filler = _fill(tiny_disk)
    agent = agent_process(env).start()
    wait_for(lambda: "cannot recover the work left in" in agent.log() or agent.proc.poll() is not None, 20,
             message="the agent to say it cannot recover")
    with pytest.raises(subprocess.TimeoutExpired):
        agent.proc.wait(4)  # it waits, it does not exit
    lines = [line for line in agent.log().splitlines() if "cannot recover the work left in" in line]
    assert len(lines) == 1, agent.log()
    assert "ERROR" in lines[0] and env["OUTBOX_DB"] in lines[0], lines[0]
    assert "disk I/O error" in lines[0] or "disk is full" in lines[0], lines[0]  # SQLite's own words
    assert "Traceback" not in agent.log()
    assert backend.responses == []

    filler.unlink()
    interrupted = backend.wait("left-running", 30)
    assert interrupted["status"] == "error" and interrupted["error"].startswith("interrupted:")
    assert backend.wait("left-queued", 20)["status"] == "success"
    refused = backend.wait("left-refused", 20)
    assert refused["status"] == "error" and "gone" in refused["error"]
    assert backend.call("echo", {"message": "after"})["output"] == "after"
    for command_id in ("left-running", "left-queued", "left-refused"):
        assert len(backend.responses_for(command_id)) == 1
    assert fake_docker.calls() == []  # the interrupted restart was not run again
    assert agent.terminate() == 0


def test_sigterm_while_waiting_for_a_full_disk_stops_at_once(tiny_disk, agent_env, agent_process):
    env = {**agent_env, "OUTBOX_DB": str(tiny_disk / "outbox.db")}
    _left_work(env["OUTBOX_DB"])
    _fill(tiny_disk)
    agent = agent_process(env).start()
    wait_for(lambda: "cannot recover the work left in" in agent.log() or agent.proc.poll() is not None, 20,
             message="the agent to say it cannot recover")
    assert agent.proc.poll() is None, agent.log()
    started = time.monotonic()
    assert agent.terminate(timeout=10) == 0, agent.log()
    assert time.monotonic() - started < 3
    assert "Traceback" not in agent.log()


# -- a Redis that dies right after a PUBLISH ----------------------------------------------------


def test_response_published_just_before_redis_died_is_published_again(running_agent, redis_server, make_backend):
    """PUBLISH counted a receiver that never read it (it is the frozen raw socket below), then
    Redis was killed and came back empty: the response must be published again, not forgotten."""
    agent = running_agent()
    agent_id = agent.config.agent_id
    channel = f"cockpit-agent-response:{agent_id}"
    # A subscriber that never reads: PUBLISH counts it, nothing is ever consumed.
    deaf = redis_server.client()
    deaf_pubsub = deaf.pubsub()
    deaf_pubsub.subscribe(channel)
    wait_for(lambda: redis_server.client().pubsub_numsub(channel)[0][1] == 1, 10)
    # Room to kill Redis between the PUBLISH reply and the confirmation: the intake leaves the
    # confirmation to the flusher (as when its own PING cannot tell), which waits 3 s.
    agent.intake_loop.intake.publisher.confirm = lambda: False
    agent.flusher.confirm_after = 3.0

    command_id = "published-then-lost"
    redis_server.client().publish(f"cockpit-agent:{agent_id}", json.dumps(
        {"command_id": command_id, "command": "echo", "params": {"message": "again"}}))
    wait_for(lambda: agent.flusher.unconfirmed, 10, message="the response to be published and held")
    assert agent.open_store().counts()["outbox"] == 1, "a published response is held until confirmed"
    redis_server.restart()  # SIGKILL: the delivered marker and the result key are gone
    backend = make_backend(agent_id)

    response = backend.wait(command_id, 30)
    assert response["output"] == "again"
    wait_for(lambda: agent.open_store().counts()["outbox"] == 0, 20, message="the outbox to drain")
    assert redis_server.client().get(agent.config.result_key(command_id)) is not None
    deaf_pubsub.close()


class SplittingNetwork:
    """A fake network (a TCP proxy) between the agent and a real redis-server: every chunk Redis
    sends to the agent arrives in two halves, ``pause`` s apart, as TCP segments or TLS records
    can over a real network. Nothing else is changed."""

    def __init__(self, target_port: int, pause: float = 0.05, upstream_delay: float = 0.0):
        import socket
        import threading

        self.target_port, self.pause, self.upstream_delay = target_port, pause, upstream_delay
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.sockets: list = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        import socket
        import threading

        while True:
            try:
                agent_side, _ = self.listener.accept()
            except OSError:
                return
            redis_side = socket.create_connection(("127.0.0.1", self.target_port))
            self.sockets += [agent_side, redis_side]
            threading.Thread(target=self._pipe, args=(agent_side, redis_side, False), daemon=True).start()
            threading.Thread(target=self._pipe, args=(redis_side, agent_side, True), daemon=True).start()

    def _pipe(self, source, target, split: bool) -> None:
        import socket

        try:
            while data := source.recv(65536):
                if not split and self.upstream_delay:  # the agent's bytes reach Redis late
                    time.sleep(self.upstream_delay)
                if split and len(data) > 1:
                    target.sendall(data[:len(data) // 2])
                    time.sleep(self.pause)
                    data = data[len(data) // 2:]
                target.sendall(data)
        except OSError:
            pass
        for sock in (source, target):
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def close(self) -> None:
        self.listener.close()
        for sock in self.sockets:
            sock.close()


def test_online_means_that_redis_has_the_subscription(running_agent, redis_server):
    """redis-py 8 counts a SUBSCRIBE as done once it is sent, so the agent said it was online
    (and the backend could publish to it) before Redis had the subscription: a command sent
    then had no receiver. Here every byte from the agent reaches Redis 0.3 s late; "online"
    must wait for Redis's answer to the PING that follows the SUBSCRIBE."""
    network = SplittingNetwork(redis_server.port, pause=0.0, upstream_delay=0.3)
    try:
        agent = running_agent(REDIS_PORT=network.port)  # returns once the agent says it is connected
        assert redis_server.client().pubsub_numsub(agent.config.command_channel)[0][1] == 1
    finally:
        network.close()


class _Unreadable:
    """A parser's socket buffer that does everything but say how much of it is unread."""

    def __init__(self, buffer):
        object.__setattr__(self, "_inner", buffer)

    def __getattr__(self, name):
        if name == "unread_bytes":
            raise AttributeError(name)
        return getattr(self._inner, name)

    def __setattr__(self, name, value):
        setattr(self._inner, name, value)


class FakeHiredisParser(_RESP3Parser):
    """A stand-in for redis-py's hiredis parser (hiredis is not installed here): it parses RESP3
    (redis-py 8's default protocol) like the pure-Python one but, like hiredis, offers no buffer
    whose unread bytes can be counted."""

    def on_connect(self, connection):
        super().on_connect(connection)
        self._buffer = _Unreadable(self._buffer)


@pytest.fixture(params=["python", "hiredis"])
def default_parser(request, monkeypatch):
    """redis-py's default parser: the pure-Python one, or what it is where hiredis is installed."""
    if request.param == "hiredis":
        init = inspect.unwrap(AbstractConnection.__init__)  # redis-py decorates it
        names = init.__code__.co_varnames[1:init.__code__.co_argcount]
        defaults = list(init.__defaults__)
        defaults[names.index("parser_class") - (len(names) - len(defaults))] = FakeHiredisParser
        monkeypatch.setattr(init, "__defaults__", tuple(defaults))
    return request.param


def test_commands_split_across_network_reads_are_all_answered(running_agent, redis_server, make_backend,
                                                              default_parser):
    """Redis writes a burst to the agent in one go; the network delivers it in two parts 50 ms
    apart, so the listener reads a command and the first half of the next. redis-py gives up on
    a half-read message after the timeout it was asked to wait (0 when the listener looked for
    more) and reconnects, dropping it and all behind it: 36 of 60 commands were lost this way.
    Where hiredis is redis-py's default parser the listener still uses the Python one, whose
    buffer it reads. With the hiredis stand-in as its parser, it fell back to redis-py's own
    wait of 0.5 s, and a message whose second half came 0.8 s later was lost with those behind."""
    pause, rounds = (0.05, 10) if default_parser == "python" else (0.8, 3)
    network = SplittingNetwork(redis_server.port, pause)
    try:
        agent = running_agent(REDIS_PORT=network.port)
        backend = make_backend(agent.config.agent_id)
        client = redis_server.client()
        # "online" comes before Redis confirms the SUBSCRIBE (redis-py 8 counts it subscribed
        # once sent), and that confirmation crosses the slow network: wait for Redis's count.
        wait_for(lambda: client.pubsub_numsub(agent.config.command_channel)[0][1] == 1, 15)
        ids = []
        for round_ in range(rounds):
            pipe = client.pipeline(transaction=False)
            for i in range(3):
                message = backend.message("echo", {"message": f"r{round_}-{i}"})
                ids.append(message["command_id"])
                pipe.publish(f"cockpit-agent:{agent.config.agent_id}", json.dumps(message))
            assert pipe.execute() == [1, 1, 1]
            time.sleep(0.15)
        for command_id in ids:
            assert backend.wait(command_id, 30)["status"] == "success"
        recorded = rows(agent.config.outbox_db)
        assert all(command_id in recorded for command_id in ids)
    finally:
        network.close()


# -- throughput of one lane ---------------------------------------------------------------------


def test_commands_for_one_container_follow_each_other_without_stalls(running_agent, make_backend, fake_docker):
    """Regression: a worker finishing a job waited for the take lock that idle workers hold while
    they block on the queue, so each next command for the same target started ~3 s late."""
    agent = running_agent(WORKER_COUNT=4)
    backend = make_backend(agent.config.agent_id)
    ids = [backend.send("docker_restart", {"container_name": "grafana"}) for _ in range(8)]
    started = time.monotonic()
    for cid in ids:
        assert backend.wait(cid, 60)["status"] == "success"
    took = time.monotonic() - started
    assert len(fake_docker.calls()) == 8
    assert took < 10, f"8 restarts of one container took {took:.1f} s"
    finished = [rows(agent.config.outbox_db)[cid] for cid in ids]
    assert [r["seq"] for r in sorted(finished, key=lambda r: r["started_at"])] == sorted(r["seq"] for r in finished), \
        "commands for one target must run in arrival order"
