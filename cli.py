"""The operator's commands: ``cockpit-agent check|send|status|outbox|history``.

``agent.py`` parses the command line and calls ``run``; everything here talks to Redis or
reads the agent's SQLite file directly, so it works whether or not the agent is running.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
import uuid
from datetime import datetime
from typing import Any
from urllib.parse import urlsplit

import redis

import protocol
import sealed
from config import Config, load
from errors import EX_CONFIG, EX_FAIL, EX_NO_RESPONSE, EX_OK, EX_UNAVAILABLE, EX_USAGE, ConfigError
from handlers import REGISTRY
from handlers.base import child_env
from handlers.loader import registry_with_dir
from outbox.inspect import Inspector
from outbox.owner import describe, instance_id
from outbox.owner import holder as lock_holder

ONLINE_MAX_AGE = 90  # the backend's rule: online while last_heartbeat is younger than this

EXIT_CODES = """\
exit codes:
  0   success (check: every check passed; send: the command succeeded; status: agent online)
  1   failure (a check failed; send: the command answered status=error; status: agent offline
      or not registered; outbox/history: no such entry, or the database does not exist)
  2   usage error (unknown option, malformed key=value)
  3   send: no response within --timeout, or no agent subscribed to the command channel
  69  Redis cannot be reached (or refuses the credentials)
  78  the configuration is invalid (the line printed names the variable)"""

SEND_SENDER = "cockpit-agent-cli"


# -- argument parsing ---------------------------------------------------------------------------


def _key_value(text: str) -> tuple[str, Any]:
    """``key=value`` (a string) or ``key:=json`` (any JSON value: numbers, true, null, ...)."""
    if "=" not in text:
        raise argparse.ArgumentTypeError(f"{text!r}: expected key=value (or key:=json)")
    key, value = text.split("=", 1)
    if key.endswith(":"):
        key = key[:-1]
        try:
            value = json.loads(value)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r}: the value after := is not JSON") from None
    if not key:
        raise argparse.ArgumentTypeError(f"{text!r}: the key is empty")
    return key, value


def add_commands(sub: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    """Add the operator commands to ``agent.py``'s sub-parsers."""
    fmt = argparse.RawDescriptionHelpFormatter

    def add(name: str, help: str, description: str) -> argparse.ArgumentParser:
        return sub.add_parser(name, help=help, description=description, epilog=EXIT_CODES,
                              formatter_class=fmt, parents=[common])

    add("check", "check the configuration, Redis, the repositories and docker",
        "Check the configuration, the Redis connection (auth, TLS), that every whitelisted repository is a "
        "git work tree with an origin, that the docker CLI answers, and that the state directory is "
        "writable. One line per check; exits non-zero if any fails.")

    p = add("send", "send a command as the backend does and print the response",
            "Send COMMAND to an agent the way the Cockpit backend does (subscribe to the responses first, "
            "sign when COCKPIT_SHARED_SECRET is set), wait for the response and print it as JSON. If the "
            "reply on the channel was missed, read it from the result key instead.\n\n"
            "examples:\n  cockpit-agent send echo message=hi\n  cockpit-agent send git_pull branch=main\n"
            "  cockpit-agent send docker_restart container_name=grafana --timeout 90")
    p.add_argument("command", metavar="COMMAND", help="the command name, e.g. echo, git_pull")
    p.add_argument("params", metavar="key=value", nargs="*", type=_key_value,
                   help="parameters; key=value sends a string, key:=JSON sends any JSON value")
    p.add_argument("--agent", metavar="ID", help="the agent id to send to (default: this host's AGENT_ID)")
    p.add_argument("--timeout", metavar="S", type=float, default=30.0,
                   help="seconds to wait for the response (default 30)")

    add("status", "show the registry entry, heartbeat age and the local queue and outbox",
        "Show the agent's registry entry in Redis (agents:{id}), how old its heartbeat is, and the local "
        "counts from its SQLite file (queued, running, done, waiting in the outbox).")

    p = add("outbox", "list, show, retry or purge messages waiting to be published",
            "Inspect the outbox: the responses still waiting to be published.\n\n"
            "  outbox list            what waits, oldest first\n"
            "  outbox show ID         one message in full\n"
            "  outbox retry [ID ...]  make them due now (all when no ID); the agent publishes within seconds\n"
            "  outbox purge [ID ...]  delete them (all when no ID): they will never be delivered")
    p.add_argument("action", choices=["list", "show", "retry", "purge"], nargs="?", default="list")
    p.add_argument("ids", metavar="ID", nargs="*", type=int)
    p.add_argument("--yes", "-y", action="store_true", help="purge without asking")

    p = add("history", "the last commands with their status and duration",
            "The last N commands the agent accepted, oldest first, from its SQLite file.")
    p.add_argument("-n", "--limit", type=int, default=20, help="how many (default 20)")


