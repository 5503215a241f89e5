"""Custom commands from ``HANDLERS_DIR`` (e.g. /etc/cockpit-agent/handlers.d), loaded once at start.

A module there runs with the agent's privileges (the docker group: as good as root), so it is
loaded only if nobody but root could have written it: the directory and the file are owned by
root, not writable by group or others, and the file is a regular file, not a symlink. Anything
else stops the agent at start (ConfigError, exit 78) with a line that says how to fix it;
nothing is ever skipped silently.

A module declares ``HANDLERS = [Handler(...), ...]`` (or a single ``HANDLER``), each with its
name, params, a ``prepare(params, config)`` that validates and returns an Action with its
timeout. A name already taken (by a built-in or another module) is an error. A module reads
its own settings with ``setting(NAME)``: the environment first, then the agent's .env file,
exactly like the agent's own variables.
"""

from __future__ import annotations

import errno
import importlib.util
import logging
import os
import stat
import sys

from errors import ConfigError
from handlers.base import Handler, Registry

log = logging.getLogger("cockpit_agent.handlers")

MODULE_PREFIX = "cockpit_agent_handlers_d"

# The agent's .env values, for ``setting``; filled by ``registry_with_dir`` before modules load.
_env_file_values: dict[str, str] = {}


def setting(name: str, default: str | None = None) -> str | None:
    """A setting for a HANDLERS_DIR module: the environment first, then the agent's .env file."""
    value = os.environ.get(name)
    if value in (None, ""):
        value = _env_file_values.get(name)
    return default if value in (None, "") else value


def env_file_values(env_file: str | None) -> dict[str, str]:
    """The variables in the .env file the agent reads (same choice of file as ``config.load``)."""
    from dotenv import dotenv_values

    path = env_file or os.environ.get("COCKPIT_AGENT_ENV_FILE") or ".env"
    if not os.path.isfile(path):
        return {}
    return {k: v for k, v in dotenv_values(path).items() if v is not None}


def check_safe(path: str, kind: str, root_uid: int = 0) -> os.stat_result:
    """Refuse ``path`` unless it is root's and not writable by group or others; no symlinks."""
    st = os.lstat(path)
    if stat.S_ISLNK(st.st_mode):
        raise ConfigError(f"HANDLERS_DIR: {path} is a symlink; put the {kind} itself there (symlinks are refused)")
    if st.st_uid != root_uid:
        raise ConfigError(
            f"HANDLERS_DIR: {path} is owned by uid {st.st_uid}, not root; fix with: chown root:root {path}"
        )
    if st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        raise ConfigError(
            f"HANDLERS_DIR: {path} is writable by group or others (mode {stat.S_IMODE(st.st_mode):04o}); "
            f"fix with: chmod go-w {path}"
        )
    return st


def _open_checked(path: str, st: os.stat_result, flags: int, dir_fd: int | None = None) -> int:
    """An fd on what ``check_safe`` just checked (``st``): the path is opened without following
    a symlink and must still be the same file, so a swap after the check loads nothing."""
    try:
        fd = os.open(os.path.basename(path) if dir_fd is not None else path,
                     flags | os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dir_fd)
    except OSError as exc:
        if exc.errno not in (errno.ELOOP, errno.ENOENT, errno.ENOTDIR):
            raise  # not a swap: the caller says what is wrong (e.g. the agent's user may not read it)
        raise ConfigError(f"HANDLERS_DIR: {path} changed while it was being loaded ({exc.strerror})") from None
    now = os.fstat(fd)
    if (now.st_dev, now.st_ino) != (st.st_dev, st.st_ino):
        os.close(fd)
        raise ConfigError(f"HANDLERS_DIR: {path} changed while it was being loaded (replaced); start again")
    return fd


def _import(path: str, source: bytes) -> object:
    """Run ``source`` (read from the checked file, not from ``path`` again) as a module."""
    name = f"{MODULE_PREFIX}.{os.path.splitext(os.path.basename(path))[0]}"
    spec = importlib.util.spec_from_loader(name, loader=None, origin=path)
    module = importlib.util.module_from_spec(spec)
    module.__file__ = path
    sys.modules[name] = module  # before running it, as a normal import does (dataclasses need it)
    try:
        exec(compile(source, path, "exec"), module.__dict__)
    except Exception as exc:
        del sys.modules[name]
        if isinstance(exc, ConfigError):
            raise
        raise ConfigError(f"HANDLERS_DIR: {path} failed to load: {type(exc).__name__}: {exc}") from None
    return module


def load_dir(directory: str, root_uid: int = 0) -> list[Handler]:
    """The Handlers declared by the ``*.py`` modules in ``directory``, in file-name order."""
    if not os.path.isdir(directory):
        raise ConfigError(f"HANDLERS_DIR: {directory} is not a directory")
    checked = check_safe(directory, "directory", root_uid)
    try:
        dir_fd = _open_checked(directory, checked, os.O_DIRECTORY)
    except OSError as exc:  # e.g. mode 0711: the agent's user may enter it but not list it
        raise ConfigError(f"HANDLERS_DIR: cannot list {directory}: {exc.strerror}; "
                          f"it must be readable by the agent's user (chmod 0755 {directory})") from None
    try:
        return _load_from(directory, dir_fd, root_uid)
    finally:
        os.close(dir_fd)


def _load_from(directory: str, dir_fd: int, root_uid: int) -> list[Handler]:
    found: list[Handler] = []
    try:
        entries = sorted(os.listdir(dir_fd))
    except OSError as exc:  # e.g. mode 0711: the agent's user may enter it but not list it
        raise ConfigError(f"HANDLERS_DIR: cannot list {directory}: {exc.strerror}; "
                          f"it must be readable by the agent's user (chmod 0755 {directory})") from None
    for entry in entries:
        if not entry.endswith(".py") or entry.startswith((".", "_")):
            continue
        path = os.path.join(directory, entry)
        st = check_safe(path, "file", root_uid)
        if not stat.S_ISREG(st.st_mode):
            raise ConfigError(f"HANDLERS_DIR: {path} is not a regular file")
        try:
            fd = _open_checked(path, st, os.O_NONBLOCK, dir_fd)
            with os.fdopen(fd, "rb") as f:
                source = f.read()
        except OSError as exc:
            raise ConfigError(f"HANDLERS_DIR: cannot read {path}: {exc.strerror}; "
                              f"it must be readable by the agent's user (chmod 0644 {path})") from None
        module = _import(path, source)
        declared = getattr(module, "HANDLERS", None)
        if declared is None and hasattr(module, "HANDLER"):
            declared = [module.HANDLER]
        if not declared:
            raise ConfigError(f"HANDLERS_DIR: {path} declares no HANDLERS (a list of handlers.base.Handler)")
        for handler in declared:
            if not isinstance(handler, Handler):
                raise ConfigError(f"HANDLERS_DIR: {path} declares {handler!r}, which is not a handlers.base.Handler")
            found.append(handler)
        log.info("loaded %s from %s", ", ".join(h.name for h in declared), path)
    return found


def registry_with_dir(base: Registry, directory: str | None, root_uid: int = 0,
                      env_file: str | None = None) -> Registry:
    """``base`` plus the handlers in ``directory`` (``base`` itself when there is none)."""
    if not directory:
        return base
    _env_file_values.clear()
    _env_file_values.update(env_file_values(env_file))
    registry = Registry(base.handlers())
    for handler in load_dir(directory, root_uid):
        try:
            registry.add(handler)
        except ValueError as exc:
            raise ConfigError(f"HANDLERS_DIR: {exc}; each command name may be declared once") from None
    return registry
