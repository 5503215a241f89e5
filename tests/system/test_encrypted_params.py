"""Encrypted parameters: with a shared secret the backend sends ``password``, ``ansible_password``
and ``ssh_passphrase`` as Fernet tokens; the agent decrypts them after the signature check, only
for the handler, and the plain value reaches the child (on stdin, via the shipped example
``htpasswd_set``) and nothing else: not the log, the SQLite file, a response or a Redis key."""

from __future__ import annotations

import base64
import hashlib
import json
import os
import shutil
import sqlite3
import subprocess
import sys
import uuid

import pytest
from cryptography.fernet import Fernet

import sealed
from conftest import ROOT, SECRET, wait_for
from errors import ValidationError

PLAIN = "pl41n-Htpasswd-value-9d2b"


def backend_encrypt(value: str, secret: str = SECRET) -> str:
    """What the Cockpit backend does to a sealed field before it signs the message."""
    key = base64.urlsafe_b64encode(hashlib.sha256(secret.encode()).digest())
    return Fernet(key).encrypt(value.encode()).decode()


# -- sealed.open_params -------------------------------------------------------------------------


def test_sealed_fields_are_decrypted_in_a_copy():
    received = {"user": "ops", "password": backend_encrypt("p1"), "ansible_password": backend_encrypt("p2"),
                "ssh_passphrase": backend_encrypt("p3"), "other": "kept"}
    as_received = dict(received)
    opened, plain = sealed.open_params(received, SECRET)
    assert opened == {"user": "ops", "password": "p1", "ansible_password": "p2", "ssh_passphrase": "p3",
                      "other": "kept"}
    assert sorted(plain) == ["p1", "p2", "p3"]
    assert received == as_received  # what is stored and audited keeps the tokens


def test_only_top_level_fields_are_decrypted():
    # The backend encrypts top-level params only; a nested "password" is left as it is.
    nested = {"options": {"password": "not-a-token"}}
    assert sealed.open_params(nested, SECRET) == (nested, ())


def test_without_a_secret_sealed_fields_pass_through():
    params = {"password": "plain-as-sent"}
    assert sealed.open_params(params, None) == (params, ())


@pytest.mark.parametrize("value", ["not-a-token", "é-not-ascii", backend_encrypt(PLAIN, "another-secret")],
                         ids=["garbage", "not-ascii", "other-secret"])
def test_a_token_that_does_not_decrypt_is_a_clear_error_without_the_token(value):
    with pytest.raises(ValidationError) as error:
        sealed.open_params({"ssh_passphrase": value}, SECRET)
    text = str(error.value)
    assert text.startswith("ssh_passphrase could not be decrypted with the shared secret")
    assert value not in text and PLAIN not in text


@pytest.mark.parametrize("value", [123, ["x"], {"a": "b"}, True])
def test_a_sealed_field_that_is_not_a_string_is_an_error(value):
    with pytest.raises(ValidationError, match="^password must be a string"):
        sealed.open_params({"password": value}, SECRET)


def test_null_and_empty_fields_carry_nothing_to_decrypt():
    params = {"password": None, "ansible_password": ""}
    assert sealed.open_params(params, SECRET) == (params, ())


def test_fernet_is_not_imported_at_start():
    # redis-py imports the bare ``cryptography`` package (0.5 ms) to see whether it is there;
    # Fernet and the hazmat primitives behind it (~18 ms) wait for the first sealed field.
    code = ("import sys, agent, cli, sealed\n"
            "sealed.open_params({'message': 'x'}, 's3cret')\n"
            "print(any(m.startswith(('cryptography.fernet', 'cryptography.hazmat')) for m in sys.modules))\n")
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "False"


# -- the example handler, end to end ------------------------------------------------------------


@pytest.fixture
def handlers_dir(tmp_path):
    """A root-owned 0755 directory with the shipped htpasswd_set example in it."""
    assert os.geteuid() == 0, "HANDLERS_DIR must be root's; the suite runs as root"
    directory = tmp_path / "handlers.d"
    directory.mkdir(mode=0o755)
    directory.chmod(0o755)
    target = directory / "htpasswd_set.py"
    shutil.copy(ROOT / "handlers" / "examples" / "htpasswd_set.py", target)
    target.chmod(0o644)
    return directory


