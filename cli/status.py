"""``cockpit-agent status``: the registry entry as the backend sees it, then the local counts."""

from __future__ import annotations

import argparse
import time
from typing import Any

import redis

from cli.common import age, iso, json_line, open_db, redis_problem, when, where
from config import Config
from errors import EX_FAIL, EX_OK, EX_UNAVAILABLE

ONLINE_MAX_AGE = 90  # the backend's rule: online while last_heartbeat is younger than this


def _number(text: str | None) -> float | None:
    try:
        return float(text) if text else None
    except ValueError:  # the registry is Redis's, anyone with access may have written it
        return None


def gather(config: Config, db_path: str) -> tuple[int, dict[str, Any]]:
    """What ``status`` shows, as one object (``status --json`` prints it), and the exit code."""
    now = time.time()
    facts: dict[str, Any] = {"agent_id": config.agent_id, "registry_key": config.registry_key,
                             "redis": where(config), "redis_error": None, "registry": None,
                             "online": False, "heartbeat_age_s": None, "database": db_path, "local": None}
    code = EX_FAIL
    try:
        entry = {k.decode(): v.decode("utf-8", "replace") for k, v in
                 config.redis_client().hgetall(config.registry_key).items()}
    except (redis.ConnectionError, redis.TimeoutError, redis.AuthenticationError) as exc:
        facts["redis_error"] = redis_problem(exc)
        code = EX_UNAVAILABLE
    else:
        if entry:
            facts["registry"] = entry
            beat = _number(entry.get("last_heartbeat"))
            if beat is not None:
                facts["heartbeat_age_s"] = round(now - beat, 1)
            facts["online"] = entry.get("status") == "online" and beat is not None and now - beat < ONLINE_MAX_AGE
            code = EX_OK if facts["online"] else EX_FAIL
    db = open_db(db_path)
    if db is not None:
        try:
            counts, oldest = db.counts(), db.oldest_waiting()
        finally:
            db.close()
        facts["local"] = {**counts, "oldest_waiting_at": oldest, "oldest_waiting_at_iso": iso(oldest)}
    return code, facts


def status(config: Config, args: argparse.Namespace) -> int:
    """``status``: the registry entry and heartbeat age, then the local counts."""
    code, facts = gather(config, args.db or config.outbox_db)
    if args.json:
        json_line(facts)
        return code
    now = time.time()
    print(f"agent:        {config.agent_id}")
    entry = facts["registry"]
    if facts["redis_error"] is not None:
        print(f"registry:     Redis at {facts['redis']} unreachable: {facts['redis_error']}")
    elif entry is None:
        print(f"registry:     no {config.registry_key} in Redis (never started, or not seen for "
              f"3 x HEARTBEAT_INTERVAL)")
    else:
        beat = facts["heartbeat_age_s"]
        heard = "no heartbeat" if beat is None else f"heartbeat {age(beat)} ago"
        print(f"registry:     {entry.get('status', '?')}; {heard} "
              f"({'online' if facts['online'] else 'offline'} for the backend)")
        started = _number(entry.get("started_at"))
        since = "?" if started is None else f"{when(started)} ({age(now - started)} ago)"
        print(f"version:      {entry.get('version', '?')} on {entry.get('hostname', '?')}, started {since}")
        print(f"commands:     {entry.get('capabilities', '')}")
        print(f"executed:     {entry.get('commands_executed', '0')}")
    local = facts["local"]
    if local is not None:
        oldest = local["oldest_waiting_at"]
        waiting = f"{local['outbox']} waiting in outbox" + (f" (oldest {age(now - oldest)})" if oldest else "")
        print(f"local:        {local['queued']} queued, {local['running']} running, {local['done']} done; {waiting}")
        print(f"database:     {facts['database']}")
    return code
