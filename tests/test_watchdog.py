"""The watchdog and its Slots, with fake stuck Loops (a loop_once that blocks on an Event)."""

from __future__ import annotations

import threading
import time

import pytest

from conftest import wait_for
from runtime.loop import Loop
from runtime.watchdog import Slot, Watchdog


class FakeStuckLoop(Loop):
    """A Loop whose loop_once blocks until ``release`` is set: its last_progress stops moving."""

    def __init__(self, config, release: threading.Event):
        super().__init__("fake", config)
        self.release = release

    def loop_once(self) -> None:
        self.release.wait(30)


@pytest.fixture
def config(agent_env, config_from):
    return config_from({**agent_env, "LISTENER_STALL_TIMEOUT": "1"})


def slot(config, release, retired):
    return Slot(lambda: FakeStuckLoop(config, release), retired.append)


def test_a_stuck_listener_is_retired_and_replaced_a_moving_one_left_alone(config):
    release, retired = threading.Event(), []
    listeners, intakes = slot(config, release, retired), slot(config, threading.Event(), [])
    watchdog = Watchdog("watchdog", config, listeners, intakes, give_up=lambda: None)
    first = listeners.current
    first.start()
    try:
        assert not watchdog.check()  # just started: progress is recent
        first.last_progress = time.monotonic() - 5
        assert watchdog.check()
        assert retired == [first] and listeners.current is not first and listeners.replaced == 1
        assert listeners.current.is_alive()
    finally:
        release.set()
        for thread in (first, listeners.current):
            thread.stop.set()


def test_a_second_stuck_intake_gives_up_instead_of_replacing_again(config):
    release, gave_up = threading.Event(), threading.Event()
    intakes = slot(config, release, [])
    watchdog = Watchdog("watchdog", config, slot(config, release, []), intakes, give_up=gave_up.set)
    threads = [intakes.current]
    intakes.current.start()
    try:
        intakes.current.last_progress = time.monotonic() - 5
        assert watchdog.check_intake() and intakes.replaced == 1
        threads.append(intakes.current)
        wait_for(intakes.current.is_alive)
        intakes.current.last_progress = time.monotonic() - 5
        assert not watchdog.check_intake()
        assert gave_up.is_set() and intakes.replaced == 1
    finally:
        release.set()
        for thread in threads:
            thread.stop.set()
