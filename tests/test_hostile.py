"""A hostile publisher against a real agent: whatever anyone can PUBLISH on the command channel
must not forge a log line, get an answer it is not owed, cost memory, or alias a key."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import uuid

import pytest

from conftest import ROOT, wait_for

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
    # Each command has one result key and one marker, and no key of one is a key of the other.
    keys = {k.decode() for k in client.keys(f"*{real}*")}
    agent_id = agent.config.agent_id
    assert keys == {f"cockpit-agent-result:{agent_id}:{real}", f"cockpit-agent-result:{agent_id}:{real}:delivered",
                    f"cockpit-agent-delivered:{agent_id}:{real}", f"cockpit-agent-delivered:{agent_id}:{real}:delivered"}
