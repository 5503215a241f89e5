"""Bounded state: each output stored once, done commands pruned after COMMAND_RETENTION (never
one whose answer waits), the file given back to the file system, older files migrated; and
the readable views an operator opens with the sqlite3 shell."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import sqlite3
import subprocess
import sys
import threading
from datetime import datetime, timezone

import pytest

from config import Config
from conftest import ROOT, sql
from errors import EX_CONFIG, ConfigError
from outbox import Store
from outbox.retention import Retention
from runtime.answers import Answers
from runtime.flusher import Flusher

DAY = 86400.0
ISO = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ$")


class Clock:
    """A clock the test moves by hand: the Store stamps its rows with it."""

    def __init__(self, now: float = 1_800_000_000.0):
        self.now = now

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock():
    return Clock()


@pytest.fixture
def store(tmp_path, clock):
    s = Store(str(tmp_path / "outbox.db"), clock=clock)
    yield s
    s.close()


ANSWERS = Answers(Config(agent_id="host-1"), [])


def echo(store: Store, command_id: str, text: str = "pong") -> int:
    """An echo as the intake records it: done, with its response in the outbox; its outbox id."""
    answer = ANSWERS.answer(command_id, "success", text, None, 0)
    return store.accept(command_id, "echo", {"message": text}, "cockpit-backend", answer, output=text).outbox_id


def ran(store: Store, command_id: str, output: str) -> None:
    """A command a worker ran: accepted, claimed, finished with ``output``."""
    store.accept(command_id, "git_status", {}, "cockpit-backend")
    assert store.claim(command_id)
    _, message = ANSWERS.answer(command_id, "success", output, None, 12)
    assert store.finish(command_id, "success", output, None, 12, message)


# -- each output once -----------------------------------------------------------------------------


def test_an_output_the_response_carries_whole_is_stored_once(store):
    big = "y" * 60_000  # under OUTPUT_LIMIT (64 KiB): the response carries all of it
    echo(store, "e1", big)
    row = sql(store.path, "SELECT output, full_output, response FROM commands WHERE command_id = 'e1'")[0]
    assert row["full_output"] is None  # not a second copy...
    assert row["output"] == big == json.loads(row["response"])["output"]  # ...yet output reads it all
    assert store.get("e1")["output"] == big
    # One copy of 60 KB in the row (the response), not two: the whole file is well under 2 x 60 KB.
    store.delivered([r["id"] for r in store.due(10)])
    size = sum(r[0] for r in sql(store.path, "SELECT length(CAST(coalesce(full_output, '') AS BLOB)) + "
                                             "length(CAST(response AS BLOB)) FROM commands"))
    assert 60_000 < size < 61_000


def test_a_truncated_response_keeps_the_full_output_beside_it(store):
    full = "line\n" * 30_000  # 150 KB, past the 64 KiB limit
    ran(store, "g1", full)
    row = sql(store.path, "SELECT output, full_output, response FROM commands WHERE command_id = 'g1'")[0]
    response = json.loads(row["response"])
    assert response["truncated"] and len(response["output"]) < len(full)
    assert row["full_output"] == full and row["output"] == full


def test_an_error_answer_has_no_output(store):
    store.accept("r1", "rm", {}, None, ANSWERS.error_answer("r1", "unknown command 'rm'"))
    row = sql(store.path, "SELECT output, full_output, error FROM commands")[0]
    assert (row["output"], row["full_output"], row["error"]) == (None, None, "unknown command 'rm'")


# -- pruning --------------------------------------------------------------------------------------


def test_done_commands_are_pruned_after_the_retention_but_not_while_their_answer_waits(store, clock):
    waiting = echo(store, "old-waiting")  # its answer never delivered (Redis down since)
    old = echo(store, "old-sent")
    store.delivered([old])
    store.accept("old-queued", "git_pull", {})  # not done: never pruned
    store.accept("old-running", "git_pull", {})
    store.claim("old-running")
    clock.now += 8 * DAY
    store.delivered([echo(store, "new")])
    assert store.prune(clock.now - 7 * DAY) == 1
    assert sorted(r[0] for r in sql(store.path, "SELECT command_id FROM commands")) == [
        "new", "old-queued", "old-running", "old-waiting"]
    store.delivered([waiting])  # delivered at last: now it may go
    assert store.prune(clock.now - 7 * DAY) == 1
    assert store.get("old-waiting") is None
    assert store.pruned()["commands"] == 2


def test_commands_executed_counts_the_pruned_commands_too(store, clock):
    for i in range(5):
        store.delivered([echo(store, f"c{i}")])
    store.accept("refused", "rm", {}, None, ANSWERS.error_answer("refused", "no"))  # did not run
    store.delivered([r["id"] for r in store.due(10)])
    assert store.executed_count() == 5
    clock.now += 8 * DAY
    assert store.prune(clock.now - 7 * DAY, limit=4) == 4  # bounded batches
    assert store.prune(clock.now - 7 * DAY, limit=4) == 2
    assert store.counts()["done"] == 0
    assert store.executed_count() == 5
    assert store.pruned()["executed"] == 5 and store.pruned()["commands"] == 6


def test_pruning_gives_the_pages_back_so_the_file_shrinks(store, clock):
    assert store.incremental()  # a new file is made INCREMENTAL
    for i in range(300):
        ran(store, f"g{i}", f"{i}\n" * 20_000)  # ~100 KB each: 30 MB
    store.delivered([r["id"] for r in store.due(1000)])
    full = store.size()
    assert full > 30e6
    clock.now += 8 * DAY
    retention = Retention(store, 7 * DAY)
    retention.budget = 10.0
    retention.pages = 10**6
    retention.run()
    assert store.counts()["done"] == 0
    # Not only reusable but given back, all but the 1 MiB kept for the next writes.
    assert store.size() <= 2e6 and store.free_pages() <= retention.keep_free
    sql(store.path, "PRAGMA wal_checkpoint(TRUNCATE)")
    assert os.path.getsize(store.path) <= 2e6


def test_a_run_is_bounded_and_a_backlog_is_worked_off_over_the_next_runs(store, clock):
    for i in range(1000):
        store.delivered([echo(store, f"c{i}")])
    clock.now += 8 * DAY
    retention = Retention(store, 7 * DAY)
    retention.batch, retention.budget = 100, 0.0  # one batch per run
    assert retention.run() == 100
    assert retention.next_run == clock.now + retention.busy_interval  # soon: more to do
    runs = 1
    while store.counts()["done"]:
        clock.now = retention.next_run
        retention.run_if_due()
        runs += 1
    assert runs == 10
    clock.now = retention.next_run
    assert retention.run() == 0
    assert retention.next_run == clock.now + retention.interval  # caught up: the usual pace
    retention.run_if_due()  # not due: nothing happens
    assert retention.pruned == 1000


def test_the_flusher_prunes_as_it_goes(agent_env, config_from, redis_server):
    config = config_from(agent_env)
    store = Store(config.outbox_db)
    echo(store, "old")
    store.delivered([r["id"] for r in store.due(10)])
    echo(store, "recent")
    sql(config.outbox_db, "UPDATE commands SET finished_at = finished_at - ? WHERE command_id = 'old'",
        [config.command_retention + 60])
    flusher = Flusher("flusher", config, redis_server.client(), lambda: Store(config.outbox_db),
                      threading.Event(), threading.Event())
    flusher.setup()
    try:
        flusher.loop_once()
        assert store.get("old") is None and store.get("recent") is not None
        assert store.pruned()["commands"] == 1
    finally:
        flusher.teardown()
        store.close()


def test_command_retention_is_a_week_and_must_outlast_the_signature_window(agent_env, config_from):
    assert config_from(agent_env).command_retention == 604800
    assert config_from({**agent_env, "COMMAND_RETENTION": "301"}).command_retention == 301
    with pytest.raises(ConfigError) as raised:
        config_from({**agent_env, "COMMAND_RETENTION": "300"})
    assert str(raised.value) == ("COMMAND_RETENTION: expected more than the 300 s signature window "
                                 "(a replayed command must be stale before it is forgotten), got 300")
    with pytest.raises(ConfigError, match="COMMAND_RETENTION: expected a whole number"):
        config_from({**agent_env, "COMMAND_RETENTION": "7d"})
    started = subprocess.run([sys.executable, str(ROOT / "agent.py"), "run"], capture_output=True, text=True,
                             env={**agent_env, "COMMAND_RETENTION": "120"}, timeout=60, stdin=subprocess.DEVNULL)
    assert started.returncode == EX_CONFIG
    (line,) = started.stderr.splitlines()  # one line, no traceback
    assert line.endswith("COMMAND_RETENTION: expected more than the 300 s signature window (a replayed command "
                         "must be stale before it is forgotten), got 120"), line


# -- a file made by an older agent ----------------------------------------------------------------

V1_SCHEMA = """
CREATE TABLE commands (
    seq INTEGER PRIMARY KEY AUTOINCREMENT, command_id TEXT NOT NULL UNIQUE, command TEXT NOT NULL,
    params TEXT NOT NULL, sender TEXT,
    state TEXT NOT NULL DEFAULT 'queued' CHECK (state IN ('queued', 'running', 'done')),
    status TEXT CHECK (status IN ('success', 'error')), output TEXT, error TEXT, execution_time_ms INTEGER,
    received_at REAL NOT NULL, started_at REAL, finished_at REAL, response TEXT);
