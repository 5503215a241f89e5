"""sd_notify against a real unix datagram socket in NOTIFY_SOCKET: READY, STATUS, WATCHDOG, STOPPING,
and the watchdog pings stopping when a thread dies or wedges (so systemd restarts the agent)."""

from __future__ import annotations

import os
import re
import socket
import tempfile
import threading
import time
import uuid

import pytest

from conftest import wait_for
from service import notify


class NotifySocket:
    """What systemd listens on: a unix datagram socket, by path or in the abstract namespace."""

    def __init__(self, abstract: bool = False):
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        if abstract:
            self.address = f"@cockpit-agent-test-{uuid.uuid4().hex}"
            self.sock.bind("\0" + self.address[1:])
        else:
            # sun_path holds 108 bytes; pytest's tmp_path can be longer than that.
            self.dir = tempfile.mkdtemp(prefix="ca-notify-", dir="/tmp")
            self.address = os.path.join(self.dir, "notify.sock")
            self.sock.bind(self.address)
        self.messages: list[tuple[float, dict[str, str]]] = []

    def _read(self, timeout: float) -> None:
        self.sock.settimeout(max(0.001, timeout))
        try:
            data = self.sock.recv(65536)
        except (TimeoutError, socket.timeout):
            return
        fields = dict(line.split("=", 1) for line in data.decode().splitlines() if "=" in line)
        self.messages.append((time.monotonic(), fields))

    def mark(self) -> int:
        """A point to wait from: ``wait(..., since=mark)`` ignores what arrived before it."""
        return len(self.messages)

    def wait(self, predicate, timeout: float = 15.0, what: str = "a notify message", since: int = 0) -> dict[str, str]:
        """The first message since ``since`` (received already or before the deadline) matching ``predicate``."""
        seen = since
        deadline = time.monotonic() + timeout
        while True:
            for _, fields in self.messages[seen:]:
                if predicate(fields):
                    return fields
            seen = len(self.messages)
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise AssertionError(f"timed out waiting for {what}; got {[m for _, m in self.messages][-10:]}")
            self._read(min(remaining, 0.2))

    def collect(self, seconds: float) -> list[dict[str, str]]:
        """Everything that arrives in the next ``seconds`` (an observation window, not a sync point)."""
        start = len(self.messages)
        deadline = time.monotonic() + seconds
        while (remaining := deadline - time.monotonic()) > 0:
            self._read(remaining)
        return [fields for _, fields in self.messages[start:]]

    def pings(self) -> int:
        return sum(1 for _, m in self.messages if m.get("WATCHDOG") == "1")

    def close(self) -> None:
        self.sock.close()
        if not self.address.startswith("@"):
            os.unlink(self.address)
            os.rmdir(self.dir)


@pytest.fixture
def notify_socket():
    made = []

    def make(abstract: bool = False) -> NotifySocket:
        made.append(NotifySocket(abstract))
        return made[-1]

    yield make
    for sock in made:
        sock.close()


@pytest.mark.parametrize("abstract", [False, True], ids=["path", "abstract"])
def test_sd_notify_reaches_the_socket(notify_socket, abstract):
    listener = notify_socket(abstract)
    client = notify.SdNotify(listener.address)
    assert client.enabled
    assert client.send("READY=1", "STATUS=hello world")
    assert listener.wait(lambda m: m.get("READY") == "1") == {"READY": "1", "STATUS": "hello world"}
    client.close()


def test_sd_notify_is_a_no_op_outside_systemd(monkeypatch):
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    client = notify.SdNotify()
    assert not client.enabled
    assert client.send("READY=1") is False


def test_watchdog_interval_follows_systemd_variables():
    assert notify.watchdog_interval({"WATCHDOG_USEC": "60000000"}) == 15.0
    assert notify.watchdog_interval({"WATCHDOG_USEC": "60000000", "WATCHDOG_PID": str(os.getpid())}) == 15.0
    assert notify.watchdog_interval({"WATCHDOG_USEC": "60000000", "WATCHDOG_PID": "1"}) is None  # not for us
    assert notify.watchdog_interval({}) is None


def test_agent_process_ready_without_redis_then_online_pings_and_stopping(
        notify_socket, agent_process, agent_env, redis_server):
    """READY=1 comes while Redis is away; STATUS follows Redis; WATCHDOG=1 repeats; SIGTERM says STOPPING=1."""
    listener = notify_socket()
    redis_server.kill()  # the agent starts with Redis away (its port stays reserved for the restart)
    env = {**agent_env, "NOTIFY_SOCKET": listener.address, "WATCHDOG_USEC": "400000"}
    agent = agent_process(env).start()

    ready = listener.wait(lambda m: m.get("READY") == "1", what="READY=1")
    assert ready["MAINPID"] == str(agent.proc.pid)
    down = listener.wait(lambda m: m.get("STATUS", "").startswith("Redis unreachable"), what="a Redis-down STATUS")
    assert re.fullmatch(r"Redis unreachable for \d+ s; 0 responses waiting", down["STATUS"]), down
    pings_before = listener.pings()
    listener.wait(lambda m: m.get("WATCHDOG") == "1" and listener.pings() >= pings_before + 3,
                  what="watchdog pings while Redis is away")  # buffering works: still healthy

    redis_server.start()
    online = listener.wait(lambda m: m.get("STATUS", "").startswith("online"), timeout=20, what="STATUS online")
    assert online["STATUS"] == "online; 0 queued; 0 waiting in outbox"

    agent.proc.send_signal(15)
    stopping = listener.wait(lambda m: m.get("STOPPING") == "1", what="STOPPING=1")
    assert stopping["EXTEND_TIMEOUT_USEC"] == str((5 + 30) * 1_000_000)  # SHUTDOWN_GRACE=5 plus flush and joins
    assert stopping["STATUS"] == "stopping: up to 5 s for running commands to finish"
    assert agent.proc.wait(30) == 0


