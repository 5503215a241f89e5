"""The agent's configuration: one frozen Config built from the environment (and ``.env``).

Every variable of PROTOCOL.md is read here and nowhere else. A bad value raises ConfigError
with one line that names the variable and what it expected; secret values never appear in
that line, in ``repr(config)`` or in any log.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import logging
import os
import re
import socket
import stat
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

from dotenv import dotenv_values
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
    redis_cluster_nodes: tuple[tuple[str, int], ...] = ()
    pubsub_sharded: bool = False
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
    # Variables load found set but does not read (a misspelt REDIS_HOTS): one line each, for
    # `check`, the operator commands and the log at start.
    warnings: tuple[str, ...] = field(default=(), compare=False, repr=False)

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
        # redis-py drops the NOPERM code ("this user has no permissions to run the 'x' command");
        # inside a script Redis says "The user executing the script can't run this command ...".
        if "NOPERM" in text or "no permissions to" in text or "user executing the script can't" in text:
            return "the Redis ACL user lacks a permission this agent needs: see docs/redis-acl.md"
        return None

    def redis_client(self, **overrides: Any):
        """A new ``redis.Redis`` client built from this configuration (with REDIS_CLUSTER_NODES a
        ``redis.cluster.RedisCluster``: it finds the slots' masters on first use)."""
        import redis

        kwargs = self.redis_kwargs()
        kwargs.update(overrides)
        if self.redis_cluster_nodes:
            return self._cluster_client(kwargs)
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

    # -- Redis Cluster -------------------------------------------------------------------------
    #
    # With REDIS_CLUSTER_NODES, redis-py's cluster client knows which master holds which slot
    # (runtime/cluster.py asks it); the agent's commands go to that master on a plain client of
    # its own per node (``redis_node_client``), each carrying one key or one channel.

    def _cluster_client(self, kwargs: dict[str, Any]):
        from redis.cluster import ClusterNode, RedisCluster

        for name in ("host", "port", "db", "url"):
            kwargs.pop(name, None)
        return RedisCluster(startup_nodes=[ClusterNode(host, port) for host, port in self.redis_cluster_nodes],
                            **kwargs)

    def redis_node_client(self, host: str, port: int, **overrides: Any):
        """A plain ``redis.Redis`` for one node of the cluster, with this configuration's settings."""
        import redis

        kwargs = self.redis_kwargs()
        kwargs.update(overrides)
        for name in ("url", "db"):
            kwargs.pop(name, None)
        kwargs.update(host=host, port=port)
        return redis.Redis(**kwargs)

    def describe(self) -> str:
        """A one-line summary safe for logs (no secrets)."""
        where = redact_url(self.redis_url) if self.redis_url else f"{self.redis_host}:{self.redis_port}/{self.redis_db}"
        if self.redis_sentinels:
            where = (f"sentinel master {self.redis_sentinel_master} via "
                     f"{','.join(f'{h}:{p}' for h, p in self.redis_sentinels)}/{self.redis_db}")
        if self.redis_cluster_nodes:
            where = (f"cluster via {','.join(f'{h}:{p}' for h, p in self.redis_cluster_nodes)} "
                     f"pubsub={'sharded' if self.pubsub_sharded else 'classic'}")
        return (
            f"agent_id={self.agent_id} redis={where} tls={'on' if self.redis_ssl else 'off'} "
            f"signing={'on' if self.shared_secret else 'off'} workers={self.worker_count} "
            f"stream={'on' if self.command_stream else 'off'} "
            f"outbox={self.outbox_db} repos={','.join(self.git_repo_paths)} "
            + (f"containers={','.join(self.docker_containers)}" if self.docker_containers else "docker_restart=off")
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


def _collected(method):
    """A reader method that records its ConfigError (``_Reader.fail``) and returns the default
    instead, so that ``load`` reports every bad value at once."""

    @functools.wraps(method)
    def read(self: _Reader, name: str, *args: Any) -> Any:
        self.seen.add(name)
        try:
            return method(self, name, *args)
        except ConfigError as exc:
            self.fail(name, str(exc))
            return args[0] if args else None

    return read


class _Reader:
    """Reads variables with environs (the environment first, then the settings file) and
    collects every bad value as one line naming the variable and where it was set."""

    def __init__(self, env: Env, settings: str | None = None, file_values: dict[str, str | None] | None = None):
        self.env = env
        self.settings = settings
        self.file_values = file_values or {}
        self.seen: set[str] = set()  # every name looked up: the known variables
        self.errors: list[str] = []

    def origin(self, name: str) -> str | None:
        """Where ``name`` was set: ``the environment``, the settings file, or None (unset)."""
        if name in os.environ:
            return "the environment"
        if self.file_values.get(name) is not None:
            return self.settings
        return None

    def fail(self, name: str, text: str) -> None:
        """Record a bad value: ``text``, and where ``name`` was set when a settings file was
        read (without one, the environment is the only place it can have come from)."""
        origin = self.origin(name) if self.settings else None
        self.errors.append(f"{text} (from {origin})" if origin else text)

    def guard(self, name: str, check: Callable[..., Any], *args: Any, default: Any = None) -> Any:
        """``check(*args)``, or ``default`` with its ConfigError recorded against ``name``."""
        try:
            return check(*args)
        except ConfigError as exc:
            self.fail(name, str(exc))
            return default

    def is_set_empty(self, name: str) -> bool:
        """True when ``name`` is set, to nothing but blanks (``NAME=``), which unset is not."""
        self.seen.add(name)
        value = os.environ[name] if name in os.environ else self.file_values.get(name)
        return value is not None and not value.strip()

    def raw(self, name: str) -> str | None:
        """The variable's text (environment first, then ``.env``), None when unset or empty."""
        value = self.env.str(name, None)
        return value if value not in (None, "") else None

    @_collected
    def str(self, name: str, default: str | None = None) -> str | None:
        return self.env.str(name, default) or default

    @_collected
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

    @_collected
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

    @_collected
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

    @_collected
    def list(self, name: str, default: tuple[str, ...]) -> tuple[str, ...]:
        raw = self.raw(name)
        if raw is None:
            return default
        items = tuple(item.strip() for item in raw.split(",") if item.strip())
        if not items:
            raise ConfigError(f"{name}: expected a comma-separated list with at least one entry, got {raw!r}")
        return items

    @_collected
    def file(self, name: str) -> str | None:
        path = self.env.str(name, None) or None
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


def read_settings_file(env_file: str | None = None) -> tuple[str | None, dict[str, str | None]]:
    """The settings file ``load`` reads and its variables: ``--env-file``, else
    ``$COCKPIT_AGENT_ENV_FILE``, else ``./.env``; ``(None, {})`` when there is none.

    A file named with ``--env-file`` must exist; the other two may be missing. One that exists
    but cannot be read (permissions, not text) raises ConfigError naming it and why, as does
    one that others could read (``check_env_file``).
    """
    if env_file:
        path, named = env_file, f"--env-file {env_file}"
    elif os.environ.get("COCKPIT_AGENT_ENV_FILE"):
        path = os.environ["COCKPIT_AGENT_ENV_FILE"]
        named = f"the settings file {path} (COCKPIT_AGENT_ENV_FILE)"
    else:
        path, named = ".env", f"the settings file {os.path.abspath('.env')}"
    try:
        st = os.stat(path)
    except (FileNotFoundError, NotADirectoryError):
        if env_file:
            raise ConfigError(f"{named}: no such file") from None
        return None, {}
    except OSError as exc:
        raise ConfigError(f"{named}: cannot read it: {_why(exc)}") from None
    if not stat.S_ISREG(st.st_mode):
        if not env_file and path == ".env":
            return None, {}  # e.g. a virtualenv called .env: not ours
        raise ConfigError(f"{named}: not a regular file")
    check_env_file(path)
    try:
        # As environs reads it (Env.read_env), so the values here are the ones it will see.
        return path, dotenv_values(path)
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{named}: cannot read it: {_why(exc)}") from None


def _why(exc: BaseException) -> str:
    if isinstance(exc, UnicodeDecodeError):
        return "it is not UTF-8 text"
    if isinstance(exc, PermissionError):
        return (f"{exc.strerror}; it is the agent's and may hold its secrets: run this as the agent's user "
                "or with sudo (cockpit-agent drops to the agent's user)")
    return exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)


def load(env_file: str | None = None) -> Config:
    """Build the Config from the environment, reading the settings file (``read_settings_file``) too.

    Values already in the environment win over the file. Raises one ConfigError listing every
    bad value, each naming its variable and where it was set; a variable the agent does not
    know, under a prefix it owns, is a warning in ``Config.warnings``.
    """
    env = Env(expand_vars=False)
    settings, file_values = read_settings_file(env_file)
    if settings is not None:
        env.read_env(settings, recurse=False, override=False)
    r = _Reader(env, settings, file_values)

    hostname, agent_id_var = r.str("AGENT_HOSTNAME"), r.str("AGENT_ID")
    agent_id = hostname or agent_id_var or socket.gethostname()
    if not _AGENT_ID_RE.fullmatch(agent_id):
        r.fail("AGENT_HOSTNAME" if hostname else "AGENT_ID",
               "AGENT_HOSTNAME/AGENT_ID: expected 1-200 characters of letters, digits and ._@:- "
               f"starting with a letter or digit, got {agent_id!r}")

    redis_url = r.str("REDIS_URL")
    url_password = None
    if redis_url:
        parts = urlsplit(redis_url)
        if parts.scheme not in ("redis", "rediss", "unix"):
            r.fail("REDIS_URL", "REDIS_URL: expected a redis://, rediss:// or unix:// URL")
        try:
            url_password = parts.password
            parts.port  # noqa: B018 - raises on a malformed port
        except ValueError:
            r.fail("REDIS_URL", "REDIS_URL: the port is not a number")
    failed = len(r.errors)
    password = r.guard("REDIS_PASSWORD", read_secret, r, "REDIS_PASSWORD")
    if not password and not url_password and len(r.errors) == failed:
        r.fail("REDIS_PASSWORD",
               "REDIS_PASSWORD: required (or REDIS_PASSWORD_FILE, the systemd credential redis_password, "
               "or a REDIS_URL that carries the password); it is not set")

    log_level = (r.str("LOG_LEVEL") or r.str("LOGLEVEL") or "INFO").upper()
    if log_level not in _LOG_LEVELS:
        r.fail("LOG_LEVEL" if r.origin("LOG_LEVEL") else "LOGLEVEL",
               f"LOG_LEVEL: expected one of {', '.join(_LOG_LEVELS)}, got {log_level!r}")
        log_level = "INFO"

    repos = tuple(os.path.normpath(p) for p in r.list("GIT_REPO_PATH", ("/opt/app/config",)))
    for repo in repos:
        if not os.path.isabs(repo):
            r.fail("GIT_REPO_PATH", f"GIT_REPO_PATH: expected absolute paths, got {repo!r}")
    # Resolved once, here: a symlink put into the whitelist or re-pointed later must not move it.
    repos = tuple(os.path.realpath(p) for p in repos)
    # Set to nothing (DOCKER_CONTAINER_NAME=), docker_restart is off; unset, it is grafana's.
    docker_off = r.is_set_empty("DOCKER_CONTAINER_NAME")
    containers = () if docker_off else r.list("DOCKER_CONTAINER_NAME", ("grafana",))
    for name in containers:
        if not CONTAINER_NAME_RE.fullmatch(name):
            r.fail("DOCKER_CONTAINER_NAME",
                   f"DOCKER_CONTAINER_NAME: {name!r} is not a valid container name "
                   "(letters, digits and _.- starting with a letter or digit; empty turns docker_restart off)")

    outbox_db = r.str("OUTBOX_DB", "/var/lib/cockpit-agent/outbox.db")
    r.guard("OUTBOX_DB", check_outbox_path, outbox_db)
    synchronous = (r.str("OUTBOX_SYNCHRONOUS") or "NORMAL").upper()
    if synchronous not in ("NORMAL", "FULL"):
        r.fail("OUTBOX_SYNCHRONOUS", f"OUTBOX_SYNCHRONOUS: expected NORMAL or FULL, got {synchronous!r}")

    log_format = (r.str("LOG_FORMAT") or "text").lower()
    if log_format not in ("text", "json"):
        r.fail("LOG_FORMAT", f"LOG_FORMAT: expected text or json, got {log_format!r}")
    metrics_port = r.int("METRICS_PORT", 0, 0, 65535) or None
    handlers_dir = r.str("HANDLERS_DIR")
    if handlers_dir is not None and not os.path.isabs(handlers_dir):
        r.fail("HANDLERS_DIR", f"HANDLERS_DIR: expected an absolute path, got {handlers_dir!r}")

    sentinels = tuple(filter(None, (r.guard("REDIS_SENTINELS", _host_port, "REDIS_SENTINELS", item)
                                    for item in r.list("REDIS_SENTINELS", ()))))
    sentinel_master = r.str("REDIS_SENTINEL_MASTER")
    if r.raw("REDIS_SENTINELS") and not sentinel_master:
        r.fail("REDIS_SENTINELS", "REDIS_SENTINEL_MASTER: required with REDIS_SENTINELS (the name the sentinels monitor)")
    if sentinel_master and not r.raw("REDIS_SENTINELS"):
        r.fail("REDIS_SENTINEL_MASTER",
               "REDIS_SENTINELS: required with REDIS_SENTINEL_MASTER (a host:port list of sentinels)")
    if sentinels and redis_url:
        r.fail("REDIS_URL", "REDIS_URL: not allowed together with REDIS_SENTINELS (the sentinels name the master)")

    cluster_nodes = tuple(filter(None, (r.guard("REDIS_CLUSTER_NODES", _host_port, "REDIS_CLUSTER_NODES", item)
                                        for item in r.list("REDIS_CLUSTER_NODES", ()))))
    if r.raw("REDIS_CLUSTER_NODES"):
        if r.raw("REDIS_SENTINELS"):
            r.fail("REDIS_CLUSTER_NODES", "REDIS_CLUSTER_NODES: not allowed together with REDIS_SENTINELS "
                                          "(a cluster fails over by itself)")
        if redis_url:
            r.fail("REDIS_URL", "REDIS_URL: not allowed together with REDIS_CLUSTER_NODES (the nodes name the cluster; "
                                "set REDIS_PASSWORD and REDIS_SSL instead)")
        if r.raw("REDIS_DB") not in (None, "", "0"):
            r.fail("REDIS_DB", "REDIS_DB: a Redis Cluster has only database 0; unset it with REDIS_CLUSTER_NODES")
    pubsub_sharded = r.bool("PUBSUB_SHARDED", False)
    if pubsub_sharded and not r.raw("REDIS_CLUSTER_NODES"):
        r.fail("PUBSUB_SHARDED", "PUBSUB_SHARDED: needs REDIS_CLUSTER_NODES (sharded pub/sub is for a Redis Cluster "
                                 "whose backend publishes with SPUBLISH)")

    # Longer than the signature window, so that a replay of a signed command is either refused
    # as stale or found in the database (PROTOCOL.md); a pruned one would run again.
    command_retention = r.int("COMMAND_RETENTION", 7 * 86400, 1)
    if command_retention <= SIGNATURE_MAX_AGE:
        r.fail("COMMAND_RETENTION",
               f"COMMAND_RETENTION: expected more than the {SIGNATURE_MAX_AGE} s signature window "
               f"(a replayed command must be stale before it is forgotten), got {command_retention}")

    shared_secret = r.guard("COCKPIT_SHARED_SECRET", read_secret, r, "COCKPIT_SHARED_SECRET")
    config = Config(
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
        redis_cluster_nodes=cluster_nodes,
        pubsub_sharded=pubsub_sharded,
        git_repo_paths=repos,
        docker_containers=containers,
        heartbeat_interval=r.int("HEARTBEAT_INTERVAL", 30, 1, 3600),
        command_timeout=r.int("COMMAND_TIMEOUT", 30, 1, 86400),
        docker_timeout=r.int("DOCKER_TIMEOUT", 60, 1, 86400),
        shared_secret=shared_secret,
        outbox_db=outbox_db,
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
    warnings = tuple(unknown_variables(r))
    if r.errors:
        raise ConfigError(*r.errors, warnings=warnings)
    return config.replace(warnings=warnings)


def check_outbox_path(path: str) -> None:
    """Refuse an OUTBOX_DB where no database can be: a directory, a path under a regular file,
    a kernel file system (/proc, /sys). ``check`` finds it, and ``run`` stops with this line
    and exit 78 instead of a traceback that systemd would restart ten times. Whether the agent's
    user may write there is for ``check`` to say: this runs for any operator command too."""
    if not path:
        raise ConfigError("OUTBOX_DB: expected the path of the agent's database file, got ''")
    target = os.path.abspath(path)
    if os.path.isdir(target):
        raise ConfigError(f"OUTBOX_DB: {path} is a directory; name the database file, "
                          f"e.g. {os.path.join(path, 'outbox.db')}")
    if os.path.exists(target) and not os.path.isfile(target):
        raise ConfigError(f"OUTBOX_DB: {path} exists and is not a regular file, so it cannot hold the database")
    existing = os.path.dirname(target)
    while not os.path.exists(existing) and os.path.dirname(existing) != existing:
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
        raise ConfigError(f"OUTBOX_DB: {existing} is a file, not a directory, so {path} cannot be created under it")
    kind = _kernel_file_system(existing)
    if kind:
        raise ConfigError(f"OUTBOX_DB: {path} is on the kernel's {kind} file system, which cannot hold a "
                          "database; use a directory on disk (the default is /var/lib/cockpit-agent/outbox.db)")


# File systems the kernel makes up: nothing written there is a file that lasts.
_KERNEL_FILE_SYSTEMS = ("proc", "sysfs", "devpts", "cgroup", "cgroup2", "debugfs", "tracefs", "securityfs",
                        "configfs", "pstore", "bpf", "efivarfs", "fusectl", "binfmt_misc", "mqueue")


def _kernel_file_system(directory: str) -> str | None:
    """The type of the kernel file system ``directory`` is on (``proc``, ``sysfs``...), else None."""
    real = os.path.realpath(directory)
    best, kind = "", None
    try:
        with open("/proc/self/mounts", encoding="utf-8", errors="replace") as f:
            for line in f:
                fields = line.split()
                if len(fields) < 3:
                    continue
                # Spaces and the like in a mount point are written as octal escapes (\040).
                point = re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), fields[1])
                inside = real == point or real.startswith(point.rstrip("/") + "/")
                if inside and len(point) >= len(best):
                    best, kind = point, fields[2]
    except OSError:  # no /proc here: judge by the name
        top = real.split("/")[1] if real.count("/") else ""
        kind = {"proc": "proc", "sys": "sysfs"}.get(top)
    return kind if kind in _KERNEL_FILE_SYSTEMS else None


