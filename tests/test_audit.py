"""The audit trail: one structured line per command on cockpit_agent.audit, secrets redacted,
and rejected/unauthenticated messages rate-limited so a flood cannot fill the disk."""

from __future__ import annotations

import json
import logging
import time

import sealed
from conftest import PASSWORD, SECRET, wait_for
from service.audit import Audit, Throttle, TokenBucket, redact


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def audit_lines(text: str) -> list[dict]:
    """The JSON of every audit line in a log text."""
    return [json.loads(line.split("cockpit_agent.audit: audit ", 1)[1])
            for line in text.splitlines() if "cockpit_agent.audit: audit " in line]


def test_redact_masks_secret_keys_at_any_depth_and_cuts_long_values():
    params = {"message": "hi", "password": "p1", "API_TOKEN": "t1", "nested": {"db_secret": "s1", "ok": [1, {"auth": "a"}]},
              "long": "x" * 1000}
    cleaned = redact(params)
    text = json.dumps(cleaned)
    assert "p1" not in text and "t1" not in text and "s1" not in text and '"a"' not in text
    assert cleaned["message"] == "hi" and cleaned["nested"]["ok"][0] == 1
    assert cleaned["password"] == cleaned["API_TOKEN"] == cleaned["nested"]["db_secret"] == "***"
    assert len(cleaned["long"]) < 250 and cleaned["long"].endswith("(1000 chars)")


def test_token_bucket():
    clock = Clock()
    bucket = TokenBucket(rate=2, burst=3, clock=clock)
    assert [bucket.take() for _ in range(5)] == [True, True, True, False, False]
    clock.now += 0.5
    assert bucket.take() and not bucket.take()
    clock.now += 100
    assert sum(bucket.take() for _ in range(10)) == 3  # never more than the burst saved up


def test_a_flood_of_rejected_messages_is_summarised(caplog):
    clock = Clock()
    audit = Audit(rate=5, burst=10, clock=clock)
    caplog.set_level(logging.INFO, logger="cockpit_agent.audit")
    results = [audit.rejected("message is not JSON (x)", None, 3) for _ in range(10_000)]
    assert sum(results) == 10
    assert len(caplog.records) == 10
    clock.now += 1.0
    assert audit.rejected("not authenticated: auth.signature does not match the message", "c-1", 80)
    last = json.loads(caplog.records[-1].getMessage().split("audit ", 1)[1])
    assert last == {"event": "unauthenticated", "command_id": "c-1", "sender": None,
                    "reason": "not authenticated: auth.signature does not match the message", "size": 80,
                    "suppressed": 9990}
    assert all(r.levelno == logging.INFO and r.name == "cockpit_agent.audit" for r in caplog.records)
    # A flood that stops is still counted: the heartbeat reports what was dropped since.
    for _ in range(100):
        audit.rejected("message is not JSON (x)", None, 3)
    assert audit.report_suppressed() == 100 - 4  # 5 tokens refilled in that second, 1 spent above
    assert json.loads(caplog.records[-1].getMessage().split("audit ", 1)[1]) == {"event": "suppressed", "suppressed": 96}
    assert audit.report_suppressed() == 0


