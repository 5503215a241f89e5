"""The wire format: envelope checks, the backend's HMAC, and the response shape."""

import hashlib
import hmac
import json
import time

import pytest

import protocol
from protocol import Rejected, parse

SECRET = "s3cret-for-signing"


def signed(message: dict, secret: str = SECRET) -> dict:
    message = dict(message)
    message["auth"] = {"signature": protocol.sign(message, secret)}
    return message


def test_signature_is_the_backends_hmac():
    message = {"command_id": "c1", "command": "echo", "params": {"message": "hi"}, "timestamp": 1795870000,
               "sender": "cockpit-backend"}
    expected = hmac.new(
        SECRET.encode(), (json.dumps(message, sort_keys=True) + ":1795870000").encode(), hashlib.sha256
    ).hexdigest()
    assert protocol.sign(message, SECRET) == expected
    # auth itself is never part of what is signed
    assert protocol.sign({**message, "auth": {"signature": "x"}}, SECRET) == expected


def test_parse_defaults_params_and_keeps_fields():
    cmd = parse(json.dumps({"command_id": "c1", "command": "echo", "sender": "me", "timestamp": 5}))
    assert (cmd.command_id, cmd.command, cmd.params, cmd.sender, cmd.timestamp) == ("c1", "echo", {}, "me", 5)


@pytest.mark.parametrize(
    "data, reason",
    [
        (b"\xff\xfe", "not UTF-8"),
        (b"{not json", "not JSON"),
        (b"[1, 2]", "JSON list, expected an object"),
        (b'"text"', "JSON str"),
        (b'{"command": "echo"}', "command_id must be a string"),
        (b'{"command_id": 42, "command": "echo"}', "command_id must be a string"),
        (b'{"command_id": "", "command": "echo"}', "command_id must be a string"),
        (json.dumps({"command_id": "x" * 129, "command": "echo"}).encode(), "1 to 128"),
        (b'{"command_id": "a\\nb", "command": "echo"}', "printable"),
        (b'{"command_id": "a\\u0000b", "command": "echo"}', "printable"),
        (b'{"command_id": "\\u001f", "command": "echo"}', "printable"),
        (b'{"command_id": "a\\u007f", "command": "echo"}', "printable"),
        # Unicode line and paragraph separators, and format characters: they break a log line too.
        (b'{"command_id": "a\\u2028b", "command": "echo"}', "printable"),
        (b'{"command_id": "a\\u2029b", "command": "echo"}', "printable"),
        (b'{"command_id": "a\\u0085b", "command": "echo"}', "printable"),
        (b'{"command_id": "a\\u009bb", "command": "echo"}', "printable"),
        (b'{"command_id": "a\\u202eb", "command": "echo"}', "printable"),
    ],
)
def test_unanswerable_messages_have_no_command_id(data, reason):
    with pytest.raises(Rejected) as info:
        parse(data)
    assert info.value.command_id is None
    assert reason in info.value.reason


@pytest.mark.parametrize("command_id", ["a b", "caf\u00e9-1", "~!@#$%^&*()"])
def test_printable_command_ids_are_accepted(command_id):
    assert parse(json.dumps({"command_id": command_id, "command": "echo"})).command_id == command_id


@pytest.mark.parametrize(
    "message, reason",
    [
        ({"command_id": "c1"}, "command must be a non-empty string"),
        ({"command_id": "c1", "command": ["echo"]}, "command must be a non-empty string"),
        ({"command_id": "c1", "command": "echo", "params": [1]}, "params must be a JSON object, got a list"),
        ({"command_id": "c1", "command": "echo", "params": "x"}, "params must be a JSON object, got a str"),
    ],
)
def test_answerable_envelope_errors_keep_the_command_id(message, reason):
    with pytest.raises(Rejected) as info:
        parse(json.dumps(message))
    assert info.value.command_id == "c1" and info.value.stored
    assert reason in info.value.reason


def test_oversized_message_is_answered_with_the_limit():
    data = json.dumps({"command_id": "big", "command": "echo", "params": {"message": "x" * 3000}})
    with pytest.raises(Rejected) as info:
        parse(data, max_bytes=2048)
    assert info.value.command_id == "big"
    assert f"message is {len(data)} bytes, over the limit of 2048 bytes (MAX_MESSAGE_BYTES)" == info.value.reason


def test_signed_message_passes():
    now = time.time()
    message = signed({"command_id": "c1", "command": "echo", "params": {}, "timestamp": int(now)})
    assert parse(json.dumps(message), secret=SECRET, now=now).signed