def run(args: argparse.Namespace) -> int:
    """Run the operator command in ``args.cmd``; returns the exit code."""
    if args.cmd == "check":
        return check(args.env_file)
    try:
        config = load(args.env_file)
    except ConfigError as exc:
        print(f"cockpit-agent: configuration error: {exc}", file=sys.stderr)
        return EX_CONFIG
    commands = {"send": send, "status": status, "outbox": outbox, "history": history}
    try:
        return commands[args.cmd](config, args)
    except (redis.ConnectionError, redis.TimeoutError, redis.AuthenticationError) as exc:
        print(f"cockpit-agent: cannot reach Redis at {_where(config)}: {_redis_problem(exc)}", file=sys.stderr)
        return EX_UNAVAILABLE
    except redis.ResponseError as exc:
        print(f"cockpit-agent: Redis refused: {exc}", file=sys.stderr)
        return EX_UNAVAILABLE


def _where(config: Config) -> str:
    if config.redis_url:
        parts = urlsplit(config.redis_url)
        if parts.scheme == "unix":
            return parts.path
        return f"{parts.hostname}:{parts.port or 6379}"
    return f"{config.redis_host}:{config.redis_port}"


def _redis_problem(exc: Exception) -> str:
    if isinstance(exc, redis.AuthenticationError) or "WRONGPASS" in str(exc) or "NOAUTH" in str(exc):
        return "authentication failed (check REDIS_PASSWORD and REDIS_USERNAME)"
    return str(exc) or type(exc).__name__


# -- check --------------------------------------------------------------------------------------


class _Checks:
    """Prints one aligned line per check and remembers whether any failed."""

    def __init__(self) -> None:
        self.failed = 0

    def report(self, ok: bool, name: str, detail: str) -> bool:
        print(f"{'ok' if ok else 'FAIL':<4}  {name}: {detail}", flush=True)
        if not ok:
            self.failed += 1
        return ok


