"""A whitelisted repository swapped for a symlink (or a whitelisted symlink re-pointed) after
the check cannot send git into another repository: not the command already validated, not any
later one. Real git repositories throughout."""

import os
import subprocess

import pytest

from handlers import REGISTRY, execute


@pytest.fixture
def other(git_repos):
    """A second clone of the same origin, with a post-merge hook that counts pulls made in it.
    origin gets a new commit, so a pull in either clone moves and runs its hook."""
    other = git_repos.clone.parent / "other"
    git_repos.git("clone", "-q", str(git_repos.origin), str(other), cwd=git_repos.clone.parent)
    hook = other / ".git" / "hooks" / "post-merge"
    hook.write_text(f"#!/bin/sh\necho pulled >> {pulls_log(other)}\n")
    hook.chmod(0o755)
    git_repos.commit("news")
    return other


def pulls_log(repo):
    return repo.parent / "other-pulls.log"


def head(repo) -> str:
    return subprocess.run(["git", "-C", str(repo), "rev-parse", "HEAD"], capture_output=True, text=True,
                          check=True).stdout.strip()


def swap_for_symlink(path, target):
    """Move the directory at ``path`` aside and put a symlink to ``target`` in its place."""
    os.rename(path, f"{path}.moved")
    os.symlink(target, path)


@pytest.mark.parametrize("swap", ["symlink", "directory"])
def test_a_repository_swapped_after_validation_is_not_pulled_elsewhere(config_from, agent_env, git_repos, other, swap):
    config = config_from(agent_env)
    before = head(other)
    # Validated (as on arrival), then the directory is swapped while they wait for a worker.
    actions = [REGISTRY.prepare(command, {}, config) for command in ("git_pull", "git_status")]
    if swap == "symlink":
        swap_for_symlink(git_repos.clone, other)
    else:  # the other repository itself moved into the checked path
        os.rename(git_repos.clone, f"{git_repos.clone}.moved")
        os.rename(other, git_repos.clone)
        other = git_repos.clone
    for action in actions:
        result = execute(action)
        assert result.status == "error"
        assert result.error == f"{git_repos.clone} changed since it was checked (replaced or now a symlink); not run"
    assert head(other) == before and not pulls_log(other).exists()


def test_the_checked_directory_is_where_git_runs(config_from, agent_env, git_repos):
    """Unchanged, git runs in the checked directory through its fd: output and safe.directory as usual."""
    config = config_from(agent_env)
    git_repos.commit("news")
    result = execute(REGISTRY.prepare("git_pull", {"repository_path": str(git_repos.clone)}, config))
    assert result.status == "success", result
    assert "news" in result.output and (git_repos.clone / "news").exists()
    result = execute(REGISTRY.prepare("git_status", {}, config))
    assert result.status == "success" and "On branch main" in result.output


def test_later_commands_after_a_swap_are_refused(running_agent, make_backend, git_repos, other):
    agent = running_agent()
    backend = make_backend(agent.config.agent_id)
    assert backend.call("git_status")["status"] == "success"
    before = head(other)
    swap_for_symlink(git_repos.clone, other)
    for params in ({}, {"repository_path": ""}, {"repository_path": str(git_repos.clone)}):
        response = backend.call("git_pull", params)
        assert response["status"] == "error", (params, response)
        assert response["error"] == (
            f"repository_path '{git_repos.clone}' now resolves to '{other}': it was replaced by a symlink or "
            "re-pointed since the agent started; not run (GIT_REPO_PATH is resolved at start)")
    response = backend.call("git_pull", {"repository_path": str(other)})
    assert response["status"] == "error" and "is not whitelisted" in response["error"]
    assert head(other) == before and not pulls_log(other).exists()


def test_a_whitelisted_symlink_re_pointed_after_start_does_not_move_the_whitelist(
        running_agent, make_backend, git_repos, other, tmp_path):
    link = tmp_path / "current"
    link.symlink_to(git_repos.clone)
    agent = running_agent(GIT_REPO_PATH=str(link))
    assert agent.config.git_repo_paths == (str(git_repos.clone),)
    backend = make_backend(agent.config.agent_id)
    before = head(other)
    link.unlink()
    link.symlink_to(other)  # re-pointed: the agent must not follow it

    response = backend.call("git_pull", {"repository_path": str(link)})
    assert response["status"] == "error" and "is not whitelisted" in response["error"], response
    # The default is still what the link named at start.
    response = backend.call("git_pull")
    assert response["status"] == "success", response
    assert (git_repos.clone / "news").exists()
    assert head(other) == before and not pulls_log(other).exists()
