"""The workers, driven by loop_once against a real SQLite file (docker is the recording stand-in)."""

from __future__ import annotations

import json
import queue
import threading

import pytest

from handlers import REGISTRY, Children
from outbox import Store
from runtime.answers import Answers
from runtime.workers import Job, Worker, WorkerPool
from service.audit import Audit


@pytest.fixture
def parts(agent_env, config_from):
    config = config_from(agent_env)
    done, woken = [], []

    def make(name, pool):
        return Worker(name, config, pool, open_store=lambda: Store(config.outbox_db), children=Children(),
                      answers=Answers(config, []), audit=Audit(), on_done=lambda *a: done.append(a),
                      wake_flusher=lambda: woken.append(1), force_stop=threading.Event())

    pool = WorkerPool(queue.Queue(), 1, make)
    worker = pool.workers[0]
    worker.setup()
    store = Store(config.outbox_db)
    yield config, store, pool, worker, done, woken
    worker.teardown()
    store.close()


def job(config, command_id, container="web-1"):
    action = REGISTRY.prepare("docker_restart", {"container_name": container}, config)
    return Job(command_id, "docker_restart", action)


def test_a_job_runs_once_and_leaves_its_response_in_the_outbox(parts, fake_docker):
    config, store, pool, worker, done, woken = parts
    store.accept("d1", "docker_restart", {"container_name": "web-1"})
    pool.submit(job(config, "d1"))
    worker.loop_once()
    row = store.get("d1")
    assert (row["state"], row["status"]) == ("done", "success")
    (outbox,) = store.due(10)
    assert json.loads(outbox["payload"])["status"] == "success" and outbox["command_id"] == "d1"
    assert len(fake_docker.calls()) == 1 and done[0][:2] == ("docker_restart", "success") and woken


def test_a_job_whose_row_is_not_queued_is_not_run(parts, fake_docker):
    config, store, pool, worker, *_ = parts
    pool.submit(job(config, "unknown"))  # never accepted: no queued row to claim
    worker.loop_once()
    assert fake_docker.calls() == [] and store.due(10) == []


def test_jobs_for_one_target_are_handed_out_one_at_a_time_in_order(parts):
    config, store, pool, *_ = parts
    first, second = job(config, "a"), job(config, "b")
    pool.submit(first)
    pool.submit(second)
    assert pool.pending() == 2 and pool.take(0.1) is first and pool.take(0.1) is None
    pool.done(first)
    assert pool.take(0.1) is second
    pool.drain()
    assert pool.take(0.1) is None
