"""``cockpit-agent check``: one line per thing the agent needs, before it is started."""

from __future__ import annotations

import os
import subprocess
import time

import redis

from cli.common import age, one_line, redis_problem, where
from config import Config, load, redact_url
from errors import EX_CONFIG, EX_FAIL, EX_OK, ConfigError
from handlers import REGISTRY
from handlers.base import child_env
from handlers.docker import docker_off
from handlers.loader import registry_with_dir
from outbox.owner import describe, instance_id
from outbox.owner import holder as lock_holder


class _Checks:
    """Prints one aligned line per check and remembers whether any failed."""

    def __init__(self) -> None:
        self.failed = 0

    def report(self, ok: bool, name: str, detail: str) -> bool:
        print(f"{'ok' if ok else 'FAIL':<4}  {name}: {detail}", flush=True)
        if not ok:
            self.failed += 1
        return ok

    def warn(self, name: str, detail: str) -> None:
        """A line that does not fail the check (a variable the agent does not read)."""
        print(f"warn  {name}: {detail}", flush=True)


def _run(argv: list[str], timeout: float = 15.0) -> tuple[int, str, str]:
    try:
        proc = subprocess.run(argv, stdin=subprocess.DEVNULL, capture_output=True, text=True,
                              timeout=timeout, env=child_env(), errors="replace")
    except FileNotFoundError:
        return 127, "", f"{argv[0]}: not found on PATH"
    except OSError as exc:  # not executable, or (as execvp says) a PATH directory it may not search
        return 126, "", f"cannot run {argv[0]}: {exc.strerror or exc}"
    except subprocess.TimeoutExpired:
        return 124, "", f"no answer within {timeout:g} s"
    return proc.returncode, proc.stdout.strip(), proc.stderr.strip()


def check(env_file: str | None) -> int:
    """``check``: one line per check; 0 when all pass, 1 when one fails, 78 on bad configuration."""
    checks = _Checks()
    try:
        config = load(env_file)
    except ConfigError as exc:
        for problem in exc.problems:
            checks.report(False, "configuration", problem)
        for warning in exc.warnings:
            checks.warn("configuration", warning)
        return EX_CONFIG
    checks.report(True, "configuration", config.describe())
    for warning in config.warnings:
        checks.warn("configuration", warning)

    try:
        registry = registry_with_dir(REGISTRY, config.handlers_dir, env_file=env_file).for_config(config)
        checks.report(True, "commands", ", ".join(registry.names()) +
                      (f" (with {config.handlers_dir})" if config.handlers_dir else ""))
    except ConfigError as exc:
        checks.report(False, "commands", str(exc))

    client = config.redis_client(socket_timeout=5.0)
    try:
        start = time.monotonic()
        client.ping()
        ms = (time.monotonic() - start) * 1000
        info = client.info("server")
        user = client.acl_whoami() if hasattr(client, "acl_whoami") else "?"
        checks.report(True, "redis", f"{where(config)} as {user}, tls {'on' if config.redis_ssl else 'off'}, "
                      f"redis {info.get('redis_version', '?')}, ping {ms:.0f} ms")
        _check_registry(checks, config, client)
    except redis.RedisError as exc:
        checks.report(False, "redis", f"{where(config)}: {redis_problem(exc)}")
    except OSError as exc:  # e.g. a TLS certificate file that cannot be read
        checks.report(False, "redis", f"{where(config)}: {exc}")
    finally:
        client.close()

    unit_writes = _unit_writable_paths()
    for repo in config.git_repo_paths:
        name = f"repository {repo}"
        if not os.path.isdir(repo):
            checks.report(False, name, "does not exist (GIT_REPO_PATH)")
            continue
        code, out, err = _run([config.git_bin, "-C", repo, "rev-parse", "--is-inside-work-tree"])
        if code != 0 or out != "true":
            checks.report(False, name, f"not a git work tree: {err or out or f'git exited {code}'}")
            continue
        code, out, err = _run([config.git_bin, "-C", repo, "remote", "get-url", "origin"])
        if code != 0:
            checks.report(False, name, f"git work tree without an origin remote: {err or f'git exited {code}'}")
            continue
        if unit_writes is not None and not _within(repo, unit_writes):
            # check runs outside the service's sandbox, where the repository is writable; the
            # service, under ProtectSystem=strict, would find it read-only.
            checks.report(False, name, f"git work tree, but the unit {UNIT} does not let the service write it, "
                          f"so git_pull there will fail: systemctl edit {UNIT}, add ReadWritePaths={repo}")
            continue
        checks.report(True, name, f"git work tree, origin {redact_url(out)}")

    if not config.docker_containers:
        checks.report(True, "docker", f"off: {docker_off(config)}; docker_restart is not offered")
    else:
        code, out, err = _run([config.docker_bin, "version"], timeout=20)
        if code == 0:
            server = _docker_server_version(out)
            checks.report(True, "docker", f"{config.docker_bin} answers" + (f" (engine {server})" if server else ""))
        else:
            checks.report(False, "docker", f"{config.docker_bin} version failed: {(err or out or f'exit {code}')[:300]}")

    # The agent creates missing directories itself; what matters is that it can.
    target = os.path.abspath(config.outbox_db)
    while not os.path.exists(target) and os.path.dirname(target) != target:
        target = os.path.dirname(target)
    if not os.access(target, os.W_OK):
        checks.report(False, "state", f"{target} is not writable, so {config.outbox_db} cannot be written (OUTBOX_DB)")
    elif target == os.path.abspath(config.outbox_db):
        checks.report(True, "state", f"{config.outbox_db} is writable")
    else:
        checks.report(True, "state", f"{config.outbox_db} will be created (in {target}, writable)")
    pid = lock_holder(config.outbox_db)
    if pid:
        checks.report(True, "state", f"an agent ({describe(pid)}) holds {config.outbox_db}")
    return EX_FAIL if checks.failed else EX_OK


