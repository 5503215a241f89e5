"""Secrets from files (REDIS_PASSWORD_FILE, COCKPIT_SHARED_SECRET_FILE), from systemd credentials
($CREDENTIALS_DIRECTORY), and the refusal of a ``.env`` that group or others can read."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from conftest import PASSWORD, ROOT, SECRET, wait_for
from errors import ConfigError

BASE = {"AGENT_ID": "secrets-test", "GIT_REPO_PATH": "/tmp"}


def write(path, text: str, mode: int = 0o600):
    path.write_text(text)
    path.chmod(mode)
    return path


def test_secrets_from_files(tmp_path, config_from):
    password = write(tmp_path / "redis_password", PASSWORD + "\n")
    secret = write(tmp_path / "shared_secret", SECRET)
    config = config_from({**BASE, "REDIS_PASSWORD_FILE": str(password), "COCKPIT_SHARED_SECRET_FILE": str(secret)})
    assert config.redis_password == PASSWORD  # the final newline is not part of it
    assert config.shared_secret == SECRET
    assert PASSWORD not in repr(config) and SECRET not in repr(config) and SECRET not in config.describe()


def test_secrets_from_systemd_credentials(tmp_path, config_from, monkeypatch):
    credentials = tmp_path / "credentials"
    credentials.mkdir()
    write(credentials / "redis_password", PASSWORD)
    write(credentials / "shared_secret", SECRET + "\n")
    monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(credentials))
    config = config_from(dict(BASE))
    assert (config.redis_password, config.shared_secret) == (PASSWORD, SECRET)
    # An explicit variable wins over the credential.
    assert config_from({**BASE, "REDIS_PASSWORD": "from-the-environment"}).redis_password == "from-the-environment"


def test_without_any_source_the_password_is_required(config_from, monkeypatch):
    monkeypatch.delenv("CREDENTIALS_DIRECTORY", raising=False)
    with pytest.raises(ConfigError, match="REDIS_PASSWORD: required .*REDIS_PASSWORD_FILE"):
        config_from(dict(BASE))
    assert config_from({**BASE, "REDIS_PASSWORD": "p"}).shared_secret is None


@pytest.mark.parametrize("case", ["missing", "empty", "both"])
def test_bad_secret_files_are_clear_errors_without_the_secret(tmp_path, config_from, case):
    path = tmp_path / "secret"
    env = {**BASE, "REDIS_PASSWORD": PASSWORD, "COCKPIT_SHARED_SECRET_FILE": str(path)}
    if case == "empty":
        write(path, "\n")
    if case == "both":
        write(path, SECRET)
        env["COCKPIT_SHARED_SECRET"] = SECRET
    with pytest.raises(ConfigError) as error:
        config_from(env)
    text = str(error.value)
    assert "COCKPIT_SHARED_SECRET" in text and SECRET not in text and PASSWORD not in text
    expected = {"missing": "No such file", "empty": "is empty", "both": "set only one"}[case]
    assert expected in text


def run_agent_briefly(env: dict, cwd) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "agent.py")], env=env, cwd=cwd, capture_output=True,
                          text=True, timeout=60)


@pytest.mark.parametrize("mode", [0o644, 0o640, 0o604, 0o660])
def test_a_dotenv_readable_by_others_is_refused_at_start(tmp_path, mode):
    dotenv = write(tmp_path / ".env", f"REDIS_PASSWORD={PASSWORD}\nAGENT_ID=dotenv-test\n", mode)
    env = {"PATH": os.environ["PATH"], "HOME": str(tmp_path)}
    done = run_agent_briefly(env, tmp_path)
    assert done.returncode == 78, done.stderr
    assert f"chmod 600 {dotenv.name}" in done.stderr or f"chmod 600 {dotenv}" in done.stderr
    assert f"mode {mode:04o}" in done.stderr
    assert PASSWORD not in done.stderr + done.stdout
    assert len(done.stderr.strip().splitlines()) == 1


def test_a_private_dotenv_is_read(tmp_path, config_from):
    dotenv = write(tmp_path / "agent.env", f"REDIS_PASSWORD={PASSWORD}\nCOCKPIT_SHARED_SECRET={SECRET}\n")
    config = config_from({**BASE, "COCKPIT_AGENT_ENV_FILE": str(dotenv)})
    assert (config.redis_password, config.shared_secret) == (PASSWORD, SECRET)


def test_agent_runs_with_secrets_only_in_credentials(tmp_path, agent_env, agent_process, make_backend, redis_server):
    credentials = tmp_path / "credentials"
    credentials.mkdir()
    write(credentials / "redis_password", PASSWORD + "\n")
    write(credentials / "shared_secret", SECRET + "\n")
    env = {k: v for k, v in agent_env.items() if k != "REDIS_PASSWORD"}
    env["CREDENTIALS_DIRECTORY"] = str(credentials)
    agent = agent_process(env).start()
    agent.wait_subscribed(redis_server)
    backend = make_backend(env["AGENT_ID"], secret=SECRET)
    assert backend.call("echo", {"message": "from credentials"})["output"] == "from credentials"
    # Unsigned: refused, and never answered (PROTOCOL.md), but logged.
    unsigned = make_backend(env["AGENT_ID"]).send("echo", {"message": "unsigned"})
    wait_for(lambda: f"{unsigned}: dropped, not answered: not authenticated" in agent.log(), 10,
             message="the unsigned message logged")
    assert agent.terminate() == 0
    assert PASSWORD not in agent.log() and SECRET not in agent.log()
    assert "signing=on" in agent.log()


# -- secrets in what a child prints -------------------------------------------------------------


def leaky_docker(directory) -> str:
    """A docker stand-in that prints the agent's Redis password and shared secret, read from where a
    careless child might find them (here: a file), on stdout and stderr; it fails for web-1."""
    leaked = write(directory / "leaked", f"{PASSWORD} {SECRET}")
    path = directory / "leaky-docker"
    path.write_text(f"""#!{sys.executable}
