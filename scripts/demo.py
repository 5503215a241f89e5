#!/usr/bin/env python3
"""``make demo``: the agent against a private Redis, a throwaway git repository and this
machine's docker CLI, driven the way the Cockpit backend drives it; then the headline: Redis is
killed while a command runs, the answer waits in SQLite (the sqlite3 shell and
``agent.py outbox list`` show it), Redis comes back and the answer is delivered.

Everything it starts lives in a temporary directory and is stopped before it exits; it needs
no input and takes a few seconds.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import tempfile
import time
import uuid
from datetime import datetime, timezone
from pathlib import Path

import redis

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import protocol  # noqa: E402

PASSWORD = "demo-" + uuid.uuid4().hex[:12]
SECRET = "demo-secret-" + uuid.uuid4().hex[:12]
AGENT_ID = "demo-host"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def git(*args: str, cwd: Path) -> None:
    env = {**os.environ, "GIT_AUTHOR_NAME": "demo", "GIT_AUTHOR_EMAIL": "demo@example.invalid",
           "GIT_COMMITTER_NAME": "demo", "GIT_COMMITTER_EMAIL": "demo@example.invalid"}
    subprocess.run(["git", *args], cwd=cwd, env=env, check=True, capture_output=True)


def wait_for(condition, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.05)
    raise SystemExit(f"demo: timed out waiting for {what}")


def section(title: str) -> None:
    print(f"\n== {title} " + "=" * max(0, 70 - len(title)))


def readable(field: str, value: str) -> str:
    """A registry field as HGETALL shows it, with a unix time also as a date and an age."""
    if field in ("last_heartbeat", "started_at"):
        try:
            ts = float(value)
        except ValueError:
            return value
        date = datetime.fromtimestamp(ts, timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")
        return f"{value} ({date}, {max(0, int(time.time() - ts))} s ago)"
    return value


def sqlite_shell(db: str, query: str) -> None:
    """Show ``query`` on ``db`` the way an operator reads it: with the sqlite3 shell, or, on a
    machine without one, through Python's sqlite3 module (and say so)."""
    print(f"$ sqlite3 -header -column {db} \"{query}\"")
    if shutil.which("sqlite3"):
        out = subprocess.run(["sqlite3", "-header", "-column", db, query], capture_output=True, text=True,
                             timeout=30, stdin=subprocess.DEVNULL)
        print("  " + (out.stdout + out.stderr).rstrip().replace("\n", "\n  "))
        return
    print("  (no sqlite3 shell on this machine: the same query through Python's sqlite3 module)")
    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    try:
        cursor = conn.execute(query)
        print("  " + " | ".join(col[0] for col in cursor.description))
        for row in cursor:
            print("  " + " | ".join("" if v is None else str(v).replace("\n", " ") for v in row))
    finally:
        conn.close()


