"""An operator's first hour (issue 15): a mistake in the settings is one clear line per problem
and exit 78, never a traceback; a misspelt variable is named with the one that was meant;
docker can be switched off; a missing repository is named at start; and masking the
password does not garble the agent's own words."""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import redis

import sealed
from conftest import ROOT, RedisServer, agent_py, wait_for
from errors import EX_CONFIG, ConfigError, NotAllowed

BASE = {"REDIS_PASSWORD": "pw-123456", "AGENT_ID": "lab-01"}


def bare_env(tmp_path: Path, **variables: str) -> dict:
    """An environment with no settings file and nothing of the agent's but ``variables``."""
    return {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": str(tmp_path),
            "COCKPIT_AGENT_ENV_FILE": str(tmp_path / "no.env"), **variables}


def settings_file(path: Path, text: str) -> Path:
    path.write_text(text)
    path.chmod(0o600)
    return path


# -- 1. a settings file that is not there, or cannot be read ---------------------------------------


@pytest.mark.parametrize("command", [("run",), ("check",), ("status",), ("send", "echo")])
def test_an_env_file_that_does_not_exist_is_one_line_and_exit_78(tmp_path, command):
    missing = tmp_path / "typo.env"
    result = agent_py(bare_env(tmp_path, **BASE), "--env-file", str(missing), *command)
    assert result.returncode == EX_CONFIG, result.stdout + result.stderr
    output = (result.stdout + result.stderr).strip()
    expected = f"--env-file {missing}: no such file"
    assert output in (f"cockpit-agent: configuration error: {expected}", f"FAIL  configuration: {expected}")


def test_the_default_settings_file_may_be_missing(config_from):
    assert config_from(BASE).agent_id == "lab-01"  # COCKPIT_AGENT_ENV_FILE names none: no error


def test_a_settings_file_that_is_not_text_is_one_line_and_exit_78(tmp_path):
    binary = tmp_path / "agent.env"
    binary.write_bytes(b"REDIS_PASSWORD=\xff\xfe\x00\n")
    binary.chmod(0o600)
    result = agent_py({**bare_env(tmp_path), "COCKPIT_AGENT_ENV_FILE": str(binary)}, "check")
    assert result.returncode == EX_CONFIG
    assert result.stdout == (f"FAIL  configuration: the settings file {binary} (COCKPIT_AGENT_ENV_FILE): "
                             "cannot read it: it is not UTF-8 text\n")
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize("where", ["file", "directory"])
def test_a_settings_file_the_user_may_not_read_is_one_line_and_exit_78(where):
    """The file mode 0600 (or its directory 0700) of another user: os.stat or open is refused."""
    base = tempfile.mkdtemp(prefix="ca-settings-", dir="/tmp")  # traversable by nobody, unlike pytest's tmp
    try:
        os.chmod(base, 0o755)
        directory = os.path.join(base, "etc")
        os.mkdir(directory, 0o700 if where == "directory" else 0o755)
        path = os.path.join(directory, "agent.env")
        with open(path, "w") as f:
            f.write("REDIS_PASSWORD=pw-123456\n")
        # Not readable by the user the check runs as: nobody when the test runs as root, else
        # the owner itself (mode 0, or a directory it may not search).
        os.chmod(path, 0o600 if os.geteuid() == 0 else 0o000)
        if os.geteuid() != 0 and where == "directory":
            os.chmod(directory, 0o000)
        drop = "os.setgroups([]); os.setgid(65534); os.setuid(65534); " if os.geteuid() == 0 else ""
        code = f"import os, sys, agent; {drop}sys.exit(agent.main(['check']))"
        result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60,
                                env={"PATH": os.environ["PATH"], "COCKPIT_AGENT_ENV_FILE": path})
        os.chmod(directory, 0o755)
        assert result.returncode == EX_CONFIG, result.stdout + result.stderr
        assert result.stdout.startswith(f"FAIL  configuration: the settings file {path} (COCKPIT_AGENT_ENV_FILE): "
                                        "cannot read it: Permission denied; it is the agent's"), result.stdout
        assert result.stdout.count("\n") == 1 and result.stderr == ""
    finally:
        os.chmod(os.path.join(base, "etc"), 0o755)
        shutil.rmtree(base)


# -- 2. an OUTBOX_DB where no database can be --------------------------------------------------------


