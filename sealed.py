"""Secrets inside messages and outputs: the backend's encrypted params, and masking.

With a shared secret, the Cockpit backend replaces the values of ``password``,
``ansible_password`` and ``ssh_passphrase`` in ``params`` by Fernet tokens (key: urlsafe base64
of sha256(secret)) before it signs (PROTOCOL.md). ``open_params`` turns them back into text
once the signature is verified, in a copy only the handler sees; the message's own params keep
the tokens, so what is stored and audited never holds the plain value. Only top-level params are
encrypted by the backend, so only those are opened.

``mask`` replaces secrets by ``***``: in log lines (config.RedactSecrets) and in what a child
printed, before a response is stored or published; a secret that could be an ordinary word
only where it stands as a value (the comment above ``looks_generated`` says why).

A module of its own, not part of protocol.py: ``cryptography`` is imported here only when a
sealed field arrives (the agent does not pay for it at start), and protocol.py stays free of it.
"""

from __future__ import annotations

import base64
import functools
import hashlib
import re
from collections.abc import Iterable
from typing import Any

from errors import ValidationError

SEALED_PARAMS = ("password", "ansible_password", "ssh_passphrase")
MASK = "***"
# Where a secret is masked: where it can be told apart from ordinary text.
#
# A secret that looks like a generated one (16 characters or more, or 8 or more with a digit or
# a symbol besides - _ .) is masked wherever it appears, inside a longer word too: no text
# holds it by chance, and a child that glues it to other text (pw$SECRET) must not carry it out.
#
# Any other secret, a short one or a plain word (agent, redis, grafana), is also a word that
# the agent and its children write anyway. Masking it everywhere garbled their text and told
# every reader the password: with REDIS_PASSWORD=agent the start line read
# `cockpit-*** ... ***_id=lab-01` and errors `docker_restart is off on this ***`. Where nothing
# marks it as a secret, that word says nothing about the password, so it is left; it is masked
# where it stands as a value: a whole word (not joined to letters or digits, directly or
# through one of - . /) that is a line of its own or the whole text, in quotes ('agent',
# "agent"), after = or : (PASSWORD=agent, a URL's :agent@, "password": "agent", key:agent), or
# after a word naming a secret (password agent, --password agent, the password is agent,
# auth agent, token: agent).
# That is every way a configuration file, a URL, JSON, an agent's error (which quotes values)
# or a child echoing it would show the value, with no length too short to mask.
_JOINERS = "-./"
_NOT_A_WORD = re.compile(r"[^A-Za-z_.\-]")  # a digit, a symbol, a space: what words lack
_QUOTES = "'\"`"
_VALUE_BEFORE = re.compile(
    r"""(?:=\s*["'`]?|:["'`]?|:\s+["'`]"""
    r"""|(?<![A-Za-z])(?i:password|passwd|passphrase|pass|pwd|pw|secret|token|auth|credentials?|key)"""
    r"""(?:\s+(?i:is|was))?[\s=:"'`]+)$""")


def looks_generated(secret: str) -> bool:
    """True for a secret masked wherever it appears (see above); False for one masked only
    where it stands as a value."""
    return len(secret) >= 16 or (len(secret) >= 8 and bool(_NOT_A_WORD.search(secret)))


@functools.lru_cache(maxsize=4)
def _fernet(secret: str) -> Any:
    from cryptography.fernet import Fernet  # lazily: only commands with sealed params pay for it

    return Fernet(base64.urlsafe_b64encode(hashlib.sha256(secret.encode()).digest()))


def seal_params(params: dict[str, Any], secret: str | None) -> dict[str, Any]:
    """``params`` with its sealed fields encrypted exactly as the backend does (for ``send`` and tests)."""
    if not secret:
        return params
    return {k: _fernet(secret).encrypt(v.encode()).decode() if k in SEALED_PARAMS and isinstance(v, str) and v
            else v for k, v in params.items()}


def open_params(params: dict[str, Any], secret: str | None) -> tuple[dict[str, Any], tuple[str, ...]]:
    """The params a handler sees (sealed fields decrypted, in a copy) and the plain values found.

    Without a secret, or without a sealed field, ``params`` itself is returned. A null or empty
    field carries no secret and is passed through; anything else that is not a token that
    decrypts with the shared secret raises ValidationError naming the field, never its value.
    """
    if not secret or not any(params.get(name) not in (None, "") for name in SEALED_PARAMS):
        return params, ()
    from cryptography.fernet import InvalidToken

    opened, plain = dict(params), []
    for name in SEALED_PARAMS:
        token = params.get(name)
        if token in (None, ""):
            continue
        if not isinstance(token, str):
            raise ValidationError(f"{name} must be a string (a Fernet token, encrypted with the shared secret), "
                                  f"got {type(token).__name__}")
        try:
            value = _fernet(secret).decrypt(token).decode("utf-8")
        except (InvalidToken, ValueError, TypeError):  # ValueError: not ASCII; UnicodeDecodeError too
            raise ValidationError(f"{name} could not be decrypted with the shared secret (COCKPIT_SHARED_SECRET); "
                                  "is the backend's secret the same as this agent's?") from None
        opened[name] = value
        plain.append(value)
    return opened, tuple(plain)


def maskable(secrets: Iterable[str | None]) -> tuple[str, ...]:
    """The secrets ``mask`` should replace: every non-empty one, without repeats, longest first.

    Longest first, so a secret that contains another is masked whole, not left half visible.
    """
    return tuple(sorted({s for s in secrets if s}, key=len, reverse=True))


@functools.lru_cache(maxsize=64)
def _pattern(secrets: tuple[str, ...]) -> re.Pattern[str]:
    """One regular expression for ``secrets``: each anywhere when it looks generated, else as a
    whole word (``_stands_as_value`` then decides)."""
    joiners = re.escape(_JOINERS)
    parts = []
    for secret in secrets:
        body = re.escape(secret)
        if not looks_generated(secret):
            # Only the ends that are word characters can be joined to a word around them.
            if re.match(r"\w", secret[0]):
                body = rf"(?<!\w)(?<!\w[{joiners}])" + body
            if re.match(r"\w", secret[-1]):
                body += rf"(?!\w|[{joiners}]\w)"
        parts.append(body)
    return re.compile("|".join(parts))


def _stands_as_value(text: str, start: int, end: int) -> bool:
    """True when ``text[start:end]``, a whole word, is shown as a value (see above)."""
    line_start = text.rfind("\n", 0, start) + 1
    line_end = text.find("\n", end)
    before, after = text[line_start:start], text[end:len(text) if line_end < 0 else line_end]
    if not before.strip() and not after.strip():
        return True  # a line of its own, or the whole text
    if before[-1:] and before[-1:] in _QUOTES and after[:1] == before[-1:]:
        return True
    return bool(_VALUE_BEFORE.search(before[-64:]))


def mask(text: str | None, secrets: tuple[str, ...]) -> str | None:
    """``text`` with each of ``secrets`` (from ``maskable``) replaced by ``***`` where it can be
    told apart from ordinary text (see above): in log lines, outputs and errors."""
    if not text or not secrets:
        return text
    present = tuple(secret for secret in secrets if secret in text)
    if not present:
        return text

    def replace(match: re.Match[str]) -> str:
        found = match.group()
        if looks_generated(found) or _stands_as_value(text, match.start(), match.end()):
            return MASK
        return found

    return _pattern(present).sub(replace, text)
