#!/usr/bin/env bash
# make systemd-e2e: the installed agent under a real systemd, the way an operator meets it.
#
# Boots a Debian container (debootstrap + systemd-nspawn, systemd as its PID 1, the host's
# network), runs `make install` in it from this checkout (HEAD, committed files only), and
# follows the README: check, start, send, stop. It then checks what only a real systemd shows:
# Type=notify and STATUS=, the sandbox (ProtectSystem=strict, the system call filter, no
# capabilities) letting git (also over ssh) and the docker CLI work, journald priorities, the
# example custom command restarting a unit through polkit, the watchdog, Restart= after a kill,
# exit 78 not restarted, the password as a credential, a stop that lets a running command
# finish, what a stop leaves on disk, a repository left out of ReadWritePaths=, make uninstall.
#
# Needs root, network (Debian's mirror once, then PyPI) and ~400 MB in E2E_DIR. The container's
# root file system is kept there between runs (E2E_FRESH=1 builds it again). The fakes, named:
# the docker CLI is the host's own binary, talking to a fake Engine API on /run/docker.sock
# inside the container (no Docker engine runs here); Redis is a real redis-server on the host.
set -euo pipefail

SRC=$(cd "$(dirname "$0")/.." && pwd)
E2E_DIR=${E2E_DIR:-/var/tmp/cockpit-agent-e2e}
ROOT=$E2E_DIR/rootfs
PASSWORD=e2e-$(od -An -N8 -tx8 /dev/urandom | tr -d ' ')
AGENT_ID=e2e-agent
FAILED=0
NSPAWN_PID=
REDIS_PID=

say() { echo "==> $*"; }
ok() { echo "ok    $*"; }
fail() { echo "FAIL  $*"; FAILED=$((FAILED + 1)); }
check() {  # check "what" command...: ok when the command succeeds
    local what=$1; shift
    if "$@"; then ok "$what"; else fail "$what"; fi
}

[ "$(id -u)" = 0 ] || { echo "systemd-e2e: run it as root (it boots a container)" >&2; exit 1; }
mkdir -p "$E2E_DIR"
for tool in debootstrap systemd-nspawn; do
    if ! command -v "$tool" >/dev/null; then
        say "installing $tool"
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq debootstrap systemd-container >/dev/null
    fi
done
command -v redis-server >/dev/null || { echo "systemd-e2e: needs redis-server (make tools)" >&2; exit 1; }

INIT=
cleanup() {
    local code=$?
    set +e
    if { [ "$FAILED" -gt 0 ] || [ "$code" != 0 ]; } && [ -n "$INIT" ]; then
        in_ct 'journalctl -b -u cockpit-agent --no-pager' > "$E2E_DIR/agent-journal.log" 2>&1
        echo "systemd-e2e: the agent's journal: $E2E_DIR/agent-journal.log" >&2
        tail -n 20 "$E2E_DIR/agent-journal.log" >&2
    fi
    [ -n "$REDIS_PID" ] && kill "$REDIS_PID" 2>/dev/null
    [ -n "$NSPAWN_PID" ] && kill "$NSPAWN_PID" 2>/dev/null && wait "$NSPAWN_PID" 2>/dev/null
    return 0
}
trap cleanup EXIT

# -- the container ----------------------------------------------------------------------------

PACKAGES=systemd,systemd-sysv,dbus,libpam-systemd,polkitd,openssh-server,openssh-client,python3,python3-venv,git,make,ca-certificates,procps
# The stamp is written only after a complete debootstrap, with the package list it had.
if [ "${E2E_FRESH:-0}" = 1 ] || [ "$(cat "$E2E_DIR/rootfs.ok" 2>/dev/null)" != "$PACKAGES" ]; then
    rm -rf "$ROOT" "$E2E_DIR/rootfs.ok"
    mkdir -p "$ROOT"
    say "debootstrap bookworm into $ROOT (about a minute)"
    debootstrap --variant=minbase --include="$PACKAGES" bookworm "$ROOT" http://deb.debian.org/debian \
        > "$E2E_DIR/debootstrap.log" 2>&1 || { echo "systemd-e2e: debootstrap failed; see $E2E_DIR/debootstrap.log" >&2; exit 1; }
    echo "$PACKAGES" > "$E2E_DIR/rootfs.ok"
