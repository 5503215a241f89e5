"""Answers published on arrival: the intake publishes what it has just committed itself, the
flusher confirms it later, and anything that does not go out falls back to the flusher. Real
redis-server processes throughout (restarted, killed) to change the run_id under the agent."""

from __future__ import annotations

import json
import sqlite3
import time

from conftest import wait_for


def outbox_rows(db: str) -> list[dict]:
    conn = sqlite3.connect(db, timeout=10)
    conn.row_factory = sqlite3.Row
    try:
        return [dict(r) for r in conn.execute("SELECT * FROM outbox ORDER BY id")]
    finally:
        conn.close()


def run_id_of(server) -> str:
    return server.client().info("server")["run_id"]


def test_an_echo_is_published_by_the_intake_held_then_confirmed(running_agent, make_backend):
    agent = running_agent()
    agent.flusher.delete_after = 3.0  # keep the published, confirmed row long enough to look at it
    backend = make_backend(agent.config.agent_id)
    published_by_flusher = []
    real_publish = agent.flusher.publish
    agent.flusher.publish = lambda rows: published_by_flusher.append(rows) or real_publish(rows)

    command_id = backend.send("echo", {"message": "first"})
    assert backend.wait(command_id)["output"] == "first"
    held = outbox_rows(agent.config.outbox_db)
    assert [r["command_id"] for r in held] == [command_id], "the answer stays until confirmed"
    assert held[0]["next_attempt_at"] > time.time() + 10, "held: the flusher must not publish it again"
    assert held[0]["attempts"] == 0

    assert agent.flusher.unconfirmed[held[0]["id"]][0] is None, "confirmed by the intake, only to delete"
    agent.flusher.delete_after = 0.0
    agent.outbox_wake.set()
    wait_for(lambda: not outbox_rows(agent.config.outbox_db), 10, message="the confirmation to delete the row")
    assert published_by_flusher == [], "the flusher confirmed it; it never had to publish it"
    assert len(backend.responses_for(command_id)) == 1


def test_confirmed_answers_are_deleted_together_not_as_each_comes_of_age(running_agent, make_backend):
    """A stream of echos: their rows go in one DELETE once the oldest has waited delete_after,
    not one small DELETE every 10 ms (each of which made the listener re-read its pages)."""
    agent = running_agent()
    agent.flusher.delete_after = 4.0  # the whole stream below fits in one window, even on a busy machine
    backend = make_backend(agent.config.agent_id)
    deletes: list[int] = []
    delivered = agent.flusher.store.delivered
    agent.flusher.store.delivered = lambda ids: (deletes.append(len(ids)) if ids else None, delivered(ids))[1]
    t0 = time.monotonic()
    ids = []
    for i in range(40):
        ids.append(backend.send("echo", {"message": f"m{i}"}))
        time.sleep(0.005)  # a stream, not a burst: each answer is handed over on its own
    for command_id in ids:
        backend.wait(command_id)
    assert time.monotonic() - t0 < 3.5, "the stream took longer than the window; the test says nothing"
    wait_for(lambda: not outbox_rows(agent.config.outbox_db), 15, message="the rows to be deleted")
    assert sum(deletes) == 40
    assert len(deletes) == 1, deletes


def test_a_repeated_echo_while_its_answer_is_held_is_answered_again(running_agent, make_backend):
    """Held only for confirmation is not 'waiting to be published': a backend that asks again
    (it missed the first copy) gets the stored response again, without a second run."""
    agent = running_agent()
    agent.flusher.delete_after = 5.0
    backend = make_backend(agent.config.agent_id)
    message = backend.message("echo", {"message": "twice"}, command_id="asked-twice")
    backend.publish(message)
    first = backend.wait("asked-twice")
    assert outbox_rows(agent.config.outbox_db), "still held"
    backend.publish(message)
    wait_for(lambda: len(backend.responses_for("asked-twice")) == 2, 10, message="the second answer")
    assert backend.responses_for("asked-twice")[1] == first
    conn = sqlite3.connect(agent.config.outbox_db)
    assert conn.execute("SELECT count(*) FROM commands WHERE command_id = 'asked-twice'").fetchone()[0] == 1
    conn.close()
    agent.flusher.delete_after = 0.0  # let the stop find an empty outbox at once
    agent.outbox_wake.set()


