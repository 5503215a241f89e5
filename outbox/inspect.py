"""Reading the outbox from outside its owner threads (sd_notify, metrics, the operator command)."""

from __future__ import annotations

import os
import sqlite3
from urllib.parse import quote


def connect_read_only(path: str) -> sqlite3.Connection:
    """A read-only connection to the outbox: counting must never create or change the file."""
    return sqlite3.connect(f"file:{quote(os.path.abspath(path))}?mode=ro", uri=True, timeout=5)


def outbox_depth(path: str) -> int | None:
    """Messages waiting in the outbox, or None when the database cannot be read."""
    try:
        db = connect_read_only(path)
        try:
            return db.execute("SELECT count(*) FROM outbox").fetchone()[0]
        finally:
            db.close()
    except sqlite3.Error:
        return None


def _where_ids(ids: list[int]) -> tuple[str, list[int]]:
    if not ids:
        return "", []
    return f" WHERE id IN ({','.join('?' * len(ids))})", list(ids)


class Inspector:
    """The operator command's view of the database (status, outbox, history): rows as
    sqlite3.Row. Owned by one thread; ``close`` when done."""

    def __init__(self, path: str):
        self.db = sqlite3.connect(path, timeout=10)
        self.db.row_factory = sqlite3.Row
        self.db.execute("PRAGMA busy_timeout=10000")

    def close(self) -> None:
        """Close the connection."""
        self.db.close()

    def counts(self) -> dict[str, int]:
        """Commands by state, plus the messages waiting in the outbox."""
        counts = {"queued": 0, "running": 0, "done": 0}
        for row in self.db.execute("SELECT state, count(*) AS n FROM commands GROUP BY state"):
            counts[row["state"]] = row["n"]
        counts["outbox"] = self.db.execute("SELECT count(*) FROM outbox").fetchone()[0]
        return counts

    def oldest_waiting(self) -> float | None:
        """When the oldest message in the outbox was written (unix s), or None."""
        return self.db.execute("SELECT min(created_at) FROM outbox").fetchone()[0]

    def outbox_rows(self) -> list[sqlite3.Row]:
        """Every outbox row, oldest first."""
        return self.db.execute("SELECT * FROM outbox ORDER BY id").fetchall()

    def outbox_row(self, outbox_id: int) -> sqlite3.Row | None:
        """One outbox row, or None."""
        return self.db.execute("SELECT * FROM outbox WHERE id = ?", [outbox_id]).fetchone()

    def resolve(self, refs: list[str]) -> tuple[list[int], list[str]]:
        """The outbox rows that ``refs`` name, each a row id or a command_id (a row matches
        either), in id order; and the refs that match no row."""
        numbers = sorted({int(ref) for ref in refs if ref.isdigit()})
        rows = self.db.execute(
            f"SELECT id, command_id FROM outbox WHERE id IN ({','.join('?' * len(numbers))}) "
            f"OR command_id IN ({','.join('?' * len(refs))}) ORDER BY id", [*numbers, *refs]).fetchall()
        ids = {str(row["id"]) for row in rows}
        command_ids = {row["command_id"] for row in rows}
        missing = [ref for ref in refs if ref not in ids and ref not in command_ids]
        return [row["id"] for row in rows], missing

    def retry(self, ids: list[int]) -> int:
        """Make these outbox rows (all, without ids) due now; how many there were."""
        where, values = _where_ids(ids)
        with self.db:
            return self.db.execute(f"UPDATE outbox SET next_attempt_at = 0{where}", values).rowcount

    def waiting_count(self, ids: list[int]) -> int:
        """How many of these outbox rows (all, without ids) are still there."""
        where, values = _where_ids(ids)
        return self.db.execute(f"SELECT count(*) FROM outbox{where}", values).fetchone()[0]

    def purge(self, ids: list[int]) -> int:
        """Delete these outbox rows (all, without ids): their responses are never published."""
        where, values = _where_ids(ids)
        with self.db:
            return self.db.execute(f"DELETE FROM outbox{where}", values).rowcount

    def history(self, limit: int, status: str | None = None, command: str | None = None,
                since: float | None = None) -> list[sqlite3.Row]:
        """The last ``limit`` commands, oldest first; only those with this ``status``
        (``success``/``error``, or a state: ``queued``, ``running``, ``done``), this ``command``,
        received at or after ``since`` (unix s), when given."""
        where, values = [], []
        if status in ("success", "error"):
            where.append("status = ?")
            values.append(status)
        elif status is not None:
            where.append("state = ?")
            values.append(status)
        if command is not None:
            where.append("command = ?")
            values.append(command)
        if since is not None:
            where.append("received_at >= ?")
            values.append(since)
        clause = f" WHERE {' AND '.join(where)}" if where else ""
        return self.db.execute(
            f"SELECT * FROM (SELECT * FROM commands{clause} ORDER BY seq DESC LIMIT ?) ORDER BY seq",
            [*values, max(1, limit)],
        ).fetchall()

    def command(self, command_id: str) -> sqlite3.Row | None:
        """The ``commands`` row of ``command_id`` (its full output and the response JSON as
        published), or None."""
        return self.db.execute("SELECT * FROM commands WHERE command_id = ?", [command_id]).fetchone()
