#!/usr/bin/env python3
"""``make fleet N=100``: what a fleet of agents costs one Redis, measured with real agents.

Starts a private redis-server and N ``agent.py`` processes (each with its own database, all
idle at HEARTBEAT_INTERVAL, 30 s by default), then prints per agent, and times 10,000:
connections, idle Redis commands per second by command (the commands the agents send, from
MONITOR, and beside them what Redis runs inside their scripts), Redis memory, keys per
answered command, the time for one echo to each of the N (published together), and the time
until all are subscribed and in the registry again after a Redis restart, with the rate at
which their connections arrive. The figures are also written to bench/results/fleet-N.json.

The budgets it checks (issue "A fleet on one Redis"): at most 2 connections per agent, at most
0.04 commands per second per idle agent at HEARTBEAT_INTERVAL=30, at most one key per answered
command and none without an expiry, all back within 10 s of a Redis restart.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path

import redis

ROOT = Path(__file__).resolve().parent.parent
PASSWORD = "fleet-" + uuid.uuid4().hex[:12]
FLEET = 10_000
BUDGET = {"connections": 2, "idle_commands_per_s": 0.04, "keys_per_answer": 1, "back_within_s": 10.0}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """A private redis-server that can be restarted on its port."""

    def __init__(self, workdir: Path, port: int | None = None):
        self.workdir, self.port = workdir, port or free_port()
        self.proc: subprocess.Popen | None = None

    def start(self) -> Server:
        self.proc = subprocess.Popen(
            ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--requirepass", PASSWORD,
             "--save", "", "--appendonly", "no", "--maxclients", "20000", "--dir", str(self.workdir),
             "--loglevel", "warning"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                if self.client().ping():
                    return self
            except redis.RedisError:
                time.sleep(0.02)
        raise RuntimeError("redis-server did not start")

    def client(self, **kwargs) -> redis.Redis:
        return redis.Redis(port=self.port, password=PASSWORD, socket_timeout=10, **kwargs)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(10)


# -- what Redis sees ---------------------------------------------------------------------------

def agent_connections(client: redis.Redis) -> dict[str, int]:
    """Connections by agent id, from CLIENT LIST (each agent names its connections)."""
    counts: collections.Counter[str] = collections.Counter()
    for entry in client.client_list():
        name = entry.get("name", "")
        if name.startswith("cockpit-agent:"):
            counts[name[len("cockpit-agent:"):]] += 1
    return dict(counts)


MONITOR_LINE = re.compile(r'^\d+\.\d+ \[\d+ ([^\]]+)\] "([^"]+)"')


class Monitor:
    """MONITOR in a thread: every command Redis runs, with who sent it ("lua": inside a script)."""

    def __init__(self, port: int, password: str = PASSWORD):
        self.port, self.password = port, password
        self.lines: list[tuple[str, str]] = []
        self._stop = threading.Event()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> Monitor:
        self._thread.start()
        self._ready.wait(10)
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(10)

    def _run(self) -> None:
        connection = redis.Connection(port=self.port, password=self.password, socket_timeout=10)
        connection.connect()
        connection.send_command("MONITOR")
        connection.read_response()  # OK
        self._ready.set()
        while not self._stop.is_set():
            if not connection.can_read(timeout=0.2):
                continue
            line = connection.read_response()
            match = MONITOR_LINE.match(line.decode(errors="replace") if isinstance(line, bytes) else str(line))
            if match:
                self.lines.append((match.group(1), match.group(2).upper()))
        connection.disconnect()

    def by_agent(self, addresses: dict[str, str]) -> tuple[dict[str, collections.Counter], collections.Counter]:
        """Commands sent, by agent (via ``addresses``: addr -> agent id), and those run in scripts."""
        sent: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
        scripted: collections.Counter[str] = collections.Counter()
        for source, command in self.lines:
            if source == "lua":
                scripted[command] += 1
            elif source in addresses:
                sent[addresses[source]][command] += 1
        return sent, scripted


def agent_addresses(client: redis.Redis) -> dict[str, str]:
    """addr -> agent id of every agent connection."""
    return {entry["addr"]: entry["name"][len("cockpit-agent:"):] for entry in client.client_list()
            if entry.get("name", "").startswith("cockpit-agent:")}


def all_online(client: redis.Redis, ids: list[str], since: float = 0.0) -> int:
    """How many of ``ids`` are subscribed and in the registry (status online, beat since ``since``)."""
    pipe = client.pipeline(transaction=False)
    for agent_id in ids:
        pipe.hmget(f"agents:{agent_id}", "status", "last_heartbeat")
    pipe.pubsub_numsub(*[f"cockpit-agent:{agent_id}" for agent_id in ids])
    replies = pipe.execute()
    subscribed = dict(replies.pop())
    count = 0
    for agent_id, (status, beat) in zip(ids, replies):
        if status == b"online" and beat and int(beat) >= since and subscribed.get(
                f"cockpit-agent:{agent_id}".encode(), 0) >= 1:
            count += 1
    return count


# -- the fleet -----------------------------------------------------------------------------------

def agent_env(server: Server, workdir: Path, agent_id: str, interval: int, extra: dict) -> dict:
    return {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "HOME": str(workdir),
        "REDIS_HOST": "127.0.0.1",
        "REDIS_PORT": str(server.port),
        "REDIS_PASSWORD": PASSWORD,
        "AGENT_ID": agent_id,
        "GIT_REPO_PATH": str(workdir / "repo"),
        "DOCKER_CONTAINER_NAME": "grafana",
        "DOCKER_BIN": "/bin/true",
        "OUTBOX_DB": str(workdir / "db" / f"{agent_id}.db"),
        "HEARTBEAT_INTERVAL": str(interval),
        "WORKER_COUNT": "2",
        "LOG_LEVEL": "WARNING",
        "COCKPIT_AGENT_ENV_FILE": str(workdir / "no.env"),
        **extra,
    }


class Fleet:
    def __init__(self, server: Server, workdir: Path, n: int, interval: int, extra: dict | None = None,
                 prefix: str = "fleet"):
        self.server, self.workdir, self.interval = server, workdir, interval
        self.ids = [f"{prefix}-{i:04d}" for i in range(n)]
        (workdir / "db").mkdir(parents=True, exist_ok=True)
        (workdir / "logs").mkdir(exist_ok=True)
        repo = workdir / "repo"
        if not repo.exists():
            subprocess.run(["git", "init", "-q", str(repo)], check=True)
        self.extra = extra or {}
        self.procs: list[subprocess.Popen] = []

    def start(self) -> None:
        for agent_id in self.ids:
            log = open(self.workdir / "logs" / f"{agent_id}.log", "w")
            self.procs.append(subprocess.Popen(
                [sys.executable, str(ROOT / "agent.py")], cwd=self.workdir, stdout=log, stderr=subprocess.STDOUT,
                env=agent_env(self.server, self.workdir, agent_id, self.interval, self.extra)))

    def wait_online(self, timeout: float, since: float = 0.0) -> float | None:
        """Seconds until all are online (None: not within ``timeout``)."""
        started = time.monotonic()
        client = self.server.client()
        while time.monotonic() - started < timeout:
            dead = [agent_id for agent_id, proc in zip(self.ids, self.procs) if proc.poll() is not None]
            if dead:
                log = (self.workdir / "logs" / f"{dead[0]}.log").read_text()[-2000:]
                raise RuntimeError(f"{len(dead)} agents exited, e.g. {dead[0]}:\n{log}")
            try:
                if all_online(client, self.ids, since) == len(self.ids):
                    return time.monotonic() - started
            except redis.RedisError:
                pass
            time.sleep(0.05)
        return None

    def stop(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + 30
        for proc in self.procs:
            try:
                proc.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.kill()


def broadcast_echo(server: Server, ids: list[str], timeout: float = 60.0) -> tuple[float | None, int]:
    """One echo to each agent, published together: seconds until all N answers, and their count."""
    listener = server.client().pubsub()
    listener.psubscribe("cockpit-agent-response:*")
    while listener.get_message(timeout=1) is None:
        pass
    wanted = {}
    pipe = server.client().pipeline(transaction=False)
    for agent_id in ids:
        command_id = uuid.uuid4().hex
        wanted[command_id] = agent_id
        pipe.publish(f"cockpit-agent:{agent_id}", json.dumps(
            {"command_id": command_id, "command": "echo", "params": {"message": "fleet"}}))
    started = time.monotonic()
    pipe.execute()
    answered = set()
    while len(answered) < len(wanted) and time.monotonic() - started < timeout:
        message = listener.get_message(timeout=1)
        if message and message["type"] == "pmessage":
            answered.add(json.loads(message["data"])["command_id"])
    elapsed = time.monotonic() - started
    listener.close()
    return (elapsed if len(answered) == len(wanted) else None), len(answered & set(wanted))


def keys_report(client: redis.Redis, ids: list[str]) -> dict:
    """The agents' keys: registry hashes, the others (result keys), and any without an expiry."""
    registry = others = no_expiry = 0
    for key in client.scan_iter(count=1000):
        name = key.decode()
        if name.startswith("agents:"):
            registry += 1
        else:
            others += 1
        if client.ttl(key) < 0:
            no_expiry += 1
    return {"registry": registry, "other": others, "no_expiry": no_expiry}


