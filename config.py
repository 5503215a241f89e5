"""The agent's configuration: one frozen Config built from the environment (and ``.env``).

Every variable of PROTOCOL.md is read here and nowhere else. A bad value raises ConfigError
with one line that names the variable and what it expected; secret values never appear in
that line, in ``repr(config)`` or in any log.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import re
import socket
import stat
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

from environs import Env

from errors import ConfigError
from protocol import SIGNATURE_MAX_AGE
from sealed import mask, maskable

# Docker's own rule for container names: DOCKER_CONTAINER_NAME here, container_name in docker_restart.
CONTAINER_NAME_RE = re.compile(r"^[a-zA-Z0-9][a-zA-Z0-9_.-]{0,127}$")

VERSION = "1.0.0"

# An agent id becomes part of channel and key names; keep it to what a hostname can hold.
_AGENT_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._@:-]{0,199}$")
_LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")

# A peer that is gone without closing (a dead host, a NAT that forgot the connection) is found
# by the kernel: probes after 10 s idle, every 5 s, 3 missed close it (~25 s). Keepalive only
# probes an idle connection; the subscription always has a liveness PING in flight, so
# TCP_USER_TIMEOUT closes one whose data stays unacknowledged for 25 s. A frozen redis-server's
# kernel still acknowledges both: it is not closed (the listener keeps it, see
# Listener._check_liveness). Options this system lacks are left out.
KEEPALIVE_OPTIONS = {
    getattr(socket, name): value
    for name, value in (("TCP_KEEPIDLE", 10), ("TCP_KEEPINTVL", 5), ("TCP_KEEPCNT", 3), ("TCP_USER_TIMEOUT", 25000))
    if hasattr(socket, name)
}


@dataclass(frozen=True)
class Config:
    """Everything the agent needs to know, checked once at start."""

    agent_id: str
    redis_host: str = "localhost"
    redis_port: int = 6379
    redis_db: int = 0
    redis_username: str | None = None
    redis_password: str | None = field(default=None, repr=False)
    redis_url: str | None = field(default=None, repr=False)
    redis_ssl: bool = False
    redis_tls_verify: bool = True
    redis_tls_ca_cert: str | None = None
    redis_tls_cert: str | None = None
    redis_tls_key: str | None = None
    redis_socket_timeout: float = 10.0
    redis_sentinels: tuple[tuple[str, int], ...] = ()
    redis_sentinel_master: str | None = None
    redis_sentinel_password: str | None = field(default=None, repr=False)
    git_repo_paths: tuple[str, ...] = ("/opt/app/config",)
    docker_containers: tuple[str, ...] = ("grafana",)
    heartbeat_interval: int = 30
    command_timeout: int = 30
    docker_timeout: int = 60
    shared_secret: str | None = field(default=None, repr=False)
    outbox_db: str = "/var/lib/cockpit-agent/outbox.db"
    outbox_synchronous: str = "NORMAL"
    worker_count: int = 4
    queue_max: int = 1000
    output_limit: int = 64 * 1024
    max_message_bytes: int = 1024 * 1024
    response_retry_seconds: int = 300
    result_ttl: int = 3600
    command_retention: int = 7 * 86400  # s a done command is kept in the database, then pruned
    shutdown_grace: float = 20.0
    listener_stall_timeout: float = 60.0
    listener_buffer_bytes: int = 256 * 1024 * 1024
    command_stream: bool = False
    git_bin: str = "git"
    docker_bin: str = "docker"
    log_level: str = "INFO"
    # Service integration (issue 5): log format, metrics endpoint, extra handlers, watchdog.
    log_format: str = "text"
    metrics_port: int | None = None
    metrics_addr: str = "127.0.0.1"
    handlers_dir: str | None = None
    stall_seconds: int = 60

    @property
    def command_channel(self) -> str:
        """The channel the backend publishes commands on."""
        return f"cockpit-agent:{self.agent_id}"

    @property
    def response_channel(self) -> str:
        """The channel the agent publishes responses on."""
        return f"cockpit-agent-response:{self.agent_id}"

    @property
    def registry_key(self) -> str:
        """The registry hash the backend reads to see the agent online."""
        return f"agents:{self.agent_id}"

    @property
    def stream_key(self) -> str:
        """The durable command stream (read only with COMMAND_STREAM=on)."""
        return f"cockpit-agent-stream:{self.agent_id}"

    def result_key(self, command_id: str) -> str:
        """Where a response is also stored, for a caller that missed it on the channel."""
        return f"cockpit-agent-result:{self.agent_id}:{command_id}"

    def redis_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for ``redis.Redis`` (secrets included: never log them)."""
        from redis.backoff import NoBackoff
        from redis.retry import Retry

        kwargs: dict[str, Any] = {
            "socket_connect_timeout": 5.0,
            "socket_timeout": self.redis_socket_timeout,
            "socket_keepalive": True,
            "socket_keepalive_options": KEEPALIVE_OPTIONS,
            "health_check_interval": 15,
            # The agent's own loops back off and reconnect; one immediate retry only
            # replaces a pooled connection that went stale while Redis restarted.
            "retry": Retry(NoBackoff(), 1),
            "client_name": f"cockpit-agent:{self.agent_id}"[:100],
            # No CLIENT SETINFO on connect: one command fewer for the ACL to allow (docs/redis-acl.md).
            "driver_info": None,
        }
        if self.redis_url:
            parts = urlsplit(self.redis_url)
            kwargs["url"] = self.redis_url
            if parts.scheme == "unix":
                # TCP keepalive has no meaning on a unix socket, and redis-py's unix connection
                # refuses the keyword: every connection failed with a TypeError.
                del kwargs["socket_keepalive"], kwargs["socket_keepalive_options"]
            if self.redis_ssl and parts.scheme == "redis":
                # from_url takes no ssl=True: ask for the TLS connection class instead.
                from redis.connection import SSLConnection

                kwargs["connection_class"] = SSLConnection
            if not parts.password and self.redis_password:
                kwargs["password"] = self.redis_password
            if not parts.username and self.redis_username:
                kwargs["username"] = self.redis_username
        else:
            kwargs.update(
                host=self.redis_host,
                port=self.redis_port,
                db=self.redis_db,
                username=self.redis_username,
                password=self.redis_password,
            )
        if self.redis_ssl:
            if not self.redis_url:
                kwargs["ssl"] = True
            kwargs.update(
                ssl_cert_reqs="required" if self.redis_tls_verify else "none",
                ssl_check_hostname=self.redis_tls_verify,
                ssl_ca_certs=self.redis_tls_ca_cert,
                ssl_certfile=self.redis_tls_cert,
                ssl_keyfile=self.redis_tls_key,
            )
        return kwargs

    def explain_redis_error(self, exc: BaseException) -> str | None:
        """What an operator should do about a Redis connection error that retrying will not fix.

        None for plain outages (Redis down, network gone): those are retried quietly.
        """
        text = str(exc)
        ca = f"the CA in REDIS_TLS_CA_CERT ({self.redis_tls_ca_cert})" if self.redis_tls_ca_cert else \
            "a CA of the system trust store (set REDIS_TLS_CA_CERT to the CA that signed it)"
        if "CERTIFICATE_VERIFY_FAILED" in text:
            if "mismatch" in text:
                return (f"TLS: the Redis server's certificate is not valid for {self.redis_host!r}: connect with "
                        "a name the certificate lists (REDIS_HOST/REDIS_URL) or reissue the certificate")
            return f"TLS: the Redis server's certificate is not trusted: it is not signed by {ca}"
        if self.redis_ssl and ("EOF occurred in violation of protocol" in text or "alert" in text.lower()):
            return ("TLS: the Redis server ended the handshake: it may require a client certificate "
                    "(REDIS_TLS_CERT and REDIS_TLS_KEY) or not accept the one given")
        if self.redis_ssl and "Timeout connecting" in text:
            return "TLS: no handshake answer: is this the server's tls-port? (REDIS_PORT/REDIS_URL, REDIS_SSL)"
        if not self.redis_ssl and "Connection reset by peer" in text:
            return "the server closed the connection at once: if it only speaks TLS, set REDIS_SSL=1"
        if "WRONGPASS" in text or "invalid username-password" in text or "NOAUTH" in text:
            return "authentication failed: check REDIS_USERNAME and REDIS_PASSWORD (or REDIS_PASSWORD_FILE)"
        if "NOPERM" in text:
            return "the Redis ACL user lacks a permission this agent needs: see docs/redis-acl.md"
        return None

    def redis_client(self, **overrides: Any):
        """A new ``redis.Redis`` client built from this configuration."""
        import redis

        kwargs = self.redis_kwargs()
        kwargs.update(overrides)
        if self.redis_sentinels:
            return self._sentinel_client(kwargs)
        url = kwargs.pop("url", None)
        if url:
            return redis.Redis.from_url(url, **kwargs)
        return redis.Redis(**kwargs)

    # -- Redis Sentinel ----------------------------------------------------------------------
    #
    # With REDIS_SENTINELS the master's address is asked of the sentinels each time a connection
    # is made (redis-py's SentinelConnectionPool). A failover breaks the connections to the old
    # master (killed, or demoted: a write there gets READONLY and the connection is dropped); the
    # agent's loops reconnect as after any outage and so land on the new master.

    def _sentinel_client(self, kwargs: dict[str, Any]):
        from redis.sentinel import Sentinel

        for name in ("host", "port", "url"):
            kwargs.pop(name, None)
        sentinel_kwargs = {
            "password": self.redis_sentinel_password,
            "socket_connect_timeout": kwargs["socket_connect_timeout"],
            "socket_timeout": min(kwargs["socket_timeout"], 5.0),
        }
        if self.redis_ssl:
            sentinel_kwargs.update({k: v for k, v in kwargs.items() if k.startswith("ssl")})
        sentinel = Sentinel(list(self.redis_sentinels), sentinel_kwargs=sentinel_kwargs)
        return sentinel.master_for(self.redis_sentinel_master, **kwargs)

    def describe(self) -> str:
        """A one-line summary safe for logs (no secrets)."""
        where = redact_url(self.redis_url) if self.redis_url else f"{self.redis_host}:{self.redis_port}/{self.redis_db}"
        if self.redis_sentinels:
            where = (f"sentinel master {self.redis_sentinel_master} via "
                     f"{','.join(f'{h}:{p}' for h, p in self.redis_sentinels)}/{self.redis_db}")
        return (
            f"agent_id={self.agent_id} redis={where} tls={'on' if self.redis_ssl else 'off'} "
            f"signing={'on' if self.shared_secret else 'off'} workers={self.worker_count} "
            f"stream={'on' if self.command_stream else 'off'} "
            f"outbox={self.outbox_db} repos={','.join(self.git_repo_paths)} "
            f"containers={','.join(self.docker_containers)}"
        )

    def replace(self, **changes: Any) -> Config:
        """A copy with some fields changed (tests and the CLI use it)."""
        return dataclasses.replace(self, **changes)


