"""Configuration: the seed's variables with their defaults, the aliases, and one clear line per bad value."""

import logging
import subprocess
import sys

import pytest

from conftest import ROOT
from errors import ConfigError

BASE = {"REDIS_PASSWORD": "pw-123456"}


def test_seed_defaults(config_from):
    config = config_from({**BASE, "AGENT_HOSTNAME": "app-prod-01"})
    assert (config.redis_host, config.redis_port, config.redis_db) == ("localhost", 6379, 0)
    assert config.agent_id == "app-prod-01"
    assert config.git_repo_paths == ("/opt/app/config",)
    assert config.docker_containers == ("grafana",)
    assert (config.heartbeat_interval, config.command_timeout, config.docker_timeout) == (30, 30, 60)
    assert config.outbox_db == "/var/lib/cockpit-agent/outbox.db"
    assert config.worker_count == 4
    assert (config.response_retry_seconds, config.result_ttl) == (300, 3600)
    assert config.command_channel == "cockpit-agent:app-prod-01"
    assert config.response_channel == "cockpit-agent-response:app-prod-01"
    assert config.registry_key == "agents:app-prod-01"


def test_agent_id_precedence(config_from):
    import socket

    assert config_from({**BASE, "AGENT_HOSTNAME": "a", "AGENT_ID": "b"}).agent_id == "a"
    assert config_from({**BASE, "AGENT_ID": "b"}).agent_id == "b"
    assert config_from(BASE).agent_id == socket.gethostname()


def test_lists_and_aliases(config_from):
    config = config_from({**BASE, "GIT_REPO_PATH": "/srv/a, /srv/b/", "DOCKER_CONTAINER_NAME": "grafana,web-1",
                          "LOGLEVEL": "debug"})
    assert config.git_repo_paths == ("/srv/a", "/srv/b")
    assert config.docker_containers == ("grafana", "web-1")
    assert config.log_level == "DEBUG"


@pytest.mark.parametrize(
    "env, message",
    [
        ({"REDIS_PORT": "abc"}, "REDIS_PORT: expected a whole number, got 'abc'"),
        ({"REDIS_PORT": "70000"}, "REDIS_PORT: expected a whole number from 1 to 65535, got 70000"),
        ({"HEARTBEAT_INTERVAL": "0"}, "HEARTBEAT_INTERVAL: expected a whole number from 1 to 3600, got 0"),
        ({"WORKER_COUNT": "many"}, "WORKER_COUNT: expected a whole number, got 'many'"),
        ({"REDIS_SSL": "maybe"}, "REDIS_SSL: expected true or false"),
        ({"GIT_REPO_PATH": "relative/path"}, "GIT_REPO_PATH: expected absolute paths"),
        ({"DOCKER_CONTAINER_NAME": "-rm"}, "DOCKER_CONTAINER_NAME: '-rm' is not a valid container name"),
        ({"LOG_LEVEL": "loud"}, "LOG_LEVEL: expected one of"),
        ({"AGENT_ID": "has space"}, "AGENT_HOSTNAME/AGENT_ID: expected"),
        ({"REDIS_URL": "http://x"}, "REDIS_URL: expected a redis://"),
    ],
)
def test_bad_values_name_the_variable(config_from, env, message):
    with pytest.raises(ConfigError) as info:
        config_from({**BASE, "AGENT_ID": "a", **env})
    assert str(info.value).startswith(message)


def test_password_required_unless_url_carries_one(config_from):
    with pytest.raises(ConfigError, match="REDIS_PASSWORD: required"):
        config_from({"AGENT_ID": "a"})
    config = config_from({"AGENT_ID": "a", "REDIS_URL": "redis://:pw-in-url@h:6390/2"})
    assert config.redis_url and config.redis_password is None


def test_secrets_stay_out_of_repr_and_logs(config_from, caplog):
    from config import RedactSecrets, secrets_of

    config = config_from({"AGENT_ID": "a", "REDIS_PASSWORD": "hunter2-pw", "COCKPIT_SHARED_SECRET": "shh-secret-7",
                          "REDIS_URL": "redis://:url-secret@h:1/0"})
    text = repr(config) + config.describe()
    for secret in ("hunter2-pw", "shh-secret-7", "url-secret"):
        assert secret not in text
    logger = logging.getLogger("test.redact")
    logger.addFilter(RedactSecrets(secrets_of(config)))
    with caplog.at_level(logging.INFO):
        logger.info("oops %s and %s, url %s", "hunter2-pw", "shh-secret-7", "redis://:url-secret@h")
    # Each looks generated (a digit) or stands as a value (:url-secret@): see sealed.looks_generated.
    assert caplog.records[-1].getMessage() == "oops *** and ***, url redis://:***@h"


