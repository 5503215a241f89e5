"""``cockpit-agent outbox list|show|retry|purge``: the answers still waiting to be published."""

from __future__ import annotations

import argparse
import json
import sys
import time

from cli.common import age, one_line, open_db, when
from config import Config
from errors import EX_FAIL, EX_OK, EX_USAGE
from outbox.inspect import Inspector


def outbox(config: Config, args: argparse.Namespace) -> int:
    """``outbox list|show|retry|purge``."""
    db = open_db(config)
    if db is None:
        return EX_FAIL
    try:
        if args.action == "list":
            return _outbox_list(db)
        if args.action == "show":
            return _outbox_show(db, args.ids)
        if args.action == "retry":
            return _outbox_retry(db, args.ids)
        return _outbox_purge(db, args.ids, args.yes)
    finally:
        db.close()


def _outbox_list(db: Inspector) -> int:
    rows = db.outbox_rows()
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


def _outbox_show(db: Inspector, ids: list[int]) -> int:
    if len(ids) != 1:
        print("cockpit-agent: outbox show needs exactly one ID (see: outbox list)", file=sys.stderr)
        return EX_USAGE
    row = db.outbox_row(ids[0])
    if row is None:
        print(f"cockpit-agent: no outbox entry {ids[0]} (already delivered?)", file=sys.stderr)
        return EX_FAIL
    for key in row.keys():
        if key == "payload":
            continue
        value = row[key]
        if key in ("created_at", "next_attempt_at", "unheard_since") and value:
            value = f"{when(value)} ({value})"
        print(f"{key + ':':<17}{value if value is not None else '-'}")
    try:
        payload = json.dumps(json.loads(row["payload"]), indent=2, ensure_ascii=False)
    except ValueError:
        payload = row["payload"]
    print("payload:")
    print(payload)
    return EX_OK


def _outbox_retry(db: Inspector, ids: list[int]) -> int:
    changed = db.retry(ids)
    if ids and changed != len(ids):
        print(f"cockpit-agent: only {changed} of {len(ids)} entries are still in the outbox", file=sys.stderr)
    print(f"{changed} message(s) due now; a running agent publishes them within a few seconds")
    return EX_OK if changed or not ids else EX_FAIL


def _outbox_purge(db: Inspector, ids: list[int], yes: bool) -> int:
    count = db.waiting_count(ids)
    if count == 0:
        print("nothing to purge")
        return EX_OK if not ids else EX_FAIL
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
