"""Fixtures with real parts: redis-server processes on free ports, git origins and clones,
and the agent itself (in-process threads or ``python agent.py`` as a child).

The one fake is ``docker``: no Docker engine runs here, so a stand-in script on PATH records
its arguments and answers the way ``docker restart`` does.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import signal
import socket
import sqlite3
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import pytest
import redis

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import protocol  # noqa: E402

PASSWORD = "test-password-3f9a"
SECRET = "test-shared-secret-7c1e"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def free_cluster_port(taken: set[int]) -> int:
    """A free port under 55536 whose port + 10000 (the cluster bus) is free too."""
    import random

    while True:
        port = random.randint(20000, 55000)
        if port in taken or port + 10000 in taken or port - 10000 in taken:
            continue
        try:
            for candidate in (port, port + 10000):
                with socket.socket() as sock:
                    sock.bind(("127.0.0.1", candidate))
        except OSError:
            continue
        return port


def agent_py(env: dict, *args: str, timeout: float = 60, **kwargs) -> subprocess.CompletedProcess:
    """``python agent.py ARGS`` as an operator runs it, with exactly ``env`` (output piped, from
    the checkout unless ``cwd`` says otherwise)."""
    kwargs.setdefault("cwd", ROOT)
    return subprocess.run([sys.executable, str(ROOT / "agent.py"), *args], env=env, capture_output=True,
                          text=True, timeout=timeout, stdin=subprocess.DEVNULL, **kwargs)


@pytest.fixture
def main(capsys):
    """``agent.main(argv)`` in-process: (exit code, stdout, stderr)."""
    import agent as agent_module

    def run(*argv: str) -> tuple[int, str, str]:
        code = agent_module.main(list(argv))
        out = capsys.readouterr()
        return code, out.out, out.err

    return run


def sql(path: str, query: str, params=()) -> list[sqlite3.Row]:
    """Run one statement on the database at ``path`` on a connection of its own, as the
    sqlite3 shell would (committed at once); its rows."""
    conn = sqlite3.connect(path, timeout=10)
    conn.row_factory = sqlite3.Row
    try:
        with conn:
            return conn.execute(query, params).fetchall()
    finally:
        conn.close()


def wait_for(condition, timeout: float = 10.0, interval: float = 0.02, message: str = "condition"):
    """Poll ``condition`` until it returns something truthy, or fail after ``timeout`` s."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {message}")
        time.sleep(interval)


def documented_rules(agent_id: str, password: str, block: str = "acl") -> tuple[str, list[str]]:
    """An ACL SETUSER block of docs/redis-acl.md (between ``<!-- {block}:begin -->`` and
    ``<!-- {block}:end -->``), for ``agent_id``: (username, rules)."""
    text = (ROOT / "docs" / "redis-acl.md").read_text()
    found = re.search(rf"<!-- {block}:begin -->\s*```\n(.*?)```\s*<!-- {block}:end -->", text, re.S).group(1)
    tokens = shlex.split(found.replace("{id}", agent_id).replace("{password}", password))
    assert tokens[:2] == ["ACL", "SETUSER"]
    return tokens[2], tokens[3:]


def denials(admin: redis.Redis, username: str) -> list[dict]:
    """What the ACL LOG of ``admin``'s node holds for ``username``."""
    return [entry for entry in admin.acl_log(count=1000) if entry.get("username") == username]


class StallWatch:
    """Notices that this test process was not run for a while (a loaded CI machine).

    A thread wakes every 50 ms and keeps the longest gap between its wake-ups. A test that
    asserts an answer within the agent's margin (1-2 s) measures the machine as well as the
    agent: when it was late and this process provably stood still for ``limit`` s, it may try
    once more; when it was late without a stall, the agent was late.
    """

    def __init__(self, limit: float = 1.0):
        self.limit, self.longest = limit, 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._tick, daemon=True)

    def _tick(self) -> None:
        last = time.monotonic()
        while not self._stop.wait(0.05):
            now = time.monotonic()
            self.longest = max(self.longest, now - last)
            last = now

    def __enter__(self) -> StallWatch:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(5)

    @property
    def stalled(self) -> bool:
        return self.longest >= self.limit


