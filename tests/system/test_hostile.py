"""A hostile publisher against a real agent: whatever anyone can PUBLISH on the command channel
must not forge a log line, get an answer it is not owed, cost memory, or alias a key."""

from __future__ import annotations

import json
import logging
import os
import re
import signal
import sqlite3
import subprocess
import sys
import time
import urllib.request
import uuid

import pytest
from test_faults import _fill, tiny_disk  # noqa: F401  (the 1 MiB tmpfs fixture)

import protocol
from conftest import ROOT, SECRET, free_port, wait_for


def table_counts(db: str) -> tuple[int, int]:
    """(rows in commands, rows in outbox), as the sqlite3 shell would count them."""
    conn = sqlite3.connect(db, timeout=10)
    try:
        return (conn.execute("SELECT count(*) FROM commands").fetchone()[0],
                conn.execute("SELECT count(*) FROM outbox").fetchone()[0])
    finally:
        conn.close()


def scrape(port: int, name: str) -> dict[str, float]:
    """The samples of one metric on /metrics, by their ``reason`` label."""
    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as reply:
        text = reply.read().decode()
    return {s.labels.get("reason", ""): s.value for f in text_string_to_metric_families(text)
            for s in f.samples if s.name == name}

# -- log forgery ------------------------------------------------------------------------------

# Each breaks a line for some reader: journald and grep (\n), a terminal (\r, ESC), Python's
# splitlines and log shippers built on it (\x85, \u2028, \u2029, \x0b, \x0c, \x1c-\x1e).
BREAKS = ["\n", "\r", "\r\n", "\u2028", "\u2029", "\x85", "\x0b", "\x0c", "\x1c", "\x1e", "\x1b[2K\r"]
PREFIX = {
    ("text", False): r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} (DEBUG|INFO|WARNING|ERROR|CRITICAL) cockpit_agent[\w.-]*: ",
    ("text", True): r"<[2-7]>(DEBUG|INFO|WARNING|ERROR|CRITICAL) cockpit_agent[\w.-]*: ",
    ("json", False): r"\{",
    ("json", True): r"<[2-7]>\{",
}


def start_agent(env: dict, log_path, journald: bool) -> subprocess.Popen:
    """``python agent.py`` with stderr in ``log_path`` (under journald: JOURNAL_STREAM names that file)."""
    log_file = open(log_path, "w")
    if journald:
        st = os.fstat(log_file.fileno())
        env = {**env, "JOURNAL_STREAM": f"{st.st_dev}:{st.st_ino}"}
    try:
        return subprocess.Popen([sys.executable, str(ROOT / "agent.py")], env=env, stdout=log_file,
                                stderr=log_file, stdin=subprocess.DEVNULL)
    finally:
        log_file.close()


def stop_agent(proc: subprocess.Popen) -> int:
    proc.send_signal(signal.SIGTERM)
    try:
        return proc.wait(30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)


@pytest.mark.parametrize("log_format, journald", list(PREFIX), ids=["text", "text-journald", "json", "json-journald"])
def test_wire_text_cannot_forge_a_log_line(log_format, journald, agent_env, redis_server, make_backend, tmp_path,
                                           git_repos):
    env = {**agent_env, "LOG_FORMAT": log_format}
    log_path = tmp_path / "agent.log"
    proc = start_agent(env, log_path, journald)
    try:
        channel = f"cockpit-agent:{env['AGENT_ID']}"
        wait_for(lambda: redis_server.client().pubsub_numsub(channel)[0][1] >= 1 or proc.poll() is not None, 20,
                 message="the agent to subscribe")
        backend = make_backend(env["AGENT_ID"])
        answered = []
        for i, brk in enumerate(BREAKS):
            forged = f"{brk}FORGED-{i} CRITICAL cockpit_agent: owned"
            # sender: logged by the intake ("accepted from ..."); command: named in the refusal.
            answered.append(backend.send("git_status", sender="cockpit" + forged))
            answered.append(backend.send("nope" + forged))
            # command_id: refused as unanswerable now; it was accepted (and logged raw) before.
            backend.publish({"command_id": f"id-{uuid.uuid4().hex[:6]}{forged}", "command": "git_status"})
        for command_id in answered:
            backend.wait(command_id, 20)
        assert backend.call("echo", {"message": "last"})["output"] == "last"
        wait_for(lambda: log_path.read_text().count("FORGED-") >= 3 * len(BREAKS), 10,
                 message="every hostile message in the log")
    finally:
        assert stop_agent(proc) == 0
    text = log_path.read_text(encoding="utf-8", errors="replace")
    prefix = re.compile(PREFIX[(log_format, journald)])
    lines = text.splitlines()  # the strictest reader: it breaks on every Unicode line boundary
    assert lines
    for line in lines:
        if log_format == "json":
            assert prefix.match(line), line
            json.loads(line[3:] if journald else line)
        elif "FORGED-" in line:
            assert prefix.match(line), f"a forged line, without the agent's prefix: {line!r}"
        if "FORGED-" in line:
            # the forged text sits inside the agent's own line, after its prefix, never at a line start
            assert line.index("FORGED-") > prefix.match(line).end() + 1, line
    assert sum("FORGED-" in line for line in lines) >= 3 * len(BREAKS)