def restart(server: Server, fleet: Fleet, timeout: float) -> dict:
    """Redis stops and starts again (empty): seconds until all are back, and how fast they came."""
    client = server.client()
    try:
        client.shutdown(nosave=True)
    except redis.ConnectionError:
        pass
    server.proc.wait(10)
    down_at = time.time()
    server.start()
    up = time.monotonic()
    samples = []  # (s since up, total connections received)
    back = None
    client = server.client()
    while time.monotonic() - up < timeout:
        try:
            received = client.info("stats")["total_connections_received"]
            samples.append((time.monotonic() - up, received))
            if all_online(client, fleet.ids, since=int(down_at)) == len(fleet.ids):
                back = time.monotonic() - up
                break
        except redis.RedisError:
            pass
        time.sleep(0.1)
    # Connections per second, over 0.5 s windows (our own sampling client counts 1).
    per_window = []
    for (t0, c0), (t1, c1) in zip(samples, samples[5:]):
        if t1 > t0:
            per_window.append((c1 - c0) / (t1 - t0))
    arrivals = [t for (t, c), (_, c_prev) in zip(samples[1:], samples) if c > c_prev]
    spread = (arrivals[-1] - arrivals[0]) if len(arrivals) > 1 else 0.0
    return {"back_s": back, "peak_connections_per_s": max(per_window, default=0.0),
            "arrival_spread_s": spread, "connections_received": samples[-1][1] if samples else 0}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("-n", type=int, default=int(os.environ.get("N", 100)), help="agents (default 100)")
    parser.add_argument("--interval", type=int, default=30, help="HEARTBEAT_INTERVAL (default 30)")
    parser.add_argument("--idle", type=float, default=None,
                        help="seconds of idle measured (default two heartbeat intervals: 60)")
    parser.add_argument("--out", default=None, help="results JSON (default bench/results/fleet-N.json)")
    args = parser.parse_args(argv)
    if shutil.which("redis-server") is None:
        print("fleet: redis-server is not installed", file=sys.stderr)
        return 2
    n = args.n
    args.idle = args.idle or 2.0 * args.interval
    workdir = Path(tempfile.mkdtemp(prefix="cockpit-fleet-"))
    server = Server(workdir).start()
    fleet = Fleet(server, workdir, n, args.interval)
    client = server.client()
    results: dict = {"n": n, "heartbeat_interval": args.interval}
    try:
        memory_before = client.info("memory")["used_memory"]
        started = time.monotonic()
        fleet.start()
        online = fleet.wait_online(timeout=max(120.0, n * 1.0))
        results["start_to_all_online_s"] = online
        print(f"{n} agents online in {online:.1f} s" if online else f"not all {n} agents came online", flush=True)
        if online is None:
            return 1
        time.sleep(1.0)  # their first beats and confirmations are done
        conns = agent_connections(client)
        results["connections_idle"] = sum(conns.values()) / n
        results["connections_idle_max"] = max(conns.values())
        results["redis_memory_per_agent_bytes"] = (client.info("memory")["used_memory"] - memory_before) / n

        addresses = agent_addresses(client)
        client.config_resetstat()
        with Monitor(server.port) as monitor:
            time.sleep(args.idle)
        sent, scripted = monitor.by_agent(addresses)
        by_command: collections.Counter[str] = collections.Counter()
        for counter in sent.values():
            by_command.update(counter)
        per_s = sum(by_command.values()) / n / args.idle
        results["idle_commands_per_s"] = per_s
        results["idle_commands_by_command_per_s"] = {c: v / n / args.idle for c, v in by_command.most_common()}
        results["idle_commands_in_scripts_per_s"] = {c: v / n / args.idle for c, v in scripted.most_common()}
        results["idle_window_s"] = args.idle

        echo_s, answered = broadcast_echo(server, fleet.ids)
        results["broadcast_echo_s"], results["broadcast_answered"] = echo_s, answered
        time.sleep(1.5)  # the beats that bring commands_executed up to date
        conns = agent_connections(client)
        results["connections_working"] = sum(conns.values()) / n
        results["connections_working_max"] = max(conns.values())
        keys = keys_report(client, fleet.ids)
        results["keys_per_answer"] = keys["other"] / max(1, answered)
        results["keys_without_expiry"] = keys["no_expiry"]

        back = restart(server, fleet, timeout=60.0)
        results.update({f"restart_{k}": v for k, v in back.items()})
        time.sleep(1.0)
        conns = agent_connections(server.client())
        results["connections_after_restart"] = sum(conns.values()) / n
        results["connections_after_restart_max"] = max(conns.values(), default=0)
        results["elapsed_s"] = time.monotonic() - started
    finally:
        fleet.stop()
        server.stop()
        shutil.rmtree(workdir, ignore_errors=True)

    report(results)
    out = Path(args.out) if args.out else ROOT / "bench" / "results" / f"fleet-{n}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"written to {out.relative_to(ROOT) if out.is_relative_to(ROOT) else out}")
    return 0 if within_budget(results) else 1