fi
# A host behind a TLS-inspecting proxy trusts extra CAs; so must the container's pip.
if ls /usr/local/share/ca-certificates/*.crt >/dev/null 2>&1; then
    cp /usr/local/share/ca-certificates/*.crt "$ROOT/usr/local/share/ca-certificates/"
fi
echo e2e-host > "$ROOT/etc/hostname"
# Each run starts from a host without the agent: a kept root file system keeps its packages only
# (an agent left enabled by the last run would otherwise start at boot with the last settings).
rm -rf "$ROOT/etc/cockpit-agent" "$ROOT/var/lib/cockpit-agent" "$ROOT/opt/cockpit-agent" \
    "$ROOT/etc/systemd/system/cockpit-agent.service" "$ROOT/etc/systemd/system/cockpit-agent.service.d" \
    "$ROOT/usr/local/bin/cockpit-agent" \
    "$ROOT/etc/systemd/system/multi-user.target.wants/cockpit-agent.service" \
    "$ROOT/root/engine.log" "$ROOT/root/slow.json"

rm -rf "$ROOT/root/cockpit-agent"
mkdir -p "$ROOT/root/cockpit-agent"
git -C "$SRC" archive HEAD | tar -x -C "$ROOT/root/cockpit-agent"
rm -f "$ROOT/usr/bin/docker"
if command -v docker >/dev/null; then
    cp "$(command -v docker)" "$ROOT/usr/bin/docker"
fi
# The container shares the host's network: its own sshd must not take port 22 there.
ln -sf /dev/null "$ROOT/etc/systemd/system/ssh.service"
ln -sf /dev/null "$ROOT/etc/systemd/system/ssh.socket"
cat > "$ROOT/root/fake_engine.py" <<'ENGINE'
"""A fake Docker Engine API on /run/docker.sock (group docker): ping, version, and restart of
the containers grafana and slow (4 s); every request is appended to /root/engine.log."""
import grp, http.server, json, os, socketserver, time
SOCK = "/run/docker.sock"
class Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    def log_message(self, *args): pass
    def reply(self, code, body=b"", ctype="application/json"):
        self.send_response(code)
        for k, v in (("Api-Version", "1.47"), ("Ostype", "linux"), ("Content-Type", ctype),
                     ("Content-Length", str(len(body)))):
            self.send_header(k, v)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)
    def route(self):
        with open("/root/engine.log", "a") as f:
            f.write(f"{self.command} {self.path}\n")
        path = self.path.split("?")[0]
        if path.endswith("/_ping"):
            return self.reply(200, b"OK", "text/plain")
        if path.endswith("/version"):
            return self.reply(200, json.dumps({"Version": "fake-engine", "ApiVersion": "1.47",
                                               "MinAPIVersion": "1.24", "Os": "linux"}).encode())
        if "/containers/" in path and path.endswith("/restart"):
            name = path.split("/containers/")[1].split("/")[0]
            if name == "slow":
                time.sleep(4)
            if name in ("grafana", "slow"):
                return self.reply(204)
        return self.reply(404, json.dumps({"message": "no such thing"}).encode())
    do_GET = do_POST = do_HEAD = route
class Server(socketserver.ThreadingMixIn, socketserver.UnixStreamServer):
    daemon_threads = True
    def get_request(self):
        return self.socket.accept()[0], ("local", 0)
if os.path.exists(SOCK):
    os.unlink(SOCK)
server = Server(SOCK, Handler)
os.chown(SOCK, 0, grp.getgrnam("docker").gr_gid)
os.chmod(SOCK, 0o660)
server.serve_forever()
ENGINE

free_port() { python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }
PORT=$(free_port)
SSH_PORT=$(free_port)
METRICS_PORT=$(free_port)
redis-server --port "$PORT" --bind 127.0.0.1 --save "" --appendonly no --requirepass "$PASSWORD" \
    --logfile "$E2E_DIR/redis.log" --daemonize no &
REDIS_PID=$!
rcli() { redis-cli -p "$PORT" -a "$PASSWORD" --no-auth-warning "$@"; }
for _ in $(seq 50); do rcli ping >/dev/null 2>&1 && break; sleep 0.1; done

say "booting the container (systemd-nspawn -b)"
# nspawn leaves this behind when /run is not a tmpfs, and then refuses to start ("Attempted to
# remove disk file system under ...").
rm -rf "/run/systemd/nspawn/propagate/$(basename "$ROOT")"
systemd-nspawn -D "$ROOT" -b --register=no --keep-unit --console=pipe --resolv-conf=copy-host \
    > "$E2E_DIR/console.log" 2>&1 &
NSPAWN_PID=$!
INIT=
for _ in $(seq 100); do
    kill -0 "$NSPAWN_PID" 2>/dev/null || break
    INIT=$(pgrep -P "$NSPAWN_PID" -x systemd | head -n 1 || true)
    [ -n "$INIT" ] && break
    sleep 0.1
done
[ -n "$INIT" ] || { echo "systemd-e2e: the container did not start; see $E2E_DIR/console.log" >&2; exit 1; }
# Inside the container, as root with a clean environment (what `sudo` gives an operator).
in_ct() { nsenter -t "$INIT" -a env -i PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
    HOME=/root LANG=C.UTF-8 sh -c "$1"; }
for _ in $(seq 100); do
    state=$(in_ct 'systemctl is-system-running 2>/dev/null' || true)
    case $state in running|degraded) break ;; esac
    sleep 0.2
done
case $state in
    running|degraded) ok "container booted: systemd $(in_ct 'systemctl --version | head -n 1 | cut -d" " -f2'), state $state" ;;
    *) fail "container booted (state: ${state:-none} after 20 s)"; exit 1 ;;
esac

# -- install, as the README says --------------------------------------------------------------

in_ct 'update-ca-certificates >/dev/null 2>&1; groupadd --system docker 2>/dev/null || true
    command -v pkaction >/dev/null && command -v sshd >/dev/null ||
        { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq polkitd openssh-server \
            openssh-client >/dev/null 2>&1; }
    systemctl start polkit.service' || { fail "container setup (polkit, sshd)"; exit 1; }
if ! in_ct 'cd /root/cockpit-agent && make install' > "$E2E_DIR/install.log" 2>&1; then
    cat "$E2E_DIR/install.log"
    fail "make install"
    exit 1
fi
ok "make install"
in_ct "set -e
printf '%s\n' REDIS_HOST=127.0.0.1 REDIS_PORT=$PORT REDIS_PASSWORD=$PASSWORD AGENT_ID=$AGENT_ID \
    GIT_REPO_PATH=/opt/app/config,/opt/app/ssh-config DOCKER_CONTAINER_NAME=grafana,slow SHUTDOWN_GRACE=20 \
    METRICS_PORT=$METRICS_PORT \
    >> /etc/cockpit-agent/agent.env
git config --global --add safe.directory '*'
rm -rf /srv/origin.git /opt/app/config /root/work
git init -q --bare -b main /srv/origin.git
git clone -q /srv/origin.git /root/work 2>/dev/null
cd /root/work && git -c user.name=op -c user.email=op@e2e commit -q --allow-empty -m first && git push -q origin main
git clone -q /srv/origin.git /opt/app/config 2>/dev/null
chown -R cockpit-agent:cockpit-agent /srv/origin.git /opt/app/config
systemd-run --unit=fake-engine --quiet python3 /root/fake_engine.py
for i in \$(seq 50); do [ -S /run/docker.sock ] && break; sleep 0.1; done" || { fail "setup: agent.env, repositories, fake engine"; exit 1; }

# A config repository pulled over ssh with a deploy key, the usual case on a fleet: an sshd in
# the container on a free port, a git-shell account holding the origin, the agent's key and
# known_hosts in its HOME (the state directory), the work tree added to ReadWritePaths=.
in_ct "set -e
id gitsrv >/dev/null 2>&1 || useradd --create-home --shell /usr/bin/git-shell gitsrv
usermod -p '*' gitsrv  # no password, but not locked: sshd without PAM refuses a locked account
rm -rf /home/gitsrv/origin.git /root/sshwork /opt/app/ssh-config
git init -q --bare -b main /home/gitsrv/origin.git
git clone -q /home/gitsrv/origin.git /root/sshwork 2>/dev/null
cd /root/sshwork && git -c user.name=op -c user.email=op@e2e commit -q --allow-empty -m first && git push -q origin main
chown -R gitsrv:gitsrv /home/gitsrv/origin.git
ssh-keygen -A >/dev/null
printf 'Port $SSH_PORT\nListenAddress 127.0.0.1\nPasswordAuthentication no\nKbdInteractiveAuthentication no\nUsePAM no\n' > /root/sshd_config
mkdir -p /run/sshd
systemd-run --unit=e2e-sshd --quiet /usr/sbin/sshd -D -f /root/sshd_config
install -d -o cockpit-agent -g cockpit-agent -m 0700 /var/lib/cockpit-agent/.ssh
setpriv --reuid=cockpit-agent --regid=cockpit-agent --init-groups ssh-keygen -q -t ed25519 -N '' -f /var/lib/cockpit-agent/.ssh/id_ed25519
install -d -o gitsrv -g gitsrv -m 0700 /home/gitsrv/.ssh
install -o gitsrv -g gitsrv -m 0600 /var/lib/cockpit-agent/.ssh/id_ed25519.pub /home/gitsrv/.ssh/authorized_keys
for i in \$(seq 50); do ssh-keyscan -p $SSH_PORT 127.0.0.1 > /root/known_hosts 2>/dev/null && [ -s /root/known_hosts ] && break; sleep 0.1; done
install -o cockpit-agent -g cockpit-agent -m 0600 /root/known_hosts /var/lib/cockpit-agent/.ssh/known_hosts
git clone -q /home/gitsrv/origin.git /opt/app/ssh-config 2>/dev/null
git -C /opt/app/ssh-config remote set-url origin ssh://gitsrv@127.0.0.1:$SSH_PORT/home/gitsrv/origin.git
chown -R cockpit-agent:cockpit-agent /opt/app/ssh-config
mkdir -p /etc/systemd/system/cockpit-agent.service.d
printf '[Service]\nReadWritePaths=/opt/app/ssh-config\n' > /etc/systemd/system/cockpit-agent.service.d/repos.conf
systemctl daemon-reload" || { fail "setup: sshd, deploy key, ssh repository"; exit 1; }

# docs/OPERATIONS.md's custom command, as written there: the systemctl_restart example in
# handlers.d, a unit to restart, and the polkit rule that lets the agent's user restart it.
in_ct "set -e
install -o root -g root -m 0644 /opt/cockpit-agent/handlers/examples/systemctl_restart.py /etc/cockpit-agent/handlers.d/
printf '%s\n' HANDLERS_DIR=/etc/cockpit-agent/handlers.d SYSTEMCTL_UNITS=demo.service >> /etc/cockpit-agent/agent.env
printf '[Service]\nExecStart=/bin/sleep infinity\n' > /etc/systemd/system/demo.service
cat > /etc/polkit-1/rules.d/50-cockpit-agent.rules <<'RULE'
polkit.addRule(function(action, subject) {
    if (action.id == \"org.freedesktop.systemd1.manage-units\" && subject.user == \"cockpit-agent\" &&
        action.lookup(\"unit\") == \"demo.service\" && action.lookup(\"verb\") == \"restart\") {
        return polkit.Result.YES;
    }
});
RULE
systemctl daemon-reload && systemctl start demo.service" || { fail "setup: custom command, polkit rule, demo unit"; exit 1; }

check "sudo cockpit-agent check (as root, right after install)" \
    in_ct 'cockpit-agent check > /root/check.out 2>&1 || { cat /root/check.out; exit 1; }'

# -- start, and the backend's commands ----------------------------------------------------------

in_ct 'systemctl start cockpit-agent' || true
check "systemctl start: Type=notify, active, STATUS online" in_ct '[ "$(systemctl show -p Type --value cockpit-agent)" = notify ] &&
    for i in $(seq 50); do
    systemctl show -p StatusText --value cockpit-agent | grep -q "^online" && exit 0; sleep 0.2; done; exit 1'
check "registry agents:$AGENT_ID says online" test "$(rcli hget "agents:$AGENT_ID" status)" = online
send() { in_ct "cockpit-agent send $1 --timeout 20"; }
# Does the answer to `send $1` contain $2? (Not `send | grep -q`: with pipefail, grep's early
# exit can fail the pipeline through SIGPIPE.) Prints the answer when it does not.
answer_has() {
    local out
    out=$(send "$1" 2>&1 || true)
    grep -qF -- "$2" <<<"$out" || { echo "$out" | head -n 20; return 1; }
}
t_echo() { answer_has 'echo message=hi' '"output": "hi"'; }
t_git_pull() {
    in_ct 'cd /root/work && echo v2 > settings.conf && git add settings.conf &&
        git -c user.name=op -c user.email=op@e2e commit -qm second && git push -q origin main' &&
    answer_has git_pull '"status": "success"' &&
    test "$(in_ct 'cat /opt/app/config/settings.conf')" = v2
}
t_hostile() { answer_has 'git_pull "branch=main; rm -rf /"' 'not an allowed branch name'; }
t_docker() {
    answer_has docker_restart '"output": "grafana"' &&
    in_ct 'grep -q "POST /v[0-9.]*/containers/grafana/restart" /root/engine.log'
}
t_custom() {
    local before after
    before=$(in_ct 'systemctl show -p MainPID --value demo.service')
    answer_has 'systemctl_restart unit=demo.service' '"status": "success"' &&
    after=$(in_ct 'systemctl show -p MainPID --value demo.service') &&
    [ "$after" != "$before" ] && [ "$after" != 0 ]
}
t_custom_refused() {
    answer_has 'systemctl_restart unit=ssh.service' "unit 'ssh.service' is not whitelisted; allowed: demo.service"
}
t_priorities() {  # journald gets each line's priority: warnings alone with -p warning
    in_ct 'journalctl -b -u cockpit-agent -p warning --no-pager | grep -q "not an allowed branch name" &&
           ! journalctl -b -u cockpit-agent -p warning --no-pager | grep -q "subscribed to"'
}
t_git_ssh() {
    in_ct 'cd /root/sshwork && echo over-ssh > via.txt && git add via.txt &&
        git -c user.name=op -c user.email=op@e2e commit -qm ssh && git push -q origin main &&
        chown -R gitsrv:gitsrv /home/gitsrv/origin.git' &&
    answer_has 'git_pull repository_path=/opt/app/ssh-config' '"status": "success"' &&
    test "$(in_ct 'cat /opt/app/ssh-config/via.txt')" = over-ssh
}
check "echo" t_echo
check "git_pull under ProtectSystem=strict brings the new commit" t_git_pull
check "a hostile branch is refused" t_hostile
check "git_pull over ssh: deploy key and known_hosts in the agent's HOME, under the sandbox" t_git_ssh
t_metrics() {  # the Prometheus endpoint, from the sandbox (AF_INET, no capabilities)
    python3 - "$METRICS_PORT" <<'PY'
import sys, urllib.request
opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # not through a host proxy
text = opener.open(f"http://127.0.0.1:{sys.argv[1]}/metrics", timeout=5).read().decode()
sys.exit(0 if "cockpit_agent_" in text and 'command="echo"' in text else 1)
PY
}
check "metrics: /metrics answers from inside the sandbox and counts the echo" t_metrics
check "journald: priorities (journalctl -p warning shows the refusal, not the INFO lines)" t_priorities
check "custom command from handlers.d: systemctl_restart of demo.service through polkit" t_custom
check "custom command: a unit outside SYSTEMCTL_UNITS is refused" t_custom_refused
if in_ct 'command -v docker >/dev/null'; then
    check "docker_restart: the real docker CLI, under the system call filter, reaches the engine" t_docker
