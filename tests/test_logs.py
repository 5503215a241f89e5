"""Log lines: readable by default, JSON with LOG_FORMAT=json, and no second timestamp under journald
(JOURNAL_STREAM naming the very stream the agent writes to)."""

from __future__ import annotations

import json
import logging
import os
import re
import signal
import subprocess
import sys

import pytest

from conftest import PASSWORD, ROOT, wait_for
from service import logs

TIMESTAMP = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} ")


def run_agent_logging(env: dict, server, log_path, journald: bool) -> list[str]:
    """Start ``python agent.py`` with stderr in ``log_path``, wait until it subscribed, stop it, return its lines."""
    with open(log_path, "w") as log_file:
        if journald:
            st = os.fstat(log_file.fileno())
            env = {**env, "JOURNAL_STREAM": f"{st.st_dev}:{st.st_ino}"}
        proc = subprocess.Popen([sys.executable, str(ROOT / "agent.py")], env=env, stdout=log_file,
                                stderr=log_file, stdin=subprocess.DEVNULL)
        try:
            wait_for(lambda: "subscribed to" in log_path.read_text() or proc.poll() is not None, 20,
                     message="the agent to subscribe")
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(30) == 0, log_path.read_text()
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait(10)
    return log_path.read_text().splitlines()


def test_default_lines_are_readable_with_a_timestamp(agent_env, redis_server, tmp_path):
    lines = run_agent_logging(agent_env, redis_server, tmp_path / "text.log", journald=False)
    assert lines
    assert all(TIMESTAMP.match(line) for line in lines), lines
    assert any(re.search(r" INFO cockpit_agent\.listener: subscribed to cockpit-agent:", line) for line in lines)
    assert not any(PASSWORD in line for line in lines)


def test_json_under_journald_has_priorities_and_no_timestamp(agent_env, redis_server, tmp_path):
    env = {**agent_env, "LOG_FORMAT": "json"}
    lines = run_agent_logging(env, redis_server, tmp_path / "json.log", journald=True)
    assert lines
    entries = []
    for line in lines:
        match = re.match(r"^<(\d)>(\{.*\})$", line)
        assert match, line
        entry = json.loads(match.group(2))
        assert "time" not in entry  # journald stamps it
        assert match.group(1) == str(logs.priority(getattr(logging, entry["level"])))
        entries.append(entry)
    assert any(e["logger"] == "cockpit_agent.listener" and e["message"].startswith("subscribed to") for e in entries)
    assert not any(PASSWORD in line for line in lines)


def test_text_under_journald_has_no_timestamp(agent_env, redis_server, tmp_path):
    lines = run_agent_logging(agent_env, redis_server, tmp_path / "journal.log", journald=True)
    assert lines
    assert all(re.match(r"^<[2-7]>(DEBUG|INFO|WARNING|ERROR|CRITICAL) cockpit_agent", line) for line in lines), lines
    assert not any(TIMESTAMP.search(line[3:]) for line in lines)


def _record(level=logging.WARNING, msg="disk %s", args=("full",), exc=None) -> logging.LogRecord:
    return logging.LogRecord("cockpit_agent.flusher", level, __file__, 1, msg, args, exc)


def test_json_lines_outside_journald_carry_time_and_tracebacks():
    try:
        raise ValueError("boom")
    except ValueError:
        record = _record(logging.ERROR, "failed", (), sys.exc_info())
    entry = json.loads(logs.JsonFormatter(journald=False).format(record))
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", entry["time"])
    assert entry["level"] == "ERROR" and entry["logger"] == "cockpit_agent.flusher" and entry["message"] == "failed"
    assert "ValueError: boom" in entry["exc"]


def test_a_traceback_under_journald_keeps_its_priority_on_every_line():
    try:
        raise ValueError("boom")
    except ValueError:
        record = _record(logging.ERROR, "failed", (), sys.exc_info())
    text = logs.TextFormatter(journald=True).format(record)
    assert len(text.splitlines()) > 2
    assert all(line.startswith("<3>") for line in text.splitlines())


@pytest.mark.parametrize("value", ["", "garbage", "1:2"])
def test_an_inherited_or_wrong_journal_stream_is_not_journald(monkeypatch, value):
    """A child of a service (an operator's shell, a test) inherits JOURNAL_STREAM but writes elsewhere."""
    monkeypatch.setenv("JOURNAL_STREAM", value)
    assert logs.under_journald() is False
    assert isinstance(logs.formatter("text"), logs.TextFormatter)
    assert TIMESTAMP.match(logs.formatter("text").format(_record()))


def test_log_format_is_validated(config_from, agent_env):
    from errors import ConfigError

    with pytest.raises(ConfigError, match="LOG_FORMAT: expected text or json"):
        config_from({**agent_env, "LOG_FORMAT": "xml"})
    assert config_from({**agent_env, "LOG_FORMAT": "JSON"}).log_format == "json"


@pytest.mark.parametrize("journald", [False, True])
@pytest.mark.parametrize("make", [logs.TextFormatter, logs.JsonFormatter], ids=["text", "json"])
def test_a_message_is_one_line_whatever_it_holds_and_a_traceback_keeps_its_lines(make, journald):
    hostile = "id-1\nFORGED\r\u2028\u2029\x85\x0b\x0c\x1c\x1d\x1e\x1b[2K\x00\x7f\u202e"
    try:
        raise ValueError("boom")
    except ValueError:
        record = _record(logging.ERROR, "%s: accepted from %s", (hostile, hostile), sys.exc_info())
    text = make(journald=journald).format(record)
    first, *rest = text.splitlines()  # splitlines breaks on every Unicode line boundary
    assert "FORGED" in first and not any("FORGED" in line for line in rest)
    if make is logs.JsonFormatter:
        assert rest == []
        entry = json.loads(first[3:] if journald else first)
        assert "ValueError: boom" in entry["exc"] and "\n" in entry["exc"]
        message = entry["message"]
    else:
        assert len(rest) >= 3 and rest[-1].endswith("ValueError: boom")  # the traceback, line by line
        message = first.split(": ", 1)[1]
    assert message == ("id-1\\nFORGED\\r\\u2028\\u2029\\x85\\x0b\\x0c\\x1c\\x1d\\x1e\\x1b[2K\\x00\\x7f\\u202e: "
                       "accepted from id-1\\nFORGED\\r\\u2028\\u2029\\x85\\x0b\\x0c\\x1c\\x1d\\x1e\\x1b[2K\\x00\\x7f\\u202e")
    assert logs.escape("café ok\t") == "café ok\\t" and logs.escape("plain") == "plain"
