#!/bin/sh
# Installs cockpit-agent as a systemd service (`make install`). Safe to run again.
#
# As root on a Debian/Ubuntu host it creates the cockpit-agent system user (in the docker
# group when there is one), installs the app and its venv under /opt/cockpit-agent, writes
# /etc/cockpit-agent/agent.env from .env.example unless it exists, makes the state directory,
# installs the unit, the `cockpit-agent` command and its manual page, then reloads systemd and
# enables the unit.
#
# With DESTDIR=/some/dir everything is staged under that directory instead, and the steps
# that need a live system (user, group, ownership, systemctl) are skipped.
# INSTALL_VENV=0 skips creating the venv (the suite's quick staged test).
set -eu

PYTHON=${PYTHON:-python3}
INSTALL_VENV=${INSTALL_VENV:-1}
SRC=$(cd "$(dirname "$0")/.." && pwd)
. "$SRC/scripts/layout.sh"
# The application: every top-level module plus these; tests, venvs and caches stay behind.
APP_DIRS="cli runtime service handlers outbox systemd docs"
APP_FILES="requirements.txt .env.example"

if live && [ "$(id -u)" != 0 ]; then
    echo "make install: run it as root (sudo make install), or stage it with DESTDIR=/some/dir" >&2
    exit 1
fi

# -- the system user ---------------------------------------------------------------------
if live; then
    if getent passwd "$AGENT_USER" >/dev/null; then
        say "user $AGENT_USER exists"
    else
        useradd --system --user-group --home-dir "$STATE" --no-create-home \
            --shell /usr/sbin/nologin --comment "Cockpit agent" "$AGENT_USER"
        say "created system user $AGENT_USER"
    fi
    if getent group docker >/dev/null; then
        usermod -a -G docker "$AGENT_USER"
        say "$AGENT_USER is in the docker group (it can restart containers: that is root-equivalent)"
    else
        say "no docker group on this host: docker_restart will fail until docker is installed and" \
            "$AGENT_USER is added to it (usermod -aG docker $AGENT_USER)"
    fi
else
    say "DESTDIR=$DESTDIR: staging only (no user, group, ownership or systemctl)"
fi