def _check_registry(checks: _Checks, config: Config, client: redis.Redis) -> None:
    """A FAIL line when another agent writes this agent id's registry hash (a twin: both run
    every command). HMGET, which the agent's ACL allows, not HGETALL."""
    names = ("instance", "hostname", "twin", "status", "last_heartbeat")
    try:
        values = client.hmget(config.registry_key, names)
    except redis.RedisError:
        return  # an older ACL without +hmget: nothing to tell either way
    # Whoever can write to Redis wrote these: printable characters only, and short.
    entry = {k: one_line("".join(c if c.isprintable() else "?" for c in v.decode("utf-8", "replace")), 160)
             for k, v in zip(names, values) if v is not None}
    mine, other, key = instance_id(config.outbox_db), entry.get("instance"), config.registry_key
    host = entry.get("hostname", "?")
    if entry.get("twin"):
        checks.report(False, "registry", f"two agents run as {config.agent_id} on this Redis: {key} was last written "
                      f"by {host} (instance {other}), which saw another one: {entry['twin']}; both run every "
                      "command: stop one, or give each its own AGENT_ID")
    elif other and other != mine and entry.get("status") == "online":
        try:
            heartbeat = age(time.time() - float(entry.get("last_heartbeat") or 0))
        except ValueError:
            heartbeat = "?"
        checks.report(False, "registry", f"another agent runs as {config.agent_id} on this Redis: {host} "
                      f"(instance {other}, not this host's {mine}), heartbeat {heartbeat} ago; an agent started "
                      "here would run every command too: give it its own AGENT_ID")


UNIT = "cockpit-agent.service"


def _unit_writable_paths() -> list[str] | None:
    """What the installed unit lets the service write, when it makes the rest read-only
    (ProtectSystem=strict); None without such a unit here (no systemd, not installed)."""
    code, out, _ = _run(["systemctl", "show", "-p", "LoadState", "-p", "ProtectSystem", "-p", "ReadWritePaths",
                         "-p", "StateDirectory", UNIT])
    if code != 0:
        return None
    props = dict(line.split("=", 1) for line in out.splitlines() if "=" in line)
    if props.get("LoadState") != "loaded" or props.get("ProtectSystem") != "strict":
        return None
    paths = [path.lstrip("-+") for path in props.get("ReadWritePaths", "").split()]
    return paths + [os.path.join("/var/lib", name) for name in props.get("StateDirectory", "").split()]


def _within(path: str, roots: list[str]) -> bool:
    path = os.path.realpath(path)
    return any(path == root or path.startswith(root.rstrip("/") + "/")
               for root in (os.path.realpath(r) for r in roots if r))


def _docker_server_version(text: str) -> str | None:
    in_server = False
    for line in text.splitlines():
        if line.startswith("Server:"):
            in_server = True
        elif in_server and line.strip().startswith("Version:"):
            return line.split(":", 1)[1].strip()
    return None