def _bad_outbox_paths(tmp_path: Path) -> dict[str, tuple[str, str]]:
    (tmp_path / "state").mkdir()
    (tmp_path / "plain").write_text("")
    return {
        "directory": (str(tmp_path / "state"), f"OUTBOX_DB: {tmp_path / 'state'} is a directory; name the database "
                                               f"file, e.g. {tmp_path / 'state' / 'outbox.db'}"),
        "under a file": (str(tmp_path / "plain" / "outbox.db"),
                         f"OUTBOX_DB: {tmp_path / 'plain'} is a file, not a directory, so "
                         f"{tmp_path / 'plain' / 'outbox.db'} cannot be created under it"),
        "in /proc": ("/proc/outbox.db", "OUTBOX_DB: /proc/outbox.db is on the kernel's proc file system, which "
                                        "cannot hold a database; use a directory on disk (the default is "
                                        "/var/lib/cockpit-agent/outbox.db)"),
        "in /sys": ("/sys/kernel/cockpit/outbox.db", "OUTBOX_DB: /sys/kernel/cockpit/outbox.db is on the kernel's "
                                                     "sysfs file system"),
    }


@pytest.mark.parametrize("case", ["directory", "under a file", "in /proc", "in /sys"])
def test_an_outbox_db_where_no_database_can_be_fails_check_and_stops_run_with_78(tmp_path, case):
    path, message = _bad_outbox_paths(tmp_path)[case]
    env = bare_env(tmp_path, **BASE, OUTBOX_DB=path)
    checked = agent_py(env, "check")
    assert checked.returncode == EX_CONFIG
    assert checked.stdout.startswith(f"FAIL  configuration: {message}") and checked.stdout.count("\n") == 1
    ran = agent_py(env, "run")
    assert ran.returncode == EX_CONFIG, ran.stderr  # not 1, which systemd restarts
    (line,) = ran.stderr.splitlines()  # one line, no traceback
    assert line.startswith(f"cockpit-agent: configuration error: {message}")


def test_an_outbox_db_that_is_a_fine_path_is_accepted(config_from, tmp_path):
    assert config_from({**BASE, "OUTBOX_DB": str(tmp_path / "new" / "dir" / "outbox.db")}).outbox_db.endswith(
        "new/dir/outbox.db")


# -- 3. every problem at once, where it was set; misspelt variables ----------------------------------


def test_every_bad_value_is_reported_at_once_with_where_it_was_set(config_from, tmp_path):
    env_file = settings_file(tmp_path / "agent.env", "REDIS_PASSWORD=pw-123456\nREDIS_PORT=0\nWORKER_COUNT=-1\n")
    with pytest.raises(ConfigError) as raised:
        config_from({"AGENT_ID": "a", "HEARTBEAT_INTERVAL": "abc", "COCKPIT_AGENT_ENV_FILE": str(env_file)})
    assert raised.value.problems == (
        f"REDIS_PORT: expected a whole number from 1 to 65535, got 0 (from {env_file})",
        "HEARTBEAT_INTERVAL: expected a whole number, got 'abc' (from the environment)",
        f"WORKER_COUNT: expected a whole number from 1 to 64, got -1 (from {env_file})",
    )
    assert str(raised.value).startswith("3 problems:\n  REDIS_PORT: ")


def test_check_and_run_list_every_bad_value(tmp_path):
    env = bare_env(tmp_path, **BASE, HEARTBEAT_INTERVAL="abc", REDIS_PORT="0", WORKER_COUNT="-1")
    checked = agent_py(env, "check")
    assert checked.returncode == EX_CONFIG
    assert checked.stdout.splitlines() == [
        "FAIL  configuration: REDIS_PORT: expected a whole number from 1 to 65535, got 0",
        "FAIL  configuration: HEARTBEAT_INTERVAL: expected a whole number, got 'abc'",
        "FAIL  configuration: WORKER_COUNT: expected a whole number from 1 to 64, got -1",
    ]
    status = agent_py(env, "status")
    assert status.returncode == EX_CONFIG
    assert [line.split(": ", 2)[2].split(":")[0] for line in status.stderr.splitlines()] == \
        ["REDIS_PORT", "HEARTBEAT_INTERVAL", "WORKER_COUNT"]
    ran = agent_py(env, "run")
    assert ran.returncode == EX_CONFIG and "Traceback" not in ran.stderr
    assert ran.stderr.splitlines() == [
        "cockpit-agent: configuration error: 3 problems:",
        "  REDIS_PORT: expected a whole number from 1 to 65535, got 0",
        "  HEARTBEAT_INTERVAL: expected a whole number, got 'abc'",
        "  WORKER_COUNT: expected a whole number from 1 to 64, got -1",
    ]