else
    echo "note  docker_restart not run: no docker CLI on this host to copy in"
fi

# -- failures -------------------------------------------------------------------------------------

in_ct 'systemctl kill -s KILL cockpit-agent' || true
check "killed with SIGKILL: systemd restarts it (Restart=on-failure) and it answers" in_ct 'for i in $(seq 100); do
    [ "$(systemctl show -p NRestarts --value cockpit-agent)" = 1 ] &&
    systemctl show -p StatusText --value cockpit-agent | grep -q "^online" && exit 0; sleep 0.2; done; exit 1'
t_again() { answer_has 'echo message=again' '"output": "again"'; }
check "echo after the restart" t_again

t_watchdog() {  # WatchdogSec=3: pings keep a healthy agent alive; a frozen one is killed and restarted
    local restarts pid result=0
    in_ct 'printf "[Service]\nWatchdogSec=3\n" > /etc/systemd/system/cockpit-agent.service.d/watchdog.conf &&
        systemctl daemon-reload && systemctl restart cockpit-agent' || result=1
    restarts=$(in_ct 'systemctl show -p NRestarts --value cockpit-agent')
    if [ $result = 0 ]; then
        sleep 7  # more than two watchdog periods: a missing ping would have killed it by now
        in_ct "[ \"\$(systemctl show -p NRestarts --value cockpit-agent)\" = $restarts ] &&
               systemctl is-active -q cockpit-agent" || { echo "      restarted while healthy"; result=1; }
    fi
    if [ $result = 0 ]; then
        pid=$(in_ct 'systemctl show -p MainPID --value cockpit-agent')
        in_ct "kill -STOP $pid"
        in_ct "for i in \$(seq 100); do [ \"\$(systemctl show -p NRestarts --value cockpit-agent)\" -gt $restarts ] && exit 0; sleep 0.2; done; exit 1" &&
        in_ct 'journalctl -b -u cockpit-agent --no-pager | grep -q "Watchdog timeout"' || result=1
        in_ct "kill -CONT $pid 2>/dev/null" || true
    fi
    # Whatever happened: the normal unit again, running, for the checks that follow.
    in_ct 'rm -f /etc/systemd/system/cockpit-agent.service.d/watchdog.conf && systemctl daemon-reload &&
        systemctl restart cockpit-agent && for i in $(seq 50); do
        systemctl show -p StatusText --value cockpit-agent | grep -q "^online" && exit 0; sleep 0.2; done; exit 1' || result=1
    return $result
}
check "watchdog: a healthy agent keeps pinging; a frozen one (SIGSTOP) is killed and restarted" t_watchdog

