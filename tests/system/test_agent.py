"""The agent end to end over a real redis-server: every command's success and refusal paths,
ordering per target, duplicates, and malformed input that must never stop it."""

import json
import logging
import subprocess
import threading
import time

import pytest

from conftest import PASSWORD, sql, wait_for
from errors import StoreUnavailable


@pytest.fixture
def agent(running_agent):
    return running_agent()


@pytest.fixture
def backend(agent, make_backend):
    return make_backend(agent.config.agent_id)


def test_echo_default_and_message(backend):
    assert backend.call("echo")["output"] == "pong"
    response = backend.call("echo", {"message": "hello"})
    assert set(response) >= {"command_id", "status", "output", "error", "execution_time_ms", "timestamp"}
    assert (response["status"], response["output"], response["error"]) == ("success", "hello", None)


def test_git_pull_fast_forwards_and_reports_gits_output(backend, git_repos):
    assert backend.call("git_pull")["output"] == "Already up to date."
    git_repos.commit("new-file")
    response = backend.call("git_pull", {"repository_path": str(git_repos.clone), "branch": "main"})
    assert response["status"] == "success", response
    assert "new-file" in response["output"]
    assert (git_repos.clone / "new-file").exists()


def test_git_pull_as_the_ui_sends_it(backend, git_repos, fake_docker):
    """The backend's request model sends "" for repository_path and branch: the agent's defaults."""
    git_repos.commit("from-the-ui")
    response = backend.call("git_pull", {"repository_path": "", "branch": ""})
    assert response["status"] == "success", response
    assert (git_repos.clone / "from-the-ui").exists()
    assert "On branch main" in backend.call("git_status", {"repository_path": ""})["output"]
    assert backend.call("docker_restart", {"container_name": ""})["output"] == "grafana"


def test_git_pull_of_a_missing_branch_is_an_error(backend):
    response = backend.call("git_pull", {"branch": "no-such-branch"})
    assert response["status"] == "error"
    assert response["error"].startswith("git exited with status 1:")
    assert "no-such-branch" in response["error"]


def test_git_status(backend):
    response = backend.call("git_status")
    assert response["status"] == "success" and "On branch main" in response["output"]


def test_docker_restart_through_the_stand_in(backend, fake_docker):
    response = backend.call("docker_restart", {"container_name": "web-1"})
    assert (response["status"], response["output"]) == ("success", "web-1")
    assert backend.call("docker_restart")["output"] == "grafana"
    assert fake_docker.calls() == [["restart", "--", "web-1"], ["restart", "--", "grafana"]]


@pytest.mark.parametrize("command, params, error", [
    ("reboot", {}, "unknown command 'reboot'; this agent runs: docker_restart, echo, git_pull, git_status"),
    ("git_pull", {"repository_path": "/etc"}, "repository_path '/etc' is not whitelisted; allowed:"),
    ("git_pull", {"branch": "--upload-pack=touch /tmp/x"}, "branch '--upload-pack=touch /tmp/x' is not an allowed"),
    ("git_pull", {"branch": 7}, "branch must be a string, got int 7"),
    ("docker_restart", {"container_name": "--privileged"}, "container_name '--privileged' is not a valid"),
    ("docker_restart", {"container_name": "postgres"}, "container_name 'postgres' is not whitelisted; allowed: grafana, web-1"),
])
def test_refusals_say_what_was_wrong_and_run_nothing(backend, fake_docker, git_repos, command, params, error):
    counter = git_repos.count_pulls_hook()
    response = backend.call(command, params)
    assert response["status"] == "error" and response["output"] is None
    assert response["error"].startswith(error)
    assert fake_docker.calls() == [] and not counter.exists()