def in_time(attempt, limit: float, what: str, waits: str = "the backend waits"):
    """``attempt()`` returns (result, seconds it took), to be under ``limit``.

    Once more when it was late and the process stalled meanwhile (StallWatch, for the smaller
    of 1 s and half the limit); the result of the last attempt and the number of attempts.
    The assertion message gives every attempt's figure."""
    seen = []
    for _ in range(2):
        with StallWatch(min(1.0, limit / 2)) as watch:
            result, took = attempt()
        ran = f"ran {result['execution_time_ms']} ms, " if isinstance(result, dict) and "execution_time_ms" in result else ""
        seen.append(f"{took:.1f} s ({ran}longest stall of this process {watch.longest:.1f} s)")
        if took < limit or not watch.stalled:
            break
    assert took < limit, f"{what} {' then '.join(seen)}; {waits} {limit:g} s"
    return result, len(seen)


def outbox_table(path: str) -> list[sqlite3.Row]:
    """The outbox table at ``path``, in id order."""
    return sql(path, "SELECT * FROM outbox ORDER BY id")


def stuck_response(agent, redis_server) -> tuple[str, int]:
    """A response no one receives (no backend subscribed), pushed an hour into the future:
    its command_id and outbox row id."""
    command_id = str(uuid.uuid4())
    redis_server.client().publish(agent.config.command_channel, json.dumps(
        {"command_id": command_id, "command": "echo", "params": {"message": "waiting"}}))
    row = wait_for(lambda: [r for r in outbox_table(agent.config.outbox_db)
                            if r["command_id"] == command_id and r["attempts"] >= 1],
                   message="the unheard response in the outbox")[0]
    sql(agent.config.outbox_db, "UPDATE outbox SET next_attempt_at = ? WHERE id = ?", [time.time() + 3600, row["id"]])
    return command_id, row["id"]