@pytest.mark.parametrize(
    "mutate, reason",
    [
        (lambda m: m.pop("auth"), "carries no auth.signature"),
        (lambda m: m.update(auth="nope"), "carries no auth.signature"),
        (lambda m: m["params"].update(message="tampered"), "does not match"),
        (lambda m: m.update(command="git_pull"), "does not match"),
        (lambda m: m.update(auth={"signature": protocol.sign(m, "other-secret")}), "does not match"),
        (lambda m: m.update(timestamp="1795870000"), "numeric timestamp"),
    ],
)
def test_bad_signatures_are_refused_and_not_stored(mutate, reason):
    now = time.time()
    message = signed({"command_id": "c1", "command": "echo", "params": {"message": "a"}, "timestamp": int(now)})
    mutate(message)
    with pytest.raises(Rejected) as info:
        parse(json.dumps(message), secret=SECRET, now=now)
    assert reason in info.value.reason
    assert info.value.command_id == "c1" and info.value.stored is False


@pytest.mark.parametrize("skew", [301, -301, 3600])
def test_stale_or_future_signed_messages_are_refused(skew):
    now = time.time()
    message = signed({"command_id": "c1", "command": "echo", "params": {}, "timestamp": int(now - skew)})
    with pytest.raises(Rejected) as info:
        parse(json.dumps(message), secret=SECRET, now=now)
    assert "at most 300 s is accepted" in info.value.reason


def test_response_has_the_six_contract_fields():
    response = protocol.response("c1", "success", "out", None, 12.7, "agent-1", truncated=True)
    assert list(response)[:6] == ["command_id", "status", "output", "error", "execution_time_ms", "timestamp"]
    assert response["execution_time_ms"] == 12 and isinstance(response["timestamp"], int)
    assert response["agent_id"] == "agent-1" and response["truncated"] is True
    assert json.loads(protocol.encode(response)) == response


def test_encode_survives_lone_surrogates():
    response = protocol.response("c1", "success", "\ud800", None, 0, "a")
    assert protocol.encode(response).encode("utf-8")


@pytest.mark.parametrize("timestamp", [10**400, -(10**400), 10**4000], ids=["1e400", "-1e400", "1e4000"])
def test_a_huge_integer_timestamp_is_refused_like_any_bad_timestamp(timestamp):
    """A JSON int has no size limit; no float holds 10**400 (it raised OverflowError, uncaught)."""
    message = signed({"command_id": "c1", "command": "echo", "params": {}, "timestamp": timestamp})
    with pytest.raises(Rejected) as info:
        parse(json.dumps(message), secret=SECRET)
    assert "needs a numeric timestamp" in info.value.reason
    assert info.value.stored is False
    # Unsigned, the timestamp is only informative: kept out of the Command, never computed with.
    assert parse(json.dumps({**message, "auth": None})).timestamp is None


def test_an_oversized_message_is_refused_before_it_is_parsed():
    """A 5 MB list parsed before the size check raised the agent's memory from 48 to 81 MB."""
    import tracemalloc

    data = json.dumps({"command_id": "big", "command": "echo", "params": {"message": [0] * 2_500_000}}).encode()
    assert len(data) > 5_000_000
    tracemalloc.start()
    try:
        with pytest.raises(Rejected) as info:
            parse(data, secret=SECRET)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 100_000, f"parse allocated {peak} bytes for a message it refuses"
    assert info.value.reason == f"message is {len(data)} bytes, over the limit of 1048576 bytes (MAX_MESSAGE_BYTES)"
    # Signing on: its command_id is unverified (it was not even parsed), so it is not answered.
    assert info.value.command_id is None


@pytest.mark.parametrize(
    "head, command_id",
    [
        (b'{"command_id": "big-1", "command": "echo"', "big-1"),
        (b'  {\n "command_id":"caf\\u00e9", "params": {', "caf\u00e9"),
        (b'{"command": "echo", "command_id": "second"', None),  # not leading: not looked for
        (b'{"command_id": "a\\u2028b", "command": "echo"', None),  # the usual command_id check
        (b'{"command_id": "' + b"x" * 200 + b'", "command": "echo"', None),
        (b'{"command_id": "unterminated' + b"x" * 3000, None),
        (b'{"command_id": 42, "command": "echo"', None),
        (b'[1, 2, 3', None),
    ],
)
def test_an_oversized_unsigned_message_is_answered_only_under_a_leading_command_id(head, command_id):
    data = head + b" " * 3000 + b"}"
    with pytest.raises(Rejected) as info:
        parse(data, max_bytes=2048)
    assert info.value.command_id == command_id
    assert info.value.reason.startswith(f"message is {len(data)} bytes, over the limit of 2048 bytes")
