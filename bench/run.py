#!/usr/bin/env python3
"""``make bench``: the agent measured against the floor, side by side, in one run.

Three subjects, each a child process with its own private redis-server:

* ``bare``  - bench/bare_responder.py: subscribe, parse, publish a reply; no durability;
* ``agent`` - ``python -m agent run`` as the unit starts it (OUTBOX_SYNCHRONOUS=NORMAL, the default);
* ``full``  - the same with OUTBOX_SYNCHRONOUS=FULL (an fsync per commit);

and, in the echo scenario only, ``durable``: the bare responder plus one SQLite commit of the
command and its answer before each PUBLISH, the least that loses nothing on SIGKILL.

The machine is shared and noisy, so every agent figure is also given as a ratio to the bare
responder measured in the same run, and the sequential echo interleaves the subjects command
by command so that they see the same noise. Prints one table and writes the same figures as
JSON under bench/results/.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import signal
import socket
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import redis

ROOT = Path(__file__).resolve().parent.parent
PASSWORD = "bench-password-5b2e"
RESULTS = ROOT / "bench" / "results"
# py-spy output: "flamegraph" (an SVG to open in a browser) or "raw" (collapsed stacks, greppable)
PROFILE_FORMAT = os.environ.get("BENCH_PROFILE_FORMAT", "flamegraph")

TARGETS = {
    "echo_p50_ratio": ("<=", 1.2, "echo p50 <= 1.2 x bare"),
    "burst_ratio": (">=", 0.8, "burst cmd/s >= 0.8 x bare"),
    "catchup_rate": (">=", 5000, "catch-up >= 5,000 msg/s"),
    "rss_mb": ("<", 35, "RSS < 35 MB"),
    "idle_cpu_pct": ("<", 0.5, "idle CPU < 0.5 %"),
    "online_s": ("<=", 1.0, "online within 1 s"),
}


def log(text: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {text}", file=sys.stderr, flush=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(condition, timeout: float, what: str, interval: float = 0.002):
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(interval)


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q / 100 * (len(ordered) - 1))))]


# -- processes ------------------------------------------------------------------------------------


class RedisServer:
    """A private redis-server on a free port, with a password; can be killed and restarted."""

    def __init__(self, workdir: Path):
        self.workdir = workdir
        workdir.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.proc: subprocess.Popen | None = None

    def start(self) -> RedisServer:
        self.proc = subprocess.Popen(
            ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
             "--requirepass", PASSWORD, "--dir", str(self.workdir), "--logfile", str(self.workdir / "redis.log")],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        wait_for(self.answers, 10, f"redis-server on port {self.port}", 0.005)
        return self

    def answers(self) -> bool:
        try:
            return self.client(socket_timeout=0.5).ping()
        except (redis.RedisError, OSError):
            return False

    def client(self, **kwargs) -> redis.Redis:
        kwargs.setdefault("socket_timeout", 30)
        return redis.Redis(host="127.0.0.1", port=self.port, password=PASSWORD, **kwargs)

    def kill(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)


class Subject:
    """One responder under test: its process, its Redis, and a backend-side client."""

    def __init__(self, name: str, argv: list[str], env: dict[str, str], workdir: Path, cwd: Path | None = None):
        self.name, self.argv, self.env, self.workdir = name, argv, env, workdir
        self.cwd = cwd or workdir
        self.agent_id = env["AGENT_ID"]
        self.server = RedisServer(workdir / "redis").start()
        self.env["REDIS_PORT"] = str(self.server.port)
        self.proc: subprocess.Popen | None = None
        self.log_path = workdir / f"{name}.log"
        self.command_channel = f"cockpit-agent:{self.agent_id}"
        self.response_channel = f"cockpit-agent-response:{self.agent_id}"
        self.r = self.server.client()
        self.pubsub = None

    # life cycle

    def start(self) -> dict[str, float]:
        """Start the process; returns seconds until it is ``online`` and until it is subscribed."""
        self.subscribe()
        probe = self.server.client()
        key = f"agents:{self.agent_id}"
        log_file = open(self.log_path, "a")
        t0 = time.perf_counter()
        self.proc = subprocess.Popen(self.argv, env=self.env, cwd=self.cwd, stdout=log_file, stderr=log_file)
        online = subscribed = None
        deadline = t0 + 30
        while online is None or subscribed is None:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited early; see {self.log_path}")
            now = time.perf_counter()
            if now > deadline:
                raise TimeoutError(f"{self.name} did not come online")
            if online is None and probe.hget(key, "status") == b"online":
                online = now - t0
            if subscribed is None and probe.pubsub_numsub(self.command_channel)[0][1] >= 1:
                subscribed = now - t0
            time.sleep(0.001)
        return {"online_s": online, "subscribed_s": subscribed}

    def subscribe(self) -> None:
        self.pubsub = self.r.pubsub(ignore_subscribe_messages=True)
        self.pubsub.subscribe(self.response_channel)
        deadline = time.monotonic() + 10
        while not self.pubsub.subscribed:
            self.pubsub.get_message(timeout=0.05)
            if time.monotonic() > deadline:
                raise TimeoutError("no confirmation of the response subscription")

    def stop_process(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        if self.pubsub is not None:
            self.pubsub.close()
        self.r.delete(f"agents:{self.agent_id}")

    def stop(self) -> None:
        try:
            self.stop_process()
        except (redis.RedisError, OSError):
            pass
        self.server.kill()

    # measurements of the process

    def rss_mb(self) -> float:
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
        raise RuntimeError("no VmRSS")

    def cpu_seconds(self) -> float:
        fields = Path(f"/proc/{self.proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    # traffic

    @staticmethod
    def command(command: str = "echo", params: dict | None = None) -> dict:
        return {"command_id": str(uuid.uuid4()), "command": command, "params": params or {"message": "ping"},
                "timestamp": int(time.time()), "sender": "cockpit-bench"}

    def next_response(self, timeout: float = 30.0) -> dict:
        deadline = time.monotonic() + timeout
        while True:
            message = self.pubsub.get_message(timeout=max(0.0, deadline - time.monotonic()))
            if message is not None and message["type"] == "message":
                return json.loads(message["data"])
            if time.monotonic() > deadline:
                raise TimeoutError(f"{self.name}: no response within {timeout} s")

    def call(self, command: str = "echo", params: dict | None = None, timeout: float = 30.0) -> tuple[float, dict]:
        """One command, sequentially: seconds until its response arrived, and the response."""
        msg = self.command(command, params)
        payload = json.dumps(msg)
        t0 = time.perf_counter()
        self.r.publish(self.command_channel, payload)
        while True:
            response = self.next_response(timeout)
            if response.get("command_id") == msg["command_id"]:
                return time.perf_counter() - t0, response

    def burst(self, n: int) -> dict:
        """``n`` echo commands in one pipeline; time until all ``n`` responses arrived."""
        payloads = [json.dumps(self.command()) for _ in range(n)]
        pipe = self.r.pipeline(transaction=False)
        for payload in payloads:
            pipe.publish(self.command_channel, payload)
        statuses: dict[str, int] = {}
        t0 = time.perf_counter()
        pipe.execute()
        for _ in range(n):
            response = self.next_response(60)
            key = response["status"] if response["status"] == "success" else (response.get("error") or "?")[:40]
            statuses[key] = statuses.get(key, 0) + 1
        elapsed = time.perf_counter() - t0
        return {"n": n, "seconds": elapsed, "per_s": n / elapsed, "statuses": statuses}


def agent_subject(name: str, workdir: Path, repo: Path, synchronous: str) -> Subject:
    env = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "HOME": str(workdir),
        "REDIS_HOST": "127.0.0.1",
        "REDIS_PASSWORD": PASSWORD,
        "AGENT_ID": f"bench-{name}-{uuid.uuid4().hex[:6]}",
        "GIT_REPO_PATH": str(repo),
        "OUTBOX_DB": str(workdir / "state" / "outbox.db"),
        "OUTBOX_SYNCHRONOUS": synchronous,
        "COCKPIT_AGENT_ENV_FILE": str(workdir / "no.env"),
    }
    # As the systemd unit starts it: ``python -m agent run`` in the application directory, so
    # agent.py is loaded from its cached bytecode. ``python agent.py`` compiles the 1,300-line
    # file at every start and keeps 3 MB more resident for good.
    return Subject(name, [sys.executable, "-m", "agent", "run"], env, workdir, cwd=ROOT)


def bare_subject(workdir: Path, name: str = "bare") -> Subject:
    env = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "REDIS_HOST": "127.0.0.1",
        "REDIS_PASSWORD": PASSWORD,
        "AGENT_ID": f"bench-{name}-{uuid.uuid4().hex[:6]}",
    }
    return Subject(name, [sys.executable, str(ROOT / "bench" / "bare_responder.py")], env, workdir)


def durable_subject(workdir: Path) -> Subject:
    """The bare responder plus the one thing durability cannot do without: a SQLite commit of
    the command and its answer before the PUBLISH. The floor under the agent's echo latency."""
    s = bare_subject(workdir, "durable")
    s.env["OUTBOX_DB"] = str(workdir / "outbox.db")
    return s


