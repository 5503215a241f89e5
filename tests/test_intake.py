"""The intake (and IntakeLoop), driven directly against a real redis-server and SQLite file.

The pool has no workers: the Jobs stay on the queue for the test to look at."""

from __future__ import annotations

import json
import queue

import pytest

from conftest import sql, wait_for
from outbox import Store
from runtime.answers import Answers
from runtime.inbox import Inbox
from runtime.intake import Intake, IntakeLoop, StreamTwins
from runtime.workers import WorkerPool
from service.audit import Audit


@pytest.fixture
def parts(agent_env, config_from, redis_server):
    config = config_from(agent_env)
    pool = WorkerPool(queue.Queue(), 0, make_worker=None)
    handed, done = [], []

    def make(store):
        from handlers import REGISTRY

        return Intake(config, store, redis_server.client(), registry=REGISTRY, answers=Answers(config, []),
                      audit=Audit(), pool=pool, wake_flusher=lambda: None,
                      handover=lambda ids, run_id: handed.append(ids),
                      on_done=lambda *args: done.append(args), stream_twins=StreamTwins())

    responses = redis_server.client().pubsub(ignore_subscribe_messages=True)
    responses.subscribe(config.response_channel)
    wait_for(lambda: redis_server.client().pubsub_numsub(config.response_channel)[0][1] == 1)
    store = Store(config.outbox_db)
    yield config, store, make(store), pool, responses, make, done
    store.close()


def answers(responses, n):
    got = []

    def enough():
        message = responses.get_message(timeout=0.1)
        if message is not None:
            got.append(json.loads(message["data"]))
        return len(got) >= n

    wait_for(enough, message=f"{n} responses")
    return got


def test_an_echo_is_answered_on_arrival_without_a_job(parts):
    config, store, intake, pool, responses, _, done = parts
    intake.handle(json.dumps({"command_id": "e1", "command": "echo", "params": {"message": "hi"}}).encode())
    (response,) = answers(responses, 1)
    assert (response["command_id"], response["status"], response["output"]) == ("e1", "success", "hi")
    assert store.get("e1")["state"] == "done" and pool.pending() == 0 and done == [("echo", "success", 0)]


def test_a_command_that_runs_becomes_a_queued_row_and_one_job_even_when_sent_twice(parts):
    config, store, intake, pool, *_ = parts
    message = json.dumps({"command_id": "d1", "command": "docker_restart", "params": {"container_name": "web-1"}})
    intake.handle_many([message.encode(), message.encode()])
    assert store.get("d1")["state"] == "queued"
    job = pool.queue.get_nowait()
    assert (job.command_id, job.action.argv[-1]) == ("d1", "web-1") and pool.pending() == 0


def test_refusals_are_answered_and_what_cannot_be_answered_is_not(parts):
    config, store, intake, pool, responses, *_ = parts
    intake.handle(b"{not json")  # no command_id: nothing to answer
    intake.handle(json.dumps({"command_id": "r1", "command": "reboot"}).encode())
    (response,) = answers(responses, 1)
    assert response["command_id"] == "r1" and response["status"] == "error" and "reboot" in response["error"]
    assert pool.pending() == 0
    assert [r[0] for r in sql(config.outbox_db, "SELECT command_id FROM commands")] == ["r1"]


def test_a_full_queue_answers_busy(agent_env, config_from, parts):
    config, store, intake, pool, responses, *_ = parts
    intake.config = config.replace(queue_max=1)
    for i in range(2):
        intake.handle(json.dumps({"command_id": f"g{i}", "command": "git_status"}).encode())
    (response,) = answers(responses, 1)
    assert response["command_id"] == "g1" and response["error"].startswith("busy:")
    assert pool.pending() == 1


def test_the_intake_loop_accepts_what_the_listener_put_in_the_inbox(parts):
    config, store, _, pool, responses, make, _ = parts
    inbox = Inbox(1 << 20)
    loop = IntakeLoop("intake", config, inbox, lambda: Store(config.outbox_db), make)
    loop.setup()
    try:
        for i in range(3):
            inbox.put(json.dumps({"command_id": f"e{i}", "command": "echo"}).encode(), 0)
        loop.loop_once()
        assert len(inbox) == 0 and store.counts()["done"] == 3
    finally:
        loop.teardown()
