"""What every handler is made of: the registry, parameter checks, and the one way to run a child.

A handler never runs anything itself. Its ``prepare`` checks the parameters and returns an
Action (argv list, timeout, the target it touches); ``execute`` is the only place a process is
started. So validation is pure, and "no process for invalid input" is checkable.
"""

from __future__ import annotations

import errno
import logging
import os
import signal
import stat
import subprocess
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from config import Config
from errors import NotAllowed, ValidationError
from protocol import SIGNATURE_MAX_AGE, is_text, preview, unix_seconds

log = logging.getLogger("cockpit_agent.handlers")


@dataclass(frozen=True)
class Action:
    """What a validated command will do.

    Either ``output`` (answered without running anything) or ``argv`` (run as a child with
    ``timeout`` seconds). Actions with the same ``target`` run one at a time, in arrival order.
    ``directory`` (from ``checked_directory``) is where the child runs: that very directory,
    or nothing runs if the path has since been replaced or made a symlink.
    """

    target: str | None = None
    argv: tuple[str, ...] | None = None
    timeout: float | None = None
    timeout_setting: str = "COMMAND_TIMEOUT"
    output: str | None = None
    # What the response's output is on success when not the child's stdout (docker_restart).
    success_output: str | None = None
    directory: tuple[str, int, int] | None = None  # (path, st_dev, st_ino) when it was checked
    # Written to the child's stdin (then closed): how a secret reaches a child without
    # showing on its argv, which every local user can read in /proc. Never in repr.
    stdin: bytes | None = field(default=None, repr=False)


# How much earlier than the backend stops waiting a command's answer must be out: a command
# killed by its deadline needs this long to be answered (the kill, the commit, the PUBLISH).
# A quarter of the timeout when that is less, so a short timeout still leaves time to run.
ANSWER_MARGIN = 2.0


@dataclass(frozen=True)
class Deadline:
    """When the backend stops waiting for a command's answer: the command's timeout counted
    from the backend's timestamp (or from the command's arrival), and the margin before it."""

    ends: float  # unix seconds
    margin: float
    origin: str  # what the timeout was counted from, for the error text
    received: float  # when the agent received the command (unix seconds)

    @property
    def at(self) -> float:
        """When the child must be stopped for its answer to arrive in time (unix seconds)."""
        return self.ends - self.margin


def answer_deadline(action: Action, timestamp: Any, received: float) -> Deadline | None:
    """The Deadline of a command the backend waits for (None when it runs nothing or has no
    timeout). ``timestamp`` is the message's, untrusted: used only when it is a finite number;
    one in the future counts as the arrival, one older than the signature window as that window.
    """
    if action.argv is None or action.timeout is None:
        return None
    sent = unix_seconds(timestamp)
    if sent is None:
        start, origin = received, "its arrival (it has no usable timestamp)"
    elif sent > received:  # the agent's clock is behind, or the timestamp is made up
        start, origin = received, "its arrival (its timestamp is in the future)"
    else:
        start, origin = max(sent, received - SIGNATURE_MAX_AGE), "the command's timestamp"
    return Deadline(start + action.timeout, min(ANSWER_MARGIN, action.timeout / 4), origin, received)


@dataclass(frozen=True)
class Result:
    """How an action ended: the contract's status/output/error, plus the full output kept locally."""

    status: str
    output: str | None
    error: str | None
    full_output: str | None = None
    exit_code: int | None = None


PrepareFn = Callable[[dict[str, Any], "Config"], Action]


@dataclass(frozen=True)
class Handler:
    """A command the agent understands: its wire name, its parameter check, a line of help."""

    name: str
    prepare: PrepareFn
    params: tuple[str, ...]
    summary: str
    # Why the configuration turns this command off (e.g. DOCKER_CONTAINER_NAME set empty), or None.
    off: Callable[[Config], str | None] | None = None

    def unknown(self, params: dict[str, Any]) -> list[str]:
        """The names in ``params`` this handler does not take, sorted."""
        return sorted(k for k in params if k not in self.params)


