"""systemd integration: ``sd_notify`` (READY, STATUS, WATCHDOG, STOPPING) and the watchdog logic.

The protocol is one datagram per message to the unix socket named in ``$NOTIFY_SOCKET``
(an abstract socket when the name starts with ``@``), so it is written out here instead of
pulling in a dependency. Without ``$NOTIFY_SOCKET`` (not under systemd) every call is a no-op.

The Notifier thread sends ``WATCHDOG=1`` only while every agent thread is alive and has made
progress recently; a thread that died or wedged stops the pings, and systemd (``WatchdogSec=``)
then kills and restarts the agent.
"""

from __future__ import annotations

import logging
import os
import socket
import sqlite3
import threading
import time
from typing import TYPE_CHECKING
from urllib.parse import quote

if TYPE_CHECKING:
    from agent import Agent, Loop

log = logging.getLogger("cockpit_agent.notify")


def connect_read_only(path: str) -> sqlite3.Connection:
    """A read-only connection to the outbox: counting must never create or change the file."""
    return sqlite3.connect(f"file:{quote(os.path.abspath(path))}?mode=ro", uri=True, timeout=5)


class SdNotify:
    """A client for ``$NOTIFY_SOCKET``; ``enabled`` is False outside systemd."""

    def __init__(self, address: str | None = None):
        address = os.environ.get("NOTIFY_SOCKET") if address is None else address
        self.address: str | None = None
        self.sock: socket.socket | None = None
        if address:
            # '@name' is Linux's abstract namespace: a leading NUL byte on the wire.
            self.address = "\0" + address[1:] if address.startswith("@") else address
            self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
            # Never block the agent on a reader that is not reading (a full datagram queue):
            # a dropped STATUS or ping is replaced by the next one.
            self.sock.setblocking(False)

    @property
    def enabled(self) -> bool:
        return self.sock is not None

    def send(self, *fields: str) -> bool:
        """Send ``KEY=value`` lines as one datagram; False (never an exception) if it failed."""
        if self.sock is None:
            return False
        try:
            self.sock.sendto("\n".join(fields).encode("utf-8", "replace"), self.address)
            return True
        except OSError as exc:
            log.debug("sd_notify failed: %s", exc)
            return False

    def close(self) -> None:
        if self.sock is not None:
            self.sock.close()
            self.sock = None


def watchdog_interval(environ: dict[str, str] | None = None) -> float | None:
    """How often to ping (seconds): a quarter of ``$WATCHDOG_USEC``, or None when it is off.

    Like ``sd_watchdog_enabled``: ``$WATCHDOG_PID``, when set, must be this process.
    """
    env = os.environ if environ is None else environ
    try:
        usec = int(env.get("WATCHDOG_USEC", "0"))
    except ValueError:
        return None
    pid = env.get("WATCHDOG_PID")
    if usec <= 0 or (pid and pid != str(os.getpid())):
        return None
    return usec / 1_000_000 / 4


def stall_limit(thread: Loop, agent: Agent) -> float:
    """How long ``thread`` may go without finishing an iteration before it counts as wedged.

    The longest legitimate iteration is a worker running a command (its own timeout, then a
    kill and a drain) or the heartbeat sleeping its interval; everything else answers within
    a socket timeout or SQLite's busy timeout, which STALL_SECONDS covers.
    """
    config = agent.config
    limit = float(config.stall_seconds) + 3 * config.redis_socket_timeout
    if thread is agent.heartbeat:
        limit += config.heartbeat_interval
    job = getattr(thread, "current", None)
    if job is not None and job.action.timeout:
        limit += job.action.timeout + 15
    return limit


def unhealthy(agent: Agent, now: float | None = None) -> list[str]:
    """Why the agent should not ping the watchdog: one phrase per dead or wedged thread."""
    now = time.monotonic() if now is None else now
    problems = []
    for thread in agent.threads():
        if not thread.is_alive():
            problems.append(f"{thread.name} is not running")
            continue
        silent = now - thread.last_progress
        if silent > stall_limit(thread, agent):
            problems.append(f"{thread.name} made no progress for {silent:.0f} s")
    return problems