def test_a_stop_under_systemd_leaves_the_database_in_one_file(
        notify_socket, agent_process, agent_env, redis_server, make_backend):
    """The notifier's read-only connection used to close last, and only a writer's close
    checkpoints the WAL and deletes it: under systemd every stop left -wal and -shm beside the
    outbox (seen under a real systemd; a stop without NOTIFY_SOCKET did not)."""
    listener = notify_socket()
    agent = agent_process({**agent_env, "NOTIFY_SOCKET": listener.address}).start()
    listener.wait(lambda m: m.get("STATUS", "").startswith("online"), timeout=20, what="STATUS online")
    backend = make_backend(agent_env["AGENT_ID"])
    assert backend.wait(backend.send("echo", {"message": "hi"}), 10)["output"] == "hi"
    agent.proc.send_signal(15)
    assert agent.proc.wait(30) == 0
    db = agent_env["OUTBOX_DB"]
    assert os.path.exists(db)
    assert not os.path.exists(db + "-wal") and not os.path.exists(db + "-shm")


def _start_notified(running_agent, listener, **extra):
    return running_agent(NOTIFY_SOCKET=listener.address, WATCHDOG_USEC="200000", **extra)


def test_a_stopped_thread_stops_the_watchdog_pings(notify_socket, running_agent):
    listener = notify_socket()
    agent = _start_notified(running_agent, listener)
    listener.wait(lambda m: m.get("READY") == "1", what="READY=1")
    listener.wait(lambda m: m.get("WATCHDOG") == "1" and listener.pings() >= 3, what="pings")

    worker = agent.pool.workers[0]
    worker.stop.set()
    worker.join(10)
    assert not worker.is_alive()
    listener.wait(lambda m: "cockpit-agent-worker-1 is not running" in m.get("STATUS", ""),
                  what="a STATUS naming the stopped thread")
    # Pings every 50 ms while healthy: a whole second without one shows they stopped.
    later = listener.collect(1.0)
    assert later is not None
    assert not [m for m in later if m.get("WATCHDOG") == "1"], later


def test_a_wedged_thread_stops_the_pings_until_it_moves_again(notify_socket, running_agent):
    listener = notify_socket()
    agent = _start_notified(running_agent, listener, STALL_SECONDS="5")
    listener.wait(lambda m: m.get("WATCHDOG") == "1", what="a first ping")

    # Wedge the flusher inside an iteration, then make that iteration look ancient.
    release, entered = threading.Event(), threading.Event()
    real_loop_once = agent.flusher.loop_once

    def wedged_loop_once():
        entered.set()
        release.wait(30)

    agent.flusher.loop_once = wedged_loop_once
    agent.outbox_wake.set()
    wait_for(entered.is_set, 10, message="the flusher to enter its wedged iteration")
    agent.flusher.last_progress -= 1000
    status = listener.wait(lambda m: "flusher made no progress" in m.get("STATUS", ""), what="a wedged STATUS")
    assert re.search(r"cockpit-agent-flusher made no progress for \d+ s", status["STATUS"])
    assert not [m for m in listener.collect(1.0) if m.get("WATCHDOG") == "1"]

    agent.flusher.loop_once = real_loop_once
    mark = listener.mark()
    release.set()
    listener.wait(lambda m: m.get("WATCHDOG") == "1", what="pings to resume", since=mark)
    assert agent.health().problems == ()


def test_a_dead_thread_ends_run_with_a_failure_code_so_systemd_restarts(agent_env, config_from):
    """Restart=on-failure restarts only on a non-zero exit: a dead thread must not end in 0."""
    import signal

    from agent import Agent
    from errors import EX_SOFTWARE

    agent = Agent(config_from(agent_env))
    handlers = signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)

    def kill_a_worker():
        wait_for(agent.redis_connected.is_set, 15, message="the agent to subscribe")
        agent.pool.workers[1].stop.set()

    killer = threading.Thread(target=kill_a_worker, daemon=True)
    killer.start()
    try:
        assert agent.run() == EX_SOFTWARE
    finally:
        signal.signal(signal.SIGTERM, handlers[0])
        signal.signal(signal.SIGINT, handlers[1])
        killer.join(5)
    assert not agent.pool.workers[1].is_alive()