def test_docker_error_and_timeout(running_agent, make_backend, fake_docker):
    agent = running_agent(DOCKER_TIMEOUT=3)
    backend = make_backend(agent.config.agent_id)
    fake_docker.behave("fail")
    response = backend.call("docker_restart")
    assert response["error"] == "docker exited with status 1: Error response from daemon: No such container: grafana"
    fake_docker.behave("sleep 30")
    response = backend.call("docker_restart", timeout=20)
    # Counted from the backend's timestamp (whole seconds), less the margin: 1.2 to 2.3 s.
    assert response["error"].startswith(("timed out after 1.", "timed out after 2."))
    assert response["error"].endswith("(DOCKER_TIMEOUT=3 s counted from the command's timestamp, less a 0.75 s margin "
                                      "so that this answer reaches the backend while it still waits); the process was killed")
    fake_docker.behave("ok")
    assert backend.call("docker_restart")["status"] == "success"  # the worker is free again


def test_same_target_runs_one_at_a_time_in_arrival_order(running_agent, make_backend, fake_docker):
    agent = running_agent(WORKER_COUNT=4)
    backend = make_backend(agent.config.agent_id)
    fake_docker.behave("sleep 0.2")
    ids = [backend.send("docker_restart", {"container_name": "grafana"}) for _ in range(4)]
    for command_id in ids:
        backend.wait(command_id, 30)
    store = agent.open_store()
    rows = [store.get(i) for i in ids]
    for earlier, later in zip(rows, rows[1:]):
        assert earlier["finished_at"] <= later["started_at"], "two restarts of one container overlapped"
    assert [r["command_id"] for r in backend.responses] == ids


def test_a_repeated_command_id_is_answered_again_not_run_again(backend, fake_docker):
    message = backend.message("docker_restart", command_id="once-only")
    backend.publish(message)
    first = backend.wait("once-only")
    backend.publish(message)
    wait_for(lambda: len(backend.responses_for("once-only")) == 2, message="the second answer")
    assert backend.responses_for("once-only")[1] == first
    assert len(fake_docker.calls()) == 1


def test_responses_are_also_stored_at_the_result_key(agent, backend, redis_server):
    command_id = backend.send("echo", {"message": "kept"})
    backend.wait(command_id)
    client = redis_server.client()
    key = f"cockpit-agent-result:{agent.config.agent_id}:{command_id}"
    assert json.loads(client.get(key))["output"] == "kept"
    assert 3500 < client.ttl(key) <= 3600


def test_malformed_messages_are_logged_or_answered_and_never_fatal(agent, backend, caplog, fake_docker):
    caplog.set_level(logging.WARNING, logger="cockpit_agent")
    for payload in (b"not json", b"\xff\xfe", b"[1,2,3]", b'"just a string"', b"{}", b'{"command":"echo"}',
                    b'{"command_id": 12, "command": "echo"}', b"{" * 100000):
        backend.publish(payload)
    wait_for(lambda: sum("cannot be answered" in r.getMessage() for r in caplog.records) == 8,
             message="eight dropped-message log lines")
    answered = {
        "wrong-params": backend.message("echo", command_id="wrong-params", params=None) | {"params": [1]},
        "wrong-command": {"command_id": "wrong-command", "command": {"x": 1}},
        "huge": backend.message("echo", {"message": "x" * (2 * 1024 * 1024)}, command_id="huge"),
    }
    for message in answered.values():
        backend.publish(message)
    assert backend.wait("wrong-params")["error"] == "params must be a JSON object, got a list"
    assert backend.wait("wrong-command")["error"].startswith("command must be a non-empty string")
    huge = backend.wait("huge")
    assert huge["status"] == "error" and "over the limit of 1048576 bytes (MAX_MESSAGE_BYTES)" in huge["error"]
    assert backend.call("echo", {"message": "still here"})["output"] == "still here"
    assert all(t.is_alive() for t in agent.threads())


