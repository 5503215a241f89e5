"""The wire format shared with the Cockpit backend: parsing commands, signing, building responses.

Pure functions with no I/O, so every rule of PROTOCOL.md can be tested on its own.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import math
import re
import time
from dataclasses import dataclass
from typing import Any

from errors import AgentError

SIGNATURE_MAX_AGE = 300  # seconds either side of now, as the backend expects
COMMAND_ID_MAX = 128


@dataclass(frozen=True)
class Command:
    """A command message that passed the envelope checks (not yet the handler's own checks)."""

    command_id: str
    command: str
    params: dict[str, Any]
    sender: str | None = None
    timestamp: float | None = None
    size: int = 0
    signed: bool = False


class Rejected(AgentError):
    """A message that will not run.

    ``command_id`` is set when the message can still be answered; ``stored`` says whether the
    refusal may be recorded under that id (never for unauthenticated messages, which must not
    be able to claim a real command's id, nor be answered). ``kind`` is what metrics and the
    audit count it as: ``malformed``, ``oversize`` or ``unauthenticated``.
    """

    def __init__(self, reason: str, command_id: str | None = None, stored: bool = True, kind: str = "malformed"):
        super().__init__(reason)
        self.reason = reason
        self.command_id = command_id
        self.stored = stored
        self.kind = kind


def preview(value: Any, limit: int = 80) -> str:
    """A short, single-line, escaped rendering of untrusted input for logs and errors."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def signature_base(message: dict[str, Any]) -> str:
    """The exact text the backend signs: the message without ``auth``, key-sorted, then the timestamp."""
    unsigned = {k: v for k, v in message.items() if k != "auth"}
    return json.dumps(unsigned, sort_keys=True) + ":" + str(message.get("timestamp"))


def sign(message: dict[str, Any], secret: str) -> str:
    """The hex HMAC-SHA256 signature the backend puts in ``auth.signature``."""
    return hmac.new(secret.encode(), signature_base(message).encode(), hashlib.sha256).hexdigest()


def is_text(value: Any) -> bool:
    """A str that can be stored and sent: JSON can carry lone surrogates, UTF-8 cannot."""
    if not isinstance(value, str):
        return False
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _usable_command_id(value: Any) -> str | None:
    # Printable as Python means it: no control characters, and none of the Unicode line and
    # paragraph separators (U+0085, U+2028, ...) or format characters, so an id can name a key
    # and sit in a log line or a terminal without breaking it.
    if not is_text(value) or not 1 <= len(value) <= COMMAND_ID_MAX or not value.isprintable():
        return None
    return value


def unix_seconds(value: Any) -> float | None:
    """``value`` as unix seconds when it is a finite JSON number, else None.

    JSON integers have no size limit: ``10**400`` is an int that no float, and so no time
    arithmetic, can hold (OverflowError), so it is checked here, once, like any bad value.
    """
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    try:
        seconds = float(value)
    except OverflowError:
        return None
    return seconds if math.isfinite(seconds) else None


# A leading "command_id": "..." of a message too big to parse; bounded (a 128-character id
# written as \uXXXX escapes, surrogate pairs included, is at most 1538 bytes with its quotes).
_LEADING_COMMAND_ID = re.compile(rb'\s{0,64}\{\s{0,64}"command_id"\s{0,64}:\s{0,64}("(?:[^"\\]|\\.){1,1536}")')
_HEAD_BYTES = 2048


def _leading_command_id(raw: bytes) -> str | None:
    """The command_id a message starts with, found without parsing the message, or None."""
    match = _LEADING_COMMAND_ID.match(raw, 0, _HEAD_BYTES)
    if match is None:
        return None
    try:
        return _usable_command_id(json.loads(match.group(1).decode("utf-8")))
    except (UnicodeDecodeError, ValueError):
        return None


def _unauthenticated(reason: str) -> Rejected:
    return Rejected(reason, stored=False, kind="unauthenticated")


def _check_signature(message: dict[str, Any], secret: str, now: float) -> None:
    auth = message.get("auth")
    signature = auth.get("signature") if isinstance(auth, dict) else None
    if not isinstance(signature, str) or not signature:
        raise _unauthenticated("not authenticated: the message carries no auth.signature and signing is on")
    if not signature.isascii():  # hmac.compare_digest refuses non-ASCII text
        raise _unauthenticated("not authenticated: auth.signature is not a hex string")
    timestamp = unix_seconds(message.get("timestamp"))
    if timestamp is None:
        raise _unauthenticated("not authenticated: a signed message needs a numeric timestamp (unix seconds)")
    expected = sign(message, secret)
    if not hmac.compare_digest(expected, signature.lower()):
        raise _unauthenticated("not authenticated: auth.signature does not match the message")
    age = now - timestamp
    if abs(age) > SIGNATURE_MAX_AGE:
        raise _unauthenticated(
            f"not authenticated: the message timestamp is {abs(age):.0f} s "
            f"{'old' if age > 0 else 'in the future'}; at most {SIGNATURE_MAX_AGE} s is accepted"
        )


def parse(
    data: bytes | str,
    *,
    max_bytes: int = 1024 * 1024,
    secret: str | None = None,
    now: float | None = None,
) -> Command:
    """Check a raw message and return the Command, or raise Rejected saying why.

    Order matters: nothing over ``max_bytes`` is parsed at all; a message is only answerable
    once its ``command_id`` is known, and only trusted once its signature is checked, so the
    type checks on ``command`` and ``params`` come last.
    """
    raw = data.encode("utf-8", "surrogatepass") if isinstance(data, str) else bytes(data)
    size = len(raw)
    if size > max_bytes:
        # Refused on its length alone: parsing a 5 MB list first cost more memory than the
        # agent's whole working set. Without a signature to check, a command_id at its very
        # start (where the backend's json.dumps puts it) still lets the refusal be answered.
        raise Rejected(
            f"message is {size} bytes, over the limit of {max_bytes} bytes (MAX_MESSAGE_BYTES)",
            None if secret else _leading_command_id(raw), kind="oversize",
        )
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise Rejected(f"message is not UTF-8 ({exc.reason} at byte {exc.start})") from None
    try:
        message = json.loads(text)
    except (ValueError, RecursionError) as exc:
        raise Rejected(f"message is not JSON ({preview(str(exc), 120)})") from None
    if not isinstance(message, dict):
        raise Rejected(f"message is a JSON {type(message).__name__}, expected an object")
    command_id = _usable_command_id(message.get("command_id"))
    if command_id is None:
        raise Rejected(
            f"command_id must be a string of 1 to {COMMAND_ID_MAX} printable characters, "
            f"got {preview(message.get('command_id'))}"
        )
    now = time.time() if now is None else now
    if secret:
        try:
            _check_signature(message, secret, now)
        except Rejected as exc:
            exc.command_id, exc.stored = command_id, False
            raise
    command = message.get("command")
    if not is_text(command) or not command:
        raise Rejected(f"command must be a non-empty string, got {preview(command)}", command_id)
    params = message.get("params", {})
    if params is None:
        params = {}
    if not isinstance(params, dict):
        raise Rejected(f"params must be a JSON object, got a {type(params).__name__}", command_id)
    sender = message.get("sender")
    timestamp = message.get("timestamp")
    return Command(
        command_id=command_id,
        command=command,
        params=params,
        sender=sender if is_text(sender) else None,
        timestamp=timestamp if unix_seconds(timestamp) is not None else None,
        size=size,
        signed=bool(secret),
    )


def response(
    command_id: str,
    status: str,
    output: str | None,
    error: str | None,
    execution_time_ms: int,
    agent_id: str,
    **extra: Any,
) -> dict[str, Any]:
    """One response as the backend reads it: the six contract fields, then any extras."""
    message = {
        "command_id": command_id,
        "status": status,
        "output": output,
        "error": error,
        "execution_time_ms": int(execution_time_ms),
        "timestamp": int(time.time()),
        "agent_id": agent_id,
    }
    message.update(extra)
    return message


def sign_response(response: dict[str, Any], secret: str) -> dict[str, Any]:
    """``response`` with ``auth.signature``, computed exactly like a command's signature.

    A backend verifies it the same way: drop ``auth``, ``json.dumps(..., sort_keys=True)``,
    append ``":" + str(timestamp)``, HMAC-SHA256 with the shared secret, compare the hex.
    """
    signed = {k: v for k, v in response.items() if k != "auth"}
    signed["auth"] = {"signature": sign(signed, secret)}
    return signed


def verify(message: dict[str, Any], secret: str) -> bool:
    """True when ``message`` carries the right ``auth.signature`` (no timestamp window here)."""
    auth = message.get("auth")
    signature = auth.get("signature") if isinstance(auth, dict) else None
    if not isinstance(signature, str) or not signature.isascii():
        return False
    return hmac.compare_digest(sign(message, secret), signature.lower())


# json.dumps builds a new encoder on every call that passes separators; this one is reused.
_compact_encode = json.JSONEncoder(separators=(",", ":")).encode


def encode(message: dict[str, Any]) -> str:
    """JSON text for the wire; ASCII-only, so any input (even lone surrogates) encodes."""
    return _compact_encode(message)
