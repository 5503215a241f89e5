"""``git_pull`` and ``git_status`` on whitelisted repositories (GIT_REPO_PATH)."""

from __future__ import annotations

import os
import re

from errors import NotAllowed, ValidationError
from handlers.base import Action, Handler, checked_directory, string_param
from protocol import preview

# A stricter subset of git-check-ref-format: no leading '-' or '/', no '..', no '@{', no '//',
# nothing but letters, digits and ._/-, no component starting with '.' or ending with '.lock'.
_BRANCH_RE = re.compile(
    r"^(?![-/])(?!.*\.\.)(?!.*//)(?!.*/\.)(?!\.)(?!.*\.lock(?:/|$))(?!.*[/.]$)[A-Za-z0-9._/-]{1,200}$"
)
DEFAULT_BRANCH = "main"
# A path in an error is shown whole up to this length: an operator needs all of it to see
# what was refused, and a test tree's or a deep checkout's paths pass 80 characters.
PATH_PREVIEW = 300


def check_branch(value: str) -> str:
    """A branch name that git reads as a ref and never as an option; raises ValidationError."""
    # fullmatch: with match, "$" also matches before a trailing newline ("main\n").
    if not _BRANCH_RE.fullmatch(value) or "@{" in value:
        raise ValidationError(
            f"branch {preview(value)} is not an allowed branch name: use letters, digits and ._/-, "
            "not starting with '-', '.' or '/', without '..' or '//', no part ending in '.lock', "
            "at most 200 characters"
        )
    return value


def resolve_repository(value: str | None, config) -> str:
    """The whitelisted repository ``value`` names, after resolving symlinks and ``..``.

    The whitelist itself was resolved once, when the configuration was loaded, so a symlink
    put into it (or re-pointed) later does not move it. Returns the resolved whitelisted path;
    ``repository`` then pins the directory the command will run in.
    """
    allowed = list(config.git_repo_paths)
    if value is None:
        value = allowed[0]
    if "\x00" in value or not os.path.isabs(value):
        raise NotAllowed(
            f"repository_path {preview(value, PATH_PREVIEW)} must be an absolute path; allowed: {', '.join(allowed)} (GIT_REPO_PATH)"
        )
    try:
        real = os.path.realpath(value)
    except ValueError:  # not encodable as a file name (a lone surrogate from JSON)
        raise NotAllowed(
            f"repository_path {preview(value, PATH_PREVIEW)} is not a valid path; allowed: {', '.join(allowed)} (GIT_REPO_PATH)"
        ) from None
    if real in allowed:
        return real
    if os.path.normpath(value) in allowed:
        raise NotAllowed(
            f"repository_path {preview(value, PATH_PREVIEW)} now resolves to {preview(real, PATH_PREVIEW)}: it was replaced by a symlink "
            "or re-pointed since the agent started; not run (GIT_REPO_PATH is resolved at start)"
        )
    raise NotAllowed(
        f"repository_path {preview(value, PATH_PREVIEW)} is not whitelisted; allowed: {', '.join(allowed)} (GIT_REPO_PATH)"
    )


def prepare_pull(params, config) -> Action:
    """``git pull --ff-only -- origin <branch>`` in the repository; ``""`` means the default for both."""
    repo = resolve_repository(string_param(params, "repository_path", None) or None, config)
    branch = string_param(params, "branch", DEFAULT_BRANCH, max_len=200) or DEFAULT_BRANCH
    check_branch(branch)
    return Action(
        target=f"git:{repo}",
        argv=(config.git_bin, "pull", "--ff-only", "--", "origin", branch),
        timeout=config.command_timeout,
        directory=checked_directory(repo, "GIT_REPO_PATH"),
    )


def prepare_status(params, config) -> Action:
    """``git status`` in the repository; ``""`` means the default repository."""
    repo = resolve_repository(string_param(params, "repository_path", None) or None, config)
    return Action(
        target=f"git:{repo}",
        argv=(config.git_bin, "status"),
        timeout=config.command_timeout,
        directory=checked_directory(repo, "GIT_REPO_PATH"),
    )


GIT_PULL = Handler(
    "git_pull", prepare_pull, ("repository_path", "branch"),
    "fast-forward a whitelisted repository from origin (params: repository_path, branch)",
)
GIT_STATUS = Handler(
    "git_status", prepare_status, ("repository_path",),
    "show git status of a whitelisted repository (params: repository_path)",
)
