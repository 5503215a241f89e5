"""``make install`` / ``make uninstall`` staged under DESTDIR, .env.example, and the hardened unit
(including ``systemd-analyze security --offline=true``)."""

from __future__ import annotations

import os
import re
import shutil
import stat
import subprocess
import sys

import pytest

from conftest import ROOT

UNIT = ROOT / "systemd" / "cockpit-agent.service"
APP, CONF, STATE = "opt/cockpit-agent", "etc/cockpit-agent", "var/lib/cockpit-agent"
MANPAGE = "usr/local/share/man/man8/cockpit-agent.8"


def make(target: str, destdir, **variables: str) -> subprocess.CompletedProcess:
    args = ["make", "--no-print-directory", "-C", str(ROOT), target, f"DESTDIR={destdir}",
            *(f"{k}={v}" for k, v in variables.items())]
    result = subprocess.run(args, capture_output=True, text=True, timeout=240, stdin=subprocess.DEVNULL)
    assert result.returncode == 0, result.stdout + result.stderr
    return result


def mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def test_staged_install_lays_out_the_tree_and_is_idempotent(tmp_path):
    dest = tmp_path / "stage"
    first = make("install", dest, INSTALL_VENV="0")
    assert "Next steps:" in first.stdout and "journalctl -u cockpit-agent -f" in first.stdout
    assert "wrote" in first.stdout and "agent.env from .env.example" in first.stdout

    app = dest / APP
    for name in ("agent.py", "cli/__init__.py", "cli/check.py", "config.py", "protocol.py", "sealed.py", "errors.py", "runtime/listener.py",
                 "runtime/flusher.py", "service/notify.py", "service/metrics.py", "service/logs.py", "handlers/__init__.py", "handlers/loader.py", "outbox/schema.sql",
                 "handlers/examples/systemctl_restart.py", "docs/OPERATIONS.md", "requirements.txt", ".env.example"):
        assert (app / name).is_file(), name
    assert not (app / "tests").exists() and not (app / ".venv").exists()
    # Compiled at install (the unit runs read-only with PYTHONDONTWRITEBYTECODE=1), not copied.
    assert list((app / "__pycache__").glob("agent.cpython-*.pyc"))
    assert list((app / "outbox" / "__pycache__").glob("store.cpython-*.pyc"))
    assert list((app / "runtime" / "__pycache__").glob("intake.cpython-*.pyc"))
    unit = dest / "etc/systemd/system/cockpit-agent.service"
    assert unit.read_text() == UNIT.read_text() and mode(unit) == 0o644
    env_file = dest / CONF / "agent.env"
    assert env_file.read_text() == (ROOT / ".env.example").read_text() and mode(env_file) == 0o600
    assert os.readlink(app / ".env") == "/etc/cockpit-agent/agent.env"
    assert mode(dest / CONF) == 0o750 and mode(dest / CONF / "handlers.d") == 0o755
    assert mode(dest / STATE) == 0o700
    wrapper = dest / "usr/local/bin/cockpit-agent"
    assert mode(wrapper) == 0o755
    assert "exec /opt/cockpit-agent/venv/bin/python /opt/cockpit-agent/agent.py" in wrapper.read_text()
    assert "COCKPIT_AGENT_ENV_FILE:=/etc/cockpit-agent/agent.env" in wrapper.read_text()
    manpage = dest / MANPAGE
    assert manpage.read_text() == (ROOT / "docs" / "cockpit-agent.8").read_text() and mode(manpage) == 0o644
    assert "installed the manual page" in first.stdout and "man 8 cockpit-agent" in first.stdout

    # The staged copy is a complete app: it imports and parses its command line on its own.
    result = subprocess.run([sys.executable, str(app / "agent.py"), "check", "--help"], cwd=tmp_path,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0 and "exit codes:" in result.stdout, result.stderr

    # The operator's settings survive a second run untouched, and the run succeeds.
    env_file.write_text("REDIS_PASSWORD=operator-choice\n")
    env_file.chmod(0o640)
    (app / "stale_module.py").write_text("# removed upstream\n")
    second = make("install", dest, INSTALL_VENV="0")
    assert "kept the existing" in second.stdout
    assert env_file.read_text() == "REDIS_PASSWORD=operator-choice\n" and mode(env_file) == 0o640
    assert not (app / "stale_module.py").exists()
    assert unit.read_text() == UNIT.read_text()


def test_staged_install_builds_the_venv_from_the_pinned_requirements(tmp_path):
    dest = tmp_path / "stage"
    make("install", dest)
    python = dest / APP / "venv" / "bin" / "python"
    result = subprocess.run([str(python), "-c", "import redis, environs, sqlite_utils, prometheus_client"],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    result = subprocess.run([str(python), str(dest / APP / "agent.py"), "--version"],
                            capture_output=True, text=True, timeout=60)
    assert result.stdout.strip().startswith("cockpit-agent ")
    # As the unit starts it: -m from the application directory, no bytecode written.
    app = dest / APP
    before = sorted(app.rglob("*.pyc"))
    result = subprocess.run([str(python), "-m", "agent", "--version"], cwd=app, capture_output=True, text=True,
                            timeout=60, env={"PATH": os.environ["PATH"], "PYTHONDONTWRITEBYTECODE": "1"})
    assert result.returncode == 0 and result.stdout.strip().startswith("cockpit-agent "), result.stderr
    assert sorted(app.rglob("*.pyc")) == before
    freeze = subprocess.run([str(python), "-m", "pip", "freeze"], capture_output=True, text=True, timeout=60).stdout
    for line in (ROOT / "requirements.txt").read_text().splitlines():
        if line and not line.startswith("#"):
            assert line.lower().replace("_", "-") in freeze.lower().replace("_", "-"), line
    again = make("install", dest)  # unchanged requirements: nothing to install
    assert "venv is up to date with requirements.txt" in again.stdout


def test_uninstall_keeps_state_and_settings_unless_purge(tmp_path):
    dest = tmp_path / "stage"
    make("install", dest, INSTALL_VENV="0")
    (dest / STATE / "outbox.db").write_text("pretend")
    make("uninstall", dest)
    assert not (dest / APP).exists()
    assert not (dest / "etc/systemd/system/cockpit-agent.service").exists()
    assert not (dest / "usr/local/bin/cockpit-agent").exists()
    assert not (dest / MANPAGE).exists()
    assert (dest / STATE / "outbox.db").exists() and (dest / CONF / "agent.env").exists()
    make("uninstall", dest, PURGE="1")
    assert not (dest / STATE).exists() and not (dest / CONF).exists()


def test_env_example_documents_every_variable_the_agent_reads():
    documented = set(re.findall(r"^#?([A-Z][A-Z0-9_]+)=", (ROOT / ".env.example").read_text(), re.M))
    read = set()
    for source in [ROOT / "config.py", ROOT / "handlers" / "examples" / "systemctl_restart.py"]:
        read |= set(re.findall(r"""(?:r\.\w+|environ\.get|getenv|setenv)\(\s*["']([A-Z][A-Z0-9_]+)["']""",
                               source.read_text()))
    read -= {"SYSTEMCTL_UNITS", "SYSTEMCTL_BIN", "SYSTEMCTL_TIMEOUT"}  # documented in the example itself
    read.remove("COCKPIT_AGENT_ENV_FILE")  # names the file itself: explained in its header
    read.discard("CREDENTIALS_DIRECTORY")  # set by systemd for LoadCredential=, never by an operator
    read |= {"REDIS_PASSWORD_FILE", "COCKPIT_SHARED_SECRET_FILE"}  # read as f"{name}_FILE"
    assert "COCKPIT_AGENT_ENV_FILE" in (ROOT / ".env.example").read_text()
    assert len(read) > 30
    assert read <= documented, sorted(read - documented)
    protocol_vars = {"REDIS_HOST", "REDIS_PORT", "REDIS_PASSWORD", "REDIS_DB", "AGENT_HOSTNAME", "GIT_REPO_PATH",
                     "DOCKER_CONTAINER_NAME", "HEARTBEAT_INTERVAL", "COMMAND_TIMEOUT", "DOCKER_TIMEOUT", "AGENT_ID",
                     "LOGLEVEL", "LOG_LEVEL", "REDIS_URL", "REDIS_USERNAME", "REDIS_SSL", "REDIS_TLS_VERIFY",
                     "REDIS_TLS_CA_CERT", "REDIS_TLS_CERT", "REDIS_TLS_KEY", "COCKPIT_SHARED_SECRET", "OUTBOX_DB",
                     "WORKER_COUNT", "RESPONSE_RETRY_SECONDS", "RESULT_TTL", "GIT_BIN", "DOCKER_BIN"}
    assert protocol_vars <= documented, sorted(protocol_vars - documented)


# -- the unit -----------------------------------------------------------------------------------


def unit_settings() -> dict[str, list[str]]:
    settings: dict[str, list[str]] = {}
    for line in UNIT.read_text().splitlines():
        line = line.strip()
        if line and not line.startswith(("#", "[")):
            key, value = line.split("=", 1)
            settings.setdefault(key, []).append(value)
    return settings


def test_unit_is_notify_with_watchdog_restart_and_stop_timeout():
    from config import Config

    unit = unit_settings()
    assert unit["Type"] == ["notify"] and unit["NotifyAccess"] == ["main"]
    assert int(unit["WatchdogSec"][0]) >= 30
    assert unit["Restart"] == ["on-failure"] and unit["RestartPreventExitStatus"] == ["78"]
    assert unit["KillMode"] == ["mixed"]  # SIGTERM to the agent; running commands get their grace period
    # Longer than the grace period plus the final flush (5 s) and the thread joins (3 x 5 s).
    assert int(unit["TimeoutStopSec"][0]) > Config(agent_id="x").shutdown_grace + 20
    assert unit["ExecStart"] == ["/opt/cockpit-agent/venv/bin/python -m agent run"]
    assert unit["Environment"][0] == "COCKPIT_AGENT_ENV_FILE=/etc/cockpit-agent/agent.env"


def test_unit_hardening_settings():
    from config import Config

    unit = unit_settings()
    expected = {
        "User": "cockpit-agent", "NoNewPrivileges": "yes", "ProtectSystem": "strict", "ProtectHome": "yes",
        "PrivateTmp": "yes", "ProtectKernelTunables": "yes", "ProtectKernelModules": "yes",
        "ProtectKernelLogs": "yes", "CapabilityBoundingSet": "", "UMask": "0077",
        "StateDirectory": "cockpit-agent",
    }
    for key, value in expected.items():
        assert unit[key] == [value], key
    assert "@system-service" in unit["SystemCallFilter"]
    assert set(unit["RestrictAddressFamilies"][0].split()) == {"AF_UNIX", "AF_INET", "AF_INET6"}
    defaults = Config(agent_id="x")
    assert os.path.dirname(defaults.outbox_db) == "/var/lib/" + unit["StateDirectory"][0]
    assert f"-{defaults.git_repo_paths[0]}" in unit["ReadWritePaths"]


@pytest.fixture(scope="module")
def systemd_analyze():
    """systemd-analyze, installed with the systemd package when it is missing (as `make test` does)."""
    path = shutil.which("systemd-analyze")
    if path is None:
        subprocess.run(["make", "-C", str(ROOT), "tools"], check=True, timeout=600,
                       capture_output=True)
        path = shutil.which("systemd-analyze")
    assert path, "systemd-analyze is missing and could not be installed (apt-get install systemd)"
    return path


def test_unit_exposure_score_is_at_most_2_5(systemd_analyze, tmp_path):
    unit = tmp_path / "cockpit-agent.service"
    shutil.copy(UNIT, unit)
    result = subprocess.run([systemd_analyze, "security", "--offline=true", "--no-pager", str(unit)],
                            capture_output=True, text=True, timeout=120)
    match = re.search(r"Overall exposure level for cockpit-agent\.service: (\d+\.\d+)", result.stdout)
    assert match, result.stdout[-2000:] + result.stderr
    score = float(match.group(1))
    print(f"systemd-analyze security exposure: {score}")
    assert score <= 2.5, result.stdout


# -- the live (root) path, on a stand-in for a fresh host -----------------------------------------

# Runs inside a private mount namespace (unshare -m): /etc is a copy, /opt, /var/lib, /run,
# /usr/local/bin and /usr/local/share are empty tmpfs, so useradd, chown and the unit land there and vanish with the
# namespace; the real host is never touched. systemctl is a stand-in on PATH (no systemd runs
# here) that records its arguments; /run/systemd/system makes install.sh believe systemd runs.
LIVE_INSTALL = r"""
set -eu
mount --make-rprivate /
cp -a /etc "$WORK/etc"
mount --bind "$WORK/etc" /etc
for dir in /opt /var/lib /run /usr/local/bin /usr/local/share; do mount -t tmpfs tmpfs "$dir"; done
mkdir -p /run/systemd/system
groupadd --system docker
export PATH="$WORK/fakebin:$PATH"
cd "$SRC"
make --no-print-directory install INSTALL_VENV=0 > "$WORK/first.out"
echo 'REDIS_PASSWORD=set-by-the-operator' >> /etc/cockpit-agent/agent.env
make --no-print-directory install INSTALL_VENV=0 > "$WORK/second.out"
echo "user: $(id -nG cockpit-agent)"
echo "shell: $(getent passwd cockpit-agent | cut -d: -f6,7)"
for path in /etc/cockpit-agent /etc/cockpit-agent/agent.env /etc/cockpit-agent/handlers.d \
            /var/lib/cockpit-agent /opt/cockpit-agent/agent.py /etc/systemd/system/cockpit-agent.service \
            /usr/local/bin/cockpit-agent /usr/local/share/man/man8/cockpit-agent.8; do
    echo "stat: $path $(stat -c '%U:%G %a' "$path")"
done
echo "env: $(tail -n 1 /etc/cockpit-agent/agent.env)"
# The operator command run by root: a stand-in for the venv's python says who runs it, and how.
mkdir -p /opt/cockpit-agent/venv/bin
cat > /opt/cockpit-agent/venv/bin/python <<'PY'
#!/bin/sh
printf 'as %s in %s home=%s env=%s creds=%s args=' "$(id -un)" "$(id -Gn)" "$HOME" "$COCKPIT_AGENT_ENV_FILE" \
    "${CREDENTIALS_DIRECTORY:-none}"
printf '[%s]' "$@"
echo
PY
chmod 0755 /opt/cockpit-agent/venv/bin/python
echo "root runs: $(/usr/local/bin/cockpit-agent check 'two words')"
mkdir -p /run/credentials/cockpit-agent.service  # what systemd makes for LoadCredential= while the unit runs
echo "with credentials: $(/usr/local/bin/cockpit-agent status)"
make --no-print-directory uninstall PURGE=1 > "$WORK/purge.out"
echo "after purge: $(getent passwd cockpit-agent || echo no user) $(ls /opt /etc/systemd/system /usr/local/share/man/man8 | grep -c cockpit || true)"
"""


def test_live_install_as_root_on_a_private_stand_in_host(tmp_path):
    assert os.geteuid() == 0 and shutil.which("unshare"), "the live install path is tested as root with unshare"
    fakebin = tmp_path / "fakebin"
    fakebin.mkdir()
    calls = tmp_path / "systemctl-calls"
    (fakebin / "systemctl").write_text(f"#!/bin/sh\necho \"$*\" >> {calls}\n")
    (fakebin / "systemctl").chmod(0o755)
    result = subprocess.run(["unshare", "--mount", "--propagation", "private", "sh", "-c", LIVE_INSTALL],
                            env={**os.environ, "WORK": str(tmp_path), "SRC": str(ROOT)},
                            capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL)
    assert result.returncode == 0, result.stdout + result.stderr
    facts = result.stdout
    first = (tmp_path / "first.out").read_text()
    assert "created system user cockpit-agent" in first
    assert "cockpit-agent is in the docker group" in first
    assert "systemd reloaded; cockpit-agent.service enabled" in first
    assert "user cockpit-agent exists" in (tmp_path / "second.out").read_text()
    assert "kept the existing /etc/cockpit-agent/agent.env" in (tmp_path / "second.out").read_text()
    assert set(re.search(r"user: (.*)", facts).group(1).split()) == {"cockpit-agent", "docker"}
    assert "shell: /var/lib/cockpit-agent:/usr/sbin/nologin" in facts
    assert "stat: /etc/cockpit-agent root:cockpit-agent 750" in facts
    assert "stat: /etc/cockpit-agent/agent.env cockpit-agent:cockpit-agent 600" in facts
    assert "stat: /etc/cockpit-agent/handlers.d root:root 755" in facts
    assert "stat: /var/lib/cockpit-agent cockpit-agent:cockpit-agent 700" in facts
    assert "stat: /opt/cockpit-agent/agent.py root:root 644" in facts
    assert "stat: /etc/systemd/system/cockpit-agent.service root:root 644" in facts
    assert "stat: /usr/local/bin/cockpit-agent root:root 755" in facts
    assert "stat: /usr/local/share/man/man8/cockpit-agent.8 root:root 644" in facts
    assert "env: REDIS_PASSWORD=set-by-the-operator" in facts
    # `sudo cockpit-agent check` runs as the service would: its user and groups, its HOME. As
    # root it refused the settings file, which the agent's user owns (found under a real systemd).
    ran = re.search(r"root runs: as (\S+) in (.*) home=(\S+) env=(\S+) creds=none args=(.*)", facts)
    assert ran, facts
    assert ran.group(1) == "cockpit-agent" and set(ran.group(2).split()) == {"cockpit-agent", "docker"}
    assert ran.group(3) == "/var/lib/cockpit-agent" and ran.group(4) == "/etc/cockpit-agent/agent.env"
    assert ran.group(5) == "[/opt/cockpit-agent/agent.py][check][two words]"  # one argument each
    # A password given to the service with LoadCredential= is found by the command too.
    assert "creds=/run/credentials/cockpit-agent.service args=[/opt/cockpit-agent/agent.py][status]" in facts
    assert "after purge: no user 0" in facts
    assert calls.read_text().splitlines() == [
        "daemon-reload", "enable cockpit-agent.service",
        "daemon-reload", "enable cockpit-agent.service",
        "disable --now cockpit-agent.service", "daemon-reload",
    ]
    assert subprocess.run(["getent", "passwd", "cockpit-agent"], capture_output=True).returncode != 0  # host untouched