def test_a_misspelt_variable_is_a_warning_naming_the_one_meant(config_from, tmp_path):
    env_file = settings_file(tmp_path / "agent.env", "GIT_REPO_PATHS=/srv/app\n")
    config = config_from({**BASE, "REDIS_HOTS": "redis.lan", "OUTBOX_SYNCRONOUS": "FULL", "COCKPIT_AGENT_ENV_FILE": str(env_file),
                          # git's and docker's own variables are theirs, not misspelt ones of the agent
                          "GIT_SSH_COMMAND": "ssh -i key", "DOCKER_HOST": "unix:///run/docker.sock"})
    assert config.redis_host == "localhost"  # ignored, as before: but now said
    assert config.warnings == (
        f"GIT_REPO_PATHS (from {env_file}): not a variable of the agent, ignored; did you mean GIT_REPO_PATH?",
        "OUTBOX_SYNCRONOUS (from the environment): not a variable of the agent, ignored; did you mean OUTBOX_SYNCHRONOUS?",
        "REDIS_HOTS (from the environment): not a variable of the agent, ignored; did you mean REDIS_HOST?",
    )
    # A misspelt name may be why a value is missing: the error comes with the warning.
    with pytest.raises(ConfigError) as raised:
        config_from({"AGENT_ID": "a", "REDIS_PASWORD": "pw-123456"})
    assert raised.value.problems[0].startswith("REDIS_PASSWORD: required")
    assert raised.value.warnings == ("REDIS_PASWORD (from the environment): not a variable of the agent, ignored; "
                                     "did you mean REDIS_PASSWORD?",)


def test_every_variable_the_agent_reads_is_known(config_from, tmp_path):
    """No false warnings: every variable .env.example documents, set (to nothing), is one load reads."""
    import re

    documented = sorted(set(re.findall(r"^#?([A-Z][A-Z0-9_]+)=", (ROOT / ".env.example").read_text(), re.M)))
    assert len(documented) > 30 and "REDIS_HOST" in documented
    env_file = settings_file(tmp_path / "all.env", "".join(f"{name}=\n" for name in documented))
    config = config_from({**BASE, "COCKPIT_AGENT_ENV_FILE": str(env_file)})
    assert config.warnings == ()


def test_check_warns_about_a_misspelt_variable_and_still_passes(agent_env):
    result = agent_py({**agent_env, "REDIS_HOTS": "redis.lan"}, "check")
    assert result.returncode == 0, result.stdout + result.stderr
    assert ("warn  configuration: REDIS_HOTS (from the environment): not a variable of the agent, ignored; "
            "did you mean REDIS_HOST?\n") in result.stdout


# -- 4. DOCKER_CONTAINER_NAME= turns docker_restart off ---------------------------------------------


def test_an_empty_container_list_turns_docker_off_and_unset_is_grafana(config_from):
    from handlers import REGISTRY

    assert config_from(BASE).docker_containers == ("grafana",)
    for empty in ("", "  "):
        config = config_from({**BASE, "DOCKER_CONTAINER_NAME": empty})
        assert config.docker_containers == ()
        assert "docker_restart=off" in config.describe()
    registry = REGISTRY.for_config(config)
    assert registry.names() == ["echo", "git_pull", "git_status"]
    for which in (registry, REGISTRY):  # refused by the registry, and by the handler itself
        with pytest.raises(NotAllowed) as refused:
            which.prepare("docker_restart", {"container_name": "grafana"}, config)
        assert "docker_restart is off on this agent: DOCKER_CONTAINER_NAME is empty" in str(refused.value)
    assert REGISTRY.for_config(config_from(BASE)).names() == REGISTRY.names()


def test_with_docker_off_the_agent_does_not_offer_it_and_refuses_it(agent_env, agent_process, make_backend,
                                                                     redis_server, fake_docker):
    agent = agent_process({**agent_env, "DOCKER_CONTAINER_NAME": ""}).start()
    agent.wait_subscribed(redis_server)
    registry_key = f"agents:{agent_env['AGENT_ID']}"
    capabilities = wait_for(lambda: redis_server.client().hget(registry_key, "capabilities"))
    assert capabilities.decode().split(",") == ["echo", "git_pull", "git_status"]
    backend = make_backend(agent_env["AGENT_ID"])
    response = backend.call("docker_restart", {"container_name": "grafana"})
    assert response["status"] == "error"
    assert response["error"] == ("docker_restart is off on this agent: DOCKER_CONTAINER_NAME is empty, so no "
                                 "container may be restarted; this agent runs: echo, git_pull, git_status")
    assert fake_docker.calls() == []
    assert agent.terminate() == 0


