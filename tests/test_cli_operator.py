"""The operator command at the prompt (issue 15, items 6, 12, 13, 14): ``history`` and ``outbox``
with only the database, ``--json`` for scripts, history's filters and ``history show``, entries
named by command_id, ``send``'s waiting line on a terminal, ``help`` and the manual page.

As in test_cli.py: child processes where the environment or the terminal matters, ``agent.main``
in-process (the ``main`` fixture) otherwise; a real redis-server and real SQLite files."""

from __future__ import annotations

import json
import os
import pty
import re
import select
import shutil
import sqlite3
import subprocess
import sys
import tempfile
import time
from datetime import datetime

import pytest

import errors
from cli.common import since
from conftest import PASSWORD, ROOT, outbox_table, stuck_response, wait_for
from conftest import agent_py as cli


@pytest.fixture
def three_commands(running_agent, make_backend):
    """A running agent that answered echo one, a refused git_pull and echo two: (agent, backend, ids)."""
    agent = running_agent()
    backend = make_backend(agent.config.agent_id)
    ids = []
    for command, params in (("echo", {"message": "one"}), ("git_pull", {"repository_path": "/etc"}),
                            ("echo", {"message": "two"})):
        command_id = backend.send(command, params)
        backend.wait(command_id)
        ids.append(command_id)
    return agent, backend, ids


# -- 6: history and outbox need only the database -------------------------------------------------


def test_history_and_outbox_work_without_any_redis_setting(three_commands, tmp_path):
    agent, _, ids = three_commands
    db = agent.config.outbox_db
    bare = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": str(tmp_path),
            "COCKPIT_AGENT_ENV_FILE": str(tmp_path / "none.env")}  # no REDIS_PASSWORD, no REDIS_*

    by_variable = cli({**bare, "OUTBOX_DB": db}, "history")
    assert by_variable.returncode == 0, by_variable.stderr
    assert by_variable.stderr == ""
    assert [line.split()[2] for line in by_variable.stdout.splitlines()[1:]] == ids

    by_flag = cli(bare, "outbox", "list", "--db", db)
    assert by_flag.returncode == 0, by_flag.stderr
    assert by_flag.stdout.startswith(("the outbox is empty", "    ID"))

    settings = tmp_path / "only-the-db.env"
    settings.write_text(f"OUTBOX_DB={db}\n")
    by_file = cli(bare, "history", "show", ids[0], "--env-file", str(settings))
    assert by_file.returncode == 0, by_file.stderr
    assert f"command_id: {ids[0]}" in by_file.stdout and "one" in by_file.stdout

    # status asks Redis, so it still needs the Redis settings: one line, exit 78.
    status = cli({**bare, "OUTBOX_DB": db}, "status")
    assert status.returncode == 78 and "REDIS_PASSWORD" in status.stderr
    assert "Traceback" not in status.stderr

    missing = cli(bare, "history", "--env-file", str(tmp_path / "typo.env"))
    assert missing.returncode == 78
    assert missing.stderr == f"cockpit-agent: configuration error: --env-file {tmp_path / 'typo.env'}: no such file\n"

    nowhere = cli({**bare, "OUTBOX_DB": str(tmp_path / "nothing.db")}, "outbox")
    assert nowhere.returncode == 1
    assert f"no database at {tmp_path / 'nothing.db'}" in nowhere.stderr
    assert not (tmp_path / "nothing.db").exists()  # looking did not create it


