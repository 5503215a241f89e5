"""Frozen and half-open connections: a redis-server stopped with SIGSTOP, a subscription that
Redis dropped while the connection lives on, and a listener thread that stopped looping."""

from __future__ import annotations

import threading
import time

from conftest import wait_for


def numsub(server, channel: str) -> int:
    return server.client().pubsub_numsub(channel)[0][1]


def test_sigstopped_redis_is_noticed_and_the_agent_comes_back(running_agent, redis_server, make_backend):
    agent = running_agent()  # HEARTBEAT_INTERVAL=2, REDIS_SOCKET_TIMEOUT=2 (agent_env)
    backend = make_backend(agent.config.agent_id)
    assert backend.call("echo", {"message": "before"})["output"] == "before"

    redis_server.pause()
    try:
        frozen_at = time.monotonic()
        # Liveness bound: 2 liveness intervals + the socket timeout (6 s here), plus a loop turn.
        wait_for(lambda: not agent.redis_connected.is_set(), 20, message="the agent to notice the frozen server")
        noticed = time.monotonic() - frozen_at
    finally:
        redis_server.resume()
    assert noticed < 15, f"took {noticed:.1f} s to notice a frozen Redis"

    wait_for(agent.redis_connected.is_set, 30, message="the agent to subscribe again")
    assert backend.call("echo", {"message": "after"}, timeout=30)["output"] == "after"
    assert numsub(redis_server, agent.config.command_channel) == 1, "one live subscription, no leftover"


def test_a_dropped_subscription_on_a_live_connection_is_detected(running_agent, redis_server, make_backend):
    agent = running_agent()
    channel = agent.config.command_channel
    backend = make_backend(agent.config.agent_id)
    first = agent.listener.pubsub
    # Fault: the server drops the subscription while the socket stays open and PINGs still work.
    first.connection.send_command("UNSUBSCRIBE", channel)
    wait_for(lambda: numsub(redis_server, channel) == 0, 10, message="the subscription to be gone")

    started = time.monotonic()
    wait_for(lambda: agent.listener.pubsub is not None and agent.listener.pubsub is not first
             and numsub(redis_server, channel) == 1, 30, message="the listener to notice and subscribe again")
    # Self-check bound: 3 liveness intervals between probes + one probe deadline (2 + 2 s).
    assert time.monotonic() - started < 20
    assert backend.call("echo", {"message": "heard again"}, timeout=20)["output"] == "heard again"


def test_a_stuck_listener_thread_is_replaced(running_agent, redis_server, make_backend):
    agent = running_agent(LISTENER_STALL_TIMEOUT=3)
    channel = agent.config.command_channel
    backend = make_backend(agent.config.agent_id)
    stuck = agent.listener
    release = threading.Event()
    # Fault: the listener blocks forever inside a call (as a hung library call would).
    stuck._readable = lambda wait: release.wait(60)
    try:
        wait_for(lambda: agent.listener is not stuck, 20, message="the watchdog to replace the listener")
        assert agent.listeners.replaced == 1
        wait_for(agent.redis_connected.is_set, 15, message="the new listener to subscribe")
        assert backend.call("echo", {"message": "new listener"}, timeout=20)["output"] == "new listener"
        assert numsub(redis_server, channel) == 1, "the stuck listener's subscription was closed"
    finally:
        release.set()
    wait_for(lambda: not stuck.is_alive(), 15, message="the stuck thread to end once released (no zombie)")
    assert agent.redis_connected.is_set(), "the old thread's exit must not mark the new one disconnected"
    assert agent.listener.is_alive()


def test_a_stuck_intake_thread_is_replaced(running_agent, redis_server, make_backend):
    """The listener only reads; the intake thread accepts. One stuck in a call is replaced by a
    fresh one with its own Store, and the subscription is left alone."""
    agent = running_agent(LISTENER_STALL_TIMEOUT=3)
    backend = make_backend(agent.config.agent_id)
    listener, pubsub, stuck = agent.listener, agent.listener.pubsub, agent.intake_loop
    release = threading.Event()
    stuck.intake.handle = lambda data: release.wait(60)  # the fault: a call that never returns
    backend.send("echo", {"message": "swallowed by the stuck intake"})
    try:
        wait_for(lambda: agent.intake_loop is not stuck, 20, message="the watchdog to replace the intake")
        assert backend.call("echo", {"message": "new intake"}, timeout=20)["output"] == "new intake"
        assert agent.intake_loop.store is not stuck.store
        assert agent.listener is listener and listener.pubsub is pubsub, "the subscription was not touched"
    finally:
        release.set()
    wait_for(lambda: not stuck.is_alive(), 15, message="the stuck thread to end once released (no zombie)")
    assert agent.intake_loop.is_alive()
    assert backend.call("echo", {"message": "still"}, timeout=10)["output"] == "still"


def test_a_busy_listener_is_not_mistaken_for_a_dead_subscription(running_agent, make_backend):
    """Commands queued in front of the probe (a slow database) delay it past its deadline; the
    commands themselves prove the subscription, so the listener must not resubscribe (and drop
    whatever is published while it does)."""
    agent = running_agent()
    backend = make_backend(agent.config.agent_id)
    listener = agent.listener
    pubsub = listener.pubsub
    real_handle = agent.intake_loop.intake.handle

    def slow_handle(data):
        time.sleep(0.4)  # the fault: each message takes 0.4 s to commit
        return real_handle(data)

    agent.intake_loop.intake.handle = slow_handle
    agent.heartbeat_now.set()  # a beat, and its probe, go out now, behind the burst below
    ids = [backend.send("echo", {"message": f"burst {i}"}) for i in range(14)]  # ~5.6 s > the 4 s probe deadline
    for cid in ids:
        assert backend.wait(cid, 60)["status"] == "success"
    assert agent.listener is listener and listener.pubsub is pubsub, "the listener resubscribed needlessly"


