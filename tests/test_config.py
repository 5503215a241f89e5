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
