"""The SQLite store: the ``commands`` table (what was accepted and how it ended) and the
``outbox`` table (what still has to be published).

Each Store owns one connection and belongs to the thread that created it (sqlite3 refuses to
share it). Every thread that needs the database opens its own Store.
"""

from __future__ import annotations

import json
import os
import sqlite3
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import Any

import sqlite_utils

SCHEMA = (Path(__file__).with_name("schema.sql")).read_text()
SCHEMA_VERSION = 1


class State(str, Enum):
    """Where a command is in its life; stored as this text in ``commands.state``."""

    QUEUED = "queued"
    RUNNING = "running"
    DONE = "done"


@dataclass(frozen=True)
class Message:
    """A message to publish: the response JSON, its channel, and the key it is also stored at.

    ``result_key`` is None for answers that must not be tied to the id they carry (refusals
    of unauthenticated messages, re-sends of a stored response).
    """

    channel: str
    payload: str
    command_id: str | None = None
    result_key: str | None = None


@dataclass(frozen=True)
class Accepted:
    """What ``accept`` found: ``new`` is False for a command_id seen before, with its row."""

    new: bool
    row: dict[str, Any]


class Store:
    """One thread's connection to the outbox database."""

    def __init__(self, path: str, synchronous: str = "NORMAL"):
        if path != ":memory:":
            parent = os.path.dirname(os.path.abspath(path))
            os.makedirs(parent, mode=0o700, exist_ok=True)
        conn = sqlite3.connect(path, timeout=30)
        self.path = path
        self.db = sqlite_utils.Database(conn, execute_plugins=False)
        self.db.execute("PRAGMA journal_mode=WAL")
        # NORMAL in WAL mode: a commit is in the WAL file before commit() returns, so it
        # survives the agent being killed (SIGKILL, OOM killer, a crash); only an OS crash or
        # power loss can lose the last few commits. FULL adds an fsync per commit for those.
        self.db.execute(f"PRAGMA synchronous={'FULL' if synchronous == 'FULL' else 'NORMAL'}")
        self.db.execute("PRAGMA busy_timeout=30000")
        if self.db.execute("PRAGMA user_version").fetchone()[0] < SCHEMA_VERSION:
            with self.immediate():
                self.db.executescript(SCHEMA)
                self.db.execute(f"PRAGMA user_version={SCHEMA_VERSION}")

    def close(self) -> None:
        """Close the connection."""
        self.db.close()

    @contextmanager
    def immediate(self) -> Iterator[None]:
        """A write transaction that takes the write lock up front (no upgrade deadlocks)."""
        self.db.execute("BEGIN IMMEDIATE")
        try:
            yield
        except BaseException:
            self.db.rollback()
            raise
        else:
            self.db.commit()

    # -- commands -------------------------------------------------------------------------------

    def accept(
        self,
        command_id: str,
        command: str,
        params: dict[str, Any],
        sender: str | None = None,
        refusal: tuple[dict[str, Any], Message] | None = None,
    ) -> Accepted:
        """Record a command before it is queued; a known command_id is not recorded again.

        With ``refusal`` (the error response and its message) the command is recorded as
        already done and its answer queued for publishing, in the same transaction.
        """
        now = time.time()
        with self.immediate():
            existing = self.get(command_id)
            if existing is not None:
                return Accepted(False, existing)
            row: dict[str, Any] = {
                "command_id": command_id,
                "command": command,
                "params": json.dumps(params, separators=(",", ":")),
                "sender": sender,
                "state": State.QUEUED.value,
                "received_at": now,
            }
            if refusal is not None:
                response, message = refusal
                row.update(
                    state=State.DONE.value, status=response["status"], error=response["error"],
                    execution_time_ms=response["execution_time_ms"], finished_at=now,
                    response=message.payload,
                )
                self._enqueue(message, now)
            self.db["commands"].insert(row)
            return Accepted(True, row)

    def get(self, command_id: str) -> dict[str, Any] | None:
        """The ``commands`` row of ``command_id``, or None."""
        rows = list(self.db.query("SELECT * FROM commands WHERE command_id = ?", [command_id]))
        return rows[0] if rows else None

    def claim(self, command_id: str) -> bool:
        """Move a queued command to running; False if it is not queued (never run it then)."""
        cursor = self.db.execute(
            "UPDATE commands SET state = 'running', started_at = ? WHERE command_id = ? AND state = 'queued'",
            [time.time(), command_id],
        )
        return cursor.rowcount == 1

    def finish(
        self,
        command_id: str,
        status: str,
        full_output: str | None,
        error: str | None,
        execution_time_ms: int,
        message: Message,
    ) -> None:
        """Record how a command ended and queue its response, in one transaction."""
        now = time.time()
        with self.immediate():
            self.db.execute(
                "UPDATE commands SET state = 'done', status = ?, output = ?, error = ?, "
                "execution_time_ms = ?, finished_at = ?, response = ? WHERE command_id = ?",
                [status, full_output, error, execution_time_ms, now, message.payload, command_id],
            )
            self._enqueue(message, now)

    def pending(self) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
        """Rows left ``running`` (interrupted) and ``queued`` by an earlier run, in arrival order."""
        rows = list(self.db.query("SELECT * FROM commands WHERE state != 'done' ORDER BY seq"))
        running = [r for r in rows if r["state"] == State.RUNNING.value]
        queued = [r for r in rows if r["state"] == State.QUEUED.value]
        return running, queued

    def counts(self) -> dict[str, int]:
        """Commands by state, plus the number of messages waiting in the outbox."""
        counts = {s.value: 0 for s in State}
        for row in self.db.query("SELECT state, count(*) AS n FROM commands GROUP BY state"):
            counts[row["state"]] = row["n"]
        counts["outbox"] = self.db.execute("SELECT count(*) FROM outbox").fetchone()[0]
        return counts

    # -- outbox ---------------------------------------------------------------------------------

    def enqueue(self, message: Message) -> int:
        """Queue a message for publishing; returns its outbox id."""
        with self.immediate():
            return self._enqueue(message, time.time())

    def _enqueue(self, message: Message, now: float) -> int:
        cursor = self.db.execute(
            "INSERT INTO outbox (channel, payload, command_id, result_key, created_at, next_attempt_at) "
            "VALUES (?, ?, ?, ?, ?, 0)",
            [message.channel, message.payload, message.command_id, message.result_key, now],
        )
        return cursor.lastrowid

    def due(self, limit: int, now: float | None = None) -> list[dict[str, Any]]:
        """Up to ``limit`` outbox rows whose turn has come, oldest first."""
        now = time.time() if now is None else now
        return list(
            self.db.query(
                "SELECT * FROM outbox WHERE next_attempt_at <= ? ORDER BY id LIMIT ?", [now, limit]
            )
        )

    def next_due(self) -> float | None:
        """When the next outbox row is due (unix seconds), or None when the outbox is empty."""
        return self.db.execute("SELECT min(next_attempt_at) FROM outbox").fetchone()[0]

    def delivered(self, ids: list[int]) -> None:
        """Delete delivered messages."""
        if ids:
            with self.immediate():
                self.db.conn.executemany("DELETE FROM outbox WHERE id = ?", [(i,) for i in ids])

    def unheard(self, retries: list[tuple[int, float]], now: float) -> None:
        """Reschedule messages that reached no receiver: ``(id, next_attempt_at)`` pairs."""
        if retries:
            with self.immediate():
                self.db.conn.executemany(
                    "UPDATE outbox SET attempts = attempts + 1, next_attempt_at = ?, "
                    "unheard_since = coalesce(unheard_since, ?), last_error = 'no receiver' WHERE id = ?",
                    [(when, now, i) for i, when in retries],
                )

    def hold(self, ids: list[int], until: float) -> None:
        """Keep published messages out of ``due`` until ``until`` (unix s) while they are confirmed."""
        if ids:
            with self.immediate():
                self.db.conn.executemany("UPDATE outbox SET next_attempt_at = ? WHERE id = ?", [(until, i) for i in ids])

    def due_now(self, ids: list[int]) -> None:
        """Make these messages due at once (their publication was lost with a Redis restart)."""
        if ids:
            with self.immediate():
                self.db.conn.executemany("UPDATE outbox SET next_attempt_at = 0 WHERE id = ?", [(i,) for i in ids])

    def retry_all_now(self) -> int:
        """Make every waiting message due now (Redis is back; no reason to wait out a backoff)."""
        return self.db.execute("UPDATE outbox SET next_attempt_at = 0 WHERE next_attempt_at > 0").rowcount
