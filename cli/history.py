"""``cockpit-agent history [show COMMAND_ID]``: the commands the agent accepted, from its database."""

from __future__ import annotations

import argparse
import sqlite3
import sys
from typing import Any

from cli.common import database_path, iso, json_line, one_line, open_db, parsed_json, when
from errors import EX_FAIL, EX_OK, EX_USAGE

TIMES = ("received_at", "started_at", "finished_at")
LIST_LEAVES_OUT = ("output", "response")  # in full only in ``history show``
# Where the store keeps an output the response carries truncated; ``output`` reads it already.
NEVER_SHOWN = ("full_output",)


def history(args: argparse.Namespace) -> int:
    """``history``: the last N commands, oldest first, filtered; ``history show ID``: one in full."""
    db = open_db(database_path(args.db, args.env_file))
    if db is None:
        return EX_FAIL
    try:
        if args.action == "show":
            if args.command_id is None:
                print("cockpit-agent: history show needs a COMMAND_ID (see: history)", file=sys.stderr)
                return EX_USAGE
            return _show(db.command(args.command_id), args.command_id, args.json)
        if args.command_id is not None:
            print(f"cockpit-agent: history takes no {args.command_id!r}; did you mean: history show "
                  f"{args.command_id}", file=sys.stderr)
            return EX_USAGE
        rows = db.history(args.limit, status=args.status, command=args.command, since=args.since)
    finally:
        db.close()
    if args.json:
        for row in rows:
            json_line(_as_json(row, leave_out=LIST_LEAVES_OUT))
        return EX_OK
    if not rows:
        print("no commands match" if args.status or args.command or args.since is not None else "no commands yet")
        return EX_OK
    print(f"{'RECEIVED':<19}  {'COMMAND_ID':<36}  {'COMMAND':<16}  {'STATUS':<8}  {'MS':>7}  ERROR")
    for row in rows:
        state = row["status"] if row["state"] == "done" else row["state"]
        ms = "-" if row["execution_time_ms"] is None else str(row["execution_time_ms"])
        print(f"{when(row['received_at']):<19}  {one_line(row['command_id'], 36):<36}  "
              f"{one_line(row['command'], 16):<16}  {state or '-':<8}  {ms:>7}  {one_line(row['error'])}")
    return EX_OK


def _as_json(row: sqlite3.Row, leave_out: tuple[str, ...] = ()) -> dict[str, Any]:
    """A commands row for ``--json``: its columns (times as unix s, plus ``*_iso``), params and
    the response as JSON values."""
    out: dict[str, Any] = {}
    for key in row.keys():
        if key in leave_out or key in NEVER_SHOWN:
            continue
        value = row[key]
        out[key] = parsed_json(value) if key in ("params", "response") else value
        if key in TIMES:
            out[key + "_iso"] = iso(value)
    return out


def _show(row: sqlite3.Row | None, command_id: str, as_json: bool) -> int:
    if row is None:
        print(f"cockpit-agent: no command {command_id!r} in the database (never received here, or done long "
              "enough ago to be pruned)", file=sys.stderr)
        return EX_FAIL
    if as_json:
        json_line(_as_json(row))
        return EX_OK
    for key in ("command_id", "command", "params", "sender", "state", "status"):
        print(f"{key + ':':<12}{row[key] if row[key] is not None else '-'}")
    for key in TIMES:
        value = row[key]
        print(f"{key.removesuffix('_at') + ':':<12}{when(value)}" + (f" ({value})" if value is not None else ""))
    ms = row["execution_time_ms"]
    print(f"{'took:':<12}{'-' if ms is None else f'{ms} ms'}")
    print(f"{'error:':<12}{row['error'] if row['error'] is not None else '-'}")
    if row["output"] is None:
        print("output:     -")
    else:
        print("output:")
        print(row["output"])
    if row["response"] is None:
        print("response:   - (not answered yet)")
    else:
        print("response (the JSON as published):")
        print(row["response"])
    return EX_OK