def test_one_audit_line_per_command_through_the_agents_log(agent_env, agent_process, make_backend, redis_server,
                                                           fake_docker):
    env = {**agent_env, "COCKPIT_SHARED_SECRET": SECRET}
    agent = agent_process(env).start()
    agent.wait_subscribed(redis_server)
    backend = make_backend(env["AGENT_ID"], secret=SECRET)

    # With a secret, the backend sends a password encrypted; the agent decrypts it (and must not log it).
    password = sealed.seal_params({"password": "hunter2-xyz"}, SECRET)["password"]
    echo = backend.call("echo", {"message": "hi\nforged line", "password": password, "api_token": "tok-123"})
    restart = backend.call("docker_restart", {"container_name": "web-1"})
    refused = backend.call("git_pull", {"branch": "--upload-pack=touch /tmp/pwned"})
    unsigned = {"command_id": make_backend(env["AGENT_ID"]).send("echo")}  # never answered: unauthenticated
    assert (echo["status"], restart["status"], refused["status"]) == ("success", "success", "error")

    # A flood of junk: the agent keeps up, and the log does not grow with it.
    client = redis_server.client()
    started = time.monotonic()
    for i in range(400):
        client.publish(f"cockpit-agent:{env['AGENT_ID']}", b"\xff junk %d" % i)
    assert backend.call("echo", {"message": "after the flood"})["status"] == "success"
    # The bucket holds 50 and refills 5 a second: that bounds the lines whatever the CPU load.
    most = 50 + 5 * (time.monotonic() - started + 1)

    lines = wait_for(lambda: len([x for x in audit_lines(agent.log()) if x["event"] == "command"]) == 4
                     and audit_lines(agent.log()), message="four command audit lines")
    commands = {line["command_id"]: line for line in lines if line["event"] == "command"}
    assert set(commands) == {echo["command_id"], restart["command_id"], refused["command_id"],
                             backend.responses[-1]["command_id"]}
    line = commands[echo["command_id"]]
    assert line["sender"] == "cockpit-backend" and line["command"] == "echo" and line["status"] == "success"
    assert line["params"] == {"message": "hi\nforged line", "password": "***", "api_token": "***"}
    assert isinstance(line["duration_ms"], int) and line["error"] is None
    assert commands[restart["command_id"]]["params"] == {"container_name": "web-1"}
    assert commands[refused["command_id"]]["status"] == "error"
    assert "not an allowed branch name" in commands[refused["command_id"]]["error"]

    unauthenticated = [x for x in lines if x["event"] == "unauthenticated"]
    assert [x["command_id"] for x in unauthenticated] == [unsigned["command_id"]]
    junk = [x for x in lines if x["event"] == "rejected"]
    assert 1 <= len(junk) <= most < 400, (len(junk), most)
    assert all("not UTF-8" in x["reason"] for x in junk)

    log = agent.log()
    assert "hunter2-xyz" not in log and "tok-123" not in log and PASSWORD not in log and SECRET not in log
    assert "forged line\n" not in log  # newlines in values stay escaped: one event, one line
    assert len([x for x in log.splitlines() if "junk" in x or "not UTF-8" in x]) <= 2 * most
    assert fake_docker.calls() == [["restart", "--", "web-1"]]


def test_commands_answered_at_start_up_are_audited_too(tmp_path, caplog):
    """A command left running by a crash is answered at start-up; that answer has its audit line."""
    from agent import Agent
    from config import Config

    config = Config(agent_id="audit-recover", redis_password="unused", outbox_db=str(tmp_path / "outbox.db"),
                    git_repo_paths=(str(tmp_path),))
    agent = Agent(config)
    store = agent.open_store()
    store.accept("crashed-1", "docker_restart", {"container_name": "grafana", "token": "tok-456"}, "cockpit-backend")
    assert store.claim("crashed-1")
    store.accept("queued-1", "docker_restart", {"container_name": "no-longer-listed"}, "cockpit-backend")
    store.close()
    caplog.set_level(logging.INFO, logger="cockpit_agent.audit")
    agent.recover()
    lines = {x["command_id"]: x for x in audit_lines("\n".join(f"{r.name}: {r.getMessage()}" for r in caplog.records))}
    assert lines["crashed-1"]["status"] == "error" and "interrupted" in lines["crashed-1"]["error"]
    assert lines["crashed-1"]["params"] == {"container_name": "grafana", "token": "***"}
    assert lines["queued-1"]["status"] == "error" and "not whitelisted" in lines["queued-1"]["error"]
    assert "tok-456" not in caplog.text


def test_every_rejected_message_is_counted_by_kind_even_when_its_line_is_suppressed(caplog):
    caplog.set_level(logging.INFO, logger="cockpit_agent.audit")
    audit = Audit(rate=0, burst=2, clock=Clock())
    for _ in range(5):
        audit.rejected("not authenticated: auth.signature does not match the message", "c-1", 80)
    audit.rejected("message is 9 bytes, over the limit of 1 bytes (MAX_MESSAGE_BYTES)", None, 9, kind="oversize")
    audit.rejected("message is not JSON (x)", None, 3)
    assert audit.rejections == {"unauthenticated": 5, "oversize": 1, "malformed": 1}
    assert len(caplog.records) == 2  # the bucket let two lines through


def test_throttle_lets_one_line_a_minute_through_and_counts_the_rest():
    clock = Clock()
    throttle = Throttle(60, clock)
    assert throttle.take() == 0  # the first occurrence is logged at once
    assert [throttle.take() for _ in range(500)] == [None] * 500
    clock.now += 60
    assert throttle.take() == 500  # the next line says how many were not logged
    assert throttle.take() is None
    assert throttle.over() == 503  # the problem is over: how often it occurred
    assert throttle.take() == 0 and throttle.count == 1  # a new problem is logged at once
