#!/bin/sh
# Removes cockpit-agent (`make uninstall`): the app, the unit, the command and its manual page. The state
# (/var/lib/cockpit-agent: the outbox, its history and its lock file) and /etc/cockpit-agent (agent.env,
# handlers.d) are kept unless PURGE=1, which also removes the system user.
# DESTDIR works as for install.sh.
set -eu

PURGE=${PURGE:-0}
. "$(cd "$(dirname "$0")" && pwd)/layout.sh"

if live && [ "$(id -u)" != 0 ]; then
    echo "make uninstall: run it as root, or with DESTDIR=/some/dir" >&2
    exit 1
fi
if live && [ -d /run/systemd/system ]; then
    systemctl disable --now cockpit-agent.service 2>/dev/null || true
    say "stopped and disabled cockpit-agent.service"
fi
rm -f "$DESTDIR$UNIT" "$DESTDIR$WRAPPER" "$DESTDIR$MANPAGE"
rm -rf "$DESTDIR$APP"
say "removed $DESTDIR$APP, $DESTDIR$UNIT, $DESTDIR$WRAPPER and $DESTDIR$MANPAGE"
if live && [ -d /run/systemd/system ]; then
    systemctl daemon-reload
fi
if [ "$PURGE" = 1 ]; then
    rm -rf "$DESTDIR$STATE" "$DESTDIR$CONF"
    say "PURGE=1: removed $DESTDIR$STATE and $DESTDIR$CONF"
    if live && getent passwd "$AGENT_USER" >/dev/null; then
        userdel "$AGENT_USER"
        say "removed the user $AGENT_USER"
    fi
else
    say "kept $DESTDIR$STATE (outbox and history) and $DESTDIR$CONF (agent.env); PURGE=1 removes them"
fi
