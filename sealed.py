"""Secrets inside messages and outputs: the backend's encrypted params, and masking.

With a shared secret, the Cockpit backend replaces the values of ``password``,
``ansible_password`` and ``ssh_passphrase`` in ``params`` by Fernet tokens (key: urlsafe base64
of sha256(secret)) before it signs (PROTOCOL.md). ``open_params`` turns them back into text
once the signature is verified, in a copy only the handler sees; the message's own params keep
the tokens, so what is stored and audited never holds the plain value. Only top-level params are
encrypted by the backend, so only those are opened.

``mask`` replaces secrets by ``***``: in log lines (config.RedactSecrets) and in what a child
printed, before a response is stored or published; a short secret only where it stands as a
value of its own, not inside a word (MASK_EVERYWHERE_FROM says why).

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
# Where a secret is masked. One this long is masked wherever it appears, inside a longer word
# too: no text holds 16 characters of a secret by chance, and a child that glues it to other
# text (pw$SECRET) must not carry it out. A shorter one is masked wherever it stands as a value
# of its own: not joined to letters or digits on either side, directly or through one of - . /
# (so `PASSWORD=agent`, `redis://:agent@host`, `'agent'`, `is agent.` are masked, and so is a
# one-letter password standing alone), but not inside a word: with REDIS_PASSWORD=agent,
# masking every "agent" made `cockpit-agent:lab-01` read `cockpit-***:lab-01` and `agent_id`
# `***_id`, which garbled the agent's own names and paths and told every reader the password.
# A word that merely contains a short secret never held it as a value, so leaving it is safe.
MASK_EVERYWHERE_FROM = 16
_JOINERS = "-./"


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
    """One regular expression for ``secrets`` (see MASK_EVERYWHERE_FROM for where each matches)."""
    joiners = re.escape(_JOINERS)
    parts = []
    for secret in secrets:
        body = re.escape(secret)
        if len(secret) < MASK_EVERYWHERE_FROM:
            # Only the ends that are word characters can be joined to a word around them.
            if re.match(r"\w", secret[0]):
                body = rf"(?<!\w)(?<!\w[{joiners}])" + body
            if re.match(r"\w", secret[-1]):
                body += rf"(?!\w|[{joiners}]\w)"
        parts.append(body)
    return re.compile("|".join(parts))


def mask(text: str | None, secrets: tuple[str, ...]) -> str | None:
    """``text`` with each of ``secrets`` (from ``maskable``) replaced by ``***`` where it
    appears as a value (see MASK_EVERYWHERE_FROM): in log lines, outputs and errors."""
    if not text or not secrets or not any(secret in text for secret in secrets):
        return text
    return _pattern(secrets).sub(MASK, text)