def test_dotenv_file_is_read_and_environment_wins(config_from, tmp_path):
    env_file = tmp_path / "agent.env"
    env_file.write_text("REDIS_PASSWORD=from-file\nREDIS_PORT=6390\nAGENT_ID=from-file\n")
    env_file.chmod(0o600)
    config = config_from({"COCKPIT_AGENT_ENV_FILE": str(env_file), "AGENT_ID": "from-env"})
    assert (config.redis_password, config.redis_port, config.agent_id) == ("from-file", 6390, "from-env")


def test_agent_refuses_to_start_with_one_line(tmp_path):
    env = {"PATH": "/usr/bin:/bin", "REDIS_PASSWORD": "pw-secret-1", "REDIS_PORT": "nope",
           "COCKPIT_AGENT_ENV_FILE": str(tmp_path / "none")}
    result = subprocess.run([sys.executable, str(ROOT / "agent.py")], env=env, cwd=tmp_path,
                            capture_output=True, text=True, timeout=30)
    assert result.returncode == 78
    assert result.stderr.strip() == "cockpit-agent: configuration error: REDIS_PORT: expected a whole number, got 'nope'"
    assert "pw-secret-1" not in result.stderr


def test_an_acl_refusal_is_explained_with_the_words_redis_py_gives_it(config_from, redis_server):
    """redis-py drops the NOPERM code from the message ("this user has no permissions to run
    the 'ping' command"), so the ACL hint never matched; on a cluster the agent's own wrapping
    ("cannot read the Redis Cluster's slots: ...") carries the same words."""
    import redis

    admin = redis_server.client()
    admin.execute_command("ACL", "SETUSER", "no-ping", "reset", "on", ">pw-no-ping", "-@all", "+get", "~*")
    client = redis.Redis(port=redis_server.port, username="no-ping", password="pw-no-ping", socket_timeout=5)
    with pytest.raises(redis.ResponseError) as refused:
        client.ping()
    config = config_from(BASE)
    hint = "the Redis ACL user lacks a permission this agent needs: see docs/redis-acl.md"
    assert "NOPERM" not in str(refused.value)
    assert config.explain_redis_error(refused.value) == hint
    wrapped = redis.ConnectionError(f"cannot read the Redis Cluster's slots: {refused.value}")
    assert config.explain_redis_error(wrapped) == hint
    assert config.explain_redis_error(redis.ConnectionError("Error 111 connecting to 127.0.0.1:6379.")) is None
    # Inside a script (the heartbeat, the answers), with other words.
    admin.execute_command("ACL", "SETUSER", "no-hset", "reset", "on", ">pw-no-hset", "-@all", "+eval", "~*")
    scripted = redis.Redis(port=redis_server.port, username="no-hset", password="pw-no-hset", socket_timeout=5)
    with pytest.raises(redis.ResponseError) as in_script:
        scripted.eval("return redis.call('HSET', KEYS[1], 'a', 'b')", 1, "agents:x")
    assert config.explain_redis_error(in_script.value) == hint
    assert config.explain_redis_error(redis.ResponseError("WRONGTYPE Operation against a key")) is None


def test_a_loop_refused_by_the_acl_says_why_once_without_a_traceback(config_from, caplog):
    """Every thread's failed iteration: an ACL refusal gets the hint, once per failing streak;
    any other error its traceback, every time."""
    import redis

    from runtime.loop import Loop

    loop = Loop("heartbeat", config_from(BASE))
    refused = redis.exceptions.NoPermissionError("this user has no permissions to run the 'hset' command")
    with caplog.at_level(logging.DEBUG):
        loop.on_error(refused)
        loop.failing_since = 1.0  # as Loop.run sets it after the first failure
        loop.on_error(refused)
        try:
            raise redis.ResponseError("WRONGTYPE Operation against a key")
        except redis.ResponseError as other:
            loop.on_error(other)
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert [r.getMessage() for r in errors][0] == (
        "cannot use Redis: the Redis ACL user lacks a permission this agent needs: see docs/redis-acl.md "
        "(this user has no permissions to run the 'hset' command); retrying with backoff")
    assert errors[0].exc_info is None and len(errors) == 2
    assert errors[1].getMessage() == "iteration failed; retrying" and errors[1].exc_info[0] is redis.ResponseError
