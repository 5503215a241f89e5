"""The SQLite store as an operator sees it: plain tables, readable with the sqlite3 shell."""

import json
import shutil
import sqlite3
import subprocess

import pytest

from conftest import sql
from errors import StoreUnavailable
from outbox import Message, Store


@pytest.fixture
def store(tmp_path):
    s = Store(str(tmp_path / "state" / "outbox.db"))
    yield s
    s.close()


def message(command_id: str, key: bool = True) -> Message:
    return Message("cockpit-agent-response:a", json.dumps({"command_id": command_id}), command_id,
                   f"cockpit-agent-result:a:{command_id}" if key else None)


def test_schema_is_wal_and_readable_by_the_sqlite3_shell(store):
    store.accept("c1", "echo", {"message": "hi"}, "cockpit-backend")
    assert sql(store.path, "PRAGMA journal_mode")[0][0] == "wal"
    assert shutil.which("sqlite3"), "the sqlite3 shell is part of what operators use"
    out = subprocess.run(["sqlite3", store.path, "SELECT command_id, command, params, state FROM commands"],
                         capture_output=True, text=True, check=True).stdout
    assert out.strip() == 'c1|echo|{"message":"hi"}|queued'
    schema = subprocess.run(["sqlite3", store.path, ".schema"], capture_output=True, text=True, check=True).stdout
    assert "CREATE TABLE commands" in schema and "CREATE TABLE outbox" in schema


def test_accept_once_per_command_id(store):
    assert store.accept("c1", "echo", {}).new
    again = store.accept("c1", "git_pull", {"branch": "x"})
    assert not again.new and again.row["command"] == "echo"
    assert store.counts()["queued"] == 1


def test_states_are_checked_words(store):
    store.accept("c1", "echo", {})
    with pytest.raises(sqlite3.IntegrityError):
        sql(store.path, "UPDATE commands SET state = 'lost' WHERE command_id = 'c1'")


def test_claim_runs_a_command_at_most_once(store):
    store.accept("c1", "echo", {})
    assert store.claim("c1")
    assert not store.claim("c1")
    store.finish("c1", "success", "hi", None, 3, message("c1"))
    assert not store.claim("c1")
    row = store.get("c1")
    assert (row["state"], row["status"], row["output"], row["execution_time_ms"]) == ("done", "success", "hi", 3)
    assert json.loads(row["response"]) == {"command_id": "c1"}


def test_finish_and_outbox_row_are_one_transaction(store):
    store.accept("c1", "echo", {})
    store.claim("c1")
    bad = Message(None, "x", "c1", None)  # channel is NOT NULL: the outbox insert fails
    with pytest.raises(StoreUnavailable) as raised:  # the Store's own error, SQLite's as its cause
        store.finish("c1", "success", "hi", None, 1, bad)
    assert isinstance(raised.value.__cause__, sqlite3.IntegrityError)
    assert store.get("c1")["state"] == "running"
    assert store.counts()["outbox"] == 0


def test_refusal_is_recorded_done_with_its_answer(store):
    response = {"status": "error", "error": "nope", "execution_time_ms": 0}
    store.accept("c1", "rm", {}, None, (response, message("c1")))
    row = store.get("c1")
    assert (row["state"], row["status"], row["error"]) == ("done", "error", "nope")
    assert [r["command_id"] for r in store.due(10)] == ["c1"]


def test_outbox_order_retry_and_delivery(store):
    ids = [store.enqueue(message(f"c{i}")) for i in range(3)]
    assert [r["id"] for r in store.due(10)] == ids
    store.unheard([(ids[0], 10**12)], now=100.0)
    assert [r["id"] for r in store.due(10)] == ids[1:]
    row = sql(store.path, "SELECT attempts, unheard_since, last_error FROM outbox WHERE id = ?", [ids[0]])[0]
    assert tuple(row) == (1, 100.0, "no receiver")
    store.delivered(ids[1:])
    assert store.counts()["outbox"] == 1
    assert store.retry_all_now() == 1
    assert [r["id"] for r in store.due(10)] == ids[:1]


def test_retry_all_now_keeps_the_rows_being_confirmed(store):
    ids = [store.enqueue(message(f"c{i}"), hold_until=10**12) for i in range(4)]
    assert store.due(10) == []
    assert store.retry_all_now(keep=[ids[0], ids[2]]) == 2
    assert [r["id"] for r in store.due(10)] == [ids[1], ids[3]]
    assert store.retry_all_now(keep=[ids[0]]) == 1  # the temp list is rebuilt each time
    assert [r["id"] for r in store.due(10)] == ids[1:]


def test_pending_after_a_crash(tmp_path):
    path = str(tmp_path / "o.db")
    first = Store(path)
    for cid in ("a", "b", "c"):
        first.accept(cid, "echo", {})
    first.claim("b")
    first.close()  # as if killed: nothing else written (the rows stay as they are)
    second = Store(path)
    running, queued = second.pending()
    assert [r["command_id"] for r in running] == ["b"]
    assert [r["command_id"] for r in queued] == ["a", "c"]


def test_finish_never_overwrites_an_answered_row(store):
    """A second agent on the same database answered the first's running command "interrupted":
    the first one's finish must then change nothing and queue nothing (one answer per command)."""
    store.accept("c1", "docker_restart", {})
    assert store.claim("c1")
    assert store.finish("c1", "error", None, "interrupted", 0, message("c1"))
    before = store.get("c1")
    assert not store.finish("c1", "success", "grafana", None, 3000, message("c1"))
    assert store.get("c1") == before
    assert store.counts()["outbox"] == 1
    store.accept("c2", "echo", {})  # queued, never claimed: not finished either
    assert not store.finish("c2", "success", "hi", None, 1, message("c2"))
    assert store.get("c2")["state"] == "queued" and store.counts()["outbox"] == 1


def test_refuse_answers_a_queued_row_only(store):
    store.accept("c1", "docker_restart", {"container_name": "gone"})
    assert store.refuse("c1", "container 'gone' is not whitelisted", message("c1"))
    row = store.get("c1")
    assert (row["state"], row["status"], row["error"], row["started_at"]) == \
        ("done", "error", "container 'gone' is not whitelisted", None)  # refused: never counted as run
    assert not store.refuse("c1", "again", message("c1"))
    store.accept("c2", "echo", {})
    store.claim("c2")
    assert not store.refuse("c2", "no", message("c2"))
    assert store.get("c2")["state"] == "running" and store.counts()["outbox"] == 1
