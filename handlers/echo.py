"""``echo``: the health check. Answers with its message and runs nothing."""

from __future__ import annotations

from handlers.base import Action, Handler, string_param


def prepare(params, config) -> Action:
    """``message`` (string, default ``"pong"``) comes back as the output."""
    return Action(output=string_param(params, "message", "pong", max_len=65536))


ECHO = Handler("echo", prepare, ("message",), "answer with params.message (default 'pong')")