def redact_url(url: str) -> str:
    """``url`` with the password of its ``user:password@`` part as ``***``: a Redis URL, or a git
    remote (https tokens hide there). Text that is not a URL comes back as it is."""
    try:
        parts = urlsplit(url)
        password = parts.password
    except ValueError:  # e.g. an unclosed [ in the host: redact by hand what looks like user:password@
        return re.sub(r"(//[^/@:]*):[^/@]*@", r"\1:***@", url)
    if password is None:
        return url
    netloc = parts.netloc.rsplit("@", 1)[1]
    user = f"{parts.username}:***@" if parts.username else ":***@"
    return parts._replace(netloc=user + netloc).geturl()


class _Reader:
    """Reads variables from the environment with environs, turning failures into one clear line."""

    def __init__(self, env: Env):
        self.env = env

    def raw(self, name: str) -> str | None:
        """The variable's text (environment first, then ``.env``), None when unset or empty."""
        value = self.env.str(name, None)
        return value if value not in (None, "") else None

    def str(self, name: str, default: str | None = None) -> str | None:
        return self.env.str(name, default) or default

    def int(self, name: str, default: int, lo: int, hi: int | None = None) -> int:
        raw = self.raw(name)
        if raw is None:
            return default
        try:
            value = self.env.int(name)
        except Exception:
            raise ConfigError(f"{name}: expected a whole number, got {raw!r}") from None
        if value < lo or (hi is not None and value > hi):
            bounds = f"from {lo} to {hi}" if hi is not None else f"of at least {lo}"
            raise ConfigError(f"{name}: expected a whole number {bounds}, got {value}")
        return value

    def float(self, name: str, default: float, lo: float) -> float:
        raw = self.raw(name)
        if raw is None:
            return default
        try:
            value = self.env.float(name)
        except Exception:
            raise ConfigError(f"{name}: expected a number of seconds, got {raw!r}") from None
        if value < lo:
            raise ConfigError(f"{name}: expected a number of at least {lo}, got {value}")
        return value

    def bool(self, name: str, default: bool) -> bool:
        raw = self.raw(name)
        if raw is None:
            return default
        lowered = raw.strip().lower()
        if lowered in ("1", "true", "yes", "on"):
            return True
        if lowered in ("0", "false", "no", "off"):
            return False
        raise ConfigError(f"{name}: expected true or false (1/0, yes/no, on/off), got {raw!r}")

    def list(self, name: str, default: tuple[str, ...]) -> tuple[str, ...]:
        raw = self.raw(name)
        if raw is None:
            return default
        items = tuple(item.strip() for item in raw.split(",") if item.strip())
        if not items:
            raise ConfigError(f"{name}: expected a comma-separated list with at least one entry, got {raw!r}")
        return items

    def file(self, name: str) -> str | None:
        path = self.str(name)
        if path is not None and not os.path.isfile(path):
            raise ConfigError(f"{name}: expected a readable file, but {path!r} does not exist")
        return path