def test_seed_redis_cli_session_verbatim(running_agent, redis_server):
    """The seed README's manual test, with redis-cli, as an operator would type it."""
    agent = running_agent(AGENT_HOSTNAME="app-prod-01")
    cli = ["redis-cli", "-p", str(redis_server.port), "-a", PASSWORD, "--no-auth-warning"]
    registry = subprocess.run([*cli, "HGETALL", "agents:app-prod-01"], capture_output=True, text=True).stdout.split()
    fields = dict(zip(registry[::2], registry[1::2]))
    assert fields["status"] == "online" and fields["hostname"] and fields["capabilities"]
    subscriber = subprocess.Popen([*cli, "SUBSCRIBE", "cockpit-agent-response:app-prod-01"],
                                  stdout=subprocess.PIPE, text=True)
    try:
        assert subscriber.stdout.readline().strip() == "subscribe"
        subscriber.stdout.readline(), subscriber.stdout.readline()
        published = subprocess.run(
            [*cli, "PUBLISH", "cockpit-agent:app-prod-01",
             '{"command_id":"test-123","command":"echo","params":{"message":"hello"}}'],
            capture_output=True, text=True).stdout
        assert published.strip() == "1"
        assert [subscriber.stdout.readline().strip() for _ in range(2)] == ["message", "cockpit-agent-response:app-prod-01"]
        response = json.loads(subscriber.stdout.readline())
    finally:
        subscriber.kill()
        subscriber.wait()
    assert (response["command_id"], response["status"], response["output"]) == ("test-123", "success", "hello")
    assert agent.config.agent_id == "app-prod-01"


def test_worker_pool_lanes_hand_over_without_waiting(agent_env, config_from):
    """One Job per target in flight; finishing it puts the next one on the queue at once."""
    from agent import Agent
    from handlers import Action
    from runtime.workers import Job

    agent = Agent(config_from(agent_env))  # not started: the pool is driven by hand
    pool = agent.pool
    jobs = [Job(f"c{i}", "x", Action(target="git:/r" if i != 2 else None, output="")) for i in range(4)]
    for job in jobs:
        pool.submit(job)
    assert pool.pending() == 4
    assert pool.take(0) is jobs[0] and pool.take(0) is jobs[2]
    assert pool.take(0) is None  # c1 and c3 wait behind c0
    pool.done(jobs[0])
    assert pool.take(0) is jobs[1]
    pool.done(jobs[1])
    assert pool.take(0) is jobs[3]
    pool.done(jobs[3])
    assert pool.pending() == 0 and pool._lanes == {}


def test_listener_resubscribes_after_its_connection_is_dropped(agent, backend, redis_server):
    client = redis_server.client()
    channel = f"cockpit-agent:{agent.config.agent_id}"
    assert client.execute_command("CLIENT", "KILL", "TYPE", "pubsub") >= 1  # the agent's and the backend's
    wait_for(lambda: client.pubsub_numsub(channel)[0][1] == 1, 15, message="the agent to subscribe again")
    wait_for(backend.subscribed.is_set, 10, message="the backend to subscribe again")
    assert backend.call("echo", {"message": "back"})["output"] == "back"


def test_a_handler_that_blows_up_still_gets_an_answer(running_agent, make_backend, monkeypatch):
    import runtime.workers

    def broken(action, children=None, deadline=None):
        raise RuntimeError("boom")

    monkeypatch.setattr(runtime.workers, "execute", broken)
    agent = running_agent()
    backend = make_backend(agent.config.agent_id)
    response = backend.call("docker_restart")
    assert response["status"] == "error"
    assert response["error"] == "the agent failed to run docker_restart: RuntimeError: boom"
    assert agent.open_store().get(response["command_id"])["state"] == "done"