# -- git ------------------------------------------------------------------------------------------

GIT_ENV = {**os.environ, "GIT_AUTHOR_NAME": "bench", "GIT_AUTHOR_EMAIL": "bench@localhost",
           "GIT_COMMITTER_NAME": "bench", "GIT_COMMITTER_EMAIL": "bench@localhost", "GIT_TERMINAL_PROMPT": "0"}


def git(*args: str, cwd: Path) -> str:
    return subprocess.run(["git", *args], cwd=cwd, env=GIT_ENV, check=True, capture_output=True, text=True).stdout


class Repos:
    """An origin and one clone per puller (the agents and the direct ``git pull``)."""

    def __init__(self, base: Path, clones: list[str]):
        self.origin = base / "origin"
        base.mkdir(parents=True, exist_ok=True)
        git("init", "-q", "-b", "main", str(self.origin), cwd=base)
        self.n = 0
        self.commit()
        self.clones = {}
        for name in clones:
            git("clone", "-q", str(self.origin), str(base / name), cwd=base)
            self.clones[name] = base / name

    def commit(self) -> None:
        self.n += 1
        name = f"file-{self.n}"
        (self.origin / name).write_text(f"{self.n}\n")
        git("add", name, cwd=self.origin)
        git("commit", "-q", "-m", name, cwd=self.origin)