class Notifier(threading.Thread):
    """Tells systemd the agent is ready, what it is doing, and (while healthy) that it lives.

    Owns its own read-only SQLite connection for the outbox count.
    """

    status_interval = 1.0

    def __init__(self, agent: Agent, notify: SdNotify | None = None):
        super().__init__(name="cockpit-agent-notify", daemon=True)
        self.agent = agent
        self.notify = notify or SdNotify()
        self.stop = threading.Event()
        self.ping_every = watchdog_interval()
        self.last_status: str | None = None
        self.down_since: float | None = None
        self.db: sqlite3.Connection | None = None

    @property
    def enabled(self) -> bool:
        return self.notify.enabled

    def start(self) -> None:
        """Start pinging, but only under systemd."""
        if self.enabled:
            super().start()

    def run(self) -> None:
        self.notify.send("READY=1", f"STATUS={self.status_text()}", f"MAINPID={os.getpid()}")
        log.debug("told systemd READY=1 (watchdog %s)", f"every {self.ping_every:g} s" if self.ping_every else "off")
        next_ping = 0.0
        wedged_reported = False
        while not self.stop.is_set():
            try:
                self.send_status()
                now = time.monotonic()
                if self.ping_every and now >= next_ping:
                    # While stopping, threads end on purpose: nothing to judge, keep systemd patient.
                    problems = [] if self.agent.stop_requested.is_set() else unhealthy(self.agent, now)
                    if problems:
                        if not wedged_reported:
                            log.critical("not pinging the watchdog: %s", "; ".join(problems))
                            wedged_reported = True
                    else:
                        wedged_reported = False
                        self.notify.send("WATCHDOG=1")
                    next_ping = now + self.ping_every
            except Exception:
                log.exception("notify iteration failed")
            self.stop.wait(min(self.status_interval, self.ping_every or self.status_interval))
        if self.db is not None:
            self.db.close()

    def send_status(self) -> None:
        """Send STATUS= when its text changed."""
        text = self.status_text()
        if text != self.last_status:
            self.notify.send(f"STATUS={text}")
            self.last_status = text

    def outbox_count(self) -> int | None:
        """Messages waiting in the outbox, or None when the database cannot be read."""
        try:
            if self.db is None:
                self.db = connect_read_only(self.agent.config.outbox_db)
            return self.db.execute("SELECT count(*) FROM outbox").fetchone()[0]
        except sqlite3.Error:
            return None

    def status_text(self) -> str:
        """One line for ``systemctl status``: Redis, the queue, the outbox, and any sick thread."""
        agent = self.agent
        waiting = self.outbox_count()
        waiting_text = "outbox unreadable" if waiting is None else f"{waiting} waiting in outbox"
        if agent.stop_requested.is_set():
            return f"stopping; {agent.pool.pending()} queued; {waiting_text}"
        problems = unhealthy(agent)
        if agent.redis_connected.is_set():
            self.down_since = None
            text = f"online; {agent.pool.pending()} queued; {waiting_text}"
        else:
            now = time.monotonic()
            if self.down_since is None:
                self.down_since = agent.listener.failing_since or now
            responses = "outbox unreadable" if waiting is None else f"{waiting} responses waiting"
            text = f"Redis unreachable for {now - self.down_since:.0f} s; {responses}"
        if problems:
            text += "; " + "; ".join(problems)
        return text

    def stopping(self) -> None:
        """The agent began a graceful stop: say so, and make sure systemd waits for the grace period.

        EXTEND_TIMEOUT_USEC covers a SHUTDOWN_GRACE raised in agent.env beyond the unit's
        TimeoutStopSec: the grace, plus the final flush and thread joins.
        """
        grace = self.agent.config.shutdown_grace
        self.notify.send("STOPPING=1", f"STATUS=stopping: up to {grace:g} s for running commands to finish",
                         f"EXTEND_TIMEOUT_USEC={int((grace + 30) * 1_000_000)}")

    def close(self) -> None:
        """Stop the thread and the socket."""
        self.stop.set()
        if self.is_alive():
            self.join(5)
        self.notify.close()
