"""What the operator commands share: where Redis is, what went wrong with it, where the agent's
database is and opening it as its owner, and how times, text and JSON lines are shown."""

from __future__ import annotations

import json
import os
import re
import sys
import time
from datetime import datetime
from typing import Any
from urllib.parse import urlsplit

import redis
from dotenv import dotenv_values

from config import Config
from errors import ConfigError
from outbox.inspect import Inspector

DEFAULT_DB = Config.outbox_db  # the dataclass default: /var/lib/cockpit-agent/outbox.db


def where(config: Config) -> str:
    """Where Redis is, for a one-line error (a URL's password never shows)."""
    if config.redis_url:
        parts = urlsplit(config.redis_url)
        if parts.scheme == "unix":
            return parts.path
        return f"{parts.hostname}:{parts.port or 6379}"
    return f"{config.redis_host}:{config.redis_port}"


def redis_problem(exc: Exception) -> str:
    """What went wrong with Redis, in words an operator acts on."""
    if isinstance(exc, redis.AuthenticationError) or "WRONGPASS" in str(exc) or "NOAUTH" in str(exc):
        return "authentication failed (check REDIS_PASSWORD and REDIS_USERNAME)"
    return str(exc) or type(exc).__name__


def database_path(db: str | None, env_file: str | None) -> str:
    """The agent's database for the commands that only read it (history, outbox): ``--db``, else
    OUTBOX_DB from the environment, else from the settings file, else the default.

    Nothing else of the configuration is read, so these commands work for a user who has no
    REDIS_PASSWORD (it may be in a file only the agent's user can read). A settings file named
    with --env-file must exist (ConfigError); one that cannot be read is said on stderr and the
    default is used.
    """
    if db:
        return db
    if os.environ.get("OUTBOX_DB"):
        return os.environ["OUTBOX_DB"]
    path = env_file or os.environ.get("COCKPIT_AGENT_ENV_FILE") or ".env"
    try:
        os.stat(path)
        values = dotenv_values(path, interpolate=False)
    except FileNotFoundError:
        if env_file:
            raise ConfigError(f"--env-file {path}: no such file") from None
        return DEFAULT_DB
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else "not UTF-8 text"
        print(f"cockpit-agent: cannot read {path} ({reason}); reading the database at {DEFAULT_DB} "
              "(--db PATH or OUTBOX_DB=PATH names another)", file=sys.stderr)
        return DEFAULT_DB
    return values.get("OUTBOX_DB") or DEFAULT_DB


def open_db(path: str) -> Inspector | None:
    """The agent's database at ``path``, opened as the user who owns it; None (said on stderr)
    when there is none.

    Run as root, the CLI drops to the owner first: a root-owned -wal or -shm file left behind
    would lock the agent out of its own database.
    """
    if not os.path.exists(path):
        print(f"cockpit-agent: no database at {path} (OUTBOX_DB, or --db); has the agent run on this host?",
              file=sys.stderr)
        return None
    st = os.stat(path)
    if os.geteuid() == 0 and st.st_uid != 0:
        os.setgroups([])
        os.setgid(st.st_gid)
        os.setuid(st.st_uid)
    return Inspector(path)


def when(ts: float | None) -> str:
    """A unix time as local ``YYYY-MM-DD HH:MM:SS``; ``-`` for none."""
    return "-" if ts is None else datetime.fromtimestamp(ts).strftime("%Y-%m-%d %H:%M:%S")


def iso(ts: float | None) -> str | None:
    """A unix time as ISO 8601 with its UTC offset, for JSON; None for none."""
    return None if ts is None else datetime.fromtimestamp(ts).astimezone().isoformat(timespec="seconds")


def age(seconds: float) -> str:
    """A duration the way a person says it: ``42 s``, ``5 min``, ``3 h``, ``2 d``."""
    seconds = max(0, int(seconds))
    if seconds < 120:
        return f"{seconds} s"
    if seconds < 7200:
        return f"{seconds // 60} min"
    if seconds < 172800:
        return f"{seconds // 3600} h"
    return f"{seconds // 86400} d"


def one_line(text: str | None, limit: int = 60) -> str:
    """``text`` on one line, cut to ``limit`` characters with ``...``."""
    if not text:
        return ""
    line = " ".join(text.split())
    return line if len(line) <= limit else line[: limit - 3] + "..."


_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(s|m|min|h|d|w)\s*$")
_UNIT_SECONDS = {"s": 1, "m": 60, "min": 60, "h": 3600, "d": 86400, "w": 604800}


def since(text: str, now: float | None = None) -> float:
    """``--since``: ``90s``, ``10m``, ``2h``, ``1d``, ``1w`` ago, or an ISO time (``2026-12-01``,
    ``2026-12-01T08:00``, with or without an offset; without one it is local time). Unix s."""
    match = _DURATION.match(text)
    if match:
        return (time.time() if now is None else now) - float(match.group(1)) * _UNIT_SECONDS[match.group(2)]
    try:
        return datetime.fromisoformat(text.strip()).timestamp()
    except ValueError:
        raise ValueError(f"{text!r}: expected an age like 10m, 2h, 1d or an ISO time like 2026-12-01T08:00") from None


def json_line(value: Any) -> None:
    """Print ``value`` as one line of JSON (``--json``: one object per line, for scripts)."""
    print(json.dumps(value, ensure_ascii=False, separators=(",", ":")))


def parsed_json(text: str | None) -> Any:
    """A stored JSON column as the value it holds; text that is not JSON stays as it is."""
    if text is None:
        return None
    try:
        return json.loads(text)
    except ValueError:
        return text