import sys
secrets = open({str(leaked)!r}).read()
print("restarting with " + secrets)
sys.stderr.write("warning: auth " + secrets + "\\n")
sys.exit(1 if sys.argv[-1] == "web-1" else 0)
""")
    path.chmod(0o755)
    return str(path)


def test_secrets_a_child_prints_are_masked_before_they_are_stored_or_published(tmp_path, running_agent, make_backend,
                                                                                redis_server, agent_env):
    import sqlite3

    agent = running_agent(COCKPIT_SHARED_SECRET=SECRET, DOCKER_BIN=leaky_docker(tmp_path))
    backend = make_backend(agent.config.agent_id, secret=SECRET)
    failed = backend.call("docker_restart", {"container_name": "web-1"})
    assert failed["status"] == "error", failed
    assert failed["output"] == "restarting with *** ***"
    assert failed["error"] == "leaky-docker exited with status 1: warning: auth *** ***"
    ok = backend.call("docker_restart", {"container_name": "grafana"})
    assert ok["status"] == "success" and ok["output"] == "grafana", ok

    client = redis_server.client()
    for response in (failed, ok):
        stored = client.get(agent.config.result_key(response["command_id"]))
        assert stored is not None and PASSWORD.encode() not in stored and SECRET.encode() not in stored
    db = sqlite3.connect(agent.config.outbox_db)
    assert db.execute("SELECT output FROM commands WHERE command_id = ?",
                      [ok["command_id"]]).fetchone()[0] == "restarting with *** ***\n"
    db.close()
    agent.stop_requested.set()
    agent.shutdown()
    state = b"".join(p.read_bytes() for p in (tmp_path / "state").iterdir() if p.is_file())
    assert b"restarting with *** ***" in state
    assert PASSWORD.encode() not in state and SECRET.encode() not in state
    assert not any(PASSWORD.encode() in raw or SECRET.encode() in raw for raw in backend.raw)


def test_masking_takes_the_longest_secret_first_and_masks_short_ones_as_values():
    import sealed

    secrets = sealed.maskable(["ab1d", "ab1defgh", "xy", None, "ab1d", ""])
    assert secrets == ("ab1defgh", "ab1d", "xy")  # a repeat counts once; nothing is too short to mask
    # ab1defgh looks generated: masked anywhere; the others where they stand as values.
    assert sealed.mask("1 ab1defgh 2 pw=ab1d 3 'xy' 4 zab1defgh", secrets) == "1 *** 2 pw=*** 3 '***' 4 z***"
    assert sealed.mask("xyz ab1de, an xy here", secrets) == "xyz ab1de, an xy here"  # words, not values
    assert sealed.mask(None, secrets) is None


def test_a_secret_in_an_answer_given_on_arrival_is_masked(running_agent, make_backend, redis_server):
    """echo runs nothing and is answered by the intake itself: its output is masked as well. (The
    message's params are kept as received, so the secret the sender put there stays in them.)"""
    import sqlite3

    agent = running_agent(COCKPIT_SHARED_SECRET=SECRET)
    backend = make_backend(agent.config.agent_id, secret=SECRET)
    echoed = backend.call("echo", {"message": f"say {PASSWORD} and {SECRET}"})
    assert echoed["output"] == "say *** and ***", echoed
    stored = redis_server.client().get(agent.config.result_key(echoed["command_id"]))
    assert b"say *** and ***" in stored and PASSWORD.encode() not in stored
    db = sqlite3.connect(agent.config.outbox_db)
    row = db.execute("SELECT output, response FROM commands WHERE command_id = ?", [echoed["command_id"]]).fetchone()
    payloads = [p for (p,) in db.execute("SELECT payload FROM outbox")]
    db.close()
    for text in [*row, *payloads]:
        assert PASSWORD not in text and SECRET not in text
    assert row[0] == "say *** and ***"


def test_refusals_that_quote_a_secret_mask_it(running_agent, make_backend):
    """The agent's own error texts quote what a message held (an unknown command, a bad type):
    a secret there is masked like one a child printed."""
    import sqlite3

    agent = running_agent(COCKPIT_SHARED_SECRET=SECRET)
    backend = make_backend(agent.config.agent_id, secret=SECRET)
    unknown = backend.call(f"run-{PASSWORD}")  # refused by the handler check
    assert unknown["error"].startswith("unknown command 'run-***'"), unknown
    malformed = backend.call([SECRET])  # refused by the envelope check
    assert malformed["error"] == "command must be a non-empty string, got ['***']", malformed
    db = sqlite3.connect(agent.config.outbox_db)
    rows = db.execute("SELECT error, response FROM commands WHERE command_id IN (?, ?)",
                      [unknown["command_id"], malformed["command_id"]]).fetchall()
    db.close()
    assert len(rows) == 2
    for text in [t for row in rows for t in row]:
        assert "***" in text and PASSWORD not in text and SECRET not in text