# -- keys: no command_id stands for another key -----------------------------------------------


def test_a_command_id_cannot_alias_another_commands_delivered_marker(running_agent, make_backend, redis_server):
    """The marker of X was ``{result key of X}:delivered``: the result key of the command
    ``X:delivered``, so answering that one first silenced X (no answer, no result key)."""
    agent = running_agent()
    backend = make_backend(agent.config.agent_id)
    client = redis_server.client()
    real = f"real-{uuid.uuid4().hex[:8]}"
    assert backend.call("echo", {"message": "squatter"}, command_id=f"{real}:delivered")["output"] == "squatter"
    assert backend.call("echo", {"message": "the real one"}, command_id=real, timeout=10)["output"] == "the real one"
    assert json.loads(client.get(agent.config.result_key(real)))["output"] == "the real one"
    assert json.loads(client.get(agent.config.result_key(f"{real}:delivered")))["output"] == "squatter"
    # Each command has one key, its result key (also its delivered mark), and no key of one is a key of the other.
    keys = {k.decode() for k in client.keys(f"*{real}*")}
    agent_id = agent.config.agent_id
    assert keys == {f"cockpit-agent-result:{agent_id}:{real}", f"cockpit-agent-result:{agent_id}:{real}:delivered"}


# -- unauthenticated messages are never answered ----------------------------------------------


def unauthenticated_variants(backend, command_id: str) -> list[dict]:
    """The same command_id unsigned, wrongly signed, signed but stale, and with a 10**400 timestamp."""
    unsigned = {"command_id": command_id, "command": "echo", "params": {"message": "forged answer"}}
    wrong = {**unsigned, "timestamp": int(time.time()), "auth": {"signature": protocol.sign(unsigned, "not-the-secret")}}
    stale = backend.message("echo", {"message": "stale"}, command_id=command_id, timestamp=int(time.time()) - 600)
    stale["auth"] = {"signature": protocol.sign({k: v for k, v in stale.items() if k != "auth"}, SECRET)}
    huge = {**unsigned, "timestamp": 10**400}
    huge["auth"] = {"signature": protocol.sign(huge, SECRET)}
    return [unsigned, wrong, stale, huge]


def test_unauthenticated_messages_are_never_answered_nor_written(running_agent, make_backend, redis_server,
                                                                 fake_docker):
    port = free_port()
    agent = running_agent(COCKPIT_SHARED_SECRET=SECRET, METRICS_PORT=port)
    agent_id = agent.config.agent_id
    client = redis_server.client()

    # A flood while the backend is away (no one subscribed to the responses): before, each got a
    # signed error answer, and each answer waited in the outbox for a receiver.
    flood = 2000
    pipe = client.pipeline(transaction=False)
    for i in range(flood):
        pipe.publish(f"cockpit-agent:{agent_id}", json.dumps({"command_id": f"flood-{i}", "command": "echo"}))
    pipe.execute()
    wait_for(lambda: agent.audit.rejections.get("unauthenticated", 0) == flood, 30, message="the flood to be read")
    assert table_counts(agent.config.outbox_db) == (0, 0)

    # While a real signed command runs, a publisher without the secret tries to answer it.
    fake_docker.behave("sleep 2")
    backend = make_backend(agent_id, secret=SECRET)
    real = backend.send("docker_restart", {"container_name": "grafana"})
    wait_for(lambda: fake_docker.calls(), 10, message="the real restart to start")
    for message in unauthenticated_variants(backend, real):
        backend.publish(message)
    wait_for(lambda: agent.audit.rejections.get("unauthenticated", 0) == flood + 4, 10, message="the forgeries read")
    assert backend.responses_for(real) == [], "a forged message got an answer under the running command's id"
    answer = backend.wait(real, 20)
    assert answer["status"] == "success" and answer["output"] == "grafana"
    assert backend.call("echo", {"message": "after"})["output"] == "after"
    assert len(backend.responses_for(real)) == 1
    assert {r["command_id"] for r in backend.responses} == {real, backend.responses[-1]["command_id"]}
    assert json.loads(client.get(agent.config.result_key(real)))["status"] == "success"
    assert table_counts(agent.config.outbox_db)[0] == 2  # the two real commands, nothing else
    assert scrape(port, "cockpit_agent_rejected_messages_total") == {
        "malformed": 0, "oversize": 0, "unauthenticated": flood + 4}