def test_a_user_who_cannot_read_the_settings_file_is_told_and_can_name_the_database(three_commands):
    """As nobody, with the settings file root's and 0600 (the installed agent.env, for a user
    outside the agent's group): one line saying so, and --db reads the database all the same."""
    agent, _, ids = three_commands
    nobody = 65534
    base = tempfile.mkdtemp(prefix="ca-unreadable-", dir="/tmp")  # traversable by nobody, unlike pytest's tmp
    try:
        os.chmod(base, 0o755)
        settings = os.path.join(base, "agent.env")
        with open(settings, "w") as f:
            f.write(f"REDIS_PASSWORD={PASSWORD}\nOUTBOX_DB=/somewhere/else.db\n")
        os.chmod(settings, 0o600)
        state = os.path.join(base, "state")
        os.mkdir(state)
        db = os.path.join(state, "outbox.db")
        source, copy = sqlite3.connect(agent.config.outbox_db), sqlite3.connect(db)
        source.backup(copy)
        source.close()
        copy.close()
        for path in [state, *(os.path.join(state, name) for name in os.listdir(state))]:
            os.chown(path, nobody, nobody)

        def as_nobody(*argv: str) -> subprocess.CompletedProcess:
            # The interpreter lives under /root here, which nobody cannot enter: start as root,
            # import, then become nobody before anything reads a setting.
            code = (f"import os, sys, agent; os.setgroups([]); os.setgid({nobody}); os.setuid({nobody}); "
                    f"sys.exit(agent.main({list(argv)!r}))")
            env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "COCKPIT_AGENT_ENV_FILE": settings}
            return subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True,
                                  text=True, timeout=60, stdin=subprocess.DEVNULL)

        guessed = as_nobody("history")
        assert guessed.returncode == 1
        assert guessed.stderr.splitlines() == [
            f"cockpit-agent: cannot read {settings} (Permission denied); reading the database at "
            "/var/lib/cockpit-agent/outbox.db (--db PATH or OUTBOX_DB=PATH names another)",
            "cockpit-agent: no database at /var/lib/cockpit-agent/outbox.db (OUTBOX_DB, or --db); "
            "has the agent run on this host?",
        ]
        named = as_nobody("history", "--db", db, "--json")
        assert named.returncode == 0 and named.stderr == "", named.stderr
        assert [json.loads(line)["command_id"] for line in named.stdout.splitlines()] == ids
    finally:
        shutil.rmtree(base)


# -- 12: --json -----------------------------------------------------------------------------------


def test_status_json_is_one_object_with_the_facts(three_commands, main, redis_server):
    agent, _, _ = three_commands
    wait_for(lambda: json.loads(main("status", "--json")[1])["local"]["outbox"] == 0,
             message="the outbox to be empty")
    code, out, err = main("status", "--json")
    assert code == 0 and err == ""
    assert len(out.splitlines()) == 1
    facts = json.loads(out)
    assert facts["agent_id"] == agent.config.agent_id and facts["online"] is True
    assert facts["registry"]["status"] == "online" and facts["registry_key"] == agent.config.registry_key
    assert 0 <= facts["heartbeat_age_s"] < 90 and facts["redis_error"] is None
    assert facts["local"] == {"queued": 0, "running": 0, "done": 3, "outbox": 0,
                              "oldest_waiting_at": None, "oldest_waiting_at_iso": None}
    assert facts["database"] == agent.config.outbox_db
    assert PASSWORD not in out

    redis_server.kill()
    code, out, _ = main("status", "--json")
    facts = json.loads(out)
    assert code == 69 and facts["online"] is False and facts["registry"] is None
    assert facts["redis_error"] and facts["local"]["done"] == 3
    redis_server.start()  # so the fixture's shutdown does not wait on a dead server


def test_history_json_is_one_line_per_command(three_commands, main):
    _, _, ids = three_commands
    code, out, err = main("history", "--json")
    assert code == 0 and err == ""
    rows = [json.loads(line) for line in out.splitlines()]
    assert [row["command_id"] for row in rows] == ids
    assert [(row["command"], row["state"], row["status"]) for row in rows] == [
        ("echo", "done", "success"), ("git_pull", "done", "error"), ("echo", "done", "success")]
    assert rows[0]["params"] == {"message": "one"}  # a JSON value, not the stored text
    assert "not whitelisted" in rows[1]["error"]
    for row in rows:
        assert isinstance(row["received_at"], float) and isinstance(row["execution_time_ms"], int)
        assert abs(datetime.fromisoformat(row["received_at_iso"]).timestamp() - row["received_at"]) < 1
        assert "output" not in row and "response" not in row  # in full with: history show ID --json


