#!/usr/bin/env python3
"""``make soak N=1000000``: does the database stay bounded when the agent runs for a year?

Pushes N commands through the real Store and the real Retention (outbox/retention.py), in a
simulated clock: one command every ``--interval`` s (30: a health check every 30 s, so a
million commands are about a year), each accepted and answered the way the agent does it
(an echo recorded done with its response in the outbox, in one transaction; one in
``--big-every`` a git_pull with 100 KiB of output, claimed and finished with a response
truncated to OUTPUT_LIMIT), the responses delivered in batches of 50 (the flusher's DELETE),
and pruning run exactly as the flusher runs it (``run_if_due`` after each command) with
COMMAND_RETENTION = ``--retention``. Halfway, a Redis outage of ``--outage`` s: nothing is
delivered meanwhile, and no command whose answer waits may be pruned. What it does not
exercise: Redis, the threads, and the wall-clock timing of the agent (commands come as fast
as this machine writes them).

It samples the file (database + WAL) every ``--sample-every`` commands and checks the bound:
once the first retention window is full, the file never grows past BOUND_FACTOR x its size at
that moment; without pruning it would grow by about N / (commands per window). It prints the
figures and exits 1 when the bound is broken or a waiting command was pruned.
"""

from __future__ import annotations

import argparse
import os
import sqlite3
import sys
import tempfile
import time
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from config import Config  # noqa: E402
from outbox import Store  # noqa: E402
from outbox.retention import Retention  # noqa: E402
from runtime.answers import Answers  # noqa: E402

BOUND_FACTOR = 1.25
WEEK = 7 * 86400


def file_size(path: str) -> int:
    """The database and its WAL, in bytes, as ``ls`` shows them."""
    return sum(os.path.getsize(p) for p in (path, path + "-wal") if os.path.exists(p))


def waiting_but_pruned(path: str) -> int:
    """Outbox rows whose command is no longer in ``commands`` (must stay 0)."""
    db = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        return db.execute("SELECT count(*) FROM outbox WHERE command_id IS NOT NULL "
                          "AND command_id NOT IN (SELECT command_id FROM commands)").fetchone()[0]
    finally:
        db.close()


def soak(path: str, n: int, interval: float = 30.0, retention: float = WEEK, big_every: int = 1000,
         outage: float = 86400.0, sample_every: int = 1000, progress=None) -> dict:
    """Run the soak on a new database at ``path``; returns the figures (see the module docstring)."""
    clock = [1_800_000_000.0]  # simulated unix time
    store = Store(path, clock=lambda: clock[0])
    answers = Answers(Config(agent_id="soak-host"), [])
    prune = Retention(store, retention)
    big_output = ("x" * 99 + "\n") * 1024  # 100 KiB, past the 64 KiB OUTPUT_LIMIT
    outage_from = n // 2
    outage_to = outage_from + int(outage / interval)
    window = int(retention / interval)  # commands per retention window
    samples: list[tuple[int, int]] = []
    at_window = None
    pruned_while_waiting = 0
    started = time.monotonic()
    for i in range(n):
        command_id = str(uuid.uuid4())
        if big_every and i % big_every == big_every - 1:
            store.accept(command_id, "git_pull", {"repository_path": "/opt/app/config", "branch": "main"},
                         "cockpit-backend")
            store.claim(command_id)
            _, message = answers.answer(command_id, "success", big_output, None, 850)
            store.finish(command_id, "success", big_output, None, 850, message)
        else:
            text = f"health-{i}"
            answer = answers.answer(command_id, "success", text, None, 0)
            store.accept(command_id, "echo", {"message": text}, "cockpit-backend", answer, output=text)
        if not outage_from <= i < outage_to and i % 50 == 49:
            deliver(store)
        if i == outage_to - 1:
            pruned_while_waiting = waiting_but_pruned(path)
        clock[0] += interval
        prune.run_if_due()
        if i % sample_every == 0 or i == n - 1:
            size = file_size(path)
            samples.append((i, size))
            if at_window is None and i >= window:
                at_window = size
            if progress and i % (sample_every * 100) == 0:
                progress(i, size, time.monotonic() - started)
    deliver(store)
    pruned_while_waiting = max(pruned_while_waiting, waiting_but_pruned(path))
    counts = store.counts()
    after_window = [size for i, size in samples if i >= window]
    result = {
        "commands": n,
        "simulated_days": n * interval / 86400,
        "retention_s": retention,
        "commands_per_window": window,
        "kept": counts["done"],
        "pruned": store.pruned()["commands"],
        "executed_count": store.executed_count(),
        "size_at_window": at_window,
        "max_size": max(size for _, size in samples),
        "max_size_after_window": max(after_window) if after_window else None,
        "final_size": file_size(path),
        "pruned_while_waiting": pruned_while_waiting,
        "seconds": time.monotonic() - started,
    }
    result["bound"] = BOUND_FACTOR * at_window if at_window else None
    result["within_bound"] = at_window is None or result["max_size_after_window"] <= result["bound"]
    store.close()
    return result