def test_a_group_that_rolls_back_audits_and_counts_each_command_once(agent_env, config_from, monkeypatch):
    """Messages that arrived together are accepted in one transaction; if it rolls back they are
    handled one by one, and nothing from the failed attempt may be audited or counted twice."""
    import json as json_module

    from agent import Agent

    agent = Agent(config_from(agent_env))  # not started: the intake is driven by hand
    audited = []
    monkeypatch.setattr(agent.audit, "command", lambda command_id, *rest: audited.append(command_id))
    real_prepare = agent.registry.prepare

    def prepare(command, params, config):
        if command == "git_status":
            raise RuntimeError("a bug in a handler")
        return real_prepare(command, params, config)

    monkeypatch.setattr(agent.registry, "prepare", prepare)
    store = agent.open_store()
    intake = agent.make_intake(store)
    batch = [json_module.dumps({"command_id": "e1", "command": "echo"}).encode(),
             json_module.dumps({"command_id": "r1", "command": "reboot"}).encode(),
             json_module.dumps({"command_id": "g1", "command": "git_status"}).encode()]
    real_accept = store.accept

    def accept(command_id, *args, **kwargs):  # the group's transaction fails on its last message
        if command_id == "g1" and len(accepted) == 2:
            accepted.append(command_id)
            raise StoreUnavailable("disk I/O error")
        accepted.append(command_id)
        return real_accept(command_id, *args, **kwargs)

    accepted: list[str] = []
    monkeypatch.setattr(store, "accept", accept)
    intake.handle_many(batch)
    assert accepted == ["e1", "r1", "g1", "e1", "r1", "g1"]  # the group rolled back, then one by one
    assert sorted(audited) == ["e1", "g1", "r1"]  # once each; g1's handler bug is an error answer
    assert agent.executed.value == 1
    assert store.get("e1")["state"] == "done"
    assert "the agent failed to check 'git_status': RuntimeError: a bug in a handler" in store.get("g1")["error"]
    store.close()


def test_messages_that_arrive_together_are_accepted_together(agent, backend, redis_server):
    """A burst is accepted in groups (one transaction each), not one message at a time: the
    listener sees what is already buffered or waiting on its socket without a blocking read."""
    sizes = []
    intake = agent.intake_loop.intake
    handle_many = intake.handle_many
    intake.handle_many = lambda batch, *rest: (sizes.append(len(batch)), handle_many(batch, *rest))
    client = redis_server.client()
    messages = [backend.message("echo", {"message": f"m{i}"}) for i in range(200)]
    pipe = client.pipeline(transaction=False)
    for message in messages:
        pipe.publish(f"cockpit-agent:{agent.config.agent_id}", json.dumps(message))
    pipe.execute()
    for message in messages:
        backend.wait(message["command_id"])
    assert sum(sizes) == 200
    assert max(sizes) > 1 and len(sizes) < 100, sizes


def test_a_command_read_just_before_redis_died_is_still_answered(agent, backend, redis_server):
    """The command reaches the listener's socket, then Redis dies, both before the listener
    reads. The command is accepted before the broken connection is dealt with (pub/sub never
    delivers it again), and answered once Redis is back."""
    import threading

    listener = agent.listener
    holding, release = threading.Event(), threading.Event()
    readable = listener._readable

    def held_readable(wait):
        if not holding.is_set():
            holding.set()
            release.wait(10)
        return readable(wait)

    listener._readable = held_readable
    assert holding.wait(5), "the listener did not come back to wait"
    command_id = backend.send("echo", {"message": "last words"})
    redis_server.client().ping()  # a later round trip: the command has been written to the listener
    redis_server.kill()
    release.set()
    wait_for(lambda: agent.open_store().get(command_id) is not None, 15, message="the command to be recorded")
    redis_server.start()
    assert backend.wait(command_id, 30)["output"] == "last words"
    channel = f"cockpit-agent:{agent.config.agent_id}"
    wait_for(lambda: redis_server.client().pubsub_numsub(channel)[0][1] == 1, 15, message="the agent to subscribe again")
    assert backend.call("echo", {"message": "back"})["output"] == "back"


def test_the_listener_tries_redis_again_spread_over_4_s_other_errors_back_off_further(agent_env, config_from):
    """While Redis cannot be reached the listener retries after 0.2-4 s, drawn anew each time
    (its reconnect sends the backlog out once Redis is back, and a fleet's reconnects spread
    over those 4 s); any other failure still backs off up to 5 s."""
    import statistics

    import redis

    from agent import Agent

    listener = Agent(config_from(agent_env)).listener  # not started: delays only
    down = [listener.retry_delay(redis.ConnectionError("refused")) for _ in range(400)]
    assert min(down) >= 0.2 and max(down) <= 4.0, (min(down), max(down))
    # Spread, not bunched: every second of the 4 holds a fair share, from the first try on.
    assert all(40 <= sum(lo <= d < lo + 1 for d in down) <= 160 for lo in (0.2, 1.2, 2.2)), down
    assert 1.5 <= statistics.mean(down) <= 2.7
    other = [listener.retry_delay(redis.ResponseError("NOPERM")) for _ in range(20)]
    assert max(other) > 2.5 and max(other) <= 5.0, other