def test_outbox_json_is_one_line_per_waiting_message(running_agent, main, redis_server):
    agent = running_agent()
    code, out, _ = main("outbox", "list", "--json")
    assert code == 0 and out == ""  # nothing waits: no line at all
    first, first_row = stuck_response(agent, redis_server)
    second, _ = stuck_response(agent, redis_server)
    code, out, _ = main("outbox", "--json")
    assert code == 0
    rows = [json.loads(line) for line in out.splitlines()]
    assert [row["command_id"] for row in rows] == [first, second]
    assert rows[0]["id"] == first_row and rows[0]["attempts"] >= 1
    assert rows[0]["channel"] == agent.config.response_channel and "payload" not in rows[0]
    assert rows[0]["next_attempt_at"] > time.time() + 3000 and rows[0]["next_attempt_at_iso"]
    assert "no receiver" in rows[0]["last_error"]

    code, out, _ = main("outbox", "show", first, "--json")
    shown = json.loads(out)
    assert code == 0 and shown["payload"]["command_id"] == first and shown["payload"]["output"] == "waiting"


# -- 13: history filters and show; outbox entries by command_id -----------------------------------


def test_history_filters_by_status_command_and_age(three_commands, main):
    _, _, ids = three_commands

    def listed(*argv: str) -> list[str]:
        code, out, err = main("history", "--json", *argv)
        assert code == 0, err
        return [json.loads(line)["command_id"] for line in out.splitlines()]

    assert listed("--status", "error") == [ids[1]]
    assert listed("--status", "success") == [ids[0], ids[2]]
    assert listed("--status", "done") == ids and listed("--status", "queued") == []
    assert listed("--command", "echo") == [ids[0], ids[2]]
    assert listed("--command", "echo", "-n", "1") == [ids[2]]
    assert listed("--since", "10m") == ids and listed("--since", "1d", "--status", "error") == [ids[1]]
    in_an_hour = time.strftime("%Y-%m-%dT%H:%M", time.localtime(time.time() + 3600))
    assert listed("--since", in_an_hour) == []
    assert listed("--since", "2000-01-01") == ids

    code, out, _ = main("history", "--since", in_an_hour)
    assert code == 0 and out == "no commands match\n"
    code, out, _ = main("history", "--command", "git_pull")
    assert code == 0 and len(out.splitlines()) == 2 and " git_pull " in out.splitlines()[1]
    with pytest.raises(SystemExit) as exit_info:
        main("history", "--since", "yesterday")
    assert exit_info.value.code == 2


def test_since_reads_ages_and_iso_times():
    assert since("90s", now=10_000) == 9_910
    assert since("10m", now=10_000) == 9_400 and since("10min", now=10_000) == 9_400
    assert since("2h", now=10_000) == 2_800 and since("1d", now=100_000) == 13_600
    assert since("1w", now=1_000_000) == 395_200
    assert since("2026-12-01T08:00:00+00:00") == 1796112000
    assert since("2026-12-01T08:00:00Z") == 1796112000
    assert since("2026-12-01") == time.mktime((2026, 12, 1, 0, 0, 0, 0, 0, -1))  # local time
    for bad in ("yesterday", "10 parsecs", "-1h", ""):
        with pytest.raises(ValueError, match="expected an age like 10m"):
            since(bad)


