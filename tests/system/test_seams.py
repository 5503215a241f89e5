"""Defects found where two fixes met: a handler's own failure with decrypted params, the stop's
last seconds, and a stuck intake thread that a replacement cannot get past."""

from __future__ import annotations

import logging
import threading
import time

import sealed
from conftest import SECRET, wait_for
from handlers import REGISTRY
from handlers.base import Action, Handler, Registry


def _buggy(params, config):
    """A custom handler with a bug: its check fails by itself, on the decrypted password."""
    return Action(argv=("true",), timeout=5, stdin=int(params["password"]))


def test_a_handler_that_fails_on_a_decrypted_password_answers_without_it(running_agent, make_backend, caplog,
                                                                         monkeypatch, redis_server):
    """The failure is an error answer naming the handler's exception, with the password masked;
    before, it was a traceback quoting the plain password twice, and no answer."""
    import agent as agent_module

    registry = Registry([*REGISTRY.handlers(), Handler("buggy", _buggy, ("password",), "a handler with a bug")])
    original = agent_module.Agent.__init__
    monkeypatch.setattr(agent_module.Agent, "__init__",
                        lambda self, config, registry_=None: original(self, config, registry))
    caplog.set_level(logging.DEBUG)
    agent = running_agent(COCKPIT_SHARED_SECRET=SECRET)
    backend = make_backend(agent.config.agent_id, secret=SECRET)
    plain = "hunter2-plain'quoted"
    ids = [backend.send("buggy", sealed.seal_params({"password": plain}, SECRET)) for _ in range(2)]
    for command_id in ids:
        response = backend.wait(command_id)
        assert response["status"] == "error"
        assert "the agent failed to check 'buggy': ValueError" in response["error"], response["error"]
        assert "***" in response["error"]
    logged = "\n".join(r.getMessage() + (r.exc_text or "") for r in caplog.records)
    published = "\n".join(m.decode() for m in backend.raw)
    stored = "".join(str(v) for k in redis_server.client().keys("cockpit-agent-result:*")
                     for v in [redis_server.client().get(k)])
    for where, text in (("the log", logged), ("a response", published), ("a result key", stored)):
        for form in (plain, repr(plain)[1:-1], "hunter2-plain"):
            assert form not in where and form not in text, f"{form!r} in {where}"


def test_no_online_in_the_registry_once_a_stop_was_asked_for(running_agent, make_backend, redis_server,
                                                              fake_docker):
    """During the stop's grace period the listener no longer reads: the heartbeat must not keep
    writing online (it did until SHUTDOWN_GRACE + 5 s)."""
    agent = running_agent(HEARTBEAT_INTERVAL=1)
    backend = make_backend(agent.config.agent_id)
    fake_docker.behave("sleep 4")
    command_id = backend.send("docker_restart", {"container_name": "web-1"})
    wait_for(lambda: fake_docker.calls(), 10, message="the docker restart to run")
    client = redis_server.client()
    agent.stop_requested.set()
    stopping = threading.Thread(target=agent.shutdown)
    stopping.start()
    try:
        asked_at = time.time()
        wait_for(lambda: time.time() - asked_at > 2.5, 5, message="two heartbeat intervals")
        last = int(client.hget(agent.config.registry_key, "last_heartbeat"))
        assert last <= asked_at + 0.5, f"online written {last - asked_at:.1f} s after the stop was asked for"
    finally:
        stopping.join(30)
    assert backend.wait(command_id)["status"] == "success"
    assert client.hget(agent.config.registry_key, "status") == b"offline"


def test_an_intake_stuck_after_its_replacement_stops_the_agent(running_agent, make_backend):
    """A stuck intake most likely holds the write transaction every replacement waits for:
    the second stall stops the agent (exit 70, systemd restarts it) instead of leaking a
    thread, a connection and a publisher every LISTENER_STALL_TIMEOUT."""
    agent = running_agent(LISTENER_STALL_TIMEOUT=2)
    backend = make_backend(agent.config.agent_id)
    release = threading.Event()
    try:
        stuck = agent.intake_loop  # running_agent waited for its setup
        stuck.intake.handle_many = lambda batch, *rest: release.wait(60)
        backend.send("echo", {"message": "swallowed"})
        wait_for(lambda: agent.intake_loop is not stuck, 20, message="the first replacement")
        wait_for(agent.intake_loop.ready.is_set, 10, message="the replacement to start")
        agent.intake_loop.intake.handle_many = lambda batch, *rest: release.wait(60)
        backend.send("echo", {"message": "swallowed too"})
        wait_for(agent.unrecoverable.is_set, 20, message="the agent to give up on its intake")
        assert agent.stop_requested.is_set()
        assert agent.intakes.replaced == 1
    finally:
        release.set()


def test_a_timeout_without_a_timestamp_counts_from_when_the_listener_read_it(agent_env, config_from):
    """The listener reads, the intake thread accepts later (a burst ahead of it): a command
    without the backend's timestamp has its timeout counted from the read, not from the accept."""
    import json

    from agent import Agent

    agent = Agent(config_from({**agent_env, "DOCKER_TIMEOUT": "6"}))  # not started: driven by hand
    store = agent.open_store()
    try:
        intake = agent.make_intake(store)
        read_at = time.time() - 4.0
        message = {"command_id": "d1", "command": "docker_restart", "params": {"container_name": "web-1"}}
        intake.handle_many([json.dumps(message).encode()], [read_at])
        job = agent.queue.get_nowait()
        assert job.command_id == "d1"
        assert job.deadline.received == read_at and job.deadline.ends == read_at + 6
    finally:
        store.close()
