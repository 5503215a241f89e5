"""Property-based tests of everything that reads untrusted input: ``protocol.parse``, every
handler's parameter check (through ``REGISTRY.prepare``) and the Intake that ties them together.

Two promises are checked for any input hypothesis can think of:

* only the error path is taken: ``protocol.Rejected`` or ``errors.ValidationError``, never
  another exception (which would leave a message unanswered or kill a loop);
* nothing is started for an input that fails validation: ``subprocess.Popen`` (and the
  ``os`` spawn family) are patched to record calls while the checks run, and a Job reaches
  the queue only with an Action whose argv keeps every whitelist rule.

``make test`` runs the "default" profile (a few thousand examples in all); ``make fuzz
EXAMPLES=N`` selects the "fuzz" profile with N examples per test.
"""

from __future__ import annotations

import json
import logging
import os
import queue
import re
import subprocess
import time
from contextlib import contextmanager

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

import protocol
from config import Config
from errors import ValidationError
from handlers import REGISTRY
from handlers.docker import CONTAINER_NAME_RE

settings.register_profile(
    "default", max_examples=300, deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)
settings.register_profile(
    "fuzz", max_examples=int(os.environ.get("EXAMPLES", "20000")), deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "default"))
PROFILE = settings.get_current_profile_name()


def examples(n: int) -> settings:
    """``n`` examples in the default profile; the fuzz profile's count otherwise."""
    return settings(max_examples=n) if PROFILE == "default" else settings()


SECRET = "fuzz-shared-secret-0d41"
CONTAINERS = ("grafana", "web-1")
ALLOWED_BRANCH_CHARS = set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789._/-")


# -- the world the validators see: real directories and symlinks -------------------------------


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """Two whitelisted repositories and traps around them: symlinks in and out, a look-alike sibling."""
    base = tmp_path_factory.mktemp("fuzz")
    repos = base / "repos"
    (repos / "app" / ".git").mkdir(parents=True)
    (repos / "app2" / ".git").mkdir(parents=True)
    (repos / "app-evil" / ".git").mkdir(parents=True)
    (repos / "app" / "sub").mkdir()
    links = base / "links"
    links.mkdir()
    (links / "to-app").symlink_to(repos / "app")           # resolves into the whitelist: allowed
    (links / "to-etc").symlink_to("/etc")                   # out of the whitelist
    (links / "loop").symlink_to(links / "loop")             # a symlink loop
    (repos / "app" / "escape").symlink_to("/")              # inside a repo, pointing out
    (repos / "app" / "up").symlink_to(repos)                # inside a repo, pointing to its parent
    config = Config(
        agent_id="fuzz-agent",
        redis_password="unused-password",
        git_repo_paths=(str(repos / "app"), str(repos / "app2")),
        docker_containers=CONTAINERS,
        outbox_db=str(base / "state" / "outbox.db"),
        git_bin="/nonexistent/git-must-not-run",
        docker_bin="/nonexistent/docker-must-not-run",
    )
    return {"base": base, "config": config, "allowed": {os.path.realpath(p) for p in config.git_repo_paths}}