def test_history_show_prints_the_full_output_and_the_response_as_published(running_agent, make_backend, main):
    agent = running_agent(OUTPUT_LIMIT=256)  # the response carries a truncated copy; the table keeps all
    backend = make_backend(agent.config.agent_id)
    message = "\n".join(f"line {n:03d} of a long answer" for n in range(40))
    command_id = backend.send("echo", {"message": message})
    published = backend.wait(command_id)
    assert published.get("truncated") is True and len(published["output"]) < len(message)
    raw = next(r for r in backend.raw if json.loads(r)["command_id"] == command_id).decode()

    code, out, err = main("history", "show", command_id)
    assert code == 0 and err == ""
    assert f"command_id: {command_id}" in out and "command:    echo" in out
    assert "status:     success" in out and "state:      done" in out
    assert re.search(r"^received:   \d{4}-\d\d-\d\d \d\d:\d\d:\d\d \(\d+\.\d+\)$", out, re.M)
    assert f"output:\n{message}\n" in out  # all 40 lines, as the handler returned them
    assert out.endswith(f"response (the JSON as published):\n{raw}\n")  # byte for byte

    code, out, _ = main("history", "show", command_id, "--json")
    shown = json.loads(out)
    assert code == 0 and shown["output"] == message and shown["response"] == published
    assert shown["params"] == {"message": message} and shown["finished_at_iso"]

    code, _, err = main("history", "show", "no-such-command")
    assert code == 1 and "no command 'no-such-command' in the database" in err
    code, _, err = main("history", "show")
    assert code == 2 and "history show needs a COMMAND_ID" in err


def test_outbox_retry_show_and_purge_take_a_command_id(running_agent, make_backend, main, redis_server):
    agent = running_agent()
    kept, kept_row = stuck_response(agent, redis_server)
    target, target_row = stuck_response(agent, redis_server)

    code, out, _ = main("outbox", "show", target)
    assert code == 0 and f"id:              {target_row}" in out and f"command_id:      {target}" in out

    # A name that matches nothing purges nothing: never "all of them".
    code, out, err = main("outbox", "purge", "no-such-command", "--yes")
    assert code == 1 and "no outbox entry no-such-command" in err and "purged" not in out
    assert [r["id"] for r in outbox_table(agent.config.outbox_db)] == [kept_row, target_row]
    code, _, err = main("outbox", "retry", "no-such-command")
    assert code == 1 and "no outbox entry no-such-command" in err

    code, out, _ = main("outbox", "purge", target, "--yes")
    assert code == 0 and out == "purged 1 message(s)\n"
    assert [r["command_id"] for r in outbox_table(agent.config.outbox_db)] == [kept]

    # One named by command_id, one by row id, one unknown: the two are retried, the third said.
    again, again_row = stuck_response(agent, redis_server)
    backend = make_backend(agent.config.agent_id)
    code, out, err = main("outbox", "retry", kept, str(again_row), "gone-already")
    assert code == 0 and "2 message(s) due now" in out and "no outbox entry gone-already" in err
    assert backend.wait(kept)["output"] == "waiting" and backend.wait(again)["output"] == "waiting"
    wait_for(lambda: not outbox_table(agent.config.outbox_db), message="the outbox to empty")


# -- 14: send waits visibly on a terminal; help; the manual page ----------------------------------


def test_send_piped_prints_only_the_response(running_agent, agent_env, fake_docker):
    running_agent()
    fake_docker.behave("sleep 1")  # long enough for the waiting line, were stderr a terminal
    result = cli(agent_env, "send", "docker_restart", "container_name=grafana")
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""
    assert json.loads(result.stdout)["output"] == "grafana"


