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
import threading
import time
from collections.abc import Callable

from service.health import Health

log = logging.getLogger("cockpit_agent.notify")


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


class Notifier(threading.Thread):
    """Tells systemd the agent is ready, what it is doing, and (while healthy) that it lives.

    Everything it says comes from one ``Health`` snapshot per round (``health``).
    """

    status_interval = 1.0

    def __init__(self, health: Callable[[], Health], shutdown_grace: float, notify: SdNotify | None = None):
        super().__init__(name="cockpit-agent-notify", daemon=True)
        self.health, self.shutdown_grace = health, shutdown_grace
        self.notify = notify or SdNotify()
        self.stop = threading.Event()
        self.ping_every = watchdog_interval()
        self.last_status: str | None = None
        self.down_since: float | None = None

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
                health = self.health()
                self.send_status(health)
                now = time.monotonic()
                if self.ping_every and now >= next_ping:
                    # While stopping, threads end on purpose: nothing to judge, keep systemd patient.
                    problems = () if health.stopping else health.problems
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

    def send_status(self, health: Health | None = None) -> None:
        """Send STATUS= when its text changed."""
        text = self.status_text(health)
        if text != self.last_status:
            self.notify.send(f"STATUS={text}")
            self.last_status = text

    def status_text(self, health: Health | None = None) -> str:
        """One line for ``systemctl status``: Redis, the queue, the outbox, and any sick thread."""
        health = self.health() if health is None else health
        waiting = health.outbox
        waiting_text = "outbox unreadable" if waiting is None else f"{waiting} waiting in outbox"
        if health.stopping:
            return f"stopping; {health.queued} queued; {waiting_text}"
        if health.redis_connected:
            self.down_since = None
            text = f"online; {health.queued} queued; {waiting_text}"
        else:
            now = time.monotonic()
            if self.down_since is None:
                self.down_since = health.redis_down_since or now
            responses = "outbox unreadable" if waiting is None else f"{waiting} responses waiting"
            text = f"Redis unreachable for {now - self.down_since:.0f} s; {responses}"
        if health.problems:
            text += "; " + "; ".join(health.problems)
        return text

    def stopping(self) -> None:
        """The agent began a graceful stop: say so, and make sure systemd waits for the grace period.

        EXTEND_TIMEOUT_USEC covers a SHUTDOWN_GRACE raised in agent.env beyond the unit's
        TimeoutStopSec: the grace, plus the final flush and thread joins.
        """
        grace = self.shutdown_grace
        self.notify.send("STOPPING=1", f"STATUS=stopping: up to {grace:g} s for running commands to finish",
                         f"EXTEND_TIMEOUT_USEC={int((grace + 30) * 1_000_000)}")

    def close(self) -> None:
        """Stop the thread and the socket."""
        self.stop.set()
        if self.is_alive():
            self.join(5)
        self.notify.close()
