"""Handlers: each command's parameter checks (with the operator-facing error text) and how
children are run (argv only, timeout kills the whole group, bad UTF-8 never fails)."""

import os
import sys
import time

import pytest

from config import Config
from conftest import wait_for
from errors import NotAllowed, ValidationError
from handlers import REGISTRY, Action, execute
from handlers.base import Children, Handler, Registry


@pytest.fixture
def config(git_repos, fake_docker):
    return Config(agent_id="t", git_repo_paths=(str(git_repos.clone),), docker_containers=("grafana", "web-1"),
                  docker_bin=str(fake_docker.path), command_timeout=5, docker_timeout=7)


def test_capabilities():
    assert REGISTRY.names() == ["docker_restart", "echo", "git_pull", "git_status"]


def test_duplicate_registration_is_an_error():
    handler = Handler("x", lambda p, c: Action(output="x"), (), "x")
    with pytest.raises(ValueError, match="registered twice"):
        Registry([handler, handler])


def test_echo(config):
    assert REGISTRY.prepare("echo", {}, config).output == "pong"
    assert REGISTRY.prepare("echo", {"message": "hello"}, config).output == "hello"
    with pytest.raises(ValidationError, match="message must be a string, got int 5"):
        REGISTRY.prepare("echo", {"message": 5}, config)


def test_unknown_command_lists_what_is_allowed(config):
    with pytest.raises(ValidationError) as info:
        REGISTRY.prepare("rm_rf", {}, config)
    assert str(info.value) == "unknown command 'rm_rf'; this agent runs: docker_restart, echo, git_pull, git_status"


def test_git_pull_argv_defaults(config, git_repos):
    action = REGISTRY.prepare("git_pull", {}, config)
    repo = os.path.realpath(git_repos.clone)
    assert action.argv == ("git", "pull", "--ff-only", "--", "origin", "main")
    assert action.timeout == 5 and action.target == f"git:{repo}" and action.directory[0] == repo
    assert REGISTRY.prepare("git_pull", {"branch": ""}, config).argv[-1] == "main"
    assert REGISTRY.prepare("git_pull", {"branch": "release/1.2"}, config).argv[-1] == "release/1.2"


def test_git_paths_resolve_symlinks_and_dotdot(config, git_repos, tmp_path):
    link = tmp_path / "link-to-clone"
    link.symlink_to(git_repos.clone)
    for spelling in (str(link), f"{git_repos.clone}/", f"{git_repos.clone}/sub/..", str(git_repos.clone)):
        action = REGISTRY.prepare("git_status", {"repository_path": spelling}, config)
        assert action.directory[0] == os.path.realpath(git_repos.clone)


@pytest.mark.parametrize("path", ["/etc", "{clone}/..", "{clone}/.git", "relative/repo", "{clone}\x00x", "/"])
def test_git_paths_outside_the_whitelist_are_refused(config, git_repos, path):
    with pytest.raises(NotAllowed) as info:
        REGISTRY.prepare("git_pull", {"repository_path": path.format(clone=git_repos.clone)}, config)
    assert f"allowed: {git_repos.clone} (GIT_REPO_PATH)" in str(info.value)


def test_symlink_out_of_the_whitelist_is_refused(config, tmp_path):
    evil = tmp_path / "evil"
    evil.symlink_to("/etc")
    with pytest.raises(NotAllowed, match="is not whitelisted"):
        REGISTRY.prepare("git_pull", {"repository_path": str(evil)}, config)


@pytest.mark.parametrize(
    "branch",
    ["--upload-pack=touch /tmp/pwned", "-b", "a..b", "main@{1}", "a b", "a;b", "$(id)", "a\nb", "a\x00b", ".hidden",
     "ends.lock", "ends/", "a//b", "x" * 201, "`id`", "a|b", "~1", "a^", "a:b", "a*", "a?b", "a[b", "a\\b"],
)
def test_hostile_branches_are_refused(config, branch):
    with pytest.raises(ValidationError) as info:
        REGISTRY.prepare("git_pull", {"branch": branch}, config)
    assert "branch" in str(info.value) and "allowed" in str(info.value) or "at most" in str(info.value)


