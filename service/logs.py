"""Log formats: readable lines by default, one JSON object per line with ``LOG_FORMAT=json``.

Under journald the journal already stamps every line with the time, the unit and the PID,
so the agent leaves its own timestamp out and prefixes each line with a syslog priority
(``<3>``), which journald turns into the entry's PRIORITY (``journalctl -p warning`` works).
"""

from __future__ import annotations

import json
import logging
import os
import re
import sys
import time

from config import Config, RedactSecrets, missing_repositories, secrets_of

# syslog priorities for Python's levels (sd-daemon.h's SD_ERR, SD_WARNING, ...).
_PRIORITY = {logging.CRITICAL: 2, logging.ERROR: 3, logging.WARNING: 4, logging.INFO: 6, logging.DEBUG: 7}


# Characters that end a line for some reader of the log (journald and grep split on \n, Python's
# splitlines also on \r \v \f \x1c-\x1e \x85 \u2028 \u2029), the other control characters
# (a terminal escape rewrites what an operator sees) and the bidi overrides (text shown out of
# order). Any of them in a message came from outside (a command_id, a sender, a command): a
# message is one line, so each is written as its Python escape.
_UNSAFE = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029\u202a-\u202e\u2066-\u2069]")
# The same, left raw by json.dumps(ensure_ascii=False): written as JSON \u escapes.
_JSON_UNSAFE = re.compile("[\x7f-\x9f\u2028\u2029\u202a-\u202e\u2066-\u2069]")


def escape(text: str) -> str:
    """``text`` on one line: each control or line-breaking character as its escape (``\\n``, ``\\u2028``)."""
    return _UNSAFE.sub(lambda m: repr(m.group())[1:-1], text) if _UNSAFE.search(text) else text


def under_journald(stream_fd: int = 2) -> bool:
    """True when ``stream_fd`` is the journal stream systemd gave us (``$JOURNAL_STREAM``).

    The variable is inherited by children too, so it counts only when its device:inode is
    the stream we actually write to (sd_journal_stream_fd's documented check).
    """
    value = os.environ.get("JOURNAL_STREAM", "")
    try:
        dev, ino = (int(part) for part in value.split(":"))
        st = os.fstat(stream_fd)
    except (ValueError, OSError):
        return False
    return (st.st_dev, st.st_ino) == (dev, ino)


def priority(levelno: int) -> int:
    """The syslog priority of a Python log level."""
    for level in sorted(_PRIORITY, reverse=True):
        if levelno >= level:
            return _PRIORITY[level]
    return 7


class TextFormatter(logging.Formatter):
    """``2026-11-28 13:00:00,000 INFO cockpit_agent.worker-1: ...``; under journald ``<6>INFO ...``."""

    def __init__(self, journald: bool = False):
        fmt = "%(levelname)s %(name)s: %(message)s" if journald else "%(asctime)s %(levelname)s %(name)s: %(message)s"
        super().__init__(fmt)
        self.journald = journald

    def formatMessage(self, record: logging.LogRecord) -> str:
        # The line itself, escaped; a traceback appended after it keeps its own lines.
        return escape(super().formatMessage(record))

    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        if self.journald:
            # journald reads one prefix per line; keep a traceback's lines at the same priority.
            prefix = f"<{priority(record.levelno)}>"
            text = "\n".join(prefix + line for line in text.split("\n"))
        return text


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time (unless journald stamps it), level, logger, message, exc."""

    def __init__(self, journald: bool = False):
        super().__init__()
        self.journald = journald

    def format(self, record: logging.LogRecord) -> str:
        entry: dict = {}
        if not self.journald:
            entry["time"] = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + \
                f".{int(record.msecs):03d}Z"
        entry.update(level=record.levelname, logger=record.name, message=escape(record.getMessage()),
                     thread=record.threadName)
        if record.exc_info:
            # exc_text when RedactSecrets has formatted (and masked) it already.
            entry["exc"] = record.exc_text or self.formatException(record.exc_info)
        text = _JSON_UNSAFE.sub(lambda m: f"\\u{ord(m.group()):04x}", json.dumps(entry, ensure_ascii=False, default=str))
        return f"<{priority(record.levelno)}>{text}" if self.journald else text


def formatter(log_format: str = "text", journald: bool | None = None) -> logging.Formatter:
    """The formatter for ``LOG_FORMAT`` (``text`` or ``json``), journald-aware."""
    journald = under_journald() if journald is None else journald
    return JsonFormatter(journald) if log_format == "json" else TextFormatter(journald)


def setup_logging(config: Config | None, level: str = "INFO") -> None:
    """Readable lines (or JSON, LOG_FORMAT=json) on stderr; under journald, without a second timestamp.

    Then, as the first lines the agent logs, the configuration's warnings (``start_warnings``):
    they were found before there was a log to write them to.
    """
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(formatter(config.log_format if config else "text"))
    if config is not None:
        handler.addFilter(RedactSecrets(secrets_of(config)))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(config.log_level if config else level)
    if config is not None:
        for line in start_warnings(config):
            logging.getLogger("cockpit_agent.config").warning("%s", line)


def start_warnings(config: Config) -> list[str]:
    """What the agent warns about as it starts: variables it does not know (a misspelt one is
    as good as unset) and each GIT_REPO_PATH entry that does not exist, one line each."""
    return [*config.warnings, *missing_repositories(config)]