class RedisServer:
    """A private redis-server the test can stop, kill, restart, pause (SIGSTOP) and resume."""

    def __init__(self, workdir: Path, password: str = PASSWORD, extra: list[str] | None = None,
                 unix_socket: bool = False):
        self.workdir = workdir
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.password = password
        self.port = free_port()
        self.extra = extra or []
        # Also listening on a unix socket (REDIS_URL=unix://...), beside its TCP port.
        self.socket = self.workdir / "redis.sock" if unix_socket else None
        if self.socket:
            self.extra += ["--unixsocket", str(self.socket), "--unixsocketperm", "700"]
        self.proc: subprocess.Popen | None = None

    def argv(self) -> list[str]:
        argv = ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
                "--appendonly", "no", "--dir", str(self.workdir), "--logfile", str(self.workdir / "redis.log")]
        if self.password:
            argv += ["--requirepass", self.password]
        return argv + self.extra

    def start(self) -> RedisServer:
        self.proc = subprocess.Popen(self.argv(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_for(self._answers, 10, message=f"redis-server on port {self.port}")
        return self

    def _answers(self) -> bool:
        try:
            return self.client(socket_timeout=0.5).ping()
        except redis.RedisError:
            return False

    def client(self, **kwargs) -> redis.Redis:
        kwargs.setdefault("socket_timeout", 5)
        return redis.Redis(port=self.port, password=self.password, **kwargs)

    def kill(self) -> None:
        """SIGKILL: the server and everything it held in memory are gone."""
        if self.proc and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(10)

    def restart(self) -> None:
        self.kill()
        self.start()

    def pause(self) -> None:
        """SIGSTOP: connections stay open but nothing answers."""
        os.kill(self.proc.pid, signal.SIGSTOP)

    def resume(self) -> None:
        os.kill(self.proc.pid, signal.SIGCONT)


@pytest.fixture
def redis_server(tmp_path):
    server = RedisServer(tmp_path / "redis").start()
    yield server
    if server.proc and server.proc.poll() is None:
        server.resume()
    server.kill()


@pytest.fixture
def unix_redis_server(tmp_path):
    """A private redis-server on a unix socket (``.socket``) as well as on a TCP port."""
    server = RedisServer(tmp_path / "unix-redis", unix_socket=True).start()
    yield server
    server.kill()


class LocalCluster:
    """A real Redis Cluster on this machine: ``masters`` redis-servers with cluster-enabled yes,
    each with ``replicas`` replicas, joined by ``redis-cli --cluster create``. A master killed
    (``kill_master_of``) is replaced by its replica within a few seconds (cluster-node-timeout
    1 s); ``restart`` brings the dead node back, as a replica of its successor."""

    def __init__(self, workdir: Path, masters: int = 3, replicas: int = 1, password: str = PASSWORD):
        self.password = password
        self.masters, self.replicas = masters, replicas
        self.servers = [RedisServer(workdir / f"node-{i}", password,
                                    ["--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf",
                                     "--cluster-node-timeout", "1000", "--cluster-replica-validity-factor", "0",
                                     "--masterauth", password])
                        for i in range(masters * (1 + replicas))]
        taken: set[int] = set()
        for server in self.servers:  # a node also listens on port + 10000 (the cluster bus)
            server.port = free_cluster_port(taken)
            taken.add(server.port)

    def start(self) -> LocalCluster:
        for server in self.servers:
            server.start()
        subprocess.run(["redis-cli", "-a", self.password, "--no-auth-warning", "--cluster", "create",
                        *(f"127.0.0.1:{server.port}" for server in self.servers),
                        "--cluster-replicas", str(self.replicas), "--cluster-yes"],
                       check=True, capture_output=True, timeout=60)
        self.wait_ok()
        return self

    def nodes(self) -> str:
        """REDIS_CLUSTER_NODES for the agent: every node, host:port, comma separated."""
        return ",".join(f"127.0.0.1:{server.port}" for server in self.servers)

    def alive(self) -> list[RedisServer]:
        return [server for server in self.servers if server.proc and server.proc.poll() is None]

    def wait_ok(self, timeout: float = 30.0) -> None:
        """Every live node says cluster_state:ok and agrees on one master per slot range."""
        def ok():
            for server in self.alive():
                try:
                    info = server.client(socket_timeout=1).execute_command("CLUSTER", "INFO")
                except redis.RedisError:
                    return False
                text = info.decode() if isinstance(info, bytes) else str(info)
                if "cluster_state:ok" not in text:
                    return False
            return len(self.master_ports()) == self.masters
        wait_for(ok, timeout, interval=0.1, message="the cluster to be ok")

    def _slots(self) -> list:
        """CLUSTER SLOTS as the first live node that answers sees it ([] if none does)."""
        for server in self.alive():
            try:
                return server.client(socket_timeout=1).execute_command("CLUSTER", "SLOTS")
            except redis.RedisError:
                continue
        return []

    def master_ports(self) -> set[int]:
        """The ports of the masters as a live node sees them (masters that are alive)."""
        return {int(entry[2][1]) for entry in self._slots()} & {server.port for server in self.alive()}

    def server_at(self, port: int) -> RedisServer:
        return next(server for server in self.servers if server.port == port)

    def master_of(self, name: str) -> RedisServer:
        """The live master holding ``name``'s slot (a key or a channel)."""
        from redis.crc import key_slot

        slot = key_slot(name.encode())
        for entry in self._slots():
            if int(entry[0]) <= slot <= int(entry[1]):
                return self.server_at(int(entry[2][1]))
        raise AssertionError(f"no node holds the slot of {name}")

    def kill_master_of(self, name: str) -> RedisServer:
        """SIGKILL the master of ``name``'s slot; returns it (dead)."""
        server = self.master_of(name)
        server.kill()
        return server

    def client(self, **kwargs):
        from redis.cluster import ClusterNode, RedisCluster

        kwargs.setdefault("socket_timeout", 5)
        return RedisCluster(startup_nodes=[ClusterNode("127.0.0.1", server.port) for server in self.alive()],
                            password=self.password, **kwargs)

    def numsub(self, channel: str) -> int:
        """Subscribers of ``channel``, classic and sharded, on all live nodes (each node counts
        only its own)."""
        total = 0
        for server in self.alive():
            try:
                client = server.client(socket_timeout=1)
                total += client.pubsub_numsub(channel)[0][1]
                total += int(client.execute_command("PUBSUB", "SHARDNUMSUB", channel)[1])
            except redis.RedisError:
                pass
        return total

    def close(self) -> None:
        for server in self.servers:
            if server.proc and server.proc.poll() is None:
                server.resume()
            server.kill()


@pytest.fixture
def redis_cluster(tmp_path):
    """A private Redis Cluster: three masters, three replicas."""
    cluster = LocalCluster(tmp_path / "cluster").start()
    yield cluster
    cluster.close()


class GitRepos:
    """An origin repository and a clone of it (the clone is what the agent pulls)."""

    def __init__(self, base: Path):
        self.origin = base / "origin"
        self.clone = base / "clone"
        self.git("init", "-q", "-b", "main", str(self.origin), cwd=base)
        self.commit("initial")
        self.git("clone", "-q", str(self.origin), str(self.clone), cwd=base)

    @staticmethod
    def git(*args: str, cwd: Path) -> str:
        env = {**os.environ, "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t", "GIT_COMMITTER_NAME": "t",
               "GIT_COMMITTER_EMAIL": "t@t"}
        return subprocess.run(["git", *args], cwd=cwd, env=env, check=True, capture_output=True, text=True).stdout

    def commit(self, name: str) -> None:
        """Add a file to origin and commit it."""
        (self.origin / name).write_text(name + "\n")
        self.git("add", name, cwd=self.origin)
        self.git("commit", "-q", "-m", f"add {name}", cwd=self.origin)

    def count_pulls_hook(self) -> Path:
        """Install a post-merge hook in the clone that counts merges (each real pull that moved)."""
        counter = self.clone.parent / "pulls.log"
        hook = self.clone / ".git" / "hooks" / "post-merge"
        hook.write_text(f"#!/bin/sh\necho pulled >> {counter}\n")
        hook.chmod(0o755)
        return counter


@pytest.fixture
def git_repos(tmp_path):
    base = tmp_path / "git"
    base.mkdir()
    return GitRepos(base)


class FakeDocker:
    """A stand-in for the docker CLI (no Docker engine runs here): records argv as JSON lines.

    ``behave("ok")`` prints the container name like ``docker restart``; ``behave("fail")``
    exits 1 with Docker's daemon error; ``behave("sleep 30")`` hangs, for timeouts.
    """

    def __init__(self, base: Path):
        self.dir = base
        self.dir.mkdir(parents=True, exist_ok=True)
        self.calls_file = self.dir / "calls.jsonl"
        self.mode_file = self.dir / "mode"
        self.path = self.dir / "docker"
        self.behave("ok")
        self.path.write_text(f"""#!{sys.executable}
import json, sys, time
with open({str(self.calls_file)!r}, "a") as f:
    f.write(json.dumps(sys.argv[1:]) + "\\n")
mode = open({str(self.mode_file)!r}).read().split()
if mode[0] == "fail":
    sys.stderr.write("Error response from daemon: No such container: " + sys.argv[-1] + "\\n")
    sys.exit(1)
if mode[0] == "sleep":
    time.sleep(float(mode[1]))
print(sys.argv[-1])
""")
        self.path.chmod(0o755)

    def behave(self, mode: str) -> None:
        self.mode_file.write_text(mode)

    def calls(self) -> list[list[str]]:
        if not self.calls_file.exists():
            return []
        return [json.loads(line) for line in self.calls_file.read_text().splitlines()]


@pytest.fixture
def fake_docker(tmp_path):
    return FakeDocker(tmp_path / "fake-docker")


@pytest.fixture
def agent_env(tmp_path, redis_server, git_repos, fake_docker):
    """The environment for an agent pointed at the private Redis, repo and docker stand-in."""
    agent_id = f"test-{uuid.uuid4().hex[:8]}"
    env = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "HOME": str(tmp_path),
        "REDIS_HOST": "127.0.0.1",
        "REDIS_PORT": str(redis_server.port),
        "REDIS_PASSWORD": PASSWORD,
        "AGENT_ID": agent_id,
        "GIT_REPO_PATH": str(git_repos.clone),
        "DOCKER_CONTAINER_NAME": "grafana,web-1",
        "DOCKER_BIN": str(fake_docker.path),
        "OUTBOX_DB": str(tmp_path / "state" / "outbox.db"),
        "HEARTBEAT_INTERVAL": "2",
        "REDIS_SOCKET_TIMEOUT": "2",
        "SHUTDOWN_GRACE": "5",
        "LOG_LEVEL": "INFO",
        "COCKPIT_AGENT_ENV_FILE": str(tmp_path / "no.env"),
    }
    return env


class Backend:
    """Plays the Cockpit backend: subscribes to the responses, then publishes commands.

    The subscriber thread reconnects on its own, so it keeps collecting across Redis restarts.
    """

    def __init__(self, server: RedisServer | LocalCluster, agent_id: str, secret: str | None = None,
                 sharded: bool = False):
        """``server``: one redis-server, or a LocalCluster (then redis-py's cluster client, as a
        backend on a cluster would use; ``sharded``: SSUBSCRIBE and SPUBLISH)."""
        self.server, self.agent_id, self.secret, self.sharded = server, agent_id, secret, sharded
        self.responses: list[dict] = []
        self.raw: list[bytes] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self.subscribed = threading.Event()
        self._thread = threading.Thread(target=self._listen, daemon=True)
        self._thread.start()
        assert self.subscribed.wait(10), "backend could not subscribe"

    def _listen(self) -> None:
        while not self._stop.is_set():
            try:
                client = self.server.client(socket_timeout=2)
                pubsub = client.pubsub(ignore_subscribe_messages=True)
                subscribe, get = ((pubsub.ssubscribe, pubsub.get_sharded_message) if self.sharded
                                  else (pubsub.subscribe, pubsub.get_message))
                subscribe(f"cockpit-agent-response:{self.agent_id}")
                while not pubsub.subscribed:
                    get(timeout=0.1)
                self.subscribed.set()
                while not self._stop.is_set():
                    message = get(timeout=0.2)
                    if message and message["type"] in ("message", "smessage"):
                        with self._lock:
                            self.raw.append(message["data"])
                            self.responses.append(json.loads(message["data"]))
            except (redis.RedisError, OSError, redis.exceptions.RedisClusterException):
                self.subscribed.clear()
                self._stop.wait(0.05)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)

    def message(self, command: str, params: dict | None = None, command_id: str | None = None, **fields) -> dict:
        message = {"command_id": command_id or str(uuid.uuid4()), "command": command, "params": params or {},
                   "timestamp": int(time.time()), "sender": "cockpit-backend", **fields}
        if self.secret:
            message["auth"] = {"signature": protocol.sign(message, self.secret)}
        return message

    def publish(self, payload) -> int:
        data = payload if isinstance(payload, (bytes, str)) else json.dumps(payload)
        client = self.server.client()
        try:
            if self.sharded:
                return client.spublish(f"cockpit-agent:{self.agent_id}", data)
            return client.publish(f"cockpit-agent:{self.agent_id}", data)
        finally:
            client.close()

    def send(self, command: str, params: dict | None = None, **fields) -> str:
        message = self.message(command, params, **fields)
        self.publish(message)
        return message["command_id"]

    def responses_for(self, command_id: str) -> list[dict]:
        with self._lock:
            return [r for r in self.responses if r.get("command_id") == command_id]

    def wait(self, command_id: str, timeout: float = 15.0) -> dict:
        return wait_for(lambda: (self.responses_for(command_id) or [None])[0], timeout,
                        message=f"a response to {command_id}")

    def call(self, command: str, params: dict | None = None, timeout: float = 15.0, **fields) -> dict:
        return self.wait(self.send(command, params, **fields), timeout)