# -- scenarios ------------------------------------------------------------------------------------


def scenario_echo(subjects: list[Subject], n: int, block: int = 1) -> dict:
    """Sequential echo, interleaved: ``block`` commands to each subject in turn, until each had ``n``.

    With block 1 (the table's figures) command i goes to every subject before command i+1, so
    a drift of the machine hits all alike; but each round trip then overlaps what the subject
    before it still does after answering (its PING, audit line, flusher). Blocks of 100 leave
    each subject alone with the client for 100 round trips: only its own leftover work counts.
    """
    times: dict[str, list[float]] = {s.name: [] for s in subjects}
    for start in range(0, n, block):
        for s in subjects:
            for _ in range(min(block, n - start)):
                elapsed, response = s.call()
                assert response["status"] == "success", response
                times[s.name].append(elapsed)
    return {
        name: {"n": n, "p50_ms": pct(t, 50) * 1e3, "p99_ms": pct(t, 99) * 1e3, "max_ms": max(t) * 1e3,
               "mean_ms": statistics.fmean(t) * 1e3}
        for name, t in times.items()
    }


def wait_settled(s: Subject, timeout: float = 60) -> None:
    """Wait until an agent's outbox is empty (a bare responder has none)."""
    db = s.env.get("OUTBOX_DB")
    if not db:
        return
    conn = sqlite3.connect(db, timeout=30)
    try:
        wait_for(lambda: conn.execute("SELECT count(*) FROM outbox").fetchone()[0] == 0, timeout,
                 f"{s.name}'s outbox to empty", 0.05)
    finally:
        conn.close()


IMPORT_FLOORS = {
    "redis": "import redis",
    "redis, sqlite-utils, environs": "import redis, sqlite_utils, environs",
}


