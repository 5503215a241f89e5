"""Example HANDLERS_DIR module: ``htpasswd_set``, a whitelisted user's password in an htpasswd file.

It shows a command that takes a secret: the backend sends ``password`` Fernet-encrypted with
the shared secret, the agent decrypts it after checking the signature, and this handler hands
it to ``htpasswd -i`` on stdin, never on argv (which any local user can read in /proc). The
plain password is not logged, stored or published; a child that prints it has it masked.

Install it with:

    install -o root -g root -m 0644 handlers/examples/htpasswd_set.py /etc/cockpit-agent/handlers.d/
    # in the agent's .env:
    HANDLERS_DIR=/etc/cockpit-agent/handlers.d
    HTPASSWD_FILE=/etc/nginx/htpasswd
    HTPASSWD_USERS=grafana-viewer,ops

Settings (read once, when the agent loads the module, from the environment or the agent's .env):
    HTPASSWD_FILE     the htpasswd file to update, an absolute path (required; it must exist,
                      the handler never creates it)
    HTPASSWD_USERS    comma-separated users whose password may be set (required)
    HTPASSWD_BIN      the htpasswd to run (default: htpasswd on PATH, from apache2-utils)
    HTPASSWD_TIMEOUT  seconds before it is killed (default 30)

It refuses to run without COCKPIT_SHARED_SECRET: the password would cross Redis in clear.
"""

from __future__ import annotations

import os
import re

from errors import ConfigError, NotAllowed, ValidationError
from handlers.base import Action, Handler, string_param, whitelisted
from handlers.loader import setting
from protocol import is_text

# Starts with a letter or digit, so it can never be read as an option of htpasswd.
USER_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._@-]{0,63}$")
PASSWORD_MAX = 255


def _settings() -> tuple[str, tuple[str, ...], str, float]:
    path = setting("HTPASSWD_FILE") or ""
    if not os.path.isabs(path):
        raise ConfigError("HTPASSWD_FILE: required by the htpasswd_set handler (an absolute path)")
    users = tuple(u.strip() for u in (setting("HTPASSWD_USERS") or "").split(",") if u.strip())
    if not users:
        raise ConfigError("HTPASSWD_USERS: required by the htpasswd_set handler (comma-separated users)")
    for user in users:
        if not USER_RE.match(user):
            raise ConfigError(f"HTPASSWD_USERS: {user!r} is not a user name (letters, digits, ._@-)")
    try:
        timeout = float(setting("HTPASSWD_TIMEOUT", "30"))
    except ValueError:
        raise ConfigError("HTPASSWD_TIMEOUT: expected a number of seconds") from None
    if timeout <= 0:
        raise ConfigError("HTPASSWD_TIMEOUT: expected a positive number of seconds")
    return path, users, setting("HTPASSWD_BIN", "htpasswd"), timeout


FILE, USERS, HTPASSWD, TIMEOUT = _settings()


def prepare(params, config) -> Action:
    """``htpasswd -i -B <file> <user>`` with the password on stdin; the output on success says whose."""
    if not config.shared_secret:
        raise NotAllowed("htpasswd_set needs COCKPIT_SHARED_SECRET, so that the password crosses Redis encrypted")
    user = string_param(params, "user", None, max_len=64)
    if user is None:
        raise ValidationError(f"user is required; allowed: {', '.join(USERS)} (HTPASSWD_USERS)")
    whitelisted("user", user, USERS, "HTPASSWD_USERS")
    # Checked here, not with string_param: its errors quote the value, and this one is a secret.
    password = params.get("password")
    if not isinstance(password, str) or not password:
        raise ValidationError("password is required: a non-empty string")
    if len(password) > PASSWORD_MAX or not is_text(password) or any(c in password for c in "\r\n\0"):
        raise ValidationError(f"password must be at most {PASSWORD_MAX} characters of text, "
                              "without line breaks or NUL")
    return Action(
        target=f"htpasswd:{FILE}",
        argv=(HTPASSWD, "-i", "-B", FILE, user),
        timeout=TIMEOUT,
        timeout_setting="HTPASSWD_TIMEOUT",
        success_output=f"password set for {user}",
        stdin=password.encode() + b"\n",
    )


HANDLERS = [
    Handler("htpasswd_set", prepare, ("user", "password"),
            "set a whitelisted user's password in HTPASSWD_FILE (params: user, password)"),
]
