"""``cockpit-agent history``: the last commands the agent accepted, from its database."""

from __future__ import annotations

import argparse

from cli.common import one_line, open_db, when
from config import Config
from errors import EX_FAIL, EX_OK


def history(config: Config, args: argparse.Namespace) -> int:
    """``history``: the last N commands, oldest first."""
    db = open_db(config)
    if db is None:
        return EX_FAIL
    try:
        rows = db.history(args.limit)
    finally:
        db.close()
    if not rows:
        print("no commands yet")
        return EX_OK
    print(f"{'RECEIVED':<19}  {'COMMAND_ID':<36}  {'COMMAND':<16}  {'STATUS':<8}  {'MS':>7}  ERROR")
    for row in rows:
        state = row["status"] if row["state"] == "done" else row["state"]
        ms = "-" if row["execution_time_ms"] is None else str(row["execution_time_ms"])
        print(f"{when(row['received_at']):<19}  {one_line(row['command_id'], 36):<36}  "
              f"{one_line(row['command'], 16):<16}  {state or '-':<8}  {ms:>7}  {one_line(row['error'])}")
    return EX_OK