@pytest.fixture
def make_backend(redis_server):
    made = []

    def make(agent_id: str, secret: str | None = None, server: RedisServer | None = None) -> Backend:
        backend = Backend(server or redis_server, agent_id, secret)
        made.append(backend)
        return backend

    yield make
    for backend in made:
        backend.close()


class AgentProcess:
    """``python agent.py`` as a child process, logging to a file."""

    def __init__(self, env: dict, workdir: Path, args: tuple[str, ...] = ()):
        self.env, self.workdir, self.args = env, workdir, args
        self.log_path = workdir / f"agent-{uuid.uuid4().hex[:6]}.log"
        self.proc: subprocess.Popen | None = None

    def start(self) -> AgentProcess:
        self.log_path = self.workdir / f"agent-{uuid.uuid4().hex[:6]}.log"
        self._log = open(self.log_path, "w")
        self.proc = subprocess.Popen([sys.executable, str(ROOT / "agent.py"), *self.args], env=self.env,
                                     cwd=self.workdir, stdout=self._log, stderr=subprocess.STDOUT)
        return self

    def log(self) -> str:
        return self.log_path.read_text() if self.log_path.exists() else ""

    def wait_subscribed(self, server: RedisServer | LocalCluster, timeout: float = 15.0) -> None:
        channel = f"cockpit-agent:{self.env['AGENT_ID']}"

        def subscribed():
            assert self.proc.poll() is None, f"agent exited early:\n{self.log()}"
            if isinstance(server, LocalCluster):
                return server.numsub(channel) >= 1
            try:
                return server.client().pubsub_numsub(channel)[0][1] >= 1
            except redis.RedisError:
                return False

        wait_for(subscribed, timeout, message="the agent to subscribe")

    def terminate(self, timeout: float = 30) -> int:
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout)

    def kill(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)

    def close(self) -> None:
        self.kill()
        self._log.close()


