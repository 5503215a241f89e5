"""What the operator commands share: where Redis is, what went wrong with it, the agent's
database opened as its owner, and how times and text are shown in one line."""

from __future__ import annotations

import os
import sys
from datetime import datetime
from urllib.parse import urlsplit

import redis

from config import Config
from outbox.inspect import Inspector


def where(config: Config) -> str:
    if config.redis_url:
        parts = urlsplit(config.redis_url)
        if parts.scheme == "unix":
            return parts.path
        return f"{parts.hostname}:{parts.port or 6379}"
    return f"{config.redis_host}:{config.redis_port}"


def redis_problem(exc: Exception) -> str:
    if isinstance(exc, redis.AuthenticationError) or "WRONGPASS" in str(exc) or "NOAUTH" in str(exc):
        return "authentication failed (check REDIS_PASSWORD and REDIS_USERNAME)"
    return str(exc) or type(exc).__name__


def open_db(config: Config) -> Inspector | None:
    """The agent's database, opened as the user who owns it.

    Run as root, the CLI drops to the owner first: a root-owned -wal or -shm file left behind
    would lock the agent out of its own database.
    """
    path = config.outbox_db
    if not os.path.exists(path):
        print(f"cockpit-agent: no database at {path} (OUTBOX_DB); has the agent run on this host?", file=sys.stderr)
        return None
    st = os.stat(path)
    if os.geteuid() == 0 and st.st_uid != 0:
        os.setgroups([])
        os.setgid(st.st_gid)
        os.setuid(st.st_uid)
    return Inspector(path)


def when(ts: float | None) -> str:
    return "-" if ts is None else datetime.fromtimestamp(ts).strftime("%Y-%m-%d %H:%M:%S")


def age(seconds: float) -> str:
    seconds = max(0, int(seconds))
    if seconds < 120:
        return f"{seconds} s"
    if seconds < 7200:
        return f"{seconds // 60} min"
    if seconds < 172800:
        return f"{seconds // 3600} h"
    return f"{seconds // 86400} d"


def one_line(text: str | None, limit: int = 60) -> str:
    if not text:
        return ""
    line = " ".join(text.split())
    return line if len(line) <= limit else line[: limit - 3] + "..."
