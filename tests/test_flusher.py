"""The flusher, driven by loop_once against a real redis-server and a real SQLite file."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import threading
import time

import pytest
import redis

from conftest import ROOT, sql, wait_for
from outbox import Message, Store
from runtime.flusher import Flusher
from runtime.loop import REDIS_DOWN


@pytest.fixture
def parts(agent_env, config_from, redis_server):
    config = config_from(agent_env)
    store = Store(config.outbox_db)
    flusher = Flusher("flusher", config, redis_server.client(), lambda: Store(config.outbox_db),
                      threading.Event(), threading.Event())
    flusher.setup()
    yield config, store, flusher, redis_server
    flusher.teardown()
    store.close()


def test_due_rows_are_published_in_order_stored_at_their_result_key_and_deleted(parts):
    config, store, flusher, redis_server = parts
    pubsub = redis_server.client().pubsub(ignore_subscribe_messages=True)
    pubsub.subscribe(config.response_channel)
    wait_for(lambda: redis_server.client().pubsub_numsub(config.response_channel)[0][1] == 1)
    for i in range(3):
        store.enqueue(Message(config.response_channel, json.dumps({"n": i}), f"c{i}", config.result_key(f"c{i}")))
    flusher.loop_once()
    got = []

    def three() -> bool:
        message = pubsub.get_message(timeout=0.1)
        if message is not None:
            got.append(json.loads(message["data"]))
        return len(got) == 3

    wait_for(three, message="three responses")
    assert got == [{"n": 0}, {"n": 1}, {"n": 2}]
    assert json.loads(redis_server.client().get(config.result_key("c1"))) == {"n": 1}
    assert 0 < redis_server.client().ttl(config.result_key("c1")) <= config.result_ttl
    wait_for(lambda: flusher.loop_once() or store.counts()["outbox"] == 0, message="the confirmed rows deleted")


def test_a_message_no_one_hears_waits_for_its_backoff_and_retry_now_makes_it_due(parts):
    config, store, flusher, _ = parts
    outbox_id = store.enqueue(Message(config.response_channel, "{}", "c1", None))
    flusher.loop_once()
    row = sql(config.outbox_db, "SELECT attempts, last_error, next_attempt_at FROM outbox WHERE id = ?", [outbox_id])[0]
    assert (row["attempts"], row["last_error"]) == (1, "no receiver")
    assert row["next_attempt_at"] > 0 and store.due(10) == []  # waits out its backoff
    flusher.loop_once()  # not due: nothing published again
    assert sql(config.outbox_db, "SELECT attempts FROM outbox")[0][0] == 1
    flusher.retry_now.set()  # Redis is back (the listener's online): due at once, published again
    flusher.loop_once()
    assert sql(config.outbox_db, "SELECT attempts FROM outbox")[0][0] == 2


def test_rows_handed_over_already_confirmed_are_deleted_after_delete_after(parts):
    config, store, flusher, _ = parts
    ids = [store.enqueue(Message(config.response_channel, "{}", f"c{i}", None), hold_until=10**12) for i in range(2)]
    flusher.delete_after = 0.0
    flusher.handover(ids, None)
    assert flusher.wake.is_set()
    flusher.loop_once()
    assert store.counts()["outbox"] == 0


def one_pass(flusher: Flusher) -> Exception | None:
    """One iteration as ``Loop.run`` makes it: a failure goes to ``on_error``."""
    try:
        flusher.loop_once()
    except Exception as exc:
        flusher.on_error(exc)
        return exc
    return None


def test_while_redis_is_unreachable_each_waiting_row_says_since_when(parts, agent_env):
    config, store, flusher, redis_server = parts
    flusher.client = redis.Redis(**config.redis_kwargs())  # the agent's own settings: one retry, no sleeps
    store.enqueue(Message(config.response_channel, "{}", "c1", None))
    redis_server.kill()
    before = time.time()
    assert isinstance(one_pass(flusher), REDIS_DOWN)
    (last_error,) = {r[0] for r in sql(config.outbox_db, "SELECT last_error FROM outbox")}
    match = re.fullmatch(r"Redis unreachable since (\d\d:\d\d:\d\d) UTC", last_error or "")
    assert match, last_error
    assert match[1] in {time.strftime("%H:%M:%S", time.gmtime(t)) for t in (before - 1, before, time.time())}
    # A response written during the outage is told the same, and the outage keeps its start.
    store.enqueue(Message(config.response_channel, "{}", "c2", None))
    assert isinstance(one_pass(flusher), REDIS_DOWN)
    assert [tuple(r) for r in sql(config.outbox_db, "SELECT command_id, attempts, last_error FROM outbox")] == [
        ("c1", 0, last_error), ("c2", 0, last_error)]
    # The operator sees it: the outbox command and the pending view.
    listed = subprocess.run([sys.executable, str(ROOT / "agent.py"), "outbox", "list"], env=agent_env,
                            capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL)
    assert listed.returncode == 0, listed.stderr
    assert [line for line in listed.stdout.splitlines() if line.rstrip().endswith(last_error)], listed.stdout
    pending = subprocess.run(["sqlite3", config.outbox_db, "SELECT command_id, last_error FROM pending"],
                             capture_output=True, text=True, check=True).stdout
    assert pending.splitlines() == [f"c1|{last_error}", f"c2|{last_error}"]
    # Redis back: published (no one subscribed here), the rows say that instead.
    redis_server.start()
    assert one_pass(flusher) is None
    assert [tuple(r) for r in sql(config.outbox_db, "SELECT attempts, last_error FROM outbox")] == [
        (1, "no receiver"), (1, "no receiver")]


def test_the_outage_note_gives_way_to_what_a_row_said_before(parts):
    config, store, flusher, redis_server = parts
    flusher.client = redis.Redis(**config.redis_kwargs())
    store.enqueue(Message(config.response_channel, "{}", "c1", None))
    flusher.loop_once()  # no receiver
    redis_server.kill()
    flusher.retry_now.set()
    assert isinstance(one_pass(flusher), REDIS_DOWN)
    assert sql(config.outbox_db, "SELECT last_error FROM outbox")[0][0].startswith("Redis unreachable since ")
    assert store.clear_unreachable() == 1
    assert sql(config.outbox_db, "SELECT last_error FROM outbox")[0][0] == "no receiver"