def test_check_says_docker_is_off_instead_of_failing(agent_env, tmp_path):
    env = {**agent_env, "DOCKER_CONTAINER_NAME": "", "DOCKER_BIN": str(tmp_path / "no-docker-here")}
    result = agent_py(env, "check")
    assert result.returncode == 0, result.stdout + result.stderr
    assert ("ok    docker: off: DOCKER_CONTAINER_NAME is empty, so no container may be restarted; "
            "docker_restart is not offered\n") in result.stdout
    assert "commands: echo, git_pull, git_status\n" in result.stdout


# -- 5. a repository that does not exist is named at start -------------------------------------------


def test_run_names_each_missing_repository_and_misspelt_variable_at_start(agent_env, agent_process, redis_server,
                                                                           tmp_path):
    missing = [str(tmp_path / "gone-1"), str(tmp_path / "gone-2")]
    env = {**agent_env, "GIT_REPO_PATH": ",".join([agent_env["GIT_REPO_PATH"], *missing]), "REDIS_HOTS": "x"}
    agent = agent_process(env).start()
    agent.wait_subscribed(redis_server)
    warnings = [line for line in agent.log().splitlines() if " WARNING cockpit_agent.config: " in line]
    assert [line.split(": ", 1)[1] for line in warnings] == [
        "REDIS_HOTS (from the environment): not a variable of the agent, ignored; did you mean REDIS_HOST?",
        *(f"GIT_REPO_PATH: repository {path} does not exist; git_pull and git_status there will fail"
          for path in missing),
    ]
    assert agent.terminate() == 0


# -- 7. masking a short password does not garble the agent's own words ------------------------------


def test_a_secret_that_is_a_word_is_masked_where_it_stands_as_a_value_and_nowhere_else():
    secrets = sealed.maskable(["agent"])
    assert not sealed.looks_generated("agent")
    for text in [
        "cockpit-agent 1.0.0 started: agent_id=lab-01 redis=localhost:6379/0 "
        "outbox=/var/lib/cockpit-agent/outbox.db repos=/srv/agents/app containers=grafana",
        "docker_restart is off on this agent: DOCKER_CONTAINER_NAME is empty; this agent runs: echo",
        "REDIS_HOTS (from agent.env): not a variable of the agent, ignored",
    ]:
        assert sealed.mask(text, secrets) == text  # the agent's own words, untouched
    for text, masked in [
        ("REDIS_PASSWORD=agent", "REDIS_PASSWORD=***"),  # a settings file a child prints
        ("REDIS_PASSWORD = 'agent'", "REDIS_PASSWORD = '***'"),
        ("redis://:agent@redis.lan:6379/0", "redis://:***@redis.lan:6379/0"),  # URL userinfo
        ("redis://default:agent@redis.lan", "redis://default:***@redis.lan"),
        ('{"password": "agent"}', '{"password": "***"}'),  # JSON
        ("unknown command 'agent'; this agent runs: echo", "unknown command '***'; this agent runs: echo"),
        ("--password agent", "--password ***"),
        ("the password is agent.", "the password is ***."),
        ("agent", "***"),  # the whole output
        ("line 1\n  agent\nline 3", "line 1\n  ***\nline 3"),  # a line of its own
    ]:
        assert sealed.mask(text, secrets) == masked, text
    # A one-letter password: masked as a value, left in every word and in prose.
    assert sealed.mask("x = x; box xy; pw: x", sealed.maskable(["x"])) == "x = ***; box xy; pw: ***"


def test_a_secret_that_looks_generated_is_masked_anywhere():
    for secret in ("Kx9-long-secret-value", "hunter22!", "pw-123456"):
        assert sealed.looks_generated(secret)
        assert sealed.mask(f"a{secret}b and {secret}", sealed.maskable([secret])) == "a***b and ***"
    assert not sealed.looks_generated("hunter2") and not sealed.looks_generated("cockpit-agent")