def scenario_import_floor() -> dict[str, float]:
    """RSS (MB) of a Python process that has only imported the packages the design prescribes:
    what any agent built on them starts from, before it has done anything."""
    floors = {}
    for label, code in IMPORT_FLOORS.items():
        proc = subprocess.Popen([sys.executable, "-c", f"{code}; import sys; sys.stdout.write('ready\\n'); "
                                 "sys.stdout.flush(); sys.stdin.readline()"],
                                stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        try:
            assert proc.stdout.readline().strip() == "ready"
            for line in Path(f"/proc/{proc.pid}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    floors[label] = int(line.split()[1]) / 1024
        finally:
            proc.communicate("\n", timeout=10)
    return floors


def scenario_idle(subjects: list[Subject], seconds: float) -> dict:
    """CPU used by each process over the same idle window."""
    for s in subjects:
        wait_settled(s)
    time.sleep(1.0)
    start = {s.name: s.cpu_seconds() for s in subjects}
    t0 = time.monotonic()
    time.sleep(seconds)
    wall = time.monotonic() - t0
    return {s.name: {"seconds": wall, "cpu_s": s.cpu_seconds() - start[s.name],
                     "cpu_pct": 100 * (s.cpu_seconds() - start[s.name]) / wall} for s in subjects}


def scenario_git(agents: list[Subject], repos: Repos, n: int) -> dict:
    """git_pull through each agent vs ``git pull --ff-only`` run directly; each pull brings one commit."""
    times: dict[str, list[float]] = {s.name: [] for s in agents}
    times["direct"] = []
    direct_clone = repos.clones["direct"]
    for _ in range(n):
        for s in agents:
            repos.commit()
            elapsed, response = s.call("git_pull", {"repository_path": str(repos.clones[s.name]), "branch": "main"})
            assert response["status"] == "success", response
            times[s.name].append(elapsed)
        repos.commit()
        t0 = time.perf_counter()
        subprocess.run(["git", "-C", str(direct_clone), "pull", "--ff-only", "--", "origin", "main"],
                       env=GIT_ENV, check=True, capture_output=True, stdin=subprocess.DEVNULL)
        times["direct"].append(time.perf_counter() - t0)
    direct = statistics.median(times["direct"])
    out = {"direct": {"n": n, "median_ms": direct * 1e3}}
    for s in agents:
        median = statistics.median(times[s.name])
        out[s.name] = {"n": n, "median_ms": median * 1e3, "overhead_ms": (median - direct) * 1e3}
    return out


def fill_outbox(s: Subject, n: int) -> list[tuple[str, str]]:
    """Write ``n`` finished commands and their waiting responses, as the agent itself would."""
    conn = sqlite3.connect(s.env["OUTBOX_DB"], timeout=30)
    now = time.time()
    rows = []
    for _ in range(n):
        command_id = str(uuid.uuid4())
        payload = json.dumps({"command_id": command_id, "status": "success", "output": "ping", "error": None,
                              "execution_time_ms": 0, "timestamp": int(now), "agent_id": s.agent_id},
                             separators=(",", ":"))
        rows.append((command_id, payload))
    with conn:
        conn.executemany(
            "INSERT INTO commands (command_id, command, params, sender, state, status, execution_time_ms, "
            "received_at, started_at, finished_at, response) "
            "VALUES (?, 'echo', '{\"message\":\"ping\"}', 'cockpit-bench', 'done', 'success', 0, ?, ?, ?, ?)",
            [(cid, now, now, now, payload) for cid, payload in rows],
        )
        conn.executemany(
            "INSERT INTO outbox (channel, payload, command_id, result_key, created_at, next_attempt_at) "
            "VALUES (?, ?, ?, ?, ?, 0)",
            [(s.response_channel, payload, cid, f"cockpit-agent-result:{s.agent_id}:{cid}", now)
             for cid, payload in rows],
        )
    conn.close()
    return [(s.response_channel, payload) for _, payload in rows]


def drain(s: Subject, n: int, t0: float) -> dict:
    first = last = None
    for _ in range(n):
        s.next_response(120)
        last = time.perf_counter()
        if first is None:
            first = last
    total = last - t0
    spread = max(last - first, 1e-9)
    return {"n": n, "seconds": total, "first_s": first - t0, "drain_s": spread, "per_s": (n - 1) / spread}


def scenario_catchup(agent: Subject, bare: Subject, n: int, outage: float) -> dict:
    """Responses waiting in the outbox when Redis returns; the floor publishes the same from memory."""
    wait_settled(agent)
    agent.pubsub.close()
    agent.server.kill()  # the outage: the agent keeps running, Redis is gone
    rows = fill_outbox(agent, n)
    time.sleep(outage)
    agent.server.start()  # same port
    t0 = time.perf_counter()
    agent.r = agent.server.client()
    agent.subscribe()
    result = drain(agent, n, t0)
    wait_settled(agent)

    # The floor: the same payloads, from memory, pipelined in batches of 500, no Lua, no SQLite.
    feed = bare.workdir / "catchup.jsonl"
    feed.write_text("".join(json.dumps([bare.response_channel, p]) + "\n" for _, p in rows))
    proc = subprocess.Popen([sys.executable, str(ROOT / "bench" / "bare_responder.py"), "catchup", str(feed)],
                            env=bare.env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "ready"
    t0 = time.perf_counter()
    proc.stdin.write("go\n")
    proc.stdin.flush()
    floor = drain(bare, n, t0)
    proc.wait(30)
    return {"agent": result, "bare": floor}


def scenario_commit(base: Path, n: int) -> dict:
    """What one write transaction costs at each ``synchronous`` level, in this process.

    The agent's own Store: accept (the command and its answer, one commit), then deliver
    (one more). OFF is shown for comparison only; the agent never uses it.
    """
    sys.path.insert(0, str(ROOT))
    from outbox import Message, Store

    out = {}
    for level in ("OFF", "NORMAL", "FULL"):
        path = base / f"commit-{level}.db"
        store = Store(str(path), level)
        times = []
        response = {"status": "success", "error": None, "execution_time_ms": 0}
        for _ in range(n):
            command_id = str(uuid.uuid4())
            message = Message("chan", json.dumps({"command_id": command_id, "output": "ping"}), command_id, "k")
            t0 = time.perf_counter()
            store.accept(command_id, "echo", {"message": "ping"}, "cockpit-bench", (response, message), "ping")
            times.append(time.perf_counter() - t0)
            store.delivered([row["id"] for row in store.due(10)])
        store.close()
        out[level] = {"n": n, "commit_p50_us": pct(times, 50) * 1e6, "commit_p99_us": pct(times, 99) * 1e6}
    return out


# -- report ---------------------------------------------------------------------------------------


def machine() -> dict:
    model = "?"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        load = os.getloadavg()
    except OSError:
        load = (0, 0, 0)
    redis_version = subprocess.run(["redis-server", "--version"], capture_output=True, text=True).stdout.split()
    return {
        "nproc": os.cpu_count(), "cpu_model": model, "python": platform.python_version(),
        "sqlite": sqlite3.sqlite_version, "redis_py": redis.__version__,
        "redis_server": next((w.split("=")[1] for w in redis_version if w.startswith("v=")), "?"),
        "kernel": platform.release(), "loadavg_at_start": [round(x, 2) for x in load],
    }


def check(name: str, value: float) -> bool:
    op, bound, _ = TARGETS[name]
    return {"<=": value <= bound, ">=": value >= bound, "<": value < bound}[op]


def summarize(r: dict, agents: list[str]) -> list[list[str]]:
    """Rows of the table: metric, bare, then value and ratio for each agent, then the target."""
    def f(x, digits=2):
        return "-" if x is None else f"{x:,.{digits}f}"

    def ratio(a, b):
        return "-" if a is None or not b else f"{a / b:.2f}x"

    rows = []

    def add(metric, key, target="", digits=2, ratio_ok=True, fmt=f):
        bare_value = key("bare")
        row = [metric, fmt(bare_value, digits) if bare_value is not None else "-"]
        for name in agents:
            value = key(name)
            row += [fmt(value, digits), ratio(value, bare_value) if ratio_ok else ""]
        rows.append(row + [target])

    e = r["echo"]
    add("echo p50 ms", lambda n: e[n]["p50_ms"], "<= 1.2x bare")
    add("echo p99 ms", lambda n: e[n]["p99_ms"])
    add("echo max ms", lambda n: e[n]["max_ms"])
    b = r["burst"]
    add(f"burst {b['bare']['n']:,}: s to all answers (median)", lambda n: b[n]["seconds"])
    add("burst cmd/s", lambda n: b[n]["per_s"], ">= 0.8x bare", 0)
    c = r["catchup"]
    add(f"catch-up {c['bare']['n']:,}: s from Redis back", lambda n: c[n]["seconds"])
    add("catch-up: s to first message", lambda n: c[n]["first_s"], ratio_ok=False)
    add("catch-up msg/s (from Redis back)", lambda n: c[n]["n"] / c[n]["seconds"], ">= 5,000", 0)
    add("catch-up msg/s (first to last)", lambda n: c[n]["per_s"], digits=0)
    g = r["git_pull"]
    add("git_pull median ms (bare: git direct)", lambda n: g["direct" if n == "bare" else n]["median_ms"], digits=1)
    add("git_pull overhead ms", lambda n: None if n == "bare" else g[n]["overhead_ms"], ratio_ok=False, digits=1)
    m = r["memory"]
    add("RSS idle MB", lambda n: m[n]["idle_mb"], "< 35 MB", 1)
    add("RSS after burst MB", lambda n: m[n]["after_burst_mb"], "< 35 MB", 1)
    i = r["idle"]
    add(f"CPU idle % ({i['bare']['seconds']:.0f} s)", lambda n: i[n]["cpu_pct"], "< 0.5 %", 3, ratio_ok=False)
    s = r["start"]
    add("start -> online s (median)", lambda n: s[n]["online_s"], "<= 1 s", 3)
    add("start -> subscribed s", lambda n: s[n]["subscribed_s"], "", 3)
    return rows


def render(rows: list[list[str]], agents: list[str]) -> str:
    header = ["metric", "bare"]
    for name in agents:
        header += [name, "ratio"]
    header.append("target")
    table = [header] + rows
    widths = [max(len(row[i]) for row in table) for i in range(len(header))]
    lines = []
    for k, row in enumerate(table):
        cells = [row[0].ljust(widths[0])] + [c.rjust(widths[i]) for i, c in enumerate(row[1:-1], 1)] + [row[-1]]
        lines.append("  ".join(cells).rstrip())
        if k == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)


def verdicts(r: dict, name: str) -> dict[str, dict]:
    values = {
        "echo_p50_ratio": r["echo"][name]["p50_ms"] / r["echo"]["bare"]["p50_ms"],
        "burst_ratio": r["burst"][name]["per_s"] / r["burst"]["bare"]["per_s"],
        "catchup_rate": r["catchup"][name]["n"] / r["catchup"][name]["seconds"],  # all of it, from Redis's return
        "rss_mb": max(r["memory"][name]["idle_mb"], r["memory"][name]["after_burst_mb"]),
        "idle_cpu_pct": r["idle"][name]["cpu_pct"],
        "online_s": r["start"][name]["online_s"],
    }
    return {k: {"value": round(v, 4), "target": TARGETS[k][2], "met": check(k, v)} for k, v in values.items()}


# -- main -----------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--echo", type=int, default=int(os.environ.get("BENCH_ECHO", 1000)))
    parser.add_argument("--echo-block", type=int, default=int(os.environ.get("BENCH_ECHO_BLOCK", 100)),
                        help="also run the echo in blocks of this many per subject (1 or 0: skip)")
    parser.add_argument("--burst", type=int, default=int(os.environ.get("BENCH_BURST", 5000)))
    parser.add_argument("--catchup", type=int, default=int(os.environ.get("BENCH_CATCHUP", 10000)))
    parser.add_argument("--rounds", type=int, default=int(os.environ.get("BENCH_ROUNDS", 3)),
                        help="starts and bursts per subject; the median is reported (default 3)")
    parser.add_argument("--git-pulls", type=int, default=int(os.environ.get("BENCH_GIT_PULLS", 10)))
    parser.add_argument("--commits", type=int, default=int(os.environ.get("BENCH_COMMITS", 1000)))
    parser.add_argument("--idle", type=float, default=float(os.environ.get("BENCH_IDLE_SECONDS", 60)),
                        help="seconds of the idle CPU window (default 60; BENCH_IDLE_SECONDS)")
    parser.add_argument("--outage", type=float, default=1.0, help="seconds Redis stays down before catch-up")
    parser.add_argument("--no-full", action="store_true", help="skip the OUTBOX_SYNCHRONOUS=FULL agent")
    parser.add_argument("--profile", metavar="DIR", default=os.environ.get("BENCH_PROFILE") or None,
                        help="record py-spy flame graphs of the agent during echo+burst and catch-up into DIR")
    parser.add_argument("--keep", action="store_true", help="keep the work directory (logs, databases)")
    args = parser.parse_args(argv)

    started = time.monotonic()
    base = Path(tempfile.mkdtemp(prefix="cockpit-bench-"))
    agents = ["agent"] if args.no_full else ["agent", "full"]
    repos = Repos(base / "git", [*agents, "direct"])
    bare = bare_subject(base / "bare")
    subjects = [bare, agent_subject("agent", base / "agent", repos.clones["agent"], "NORMAL")]
    if not args.no_full:
        subjects.append(agent_subject("full", base / "full", repos.clones["full"], "FULL"))
    by_name = {s.name: s for s in subjects}
    results: dict = {"machine": machine(), "params": vars(args), "started_at": time.strftime("%Y-%m-%dT%H:%M:%SZ",
                                                                                          time.gmtime())}
    profilers: list[subprocess.Popen] = []
    durable: Subject | None = None
    try:
        log(f"machine: {results['machine']}")
        # Start (and restart) each subject a few times; the median is reported.
        starts: dict[str, list[dict]] = {s.name: [] for s in subjects}
        for round_ in range(args.rounds):
            for s in subjects:
                if round_:
                    s.stop_process()
                starts[s.name].append(s.start())
        durable = durable_subject(base / "durable")  # in the echo scenario only
        durable.start()
        results["start"] = {name: {key: statistics.median(r[key] for r in runs) for key in runs[0]} | {"runs": runs}
                            for name, runs in starts.items()}
        log(f"start (median of {args.rounds}): " + ", ".join(
            f"{name} {r['online_s']:.3f} s" for name, r in results["start"].items()))
        for s in [*subjects, durable]:  # warm-up: connections, code paths, SQLite pages
            for _ in range(50):
                s.call()
        for s in subjects:
            wait_settled(s)
        time.sleep(1.0)
        results["memory"] = {s.name: {"idle_mb": s.rss_mb()} for s in subjects}
        results["import_floor_mb"] = scenario_import_floor()

        if args.profile:
            profilers = start_profilers(Path(args.profile), [by_name["agent"]], "echo+burst")
        log(f"echo: {args.echo} sequential round trips per subject, interleaved")
        results["echo"] = scenario_echo([*subjects, durable], args.echo)
        if args.echo_block > 1:
            log(f"echo: the same again in blocks of {args.echo_block}")
            results["echo_blocks"] = scenario_echo([*subjects, durable], args.echo, args.echo_block)
        durable.stop()
        log(f"burst: {args.burst} commands in one pipeline per subject, {args.rounds} rounds, interleaved")
        bursts: dict[str, list[dict]] = {s.name: [] for s in subjects}
        for _ in range(args.rounds):
            for s in subjects:
                bursts[s.name].append(s.burst(args.burst))
                wait_settled(s)
                log(f"  {s.name}: {bursts[s.name][-1]['per_s']:.0f} cmd/s {bursts[s.name][-1]['statuses']}")
        # the round with the median time stands for the subject
        results["burst"] = {name: sorted(runs, key=lambda r: r["seconds"])[len(runs) // 2] | {"rounds": runs}
                            for name, runs in bursts.items()}
        stop_profilers(profilers)
        profilers = []
        for s in subjects:
            results["memory"][s.name]["after_burst_mb"] = s.rss_mb()

        log(f"git_pull: {args.git_pulls} pulls per agent and direct")
        results["git_pull"] = scenario_git([s for s in subjects if s.name != "bare"], repos, args.git_pulls)

        log(f"commit: {args.commits} accept transactions per synchronous level")
        results["commit"] = scenario_commit(base, args.commits)

        log(f"idle: {args.idle:g} s")
        results["idle"] = scenario_idle(subjects, args.idle)

        log(f"catch-up: {args.catchup} responses waiting, Redis down for {args.outage:g} s")
        results["catchup"] = {}
        for name in agents:
            if args.profile and name == "agent":
                profilers = start_profilers(Path(args.profile), [by_name[name]], "catchup")
            c = scenario_catchup(by_name[name], bare, args.catchup, args.outage)
            stop_profilers(profilers)
            profilers = []
            results["catchup"][name] = c["agent"]
            if "bare" not in results["catchup"] or c["bare"]["per_s"] > results["catchup"]["bare"]["per_s"]:
                results["catchup"]["bare"] = c["bare"]
            log(f"  {name}: {c['agent']['per_s']:.0f} msg/s; floor {c['bare']['per_s']:.0f} msg/s")
    finally:
        stop_profilers(profilers)
        for s in subjects:
            s.stop()
        if durable is not None:
            durable.stop()
        if args.keep:
            log(f"work directory kept: {base}")
        else:
            shutil.rmtree(base, ignore_errors=True)

    results["verdicts"] = {name: verdicts(results, name) for name in agents}
    results["duration_s"] = round(time.monotonic() - started, 1)
    rows = summarize(results, agents)
    results["table"] = render(rows, agents)
    RESULTS.mkdir(parents=True, exist_ok=True)
    out = RESULTS / f"bench-{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}.json"
    out.write_text(json.dumps(results, indent=2) + "\n")
    (RESULTS / "latest.json").write_text(json.dumps(results, indent=2) + "\n")

    m = results["machine"]
    print(f"\ncockpit-agent bench: {m['nproc']} x {m['cpu_model']}, Python {m['python']}, SQLite {m['sqlite']}, "
          f"redis-server {m['redis_server']}, load at start {m['loadavg_at_start']}")
    print("agent = OUTBOX_SYNCHRONOUS=NORMAL (default); full = OUTBOX_SYNCHRONOUS=FULL; ratio = agent / bare\n")
    print(results["table"])
    print()
    for name in agents:
        missed = [v["target"] for v in results["verdicts"][name].values() if not v["met"]]
        print(f"{name}: {'all targets met' if not missed else 'missed: ' + '; '.join(missed)}")
    e = results["echo"]
    print(f"\nDurable floor (the bare responder + one SQLite commit of the command and its answer before the "
          f"PUBLISH, NORMAL): echo p50 {e['durable']['p50_ms']:.2f} ms = {e['durable']['p50_ms'] / e['bare']['p50_ms']:.2f}x "
          f"bare; " + ", ".join(f"{name} {e[name]['p50_ms'] / e['durable']['p50_ms']:.2f}x it" for name in agents))
    if "echo_blocks" in results:
        b = results["echo_blocks"]
        print(f"Echo p50 in blocks of {args.echo_block} (each subject alone with the client in turn): bare "
              f"{b['bare']['p50_ms']:.2f} ms, durable {b['durable']['p50_ms']:.2f} ms; " + ", ".join(
                  f"{name} {b[name]['p50_ms']:.2f} ms = {b[name]['p50_ms'] / b['bare']['p50_ms']:.2f}x bare, "
                  f"{b[name]['p50_ms'] / b['durable']['p50_ms']:.2f}x durable" for name in agents))
    print("\nRSS of a Python that has only imported: " + "; ".join(
        f"{label} {mb:.1f} MB" for label, mb in results["import_floor_mb"].items()))
    c = results["commit"]
    print("\nSQLite write transaction (accept: command + answer), p50 / p99 us: "
          + "; ".join(f"{k} {v['commit_p50_us']:.0f} / {v['commit_p99_us']:.0f}" for k, v in c.items())
          + "  (OFF for comparison only)")
    print(f"\nfigures: {out.relative_to(ROOT)} ({results['duration_s']:.0f} s)")
    return 0


def start_profilers(directory: Path, subjects: list[Subject], label: str) -> list[subprocess.Popen]:
    py_spy = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
    directory.mkdir(parents=True, exist_ok=True)
    procs = []
    for s in subjects:
        out = directory / f"{s.name}-{label}.{'svg' if PROFILE_FORMAT == 'flamegraph' else 'txt'}"
        procs.append(subprocess.Popen([py_spy, "record", "--pid", str(s.proc.pid), "--rate", "250", "--threads",
                                       "--format", PROFILE_FORMAT, "--output", str(out)],
                                      stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        log(f"profiling {s.name} into {out}")
    time.sleep(0.5)
    return procs


def stop_profilers(procs: list[subprocess.Popen]) -> None:
    for proc in procs:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()


if __name__ == "__main__":
    sys.exit(main())