def test_send_on_a_terminal_counts_the_seconds_then_wipes_the_line(running_agent, agent_env, fake_docker):
    running_agent()
    fake_docker.behave("sleep 1.6")
    master, slave = pty.openpty()
    proc = subprocess.Popen([sys.executable, str(ROOT / "agent.py"), "send", "docker_restart",
                             "container_name=grafana"], env=agent_env, stdin=subprocess.DEVNULL,
                            stdout=subprocess.PIPE, stderr=slave)
    os.close(slave)
    seen = b""
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        ready, _, _ = select.select([master], [], [], 0.5)
        if ready:
            try:
                chunk = os.read(master, 4096)
            except OSError:  # EIO: the child closed its end
                break
            if not chunk:
                break
            seen += chunk
        elif proc.poll() is not None:
            break
    os.close(master)
    out, _ = proc.communicate(timeout=30)
    assert proc.returncode == 0, seen
    assert json.loads(out)["output"] == "grafana"  # stdout carries the response only
    text = seen.decode()
    agent_id = agent_env["AGENT_ID"]
    assert f"\r| waiting for docker_restart on {agent_id} ... 0 s" in text
    assert f" waiting for docker_restart on {agent_id} ... 1 s" in text  # the seconds go up
    assert text.endswith("\r\x1b[K")  # wiped before the response is printed


def test_help_and_dash_dash_help_print_the_commands(agent_env):
    top = cli(agent_env, "--help")
    assert top.returncode == 0 and top.stderr == ""
    for command in ("run", "check", "send", "status", "outbox", "history", "help"):
        assert re.search(rf"^    {command} ", top.stdout, re.M), command
    assert "man 8 cockpit-agent" in top.stdout
    topic = cli(agent_env, "help")
    assert topic.returncode == 0 and topic.stdout == top.stdout
    one = cli(agent_env, "help", "history")
    assert one.returncode == 0 and one.stdout == cli(agent_env, "history", "--help").stdout
    assert "history show COMMAND_ID" in one.stdout and "--since" in one.stdout
    unknown = cli(agent_env, "help", "histroy")
    assert unknown.returncode == 2 and "invalid choice: 'histroy'" in unknown.stderr and unknown.stdout == ""


MANPAGE = ROOT / "docs" / "cockpit-agent.8"
# The man(7) requests the page uses; anything else is a typo that man would print as text.
KNOWN_REQUESTS = {"TH", "SH", "SS", "TP", "PP", "B", "I", "BR", "RB", "BI", "IB", "IR", "RI", "br", "nf", "fi"}


def test_the_manual_page_has_its_sections_and_names_every_command_and_exit_code():
    text = MANPAGE.read_text()
    lines = text.splitlines()
    assert lines[0].startswith('.TH COCKPIT-AGENT 8 ')
    sections = [line[4:].strip('"') for line in lines if line.startswith(".SH ")]
    wanted = ["NAME", "SYNOPSIS", "DESCRIPTION", "COMMANDS", "ENVIRONMENT", "FILES", "EXIT STATUS", "SEE ALSO"]
    assert [s for s in sections if s in wanted] == wanted  # all of them, in this order
    for line in lines:
        if line.startswith("."):
            assert line[1:].split()[0] in KNOWN_REQUESTS, line
        assert not line.startswith("'"), line  # a leading quote is a control line too
    assert lines[lines.index(".SH NAME") + 1].startswith(r"cockpit-agent \- ")

    def section(name: str) -> str:
        start = lines.index(f".SH {name}")
        end = next(i for i in range(start + 1, len(lines)) if lines[i].startswith(".SH "))
        return "\n".join(lines[start:end])

    # Every subcommand the parser knows is described under COMMANDS.
    parser_commands = re.findall(r"^    (\w+) ", cli({"PATH": os.environ["PATH"]}, "--help").stdout, re.M)
    assert set(parser_commands) >= {"run", "check", "send", "status", "outbox", "history", "help"}
    commands = section("COMMANDS")
    for command in parser_commands:
        assert re.search(rf"^\.BI? \"?{command}\b", commands, re.M), command
    # Every exit code of errors.py is explained under EXIT STATUS.
    exit_status = section("EXIT STATUS")
    for name in dir(errors):
        if name.startswith("EX_"):
            assert f"\n.B {getattr(errors, name)}\n" in exit_status, name
    assert "OUTBOX_DB" in section("ENVIRONMENT") and "REDIS_PASSWORD" in section("ENVIRONMENT")
    assert "/var/lib/cockpit-agent/outbox.db" in section("FILES")
