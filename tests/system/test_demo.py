"""``make demo`` (scripts/demo.py) runs unattended, well under a minute, and shows the headline:
Redis killed while a command runs, the answer waiting in SQLite, delivered once Redis is back."""

from __future__ import annotations

import re
import subprocess
import sys
import time

from conftest import ROOT


def test_the_demo_shows_an_answer_surviving_a_redis_outage():
    started = time.monotonic()
    result = subprocess.run([sys.executable, str(ROOT / "scripts" / "demo.py")], capture_output=True, text=True,
                            timeout=90, stdin=subprocess.DEVNULL, cwd=ROOT)
    took = time.monotonic() - started
    out = result.stdout
    assert result.returncode == 0, out[-3000:] + result.stderr
    assert took < 45, f"the demo took {took:.0f} s"
    # Readable times in the registry, not bare epochs.
    assert re.search(r"^  last_heartbeat: \d+ \(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d UTC, \d+ s ago\)$", out, re.M), out
    # The outage: killed while git_pull runs; the answer in the outbox (sqlite3 shell and outbox list).
    killed = out.index("git_pull is running: kill -9 redis-server")
    waiting = out.index("its answer waits in the outbox table", killed)
    published = out[out.rindex("PUBLISH", 0, killed):killed]
    assert '"command": "git_pull"' in published
    command_id = re.search(r'"command_id": "([0-9a-f-]{36})"', published).group(1)
    shell = out.index("$ sqlite3 -header -column", waiting)
    listed = out.index("$ python agent.py outbox list", shell)
    assert command_id in out[shell:listed]  # the sqlite3 shell shows the row
    back = out.index("== Redis is back", listed)
    assert re.search(rf"^\s+\d+\s+{command_id}\s+\d+ s\s+\d+\s+", out[listed:back], re.M)  # outbox list too
    assert "1 waiting" in out[listed:back]
    # Delivered once Redis is back, and the outbox empty after it.
    delivered = out[back:]
    assert f'"command_id": "{command_id}"' in delivered and '"status": "success"' in delivered
    assert "the outbox is empty: every response was delivered" in delivered
    assert "exit code 0; registry status: offline" in delivered
    assert "Traceback" not in out + result.stderr
