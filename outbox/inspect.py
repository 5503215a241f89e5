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