def within_budget(r: dict) -> bool:
    return (max(r["connections_idle_max"], r["connections_working_max"], r["connections_after_restart_max"])
            <= BUDGET["connections"]
            and r["idle_commands_per_s"] <= BUDGET["idle_commands_per_s"]
            and r["keys_per_answer"] <= BUDGET["keys_per_answer"] and r["keys_without_expiry"] == 0
            and r["restart_back_s"] is not None and r["restart_back_s"] <= BUDGET["back_within_s"])


def report(r: dict) -> None:
    n, x = r["n"], FLEET / r["n"]
    def fmt(value, spec=".2f"):
        return "-" if value is None else format(value, spec)
    rows = [
        ("connections per agent, idle", fmt(r["connections_idle"]), fmt(r["connections_idle"] * FLEET, ",.0f"),
         f"<= {BUDGET['connections']}"),
        ("connections per agent, after commands", fmt(r["connections_working"]),
         fmt(r["connections_working"] * FLEET, ",.0f"), f"<= {BUDGET['connections']}"),
        ("connections per agent, after a Redis restart", fmt(r["connections_after_restart"]),
         fmt(r["connections_after_restart"] * FLEET, ",.0f"), f"<= {BUDGET['connections']}"),
        (f"idle commands per second (HEARTBEAT_INTERVAL={r['heartbeat_interval']})", fmt(r["idle_commands_per_s"], ".4f"),
         fmt(r["idle_commands_per_s"] * FLEET, ",.0f"), f"<= {BUDGET['idle_commands_per_s']}"),
        ("Redis memory per agent (bytes)", fmt(r["redis_memory_per_agent_bytes"], ",.0f"),
         fmt(r["redis_memory_per_agent_bytes"] * FLEET / 2**20, ",.0f") + " MiB", ""),
        ("keys per answered command", fmt(r["keys_per_answer"]), "", f"<= {BUDGET['keys_per_answer']}"),
        ("keys without an expiry", str(r["keys_without_expiry"]), "", "0"),
        (f"one echo to each of the {n}, published together (s)", fmt(r["broadcast_echo_s"]), "", ""),
        ("all back after a Redis restart (s)", fmt(r["restart_back_s"]), "", f"<= {BUDGET['back_within_s']:g}"),
        ("their connections arrived over (s)", fmt(r["restart_arrival_spread_s"]), "", ""),
        ("peak connections per second after the restart", fmt(r["restart_peak_connections_per_s"], ",.0f"),
         fmt(r["restart_peak_connections_per_s"] * x, ",.0f"), ""),
    ]
    width = max(len(row[0]) for row in rows)
    print(f"\n{'':{width}}  {'per agent':>12}  {'x 10,000':>12}  budget")
    for label, one, fleet, budget in rows:
        print(f"{label:{width}}  {one:>12}  {fleet:>12}  {budget}")
    print("\nidle commands sent per agent per second, by command:")
    for command, rate in r["idle_commands_by_command_per_s"].items():
        print(f"  {command:<12} {rate:.4f}")
    print("run by Redis inside those scripts, per agent per second:")
    for command, rate in r["idle_commands_in_scripts_per_s"].items():
        print(f"  {command:<12} {rate:.4f}")
    print(f"\n{n} agents, {r['elapsed_s']:.0f} s in all")


if __name__ == "__main__":
    sys.exit(main())
