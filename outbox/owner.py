"""Which agent owns a database: the lock that keeps a second agent off it, and the instance id
that names this agent (this machine, this database) in the registry hash.

Two agents on one database each took the other's ``running`` rows for interrupted ones and
answered them "not run again" while the first was running them; two agents with one id (two
hosts, or two databases) both ran every command. The lock stops the first; the instance id
lets the heartbeat notice the second.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import socket

from errors import DatabaseInUse

LOCK_SUFFIX = ".lock"


def lock_path(db_path: str) -> str:
    """The lock file of a database: beside it, where the agent may already write."""
    return os.path.abspath(db_path) + LOCK_SUFFIX


class DatabaseLock:
    """An exclusive ``flock`` on ``<OUTBOX_DB>.lock``, held for the agent's whole life.

    The kernel drops it when the process ends, however it ends, so a crash leaves nothing to
    clean up: the file stays, unlocked. The holder's pid is written into it for the message
    the next one prints. Readers (``cockpit-agent status``, ``outbox``, ``history``, ``check``)
    never take it.
    """

    def __init__(self, db_path: str):
        self.db_path = db_path
        self.path = lock_path(db_path)
        self.fd: int | None = None

    def acquire(self) -> None:
        """Take the lock, or raise DatabaseInUse naming the process that holds it."""
        if self.fd is not None:
            return
        parent = os.path.dirname(self.path)
        try:
            os.makedirs(parent, mode=0o700, exist_ok=True)
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        except PermissionError as exc:  # other errors (a full disk) may pass: the caller's to handle
            raise DatabaseInUse(f"cannot open {self.path} to lock the database {self.db_path} (OUTBOX_DB): "
                                f"{exc.strerror or exc}; the agent's user must be able to write it") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            pid = holder(self.db_path, fd)
            os.close(fd)
            who = describe(pid) if pid else "another process"
            raise DatabaseInUse(f"another agent already uses the database {self.db_path} (OUTBOX_DB): {who} holds "
                                f"{self.path}; not starting a second one on it (stop that one, or give this "
                                "one its own OUTBOX_DB)") from None
        self.fd = fd
        st = os.fstat(fd)
        if os.geteuid() == 0 and st.st_uid == 0:
            # Root starting the agent in a checkout must not leave a file the agent's own user
            # (who owns the directory) cannot open later.
            dir_st = os.stat(parent)
            if dir_st.st_uid != 0:
                try:
                    os.fchown(fd, dir_st.st_uid, dir_st.st_gid)
                except OSError:
                    pass
        try:
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        except OSError:
            pass  # a full disk: the lock holds without the pid; /proc/locks still names it

    def release(self) -> None:
        """Let go of the lock (the file stays: removing it would race a starting agent)."""
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None


def holder(db_path: str, fd: int | None = None) -> int | None:
    """The pid of the process holding the lock of ``db_path``, or None when no one does.

    Takes nothing: it reads ``/proc/locks``, where the kernel lists each lock with its pid,
    and, where that cannot be read (the unit's ``ProcSubset=pid``), the pid the holder wrote.
    """
    path = lock_path(db_path)
    try:
        st = os.fstat(fd) if fd is not None else os.stat(path)
    except OSError:
        return None
    try:
        with open("/proc/locks") as f:
            lines = f.read().splitlines()
    except OSError:
        lines = None
    if lines is not None:
        for line in lines:
            fields = line.split()
            # "1: FLOCK  ADVISORY  WRITE 1234 fe:00:2146315 0 EOF"; "->" marks a waiter
            if len(fields) < 6 or fields[1] != "FLOCK" or fields[3] != "WRITE":
                continue
            try:
                ino = int(fields[5].rsplit(":", 1)[1])
                pid = int(fields[4])
            except (IndexError, ValueError):
                continue
            if ino == st.st_ino and pid > 0:
                return pid
        if fd is None:
            return None  # the kernel lists no lock on it: no agent holds it
    try:
        with open(path) as f:
            text = f.read(32).strip()
        pid = int(text)
    except (OSError, ValueError):
        return None
    if pid <= 0:
        return None
    # Known to be locked (fd: our try failed), the pid written is the holder's; otherwise it may
    # be a stale one left by an agent that ended.
    return pid if fd is not None or os.path.exists(f"/proc/{pid}") else None


def describe(pid: int) -> str:
    """``pid N (its command line)``, as far as /proc lets this process read it."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            raw = f.read(4096)
    except OSError:
        return f"pid {pid}"
    text = raw.rstrip(b"\0").replace(b"\0", b" ").decode("utf-8", "replace")
    text = "".join(c if c.isprintable() else "?" for c in text)
    if len(text) > 200:
        text = text[:197] + "..."
    return f"pid {pid} ({text})" if text else f"pid {pid}"


def _machine_id() -> str:
    for path in ("/etc/machine-id", "/var/lib/dbus/machine-id"):
        try:
            with open(path) as f:
                value = f.read(64).strip()
        except OSError:
            continue
        if value:
            return value
    return ""


def instance_id(db_path: str) -> str:
    """Names this agent: the same across restarts on this machine and this database, another
    for another host or another database (a copied machine id still differs by hostname)."""
    seed = "\0".join((_machine_id(), socket.gethostname(), os.path.realpath(db_path)))
    return hashlib.sha256(seed.encode("utf-8", "replace")).hexdigest()[:16]
