"""Subprocess hygiene, proved on real children of a real ``python agent.py``.

GIT_BIN and DOCKER_BIN point at one stand-in that records what its own process sees: its
environment (read back from /proc/<pid>/environ), where its stdin leads, which file
descriptors it holds, and its process group and session.
"""

from __future__ import annotations

import json
import os
import sys

from conftest import PASSWORD, SECRET, wait_for
from handlers.base import INHERITED_ENV

SPY = """#!{python}
import json, os, sys
pid = os.getpid()
with open("/proc/%d/environ" % pid, "rb") as f:
    environ = dict(item.split(b"=", 1) for item in f.read().split(b"\\0") if item)
fds = sorted(int(fd) for fd in os.listdir("/proc/self/fd"))
report = {{
    "argv": sys.argv[1:],
    "environ": {{k.decode(): v.decode() for k, v in environ.items()}},
    "stdin": os.readlink("/proc/self/fd/0"),
    "stdin_read": sys.stdin.buffer.read(),
    "fds": fds,
    "pid": pid, "pgid": os.getpgid(0), "sid": os.getsid(0), "ppid": os.getppid(),
}}
report["stdin_read"] = report["stdin_read"].decode()
with open({out!r}, "a") as f:
    f.write(json.dumps(report) + "\\n")
print("On branch main" if "status" in sys.argv else sys.argv[-1])
"""


def test_children_get_a_minimal_environment_closed_stdin_and_their_own_group(
    tmp_path, agent_env, agent_process, make_backend, redis_server
):
    out = tmp_path / "children.jsonl"
    spy = tmp_path / "spy"
    spy.write_text(SPY.format(python=sys.executable, out=str(out)))
    spy.chmod(0o755)
    leaks = {
        "AWS_SECRET_ACCESS_KEY": "leak-aws-9d2e",
        "LD_LIBRARY_PATH": "/leak/lib",
        "PYTHONPATH": "/leak/python",
        "GIT_DIR": "/leak/git-dir",
        "GIT_CONFIG_PARAMETERS": "'core.sshCommand=touch /tmp/leak'",
    }
    env = {**agent_env, **leaks, "COCKPIT_SHARED_SECRET": SECRET, "GIT_BIN": str(spy), "DOCKER_BIN": str(spy),
           "LANG": "C.UTF-8"}
    agent = agent_process(env).start()
    agent.wait_subscribed(redis_server)
    backend = make_backend(env["AGENT_ID"], secret=SECRET)

    assert backend.call("git_status")["status"] == "success"
    assert backend.call("docker_restart", {"container_name": "web-1"})["output"] == "web-1"
    reports = wait_for(lambda: out.exists() and len(out.read_text().splitlines()) == 2 and
                       [json.loads(line) for line in out.read_text().splitlines()], message="two child reports")

    allowed = set(INHERITED_ENV) | {"GIT_TERMINAL_PROMPT", "GIT_SSH_COMMAND"}
    for report in reports:
        environ = report["environ"]
        text = json.dumps(environ)
        assert PASSWORD not in text and SECRET not in text
        assert "REDIS_PASSWORD" not in environ and "COCKPIT_SHARED_SECRET" not in environ
        assert not any(value in text for value in leaks.values())
        assert set(environ) <= allowed, f"inherited by accident: {sorted(set(environ) - allowed)}"
        assert environ["GIT_TERMINAL_PROMPT"] == "0"
        assert "BatchMode=yes" in environ["GIT_SSH_COMMAND"].split()
        assert environ["PATH"] == env["PATH"] and environ["HOME"] == env["HOME"]
        # stdin is /dev/null: nothing to read, nothing to wait for
        assert report["stdin"] == "/dev/null" and report["stdin_read"] == ""
        # only stdin/stdout/stderr (+ the fd listing /proc/self/fd itself): no Redis socket, no database
        assert [fd for fd in report["fds"] if fd > 2] in ([], [3])
        # its own session and process group, so a timeout kills git's ssh and helpers too
        assert report["pgid"] == report["pid"] and report["sid"] == report["pid"]
        assert report["ppid"] == agent.proc.pid
        assert report["pgid"] != os.getpgid(agent.proc.pid)
    assert reports[0]["argv"][-1] == "status"
    assert reports[1]["argv"] == ["restart", "--", "web-1"]
