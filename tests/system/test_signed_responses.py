"""Signed responses: with COCKPIT_SHARED_SECRET set, every response carries auth.signature,
computed like the backend's command signature, so the backend can verify what it reads."""

from __future__ import annotations

import hashlib
import hmac
import json

import protocol
from conftest import SECRET, wait_for


def backend_verifies(raw: bytes | str, secret: str) -> bool:
    """What a backend does, written out independently of protocol.sign."""
    message = json.loads(raw)
    signature = message.pop("auth")["signature"]
    text = json.dumps(message, sort_keys=True) + ":" + str(message["timestamp"])
    expected = hmac.new(secret.encode(), text.encode(), hashlib.sha256).hexdigest()
    return hmac.compare_digest(expected, signature)


def test_responses_are_signed_and_verify(running_agent, make_backend, redis_server):
    agent = running_agent(COCKPIT_SHARED_SECRET=SECRET)
    backend = make_backend(agent.config.agent_id, secret=SECRET)
    ok = backend.call("echo", {"message": "signed hello"})
    refused = backend.call("docker_restart", {"container_name": "not-listed"})
    assert ok["status"] == "success" and refused["status"] == "error"

    raws = {json.loads(raw)["command_id"]: raw for raw in backend.raw}
    for response in (ok, refused):
        raw = raws[response["command_id"]]
        assert set(response) >= {"command_id", "status", "output", "error", "execution_time_ms", "timestamp"}
        assert len(response["auth"]["signature"]) == 64
        assert backend_verifies(raw, SECRET)
        assert protocol.verify(json.loads(raw), SECRET)
        assert not backend_verifies(raw, SECRET + "x")

    # A changed field no longer verifies.
    forged = json.loads(raws[ok["command_id"]])
    forged["output"] = "forged"
    assert not backend_verifies(json.dumps(forged), SECRET)
    assert not protocol.verify(forged, SECRET)

    # The copy at the result key is the same signed message.
    stored = redis_server.client().get(agent.config.result_key(ok["command_id"]))
    assert backend_verifies(stored, SECRET)

    # A repeated command_id is answered with the stored response: still signed, still valid.
    backend.publish(backend.message("echo", {"message": "again"}, command_id=ok["command_id"]))
    wait_for(lambda: len(backend.responses_for(ok["command_id"])) == 2, message="the repeated answer")
    repeated = [raw for raw in backend.raw if json.loads(raw)["command_id"] == ok["command_id"]][1]
    assert backend_verifies(repeated, SECRET) and json.loads(repeated)["output"] == "signed hello"


def test_without_a_secret_responses_carry_no_auth(running_agent, make_backend):
    agent = running_agent()
    response = make_backend(agent.config.agent_id).call("echo")
    assert response["output"] == "pong" and "auth" not in response
