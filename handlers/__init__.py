"""The commands this agent runs.

To add one: write a module here with a ``prepare(params, config) -> Action`` and a ``Handler``,
then add that Handler to ``REGISTRY`` below. That is the whole change.
"""

from handlers.base import Action, Children, Handler, Registry, Result, execute
from handlers.docker import DOCKER_RESTART
from handlers.echo import ECHO
from handlers.git import GIT_PULL, GIT_STATUS

REGISTRY = Registry([ECHO, GIT_PULL, GIT_STATUS, DOCKER_RESTART])

__all__ = ["REGISTRY", "Action", "Children", "Handler", "Registry", "Result", "execute"]