def test_logs_mask_a_real_password_and_leave_agent_id_alone(config_from, capsys):
    from service.logs import setup_logging

    config = config_from({**BASE, "REDIS_PASSWORD": "agent", "LOG_FORMAT": "text"})
    root = logging.getLogger()
    saved = root.handlers[:], root.level
    try:
        setup_logging(config)
        log = logging.getLogger("cockpit_agent.test")
        log.info("started: %s", config.describe())
        log.warning("auth with REDIS_PASSWORD=%s failed", "agent")
        try:
            raise redis.AuthenticationError("invalid password 'agent' for user default")
        except redis.AuthenticationError:
            log.exception("connect failed")
    finally:
        root.handlers[:], root.level = saved
    err = capsys.readouterr().err
    assert "started: agent_id=lab-01 redis=localhost:6379/0" in err
    assert "auth with REDIS_PASSWORD=*** failed" in err
    assert "invalid password '***' for user default" in err  # the traceback too
    assert "'agent'" not in err and "=agent" not in err


def test_json_logs_mask_the_traceback_too(config_from):
    from config import RedactSecrets, secrets_of
    from service.logs import JsonFormatter

    config = config_from({**BASE, "REDIS_PASSWORD": "agent"})
    try:
        raise ValueError("password=agent rejected")
    except ValueError:
        record = logging.LogRecord("cockpit_agent", logging.ERROR, __file__, 1, "failed for %r", ("agent",),
                                   sys.exc_info())
    RedactSecrets(secrets_of(config)).filter(record)
    entry = json.loads(JsonFormatter().format(record))
    assert entry["message"] == "failed for '***'"
    assert "password=*** rejected" in entry["exc"] and "password=agent" not in entry["exc"]


def test_an_agent_with_a_short_password_masks_it_in_answers_and_not_in_its_start_line(
        tmp_path, agent_env, agent_process, make_backend):
    server = RedisServer(tmp_path / "short-pw-redis", password="agent").start()
    try:
        env = {**agent_env, "REDIS_PORT": str(server.port), "REDIS_PASSWORD": "agent", "AGENT_ID": "lab-01"}
        agent = agent_process(env).start()
        agent.wait_subscribed(server)
        backend = make_backend("lab-01", server=server)
        echoed = backend.call("echo", {"message": "REDIS_PASSWORD=agent, agent_id lab-01, cockpit-agent"})
        assert echoed["output"] == "REDIS_PASSWORD=***, agent_id lab-01, cockpit-agent"
        refused = backend.call("agent")
        # The refusal quotes the command as a value: masked; its own words stay.
        assert refused["error"] == "unknown command '***'; this agent runs: docker_restart, echo, git_pull, git_status"
        stored = server.client().get(f"cockpit-agent-result:lab-01:{echoed['command_id']}")
        assert b"=agent" not in stored and b"REDIS_PASSWORD=***" in stored
        assert agent.terminate() == 0
        log = agent.log()
        assert "cockpit-agent 1.0.0 started: agent_id=lab-01 " in log, log
        assert "cockpit-***" not in log and "***_id" not in log
    finally:
        server.kill()


# -- 15. the README's install quick-start ------------------------------------------------------------


def test_the_readme_quick_start_has_every_step_install_sh_prints():
    readme = (ROOT / "README.md").read_text()
    block = readme.split("Install on a host", 1)[1].split("```sh", 1)[1].split("```", 1)[0]
    steps = (ROOT / "scripts" / "install.sh").read_text().split("Next steps:", 1)[1].split("NEXT", 1)[0]
    for step in ("systemctl edit cockpit-agent", "cockpit-agent check", "systemctl start cockpit-agent",
                 "journalctl -u cockpit-agent -f", "cockpit-agent send echo message=hi"):
        assert step in steps, step  # what install.sh prints ...
        assert step in block, step  # ... the README's quick start has too
    assert "ReadWritePaths=" in block and "GIT_REPO_PATH" in block


def test_the_operator_command_from_a_checkout_runs_as_the_readme_says(agent_env, tmp_path):
    readme = (ROOT / "README.md").read_text()
    command = ".venv/bin/python agent.py check --env-file ./agent.env"
    assert command in readme
    work = tmp_path / "work"
    work.mkdir()
    settings = {k: v for k, v in agent_env.items() if k not in ("PATH", "HOME", "COCKPIT_AGENT_ENV_FILE")}
    settings_file(work / "agent.env", "".join(f"{k}={v}\n" for k, v in settings.items()))
    argv = [sys.executable, str(ROOT / "agent.py"), *command.split()[2:]]  # the venv's python, as in the README
    result = subprocess.run(argv, cwd=work, capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL,
                            env={"PATH": agent_env["PATH"], "HOME": str(tmp_path)})
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.startswith(f"ok    configuration: agent_id={agent_env['AGENT_ID']} ")
