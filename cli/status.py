"""``cockpit-agent status``: the registry entry as the backend sees it, then the local counts."""

from __future__ import annotations

import argparse
import time

import redis

from cli.common import age, open_db, redis_problem, when, where
from config import Config
from errors import EX_FAIL, EX_OK, EX_UNAVAILABLE

ONLINE_MAX_AGE = 90  # the backend's rule: online while last_heartbeat is younger than this


def status(config: Config, args: argparse.Namespace) -> int:
    """``status``: the registry entry and heartbeat age, then the local counts."""
    code = EX_FAIL
    print(f"agent:        {config.agent_id}")
    try:
        entry = {k.decode(): v.decode("utf-8", "replace") for k, v in
                 config.redis_client().hgetall(config.registry_key).items()}
    except (redis.ConnectionError, redis.TimeoutError, redis.AuthenticationError) as exc:
        print(f"registry:     Redis at {where(config)} unreachable: {redis_problem(exc)}")
        code = EX_UNAVAILABLE
    else:
        if not entry:
            print(f"registry:     no {config.registry_key} in Redis (never started, or not seen for "
                  f"3 x HEARTBEAT_INTERVAL)")
        else:
            now = time.time()
            beat = float(entry.get("last_heartbeat") or 0)
            online = entry.get("status") == "online" and now - beat < ONLINE_MAX_AGE
            code = EX_OK if online else EX_FAIL
            print(f"registry:     {entry.get('status', '?')}; heartbeat {age(now - beat)} ago "
                  f"({'online' if online else 'offline'} for the backend)")
            started = float(entry.get("started_at") or 0)
            print(f"version:      {entry.get('version', '?')} on {entry.get('hostname', '?')}, "
                  f"started {when(started)} ({age(now - started)} ago)")
            print(f"commands:     {entry.get('capabilities', '')}")
            print(f"executed:     {entry.get('commands_executed', '0')}")
    db = open_db(config)
    if db is not None:
        counts, oldest = db.counts(), db.oldest_waiting()
        waiting = f"{counts['outbox']} waiting in outbox" + (f" (oldest {age(time.time() - oldest)})" if oldest else "")
        print(f"local:        {counts['queued']} queued, {counts['running']} running, {counts['done']} done; {waiting}")
        print(f"database:     {config.outbox_db}")
        db.close()
    return code