def test_an_answer_no_one_hears_goes_to_the_flusher_and_reaches_a_late_subscriber(running_agent, make_backend,
                                                                                  redis_server):
    agent = running_agent()
    command_id = "heard-late"
    redis_server.client().publish(f"cockpit-agent:{agent.config.agent_id}", json.dumps(
        {"command_id": command_id, "command": "echo", "params": {"message": "late"}}))
    # Nobody listens: the intake's PUBLISH counts 0 receivers, so the row is made due and the
    # flusher retries it with its backoff (attempts counted, "no receiver").
    wait_for(lambda: any(r["attempts"] >= 1 for r in outbox_rows(agent.config.outbox_db)), 10,
             message="the flusher to retry the unheard answer")
    row = outbox_rows(agent.config.outbox_db)[0]
    assert row["command_id"] == command_id and row["last_error"] == "no receiver"
    backend = make_backend(agent.config.agent_id)
    assert backend.wait(command_id, 20)["output"] == "late"


def test_the_answer_publisher_reads_the_run_id_once_per_connection(running_agent, redis_server):
    """Read once, trusted for every later PUBLISH on the same connection; read again after a
    Redis restart (a new connection), so a confirmation never trusts the wrong server."""
    from outbox import Message
    from runtime.connection import OneConnection
    from runtime.publish import AnswerPublisher

    agent = running_agent()
    client = agent.config.redis_client(health_check_interval=0)
    one = OneConnection(client, wait=10)
    publisher = AnswerPublisher(agent.config, client)
    message = Message("some-channel", "payload")
    calls = []
    try:
        results, run_id = publisher.publish([message])
        assert results == [0] and run_id == run_id_of(redis_server)
        assert publisher.run_id_known
        with one as connection:
            real = connection.send_command
        connection.send_command = lambda *a, **k: calls.append(a[0]) or real(*a, **k)
        results, again = publisher.publish([message])
        assert again == run_id and calls == ["EVALSHA"], "one EVALSHA, no second look at INFO"

        before = run_id
        redis_server.restart()
        wait_for(lambda: redis_server.client().ping(), 10)
        try:
            publisher.publish([message])  # the old connection is dead: this one fails
        except Exception:
            pass
        results, after = publisher.publish([message])
        assert after and after != before and after == run_id_of(redis_server)
        assert len(client.connection_pool._available_connections) == 1, "one connection, made again"
    finally:
        client.close()


def test_an_answer_whose_publish_fails_is_made_due_for_the_flusher(running_agent, make_backend, redis_server):
    """Redis went away between the commit and the PUBLISH: the committed answer is not lost,
    the flusher delivers it once Redis is back."""
    agent = running_agent()
    backend = make_backend(agent.config.agent_id)
    assert backend.call("echo", {"message": "warm"})["status"] == "success"
    intake = agent.intake_loop.intake
    real_publish = intake.publisher.publish

    def publish_into_a_dead_redis(messages):
        redis_server.kill()
        return real_publish(messages)

    intake.publisher.publish = publish_into_a_dead_redis
    command_id = backend.send("echo", {"message": "after the outage"})
    wait_for(lambda: any(r["command_id"] == command_id and r["next_attempt_at"] <= time.time()
                         for r in outbox_rows(agent.config.outbox_db)), 10,
             message="the answer to be made due (not left held)")
    intake.publisher.publish = real_publish
    redis_server.start()  # on the same port; the backend's subscriber reconnects by itself
    assert backend.wait(command_id, 30)["output"] == "after the outage"