class FakeHtpasswd:
    """A stand-in for htpasswd: records argv and the sha256 of its stdin, and prints what it got
    (a careless child): on stdout when it succeeds, on stderr when told to fail."""

    def __init__(self, base):
        self.path, self.calls, self.mode = base / "fake-htpasswd", base / "htpasswd-calls.jsonl", base / "mode"
        self.file = base / "htpasswd"
        self.file.write_text("")
        self.mode.write_text("ok")
        self.path.write_text(f"""#!{sys.executable}
import hashlib, json, sys
data = sys.stdin.buffer.read()
with open({str(self.calls)!r}, "a") as f:
    f.write(json.dumps({{"argv": sys.argv[1:], "stdin_sha256": hashlib.sha256(data).hexdigest()}}) + "\\n")
if open({str(self.mode)!r}).read() == "fail":
    sys.stderr.write("htpasswd: refusing password " + data.decode().strip() + "\\n")
    sys.exit(1)
print("read password " + data.decode().strip())
""")
        self.path.chmod(0o755)

    def recorded(self) -> list[dict]:
        return [json.loads(line) for line in self.calls.read_text().splitlines()] if self.calls.exists() else []

    def env_file(self, directory):
        path = directory / "agent.env"
        path.write_text(f"HTPASSWD_FILE={self.file}\nHTPASSWD_USERS=ops,viewer\nHTPASSWD_BIN={self.path}\n")
        path.chmod(0o600)
        return path


def stdin_hash(plain: str) -> str:
    return hashlib.sha256(plain.encode() + b"\n").hexdigest()


def raw_state(state_dir) -> bytes:
    """Every byte of the SQLite database, its WAL and shared-memory files included."""
    return b"".join(p.read_bytes() for p in sorted(state_dir.iterdir()) if p.is_file())


def redis_values(server) -> bytes:
    client = server.client()
    return b"".join(client.get(key) or b"" for key in client.keys("*") if client.type(key) == b"string")


def test_a_password_reaches_the_child_on_stdin_and_nowhere_else(tmp_path, handlers_dir, agent_env, agent_process,
                                                                 make_backend, redis_server):
    htpasswd = FakeHtpasswd(tmp_path)
    env = {**agent_env, "HANDLERS_DIR": str(handlers_dir), "COCKPIT_SHARED_SECRET": SECRET,
           "COCKPIT_AGENT_ENV_FILE": str(htpasswd.env_file(tmp_path))}
    agent = agent_process(env).start()
    agent.wait_subscribed(redis_server)
    backend = make_backend(env["AGENT_ID"], secret=SECRET)

    token = backend_encrypt(PLAIN)
    ok = backend.call("htpasswd_set", {"user": "ops", "password": token})
    assert ok["status"] == "success" and ok["output"] == "password set for ops", ok
    assert htpasswd.recorded() == [{"argv": ["-i", "-B", str(htpasswd.file), "ops"], "stdin_sha256": stdin_hash(PLAIN)}]

    # The operator's `send` encrypts it the same way (the agent would refuse a plain password).
    sent = subprocess.run([sys.executable, str(ROOT / "agent.py"), "send", "htpasswd_set", "user=viewer",
                           f"password={PLAIN}"], env=env, capture_output=True, text=True, timeout=60)
    assert sent.returncode == 0, sent.stdout + sent.stderr
    assert json.loads(sent.stdout)["output"] == "password set for viewer" and PLAIN not in sent.stdout
    assert htpasswd.recorded()[-1] == {"argv": ["-i", "-B", str(htpasswd.file), "viewer"],
                                       "stdin_sha256": stdin_hash(PLAIN)}

    htpasswd.mode.write_text("fail")  # it prints the password it was given on stderr
    failed = backend.call("htpasswd_set", {"user": "viewer", "password": backend_encrypt(PLAIN)})
    assert failed["status"] == "error" and "htpasswd: refusing password ***" in failed["error"], failed

    undecryptable = backend_encrypt(PLAIN, "not-the-agents-secret")
    refused = backend.call("htpasswd_set", {"user": "ops", "password": undecryptable})
    assert refused["status"] == "error", refused
    assert refused["error"].startswith("password could not be decrypted with the shared secret"), refused
    assert undecryptable not in refused["error"]
    not_text = backend.call("htpasswd_set", {"user": "ops", "ansible_password": 1234})
    assert not_text["status"] == "error" and not_text["error"].startswith("ansible_password must be a string")
    assert len(htpasswd.recorded()) == 3  # nothing ran for the refused ones

    assert agent.terminate() == 0
    stored = sqlite3.connect(env["OUTBOX_DB"]).execute(
        "SELECT params FROM commands WHERE command_id = ?", [ok["command_id"]]).fetchone()[0]
    assert json.loads(stored) == {"user": "ops", "password": token}  # the params as received
    secret_bytes = PLAIN.encode()
    assert PLAIN not in agent.log()
    assert secret_bytes not in raw_state(tmp_path / "state")
    assert not any(secret_bytes in raw for raw in backend.raw)
    assert secret_bytes not in redis_values(redis_server)


