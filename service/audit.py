"""The audit trail: one structured line per command on the ``cockpit_agent.audit`` logger.

Each line is ``audit {json}`` at INFO, through the normal log path (stderr, so journald under
systemd). JSON with ASCII escapes keeps a line one line whatever a message holds, so nobody
can forge a log entry with a newline. Parameters are redacted by key name (password, secret,
token, ...) before they are logged.

Executed and refused commands are always logged: each one also costs a SQLite row and a
response, so they are bounded by QUEUE_MAX and the backend. Messages that are rejected
before that (not JSON, unsigned, wrongly signed) cost the sender nothing, so their lines go
through a token bucket: a flood is summarised ("suppressed": N, on the next such line or at the
next heartbeat) instead of filling the disk.
"""

from __future__ import annotations

import json
import logging
import re
import threading
import time
from typing import Any

log = logging.getLogger("cockpit_agent.audit")

SECRET_KEY_RE = re.compile(r"pass|secret|token|key|auth|credential|signature|cookie|session", re.IGNORECASE)
REDACTED = "***"
MAX_VALUE_CHARS = 200


def redact(value: Any, depth: int = 0) -> Any:
    """A copy of ``value`` fit for a log: secret-looking keys masked, long strings cut, depth capped."""
    if depth > 4:
        return "..."
    if isinstance(value, dict):
        return {
            str(k)[:MAX_VALUE_CHARS]: REDACTED if SECRET_KEY_RE.search(str(k)) else redact(v, depth + 1)
            for k, v in list(value.items())[:20]
        }
    if isinstance(value, list):
        return [redact(v, depth + 1) for v in value[:20]]
    if isinstance(value, str) and len(value) > MAX_VALUE_CHARS:
        return value[:MAX_VALUE_CHARS] + f"...({len(value)} chars)"
    return value


class TokenBucket:
    """``rate`` tokens a second, at most ``burst`` saved up; thread-safe."""

    def __init__(self, rate: float, burst: int, clock=time.monotonic):
        self.rate, self.burst, self.clock = rate, burst, clock
        self.tokens = float(burst)
        self.updated = clock()
        self._lock = threading.Lock()

    def take(self) -> bool:
        """Spend a token; False when there is none left."""
        with self._lock:
            now = self.clock()
            self.tokens = min(self.burst, self.tokens + (now - self.updated) * self.rate)
            self.updated = now
            if self.tokens >= 1:
                self.tokens -= 1
                return True
            return False


class Throttle:
    """At most one log line per ``interval`` s for one recurring problem, counting the others.

    For problems that come once per message (a full disk refuses every one of them): the first
    occurrence is logged at once, then one line per interval says how many were not. Thread-safe.
    """

    def __init__(self, interval: float = 60.0, clock=time.monotonic):
        self.interval, self.clock = interval, clock
        self._lock = threading.Lock()
        self._quiet_until: float | None = None
        self.suppressed = 0  # since the last line
        self.count = 0  # since the problem began (the last ``over``)

    def take(self) -> int | None:
        """Note one occurrence: None to stay quiet, else how many were kept quiet since the last line."""
        with self._lock:
            self.count += 1
            now = self.clock()
            if self._quiet_until is not None and now < self._quiet_until:
                self.suppressed += 1
                return None
            self._quiet_until = now + self.interval
            suppressed, self.suppressed = self.suppressed, 0
            return suppressed

    def over(self) -> int:
        """The problem is over (the next occurrence is logged at once); returns how often it occurred."""
        with self._lock:
            count, self.count, self.suppressed, self._quiet_until = self.count, 0, 0, None
            return count


class Audit:
    """Writes the audit lines; ``rejected`` lines are rate-limited, command lines are not.

    ``rejections`` counts every rejected message by kind (``malformed``, ``oversize``,
    ``unauthenticated``), logged or not; the metrics endpoint reads it.
    """

    def __init__(self, rate: float = 5.0, burst: int = 50, clock=time.monotonic):
        self.bucket = TokenBucket(rate, burst, clock)
        self._lock = threading.Lock()
        self.suppressed = 0
        self.rejections: dict[str, int] = {}

    def _emit(self, event: str, **fields: Any) -> None:
        line = {"event": event, **fields}
        log.info("audit %s", json.dumps(line, ensure_ascii=True, default=repr))

    def command(self, command_id: str, sender: str | None, command: str, params: Any, status: str,
                duration_ms: int, error: str | None = None) -> None:
        """A command that ran, or was refused by its parameter check."""
        self._emit(
            "command", command_id=command_id, sender=sender, command=command, params=redact(params),
            status=status, duration_ms=int(duration_ms), error=redact(error),
        )

    def rejected(self, reason: str, command_id: str | None, size: int, sender: Any = None,
                 kind: str | None = None) -> bool:
        """A message refused before it became a command (malformed, oversize, unauthenticated);
        counted by ``kind`` (from ``reason`` if not given), and its line rate-limited.

        Returns False when the line was suppressed, so the caller can stay quiet too.
        """
        if kind is None:
            kind = "unauthenticated" if reason.startswith("not authenticated") else "malformed"
        with self._lock:
            self.rejections[kind] = self.rejections.get(kind, 0) + 1
        if not self.bucket.take():
            with self._lock:
                self.suppressed += 1
            return False
        with self._lock:
            suppressed, self.suppressed = self.suppressed, 0
        event = "unauthenticated" if kind == "unauthenticated" else "rejected"
        fields: dict[str, Any] = {"command_id": command_id, "sender": redact(sender if isinstance(sender, str) else None),
                                  "reason": redact(reason), "size": size}
        if suppressed:
            fields["suppressed"] = suppressed  # lines dropped by the rate limit since the last one
        self._emit(event, **fields)
        return True

    def report_suppressed(self) -> int:
        """Log how many lines the rate limit dropped since the last report (called by the heartbeat).

        So a flood that stops is still counted, even if no rejected message follows it.
        """
        with self._lock:
            suppressed, self.suppressed = self.suppressed, 0
        if suppressed:
            self._emit("suppressed", suppressed=suppressed)
        return suppressed