class PrivateRedis:
    """The demo's own redis-server on 127.0.0.1:PORT, which it kills and starts again."""

    def __init__(self, port: int, workdir: Path):
        self.port, self.workdir = port, workdir
        self.proc: subprocess.Popen | None = None
        self.client = redis.Redis(port=port, password=PASSWORD, decode_responses=True, socket_timeout=5)

    def start(self) -> None:
        self.proc = subprocess.Popen(
            ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--requirepass", PASSWORD,
             "--save", "", "--appendonly", "no", "--dir", str(self.workdir)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_for(self.up, 10, "redis-server")

    def up(self) -> bool:
        try:
            return self.client.ping()
        except redis.RedisError:
            return False

    def kill(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)


class Backend:
    """Plays the Cockpit backend: subscribed to the answers, publishes signed commands."""

    def __init__(self, server: PrivateRedis):
        self.server = server
        self.subscribe()

    def subscribe(self) -> None:
        self.pubsub = self.server.client.pubsub(ignore_subscribe_messages=True)
        self.pubsub.subscribe(f"cockpit-agent-response:{AGENT_ID}")
        wait_for(lambda: self.pubsub.get_message(timeout=0.05) is None and self.pubsub.subscribed, 5,
                 "the subscription")

    def publish(self, command: str, params: dict) -> str:
        message = {"command_id": str(uuid.uuid4()), "command": command, "params": params,
                   "timestamp": int(time.time()), "sender": "cockpit-backend"}
        message["auth"] = {"signature": protocol.sign(message, SECRET)}
        shown = dict(message, auth={"signature": message["auth"]["signature"][:16] + "..."})
        print(f"PUBLISH cockpit-agent:{AGENT_ID} {json.dumps(shown)}")
        self.server.client.publish(f"cockpit-agent:{AGENT_ID}", json.dumps(message))
        return message["command_id"]

    def wait(self, command_id: str, timeout: float = 30) -> dict:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            got = self.pubsub.get_message(timeout=0.5)
            if got and got["type"] == "message":
                response = json.loads(got["data"])
                if response.get("command_id") == command_id:
                    print(f"response on cockpit-agent-response:{AGENT_ID}:")
                    print("  " + json.dumps(response, indent=2).replace("\n", "\n  "))
                    return response
        raise SystemExit(f"demo: no response to {command_id} within {timeout:g} s")

    def send(self, command: str, params: dict) -> dict:
        section(command)
        return self.wait(self.publish(command, params))


def operator(env: dict, *args: str) -> None:
    """Run ``python agent.py ARGS`` as an operator would, and show what it prints."""
    print(f"$ python agent.py {' '.join(args)}")
    out = subprocess.run([sys.executable, str(ROOT / "agent.py"), *args], env=env, capture_output=True,
                         text=True, timeout=30, stdin=subprocess.DEVNULL)
    print("  " + (out.stdout + out.stderr).rstrip().replace("\n", "\n  "))


def main() -> int:
    started = time.monotonic()
    work = Path(tempfile.mkdtemp(prefix="cockpit-agent-demo-"))
    server = PrivateRedis(free_port(), work)
    agent: subprocess.Popen | None = None
    try:
        section(f"private redis-server on 127.0.0.1:{server.port}")
        server.start()
        client = server.client

        section("throwaway git repository: origin and the clone the agent pulls")
        origin, clone = work / "origin", work / "config"
        git("init", "-q", "-b", "main", str(origin), cwd=work)
        (origin / "grafana.ini").write_text("[server]\nhttp_port = 3000\n")
        git("add", ".", cwd=origin)
        git("commit", "-q", "-m", "first config", cwd=origin)
        git("clone", "-q", str(origin), str(clone), cwd=work)
        (origin / "alerts.yaml").write_text("groups: []\n")
        git("add", ".", cwd=origin)
        git("commit", "-q", "-m", "add alerts", cwd=origin)
        print(f"origin {origin} (one commit ahead), clone {clone}")

        section("the agent: python agent.py")
        db_path = str(work / "state" / "outbox.db")
        env = {
            "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
            "HOME": str(work),
            "REDIS_HOST": "127.0.0.1", "REDIS_PORT": str(server.port), "REDIS_PASSWORD": PASSWORD,
            "AGENT_HOSTNAME": AGENT_ID, "GIT_REPO_PATH": str(clone), "DOCKER_CONTAINER_NAME": "grafana",
            "OUTBOX_DB": db_path, "COCKPIT_SHARED_SECRET": SECRET,
            "HEARTBEAT_INTERVAL": "5", "DOCKER_TIMEOUT": "10", "COCKPIT_AGENT_ENV_FILE": str(work / "none.env"),
        }
        log_path = work / "agent.log"
        agent = subprocess.Popen([sys.executable, str(ROOT / "agent.py"), "run"], env=env,
                                 stdout=open(log_path, "w"), stderr=subprocess.STDOUT)
        wait_for(lambda: client.hget(f"agents:{AGENT_ID}", "status") == "online", 15, "the agent to register")
        print(f"HGETALL agents:{AGENT_ID}")
        for field, value in client.hgetall(f"agents:{AGENT_ID}").items():
            print(f"  {field}: {readable(field, value)}")

        backend = Backend(server)
        results = [
            backend.send("echo", {"message": "hello from the demo"}),
            backend.send("git_pull", {"repository_path": str(clone), "branch": "main"}),
            backend.send("git_status", {"repository_path": str(clone)}),
            backend.send("docker_restart", {"container_name": "grafana"}),
            backend.send("git_pull", {"branch": "--upload-pack=touch /tmp/pwned"}),
        ]
        if shutil.which("docker") is None:
            print("(no docker CLI on this machine: the error above says so)")
        else:
            print("(the docker CLI is here but no Docker engine answers: the error above is docker's own)")

        section("the commands table, read with the sqlite3 shell")
        # A response leaves the outbox once Redis confirmed it, a moment after it arrived here.
        wait_for(lambda: count(db_path, "SELECT count(*) FROM outbox") == 0, 10, "the outbox to drain")
        sqlite_shell(db_path, "SELECT command, state, status, execution_time_ms AS ms, "
                              "substr(replace(coalesce(error, output), char(10), ' '), 1, 44) AS result "
                              "FROM commands ORDER BY seq")

        # -- the headline: Redis dies while a command runs; the answer waits and is delivered ----
        section("Redis is killed while a command runs")
        (origin / "dashboards.json").write_text("{}\n")
        git("add", ".", cwd=origin)
        git("commit", "-q", "-m", "add dashboards", cwd=origin)
        hook = clone / ".git" / "hooks" / "post-merge"
        hook.write_text("#!/bin/sh\nsleep 2\n")
        hook.chmod(0o755)
        print("origin has a new commit; the clone's post-merge hook takes 2 s, so the pull is still running")
        command_id = backend.publish("git_pull", {"repository_path": str(clone), "branch": "main"})
        wait_for(lambda: count(db_path, "SELECT count(*) FROM commands WHERE command_id = ? AND state = 'running'",
                               command_id), 10, "git_pull to start")
        server.kill()
        print(f"git_pull is running: kill -9 redis-server (pid {server.proc.pid})")
        wait_for(lambda: count(db_path, "SELECT count(*) FROM outbox WHERE command_id = ?", command_id),
                 15, "the answer in the outbox")
        print("git_pull finished with Redis gone: its answer waits in the outbox table")
        sqlite_shell(db_path, pending_query(db_path))
        operator(env, "outbox", "list")

        section("Redis is back: the waiting answer is delivered")
        server.start()
        backend.subscribe()  # the backend's subscriber reconnects, as the real one does
        print(f"redis-server started again on 127.0.0.1:{server.port} (empty: it kept nothing)")
        delivered = backend.wait(command_id, timeout=30)
        wait_for(lambda: count(db_path, "SELECT count(*) FROM outbox") == 0, 10, "the outbox to drain")
        operator(env, "outbox", "list")
        operator(env, "history", "-n", "3")

        section("SIGTERM: the agent stops cleanly")
        agent.send_signal(signal.SIGTERM)
        code = agent.wait(30)
        print(f"exit code {code}; registry status: {client.hget(f'agents:{AGENT_ID}', 'status')}")
        ok = (code == 0 and results[0]["status"] == "success" and results[1]["status"] == "success"
              and results[2]["status"] == "success" and results[3]["status"] == "error"
              and results[4]["status"] == "error" and delivered["status"] == "success")
        if not ok:
            print("demo: something did not behave as expected; the agent's log:\n" + log_path.read_text())
            return 1
        print(f"\ndemo finished in {time.monotonic() - started:.0f} s: echo, git_pull and git_status succeeded; "
              "docker_restart and the hostile branch were refused with clear errors; the git_pull that "
              "finished while Redis was down waited in the outbox and was delivered once Redis was back.")
        return 0
    finally:
        if agent is not None and agent.poll() is None:
            agent.kill()
            agent.wait(10)
        server.kill()
        shutil.rmtree(work, ignore_errors=True)


def count(db: str, query: str, *params) -> int:
    """One number from the agent's database, read on a read-only connection of its own."""
    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=5)
    try:
        return conn.execute(query, params).fetchone()[0]
    finally:
        conn.close()


def pending_query(db: str) -> str:
    """What waits, with readable times: the schema's ``pending`` view where it has one."""
    if count(db, "SELECT count(*) FROM sqlite_master WHERE type = 'view' AND name = 'pending'"):
        return "SELECT id, command_id, created, waiting_s, attempts, next_attempt, last_error FROM pending"
    return ("SELECT id, command_id, datetime(created_at, 'unixepoch') AS created, attempts, last_error "
            "FROM outbox ORDER BY id")


if __name__ == "__main__":
    sys.exit(main())