@pytest.fixture
def agent_process(tmp_path, agent_env):
    started: list[AgentProcess] = []

    def make(env: dict | None = None, args: tuple[str, ...] = ()) -> AgentProcess:
        agent = AgentProcess(env or agent_env, tmp_path, args)
        started.append(agent)
        return agent

    yield make
    for agent in started:
        agent.close()


@pytest.fixture
def config_from(monkeypatch):
    """Build a Config from exactly ``env`` (the test's environment is cleared of agent variables)."""
    import config as config_module

    def build(env: dict):
        for name in list(os.environ):
            if name.startswith(("REDIS_", "AGENT_", "COCKPIT_", "GIT_", "DOCKER_", "OUTBOX_", "LOG")):
                monkeypatch.delenv(name, raising=False)
        for name, value in env.items():
            monkeypatch.setenv(name, value)
        # No settings file unless the test names one: a COCKPIT_AGENT_ENV_FILE that does not
        # exist is none (an --env-file that does not exist is an error).
        monkeypatch.setenv("COCKPIT_AGENT_ENV_FILE", env.get("COCKPIT_AGENT_ENV_FILE", "/nonexistent/.env"))
        return config_module.load()

    return build


@pytest.fixture
def running_agent(agent_env, config_from):
    """An Agent running in this process (threads only; no signal handlers), stopped after the test."""
    from agent import Agent

    agents = []

    def start(**overrides):
        env = {**agent_env, **{k: str(v) for k, v in overrides.items()}}
        agent = Agent(config_from(env))
        agent.start()
        agents.append(agent)
        wait_for(agent.redis_connected.is_set, 15, message="the agent to subscribe")
        # Its threads' setup too (tests reach into agent.intake_loop.intake, agent.flusher.unconfirmed):
        # the listener can be online before another thread has run its setup, on a loaded machine.
        loops = (agent.intake_loop, agent.flusher, agent.heartbeat, *agent.pool.workers)
        wait_for(lambda: all(loop.ready.is_set() for loop in loops), 10, message="the agent's threads to start")
        return agent

    yield start
    for agent in agents:
        agent.stop_requested.set()
        agent.shutdown()