CREATE INDEX commands_pending ON commands (state) WHERE state != 'done';
CREATE TABLE outbox (
    id INTEGER PRIMARY KEY AUTOINCREMENT, channel TEXT NOT NULL, payload TEXT NOT NULL, command_id TEXT,
    result_key TEXT, created_at REAL NOT NULL, attempts INTEGER NOT NULL DEFAULT 0,
    next_attempt_at REAL NOT NULL DEFAULT 0, unheard_since REAL, last_error TEXT);
PRAGMA user_version=1;
"""


def v1_file(path: str, now: float) -> None:
    db = sqlite3.connect(path, isolation_level=None)
    db.execute("PRAGMA journal_mode=WAL")
    db.executescript(V1_SCHEMA)
    echo_response = json.dumps({"command_id": "e", "status": "success", "output": "hi \u00e9", "error": None})
    cut = json.dumps({"command_id": "g", "status": "success", "output": "a...z", "truncated": True})
    rows = [
        ("e", "echo", "done", "success", "hi \u00e9", now - 9 * DAY, now - 9 * DAY, echo_response),
        ("g", "git_pull", "done", "success", "a" * 1000 + "z", now - DAY, now - DAY, cut),
        ("q", "git_pull", "queued", None, None, now, None, None),
    ]
    for command_id, command, state, status, output, started, finished, response in rows:
        db.execute("INSERT INTO commands (command_id, command, params, state, status, output, received_at, "
                   "started_at, finished_at, response) VALUES (?, ?, '{}', ?, ?, ?, ?, ?, ?, ?)",
                   [command_id, command, state, status, output, now - 10 * DAY, started, finished, response])
    db.execute("DELETE FROM commands WHERE command_id = 'q'")  # the sequence must not go back
    db.execute("INSERT INTO commands (command_id, command, params, received_at) VALUES ('q', 'git_pull', '{}', ?)",
               [now])
    db.execute("INSERT INTO outbox (channel, payload, command_id, created_at) VALUES ('c', '{}', 'g', ?)", [now])
    db.close()


def test_a_version_1_file_is_migrated_in_place_and_vacuumed_once(tmp_path, clock):
    path = str(tmp_path / "outbox.db")
    v1_file(path, clock.now)
    store = Store(path, clock=clock)
    try:
        assert sql(path, "PRAGMA user_version")[0][0] == 2
        rows = {r["command_id"]: dict(r) for r in sql(path, "SELECT * FROM commands")}
        assert list(rows) == ["e", "g", "q"] and [r["seq"] for r in rows.values()] == [1, 2, 4]
        assert rows["e"]["output"] == "hi \u00e9"  # (its second copy stays until it is pruned)
        assert rows["g"]["output"] == rows["g"]["full_output"] == "a" * 1000 + "z"  # the untruncated one
        assert rows["q"]["state"] == "queued" and rows["q"]["output"] is None
        store.accept("new", "echo", {})
        assert store.get("new")["seq"] == 5  # the sequence went on
        store.delivered([echo(store, "echo-v2", "stored once")])
        assert sql(path, "SELECT output, full_output FROM commands WHERE command_id = 'echo-v2'")[0][:] == (
            "stored once", None)
        assert {r[0] for r in sql(path, "SELECT name FROM sqlite_master WHERE type = 'index'")} >= {
            "commands_pending", "commands_done"}
        assert [r[0] for r in sql(path, "SELECT command_id FROM unfinished")] == ["q", "new"]
        assert not store.incremental()  # until the one-off VACUUM, after the first prune
        Retention(store, 7 * DAY).run()
        assert store.get("e") is None and store.get("g") is not None
        assert store.incremental()
        assert sql(path, "PRAGMA journal_mode")[0][0] == "wal"
    finally:
        store.close()
    Store(path).close()  # opened again: nothing left to migrate
    assert sql(path, "PRAGMA user_version")[0][0] == 2


# -- the soak, small ------------------------------------------------------------------------------


def test_the_file_stays_bounded_over_many_retention_windows(tmp_path):
    spec = importlib.util.spec_from_file_location("soak", ROOT / "bench" / "soak.py")
    soak = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(soak)
    # 20,000 commands at 30 s = a week; a retention of a day (2,880 commands): seven windows.
    r = soak.soak(str(tmp_path / "outbox.db"), 20_000, interval=30.0, retention=DAY, big_every=500,
                  outage=6 * 3600, sample_every=200)
    assert r["pruned_while_waiting"] == 0
    assert r["within_bound"], r
    assert r["max_size_after_window"] <= soak.BOUND_FACTOR * r["size_at_window"]
    assert 2880 <= r["kept"] <= 2880 + 20  # a window's worth, and the few since the last run
    assert r["pruned"] == 20_000 - r["kept"] and r["executed_count"] == 20_000
    assert r["final_size"] < r["size_at_window"] * soak.BOUND_FACTOR


# -- the views ------------------------------------------------------------------------------------


def shell_json(path: str, query: str) -> list[dict]:
    """``sqlite3 -json PATH QUERY``, as an operator runs it."""
    out = subprocess.run(["sqlite3", "-json", path, query], capture_output=True, text=True, check=True).stdout
    return json.loads(out) if out.strip() else []


def test_the_views_show_readable_times_and_schema_explains_them(store, clock):
    clock.now = datetime(2026, 1, 2, 3, 4, 5, 250000, tzinfo=timezone.utc).timestamp()
    echo(store, "e1", "hello\nworld")
    store.accept("q1", "git_pull", {"branch": "main"}, "cockpit-backend")
    store.accept("r1", "rm", {}, None, ANSWERS.error_answer("r1", "unknown command 'rm'"))
    pending = shell_json(store.path, "SELECT * FROM pending")
    assert [p["command_id"] for p in pending] == ["e1", "r1"]
    assert pending[0]["created"] == "2026-01-02T03:04:05Z" and pending[0]["next_attempt"] == "now"
    assert pending[0]["bytes"] > 0 and pending[0]["waiting_s"] >= 0
    history = shell_json(store.path, "SELECT * FROM history")
    assert [(h["command_id"], h["status"], h["result"]) for h in history] == [
        ("r1", "error", "unknown command 'rm'"), ("q1", "queued", None), ("e1", "success", "hello world")]
    assert history[2]["received"] == history[2]["finished"] == "2026-01-02T03:04:05Z"
    assert all(ISO.match(h["received"]) for h in history)
    unfinished = shell_json(store.path, "SELECT * FROM unfinished")
    assert [(u["command_id"], u["state"], u["started"]) for u in unfinished] == [("q1", "queued", None)]
    schema = subprocess.run(["sqlite3", store.path, ".schema"], capture_output=True, text=True, check=True).stdout
    for view in ("pending", "history", "unfinished"):
        assert f"CREATE VIEW {view} AS" in schema
    assert "-- What waits to be published, oldest first (the outbox)." in schema  # the comments come along
    assert "-- Every command accepted in the last COMMAND_RETENTION (7 days)" in schema