def test_redis_restarted_between_the_publish_and_its_confirmation_publishes_again(running_agent, make_backend,
                                                                                  redis_server):
    """The intake's confirming PING finds a new connection (Redis was killed and restarted
    empty right after the PUBLISH): the flusher compares run_ids and publishes it again."""
    agent = running_agent()
    backend = make_backend(agent.config.agent_id)
    assert backend.call("echo", {"message": "warm"})["status"] == "success"
    publisher = agent.intake_loop.intake.publisher
    real_confirm = publisher.confirm
    restarts = []

    def restart_then_confirm():
        if not restarts:
            redis_server.restart()
            restarts.append(1)
        return real_confirm()

    publisher.confirm = restart_then_confirm
    command_id = backend.send("echo", {"message": "again"})
    wait_for(lambda: len(backend.responses_for(command_id)) >= 1, 30, message="the response, published again")
    assert backend.responses_for(command_id)[0]["output"] == "again"
    wait_for(lambda: not outbox_rows(agent.config.outbox_db), 20, message="the outbox to drain")
    assert redis_server.client().get(agent.config.result_key(command_id)) is not None, \
        "published again on the new Redis, result key included"


def test_a_confirmed_answer_is_not_published_again_when_redis_comes_back(running_agent, make_backend, redis_server):
    """Chaos found it: a Redis restart made every held row due, including answers the intake had
    already confirmed and that only waited for their DELETE; the flusher sent them again."""
    agent = running_agent()
    agent.flusher.delete_after = 30.0  # confirmed, and still in the outbox when Redis restarts
    backend = make_backend(agent.config.agent_id)
    command_id = backend.send("echo", {"message": "once"})
    assert backend.wait(command_id)["output"] == "once"
    wait_for(lambda: agent.flusher.unconfirmed, 10, message="the flusher to take the confirmed row")
    republished = []
    real_publish = agent.flusher.publish
    agent.flusher.publish = lambda rows: republished.extend(r["command_id"] for r in rows) or real_publish(rows)

    redis_server.restart()
    wait_for(lambda: agent.redis_connected.is_set() and backend.subscribed.is_set()
             and redis_server.client().pubsub_numsub(f"cockpit-agent:{agent.config.agent_id}")[0][1] == 1, 30,
             message="the agent and the backend to subscribe again")
    assert backend.call("echo", {"message": "after"})["output"] == "after"  # the flusher has run since
    agent.flusher.delete_after = 0.0
    agent.outbox_wake.set()
    wait_for(lambda: not outbox_rows(agent.config.outbox_db), 10, message="the outbox to drain")
    assert command_id not in republished
    assert len(backend.responses_for(command_id)) == 1


def test_a_burst_is_answered_through_the_flusher_each_answer_once(running_agent, make_backend, redis_server):
    """Groups bigger than publish_on_arrival_max leave their answers to the flusher, which
    publishes them while the listener accepts the next group."""
    agent = running_agent()
    backend = make_backend(agent.config.agent_id)
    published_by_flusher = []
    real_publish = agent.flusher.publish
    agent.flusher.publish = lambda rows: published_by_flusher.extend(r["command_id"] for r in rows) or real_publish(rows)
    messages = [backend.message("echo", {"message": str(i)}) for i in range(300)]
    pipe = redis_server.client().pipeline(transaction=False)
    for message in messages:
        pipe.publish(f"cockpit-agent:{agent.config.agent_id}", json.dumps(message))
    pipe.execute()
    for message in messages:
        assert backend.wait(message["command_id"], 30)["output"] == message["params"]["message"]
    wait_for(lambda: not outbox_rows(agent.config.outbox_db), 10, message="the outbox to drain")
    assert len(published_by_flusher) > agent.intake_loop.intake.publish_on_arrival_max
    assert all(len(backend.responses_for(m["command_id"])) == 1 for m in messages)
