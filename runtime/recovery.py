"""At start: what an earlier run left in the database is answered or queued again.

A command left ``running`` was interrupted by the stop (or a crash): it is answered with an
error and never run again, since it may have done part of its work. One left ``queued`` never
started: it is checked again exactly as on arrival and queued for the workers (PROTOCOL.md).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable

import sealed
from config import Config
from errors import ValidationError
from handlers import Registry
from outbox import Store
from runtime.answers import Answers
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