def test_a_stop_does_not_wait_for_answers_no_one_is_subscribed_to_hear(running_agent, make_backend, redis_server):
    """With the backend away, a stop leaves its answers in the outbox at once instead of waiting
    out its 5 s for them; the next start delivers them."""
    import time

    agent = running_agent()
    message = {"command_id": "while-away", "command": "echo", "params": {"message": "later"}}
    assert redis_server.client().publish(f"cockpit-agent:{agent.config.agent_id}", json.dumps(message)) == 1
    store = agent.open_store()
    wait_for(lambda: sql(store.path, "SELECT count(*) FROM outbox WHERE unheard_since IS NOT NULL")[0][0] == 1,
             10, message="the answer to find no receiver")
    agent.stop_requested.set()
    t0 = time.monotonic()
    agent.shutdown()
    assert time.monotonic() - t0 < 3.0, "the stop waited for an answer no one could hear"
    assert [r[0] for r in sql(store.path, "SELECT command_id FROM outbox")] == ["while-away"]
    store.close()

    again = running_agent()
    backend = make_backend(again.config.agent_id)
    assert backend.wait("while-away", 30)["output"] == "later"


def test_the_stop_line_counts_the_outbox_after_the_flusher_s_last_round(running_agent, make_backend, caplog):
    """Answers delivered and confirmed, waiting only for their batched DELETE, were reported as
    "unsent messages kept" by a clean stop (seen as "5 unsent" right after five echos); the
    flusher deletes them as it stops, so the count is taken after that."""
    agent = running_agent()
    agent.flusher.delete_after = 30.0  # the confirmed rows are still there when the stop begins
    backend = make_backend(agent.config.agent_id)
    for i in range(5):
        assert backend.wait(backend.send("echo", {"message": f"m{i}"}), 10)["output"] == f"m{i}"
    store = agent.open_store()
    assert store.counts()["outbox"] == 5
    agent.stop_requested.set()
    with caplog.at_level("INFO", logger="cockpit_agent"):
        assert agent.shutdown() == 0
    assert store.counts()["outbox"] == 0
    store.close()
    stopped = [r.getMessage() for r in caplog.records if r.getMessage().startswith("stopped;")]
    assert stopped and "0 queued commands and 0 unsent messages kept" in stopped[0], stopped


class _StopJustBeforeClear(threading.Event):
    """An Event whose next clear() is preceded by what a stop does: ``thread.stop`` set, then
    the wake-up set. That is the moment a stop can land in: after the loop checked ``stop``,
    before the iteration clears its wake-up event."""

    def __init__(self, thread):
        super().__init__()
        self.thread, self.fired = thread, threading.Event()
        self._lock = threading.Lock()

    def clear(self):
        with self._lock:
            if not self.fired.is_set():
                self.fired.set()
                self.thread.stop.set()
                self.set()
            super().clear()

    def kick(self):
        """Wake a thread waiting on this event without firing it; never after it fired (a
        wake-up put back after the clear would let a thread that ignores ``stop`` pass)."""
        with self._lock:
            if not self.fired.is_set():
                super().set()


def _stop_just_before_the_clear(agent, thread, event: str) -> None:
    """Swap ``thread.<event>`` for a _StopJustBeforeClear and get ``thread`` to clear it."""
    old = getattr(thread, event)
    armed = _StopJustBeforeClear(thread)
    setattr(thread, event, armed)
    old.set()  # ends a wait on the old event: the next iteration clears the new one
    deadline = time.monotonic() + 10
    while not armed.fired.wait(0.05):
        # A thread already past its clear when the events were swapped waits on the new one.
        armed.kick()
        assert time.monotonic() < deadline, "the thread never cleared its wake-up event"


