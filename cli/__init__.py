"""The operator's commands: ``cockpit-agent check|send|status|outbox|history``.

``agent.py`` parses the command line and calls ``run``; everything here talks to Redis or
reads the agent's SQLite file directly, so it works whether or not the agent is running.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

import redis

from cli.check import check
from cli.common import redis_problem, since, where
from cli.history import history
from cli.outbox import outbox
from cli.send import send
from cli.status import status
from config import load
from errors import EX_CONFIG, EX_INTERRUPTED, EX_OK, EX_UNAVAILABLE, ConfigError

EXIT_CODES = """\
exit codes:
  0   success (check: every check passed; send: the command succeeded; status: agent online)
  1   failure (a check failed; send: the command answered status=error; status: agent offline
      or not registered; outbox/history: no such entry, or the database does not exist)
  2   usage error (unknown option, malformed key=value)
  3   send: no response within --timeout, or no agent subscribed to the command channel
  69  Redis cannot be reached (or refuses the credentials)
  78  the configuration is invalid (the line printed names the variable)
  130 interrupted (Ctrl-C)

see also: cockpit-agent help COMMAND, man 8 cockpit-agent, docs/OPERATIONS.md"""


def _key_value(text: str) -> tuple[str, Any]:
    """``key=value`` (a string) or ``key:=json`` (any JSON value: numbers, true, null, ...)."""
    if "=" not in text:
        raise argparse.ArgumentTypeError(f"{text!r}: expected key=value (or key:=json)")
    key, value = text.split("=", 1)
    if key.endswith(":"):
        key = key[:-1]
        try:
            value = json.loads(value)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r}: the value after := is not JSON") from None
    if not key:
        raise argparse.ArgumentTypeError(f"{text!r}: the key is empty")
    return key, value


def _since(text: str) -> float:
    try:
        return since(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def add_commands(sub: argparse._SubParsersAction, common: argparse.ArgumentParser,
                 top: argparse.ArgumentParser | None = None) -> None:
    """Add the operator commands to ``agent.py``'s sub-parsers (``top`` is the parser itself,
    for ``help``)."""
    fmt = argparse.RawDescriptionHelpFormatter

    def add(name: str, help: str, description: str) -> argparse.ArgumentParser:
        return sub.add_parser(name, help=help, description=description, epilog=EXIT_CODES,
                              formatter_class=fmt, parents=[common])

    def reads_the_database(p: argparse.ArgumentParser) -> None:
        p.add_argument("--db", metavar="PATH",
                       help="the agent's database (default: OUTBOX_DB from the environment or the settings file, "
                            "else /var/lib/cockpit-agent/outbox.db); nothing else of the configuration is needed")

    def json_flag(p: argparse.ArgumentParser, what: str) -> None:
        p.add_argument("--json", action="store_true", help=f"print {what}, for scripts")

    add("check", "check the configuration, Redis, the repositories and docker",
        "Check the configuration, the Redis connection (auth, TLS), that every whitelisted repository is a "
        "git work tree with an origin, that the docker CLI answers, and that the state directory is "
        "writable. One line per check; exits non-zero if any fails.")

    p = add("send", "send a command as the backend does and print the response",
            "Send COMMAND to an agent the way the Cockpit backend does (subscribe to the responses first, "
            "sign when COCKPIT_SHARED_SECRET is set), wait for the response and print it as JSON. If the "
            "reply on the channel was missed, read it from the result key instead. While it waits, a "
            "line on stderr counts the seconds when stderr is a terminal (nothing when it is not).\n\n"
            "examples:\n  cockpit-agent send echo message=hi\n  cockpit-agent send git_pull branch=main\n"
            "  cockpit-agent send docker_restart container_name=grafana --timeout 90")
    p.add_argument("command", metavar="COMMAND", help="the command name, e.g. echo, git_pull")
    p.add_argument("params", metavar="key=value", nargs="*", type=_key_value,
                   help="parameters; key=value sends a string, key:=JSON sends any JSON value")
    p.add_argument("--agent", metavar="ID", help="the agent id to send to (default: this host's AGENT_ID)")
    p.add_argument("--timeout", metavar="S", type=float, default=30.0,
                   help="seconds to wait for the response (default 30)")

    p = add("status", "show the registry entry, heartbeat age and the local queue and outbox",
            "Show the agent's registry entry in Redis (agents:{id}), how old its heartbeat is, and the local "
            "counts from its SQLite file (queued, running, done, waiting in the outbox).")
    json_flag(p, "one JSON object (agent_id, registry, online, heartbeat_age_s, local, ...)")
    reads_the_database(p)

    p = add("outbox", "list, show, retry or purge messages waiting to be published",
            "Inspect the outbox: the responses still waiting to be published. Only the database is read, "
            "so no Redis settings are needed. An entry is named by its row ID (outbox list) or by its "
            "COMMAND_ID.\n\n"
            "  outbox list               what waits, oldest first\n"
            "  outbox show ID            one message in full\n"
            "  outbox retry [ID ...]     make them due now (all when no ID); the agent publishes within seconds\n"
            "  outbox purge [ID ...]     delete them (all when no ID): they will never be delivered")
    p.add_argument("action", choices=["list", "show", "retry", "purge"], nargs="?", default="list")
    p.add_argument("refs", metavar="ID", nargs="*", help="a row id or a command_id")
    p.add_argument("--yes", "-y", action="store_true", help="purge without asking")
    json_flag(p, "one JSON object per row (list, show)")
    reads_the_database(p)

    p = add("history", "the last commands with their status and duration; history show ID: one in full",
            "The last N commands the agent accepted, oldest first, from its SQLite file (no Redis settings "
            "needed).\n\n"
            "  history [-n N] [--status S] [--command NAME] [--since AGE|TIME]\n"
            "  history show COMMAND_ID   the command, its full output and the response JSON as published\n\n"
            "examples:\n  cockpit-agent history --status error --since 1d\n"
            "  cockpit-agent history --command git_pull --since 2026-12-01T08:00 --json")
    p.add_argument("action", choices=["list", "show"], nargs="?", default="list")
    p.add_argument("command_id", metavar="COMMAND_ID", nargs="?", help="for show: the command's id")
    p.add_argument("-n", "--limit", type=int, default=20, help="how many (default 20)")
    p.add_argument("--status", choices=["success", "error", "queued", "running", "done"],
                   help="only commands that ended so (success, error) or are in this state")
    p.add_argument("--command", metavar="NAME", help="only this command (echo, git_pull, ...)")
    p.add_argument("--since", metavar="AGE|TIME", type=_since,
                   help="only commands received since: 90s, 10m, 2h, 1d, 1w ago, or an ISO time (local "
                        "unless it has an offset)")
    json_flag(p, "one JSON object per command (list: without output and response; show: everything)")
    reads_the_database(p)

    topics = [name for name in sub.choices if name != "help"]
    p = sub.add_parser("help", help="this list, or one command's options: help COMMAND",
                       description="Print the commands, or the options of one.", epilog=EXIT_CODES,
                       formatter_class=fmt, parents=[common])
    p.add_argument("topic", metavar="COMMAND", nargs="?", choices=topics,
                   help=f"one of: {', '.join(topics)}")
    p.set_defaults(parsers={**sub.choices, None: top})


def _help(args: argparse.Namespace) -> int:
    parser = args.parsers.get(args.topic)
    if parser is None:  # agent.py did not hand over the top parser
        parser = args.parsers["help"]
    parser.print_help()
    return EX_OK


def run(args: argparse.Namespace) -> int:
    """Run the operator command in ``args.cmd``; returns the exit code."""
    try:
        return _run(args)
    except KeyboardInterrupt:
        print("\ncockpit-agent: interrupted", file=sys.stderr)
        return EX_INTERRUPTED


def _run(args: argparse.Namespace) -> int:
    if args.cmd == "help":
        return _help(args)
    if args.cmd == "check":
        return check(args.env_file)
    if args.cmd in ("history", "outbox"):  # only the database: no Redis settings needed
        try:
            return {"history": history, "outbox": outbox}[args.cmd](args)
        except ConfigError as exc:
            print(f"cockpit-agent: configuration error: {exc}", file=sys.stderr)
            return EX_CONFIG
    try:
        config = load(args.env_file)
    except ConfigError as exc:
        for problem in exc.problems:  # every bad value, one line each
            print(f"cockpit-agent: configuration error: {problem}", file=sys.stderr)
        for warning in exc.warnings:
            print(f"cockpit-agent: warning: {warning}", file=sys.stderr)
        return EX_CONFIG
    for warning in config.warnings:
        print(f"cockpit-agent: warning: {warning}", file=sys.stderr)
    commands = {"send": send, "status": status}
    try:
        return commands[args.cmd](config, args)
    except (redis.ConnectionError, redis.TimeoutError, redis.AuthenticationError) as exc:
        print(f"cockpit-agent: cannot reach Redis at {where(config)}: {redis_problem(exc)}", file=sys.stderr)
        return EX_UNAVAILABLE
    except redis.ResponseError as exc:
        print(f"cockpit-agent: Redis refused: {exc}", file=sys.stderr)
        return EX_UNAVAILABLE