def _redact_url(url: str) -> str:
    """A remote URL without its user:password (tokens hide there in https remotes)."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return url
    if parts.scheme and parts.password:
        return parts._replace(netloc=f"{parts.username}:***@{parts.hostname}" +
                              (f":{parts.port}" if parts.port else "")).geturl()
    return url


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
        checks.report(False, "configuration", str(exc))
        return EX_CONFIG
    checks.report(True, "configuration", config.describe())


    try:
        registry = registry_with_dir(REGISTRY, config.handlers_dir, env_file=env_file)
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
        checks.report(True, "redis", f"{_where(config)} as {user}, tls {'on' if config.redis_ssl else 'off'}, "
                      f"redis {info.get('redis_version', '?')}, ping {ms:.0f} ms")
        _check_registry(checks, config, client)
    except redis.RedisError as exc:
        checks.report(False, "redis", f"{_where(config)}: {_redis_problem(exc)}")
    except OSError as exc:  # e.g. a TLS certificate file that cannot be read
        checks.report(False, "redis", f"{_where(config)}: {exc}")
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
        checks.report(True, name, f"git work tree, origin {_redact_url(out)}")

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
    entry = {k: _one_line("".join(c if c.isprintable() else "?" for c in v.decode("utf-8", "replace")), 160)
             for k, v in zip(names, values) if v is not None}
    mine, other, key = instance_id(config.outbox_db), entry.get("instance"), config.registry_key
    host = entry.get("hostname", "?")
    if entry.get("twin"):
        checks.report(False, "registry", f"two agents run as {config.agent_id} on this Redis: {key} was last written "
                      f"by {host} (instance {other}), which saw another one: {entry['twin']}; both run every "
                      "command: stop one, or give each its own AGENT_ID")
    elif other and other != mine and entry.get("status") == "online":
        try:
            age = _age(time.time() - float(entry.get("last_heartbeat") or 0))
        except ValueError:
            age = "?"
        checks.report(False, "registry", f"another agent runs as {config.agent_id} on this Redis: {host} "
                      f"(instance {other}, not this host's {mine}), heartbeat {age} ago; an agent started "
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


# -- send ---------------------------------------------------------------------------------------


def send(config: Config, args: argparse.Namespace) -> int:
    """``send``: subscribe, publish (signed when a secret is set), wait, print the response."""
    agent_id = args.agent or config.agent_id
    params = dict(args.params)
    # Only for this host's own agent: another (--agent) may run a newer version with more.
    takes, unknown = ((), []) if agent_id != config.agent_id else \
        _unknown_params(config, args.command, params, args.env_file)
    if unknown:
        # The agent ignores parameters it does not know (a newer backend may send more), so a
        # mistyped one would run the command with its defaults: container=x restarts the first
        # whitelisted container. An operator's typo is caught here instead.
        print(f"cockpit-agent: {args.command} takes {', '.join(takes) or 'no parameters'}, not "
              f"{', '.join(unknown)}; the agent would ignore {'them' if len(unknown) > 1 else 'it'} and "
              f"run {args.command} with its defaults. Nothing was sent.", file=sys.stderr)
        return EX_USAGE
    command_id = str(uuid.uuid4())
    params = sealed.seal_params(params, config.shared_secret)  # password=... encrypted, as the backend does
    message: dict[str, Any] = {"command_id": command_id, "command": args.command, "params": params,
                               "timestamp": int(time.time()), "sender": SEND_SENDER}
    if config.shared_secret:
        message["auth"] = {"signature": protocol.sign(message, config.shared_secret)}
    result_key = f"cockpit-agent-result:{agent_id}:{command_id}"
    client = config.redis_client()
    pubsub = client.pubsub(ignore_subscribe_messages=True)
    try:
        pubsub.subscribe(f"cockpit-agent-response:{agent_id}")
        deadline = time.monotonic() + max(0.0, args.timeout)
        while not pubsub.subscribed:  # subscribed before publishing, or a fast reply is lost
            pubsub.get_message(timeout=0.1)
            if time.monotonic() > deadline + 5:
                raise redis.TimeoutError("no confirmation of SUBSCRIBE")
        receivers = client.publish(f"cockpit-agent:{agent_id}", json.dumps(message))
        if receivers == 0:
            print(f"cockpit-agent: no agent is subscribed to cockpit-agent:{agent_id}; the command was not "
                  "delivered (is the agent running, and is the id right?)", file=sys.stderr)
            return EX_NO_RESPONSE
        response = _wait_response(pubsub, command_id, deadline)
    finally:
        try:
            pubsub.close()
        except Exception:
            pass
    if response is None:
        response = _result_key(config, result_key, deadline=time.monotonic() + 2)
        if response is not None:
            print(f"cockpit-agent: the reply was missed on the channel; read it from {result_key}", file=sys.stderr)
    if response is None:
        print(f"cockpit-agent: no response to {command_id} within {args.timeout:g} s "
              f"(it may still come: redis-cli GET {result_key})", file=sys.stderr)
        return EX_NO_RESPONSE
    print(json.dumps(response, indent=2, ensure_ascii=False))
    return EX_OK if response.get("status") == "success" else EX_FAIL


def _unknown_params(config: Config, command: str, params: dict[str, Any],
                    env_file: str | None) -> tuple[tuple[str, ...], list[str]]:
    """The parameters this host's handler for ``command`` takes, and those in ``params`` it does
    not. Nothing is unknown for a command this host does not have (the agent answers that)."""

    try:
        registry = registry_with_dir(REGISTRY, config.handlers_dir, env_file=env_file)
    except ConfigError:  # the agent would not start either; check says why
        registry = REGISTRY
    handler = registry.get(command)
    if handler is None:
        return (), []
    return handler.params, handler.unknown(params)


def _wait_response(pubsub, command_id: str, deadline: float) -> dict | None:
    """The response to ``command_id`` from the channel, or None at the deadline or on a lost connection."""
    while True:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            return None
        try:
            message = pubsub.get_message(timeout=min(remaining, 0.5))
        except (redis.ConnectionError, redis.TimeoutError):
            return None  # the result key still has it
        if not message or message.get("type") != "message":
            continue
        try:
            response = json.loads(message["data"])
        except ValueError:
            continue
        if isinstance(response, dict) and response.get("command_id") == command_id:
            return response


def _result_key(config: Config, key: str, deadline: float) -> dict | None:
    client = config.redis_client()
    while True:
        try:
            raw = client.get(key)
        except (redis.ConnectionError, redis.TimeoutError):
            raw = None
        if raw is not None:
            try:
                return json.loads(raw)
            except ValueError:
                return None
        if time.monotonic() >= deadline:
            return None
        time.sleep(0.2)  # polling Redis with a deadline: nothing to wait on


# -- the local database -------------------------------------------------------------------------


def _open_db(config: Config) -> Inspector | None:
    """The agent's database, opened as the user who owns it.

    Run as root, the CLI drops to the owner first: a root-owned -wal or -shm file left behind
    would lock the agent out of its own database.
    """
    path = config.outbox_db
    if not os.path.exists(path):
        print(f"cockpit-agent: no database at {path} (OUTBOX_DB); has the agent run on this host?", file=sys.stderr)
        return None
    st = os.stat(path)
    if os.geteuid() == 0 and st.st_uid != 0:
        os.setgroups([])
        os.setgid(st.st_gid)
        os.setuid(st.st_uid)
    return Inspector(path)


def _when(ts: float | None) -> str:
    return "-" if ts is None else datetime.fromtimestamp(ts).strftime("%Y-%m-%d %H:%M:%S")


def _age(seconds: float) -> str:
    seconds = max(0, int(seconds))
    if seconds < 120:
        return f"{seconds} s"
    if seconds < 7200:
        return f"{seconds // 60} min"
    if seconds < 172800:
        return f"{seconds // 3600} h"
    return f"{seconds // 86400} d"


def _one_line(text: str | None, limit: int = 60) -> str:
    if not text:
        return ""
    line = " ".join(text.split())
    return line if len(line) <= limit else line[: limit - 3] + "..."


# -- status -------------------------------------------------------------------------------------


def status(config: Config, args: argparse.Namespace) -> int:
    """``status``: the registry entry and heartbeat age, then the local counts."""
    code = EX_FAIL
    print(f"agent:        {config.agent_id}")
    try:
        entry = {k.decode(): v.decode("utf-8", "replace") for k, v in
                 config.redis_client().hgetall(config.registry_key).items()}
    except (redis.ConnectionError, redis.TimeoutError, redis.AuthenticationError) as exc:
        print(f"registry:     Redis at {_where(config)} unreachable: {_redis_problem(exc)}")
        code = EX_UNAVAILABLE
    else:
        if not entry:
            print(f"registry:     no {config.registry_key} in Redis (never started, or not seen for "
                  f"3 x HEARTBEAT_INTERVAL)")
        else:
            now = time.time()
            beat = float(entry.get("last_heartbeat") or 0)
            online = entry.get("status") == "online" and now - beat < ONLINE_MAX_AGE
            code = EX_OK if online else EX_FAIL
            print(f"registry:     {entry.get('status', '?')}; heartbeat {_age(now - beat)} ago "
                  f"({'online' if online else 'offline'} for the backend)")
            started = float(entry.get("started_at") or 0)
            print(f"version:      {entry.get('version', '?')} on {entry.get('hostname', '?')}, "
                  f"started {_when(started)} ({_age(now - started)} ago)")
            print(f"commands:     {entry.get('capabilities', '')}")
            print(f"executed:     {entry.get('commands_executed', '0')}")
    db = _open_db(config)
    if db is not None:
        counts, oldest = db.counts(), db.oldest_waiting()
        waiting = f"{counts['outbox']} waiting in outbox" + (f" (oldest {_age(time.time() - oldest)})" if oldest else "")
        print(f"local:        {counts['queued']} queued, {counts['running']} running, {counts['done']} done; {waiting}")
        print(f"database:     {config.outbox_db}")
        db.close()
    return code


# -- outbox -------------------------------------------------------------------------------------


def outbox(config: Config, args: argparse.Namespace) -> int:
    """``outbox list|show|retry|purge``."""
    db = _open_db(config)
    if db is None:
        return EX_FAIL
    try:
        if args.action == "list":
            return _outbox_list(db)
        if args.action == "show":
            return _outbox_show(db, args.ids)
        if args.action == "retry":
            return _outbox_retry(db, args.ids)
        return _outbox_purge(db, args.ids, args.yes)
    finally:
        db.close()


def _outbox_list(db: Inspector) -> int:
    rows = db.outbox_rows()
    if not rows:
        print("the outbox is empty: every response was delivered")
        return EX_OK
    now = time.time()
    print(f"{'ID':>6}  {'COMMAND_ID':<36}  {'AGE':>7}  {'TRIES':>5}  {'NEXT':>7}  LAST ERROR")
    for row in rows:
        due = row["next_attempt_at"] - now
        print(f"{row['id']:>6}  {_one_line(row['command_id'], 36) or '-':<36}  {_age(now - row['created_at']):>7}  "
              f"{row['attempts']:>5}  {'now' if due <= 0 else _age(due):>7}  {_one_line(row['last_error'], 40)}")
    print(f"{len(rows)} waiting")
    return EX_OK


def _outbox_show(db: Inspector, ids: list[int]) -> int:
    if len(ids) != 1:
        print("cockpit-agent: outbox show needs exactly one ID (see: outbox list)", file=sys.stderr)
        return EX_USAGE
    row = db.outbox_row(ids[0])
    if row is None:
        print(f"cockpit-agent: no outbox entry {ids[0]} (already delivered?)", file=sys.stderr)
        return EX_FAIL
    for key in row.keys():
        if key == "payload":
            continue
        value = row[key]
        if key in ("created_at", "next_attempt_at", "unheard_since") and value:
            value = f"{_when(value)} ({value})"
        print(f"{key + ':':<17}{value if value is not None else '-'}")
    try:
        payload = json.dumps(json.loads(row["payload"]), indent=2, ensure_ascii=False)
    except ValueError:
        payload = row["payload"]
    print("payload:")
    print(payload)
    return EX_OK


def _outbox_retry(db: Inspector, ids: list[int]) -> int:
    changed = db.retry(ids)
    if ids and changed != len(ids):
        print(f"cockpit-agent: only {changed} of {len(ids)} entries are still in the outbox", file=sys.stderr)
    print(f"{changed} message(s) due now; a running agent publishes them within a few seconds")
    return EX_OK if changed or not ids else EX_FAIL


def _outbox_purge(db: Inspector, ids: list[int], yes: bool) -> int:
    count = db.waiting_count(ids)
    if count == 0:
        print("nothing to purge")
        return EX_OK if not ids else EX_FAIL
    if not yes:
        if not sys.stdin.isatty():
            print(f"cockpit-agent: refusing to purge {count} message(s) without a terminal to ask on; "
                  "add --yes", file=sys.stderr)
            return EX_FAIL
        answer = input(f"Delete {count} message(s)? Their responses will never be published. [y/N] ")
        if answer.strip().lower() not in ("y", "yes"):
            print("nothing purged")
            return EX_FAIL
    deleted = db.purge(ids)
    print(f"purged {deleted} message(s)")
    return EX_OK


# -- history ------------------------------------------------------------------------------------


def history(config: Config, args: argparse.Namespace) -> int:
    """``history``: the last N commands, oldest first."""
    db = _open_db(config)
    if db is None:
        return EX_FAIL
    try:
        rows = db.history(args.limit)
    finally:
        db.close()
    if not rows:
        print("no commands yet")
        return EX_OK
    print(f"{'RECEIVED':<19}  {'COMMAND_ID':<36}  {'COMMAND':<16}  {'STATUS':<8}  {'MS':>7}  ERROR")
    for row in rows:
        state = row["status"] if row["state"] == "done" else row["state"]
        ms = "-" if row["execution_time_ms"] is None else str(row["execution_time_ms"])
        print(f"{_when(row['received_at']):<19}  {_one_line(row['command_id'], 36):<36}  "
              f"{_one_line(row['command'], 16):<16}  {state or '-':<8}  {ms:>7}  {_one_line(row['error'])}")
    return EX_OK