in_ct 'cp -p /etc/cockpit-agent/agent.env /root/agent.env.good && echo REDIS_PORT=sixty >> /etc/cockpit-agent/agent.env' || true
in_ct 'systemctl restart cockpit-agent' >/dev/null 2>&1 || true
RESTARTS=$(in_ct 'systemctl show -p NRestarts --value cockpit-agent')
sleep 6  # RestartSec=5: a restart, had there been one, would have happened by now
check "a bad setting: exit 78, one line naming it, not restarted" in_ct "
    [ \"\$(systemctl show -p NRestarts --value cockpit-agent)\" = $RESTARTS ] &&"'
    [ "$(systemctl show -p ExecMainStatus --value cockpit-agent)" = 78 ] &&
    [ "$(systemctl show -p ActiveState --value cockpit-agent)" = failed ] &&
    journalctl -b -u cockpit-agent --no-pager | grep -q "configuration error: REDIS_PORT: expected a whole number"'
in_ct 'cp -p /root/agent.env.good /etc/cockpit-agent/agent.env && systemctl reset-failed cockpit-agent && systemctl start cockpit-agent' ||
    fail "start again with the good settings"

# -- a stop with a command running ---------------------------------------------------------------

in_ct 'for i in $(seq 50); do systemctl show -p StatusText --value cockpit-agent | grep -q "^online" && break; sleep 0.2; done
    (cockpit-agent send docker_restart container_name=slow --timeout 30 > /root/slow.json 2>&1 &)
    for i in $(seq 50); do grep -q "containers/slow" /root/engine.log 2>/dev/null && break; sleep 0.1; done'
STOPS=$(in_ct 'journalctl -b -u cockpit-agent --no-pager | grep -c "stopped;"' || true)
start=$(date +%s)
in_ct 'systemctl stop cockpit-agent' || true
took=$(( $(date +%s) - start ))
sleep 1
check "systemctl stop lets the running docker_restart finish and answer (stop took ${took} s)" \
    in_ct 'grep -q "\"output\": \"slow\"" /root/slow.json'
check "after the stop: registry offline" test "$(rcli hget "agents:$AGENT_ID" status)" = offline
# outbox.db.lock stays: the lock (flock) ends with the process, and a lock file removed at exit
# could be removed under a second agent that had just opened it.
check "after the stop: the state directory holds outbox.db and its lock file alone (no -wal, no -shm)" \
    in_ct 'test "$(ls /var/lib/cockpit-agent | xargs)" = "outbox.db outbox.db.lock"'
check "after the stop: its last line reports nothing left behind" in_ct "
    for i in \$(seq 50); do [ \"\$(journalctl -b -u cockpit-agent --no-pager | grep -c 'stopped;')\" -gt ${STOPS:-0} ] && break; sleep 0.1; done
    journalctl -b -u cockpit-agent --no-pager | grep 'stopped;' | tail -n 1 | grep -q '0 queued commands and 0 unsent messages'"
check "systemd-analyze security rates the unit at most 2.5" in_ct '
    score=$(systemd-analyze security cockpit-agent --no-pager | sed -n "s/.*Overall exposure level for cockpit-agent.service: \([0-9.]*\).*/\1/p")
    echo "      exposure $score"; awk -v s="$score" "BEGIN { exit !(s != \"\" && s <= 2.5) }"'

t_credential() {  # the password as a systemd credential (SECURITY.md), out of agent.env
    in_ct "set -e
    sed -i '/^REDIS_PASSWORD=/d' /etc/cockpit-agent/agent.env
    printf %s '$PASSWORD' > /etc/cockpit-agent/redis_password && chmod 0600 /etc/cockpit-agent/redis_password
    mkdir -p /etc/systemd/system/cockpit-agent.service.d
    printf '[Service]\nLoadCredential=redis_password:/etc/cockpit-agent/redis_password\n' \
        > /etc/systemd/system/cockpit-agent.service.d/credential.conf
    systemctl daemon-reload && systemctl start cockpit-agent
    for i in \$(seq 50); do systemctl show -p StatusText --value cockpit-agent | grep -q '^online' && break; sleep 0.2; done" &&
    answer_has 'echo message=credential' '"output": "credential"'
    local result=$?
    in_ct 'systemctl stop cockpit-agent' || true
    return $result
}
check "REDIS_PASSWORD as a systemd credential: the service and sudo cockpit-agent send both use it" t_credential

t_left_out() {  # a repository listed in GIT_REPO_PATH but not in the unit's ReadWritePaths=
    local out
    in_ct "set -e
    rm -rf /opt/app/third && git clone -q /srv/origin.git /opt/app/third 2>/dev/null
    chown -R cockpit-agent:cockpit-agent /opt/app/third
    cp -p /etc/cockpit-agent/agent.env /root/agent.env.before-third
    sed -i 's#^GIT_REPO_PATH=.*#&,/opt/app/third#' /etc/cockpit-agent/agent.env
    systemctl restart cockpit-agent" || return 1
    in_ct 'for i in $(seq 50); do journalctl -b -u cockpit-agent --no-pager |
        grep -q "repository /opt/app/third is not writable here (read-only file system)" && exit 0; sleep 0.2; done
        exit 1' || { echo "      no warning at start"; return 1; }
    out=$(in_ct 'cockpit-agent check' 2>&1 || true)
    in_ct 'systemctl stop cockpit-agent; cp -p /root/agent.env.before-third /etc/cockpit-agent/agent.env' || true
    grep -qF "FAIL  repository /opt/app/third: git work tree, but the unit cockpit-agent.service does not" <<<"$out" &&
    grep -qF "ok    repository /opt/app/config: git work tree" <<<"$out" || { echo "$out"; return 1; }
}
check "a repository outside ReadWritePaths=: a warning at start, and a FAIL line from check" t_left_out

t_purge() {
    in_ct 'cd /root/cockpit-agent && make uninstall PURGE=1 >/dev/null' &&
    in_ct '! systemctl cat cockpit-agent >/dev/null 2>&1 && ! getent passwd cockpit-agent >/dev/null &&
           ! test -e /var/lib/cockpit-agent && ! test -e /etc/cockpit-agent && ! test -e /opt/cockpit-agent'
}
check "make uninstall PURGE=1: unit, user, state, settings and app gone" t_purge

if [ "$FAILED" -gt 0 ]; then
    echo "systemd-e2e: $FAILED check(s) failed" >&2
    exit 1
fi
echo "systemd-e2e: all checks passed"
