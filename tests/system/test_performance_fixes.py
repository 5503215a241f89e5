"""Regression tests for what `make bench` found: each pins a behaviour a speed-up must keep."""

from __future__ import annotations

import threading
import time

from conftest import in_time, sql, wait_for


def test_done_is_not_starved_by_idle_workers(running_agent, make_backend, git_repos):
    """Back-to-back git_pulls on one repository: the second must not wait for idle workers.

    An idle worker holds the take lock while it blocks on the queue; releasing a target must
    not need that lock, or a second command on the same repository waited for seconds.
    """
    agent = running_agent()
    backend = make_backend(agent.config.agent_id)
    backend.call("git_pull", {"branch": "main"})

    def pull():
        t0 = time.monotonic()
        response = backend.call("git_pull", {"branch": "main"})
        return response, time.monotonic() - t0

    for i in range(4):
        git_repos.commit(f"change-{i}")
        response, _ = in_time(pull, 0.75, "a git_pull took", waits="the limit is")
        assert response["status"] == "success", response


def test_same_target_still_runs_in_order(running_agent, make_backend, git_repos):
    """Commands for one repository still run one at a time, in arrival order."""
    agent = running_agent()
    backend = make_backend(agent.config.agent_id)
    ids = [backend.send("git_status") for _ in range(6)]
    for command_id in ids:
        assert backend.wait(command_id)["status"] == "success"
    store = agent.open_store()
    rows = sql(store.path, "SELECT command_id, started_at, finished_at FROM commands ORDER BY seq")
    store.close()
    by_id = {r["command_id"]: r for r in rows}
    runs = [by_id[i] for i in ids]
    for before, after in zip(runs, runs[1:]):
        assert before["finished_at"] <= after["started_at"]


def test_burst_is_answered_exactly_once(running_agent, make_backend):
    """A burst accepted in groups still gets one response per command and one row per command."""
    agent = running_agent()
    backend = make_backend(agent.config.agent_id)
    client = backend.server.client()
    messages = [backend.message("echo", {"message": f"m{i}"}) for i in range(300)]
    messages.append(messages[10])  # a duplicate inside the burst
    pipe = client.pipeline(transaction=False)
    import json

    for message in messages:
        pipe.publish(f"cockpit-agent:{agent.config.agent_id}", json.dumps(message))
    pipe.execute()
    wait_for(lambda: len({r["command_id"] for r in backend.responses}) >= 300, 30, message="all responses")
    time.sleep(0.3)
    by_id: dict[str, list[dict]] = {}
    for response in backend.responses:
        by_id.setdefault(response["command_id"], []).append(response)
    assert len(by_id) == 300
    assert all(r[0]["status"] == "success" for r in by_id.values())
    # Every other command is answered once; the duplicate is never run twice: it is answered
    # again from the stored response, or not at all if that response was still waiting.
    assert sorted(len(r) for cid, r in by_id.items() if cid != messages[10]["command_id"]) == [1] * 299
    assert len(by_id[messages[10]["command_id"]]) in (1, 2)
    store = agent.open_store()
    assert store.counts()["done"] == 300
    store.close()


def test_store_query_and_autocommit(tmp_path):
    """The Store's connection: statements autocommit, ``immediate`` groups them."""
    from outbox import Message, Store

    path = str(tmp_path / "outbox.db")
    store = Store(path)
    assert store.accept("a", "echo", {"message": "x"}).new
    assert not store.accept("a", "echo", {}).new
    assert store.claim("a")
    assert sql(path, "SELECT state FROM commands WHERE command_id = 'a'")[0][0] == "running"  # committed
    store.finish("a", "success", "x", None, 1, Message("chan", "{}", "a", "key"))
    other = Store(path)  # another thread's view: everything is committed
    assert other.get("a")["state"] == "done"
    assert [r["command_id"] for r in other.due(10)] == ["a"]
    seen = threading.Event()

    def reader():
        s = Store(path)
        seen.set() if s.counts()["outbox"] == 1 else None
        s.close()

    t = threading.Thread(target=reader)
    t.start()
    t.join()
    assert seen.is_set()
    other.close()
    store.close()


def test_echo_is_answered_while_every_worker_is_busy(running_agent, make_backend, fake_docker):
    """echo runs nothing, so it is recorded done and answered on arrival, not behind a worker."""
    fake_docker.behave("sleep 5")  # the echo, even tried twice, is over long before
    agent = running_agent(WORKER_COUNT=1)
    backend = make_backend(agent.config.agent_id)
    busy = backend.send("docker_restart", {"container_name": "grafana"})
    wait_for(lambda: agent.pool.workers[0].current is not None, 5, message="the worker to be busy")

    def echo():
        t0 = time.monotonic()
        response = backend.call("echo", {"message": "still here"}, timeout=2.5)
        return response, time.monotonic() - t0

    response, _ = in_time(echo, 1.0, "the echo took", waits="the limit is")
    assert response["output"] == "still here" and response["status"] == "success"
    assert backend.responses_for(busy) == []
    store = agent.open_store()
    row = store.get(response["command_id"])
    store.close()
    assert row["state"] == "done" and row["output"] == "still here" and row["started_at"] is not None
    assert backend.wait(busy, 15)["status"] == "success"