@pytest.mark.parametrize("params, message", [
    ({"branch": 5}, "branch must be a string, got int 5"),
    ({"branch": ["main"]}, "branch must be a string, got list"),
    ({"repository_path": {"a": 1}}, "repository_path must be a string, got dict"),
    ({"repository_path": True}, "repository_path must be a string, got bool"),
])
def test_wrong_types_are_errors_not_coercions(config, params, message):
    with pytest.raises(ValidationError, match=message):
        REGISTRY.prepare("git_pull", params, config)


def test_docker_restart(config, fake_docker):
    action = REGISTRY.prepare("docker_restart", {}, config)
    assert action.argv == (str(fake_docker.path), "restart", "--", "grafana")
    assert action.timeout == 7 and action.timeout_setting == "DOCKER_TIMEOUT"
    assert REGISTRY.prepare("docker_restart", {"container_name": "web-1"}, config).argv[-1] == "web-1"


def test_empty_strings_mean_the_default_as_the_backend_sends_them(config, git_repos):
    # The backend's GitPullRequest defaults both to "" ("the agent uses its own configuration").
    default = REGISTRY.prepare("git_pull", {}, config)
    assert REGISTRY.prepare("git_pull", {"repository_path": "", "branch": ""}, config) == default
    assert REGISTRY.prepare("git_status", {"repository_path": ""}, config) == REGISTRY.prepare("git_status", {}, config)
    assert REGISTRY.prepare("docker_restart", {"container_name": ""}, config).argv[-1] == "grafana"


@pytest.mark.parametrize("name, message", [
    ("postgres", "container_name 'postgres' is not whitelisted; allowed: grafana, web-1 (DOCKER_CONTAINER_NAME)"),
    ("--privileged", "container_name '--privileged' is not a valid container name"),
    ("a b", "is not a valid container name"),
    ("grafana;rm", "is not a valid container name"),
])
def test_docker_refusals(config, name, message):
    with pytest.raises(ValidationError) as info:
        REGISTRY.prepare("docker_restart", {"container_name": name}, config)
    assert message in str(info.value)


def test_execute_runs_the_docker_stand_in(config, fake_docker):
    result = execute(REGISTRY.prepare("docker_restart", {"container_name": "web-1"}, config))
    assert (result.status, result.output, result.error) == ("success", "web-1", None)
    assert fake_docker.calls() == [["restart", "--", "web-1"]]
    fake_docker.behave("fail")
    result = execute(REGISTRY.prepare("docker_restart", {}, config))
    assert result.status == "error"
    assert result.error == "docker exited with status 1: Error response from daemon: No such container: grafana"


def test_missing_binary_is_a_clear_error():
    result = execute(Action(argv=("/nonexistent/git", "status"), timeout=5))
    assert result.status == "error" and result.error.startswith("could not start /nonexistent/git")


def test_bad_utf8_output_never_fails():
    result = execute(Action(argv=(sys.executable, "-c", "import sys; sys.stdout.buffer.write(b'ok \\xff\\xfe end')"),
                            timeout=10))
    assert result.status == "success" and result.output == "ok \ufffd\ufffd end"


def test_timeout_kills_the_whole_process_group():
    script = (
        "import subprocess, sys, time\n"
        "child = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)'])\n"
        "print(child.pid, flush=True)\n"
        "time.sleep(60)\n"
    )
    start = time.monotonic()
    result = execute(Action(argv=(sys.executable, "-c", script), timeout=1, timeout_setting="COMMAND_TIMEOUT"))
    assert time.monotonic() - start < 4  # the grandchild held the pipes: only killing it ends this early
    assert result.status == "error"
    assert result.error == "timed out after 1 s (COMMAND_TIMEOUT); the process was killed"
    grandchild = int(result.output)

    def gone():
        try:
            with open(f"/proc/{grandchild}/stat") as f:
                return f.read().split(") ")[1].startswith("Z")
        except FileNotFoundError:
            return True

    wait_for(gone, 10, message="the grandchild to be killed")