def check_env_file(path: str) -> None:
    """Refuse a ``.env`` that others could read (it may hold secrets) or change (it names binaries).

    Raises ConfigError with the command that fixes it.
    """
    st = os.stat(path)
    if st.st_mode & 0o077:
        raise ConfigError(
            f"{path}: readable or writable by group or others (mode {stat.S_IMODE(st.st_mode):04o}); "
            f"it may hold REDIS_PASSWORD and COCKPIT_SHARED_SECRET: run chmod 600 {path}"
        )
    if st.st_uid not in (os.getuid(), 0):
        raise ConfigError(
            f"{path}: owned by uid {st.st_uid}, not by the agent's user (uid {os.getuid()}) or root; "
            f"whoever owns it can change what the agent runs: run chown {os.getuid()} {path}"
        )


# Secrets come from, in this order: the variable itself, a file named by VAR_FILE, or a systemd
# credential (LoadCredential=name:/path) in $CREDENTIALS_DIRECTORY. Setting two is an error.
SECRET_SOURCES = {
    "REDIS_PASSWORD": "redis_password",
    "COCKPIT_SHARED_SECRET": "shared_secret",
}


def read_secret(r: _Reader, name: str) -> str | None:
    """The secret ``name`` from the environment, ``{name}_FILE`` or the systemd credential."""
    value = r.str(name)
    file_var = f"{name}_FILE"
    file_path = r.str(file_var)
    credential = None
    credentials_dir = os.environ.get("CREDENTIALS_DIRECTORY")
    if credentials_dir and os.path.exists(os.path.join(credentials_dir, SECRET_SOURCES[name])):
        credential = os.path.join(credentials_dir, SECRET_SOURCES[name])
    if value is not None and file_path is not None:
        raise ConfigError(f"{name} and {file_var} are both set; set only one of them")
    if value is not None:
        return value
    path, origin = (file_path, file_var) if file_path is not None else (credential, "systemd credential")
    if path is None:
        return None
    try:
        with open(path, encoding="utf-8") as f:
            secret = f.read()
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else "not UTF-8 text"
        raise ConfigError(f"{origin}: cannot read the {name} from {path!r}: {reason}") from None
    secret = secret.rstrip("\r\n")  # editors and `echo` add a final newline; it is not part of the secret
    if not secret:
        raise ConfigError(f"{origin}: {path!r} is empty; it must hold the {name}")
    return secret


