#!/usr/bin/env python3
"""The baseline: the floor for any Python agent on redis-py, with no durability at all.

``serve``: subscribe to the command channel, parse each command as JSON, publish a reply on
the response channel, one PUBLISH per command; it writes ``status=online`` in the registry
once the subscription is confirmed, like the agent. Nothing is written to disk, so a crash
loses whatever was in flight. With OUTBOX_DB set it is the durable floor instead: each command
and its answer are committed to SQLite before the PUBLISH (``Durable``).

``catchup``: the floor for draining a backlog: read N payloads (one JSON per line) into memory,
print ``ready``, wait for a line on stdin, then PUBLISH them in pipelines of 500 (the batch
the agent's flusher uses) and exit.

Configured by the same variables as the agent: REDIS_HOST, REDIS_PORT, REDIS_PASSWORD, AGENT_ID.
"""

from __future__ import annotations

import json
import os
import sqlite3
import sys
import time
from pathlib import Path

import redis


def client() -> redis.Redis:
    return redis.Redis(
        host=os.environ.get("REDIS_HOST", "127.0.0.1"),
        port=int(os.environ.get("REDIS_PORT", "6379")),
        password=os.environ.get("REDIS_PASSWORD") or None,
    )


SCHEMA = (Path(__file__).resolve().parent.parent / "outbox" / "schema.sql").read_text()


class Durable:
    """The least a responder must do to lose nothing on SIGKILL: commit the command and its
    answer to SQLite (the agent's schema, WAL, synchronous=NORMAL) before the PUBLISH, and
    delete the answer once published (in one DELETE per 100). No checks, no retries."""

    def __init__(self, path: str):
        self.db = sqlite3.connect(path, isolation_level=None)
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("PRAGMA synchronous=NORMAL")
        self.db.executescript(SCHEMA)
        self.published: list[int] = []

    def record(self, cmd: dict, channel: str, reply: str) -> None:
        now = time.time()
        self.db.execute("BEGIN IMMEDIATE")
        self.db.execute("INSERT INTO commands (command_id, command, params, state, received_at, response) "
                        "VALUES (?, ?, ?, 'done', ?, ?)",
                        (cmd["command_id"], cmd.get("command", ""), json.dumps(cmd.get("params") or {}), now, reply))
        self.published.append(self.db.execute(
            "INSERT INTO outbox (channel, payload, command_id, created_at) VALUES (?, ?, ?, ?)",
            (channel, reply, cmd["command_id"], now)).lastrowid)
        self.db.execute("COMMIT")

    def delivered(self) -> None:
        if len(self.published) >= 100:
            self.db.execute(f"DELETE FROM outbox WHERE id IN ({','.join(map(str, self.published))})")
            self.published = []


def serve(agent_id: str) -> None:
    durable = Durable(os.environ["OUTBOX_DB"]) if os.environ.get("OUTBOX_DB") else None
    r = client()
    pubsub = r.pubsub(ignore_subscribe_messages=True)
    pubsub.subscribe(f"cockpit-agent:{agent_id}")
    while not pubsub.subscribed:
        pubsub.get_message(timeout=0.2)
    r.hset(f"agents:{agent_id}", mapping={"status": "online", "last_heartbeat": int(time.time())})
    channel = f"cockpit-agent-response:{agent_id}"
    for message in pubsub.listen():
        if message["type"] != "message":
            continue
        start = time.monotonic()
        try:
            cmd = json.loads(message["data"])
            reply = {
                "command_id": cmd["command_id"],
                "status": "success",
                "output": (cmd.get("params") or {}).get("message", "pong"),
                "error": None,
            }
        except (ValueError, KeyError, TypeError, AttributeError):
            continue
        reply["execution_time_ms"] = int((time.monotonic() - start) * 1000)
        reply["timestamp"] = int(time.time())
        text = json.dumps(reply, separators=(",", ":"))
        if durable is not None:
            durable.record(cmd, channel, text)
        r.publish(channel, text)
        if durable is not None:
            durable.delivered()


def catchup(path: str, batch: int = 500) -> None:
    with open(path) as f:
        rows = [json.loads(line) for line in f]
    r = client()
    r.ping()
    print("ready", flush=True)
    sys.stdin.readline()
    for i in range(0, len(rows), batch):
        pipe = r.pipeline(transaction=False)
        for channel, payload in rows[i:i + batch]:
            pipe.publish(channel, payload)
        pipe.execute()


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "catchup":
        catchup(sys.argv[2])
    else:
        serve(os.environ["AGENT_ID"])
