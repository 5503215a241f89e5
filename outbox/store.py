"""The SQLite store: the ``commands`` table (what was accepted and how it ended) and the
``outbox`` table (what still has to be published).

Each Store owns one connection and belongs to the thread that created it (sqlite3 refuses to
share it). Every thread that needs the database opens its own Store.
"""

from __future__ import annotations

import functools
import json
import os
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import Any

import sqlite_utils

from errors import StoreUnavailable

SCHEMA = (Path(__file__).with_name("schema.sql")).read_text()
SCHEMA_VERSION = 2

# Version 1 kept each output twice (``output``, and inside ``response``) and had no views. Its
# column becomes ``full_output`` and ``output`` is added, read from either: two changes to the
# table's definition, no copy of its rows (a year of them took 20 s). Its old rows keep their
# second copy until they are pruned; the rest of SCHEMA (views, ``pruned``) is created as for a
# new file.
_FROM_V1 = (
    "ALTER TABLE commands RENAME COLUMN output TO full_output;\n"
    "ALTER TABLE commands ADD COLUMN output TEXT GENERATED ALWAYS AS (coalesce(full_output, CASE WHEN "
    "json_valid(response) THEN json_extract(response, '$.output') END)) VIRTUAL;\n"
    + SCHEMA
)

# What ``outbox.last_error`` says while the flusher cannot reach Redis (``mark_unreachable``).
UNREACHABLE = "Redis unreachable since "

# One lock per database file, shared by every Store of this process. SQLite lets one writer
# in at a time and makes the others poll with sleeps of 1, 2, 5, 10... ms (busy_timeout);
# with a listener, four workers and a flusher writing, those sleeps were most of a command's
# latency. Queuing on a Python lock instead wakes the next writer the moment the last one
# commits. busy_timeout still covers writers in other processes (the sqlite3 shell).
_write_locks: dict[str, threading.Lock] = {}
_write_locks_guard = threading.Lock()


def _write_lock(path: str) -> threading.Lock:
    if path == ":memory:":
        return threading.Lock()
    key = os.path.realpath(path)
    with _write_locks_guard:
        return _write_locks.setdefault(key, threading.Lock())


# Params are kept as the wire's compact JSON, ASCII-only (exactly as protocol.encode writes it).
_compact_json = json.JSONEncoder(separators=(",", ":")).encode


def _statements(script: str) -> Iterator[str]:
    """The statements of an SQL script, one at a time (``executescript`` would commit first)."""
    pending = ""
    for line in script.splitlines(keepends=True):
        pending += line
        if sqlite3.complete_statement(pending):
            yield pending
            pending = ""


def _kept_output(full_output: str | None, payload: str) -> str | None:
    """What ``commands.full_output`` keeps: the full output only where the response does not
    carry it whole (each output is stored once; ``commands.output`` reads it from either)."""
    if full_output is None or len(full_output) > len(payload):
        return full_output
    try:
        sent = json.loads(payload).get("output")
    except (ValueError, AttributeError):
        return full_output
    return None if sent == full_output else full_output


def _guarded(method: Callable[..., Any]) -> Callable[..., Any]:
    """Raise StoreUnavailable, not sqlite3.Error: callers handle one error of their own tree."""
    @functools.wraps(method)
    def call(self: Store, *args: Any, **kwargs: Any) -> Any:
        try:
            return method(self, *args, **kwargs)
        except sqlite3.Error as exc:
            raise StoreUnavailable(f"{self.path}: {exc}") from exc
    return call


@functools.lru_cache(maxsize=8)
def _insert_command_sql(columns: tuple[str, ...]) -> str:
    """INSERT of a ``commands`` row with these columns; a known command_id inserts nothing."""
    return (f"INSERT INTO commands ({', '.join(columns)}) VALUES ({', '.join('?' * len(columns))}) "
            "ON CONFLICT (command_id) DO NOTHING")


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
    """What ``accept`` found: ``new`` is False for a command_id seen before, with its row.

    ``outbox_id`` is the id of the answer it queued, if it was given one.
    """

    new: bool
    row: dict[str, Any]
    outbox_id: int | None = None