ESCAPING = (
    "import subprocess, sys, time\n"
    "escaped = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)'], start_new_session=True)\n"
    "print(escaped.pid, flush=True)\n"
)


@pytest.fixture
def escaped_pids():
    """pids of processes a command started in a session of their own; killed after the test."""
    pids = []
    yield pids
    for pid in pids:
        try:
            os.kill(pid, 9)
        except ProcessLookupError:
            pass


def test_a_process_that_escaped_the_group_does_not_hold_a_timed_out_answer(escaped_pids):
    """It holds the pipes after the kill (it is in another session): its output is waited for
    PIPE_GRACE, not until it ends (it was 5 s, and a deadline's answer came after the backend
    stopped waiting)."""
    start = time.monotonic()
    result = execute(Action(argv=(sys.executable, "-c", ESCAPING + "time.sleep(60)\n"), timeout=1,
                            timeout_setting="COMMAND_TIMEOUT"))
    took = time.monotonic() - start
    escaped_pids.append(int(result.output))  # what it printed before the kill is kept
    assert result.error == "timed out after 1 s (COMMAND_TIMEOUT); the process was killed"
    assert took < 1 + 1.5, f"answered after {took:.1f} s"
    assert os.path.exists(f"/proc/{escaped_pids[0]}")  # not ours to kill: it left the group


def test_a_command_that_exits_leaving_a_process_on_its_pipes_is_answered_when_it_exits(escaped_pids, caplog):
    """A command that starts a daemon which keeps its stdout: it ended with status 0, so the
    answer is its success, not a timeout after COMMAND_TIMEOUT."""
    start = time.monotonic()
    result = execute(Action(argv=(sys.executable, "-c", ESCAPING + "print('started', flush=True)\n"), timeout=30))
    took = time.monotonic() - start
    pid, said = result.output.splitlines()
    escaped_pids.append(int(pid))
    assert result.status == "success" and said == "started" and result.error is None
    assert took < 5, f"answered after {took:.1f} s; its timeout was 30 s"
    assert "exited, but a process it left running still holds its output" in caplog.text

    failed = execute(Action(argv=(sys.executable, "-c", ESCAPING + "raise SystemExit(3)\n"), timeout=30))
    escaped_pids.append(int(failed.output))
    assert failed.status == "error" and failed.error.startswith("python") and "exited with status 3" in failed.error


def test_children_get_no_secrets_and_no_stdin(monkeypatch):
    monkeypatch.setenv("REDIS_PASSWORD", "leak-me-not")
    monkeypatch.setenv("COCKPIT_SHARED_SECRET", "leak-me-neither")
    script = "import os, sys; print(sorted(os.environ)); print(sys.stdin.read() == ''); print(os.getpgrp() == os.getpid())"
    result = execute(Action(argv=(sys.executable, "-c", script), timeout=10))
    names, stdin_empty, own_group = result.output.splitlines()
    assert "REDIS_PASSWORD" not in names and "COCKPIT_SHARED_SECRET" not in names
    assert "GIT_TERMINAL_PROMPT" in names and "GIT_SSH_COMMAND" in names
    assert stdin_empty == "True" and own_group == "True"


def test_kill_all_interrupts_running_children():
    import threading

    children = Children()
    results = []
    thread = threading.Thread(target=lambda: results.append(
        execute(Action(argv=(sys.executable, "-c", "import time; time.sleep(60)"), timeout=120), children)))
    thread.start()
    deadline = time.monotonic() + 10
    while children.count() == 0 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert children.kill_all() == 1
    thread.join(10)
    assert results[0].status == "error" and results[0].error.startswith("interrupted")


@pytest.mark.parametrize("command", [[], {}, ["docker_restart"], 7, None])
def test_a_command_name_that_is_not_a_string_is_refused_also_with_a_command_turned_off(config, command):
    """Found by the fuzzer: with docker off, a list as the command name raised TypeError
    (unhashable) instead of a refusal."""
    import dataclasses

    off = dataclasses.replace(config, docker_containers=())
    registry = REGISTRY.for_config(off)
    assert "docker_restart" in registry.off
    with pytest.raises(ValidationError):
        registry.prepare(command, {}, config)