class Registry:
    """The explicit map of command names to handlers. Nothing is looked up any other way."""

    def __init__(self, handlers: Iterable[Handler] = (), off: dict[str, str] | None = None):
        self._handlers: dict[str, Handler] = {}
        self.off: dict[str, str] = dict(off or {})  # commands the configuration turned off, and why
        for handler in handlers:
            self.add(handler)

    def for_config(self, config: Config) -> Registry:
        """This registry without the commands ``config`` turns off: they are not among the
        capabilities, and a message asking for one is refused saying why."""
        off = dict(self.off)
        for handler in self.handlers():
            reason = handler.off(config) if handler.off else None
            if reason:
                off[handler.name] = reason
        return Registry((h for h in self.handlers() if h.name not in off), off)

    def add(self, handler: Handler) -> None:
        """Register a handler; a name registered twice is a programming error."""
        if handler.name in self._handlers:
            raise ValueError(f"command {handler.name!r} is registered twice")
        self._handlers[handler.name] = handler

    def handlers(self) -> list[Handler]:
        """The registered handlers, in registration order (to build a registry from another)."""
        return list(self._handlers.values())

    def get(self, command: Any) -> Handler | None:
        """The handler registered as ``command``, or None."""
        return self._handlers.get(command) if isinstance(command, str) else None

    def names(self) -> list[str]:
        """The registered command names, as the registry hash's ``capabilities`` lists them."""
        return sorted(self._handlers)

    def prepare(self, command: str, params: dict[str, Any], config: Config) -> Action:
        """Check a command and its parameters; return its Action or raise ValidationError."""
        handler = self.get(command)
        if handler is None and isinstance(command, str) and command in self.off:
            raise NotAllowed(f"{command} is off on this agent: {self.off[command]}; "
                             f"this agent runs: {', '.join(self.names())}")
        if handler is None:
            raise ValidationError(
                f"unknown command {preview(command)}; this agent runs: {', '.join(self.names())}"
            )
        if not isinstance(params, dict):
            raise ValidationError(f"params must be a JSON object, got a {type(params).__name__}")
        unknown = handler.unknown(params)
        if unknown:
            # Ignored rather than refused, so a newer backend that sends more stays compatible.
            log.warning("%s: ignoring unknown params %s", command, preview(unknown, 200))
        return handler.prepare(params, config)


# -- parameter checks ---------------------------------------------------------------------------


def string_param(params: dict[str, Any], name: str, default: str | None, max_len: int = 4096) -> str | None:
    """The string parameter ``name`` (``default`` when absent or null); other types are refused.

    ``""`` comes back as ``""``. A parameter that names what to act on (a repository, a branch,
    a container, a unit) reads it as "not given" (``string_param(...) or default``): the
    backend's request models send ``""`` for "the agent's own configuration".
    """
    value = params.get(name)
    if value is None:
        return default
    if not isinstance(value, str):
        raise ValidationError(f"{name} must be a string, got {type(value).__name__} {preview(value)}")
    if len(value) > max_len:
        raise ValidationError(f"{name} is {len(value)} characters long; at most {max_len} are allowed")
    if not is_text(value):
        raise ValidationError(f"{name} is not valid Unicode text (it holds a lone surrogate): {preview(value)}")
    return value


def whitelisted(kind: str, value: str, allowed: Iterable[str], setting: str) -> None:
    """Refuse ``value`` unless it is one of ``allowed``, naming what is allowed."""
    allowed = list(allowed)
    if value not in allowed:
        raise NotAllowed(
            f"{kind} {preview(value)} is not whitelisted; allowed: {', '.join(allowed)} ({setting})"
        )


def checked_directory(path: str, setting: str) -> tuple[str, int, int]:
    """``path``, a real directory now (not a symlink), with the (device, inode) it has now, for
    ``Action.directory``: ``execute`` runs the child there only if it is still that directory."""
    try:
        st = os.lstat(path)
    except OSError as exc:
        raise NotAllowed(f"{path} cannot be used: {exc.strerror} ({setting})") from None
    if not stat.S_ISDIR(st.st_mode):
        raise NotAllowed(f"{path} is not a directory any more (replaced or now a symlink); not run ({setting})")
    return path, st.st_dev, st.st_ino


def _open_checked(directory: tuple[str, int, int]) -> int | str:
    """An fd on ``directory`` if it is still the directory that was checked, else the refusal."""
    path, dev, ino = directory
    changed = f"{path} changed since it was checked (replaced or now a symlink); not run"
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError as exc:
        if exc.errno in (errno.ELOOP, errno.ENOTDIR, errno.ENOENT):
            return changed
        return f"cannot open {path}: {exc.strerror}; not run"
    st = os.fstat(fd)
    if (st.st_dev, st.st_ino) != (dev, ino):
        os.close(fd)
        return changed
    return fd