def load(env_file: str | None = None) -> Config:
    """Build the Config from the environment, reading ``env_file`` (default ``./.env``) first.

    Values already in the environment win over the file. Raises ConfigError on the first
    bad value, and on a ``.env`` that group or others can read.
    """
    env = Env(expand_vars=False)
    path = env_file or os.environ.get("COCKPIT_AGENT_ENV_FILE") or ".env"
    if os.path.isfile(path):
        check_env_file(path)
        env.read_env(path, recurse=False, override=False)
    r = _Reader(env)

    agent_id = r.str("AGENT_HOSTNAME") or r.str("AGENT_ID") or socket.gethostname()
    if not _AGENT_ID_RE.fullmatch(agent_id):
        raise ConfigError(
            "AGENT_HOSTNAME/AGENT_ID: expected 1-200 characters of letters, digits and ._@:- "
            f"starting with a letter or digit, got {agent_id!r}"
        )

    redis_url = r.str("REDIS_URL")
    url_password = None
    if redis_url:
        parts = urlsplit(redis_url)
        if parts.scheme not in ("redis", "rediss", "unix"):
            raise ConfigError("REDIS_URL: expected a redis://, rediss:// or unix:// URL")
        try:
            url_password = parts.password
            parts.port  # noqa: B018 - raises on a malformed port
        except ValueError:
            raise ConfigError("REDIS_URL: the port is not a number") from None
    password = read_secret(r, "REDIS_PASSWORD")
    if not password and not url_password:
        raise ConfigError(
            "REDIS_PASSWORD: required (or REDIS_PASSWORD_FILE, the systemd credential redis_password, "
            "or a REDIS_URL that carries the password); it is not set"
        )

    log_level = (r.str("LOG_LEVEL") or r.str("LOGLEVEL") or "INFO").upper()
    if log_level not in _LOG_LEVELS:
        raise ConfigError(f"LOG_LEVEL: expected one of {', '.join(_LOG_LEVELS)}, got {log_level!r}")

    repos = tuple(os.path.normpath(p) for p in r.list("GIT_REPO_PATH", ("/opt/app/config",)))
    for repo in repos:
        if not os.path.isabs(repo):
            raise ConfigError(f"GIT_REPO_PATH: expected absolute paths, got {repo!r}")
    # Resolved once, here: a symlink put into the whitelist or re-pointed later must not move it.
    repos = tuple(os.path.realpath(p) for p in repos)
    containers = r.list("DOCKER_CONTAINER_NAME", ("grafana",))
    for name in containers:
        if not CONTAINER_NAME_RE.fullmatch(name):
            raise ConfigError(
                f"DOCKER_CONTAINER_NAME: {name!r} is not a valid container name "
                "(letters, digits and _.- starting with a letter or digit)"
            )

    synchronous = (r.str("OUTBOX_SYNCHRONOUS") or "NORMAL").upper()
    if synchronous not in ("NORMAL", "FULL"):
        raise ConfigError(f"OUTBOX_SYNCHRONOUS: expected NORMAL or FULL, got {synchronous!r}")

    log_format = (r.str("LOG_FORMAT") or "text").lower()
    if log_format not in ("text", "json"):
        raise ConfigError(f"LOG_FORMAT: expected text or json, got {log_format!r}")
    metrics_port = r.int("METRICS_PORT", 0, 0, 65535) or None
    handlers_dir = r.str("HANDLERS_DIR")
    if handlers_dir is not None and not os.path.isabs(handlers_dir):
        raise ConfigError(f"HANDLERS_DIR: expected an absolute path, got {handlers_dir!r}")

    sentinels = tuple(_host_port("REDIS_SENTINELS", item) for item in r.list("REDIS_SENTINELS", ()))
    sentinel_master = r.str("REDIS_SENTINEL_MASTER")
    if sentinels and not sentinel_master:
        raise ConfigError("REDIS_SENTINEL_MASTER: required with REDIS_SENTINELS (the name the sentinels monitor)")
    if sentinel_master and not sentinels:
        raise ConfigError("REDIS_SENTINELS: required with REDIS_SENTINEL_MASTER (a host:port list of sentinels)")
    if sentinels and redis_url:
        raise ConfigError("REDIS_URL: not allowed together with REDIS_SENTINELS (the sentinels name the master)")

    # Longer than the signature window, so that a replay of a signed command is either refused
    # as stale or found in the database (PROTOCOL.md); a pruned one would run again.
    command_retention = r.int("COMMAND_RETENTION", 7 * 86400, 1)
    if command_retention <= SIGNATURE_MAX_AGE:
        raise ConfigError(f"COMMAND_RETENTION: expected more than the {SIGNATURE_MAX_AGE} s signature window "
                          f"(a replayed command must be stale before it is forgotten), got {command_retention}")

    shared_secret = read_secret(r, "COCKPIT_SHARED_SECRET")
    return Config(
        agent_id=agent_id,
        redis_host=r.str("REDIS_HOST", "localhost"),
        redis_port=r.int("REDIS_PORT", 6379, 1, 65535),
        redis_db=r.int("REDIS_DB", 0, 0, 65535),
        redis_username=r.str("REDIS_USERNAME"),
        redis_password=password,
        redis_url=redis_url,
        redis_ssl=r.bool("REDIS_SSL", bool(redis_url and redis_url.startswith("rediss://"))),
        redis_tls_verify=r.bool("REDIS_TLS_VERIFY", True),
        redis_tls_ca_cert=r.file("REDIS_TLS_CA_CERT"),
        redis_tls_cert=r.file("REDIS_TLS_CERT"),
        redis_tls_key=r.file("REDIS_TLS_KEY"),
        redis_socket_timeout=r.float("REDIS_SOCKET_TIMEOUT", 10.0, 0.1),
        redis_sentinels=sentinels,
        redis_sentinel_master=sentinel_master,
        redis_sentinel_password=r.str("REDIS_SENTINEL_PASSWORD") or password,
        git_repo_paths=repos,
        docker_containers=containers,
        heartbeat_interval=r.int("HEARTBEAT_INTERVAL", 30, 1, 3600),
        command_timeout=r.int("COMMAND_TIMEOUT", 30, 1, 86400),
        docker_timeout=r.int("DOCKER_TIMEOUT", 60, 1, 86400),
        shared_secret=shared_secret,
        outbox_db=r.str("OUTBOX_DB", "/var/lib/cockpit-agent/outbox.db"),
        outbox_synchronous=synchronous,
        worker_count=r.int("WORKER_COUNT", 4, 1, 64),
        queue_max=r.int("QUEUE_MAX", 1000, 1),
        output_limit=r.int("OUTPUT_LIMIT", 64 * 1024, 256),
        max_message_bytes=r.int("MAX_MESSAGE_BYTES", 1024 * 1024, 1024),
        response_retry_seconds=r.int("RESPONSE_RETRY_SECONDS", 300, 0),
        result_ttl=r.int("RESULT_TTL", 3600, 1),
        command_retention=command_retention,
        shutdown_grace=r.float("SHUTDOWN_GRACE", 20.0, 0.0),
        listener_stall_timeout=r.float("LISTENER_STALL_TIMEOUT", 60.0, 1.0),
        listener_buffer_bytes=r.int("LISTENER_BUFFER_BYTES", 256 * 1024 * 1024, 1024 * 1024),
        command_stream=r.bool("COMMAND_STREAM", False),
        git_bin=r.str("GIT_BIN", "git"),
        docker_bin=r.str("DOCKER_BIN", "docker"),
        log_level=log_level,
        log_format=log_format,
        metrics_port=metrics_port,
        metrics_addr=r.str("METRICS_ADDR", "127.0.0.1"),
        handlers_dir=handlers_dir,
        stall_seconds=r.int("STALL_SECONDS", 60, 1, 86400),
    )


def _host_port(name: str, item: str) -> tuple[str, int]:
    host, sep, port = item.rpartition(":")
    if not sep or not host or not port.isdigit() or not 1 <= int(port) <= 65535:
        raise ConfigError(f"{name}: expected a comma-separated list of host:port, got {item!r}")
    return host.strip("[]"), int(port)


def secrets_of(config: Config) -> list[str]:
    """The secret strings no log line, output or error may let through (masked by sealed.mask)."""
    found = [config.redis_password, config.shared_secret, config.redis_sentinel_password]
    if config.redis_url:
        found.append(urlsplit(config.redis_url).password)
    return [s for s in found if s]


class RedactSecrets(logging.Filter):
    """A last line of defence: replaces any secret that reaches a log record with ``***``."""

    def __init__(self, secrets: list[str]):
        super().__init__()
        self.secrets = maskable(secrets)

    def filter(self, record: logging.LogRecord) -> bool:
        if not self.secrets:
            return True
        message = record.getMessage()
        cleaned = mask(message, self.secrets)
        if cleaned != message:
            record.msg, record.args = cleaned, None
        return True