def deliver(store: Store) -> None:
    """What the flusher does once Redis took them: read the due rows, delete them (500 at a time)."""
    while True:
        ids = [row["id"] for row in store.due(500, now=float("inf"))]
        store.delivered(ids)
        if len(ids) < 500:
            return


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("-n", type=int, default=1_000_000, help="commands (default 1,000,000)")
    parser.add_argument("--interval", type=float, default=30.0, help="simulated seconds between commands (30)")
    parser.add_argument("--retention", type=float, default=WEEK, help="COMMAND_RETENTION, s (604800)")
    parser.add_argument("--big-every", type=int, default=1000, help="one git_pull with 100 KiB output in this many")
    parser.add_argument("--outage", type=float, default=86400.0, help="simulated Redis outage halfway, s (86400)")
    parser.add_argument("--db", help="database file (default: a new one in a temporary directory)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="cockpit-soak-") as tmp:
        path = args.db or os.path.join(tmp, "outbox.db")
        print(f"soak: {args.n:,} commands, one every {args.interval:g} simulated s "
              f"({args.n * args.interval / 86400:.0f} days), COMMAND_RETENTION {args.retention:g} s, "
              f"a {args.outage:g} s Redis outage halfway; {path}", flush=True)
        r = soak(path, args.n, args.interval, args.retention, args.big_every, args.outage,
                 progress=lambda i, size, t: print(f"  {i:>9,} commands  {size / 1e6:7.1f} MB  {t:6.0f} s", flush=True))
    mb = 1e6
    per_row = r["size_at_window"] / r["commands_per_window"] if r["size_at_window"] else 0
    print(f"commands: {r['commands']:,} in {r['seconds']:.0f} s ({r['commands'] / r['seconds']:,.0f}/s); "
          f"kept {r['kept']:,}, pruned {r['pruned']:,}; commands_executed {r['executed_count']:,}")
    if r["bound"] is None:
        print("bound: not checked (fewer commands than one retention window)")
    else:
        print(f"bound: after the first retention window ({r['commands_per_window']:,} commands) the file "
              f"(database + WAL) stays within {BOUND_FACTOR} x its size then: "
              f"{BOUND_FACTOR} x {r['size_at_window'] / mb:.1f} MB = {r['bound'] / mb:.1f} MB")
        print(f"figure: max {r['max_size_after_window'] / mb:.1f} MB after the window "
              f"(max {r['max_size'] / mb:.1f} MB over the run), final {r['final_size'] / mb:.1f} MB; "
              f"unpruned it would be about {per_row * r['commands'] / mb:,.0f} MB")
    print(f"commands pruned while their answer waited in the outbox: {r['pruned_while_waiting']}")
    ok = r["within_bound"] and r["pruned_while_waiting"] == 0
    print("ok" if ok else "FAILED")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