# -- running children ---------------------------------------------------------------------------

# Only these are passed on to children; the agent's own secrets (REDIS_PASSWORD,
# COCKPIT_SHARED_SECRET, ...) and anything else in its environment stay behind.
INHERITED_ENV = (
    "PATH", "HOME", "USER", "LOGNAME", "LANG", "LC_ALL", "LC_CTYPE", "TZ",
    "DOCKER_HOST", "DOCKER_CONFIG", "DOCKER_CONTEXT", "DOCKER_CERT_PATH", "DOCKER_TLS_VERIFY",
    "SSH_AUTH_SOCK", "http_proxy", "https_proxy", "no_proxy", "HTTP_PROXY", "HTTPS_PROXY", "NO_PROXY",
)


def child_env(environ: dict[str, str] | None = None) -> dict[str, str]:
    """The minimal environment a command's child process gets."""
    source = os.environ if environ is None else environ
    env = {k: source[k] for k in INHERITED_ENV if k in source}
    env.setdefault("PATH", "/usr/local/bin:/usr/bin:/bin")
    env.setdefault("LANG", "C.UTF-8")
    env["GIT_TERMINAL_PROMPT"] = "0"
    env["GIT_SSH_COMMAND"] = "ssh -o BatchMode=yes -o ConnectTimeout=15"
    return env


class Children:
    """The process groups of running commands, so a forced stop can kill them all."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._running: dict[int, subprocess.Popen] = {}
        self.interrupted = threading.Event()

    def add(self, proc: subprocess.Popen) -> None:
        with self._lock:
            self._running[proc.pid] = proc

    def remove(self, proc: subprocess.Popen) -> None:
        with self._lock:
            self._running.pop(proc.pid, None)

    def count(self) -> int:
        with self._lock:
            return len(self._running)

    def kill_all(self) -> int:
        """Kill every running command's process group; returns how many there were."""
        self.interrupted.set()
        with self._lock:
            procs = list(self._running.values())
        for proc in procs:
            _kill_group(proc)
        return len(procs)


