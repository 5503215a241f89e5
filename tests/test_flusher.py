"""The flusher, driven by loop_once against a real redis-server and a real SQLite file."""

from __future__ import annotations

import json
import threading

import pytest

from conftest import sql, wait_for
from outbox import Message, Store
from runtime.flusher import Flusher


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