def test_probe_refused_by_an_acl_disables_the_self_check_instead_of_reconnecting(redis_server, running_agent,
                                                                               make_backend):
    """A Redis user that may not PUBLISH on the command channel (but may subscribe to it)."""
    # Subscribe to the command channel, publish only on the response channel (a selector).
    redis_server.client().execute_command(
        "ACL", "SETUSER", "agent", "on", ">agent-pw-5521", "~*", "&cockpit-agent:*", "+@all", "-publish",
        "(+publish &cockpit-agent-response:*)")
    agent = running_agent(REDIS_USERNAME="agent", REDIS_PASSWORD="agent-pw-5521")
    backend = make_backend(agent.config.agent_id)
    listener, pubsub = agent.listener, agent.listener.pubsub
    agent.heartbeat_now.set()
    wait_for(lambda: agent.probe.refused, 10, message="the refused probe to be noticed")
    assert backend.call("echo", {"message": "still served"})["output"] == "still served"
    assert agent.listener is listener and listener.pubsub is pubsub, "a refused probe must not tear down"


def registry_and_subscribers(server, agent_id: str):
    """The registry's status and the command channel's subscriber count at one instant."""
    pipe = server.client(socket_timeout=0.5).pipeline(transaction=True)
    pipe.hget(f"agents:{agent_id}", "status")
    pipe.pubsub_numsub(f"cockpit-agent:{agent_id}")
    status, subscribers = pipe.execute()
    return status, subscribers[0][1]


def test_online_in_the_registry_only_once_the_listener_hears(redis_server, agent_env, config_from):
    """A Redis that accepts TCP but does not answer yet (SIGSTOP) at the agent's start: the
    heartbeat wrote status=online anyway (Redis ran the write once it thawed), about 10 s before
    the listener could hear a command."""
    from agent import Agent

    agent_id = agent_env["AGENT_ID"]
    redis_server.pause()
    agent = Agent(config_from(agent_env))
    agent.start()
    seen, wrong, stop = [], [], threading.Event()

    def watch():
        while not stop.is_set():
            try:
                status, subscribers = registry_and_subscribers(redis_server, agent_id)
            except Exception:
                continue  # frozen
            seen.append(status)
            if status == b"online" and subscribers < 1:
                wrong.append(subscribers)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    try:
        stop.wait(5)
        redis_server.resume()
        wait_for(lambda: b"online" in seen, 30, message="the registry to say online")
        assert agent.redis_connected.is_set()
        stop.wait(3)
        assert not wrong, f"the registry said online while nobody was subscribed ({len(wrong)} times)"
    finally:
        stop.set()
        watcher.join(5)
        agent.stop_requested.set()
        agent.shutdown()


def test_a_frozen_redis_keeps_the_subscription_and_the_first_command_after_the_thaw_is_answered(
        running_agent, redis_server, make_backend):
    """Frozen past the listener's silence limit (6 s here), the old listener tore the subscription
    down and was between connections at the thaw: a command published at once was lost. A
    frozen server keeps its connections and delivers on them once it thaws."""
    agent = running_agent()  # HEARTBEAT_INTERVAL=2, REDIS_SOCKET_TIMEOUT=2
    backend = make_backend(agent.config.agent_id)
    listener, pubsub = agent.listener, agent.listener.pubsub
    assert backend.call("echo", {"message": "before"})["output"] == "before"
    message = backend.message("echo", {"message": "at the thaw"})
    redis_server.pause()
    try:
        wait_for(lambda: not agent.redis_connected.is_set(), 20, message="the agent to notice the frozen server")
        time.sleep(3)  # the fault: frozen for longer (the listener checks once more meanwhile)
    finally:
        redis_server.resume()
    assert backend.publish(message) == 1, "nobody subscribed at the thaw"
    assert backend.wait(message["command_id"], 15)["output"] == "at the thaw"
    assert agent.listener is listener and listener.pubsub is pubsub, "the subscription was torn down"
    wait_for(agent.redis_connected.is_set, 15, message="the agent to be online again")


def test_no_online_in_the_registry_while_the_listener_cannot_subscribe(redis_server, agent_env, config_from):
    """A Redis user that may write the registry but not SUBSCRIBE: the heartbeat said online
    all along, to a backend whose commands nobody heard."""
    from agent import Agent

    redis_server.client().execute_command("ACL", "SETUSER", "agent", "on", ">agent-pw-7731", "~*", "&*",
                                          "+@all", "-subscribe")
    env = {**agent_env, "REDIS_USERNAME": "agent", "REDIS_PASSWORD": "agent-pw-7731"}
    agent = Agent(config_from(env))
    agent.start()
    try:
        wait_for(lambda: agent.listener.failing_since is not None, 15, message="the listener to fail to subscribe")
        agent.stop_requested.wait(2 * agent.config.heartbeat_interval)  # heartbeats would have gone out meanwhile
        status, subscribers = registry_and_subscribers(redis_server, agent_env["AGENT_ID"])
        assert subscribers == 0 and status != b"online"
    finally:
        agent.stop_requested.set()
        agent.shutdown()
