"""Secrets inside messages and outputs.

``mask`` replaces secrets by ``***``: in log lines (config.RedactSecrets) and in what a child
printed, before a response is stored or published.
"""

from __future__ import annotations

from collections.abc import Iterable

# A secret shorter than this is not masked: a 1-3 character password would turn every "a" or
# "ok" of an output into "***", and a secret that short protects nothing anyway.
MIN_SECRET_CHARS = 4
MASK = "***"


def maskable(secrets: Iterable[str | None]) -> tuple[str, ...]:
    """The secrets ``mask`` should replace: long enough, without repeats, longest first.

    Longest first, so a secret that contains another is masked whole, not left half visible.
    """
    return tuple(sorted({s for s in secrets if s and len(s) >= MIN_SECRET_CHARS}, key=len, reverse=True))


def mask(text: str | None, secrets: tuple[str, ...]) -> str | None:
    """``text`` with every one of ``secrets`` (from ``maskable``) replaced by ``***``."""
    if not text:
        return text
    for secret in secrets:
        if secret in text:
            text = text.replace(secret, MASK)
    return text
