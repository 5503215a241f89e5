"""At start: what an earlier run left in the database is answered or queued again.

A command left ``running`` was interrupted by the stop (or a crash): it is answered with an
error and never run again, since it may have done part of its work. One left ``queued`` never
started: it is checked again exactly as on arrival and queued for the workers (PROTOCOL.md).
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from collections.abc import Callable

import sealed
from config import Config
from errors import StoreUnavailable, ValidationError
from handlers import Registry
from outbox import Store
from runtime.answers import Answers
from runtime.loop import Backoff
from runtime.workers import Job
from service.audit import Audit

log = logging.getLogger("cockpit_agent")


def recover(store: Store, config: Config, registry: Registry, answers: Answers, audit: Audit,
            submit: Callable[[Job], None]) -> int:
    """Answer what an earlier run left running (interrupted) and ``submit`` what it left queued;
    returns how many commands ran so far (the registry's ``commands_executed``)."""
    running, queued = store.pending()
    for row in running:
        error = "interrupted: the agent stopped while this command was running; it was not run again"
        response, message = answers.error_answer(row["command_id"], error)
        if not store.finish(row["command_id"], "error", None, error, 0, message):
            log.warning("%s: no longer running when recovered; not answered again", row["command_id"])
            continue
        log.warning("%s: %s was interrupted by an agent stop; answered with an error", row["command_id"], row["command"])
        audit.command(row["command_id"], row["sender"], row["command"], json.loads(row["params"]), "error", 0, error)
    for row in queued:
        plain: tuple[str, ...] = ()
        try:
            # Stored as received: the sealed params are decrypted again, exactly as on arrival.
            params, plain = sealed.open_params(json.loads(row["params"]), config.shared_secret)
            action = registry.prepare(row["command"], params, config)
        except ValidationError as exc:
            error = answers.mask(str(exc), plain)
            response, message = answers.error_answer(row["command_id"], error)
            if not store.refuse(row["command_id"], error, message):
                log.warning("%s: no longer queued when recovered; not answered again", row["command_id"])
                continue
            audit.command(row["command_id"], row["sender"], row["command"], json.loads(row["params"]),
                               "error", 0, error)
            continue
        # No deadline: the backend stopped waiting when the agent went down; queued ones
        # run (PROTOCOL.md), with their full timeout, answered by the result key and retries.
        submit(Job(row["command_id"], row["command"], action, row["sender"], json.loads(row["params"]),
                             secrets=plain))
    if running or queued:
        log.info("recovered %d interrupted and %d queued commands", len(running), len(queued))
    return store.executed_count()


def recover_when_writable(recover_once: Callable[[], None], forget: Callable[[], None], path: str,
                          stop: threading.Event, status: Callable[[str, float], None]) -> bool:
    """``recover_once``, retried with capped backoff while the database cannot be written (a
    full disk): exiting would only make systemd restart the agent into the same error, in a loop.
    One ERROR line, then quiet retries, each told to systemd (``status``); ``forget`` drops what a
    failed attempt queued. False if ``stop`` is set meanwhile."""
    backoff, since = Backoff(base=1.0, cap=10.0), None
    while True:
        try:
            recover_once()
        except StoreUnavailable as exc:
            forget()  # what it queued before failing is queued again on the next try
            cause = exc.__cause__ or exc
            if since is None:
                since = time.monotonic()
                log.error("cannot recover the work left in %s (OUTBOX_DB): %s; not starting until it can be "
                          "written, retrying every few seconds", path, cause)
            delay = backoff.next()
            status(f"waiting for {path} to be writable: {cause}", delay)
            if stop.wait(delay):
                return False
            continue
        if since is not None:
            log.info("recovered the work left in %s after %.0f s", path, time.monotonic() - since)
        return True


def warn_unwritable_repos(paths: tuple[str, ...] | list[str]) -> None:
    """Say at start which whitelisted repositories the agent cannot write: git_pull there
    would fail. Under the unit (ProtectSystem=strict) that is a repository left out of
    ReadWritePaths=, which the agent's own user, outside the service, could write."""
    for repo in paths:
        if os.path.isdir(repo) and not os.access(repo, os.W_OK):
            log.warning("repository %s is not writable here (%s), so git_pull there will fail; under "
                        "systemd, add ReadWritePaths=%s (systemctl edit cockpit-agent)",
                        repo, "read-only file system" if _read_only_mount(repo) else "permissions", repo)


def _read_only_mount(path: str) -> bool:
    try:
        return bool(os.statvfs(path).f_flag & os.ST_RDONLY)
    except OSError:
        return False
