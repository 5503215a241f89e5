"""Signals reach the agent through a pipe and a thread of their own, never through a handler
that takes a lock (a SIGTERM landing inside Event.wait deadlocked the main thread)."""

from __future__ import annotations

import os
import signal
import threading

from agent import Agent
from runtime.signals import SignalWatcher


def test_a_sigterm_arriving_inside_event_wait_does_not_deadlock():
    stop = threading.Event()
    before = signal.getsignal(signal.SIGTERM)
    watcher = SignalWatcher(lambda signum: stop.set())
    watcher.install()
    try:
        with stop._cond:  # where the main thread is while its stop.wait(1.0) begins or ends
            os.kill(os.getpid(), signal.SIGTERM)  # the Python handler runs here, under that lock
            # (a handler calling stop.set() never returned from this line)
        assert stop.wait(5), "the watcher thread passed the signal on"
    finally:
        watcher.close()
    assert signal.getsignal(signal.SIGTERM) is before
    assert signal.set_wakeup_fd(-1) == -1, "the wake-up fd is given back"


def test_the_first_signal_asks_for_a_graceful_stop_the_second_forces_it(agent_env, config_from):
    agent = Agent(config_from(agent_env))  # not started: only its stop flags are used
    watcher = SignalWatcher(agent.request_stop)
    watcher.install()
    try:
        os.kill(os.getpid(), signal.SIGINT)
        assert agent.stop_requested.wait(5) and not agent.force_stop.is_set()
        os.kill(os.getpid(), signal.SIGTERM)
        assert agent.force_stop.wait(5)
    finally:
        watcher.close()
