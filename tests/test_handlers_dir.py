"""HANDLERS_DIR: which modules load (root's, not group/other-writable, no symlinks, unique names),
and the shipped example ``systemctl_restart`` end to end with a systemctl stand-in."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap

import pytest

from config import Config
from conftest import ROOT
from errors import ConfigError, NotAllowed, ValidationError
from handlers import REGISTRY
from handlers.loader import registry_with_dir

NOBODY = 65534

HELLO = textwrap.dedent('''
    from handlers.base import Action, Handler, string_param

    def prepare(params, config):
        return Action(output="hello " + string_param(params, "name", "world"))

    HANDLERS = [Handler("hello", prepare, ("name",), "say hello")]
''')


@pytest.fixture
def handlers_dir(tmp_path):
    """A root-owned 0755 directory, like /etc/cockpit-agent/handlers.d."""
    assert os.geteuid() == 0, "the loading rules are about root ownership; the suite runs as root"
    directory = tmp_path / "handlers.d"
    directory.mkdir(mode=0o755)
    directory.chmod(0o755)
    return directory


def write(directory, name: str, text: str, mode: int = 0o644):
    path = directory / name
    path.write_text(text)
    path.chmod(mode)
    return path


CONFIG = Config(agent_id="t")


def test_a_root_owned_module_adds_its_command(handlers_dir):
    write(handlers_dir, "hello.py", HELLO)
    write(handlers_dir, "notes.txt", "not a module: ignored")
    registry = registry_with_dir(REGISTRY, str(handlers_dir))
    assert "hello" in registry.names() and "echo" in registry.names()
    assert registry.prepare("hello", {"name": "ops"}, CONFIG).output == "hello ops"
    assert "hello" not in REGISTRY.names()  # the built-in registry is left alone


def test_no_handlers_dir_is_the_built_in_registry():
    assert registry_with_dir(REGISTRY, None) is REGISTRY


@pytest.mark.parametrize("mode", [0o664, 0o646], ids=["group-writable", "other-writable"])
def test_a_writable_module_is_refused(handlers_dir, mode):
    path = write(handlers_dir, "hello.py", HELLO, mode)
    with pytest.raises(ConfigError, match=rf"{path} is writable by group or others .*chmod go-w"):
        registry_with_dir(REGISTRY, str(handlers_dir))


def test_a_writable_directory_is_refused(handlers_dir):
    write(handlers_dir, "hello.py", HELLO)
    handlers_dir.chmod(0o777)
    with pytest.raises(ConfigError, match="writable by group or others"):
        registry_with_dir(REGISTRY, str(handlers_dir))


def test_a_symlinked_module_is_refused(handlers_dir, tmp_path):
    real = write(tmp_path, "real_hello.py", HELLO)
    (handlers_dir / "hello.py").symlink_to(real)
    with pytest.raises(ConfigError, match="is a symlink"):
        registry_with_dir(REGISTRY, str(handlers_dir))


@pytest.mark.parametrize("swap", ["module", "directory"])
def test_a_module_swapped_after_its_check_is_not_loaded(handlers_dir, tmp_path, monkeypatch, swap):
    """What is checked is what is loaded: a module (or the directory) replaced between the
    check and the import must not run, even a root-owned one."""
    import handlers.loader as loader

    ran = tmp_path / "evil-ran"
    evil_dir = tmp_path / "evil.d"
    evil_dir.mkdir(mode=0o755)
    evil = write(evil_dir, "hello.py", f"open({str(ran)!r}, 'w').close()\n" + HELLO)
    write(handlers_dir, "hello.py", HELLO)
    checked = loader.check_safe

    def check_then_swap(path, kind, root_uid=0):
        st = checked(path, kind, root_uid)
        if swap == "module" and kind == "file":
            os.replace(evil, path)
        elif swap == "directory" and kind == "directory":
            os.rename(handlers_dir, f"{handlers_dir}.moved")
            os.symlink(evil_dir, handlers_dir)
        return st

    monkeypatch.setattr(loader, "check_safe", check_then_swap)
    with pytest.raises(ConfigError, match="changed while it was being loaded"):
        registry_with_dir(REGISTRY, str(handlers_dir))
    assert not ran.exists()


def test_a_module_not_owned_by_root_is_refused(handlers_dir):
    path = write(handlers_dir, "hello.py", HELLO)
    os.chown(path, NOBODY, NOBODY)
    with pytest.raises(ConfigError, match=rf"owned by uid {NOBODY}, not root; fix with: chown root:root"):
        registry_with_dir(REGISTRY, str(handlers_dir))


def test_a_directory_not_owned_by_root_is_refused(handlers_dir):
    write(handlers_dir, "hello.py", HELLO)
    os.chown(handlers_dir, NOBODY, NOBODY)
    with pytest.raises(ConfigError, match="not root"):
        registry_with_dir(REGISTRY, str(handlers_dir))


def test_a_handlers_dir_the_agent_may_not_list_is_a_clear_error(handlers_dir):
    """It was a PermissionError traceback (the agent, check and send all load it). The suite
    runs as root, which lists anything; without CAP_DAC_OVERRIDE and CAP_DAC_READ_SEARCH (cut
    from the bounding set by setpriv), a 0311 directory is as unreadable as 0711 is for the
    agent's user."""
    write(handlers_dir, "extra.py", "HANDLERS = []\n")
    handlers_dir.chmod(0o311)
    code = ("from errors import ConfigError\nfrom handlers.loader import load_dir\n"
            f"try:\n    load_dir({str(handlers_dir)!r})\nexcept ConfigError as exc:\n    print(exc)\n")
    result = subprocess.run(["setpriv", "--bounding-set=-dac_override,-dac_read_search", "--",
                             sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith(f"HANDLERS_DIR: cannot list {handlers_dir}: Permission denied"), result.stdout


def test_a_duplicate_name_is_an_error(handlers_dir):
    write(handlers_dir, "a_hello.py", HELLO)
    write(handlers_dir, "b_hello.py", HELLO)
    with pytest.raises(ConfigError, match="'hello' is registered twice"):
        registry_with_dir(REGISTRY, str(handlers_dir))


def test_a_module_cannot_replace_a_built_in(handlers_dir):
    write(handlers_dir, "echo2.py", HELLO.replace('Handler("hello"', 'Handler("echo"'))
    with pytest.raises(ConfigError, match="'echo' is registered twice"):
        registry_with_dir(REGISTRY, str(handlers_dir))


@pytest.mark.parametrize("text, message", [
    ("raise RuntimeError('broken')", "failed to load: RuntimeError: broken"),
    ("X = 1", "declares no HANDLERS"),
    ("HANDLERS = ['echo']", "is not a handlers.base.Handler"),
], ids=["raises", "declares-nothing", "not-a-handler"])
def test_a_bad_module_stops_the_start_with_a_clear_line(handlers_dir, text, message):
    write(handlers_dir, "bad.py", text)
    with pytest.raises(ConfigError, match=message):
        registry_with_dir(REGISTRY, str(handlers_dir))


# -- the shipped example ------------------------------------------------------------------------


def install_example(handlers_dir):
    target = handlers_dir / "systemctl_restart.py"
    shutil.copy(ROOT / "handlers" / "examples" / "systemctl_restart.py", target)
    target.chmod(0o644)


def fake_systemctl(directory):
    """A stand-in for systemctl (no systemd runs here): records its argv, says nothing, exits 0."""
    path = directory / "fake-systemctl"
    calls = directory / "systemctl-calls.jsonl"
    path.write_text(f"#!{sys.executable}\nimport json, sys\n"
                    f"open({str(calls)!r}, 'a').write(json.dumps(sys.argv[1:]) + '\\n')\n")
    path.chmod(0o755)
    return path, calls


def test_example_validates_units(handlers_dir, monkeypatch):
    install_example(handlers_dir)
    monkeypatch.setenv("SYSTEMCTL_UNITS", "nginx.service,app.service")
    monkeypatch.setenv("SYSTEMCTL_BIN", "/usr/local/bin/fake-systemctl")
    monkeypatch.setenv("SYSTEMCTL_TIMEOUT", "15")
    registry = registry_with_dir(REGISTRY, str(handlers_dir))
    action = registry.prepare("systemctl_restart", {"unit": "nginx.service"}, CONFIG)
    assert action.argv == ("/usr/local/bin/fake-systemctl", "restart", "--", "nginx.service")
    assert action.timeout == 15 and action.target == "systemd:nginx.service"
    with pytest.raises(NotAllowed, match="allowed: nginx.service, app.service"):
        registry.prepare("systemctl_restart", {"unit": "sshd.service"}, CONFIG)
    with pytest.raises(ValidationError, match="not a unit name"):
        registry.prepare("systemctl_restart", {"unit": "--force"}, CONFIG)
    with pytest.raises(ValidationError, match="unit is required; allowed: nginx.service, app.service"):
        registry.prepare("systemctl_restart", {"unit": ""}, CONFIG)  # "" is "not given", as for git's params


def test_example_needs_its_whitelist(handlers_dir, monkeypatch):
    install_example(handlers_dir)
    monkeypatch.delenv("SYSTEMCTL_UNITS", raising=False)
    with pytest.raises(ConfigError, match="SYSTEMCTL_UNITS: required"):
        registry_with_dir(REGISTRY, str(handlers_dir))


def test_example_end_to_end_in_a_running_agent(handlers_dir, tmp_path, agent_env, agent_process, make_backend,
                                                redis_server):
    install_example(handlers_dir)
    systemctl, calls = fake_systemctl(tmp_path)
    # The example's settings come from the agent's .env file, as under systemd.
    env_file = tmp_path / "agent.env"
    env_file.write_text(f"SYSTEMCTL_UNITS=nginx.service,app.service\nSYSTEMCTL_BIN={systemctl}\n")
    env_file.chmod(0o600)  # the agent refuses an env file others can read
    env = {**agent_env, "HANDLERS_DIR": str(handlers_dir), "COCKPIT_AGENT_ENV_FILE": str(env_file)}
    agent = agent_process(env).start()
    agent.wait_subscribed(redis_server)
    backend = make_backend(env["AGENT_ID"])

    response = backend.call("systemctl_restart", {"unit": "nginx.service"})
    assert response["status"] == "success" and response["output"] == "nginx.service", response
    assert [json.loads(line) for line in calls.read_text().splitlines()] == [["restart", "--", "nginx.service"]]

    refused = backend.call("systemctl_restart", {"unit": "sshd.service"})
    assert refused["status"] == "error" and "allowed: nginx.service, app.service (SYSTEMCTL_UNITS)" in refused["error"]
    assert len(calls.read_text().splitlines()) == 1  # nothing ran for the refused unit
    capabilities = redis_server.client().hget(f"agents:{env['AGENT_ID']}", "capabilities").decode()
    assert "systemctl_restart" in capabilities.split(",")
    assert agent.terminate() == 0


def test_an_unsafe_handlers_dir_stops_the_agent_with_exit_78(handlers_dir, agent_env, agent_process):
    write(handlers_dir, "hello.py", HELLO, 0o666)
    agent = agent_process({**agent_env, "HANDLERS_DIR": str(handlers_dir)}).start()
    assert agent.proc.wait(30) == 78
    assert "writable by group or others" in agent.log()