def test_unauthenticated_stream_entries_are_acknowledged_not_answered(agent_env, agent_process, redis_server,
                                                                      make_backend):
    env = {**agent_env, "COMMAND_STREAM": "on", "COCKPIT_SHARED_SECRET": SECRET}
    agent_id = env["AGENT_ID"]
    backend = make_backend(agent_id, secret=SECRET)
    client = redis_server.client()
    stream = f"cockpit-agent-stream:{agent_id}"
    forged = unauthenticated_variants(backend, "stream-forged")
    for message in forged:
        client.xadd(stream, {"message": json.dumps(message)})
    good = backend.message("echo", {"message": "signed, by the stream"})
    client.xadd(stream, {"message": json.dumps(good)})
    agent = agent_process(env).start()
    assert backend.wait(good["command_id"], 30)["output"] == "signed, by the stream"
    wait_for(lambda: client.xpending(stream, "cockpit-agent")["pending"] == 0, 15, message="every entry acknowledged")
    assert backend.responses_for("stream-forged") == []
    assert agent.terminate() == 0
    assert table_counts(env["OUTBOX_DB"]) == (1, 0)
    assert len([line for line in agent.log().splitlines() if "stream-forged: dropped, not answered" in line]) == 4
    assert SECRET not in agent.log()


# -- a busy refusal is recorded, so its replay never runs -------------------------------------


def test_a_replayed_busy_command_is_answered_busy_again_and_never_runs(running_agent, make_backend, fake_docker):
    fake_docker.behave("sleep 2")
    agent = running_agent(COCKPIT_SHARED_SECRET=SECRET, QUEUE_MAX=1, WORKER_COUNT=1)
    backend = make_backend(agent.config.agent_id, secret=SECRET)
    blocker = backend.send("docker_restart", {"container_name": "grafana"})
    wait_for(lambda: fake_docker.calls(), 10, message="the blocking restart to start")
    queued = backend.send("docker_restart", {"container_name": "grafana"})
    wait_for(lambda: agent.pool.pending() == 1, 10, message="one command queued")
    captured = backend.message("docker_restart", {"container_name": "web-1"})  # signed, fresh
    backend.publish(captured)
    busy = backend.wait(captured["command_id"], 5)
    assert busy["status"] == "error" and busy["error"].startswith("busy:")
    for command_id in (blocker, queued):
        assert backend.wait(command_id, 20)["status"] == "success"

    # The backend gave up on it; anyone who captured it replays it within the 300 s window.
    backend.publish(captured)
    replay = wait_for(lambda: backend.responses_for(captured["command_id"])[1:], 10, message="the replay's answer")
    assert replay == [busy]
    assert backend.call("echo", {"message": "after"})["output"] == "after"
    assert fake_docker.calls() == [["restart", "--", "grafana"]] * 2, "the replayed command ran"


# -- a full disk: one refusal line a minute, not one per message ------------------------------

def test_a_full_disk_logs_its_refusals_rate_limited(tiny_disk, agent_env, agent_process, make_backend,  # noqa: F811
                                                    redis_server):
    env = {**agent_env, "OUTBOX_DB": str(tiny_disk / "outbox.db")}
    agent = agent_process(env).start()
    agent.wait_subscribed(redis_server)
    backend = make_backend(env["AGENT_ID"])
    assert backend.call("echo", {"message": "before"})["output"] == "before"
    filler = _fill(tiny_disk)
    # Pages SQLite already holds take a few more; then every message is refused.
    wait_for(lambda: backend.call("echo", timeout=20)["status"] == "error", 30, message="the first refusal")
    ids = [backend.send("echo", {"message": f"full-{i}"}) for i in range(300)]
    assert all(backend.wait(cid, 20)["status"] == "error" for cid in ids), "every message is still answered"
    lines = [line for line in agent.log().splitlines() if "cannot write" in line]
    assert 1 <= len(lines) <= 2, f"{len(lines)} lines for about 300 refusals"
    assert all(" ERROR " in line and "refusing commands until it is writable" in line for line in lines)

    filler.unlink()
    wait_for(lambda: backend.call("echo", {"message": "after"}, timeout=20)["status"] == "success", 30,
             message="the agent to accept again")
    again = [line for line in agent.log().splitlines() if "can be written again" in line]
    assert len(again) == 1 and re.search(r"; (\d+) messages were refused", again[0])
    assert int(re.search(r"; (\d+) messages", again[0]).group(1)) >= 301
    assert agent.terminate() == 0


