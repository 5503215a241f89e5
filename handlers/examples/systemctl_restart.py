"""Example HANDLERS_DIR module: ``systemctl_restart`` of whitelisted units.

Install it with:

    install -o root -g root -m 0644 handlers/examples/systemctl_restart.py /etc/cockpit-agent/handlers.d/
    # in the agent's .env:
    HANDLERS_DIR=/etc/cockpit-agent/handlers.d
    SYSTEMCTL_UNITS=nginx.service,grafana-server.service

Settings (read once, when the agent loads the module, from the environment or the agent's .env):
    SYSTEMCTL_UNITS    comma-separated units that may be restarted (required)
    SYSTEMCTL_BIN      the systemctl to run (default: systemctl on PATH)
    SYSTEMCTL_TIMEOUT  seconds before the restart is killed (default 60)

The agent's user needs permission to restart those units (a polkit rule or a sudo-less
``systemctl`` wrapper); the hardened unit gives it no capabilities of its own.
"""

from __future__ import annotations

import re

from errors import ConfigError, ValidationError
from handlers.base import Action, Handler, string_param, whitelisted
from handlers.loader import setting
from protocol import preview

# systemd unit names: letters, digits and :_.@- , with a known unit type suffix.
UNIT_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9:_.@-]{0,250}\.(service|socket|timer|target|path|mount)$")


def _settings() -> tuple[tuple[str, ...], str, float]:
    units = tuple(u.strip() for u in (setting("SYSTEMCTL_UNITS") or "").split(",") if u.strip())
    if not units:
        raise ConfigError("SYSTEMCTL_UNITS: required by the systemctl_restart handler (comma-separated units)")
    for unit in units:
        if not UNIT_RE.match(unit):
            raise ConfigError(f"SYSTEMCTL_UNITS: {unit!r} is not a unit name like nginx.service")
    try:
        timeout = float(setting("SYSTEMCTL_TIMEOUT", "60"))
    except ValueError:
        raise ConfigError("SYSTEMCTL_TIMEOUT: expected a number of seconds") from None
    if timeout <= 0:
        raise ConfigError("SYSTEMCTL_TIMEOUT: expected a positive number of seconds")
    return units, setting("SYSTEMCTL_BIN", "systemctl"), timeout


UNITS, SYSTEMCTL, TIMEOUT = _settings()


def prepare(params, config) -> Action:
    """``systemctl restart -- <unit>`` for a whitelisted unit; the output on success is the unit."""
    unit = string_param(params, "unit", None, max_len=256)
    if not unit:  # "" is "not given", as for the built-in commands; there is no default unit
        raise ValidationError(f"unit is required; allowed: {', '.join(UNITS)} (SYSTEMCTL_UNITS)")
    if not UNIT_RE.match(unit):
        raise ValidationError(f"unit {preview(unit)} is not a unit name; allowed: {', '.join(UNITS)} (SYSTEMCTL_UNITS)")
    whitelisted("unit", unit, UNITS, "SYSTEMCTL_UNITS")
    return Action(
        target=f"systemd:{unit}",
        argv=(SYSTEMCTL, "restart", "--", unit),
        timeout=TIMEOUT,
        timeout_setting="SYSTEMCTL_TIMEOUT",
        success_output=unit,
    )


HANDLERS = [
    Handler("systemctl_restart", prepare, ("unit",), "restart a whitelisted systemd unit (params: unit)"),
]