# -- the application ---------------------------------------------------------------------
install -d -m 0755 "$DESTDIR$APP"
# Replace the code wholesale so files removed upstream do not linger; the venv stays.
(cd "$DESTDIR$APP" && rm -rf -- $APP_DIRS ./*.py ./__pycache__)
(cd "$SRC" && tar -cf - --exclude=__pycache__ --exclude='*.pyc' ./*.py $APP_DIRS $APP_FILES) |
    tar -xf - --no-same-owner --no-same-permissions -C "$DESTDIR$APP"
chmod -R u=rwX,go=rX "$DESTDIR$APP/cli" "$DESTDIR$APP/runtime" "$DESTDIR$APP/service" "$DESTDIR$APP/handlers" "$DESTDIR$APP/outbox" \
    "$DESTDIR$APP/systemd" "$DESTDIR$APP/docs"
chmod 0644 "$DESTDIR$APP"/*.py "$DESTDIR$APP/requirements.txt" "$DESTDIR$APP/.env.example"
say "installed the app to $DESTDIR$APP"

if [ "$INSTALL_VENV" = 1 ]; then
    VENV=$DESTDIR$APP/venv
    if [ ! -x "$VENV/bin/python" ]; then
        if ! "$PYTHON" -c 'import ensurepip' 2>/dev/null && live && command -v apt-get >/dev/null; then
            say "installing python3-venv"
            DEBIAN_FRONTEND=noninteractive apt-get install -y -qq python3-venv >/dev/null
        fi
        "$PYTHON" -m venv "$VENV"
        say "created the venv $VENV"
    fi
    if cmp -s "$SRC/requirements.txt" "$VENV/.requirements.txt"; then
        say "venv is up to date with requirements.txt"
    else
        "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check -r "$SRC/requirements.txt"
        cp "$SRC/requirements.txt" "$VENV/.requirements.txt"
        say "installed the pinned requirements into the venv"
    fi
else
    say "INSTALL_VENV=0: venv skipped"
fi
# Bytecode now: the unit runs with PYTHONDONTWRITEBYTECODE=1 from a read-only directory, so
# without it every start would compile the agent's modules again (slower, and ~3 MB more RSS).
COMPILER=$PYTHON
[ -x "$DESTDIR$APP/venv/bin/python" ] && COMPILER=$DESTDIR$APP/venv/bin/python
(cd "$DESTDIR$APP" && "$COMPILER" -m compileall -q -d "$APP" ./*.py $APP_DIRS >/dev/null)
say "compiled the app's bytecode"

# -- configuration: never overwrite an operator's file -----------------------------------
install -d -m 0750 "$DESTDIR$CONF"
install -d -m 0755 "$DESTDIR$CONF/handlers.d"
live && chown root:"$AGENT_USER" "$CONF" && chown root:root "$CONF/handlers.d"
if [ -e "$DESTDIR$ENV_FILE" ]; then
    say "kept the existing $DESTDIR$ENV_FILE"
    NEW_ENV=0
else
    install -m 0600 "$SRC/.env.example" "$DESTDIR$ENV_FILE"
    live && chown "$AGENT_USER:$AGENT_USER" "$ENV_FILE"
    say "wrote $DESTDIR$ENV_FILE from .env.example (mode 0600)"
    NEW_ENV=1
fi

# Where a checkout keeps it, for operators who look there first; the agent reads ENV_FILE.
ln -sfn "$ENV_FILE" "$DESTDIR$APP/.env"

# -- state, unit, command ----------------------------------------------------------------
install -d -m 0700 "$DESTDIR$STATE"
live && chown "$AGENT_USER:$AGENT_USER" "$STATE"
say "state directory $DESTDIR$STATE"

install -d -m 0755 "$DESTDIR$(dirname "$UNIT")"
install -m 0644 "$SRC/systemd/cockpit-agent.service" "$DESTDIR$UNIT"
say "installed the unit $DESTDIR$UNIT"

install -d -m 0755 "$DESTDIR$(dirname "$WRAPPER")"
cat > "$DESTDIR$WRAPPER.tmp" <<WRAP
#!/bin/sh
# cockpit-agent: the agent's operator commands (check, send, status, outbox, history) and run.
# Installed by make install; reads the service's settings unless COCKPIT_AGENT_ENV_FILE says otherwise.
: "\${COCKPIT_AGENT_ENV_FILE:=$ENV_FILE}"
export COCKPIT_AGENT_ENV_FILE
# A secret the service gets as a systemd credential (LoadCredential=) lies, while it runs, in a
# directory its user can read: the command finds REDIS_PASSWORD and the shared secret there too.
if [ -z "\${CREDENTIALS_DIRECTORY:-}" ] && [ -d /run/credentials/cockpit-agent.service ]; then
    CREDENTIALS_DIRECTORY=/run/credentials/cockpit-agent.service
    export CREDENTIALS_DIRECTORY
fi
if [ "\$(id -u)" = 0 ] && getent passwd $AGENT_USER >/dev/null; then
    # Run by root (sudo cockpit-agent check), it runs as the service does: the agent's user
    # and groups (docker), its HOME (git's known_hosts). The settings file, which that user
    # owns, is then accepted (root was refused it), check sees what the service will see, and
    # a file it creates beside the outbox (SQLite's -wal, -shm) is the agent's, not root's.
    exec setpriv --reuid=$AGENT_USER --regid=$AGENT_USER --init-groups \\
        env HOME=$STATE $APP/venv/bin/python $APP/agent.py "\$@"
fi
exec $APP/venv/bin/python $APP/agent.py "\$@"
WRAP
chmod 0755 "$DESTDIR$WRAPPER.tmp"
mv -f "$DESTDIR$WRAPPER.tmp" "$DESTDIR$WRAPPER"
say "installed the command $DESTDIR$WRAPPER"

install -d -m 0755 "$DESTDIR$(dirname "$MANPAGE")"
install -m 0644 "$SRC/docs/cockpit-agent.8" "$DESTDIR$MANPAGE"
say "installed the manual page $DESTDIR$MANPAGE (man 8 cockpit-agent)"

if live; then
    if [ -d /run/systemd/system ]; then
        systemctl daemon-reload
        systemctl enable cockpit-agent.service
        say "systemd reloaded; cockpit-agent.service enabled (not started)"
    else
        say "systemd is not running on this host: skipped daemon-reload and enable"
    fi
fi

cat <<NEXT

Next steps:
  1. Edit $ENV_FILE$( [ "$NEW_ENV" = 1 ] && echo " (new: set REDIS_PASSWORD at least)" )
     and add each GIT_REPO_PATH to the unit: systemctl edit cockpit-agent (ReadWritePaths=)
  2. Check it:   cockpit-agent check
  3. Start it:   systemctl start cockpit-agent
  4. Follow it:  journalctl -u cockpit-agent -f
  5. Try it:     cockpit-agent send echo message=hi
NEXT
