"""``cockpit-agent send``: a command sent the way the Cockpit backend sends it, and its answer."""

from __future__ import annotations

import argparse
import json
import sys
import time
import uuid
from typing import Any

import redis

import protocol
import sealed
from config import Config
from errors import EX_FAIL, EX_NO_RESPONSE, EX_OK, EX_USAGE, ConfigError
from handlers import REGISTRY
from handlers.loader import registry_with_dir

SEND_SENDER = "cockpit-agent-cli"


def send(config: Config, args: argparse.Namespace) -> int:
    """``send``: subscribe, publish (signed when a secret is set), wait, print the response."""
    agent_id = args.agent or config.agent_id
    params = dict(args.params)
    # Only for this host's own agent: another (--agent) may run a newer version with more.
    takes, unknown = ((), []) if agent_id != config.agent_id else \
        _unknown_params(config, args.command, params, args.env_file)
    if unknown:
        # The agent ignores parameters it does not know (a newer backend may send more), so a
        # mistyped one would run the command with its defaults: container=x restarts the first
        # whitelisted container. An operator's typo is caught here instead.
        print(f"cockpit-agent: {args.command} takes {', '.join(takes) or 'no parameters'}, not "
              f"{', '.join(unknown)}; the agent would ignore {'them' if len(unknown) > 1 else 'it'} and "
              f"run {args.command} with its defaults. Nothing was sent.", file=sys.stderr)
        return EX_USAGE
    command_id = str(uuid.uuid4())
    params = sealed.seal_params(params, config.shared_secret)  # password=... encrypted, as the backend does
    message: dict[str, Any] = {"command_id": command_id, "command": args.command, "params": params,
                               "timestamp": int(time.time()), "sender": SEND_SENDER}
    if config.shared_secret:
        message["auth"] = {"signature": protocol.sign(message, config.shared_secret)}
    result_key = f"cockpit-agent-result:{agent_id}:{command_id}"
    client = config.redis_client()
    pubsub = client.pubsub(ignore_subscribe_messages=True)
    try:
        pubsub.subscribe(f"cockpit-agent-response:{agent_id}")
        deadline = time.monotonic() + max(0.0, args.timeout)
        while not pubsub.subscribed:  # subscribed before publishing, or a fast reply is lost
            pubsub.get_message(timeout=0.1)
            if time.monotonic() > deadline + 5:
                raise redis.TimeoutError("no confirmation of SUBSCRIBE")
        receivers = client.publish(f"cockpit-agent:{agent_id}", json.dumps(message))
        if receivers == 0:
            print(f"cockpit-agent: no agent is subscribed to cockpit-agent:{agent_id}; the command was not "
                  "delivered (is the agent running, and is the id right?)", file=sys.stderr)
            return EX_NO_RESPONSE
        spinner = Spinner(sys.stderr, f"{args.command} on {agent_id}")
        try:
            response = _wait_response(pubsub, command_id, deadline, spinner)
        finally:
            spinner.clear()
    finally:
        try:
            pubsub.close()
        except Exception:
            pass
    if response is None:
        try:
            response = _result_key(config, result_key, time.monotonic() + 2, spinner)
        finally:
            spinner.clear()
        if response is not None:
            print(f"cockpit-agent: the reply was missed on the channel; read it from {result_key}", file=sys.stderr)
    if response is None:
        print(f"cockpit-agent: no response to {command_id} within {args.timeout:g} s "
              f"(it may still come: redis-cli GET {result_key})", file=sys.stderr)
        return EX_NO_RESPONSE
    print(json.dumps(response, indent=2, ensure_ascii=False))
    return EX_OK if response.get("status") == "success" else EX_FAIL


def _unknown_params(config: Config, command: str, params: dict[str, Any],
                    env_file: str | None) -> tuple[tuple[str, ...], list[str]]:
    """The parameters this host's handler for ``command`` takes, and those in ``params`` it does
    not. Nothing is unknown for a command this host does not have (the agent answers that)."""

    try:
        registry = registry_with_dir(REGISTRY, config.handlers_dir, env_file=env_file)
    except ConfigError:  # the agent would not start either; check says why
        registry = REGISTRY
    handler = registry.get(command)
    if handler is None:
        return (), []
    return handler.params, handler.unknown(params)


class Spinner:
    """Shows that ``send`` is waiting: ``| waiting for echo on host-1 ... 3 s`` redrawn on stderr
    while it waits, wiped before the response is printed. Nothing at all when stderr is not a
    terminal (a script, a pipe, a log file)."""

    frames = "|/-\\"
    after = 0.25  # an answer quicker than this shows no line at all (no flicker)

    def __init__(self, stream, what: str):
        self.stream, self.what = stream, what
        self.on = stream.isatty()
        self.every = 0.1 if self.on else 0.5  # how long a wait may block between redraws
        self.started = time.monotonic()
        self.drawn = 0

    def tick(self) -> None:
        """Redraw the line (a terminal only)."""
        elapsed = time.monotonic() - self.started
        if not self.on or elapsed < self.after:
            return
        frame = self.frames[self.drawn % len(self.frames)]
        self.stream.write(f"\r{frame} waiting for {self.what} ... {int(elapsed)} s")
        self.stream.flush()
        self.drawn += 1

    def clear(self) -> None:
        """Wipe the line, so what follows starts on a clean one."""
        if self.on and self.drawn:
            self.stream.write("\r\033[K")
            self.stream.flush()
            self.drawn = 0


def _wait_response(pubsub, command_id: str, deadline: float, spinner: Spinner) -> dict | None:
    """The response to ``command_id`` from the channel, or None at the deadline or on a lost connection."""
    while True:
        spinner.tick()
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            return None
        try:
            message = pubsub.get_message(timeout=min(remaining, spinner.every))
        except (redis.ConnectionError, redis.TimeoutError):
            return None  # the result key still has it
        if not message or message.get("type") != "message":
            continue
        try:
            response = json.loads(message["data"])
        except ValueError:
            continue
        if isinstance(response, dict) and response.get("command_id") == command_id:
            return response


def _result_key(config: Config, key: str, deadline: float, spinner: Spinner) -> dict | None:
    client = config.redis_client()
    while True:
        spinner.tick()
        try:
            raw = client.get(key)
        except (redis.ConnectionError, redis.TimeoutError):
            raw = None
        if raw is not None:
            try:
                return json.loads(raw)
            except ValueError:
                return None
        if time.monotonic() >= deadline:
            return None
        time.sleep(0.2)  # polling Redis with a deadline: nothing to wait on
