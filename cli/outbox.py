"""``cockpit-agent outbox list|show|retry|purge``: the answers still waiting to be published."""

from __future__ import annotations

import argparse
import json
import sqlite3
import sys
import time
from typing import Any

from cli.common import age, database_path, iso, json_line, one_line, open_db, parsed_json, when
from errors import EX_FAIL, EX_OK, EX_USAGE
from outbox.inspect import Inspector

TIMES = ("created_at", "next_attempt_at", "unheard_since")


def outbox(args: argparse.Namespace) -> int:
    """``outbox list|show|retry|purge``; an entry is named by its row id or its command_id."""
    db = open_db(database_path(args.db, args.env_file))
    if db is None:
        return EX_FAIL
    try:
        if args.action == "list":
            return _outbox_list(db, args.json)
        if args.action == "show":
            return _outbox_show(db, args.refs, args.json)
        if args.action == "retry":
            return _outbox_retry(db, args.refs)
        return _outbox_purge(db, args.refs, args.yes)
    finally:
        db.close()


def _as_json(row: sqlite3.Row, payload: bool) -> dict[str, Any]:
    """An outbox row for ``--json``: its columns (times as unix s, plus ``*_iso``); the payload,
    as the JSON value it is, only with ``payload``."""
    out: dict[str, Any] = {}
    for key in row.keys():
        if key == "payload":
            if payload:
                out[key] = parsed_json(row[key])
            continue
        out[key] = row[key]
        if key in TIMES:
            out[key + "_iso"] = iso(row[key] or None)
    return out


def _outbox_list(db: Inspector, as_json: bool) -> int:
    rows = db.outbox_rows()
    if as_json:
        for row in rows:
            json_line(_as_json(row, payload=False))
        return EX_OK
    if not rows:
        print("the outbox is empty: every response was delivered")
        return EX_OK
    now = time.time()
    print(f"{'ID':>6}  {'COMMAND_ID':<36}  {'AGE':>7}  {'TRIES':>5}  {'NEXT':>7}  LAST ERROR")
    for row in rows:
        due = row["next_attempt_at"] - now
        print(f"{row['id']:>6}  {one_line(row['command_id'], 36) or '-':<36}  {age(now - row['created_at']):>7}  "
              f"{row['attempts']:>5}  {'now' if due <= 0 else age(due):>7}  {one_line(row['last_error'], 40)}")
    print(f"{len(rows)} waiting")
    return EX_OK


def _resolve(db: Inspector, refs: list[str]) -> list[int]:
    """The row ids ``refs`` name; each ref that names nothing is said on stderr."""
    ids, missing = db.resolve(refs)
    for ref in missing:
        print(f"cockpit-agent: no outbox entry {ref} (neither a row id nor a command_id waiting here; "
              "delivered already?)", file=sys.stderr)
    return ids


def _outbox_show(db: Inspector, refs: list[str], as_json: bool) -> int:
    if len(refs) != 1:
        print("cockpit-agent: outbox show needs exactly one ID or COMMAND_ID (see: outbox list)", file=sys.stderr)
        return EX_USAGE
    ids = _resolve(db, refs)
    if not ids:
        return EX_FAIL
    for n, outbox_id in enumerate(ids):
        row = db.outbox_row(outbox_id)
        if row is None:  # delivered between the two reads
            continue
        if as_json:
            json_line(_as_json(row, payload=True))
            continue
        if n:
            print()
        for key in row.keys():
            if key == "payload":
                continue
            value = row[key]
            if key in TIMES and value:
                value = f"{when(value)} ({value})"
            print(f"{key + ':':<17}{value if value is not None else '-'}")
        payload = parsed_json(row["payload"])
        print("payload:")
        print(json.dumps(payload, indent=2, ensure_ascii=False) if not isinstance(payload, str) else payload)
    return EX_OK


def _outbox_retry(db: Inspector, refs: list[str]) -> int:
    ids = _resolve(db, refs) if refs else []
    if refs and not ids:
        return EX_FAIL
    changed = db.retry(ids)
    print(f"{changed} message(s) due now; a running agent publishes them within a few seconds")
    return EX_OK if changed or not refs else EX_FAIL


def _outbox_purge(db: Inspector, refs: list[str], yes: bool) -> int:
    ids = _resolve(db, refs) if refs else []
    if refs and not ids:
        return EX_FAIL
    count = db.waiting_count(ids)
    if count == 0:
        print("nothing to purge")
        return EX_OK if not refs else EX_FAIL
    if not yes:
        if not sys.stdin.isatty():
            print(f"cockpit-agent: refusing to purge {count} message(s) without a terminal to ask on; "
                  "add --yes", file=sys.stderr)
            return EX_FAIL
        answer = input(f"Delete {count} message(s)? Their responses will never be published. [y/N] ")
        if answer.strip().lower() not in ("y", "yes"):
            print("nothing purged")
            return EX_FAIL
    deleted = db.purge(ids)
    print(f"purged {deleted} message(s)")
    return EX_OK