@pytest.mark.parametrize("name, event", [("flusher", "wake"), ("heartbeat", "now")])
def test_a_stop_just_before_a_loop_clears_its_wake_up_ends_the_loop_at_once(running_agent, name, event):
    """Seen under systemd: a stop took 5 s more, and the flusher's last confirmations could be
    cut off. The flusher cleared the wake-up that the stop had just set, then waited out its
    5 s (the heartbeat, its 30 s, after writing "online" once more)."""
    agent = running_agent()
    thread = getattr(agent, name)
    _stop_just_before_the_clear(agent, thread, event)
    thread.join(2.0)
    assert not thread.is_alive(), f"the {name} still waits after its stop"


def test_a_stop_just_before_the_flusher_clears_its_wake_up_ends_a_failed_iteration_at_once(running_agent):
    """The same stop, when that iteration then fails (Redis gone, a disk error): the flusher's
    backoff waited on the wake-up the iteration had cleared."""
    agent = running_agent()
    flusher = agent.flusher
    wait_for(lambda: hasattr(flusher, "store"), 10, message="the flusher to open its store")

    def failing_due(*args, **kwargs):
        raise StoreUnavailable("disk I/O error")

    flusher.store.due = failing_due
    flusher.retry_delay = lambda exc: 5.0  # the longest backoff
    _stop_just_before_the_clear(agent, flusher, "wake")
    flusher.join(2.0)
    assert not flusher.is_alive(), "the flusher sat out its backoff after its stop"


def test_a_unix_socket_redis_url_works(unix_redis_server, running_agent):
    """.env.example offers REDIS_URL=unix://...; every connection failed with a TypeError
    (redis-py's unix socket connection takes no socket_keepalive), and check crashed."""
    agent = running_agent(REDIS_URL=f"unix://{unix_redis_server.socket}")
    client = unix_redis_server.client()  # the backend, over TCP to the same server
    pubsub = client.pubsub(ignore_subscribe_messages=True)
    pubsub.subscribe(agent.config.response_channel)
    wait_for(lambda: client.pubsub_numsub(agent.config.response_channel)[0][1] == 1, 10)
    message = {"command_id": "over-unix", "command": "echo", "params": {"message": "hi"}}
    assert client.publish(agent.config.command_channel, json.dumps(message)) == 1
    deadline = time.monotonic() + 15
    while True:
        got = pubsub.get_message(timeout=1)
        if got and json.loads(got["data"])["command_id"] == "over-unix":
            break
        assert time.monotonic() < deadline, "no answer over the unix socket"
    assert json.loads(got["data"])["output"] == "hi"
    pubsub.close()



def test_a_replay_while_its_answer_is_being_confirmed_is_answered_again(running_agent, make_backend, fake_docker,
                                                                     monkeypatch):
    """The flusher publishes a worker's answer and confirms it at once (one round trip for the
    run_id, then the DELETE). A replay of the command arriving in between found its row still
    due, took it for an answer not yet published, and got none; the row was then deleted. (Seen
    once as a flaky test_signed_messages.) The confirmation is held here until the replay's
    answer has come."""
    agent = running_agent()
    in_confirm, release = threading.Event(), threading.Event()
    from runtime.cluster import Routes

    real_run_id = Routes.run_id

    def slow_run_id(self, channel):
        in_confirm.set()
        release.wait(15)
        return real_run_id(self, channel)

    monkeypatch.setattr(Routes, "run_id", slow_run_id)
    backend = make_backend(agent.config.agent_id)
    try:
        message = backend.message("docker_restart", command_id="replayed")
        backend.publish(message)
        assert backend.wait("replayed", 10)["status"] == "success"
        assert in_confirm.wait(10), "the flusher never confirmed"
        backend.publish(message)  # the replay, while the first answer is being confirmed
        wait_for(lambda: len(backend.responses_for("replayed")) == 2, 10, message="the replay's answer")
        assert len(fake_docker.calls()) == 1  # answered from the store, not run again
    finally:
        release.set()