def test_responses_survive_a_flushed_script_cache(running_agent, make_backend, redis_server):
    """The flusher calls EVALSHA directly; after SCRIPT FLUSH (or a Redis restart) it reloads it."""
    agent = running_agent()
    backend = make_backend(agent.config.agent_id)
    assert backend.call("echo", {"message": "one"})["output"] == "one"
    redis_server.client().script_flush()
    assert backend.call("echo", {"message": "two"}, timeout=5)["output"] == "two"
    assert len(backend.responses) == 2
    assert wait_for(lambda: agent.open_store().counts()["outbox"] == 0)


def test_a_failing_group_is_handled_one_by_one(running_agent, make_backend):
    """If one message breaks its group's transaction, the others are still accepted, once each."""
    import json
    import sqlite3

    agent = running_agent()
    backend = make_backend(agent.config.agent_id)
    messages = [backend.message("echo", {"message": f"m{i}"}) for i in range(60)]
    breaker, broken = messages[20]["command_id"].encode(), []
    intake = agent.intake_loop.intake
    real_accept = intake._accept

    def accept(batch):  # the transaction of message 20's group fails, once
        if len(batch) > 1 and any(breaker in data for data in batch) and not broken:
            broken.append(len(batch))
            with intake.store.immediate():
                intake._handle(batch[0])  # something of the group is written, then rolled back
                raise sqlite3.OperationalError("disk I/O error")
        return real_accept(batch)

    intake._accept = accept
    real_take, inbox, waiting = agent.inbox.take, agent.inbox, threading.Event()

    def take(limit, wait):  # the intake thread takes the burst once all of it was read: one group
        if not waiting.is_set():
            waiting.set()
            wait_for(lambda: len(inbox) >= 60, 20, message="the whole burst read")
        return real_take(limit, wait)

    inbox.take = take
    wait_for(waiting.is_set, 5, message="the intake thread to wait for the burst")
    pipe = backend.server.client().pipeline(transaction=False)
    for message in messages:
        pipe.publish(f"cockpit-agent:{agent.config.agent_id}", json.dumps(message))
    pipe.execute()
    wait_for(lambda: len(backend.responses) >= 60, 20, message="60 responses")
    time.sleep(0.3)
    answered = [r["command_id"] for r in backend.responses]
    assert broken == [60]
    assert len(answered) == len(set(answered)) == 60
    store = agent.open_store()
    assert store.counts()["done"] == 60
    store.close()


def test_sigkill_during_a_burst_loses_no_accepted_command(agent_process, agent_env, redis_server, make_backend):
    """kill -9 in the middle of a burst (group commits, echo answered on arrival, git_status in
    workers): after a restart every command the agent accepted is answered exactly once."""
    import json
    import sqlite3

    agent = agent_process().start()
    agent.wait_subscribed(redis_server)
    backend = make_backend(agent_env["AGENT_ID"])
    client = redis_server.client()
    messages = [backend.message("git_status" if i % 50 == 0 else "echo", {} if i % 50 == 0 else {"message": f"m{i}"})
                for i in range(3000)]
    pipe = client.pipeline(transaction=False)
    for message in messages:
        pipe.publish(f"cockpit-agent:{agent_env['AGENT_ID']}", json.dumps(message))
    pipe.execute()
    wait_for(lambda: len(backend.responses) >= 200, 30, message="the burst to be under way")
    agent.kill()

    agent = agent_process().start()
    agent.wait_subscribed(redis_server)
    db = sqlite3.connect(agent_env["OUTBOX_DB"])
    accepted = {row[0] for row in db.execute("SELECT command_id FROM commands")}
    assert len(accepted) >= 200
    wait_for(lambda: {r["command_id"] for r in backend.responses} >= accepted, 60,
             message="a response to every accepted command")
    time.sleep(0.5)
    answered = [r["command_id"] for r in backend.responses]
    assert len(answered) == len(set(answered)), "a command was answered twice"
    assert set(answered) <= {m["command_id"] for m in messages}
    assert db.execute("SELECT count(*) FROM commands WHERE state != 'done'").fetchone()[0] == 0
    db.close()
    agent.terminate()