class SpawnRecorder:
    """Records every attempt to start a process instead of starting it."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, tuple]] = []

    def hook(self, name: str):
        def record(*args, **kwargs):
            self.calls.append((name, args))
            raise AssertionError(f"{name} called during validation: {args!r}")
        return record


@contextmanager
def no_spawn():
    """Patch subprocess.Popen and the os spawn family; yields the recorder."""
    recorder = SpawnRecorder()
    names = ["system", "posix_spawn", "posix_spawnp", "fork", "execv", "execve", "execvp", "popen"]
    saved = {n: getattr(os, n) for n in names if hasattr(os, n)}
    saved_popen = subprocess.Popen
    subprocess.Popen = recorder.hook("subprocess.Popen")
    for name in saved:
        setattr(os, name, recorder.hook(f"os.{name}"))
    try:
        yield recorder
    finally:
        subprocess.Popen = saved_popen
        for name, fn in saved.items():
            setattr(os, name, fn)


# -- strategies ---------------------------------------------------------------------------------

# st.text() leaves out lone surrogates, which JSON ("\\ud800") can carry; mix them back in.
wide_text = st.text(st.one_of(st.characters(), st.sampled_from(["\ud800", "\udfff", "\udc80"])), max_size=30)
json_scalars = st.one_of(
    st.none(), st.booleans(), st.integers(), st.floats(allow_nan=True, allow_infinity=True), wide_text
)
json_values = st.recursive(
    json_scalars, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(wide_text, inner, max_size=3),
    max_leaves=6,
)

SHELL_AND_CONTROL = ["$(id)", "`id`", ";", "|", "&", ">", "<", "'", '"', "\\", " ", "\t", "\n", "\r",
                     "\x00", "\x01", "\x1b", "\x7f", "*", "?", "[", "]", "~", "^", ":", "!", "#", "%"]
LOOKALIKES = ["\u2010", "\u2011", "\u2212", "\uff0d", "\u200b", "\u202e", "\ufeff", "\u0430", "\uff4d",
              "\u0301", "\u2215", "\uff0f", "\u2024", "\ud800", "\udc80", "é", "İ"]

branch_pieces = st.sampled_from(
    ["main", "dev", "feature", "release/1.2", "a", "0", "-", "--", "x.lock", "--upload-pack=touch /tmp/pwned", "-c", "..",
     "@{", "@{-1}", "@", "{", "}", "/", "//", ".", ".lock", "HEAD", "refs/heads/x", *SHELL_AND_CONTROL, *LOOKALIKES]
)
branches = st.one_of(
    st.lists(branch_pieces, min_size=0, max_size=6).map("".join),
    st.text(max_size=30),
    st.text(alphabet="ab.-/_@{}", max_size=12),
)


def path_strategy(world):
    base = str(world["base"])
    pieces = st.sampled_from(
        ["", ".", "..", "repos", "app", "app2", "app-evil", "sub", "links", "to-app", "to-etc", "loop", "escape",
         "up", "etc", "passwd", ".git", "app/", "app//", "app\n", "app\x00", "app ", " app", "ａpp", "аpp", "app\u200b",
         "APP", "app\ud800", "app\udcff", "~", "$HOME", "*", "\\", "app\\..", "…"]
    )
    prefixes = st.sampled_from([base, base + "/", base + "//", "/", "", "./", "../", base + "/repos/../repos",
                                "//" + base.lstrip("/"), "/proc/self/cwd"])
    suffixes = st.sampled_from(["", "/", "//", "/.", "/./", "/..", "/../app", "\n", "\x00", " "])
    composed = st.tuples(prefixes, st.lists(pieces, max_size=6), suffixes).map(
        lambda t: t[0] + ("/" if t[0] and not t[0].endswith("/") else "") + "/".join(t[1]) + t[2]
    )
    # Near misses: a whitelisted repo spelt another way, then a twist that may or may not leave it.
    spellings = st.sampled_from([*world["config"].git_repo_paths, base + "/links/to-app", base + "/repos/./app",
                                 base + "//repos/app", base + "/repos/app2/../app", base + "/repos/app/up/app2"])
    twists = st.lists(st.sampled_from(["/", "//", "/.", "/sub/..", "/./", "/up/app", "/up/app-evil", "/escape/..",
                                       "/..", "/sub", "\n", "\x00", " ", "\u200b", "/.git/.."]), max_size=3)
    near = st.tuples(spellings, twists).map(lambda t: t[0] + "".join(t[1]))
    return st.one_of(composed, near, st.text(max_size=40))


container_names = st.one_of(
    st.sampled_from([*CONTAINERS, "GRAFANA", "grafana ", " grafana", "grafana\n", "grafana\x00", "gr\u0430fana",
                     "ｇrafana", "-grafana", "grafana;id", "grafana/..", "../grafana", "grafana*", "web-1\n",
                     "web_1", "web-1.", "", "a" * 129, "$(id)"]),
    st.lists(st.sampled_from([*CONTAINERS, "-", ".", "_", "\n", "\x00", " ", *SHELL_AND_CONTROL[:8], *LOOKALIKES]),
             max_size=4).map("".join),
    st.text(max_size=20),
)


# -- invariants an accepted Action must keep ------------------------------------------------------


def check_branch_is_safe(branch: str) -> None:
    assert set(branch) <= ALLOWED_BRANCH_CHARS, branch
    assert not branch.startswith(("-", ".", "/")), branch
    assert ".lock/" not in branch, branch
    assert ".." not in branch and "@{" not in branch and "//" not in branch, branch
    assert not branch.endswith((".lock", "/", ".")), branch
    assert "/." not in branch, branch
    assert 1 <= len(branch) <= 200


def check_action(command: str, action, world) -> None:
    """Whatever prepare let through keeps the whitelist, by construction of its argv."""
    config = world["config"]
    if command == "echo":
        assert action.argv is None
        return
    argv = list(action.argv)
    if command in ("git_pull", "git_status"):
        assert argv[0] == config.git_bin
        assert action.directory[0] in world["allowed"], action.directory
        if command == "git_pull":
            assert argv[1:5] == ["pull", "--ff-only", "--", "origin"] and len(argv) == 6
            check_branch_is_safe(argv[5])
        else:
            assert argv[1:] == ["status"]
    elif command == "docker_restart":
        assert argv[:3] == [config.docker_bin, "restart", "--"] and len(argv) == 4
        assert argv[3] in CONTAINERS and CONTAINER_NAME_RE.fullmatch(argv[3])
    else:
        raise AssertionError(f"an unknown command {command!r} was prepared")


def prepare_or_refuse(command, params, world):
    """REGISTRY.prepare with spawning forbidden; returns the Action or None when refused."""
    with no_spawn() as spawns:
        try:
            action = REGISTRY.prepare(command, params, world["config"])
        except ValidationError as exc:
            assert str(exc), "a refusal must say why"
            action = None
    assert spawns.calls == []
    if action is not None:
        check_action(command, action, world)
    return action


# -- protocol.parse -------------------------------------------------------------------------------


def parse_or_reject(data, secret=None):
    try:
        cmd = protocol.parse(data, max_bytes=4096, secret=secret)
    except protocol.Rejected as rejected:
        assert rejected.reason
        if rejected.command_id is not None:
            assert rejected.command_id.encode("utf-8")  # answerable means storable and publishable
        return None
    assert isinstance(cmd.command_id, str) and 1 <= len(cmd.command_id) <= protocol.COMMAND_ID_MAX
    assert not any(ord(c) < 32 or ord(c) == 127 for c in cmd.command_id)
    cmd.command_id.encode("utf-8")
    cmd.command.encode("utf-8")
    assert isinstance(cmd.command, str) and cmd.command
    assert isinstance(cmd.params, dict)
    assert cmd.sender is None or isinstance(cmd.sender, str)
    return cmd


@examples(500)
@given(st.binary(max_size=300))
def test_parse_arbitrary_bytes_only_rejects(data):
    parse_or_reject(data)
    parse_or_reject(data, secret=SECRET)


envelopes = st.fixed_dictionaries(
    {},
    optional={
        "command_id": st.one_of(wide_text, st.text(min_size=120, max_size=140), json_values, st.just("c-1")),
        "command": st.one_of(st.sampled_from(REGISTRY.names()), wide_text, json_values),
        "params": st.one_of(st.dictionaries(wide_text, json_values, max_size=4), json_values),
        "timestamp": st.one_of(st.integers(), st.floats(), wide_text, st.none(), st.just(int(time.time()))),
        "sender": st.one_of(wide_text, json_values),
        "auth": st.one_of(st.fixed_dictionaries({"signature": st.one_of(wide_text, st.text("0123456789abcdef", min_size=64, max_size=64))}), json_values),
    },
)


@examples(500)
@given(envelopes)
def test_parse_arbitrary_json_messages_only_rejects(message):
    data = json.dumps(message).encode()
    assert parse_or_reject(data, secret=SECRET) is None or "auth" in message  # unsigned never passes with a secret
    parse_or_reject(data)


@examples(200)
@given(envelopes, st.sampled_from(["command", "params", "timestamp", "sender", "command_id", "extra"]), json_values)
def test_signed_messages_verify_and_any_change_is_refused(message, field, value):
    message = {"command_id": "c-1", "command": "echo", **message, "timestamp": int(time.time())}
    message.pop("auth", None)
    message["auth"] = {"signature": protocol.sign(message, SECRET)}
    data = json.dumps(message)
    cmd = parse_or_reject(data, secret=SECRET)
    tampered = {**message, field: value}
    if json.dumps({k: v for k, v in tampered.items() if k != "auth"}, sort_keys=True) == \
            json.dumps({k: v for k, v in message.items() if k != "auth"}, sort_keys=True):
        return
    with pytest.raises(protocol.Rejected) as refused:
        protocol.parse(json.dumps(tampered), secret=SECRET)
    assert refused.value.command_id is None or not refused.value.stored, \
        "an unauthenticated message must not claim its command_id"
    assert cmd is None or cmd.signed


# -- validators ----------------------------------------------------------------------------------


@examples(500)
@given(st.one_of(st.sampled_from(REGISTRY.names()), st.text(max_size=15), json_values),
       st.one_of(st.dictionaries(st.sampled_from(["repository_path", "branch", "container_name", "message", "x"]),
                                 json_values, max_size=4), json_values))
def test_prepare_arbitrary_commands_and_params_only_refuses(world, command, params):
    prepare_or_refuse(command, params, world)


@examples(500)
@given(st.data())
def test_repository_paths(world, data):
    path = data.draw(path_strategy(world))
    command = data.draw(st.sampled_from(["git_pull", "git_status"]))
    action = prepare_or_refuse(command, {"repository_path": path}, world)
    event("path accepted" if action is not None else "path refused")
    if action is not None and path == "":
        # "" is "not given": the first whitelisted repository, as the backend's request models mean it.
        assert action.directory[0] == os.path.realpath(world["config"].git_repo_paths[0])
    elif action is not None:
        # Accepted only if the path really is a whitelisted repository, whatever way it was spelt.
        assert "\x00" not in path and os.path.isabs(path)
        assert os.path.realpath(path) in world["allowed"]
        assert os.path.realpath(path) == action.directory[0]
    else:
        try:
            real = os.path.realpath(path) if "\x00" not in path and os.path.isabs(path) else None
        except ValueError:  # not encodable as a file name
            real = None
        assert real not in world["allowed"], f"{path!r} resolves to a whitelisted repo but was refused"


@examples(500)
@given(branches)
def test_branches(world, branch):
    action = prepare_or_refuse("git_pull", {"branch": branch}, world)
    event("branch accepted" if action is not None else "branch refused")
    if action is not None:
        assert action.argv[-1] == (branch or "main")
        check_branch_is_safe(action.argv[-1])


@examples(150)
@given(st.one_of(branches, st.from_regex(r"[A-Za-z0-9._/-]{1,30}", fullmatch=True)))
def test_accepted_branches_are_valid_git_refs(world, branch):
    """What the agent accepts, git itself accepts as a branch ref (checked by running git)."""
    action = prepare_or_refuse("git_pull", {"branch": branch}, world)
    if action is not None:
        check = subprocess.run(["git", "check-ref-format", f"refs/heads/{action.argv[-1]}"], capture_output=True)
        assert check.returncode == 0, f"git refuses {action.argv[-1]!r} as a ref"


@examples(300)
@given(container_names)
def test_container_names(world, name):
    action = prepare_or_refuse("docker_restart", {"container_name": name}, world)
    if action is not None:
        # "" is "not given": the first whitelisted container, as the backend's request models mean it.
        assert action.argv[-1] == (name or CONTAINERS[0]) and action.argv[-1] in CONTAINERS


def test_known_attacks_are_refused(world):
    """The cases that made this issue, spelt out so a reader sees them."""
    repo = sorted(world["config"].git_repo_paths)[0]
    refused = [
        ("git_pull", {"branch": "--upload-pack=touch /tmp/pwned"}),
        ("git_pull", {"branch": "main\n"}),
        ("git_pull", {"branch": "main..evil"}),
        ("git_pull", {"branch": "@{-1}"}),
        ("git_pull", {"branch": "main;id"}),
        ("git_pull", {"branch": "/G"}),                 # found by test_accepted_branches_are_valid_git_refs
        ("git_pull", {"branch": "a.lock/b"}),
        ("git_pull", {"repository_path": repo + "/escape/etc"}),
        ("git_pull", {"repository_path": repo + "/../app-evil"}),
        ("git_pull", {"repository_path": repo + "\x00"}),
        ("git_pull", {"repository_path": repo + "\n"}),
        ("git_pull", {"repository_path": repo.replace("app", "\u0430pp")}),
        ("git_status", {"repository_path": str(world["base"] / "links" / "to-etc")}),
        ("git_status", {"repository_path": "app"}),
        ("echo", {"message": "\ud800"}),
        ("docker_restart", {"container_name": "grafana\n"}),
        ("docker_restart", {"container_name": "gr\u0430fana"}),
        ("docker_restart", {"container_name": "-grafana"}),
        ("docker_restart", {"container_name": ["grafana"]}),
        ("rm", {}),
    ]
    for command, params in refused:
        assert prepare_or_refuse(command, params, world) is None, (command, params)
    allowed = [
        ("git_pull", {"repository_path": repo + "/", "branch": "release/1.2"}),
        ("git_pull", {"repository_path": repo + "/sub/.."}),
        ("git_status", {"repository_path": str(world["base"] / "links" / "to-app")}),
        ("docker_restart", {"container_name": "web-1"}),
    ]
    for command, params in allowed:
        assert prepare_or_refuse(command, params, world) is not None, (command, params)


# -- the Intake: a raw message all the way to the queue ------------------------------------------


class ErrorLog(logging.Handler):
    """Collects ERROR records (an escaped exception is logged at ERROR by Intake.handle)."""

    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@pytest.fixture(scope="module")
def intake(world):
    from agent import Agent

    agent = Agent(world["config"])
    store = agent.open_store()
    handler = ErrorLog()
    logging.getLogger("cockpit_agent").addHandler(handler)
    yield agent, agent.make_intake(store), store, handler
    logging.getLogger("cockpit_agent").removeHandler(handler)
    store.close()


def intake_messages(world):
    params = st.fixed_dictionaries({}, optional={
        "repository_path": st.one_of(path_strategy(world), json_values),
        "branch": st.one_of(branches, json_values),
        "container_name": st.one_of(container_names, json_values),
        "message": st.one_of(st.text(max_size=20), json_values),
    })
    message = st.fixed_dictionaries(
        {"command_id": st.one_of(st.uuids().map(str), st.text(min_size=1, max_size=20)),
         "command": st.one_of(st.sampled_from(REGISTRY.names()), st.text(max_size=10))},
        optional={"params": st.one_of(params, json_values), "sender": st.text(max_size=10)},
    )
    return st.one_of(message.map(lambda m: json.dumps(m).encode()), st.binary(max_size=100))


@examples(400)
@given(st.data())
def test_intake_never_escapes_and_queues_only_valid_actions(world, intake, data):
    agent, intake_, store, errors = intake
    raw = data.draw(intake_messages(world))
    before = store.counts()
    with no_spawn() as spawns:
        intake_.handle(raw)
    assert spawns.calls == []
    assert errors.records == [], [r.getMessage() for r in errors.records]
    queued = []
    while True:
        try:
            queued.append(agent.queue.get_nowait())
        except queue.Empty:
            break
    try:
        cmd = protocol.parse(raw, max_bytes=agent.config.max_message_bytes)
    except protocol.Rejected as rejected:
        event("intake: rejected by parse")
        assert queued == []
        if rejected.command_id is not None:  # answerable: an answer waits, or one was already recorded
            assert store.get(rejected.command_id) is not None or store.counts()["outbox"] > before["outbox"]
        return
    row = store.get(cmd.command_id)
    assert row is not None, "an accepted message must leave a commands row"
    event(f"intake: {'queued ' + cmd.command if queued else 'refused or repeated'}")
    for job in queued:
        assert job.command_id == cmd.command_id
        check_action(job.command, job.action, world)
        # The Job's Action is exactly what the validator makes of the stored params.
        assert REGISTRY.prepare(row["command"], json.loads(row["params"]), agent.config) == job.action
    if queued:
        # Play the worker without running anything, so a repeated command_id finds a done row.
        assert row["state"] == "queued" and store.claim(cmd.command_id)
        _, message = agent.answers.answer(cmd.command_id, "success", "not run (fuzz)", None, 0)
        store.finish(cmd.command_id, "success", "not run (fuzz)", None, 0, message)


def test_make_fuzz_selects_the_fuzz_profile_with_its_examples():
    from conftest import ROOT

    dry = subprocess.run(["make", "-n", "-C", str(ROOT), "fuzz", "EXAMPLES=1234"], capture_output=True, text=True)
    assert re.search(r"HYPOTHESIS_PROFILE=fuzz EXAMPLES=1234 \S*python -m pytest tests/test_fuzz.py", dry.stdout), dry.stdout
    settings.load_profile("fuzz")
    try:
        assert settings.default.max_examples == int(os.environ.get("EXAMPLES", "20000"))
    finally:
        settings.load_profile(PROFILE)