def test_queued_commands_are_decrypted_again_after_a_restart(tmp_path, handlers_dir, agent_env, config_from,
                                                             make_backend, redis_server, monkeypatch):
    from agent import Agent
    from handlers import REGISTRY
    from handlers.loader import registry_with_dir

    htpasswd = FakeHtpasswd(tmp_path)
    monkeypatch.setenv("HTPASSWD_FILE", str(htpasswd.file))
    monkeypatch.setenv("HTPASSWD_USERS", "ops")
    monkeypatch.setenv("HTPASSWD_BIN", str(htpasswd.path))
    config = config_from({**agent_env, "COCKPIT_SHARED_SECRET": SECRET})
    registry = registry_with_dir(REGISTRY, str(handlers_dir))
    agent = Agent(config, registry)
    # What an earlier run accepted and left queued: the params as received, tokens and all.
    queued, stale = str(uuid.uuid4()), str(uuid.uuid4())
    store = agent.open_store()
    store.accept(queued, "htpasswd_set", {"user": "ops", "password": backend_encrypt(PLAIN)}, "cockpit-backend")
    store.accept(stale, "htpasswd_set", {"user": "ops", "password": backend_encrypt(PLAIN, "the-old-secret")},
                 "cockpit-backend")
    store.close()
    backend = make_backend(config.agent_id, secret=SECRET)
    agent.start()
    try:
        assert backend.wait(queued)["status"] == "success"
        assert backend.wait(stale)["error"].startswith("password could not be decrypted with the shared secret")
        assert wait_for(htpasswd.recorded) == [
            {"argv": ["-i", "-B", str(htpasswd.file), "ops"], "stdin_sha256": stdin_hash(PLAIN)}]
    finally:
        agent.stop_requested.set()
        agent.shutdown()
    assert PLAIN.encode() not in raw_state(tmp_path / "state")


def test_the_example_refuses_to_run_without_a_shared_secret(handlers_dir, monkeypatch, tmp_path):
    from config import Config
    from errors import NotAllowed
    from handlers import REGISTRY
    from handlers.loader import registry_with_dir

    monkeypatch.setenv("HTPASSWD_FILE", str(tmp_path / "htpasswd"))
    monkeypatch.setenv("HTPASSWD_USERS", "ops")
    registry = registry_with_dir(REGISTRY, str(handlers_dir))
    with pytest.raises(NotAllowed, match="needs COCKPIT_SHARED_SECRET"):
        registry.prepare("htpasswd_set", {"user": "ops", "password": PLAIN}, Config(agent_id="t"))
    action = registry.prepare("htpasswd_set", {"user": "ops", "password": PLAIN},
                              Config(agent_id="t", shared_secret=SECRET))
    assert PLAIN not in " ".join(action.argv) and PLAIN not in repr(action)  # on stdin, never argv
    with pytest.raises(ValidationError) as error:
        registry.prepare("htpasswd_set", {"user": "ops", "password": PLAIN + "\n"}, Config(agent_id="t", shared_secret=SECRET))
    assert PLAIN not in str(error.value)
