#!/usr/bin/env python3
"""``make demo``: the agent against a private Redis, a throwaway git repository and this
machine's docker CLI, driven the way the Cockpit backend drives it.

Everything it starts lives in a temporary directory and is stopped before it exits.
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


def main() -> int:
    work = Path(tempfile.mkdtemp(prefix="cockpit-agent-demo-"))
    port = free_port()
    procs: list[subprocess.Popen] = []
    try:
        section(f"private redis-server on 127.0.0.1:{port}")
        procs.append(subprocess.Popen(
            ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--requirepass", PASSWORD,
             "--save", "", "--appendonly", "no", "--dir", str(work)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        client = redis.Redis(port=port, password=PASSWORD, decode_responses=True)

        def redis_up():
            try:
                return client.ping()
            except redis.RedisError:
                return False

        wait_for(redis_up, 10, "redis-server")

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
        env = {
            "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
            "HOME": str(work),
            "REDIS_HOST": "127.0.0.1", "REDIS_PORT": str(port), "REDIS_PASSWORD": PASSWORD,
            "AGENT_HOSTNAME": AGENT_ID, "GIT_REPO_PATH": str(clone), "DOCKER_CONTAINER_NAME": "grafana",
            "OUTBOX_DB": str(work / "state" / "outbox.db"), "COCKPIT_SHARED_SECRET": SECRET,
            "HEARTBEAT_INTERVAL": "5", "DOCKER_TIMEOUT": "10", "COCKPIT_AGENT_ENV_FILE": str(work / "none.env"),
        }
        log_path = work / "agent.log"
        agent = subprocess.Popen([sys.executable, str(ROOT / "agent.py"), "run"], env=env,
                                 stdout=open(log_path, "w"), stderr=subprocess.STDOUT)
        procs.append(agent)
        wait_for(lambda: client.hget(f"agents:{AGENT_ID}", "status") == "online", 15, "the agent to register")
        print(f"HGETALL agents:{AGENT_ID}")
        for field, value in client.hgetall(f"agents:{AGENT_ID}").items():
            print(f"  {field}: {value}")

        pubsub = client.pubsub(ignore_subscribe_messages=True)
        pubsub.subscribe(f"cockpit-agent-response:{AGENT_ID}")
        wait_for(lambda: pubsub.get_message(timeout=0.1) is None and pubsub.subscribed, 5, "the subscription")

        def send(command: str, params: dict) -> dict:
            message = {"command_id": str(uuid.uuid4()), "command": command, "params": params,
                       "timestamp": int(time.time()), "sender": "cockpit-backend"}
            message["auth"] = {"signature": protocol.sign(message, SECRET)}
            section(f"{command}")
            shown = dict(message, auth={"signature": message["auth"]["signature"][:16] + "..."})
            print(f"PUBLISH cockpit-agent:{AGENT_ID} {json.dumps(shown)}")
            client.publish(f"cockpit-agent:{AGENT_ID}", json.dumps(message))
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline:
                got = pubsub.get_message(timeout=0.5)
                if got and got["type"] == "message":
                    response = json.loads(got["data"])
                    if response.get("command_id") == message["command_id"]:
                        print(f"response on cockpit-agent-response:{AGENT_ID}:")
                        print("  " + json.dumps(response, indent=2).replace("\n", "\n  "))
                        return response
            raise SystemExit(f"demo: no response to {command}")

        results = [
            send("echo", {"message": "hello from the demo"}),
            send("git_pull", {"repository_path": str(clone), "branch": "main"}),
            send("git_status", {"repository_path": str(clone)}),
            send("docker_restart", {"container_name": "grafana"}),
            send("git_pull", {"branch": "--upload-pack=touch /tmp/pwned"}),
        ]
        if shutil.which("docker") is None:
            print("(no docker CLI on this machine: the error above says so)")
        else:
            print("(the docker CLI is here but no Docker engine answers: the error above is docker's own)")

        section("the commands table: sqlite3 state/outbox.db")
        query = ("SELECT command_id, command, state, status, execution_time_ms, substr(coalesce(error, output), 1, 50) "
                 "FROM commands ORDER BY seq")
        print(f"sqlite3 {env['OUTBOX_DB']} \"{query}\"")
        db = sqlite3.connect(env["OUTBOX_DB"])
        # A response leaves the outbox once Redis confirmed it, a moment after it arrived here.
        wait_for(lambda: db.execute("SELECT count(*) FROM outbox").fetchone()[0] == 0, 10, "the outbox to drain")
        for row in db.execute(query):
            print("  " + " | ".join("" if v is None else str(v).replace("\n", " ") for v in row))
        print(f"waiting in outbox: {db.execute('SELECT count(*) FROM outbox').fetchone()[0]}")
        db.close()

        section("SIGTERM: the agent stops cleanly")
        agent.send_signal(signal.SIGTERM)
        code = agent.wait(30)
        print(f"exit code {code}; registry status: {client.hget(f'agents:{AGENT_ID}', 'status')}")
        ok = (code == 0 and results[0]["status"] == "success" and results[1]["status"] == "success"
              and results[2]["status"] == "success" and results[3]["status"] == "error"
              and results[4]["status"] == "error")
        if not ok:
            print("demo: something did not behave as expected; the agent's log:\n" + log_path.read_text())
            return 1
        print("\ndemo finished: echo, git_pull and git_status succeeded; docker_restart and the hostile branch were refused with clear errors.")
        return 0
    finally:
        for proc in reversed(procs):
            if proc.poll() is None:
                proc.kill()
                proc.wait(10)
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