class Store:
    """One thread's connection to the outbox database. Every method raises StoreUnavailable
    when SQLite fails (a full disk, an I/O error, a file it cannot open)."""

    @_guarded
    def __init__(self, path: str, synchronous: str = "NORMAL", clock: Callable[[], float] = time.time):
        """``clock`` gives the unix time every row is stamped with (the soak simulates a year)."""
        if path != ":memory:":
            parent = os.path.dirname(os.path.abspath(path))
            os.makedirs(parent, mode=0o700, exist_ok=True)
        self.path = path
        self.clock = clock
        # isolation_level=None: no implicit transactions; writes that belong together use
        # ``immediate`` (BEGIN IMMEDIATE ... COMMIT), everything else autocommits. The hot
        # paths use ``_db.execute`` (a thin call); ``_db.query`` returns rows as dicts.
        conn = sqlite3.connect(path, timeout=30, isolation_level=None)
        self._db = sqlite_utils.Database(conn, execute_plugins=False)
        self._write_lock = _write_lock(path)
        self._depth = 0  # nesting of immediate()
        # Before anything writes the first page: a new file is created INCREMENTAL, so pruning
        # can give pages back (``vacuum_step``). An older file needs one VACUUM (``vacuum``).
        self._db.execute("PRAGMA auto_vacuum=INCREMENTAL")
        self._db.execute("PRAGMA journal_mode=WAL")
        # NORMAL in WAL mode: a commit is in the WAL file before commit() returns, so it
        # survives the agent being killed (SIGKILL, OOM killer, a crash); only an OS crash or
        # power loss can lose the last few commits. FULL adds an fsync per commit for those.
        # (OFF only for the benchmark's baseline; OUTBOX_SYNCHRONOUS allows NORMAL and FULL.)
        self._db.execute(f"PRAGMA synchronous={synchronous if synchronous in ('FULL', 'OFF') else 'NORMAL'}")
        self._db.execute("PRAGMA busy_timeout=30000")
        # 256 KiB of page cache per connection, not the default 2 MiB: six connections write
        # in turn and each commit elsewhere invalidates this cache anyway, while a full one
        # (after a catch-up or a scan) stays in the agent's resident memory for good.
        self._db.execute("PRAGMA cache_size=-256")
        if self._db.execute("PRAGMA user_version").fetchone()[0] < SCHEMA_VERSION:
            self._migrate()

    def _migrate(self) -> None:
        """Create the schema, or bring an older file up to SCHEMA_VERSION, in one transaction."""
        with self.immediate():
            version = self._db.conn.execute("PRAGMA user_version").fetchone()[0]
            if version >= SCHEMA_VERSION:
                return  # another Store of this process did it meanwhile
            tables = {row[0] for row in self._db.conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
            columns = {row[1] for row in self._db.conn.execute("PRAGMA table_xinfo(commands)")}
            script = _FROM_V1 if "commands" in tables and "full_output" not in columns else SCHEMA
            for statement in _statements(script):
                self._db.conn.execute(statement)
            self._db.conn.execute(f"PRAGMA user_version={SCHEMA_VERSION}")

    @_guarded
    def close(self) -> None:
        """Close the connection."""
        self._db.close()

    @contextmanager
    def immediate(self) -> Iterator[None]:
        """A write transaction that takes the write lock up front (no upgrade deadlocks).

        Every write of this process goes through here, one at a time (see ``_write_lock``).
        Nested, it joins the outer transaction: all of it is committed or rolled back at once.
        """
        if self._depth:  # inside a group (Intake.handle_many): join its transaction
            self._depth += 1
            try:
                yield
            finally:
                self._depth -= 1
            return
        with self._write_lock:
            try:
                self._db.conn.execute("BEGIN IMMEDIATE")
            except sqlite3.Error as exc:
                raise StoreUnavailable(f"{self.path}: {exc}") from exc
            self._depth = 1
            try:
                yield
            except BaseException:
                try:
                    self._db.rollback()
                except sqlite3.Error:
                    pass  # the error that brought us here is the one to tell
                raise
            else:
                try:
                    self._db.commit()
                except sqlite3.Error as exc:
                    raise StoreUnavailable(f"{self.path}: {exc}") from exc
            finally:
                self._depth = 0

    # -- commands -------------------------------------------------------------------------------

    @_guarded
    def accept(
        self,
        command_id: str,
        command: str,
        params: dict[str, Any],
        sender: str | None = None,
        answer: tuple[dict[str, Any], Message] | None = None,
        output: str | None = None,
        hold_until: float = 0.0,
    ) -> Accepted:
        """Record a command before it is queued; a known command_id is not recorded again.

        With ``answer`` (the response and its message: a refusal, or the answer of a command
        that runs nothing) the command is recorded as already done, with ``output`` as its full
        output, and its answer queued for publishing, in the same transaction; ``hold_until``
        as in ``enqueue``.
        """
        now = self.clock()
        row: dict[str, Any] = {
            "command_id": command_id,
            "command": command,
            "params": _compact_json(params),
            "sender": sender,
            "state": State.QUEUED.value,
            "received_at": now,
        }
        if answer is not None:
            response, message = answer
            row.update(
                state=State.DONE.value, status=response["status"], error=response["error"],
                execution_time_ms=response["execution_time_ms"], finished_at=now,
                response=message.payload, full_output=_kept_output(output, message.payload),
            )
            if response["status"] == "success":
                row["started_at"] = now  # it ran (counts in commands_executed)
        with self.immediate():
            # One statement both checks and records: a known command_id inserts nothing.
            inserted = self._db.conn.execute(_insert_command_sql(tuple(row)), list(row.values())).rowcount
            if not inserted:
                return Accepted(False, self.get(command_id))
            outbox_id = self._enqueue(answer[1], now, hold_until) if answer is not None else None
            return Accepted(True, row, outbox_id)

    @_guarded
    def get(self, command_id: str) -> dict[str, Any] | None:
        """The ``commands`` row of ``command_id``, or None."""
        rows = list(self._db.query("SELECT * FROM commands WHERE command_id = ?", [command_id]))
        return rows[0] if rows else None

    @_guarded
    def claim(self, command_id: str) -> bool:
        """Move a queued command to running; False if it is not queued (never run it then)."""
        with self.immediate():
            cursor = self._db.execute(
                "UPDATE commands SET state = 'running', started_at = ? WHERE command_id = ? AND state = 'queued'",
                [self.clock(), command_id],
            )
        return cursor.rowcount == 1

    @_guarded
    def finish(
        self,
        command_id: str,
        status: str,
        full_output: str | None,
        error: str | None,
        execution_time_ms: int,
        message: Message,
    ) -> bool:
        """Record how a running command ended and queue its response, in one transaction.

        False, writing and queuing nothing, when the row is not ``running``: it was answered
        already (an answer must never be replaced by a second one).
        """
        now = self.clock()
        with self.immediate():
            updated = self._db.execute(
                "UPDATE commands SET state = 'done', status = ?, full_output = ?, error = ?, "
                "execution_time_ms = ?, finished_at = ?, response = ? WHERE command_id = ? AND state = 'running'",
                [status, _kept_output(full_output, message.payload), error, execution_time_ms, now, message.payload,
                 command_id],
            ).rowcount
            if updated:
                self._enqueue(message, now)
        return bool(updated)

    @_guarded
    def refuse(self, command_id: str, error: str, message: Message) -> bool:
        """Answer a queued command that will not run (it fails validation at start-up), in one
        transaction; False, writing and queuing nothing, when the row is not ``queued``."""
        now = self.clock()
        with self.immediate():
            updated = self._db.execute(
                "UPDATE commands SET state = 'done', status = 'error', error = ?, execution_time_ms = 0, "
                "finished_at = ?, response = ? WHERE command_id = ? AND state = 'queued'",
                [error, now, message.payload, command_id],
            ).rowcount
            if updated:
                self._enqueue(message, now)
        return bool(updated)

    @_guarded
    def pending(self) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
        """Rows left ``running`` (interrupted) and ``queued`` by an earlier run, in arrival order."""
        rows = list(self._db.query("SELECT * FROM commands WHERE state != 'done' ORDER BY seq"))
        running = [r for r in rows if r["state"] == State.RUNNING.value]
        queued = [r for r in rows if r["state"] == State.QUEUED.value]
        return running, queued

    @_guarded
    def counts(self) -> dict[str, int]:
        """Commands by state, plus the number of messages waiting in the outbox."""
        counts = {s.value: 0 for s in State}
        for row in self._db.query("SELECT state, count(*) AS n FROM commands GROUP BY state"):
            counts[row["state"]] = row["n"]
        counts["outbox"] = self._db.execute("SELECT count(*) FROM outbox").fetchone()[0]
        return counts

    # -- outbox ---------------------------------------------------------------------------------

    @_guarded
    def enqueue(self, message: Message, hold_until: float = 0.0) -> int:
        """Queue a message for publishing; returns its outbox id.

        ``hold_until`` (unix s) keeps it out of ``due`` until then: the caller publishes it
        itself once this transaction is committed, and makes it due at once if that fails.
        """
        with self.immediate():
            return self._enqueue(message, self.clock(), hold_until)

    def _enqueue(self, message: Message, now: float, hold_until: float = 0.0) -> int:
        cursor = self._db.conn.execute(
            "INSERT INTO outbox (channel, payload, command_id, result_key, created_at, next_attempt_at) "
            "VALUES (?, ?, ?, ?, ?, ?)",
            [message.channel, message.payload, message.command_id, message.result_key, now, hold_until],
        )
        return cursor.lastrowid

    @_guarded
    def due(self, limit: int, now: float | None = None) -> list[dict[str, Any]]:
        """Up to ``limit`` outbox rows whose turn has come, oldest first."""
        now = self.clock() if now is None else now
        return list(
            self._db.query(
                "SELECT * FROM outbox WHERE next_attempt_at <= ? ORDER BY id LIMIT ?", [now, limit]
            )
        )

    @_guarded
    def next_due(self) -> float | None:
        """When the next outbox row is due (unix seconds), or None when the outbox is empty."""
        return self._db.execute("SELECT min(next_attempt_at) FROM outbox").fetchone()[0]

    @_guarded
    def delivered(self, ids: list[int]) -> None:
        """Delete delivered messages."""
        self._by_ids("DELETE FROM outbox WHERE id IN ({})", [], ids)

    # One statement for a whole batch of ids, not one per id (executemany): each statement
    # releases and re-takes the GIL, and with the listener busy each re-take waited for its
    # turn, so deleting a published batch of 500 took 40 ms of the flusher's time.
    _IDS_PER_STATEMENT = 500  # well under SQLite's oldest limit of 999 variables

    def _by_ids(self, sql: str, params: list[Any], ids: list[int]) -> None:
        if not ids:
            return
        with self.immediate():
            for start in range(0, len(ids), self._IDS_PER_STATEMENT):
                chunk = ids[start:start + self._IDS_PER_STATEMENT]
                self._db.conn.execute(sql.format(",".join("?" * len(chunk))), [*params, *chunk])

    @_guarded
    def unheard(self, retries: list[tuple[int, float]], now: float) -> None:
        """Reschedule messages that reached no receiver: ``(id, next_attempt_at)`` pairs."""
        if retries:
            with self.immediate():
                self._db.conn.executemany(
                    "UPDATE outbox SET attempts = attempts + 1, next_attempt_at = ?, "
                    "unheard_since = coalesce(unheard_since, ?), last_error = 'no receiver' WHERE id = ?",
                    [(when, now, i) for i, when in retries],
                )

    @_guarded
    def refused(self, retries: list[tuple[int, float, str]]) -> None:
        """Reschedule messages Redis refused (an ACL without the channel, a script error):
        ``(id, next_attempt_at, reason)``; ``last_error`` says the reason, not 'no receiver'."""
        if retries:
            with self.immediate():
                self._db.conn.executemany(
                    "UPDATE outbox SET attempts = attempts + 1, next_attempt_at = ?, last_error = ? WHERE id = ?",
                    [(when, reason, i) for i, when, reason in retries],
                )

    @_guarded
    def hold(self, ids: list[int], until: float) -> None:
        """Keep published messages out of ``due`` until ``until`` (unix s) while they are confirmed."""
        self._by_ids("UPDATE outbox SET next_attempt_at = ? WHERE id IN ({})", [until], ids)

    @_guarded
    def due_now(self, ids: list[int]) -> None:
        """Make these messages due at once (their publication was lost with a Redis restart)."""
        self._by_ids("UPDATE outbox SET next_attempt_at = 0 WHERE id IN ({})", [], ids)

    @_guarded
    def retry_all_now(self, keep: list[int] | tuple[int, ...] = ()) -> int:
        """Make every waiting message due now (Redis is back; no reason to wait out a backoff),
        except ``keep``: published ones whose confirmation is under way, which must not be
        published again just because Redis came back (that is the confirmation's to decide)."""
        with self.immediate():
            if keep:
                self._db.conn.execute("CREATE TEMP TABLE IF NOT EXISTS keep_held (id INTEGER PRIMARY KEY)")
                self._db.conn.execute("DELETE FROM keep_held")
                self._db.conn.executemany("INSERT INTO keep_held (id) VALUES (?)", [(i,) for i in keep])
            return self._db.conn.execute(
                "UPDATE outbox SET next_attempt_at = 0 WHERE next_attempt_at > 0"
                + (" AND id NOT IN (SELECT id FROM keep_held)" if keep else "")
            ).rowcount

    @_guarded
    def response_waiting(self, command_id: str, also: set[int] | frozenset[int] = frozenset()) -> bool:
        """Is a response of ``command_id`` still to go out: due, waiting for a receiver, or one
        of ``also`` (the outbox ids of answers not yet published)? One already published, held
        only until confirmed, is not."""
        now = self.clock()
        return any(
            outbox_id in also or next_attempt_at <= now or unheard_since is not None
            for outbox_id, next_attempt_at, unheard_since in self._db.execute(
                "SELECT id, next_attempt_at, unheard_since FROM outbox WHERE command_id = ? AND result_key IS NOT NULL",
                [command_id],
            )
        )

    @_guarded
    def executed_count(self) -> int:
        """Commands that ran (started and done), the pruned ones included: the registry's
        ``commands_executed``."""
        return self._db.execute(
            "SELECT count(*) + (SELECT executed FROM pruned) FROM commands WHERE started_at IS NOT NULL AND state = 'done'"
        ).fetchone()[0]

    # -- retention (see outbox/retention.py) ----------------------------------------------------

    @_guarded
    def prune(self, before: float, limit: int = 200) -> int:
        """Delete up to ``limit`` done commands finished before ``before`` (unix s), oldest
        first, in one short transaction; never one whose answer still waits in the outbox.
        Returns how many went (fewer than ``limit``: none older is left)."""
        with self.immediate():
            rows = self._db.conn.execute(
                "SELECT seq, started_at IS NOT NULL FROM commands WHERE state = 'done' AND finished_at < ? "
                "AND command_id NOT IN (SELECT command_id FROM outbox WHERE command_id IS NOT NULL) "
                "ORDER BY finished_at LIMIT ?", [before, limit]).fetchall()
            if not rows:
                return 0
            seqs = [seq for seq, _ in rows]
            self._db.conn.execute(f"DELETE FROM commands WHERE seq IN ({','.join('?' * len(seqs))})", seqs)
            self._db.conn.execute(
                "UPDATE pruned SET commands = commands + ?, executed = executed + ?, last_at = ?",
                [len(rows), sum(ran for _, ran in rows), self.clock()])
        return len(rows)

    @_guarded
    def pruned(self) -> dict[str, Any]:
        """What pruning removed so far: ``commands``, ``executed`` (of those, ran) and ``last_at``."""
        return next(iter(self._db.query("SELECT commands, executed, last_at FROM pruned")))

    @_guarded
    def incremental(self) -> bool:
        """Is the file in auto_vacuum=INCREMENTAL mode (pruned pages can be given back)?"""
        return self._db.execute("PRAGMA auto_vacuum").fetchone()[0] == 2

    @_guarded
    def free_pages(self) -> int:
        """Pages in the file that hold nothing (freed by deletes, reused by the next inserts)."""
        return self._db.execute("PRAGMA freelist_count").fetchone()[0]

    @_guarded
    def vacuum_step(self, pages: int) -> int:
        """Give up to ``pages`` free pages back to the file system; how many free pages remain.
        Holds the write lock as long as that takes: a few ms per thousand pages."""
        with self._write_lock:
            # executescript steps the pragma to its end; execute() would free one page.
            self._db.conn.executescript(f"PRAGMA incremental_vacuum({int(pages)})")
        return self._db.execute("PRAGMA freelist_count").fetchone()[0]

    @_guarded
    def vacuum(self) -> None:
        """Rewrite the whole file once, in auto_vacuum=INCREMENTAL mode (a file made by an older
        agent is not): every write of this process waits meanwhile; it needs free disk space
        as large as the file."""
        with self._write_lock:
            self._db.conn.execute("PRAGMA auto_vacuum=INCREMENTAL")
            self._db.conn.execute("VACUUM")

    @_guarded
    def size(self) -> int:
        """The database's size in bytes (pages in use and free, as SQLite counts them)."""
        page_size = self._db.execute("PRAGMA page_size").fetchone()[0]
        return page_size * self._db.execute("PRAGMA page_count").fetchone()[0]

    # -- why messages wait ----------------------------------------------------------------------

    @_guarded
    def mark_unreachable(self, since: float, after_id: int = 0) -> int:
        """Say on each waiting message after ``after_id`` that Redis has been unreachable since
        ``since`` (unix s): ``last_error`` = ``Redis unreachable since HH:MM:SS UTC``, kept on
        those that say it already. Returns the highest outbox id there is (the next call's
        ``after_id``: one outage marks each row once)."""
        text = UNREACHABLE + time.strftime("%H:%M:%S UTC", time.gmtime(since))
        with self.immediate():
            self._db.conn.execute(
                "UPDATE outbox SET last_error = ? WHERE id > ? AND (last_error IS NULL OR last_error NOT LIKE ?)",
                [text, after_id, UNREACHABLE + "%"])
            return self._db.conn.execute("SELECT coalesce(max(id), ?) FROM outbox", [after_id]).fetchone()[0]

    @_guarded
    def clear_unreachable(self) -> int:
        """Redis answers again: ``last_error`` goes back to what it was ('no receiver' for a
        message that had none, else nothing); how many messages said it."""
        with self.immediate():
            return self._db.conn.execute(
                "UPDATE outbox SET last_error = CASE WHEN unheard_since IS NOT NULL THEN 'no receiver' END "
                "WHERE last_error LIKE ?", [UNREACHABLE + "%"]).rowcount