# -- wire numbers: a huge integer timestamp -----------------------------------------------------


def test_huge_integer_timestamps_get_one_rate_limited_line_not_a_traceback_each(agent_env, agent_process,
                                                                                redis_server, make_backend):
    env = {**agent_env, "COCKPIT_SHARED_SECRET": SECRET}
    agent = agent_process(env).start()
    agent.wait_subscribed(redis_server)
    backend = make_backend(env["AGENT_ID"], secret=SECRET)
    pipe = redis_server.client().pipeline(transaction=False)
    for i in range(500):
        message = {"command_id": f"huge-{i}", "command": "echo", "timestamp": 10**400}
        message["auth"] = {"signature": protocol.sign(message, SECRET)}
        pipe.publish(f"cockpit-agent:{env['AGENT_ID']}", json.dumps(message))
    pipe.execute()
    assert backend.call("echo", {"message": "still here"})["output"] == "still here"
    assert agent.terminate() == 0
    log = agent.log()
    assert "Traceback" not in log and "OverflowError" not in log
    lines = [line for line in log.splitlines() if "huge-" in line]
    # The audit's bucket: 50 at once, then 5 a second; each let through is an audit and a warning line.
    assert 2 <= len(lines) <= 2 * (50 + 5 * 30), len(lines)
    assert all("needs a numeric timestamp" in line for line in lines)
    assert not any(r.get("command_id", "").startswith("huge-") for r in backend.responses)


def test_a_message_that_fails_unexpectedly_logs_one_traceback_a_minute(running_agent, make_backend, caplog,
                                                                        monkeypatch):
    """The twin of the OverflowError: any bug a message hits, every copy of it hits."""
    agent = running_agent()
    backend = make_backend(agent.config.agent_id)

    prepare = agent.registry.prepare

    def broken(command, params, config):
        if command == "x":
            raise RuntimeError("a bug hit by every message")
        return prepare(command, params, config)

    monkeypatch.setattr(agent.registry, "prepare", broken)
    caplog.set_level(logging.INFO, logger="cockpit_agent")
    pipe = backend.server.client().pipeline(transaction=False)
    for i in range(200):
        pipe.publish(f"cockpit-agent:{agent.config.agent_id}", json.dumps({"command_id": f"bug-{i}", "command": "x"}))
    pipe.execute()
    assert backend.call("echo", {"message": "after"})["output"] == "after"  # read after all 200
    # Each is answered with the failure (not silently dropped), and logged once for them all.
    answer = backend.wait("bug-199")
    assert answer["error"].startswith("the agent failed to check 'x': RuntimeError: a bug hit by every message")
    # (Each is also one "refused" WARNING line, as every refusal: it cost a row and an answer.)
    failures = [r for r in caplog.records if r.levelno >= logging.ERROR and "failed to check" in r.getMessage()]
    assert len(failures) == 1, [r.getMessage() for r in failures]
    assert agent.intake_loop.intake._check_failed.count == 200  # all failed, one line for them all


# -- size before parsing ----------------------------------------------------------------------


@pytest.mark.parametrize("signing", [False, True], ids=["unsigned", "signed"])
def test_an_oversized_message_is_answered_only_unsigned_and_under_a_leading_command_id(signing, running_agent,
                                                                                       make_backend):
    agent = running_agent(MAX_MESSAGE_BYTES=2048, **({"COCKPIT_SHARED_SECRET": SECRET} if signing else {}))
    backend = make_backend(agent.config.agent_id, secret=SECRET if signing else None)
    big = backend.message("echo", {"message": "x" * 5000}, command_id="big-1")  # command_id first, as the backend
    hidden = {"command": "echo", "params": {"message": "x" * 5000}, "command_id": "big-2"}
    backend.publish(big)
    backend.publish(hidden)
    wait_for(lambda: agent.audit.rejections.get("oversize", 0) == 2, 10, message="both refused")
    assert backend.call("echo", {"message": "after"})["output"] == "after"
    assert backend.responses_for("big-2") == []
    if signing:
        assert backend.responses_for("big-1") == []  # unverified: never answered
    else:
        size = len(json.dumps(big))
        assert backend.wait("big-1")["error"] == \
            f"message is {size} bytes, over the limit of 2048 bytes (MAX_MESSAGE_BYTES)"