def _kill_group(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def _decode(data: bytes | None) -> str:
    return (data or b"").decode("utf-8", errors="replace")


def execute(action: Action, children: Children | None = None, deadline: Deadline | None = None) -> Result:
    """Carry out an Action: answer at once, or run its argv as a child in its own process group.

    With a ``deadline`` the timeout is what is left until ``deadline.at``, so the answer reaches
    a backend that still waits; nothing starts when nothing is left.

    stdin is closed (or fed ``action.stdin``), the environment is minimal, and on timeout the
    whole group (git's ssh and helpers included) is killed. Output is decoded without ever failing on bad UTF-8. With
    ``action.directory`` the child starts in the directory opened and checked here, through its
    fd (/proc/self/fd/N), so a path swapped after the check cannot move it elsewhere.
    """
    if action.argv is None:
        return Result("success", action.output, None, action.output)
    timeout = action.timeout
    if deadline is not None:
        left = deadline.at - time.time()
        if left <= 0:
            return Result("error", None, _not_started(action, deadline))
        timeout = left if timeout is None else min(timeout, left)
    fd = _open_checked(action.directory) if action.directory is not None else None
    if isinstance(fd, str):
        return Result("error", None, fd)
    try:
        proc = subprocess.Popen(
            list(action.argv),
            stdin=subprocess.DEVNULL if action.stdin is None else subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=child_env(),
            start_new_session=True,
            close_fds=True,
            # The child's chdir (before exec) follows the fd, not the path.
            cwd=None if fd is None else f"/proc/self/fd/{fd}",
        )
    except OSError as exc:
        where = "" if action.directory is None else f" in {action.directory[0]}"
        return Result("error", None, f"could not start {action.argv[0]}{where}: {exc.strerror or exc}")
    finally:
        if fd is not None:
            os.close(fd)
    if children is not None:
        children.add(proc)
    try:
        stdout, stderr, ended = _communicate(proc, action.stdin, timeout)
        if ended == "timeout":
            _kill_group(proc)
            stdout, stderr = _drain(proc, stdout, stderr)
            if timeout == action.timeout or deadline is None:
                why = f"timed out after {timeout:g} s ({action.timeout_setting})"
            else:
                why = (f"timed out after {timeout:.1f} s ({action.timeout_setting}={action.timeout:g} s counted from "
                       f"{deadline.origin}, less a {deadline.margin:g} s margin so that this answer reaches the "
                       "backend while it still waits)")
            return Result("error", _decode(stdout).strip() or None, f"{why}; the process was killed", _decode(stdout))
    finally:
        if children is not None:
            children.remove(proc)
    if ended == "left running":
        log.warning("%s exited, but a process it left running still holds its output; not waiting for that one",
                    os.path.basename(action.argv[0]))
    out, err = _decode(stdout), _decode(stderr)
    if children is not None and children.interrupted.is_set() and proc.returncode == -signal.SIGKILL:
        return Result("error", out.strip() or None, "interrupted: the agent was stopped while this command ran", out)
    if proc.returncode != 0:
        detail = err.strip() or out.strip() or "no output"
        return Result(
            "error", out.strip() or None, f"{os.path.basename(action.argv[0])} exited with status {proc.returncode}: {detail}",
            out, proc.returncode,
        )
    output = action.success_output if action.success_output is not None else out.strip()
    return Result("success", output, None, out, 0)


def _not_started(action: Action, deadline: Deadline) -> str:
    now = time.time()
    counted = (f"{action.timeout_setting}={action.timeout:g} s counted from {deadline.origin}; "
               f"it arrived {now - deadline.received:.1f} s ago")
    if now >= deadline.ends:
        return f"not started: the backend stopped waiting {now - deadline.ends:.1f} s ago ({counted}); nothing was run"
    return (f"not started: the backend stops waiting in {deadline.ends - now:.1f} s, within the "
            f"{deadline.margin:g} s this answer needs to reach it ({counted}); nothing was run")


# A child's pipes close when it and its group exit. A process it started in a session of its own
# (setsid, a daemon) keeps them open: after the child itself has ended (or was killed), its
# output is waited for this long, not until that process ends, so the answer is not held.
PIPE_GRACE = 0.5
_POLL = 0.1  # how often a running child is checked for having exited while its pipes stay open


def _communicate(proc: subprocess.Popen, stdin: bytes | None,
                 timeout: float | None) -> tuple[bytes | None, bytes | None, str]:
    """The child's stdout and stderr, and how it ended: "exited", "timeout" (still running at
    ``timeout``; not killed here), or "left running" (it exited, but a process it started
    held its pipes for PIPE_GRACE more: the output so far, pipes closed)."""
    end = None if timeout is None else time.monotonic() + timeout
    exited_at = None
    while True:
        step = _POLL if end is None else max(0.0, min(_POLL, end - time.monotonic()))
        try:
            stdout, stderr = proc.communicate(stdin, timeout=step)
            return stdout, stderr, "exited"
        except subprocess.TimeoutExpired as exc:
            # exc holds everything read so far; communicate goes on from there when called again.
            stdout, stderr, stdin = exc.output, exc.stderr, None
        now = time.monotonic()
        if exited_at is None and proc.poll() is not None:
            exited_at = now
        if exited_at is not None and now - exited_at >= PIPE_GRACE:
            _close_pipes(proc)
            return stdout, stderr, "left running"
        if end is not None and now >= end and exited_at is None:
            return stdout, stderr, "timeout"


def _close_pipes(proc: subprocess.Popen) -> None:
    for pipe in (proc.stdin, proc.stdout, proc.stderr):
        if pipe:
            try:
                pipe.close()
            except OSError:
                pass


def _drain(proc: subprocess.Popen, stdout: bytes | None, stderr: bytes | None) -> tuple[bytes | None, bytes | None]:
    """Collect what a killed child left (``stdout``/``stderr``: read before the kill); a process
    that escaped its group cannot hold the answer more than PIPE_GRACE."""
    try:
        return proc.communicate(timeout=PIPE_GRACE)
    except subprocess.TimeoutExpired as exc:
        _close_pipes(proc)
        proc.wait(timeout=5)
        return exc.output or stdout, exc.stderr or stderr


def monotonic_ms(start: float) -> int:
    """Milliseconds since ``start`` (a ``time.monotonic()`` reading)."""
    return int((time.monotonic() - start) * 1000)
