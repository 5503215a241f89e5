"""``docker_restart`` of a whitelisted container (DOCKER_CONTAINER_NAME)."""

from __future__ import annotations

from config import CONTAINER_NAME_RE  # the same rule as for DOCKER_CONTAINER_NAME
from errors import NotAllowed, ValidationError
from handlers.base import Action, Handler, string_param, whitelisted
from protocol import preview


def prepare_restart(params, config) -> Action:
    """``docker restart -- <name>``; the output on success is the container name.

    No name, or ``""`` (as for git's parameters), is the first whitelisted container.
    """
    allowed = config.docker_containers
    if not allowed:  # also when a registry without for_config (a test's) offers it
        raise NotAllowed(f"docker_restart is off on this agent: {docker_off(config)}")
    name = string_param(params, "container_name", None, max_len=128)
    if not name:
        name = allowed[0]
    if not CONTAINER_NAME_RE.fullmatch(name):
        raise ValidationError(
            f"container_name {preview(name)} is not a valid container name; "
            f"allowed: {', '.join(allowed)} (DOCKER_CONTAINER_NAME)"
        )
    whitelisted("container_name", name, allowed, "DOCKER_CONTAINER_NAME")
    return Action(
        target=f"docker:{name}",
        argv=(config.docker_bin, "restart", "--", name),
        timeout=config.docker_timeout,
        timeout_setting="DOCKER_TIMEOUT",
        success_output=name,
    )


def docker_off(config) -> str | None:
    """Why docker_restart is off: DOCKER_CONTAINER_NAME set to nothing (unset is grafana)."""
    if config.docker_containers:
        return None
    return "DOCKER_CONTAINER_NAME is empty, so no container may be restarted"


DOCKER_RESTART = Handler(
    "docker_restart", prepare_restart, ("container_name",),
    "restart a whitelisted container (params: container_name)", off=docker_off,
)