# Prefixes of the agent's own variables: a name under one that the agent does not read is
# most likely a misspelt one (REDIS_HOTS), so it is a warning. git and docker read variables
# of their own under GIT_ and DOCKER_ (GIT_SSH_COMMAND, DOCKER_HOST), as do other programs
# under LOG_ and MAX_: under these, only a name close to one of the agent's is warned about.
OWNED_PREFIXES = ("REDIS_", "AGENT_", "COCKPIT_", "OUTBOX_", "HEARTBEAT_", "COMMAND_", "WORKER_", "QUEUE_",
                  "OUTPUT_", "RESPONSE_", "RESULT_", "SHUTDOWN_", "LISTENER_", "METRICS_", "HANDLERS_", "STALL_")
SHARED_PREFIXES = ("GIT_", "DOCKER_", "LOG_", "MAX_")
# Read by name outside load's reader: the settings file's own variable.
OTHER_VARIABLES = ("COCKPIT_AGENT_ENV_FILE",)


def unknown_variables(r: _Reader) -> list[str]:
    """A warning for each variable set under an agent's prefix that the agent does not read,
    naming the closest one it does (difflib)."""
    known = sorted(r.seen | set(OTHER_VARIABLES))
    found = []
    for name in sorted(set(os.environ) | {k for k, v in r.file_values.items() if v is not None}):
        if name in known:
            continue
        owned = name.startswith(OWNED_PREFIXES)
        if not owned and not name.startswith(SHARED_PREFIXES):
            continue
        close = difflib.get_close_matches(name, known, n=1, cutoff=0.6 if owned else 0.8)
        if not close and not owned:
            continue
        hint = f"; did you mean {close[0]}?" if close else "; see .env.example for the variables it reads"
        found.append(f"{name} (from {r.origin(name)}): not a variable of the agent, ignored{hint}")
    return found


def missing_repositories(config: Config) -> list[str]:
    """A warning for each GIT_REPO_PATH entry that does not exist (git_pull and git_status there
    are refused until it does)."""
    return [f"GIT_REPO_PATH: repository {repo} does not exist; git_pull and git_status there will fail"
            for repo in config.git_repo_paths if not os.path.isdir(repo)]


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
    """A last line of defence: replaces any secret that reaches a log record with ``***``
    (where it can be told from ordinary text: sealed.looks_generated, sealed.mask)."""

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
        # A traceback quotes exception texts too: formatted here, once, and masked like the line.
        if record.exc_info and not record.exc_text:
            record.exc_text = logging.Formatter().formatException(record.exc_info)
        if record.exc_text:
            record.exc_text = mask(record.exc_text, self.secrets)
        return True
