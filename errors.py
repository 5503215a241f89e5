"""The agent's named errors.

Their text is what an operator reads, in a response's ``error`` field or on the one line the
agent prints before it refuses to start, so each says what was wrong and what is allowed.
"""


class AgentError(Exception):
    """Base of every error the agent raises on purpose."""


class ConfigError(AgentError):
    """A configuration value is missing or malformed; the agent does not start."""


class ValidationError(AgentError):
    """A command or its parameters are malformed; nothing runs."""


class NotAllowed(ValidationError):
    """A well-formed command asks for something outside the whitelist; nothing runs."""


class StoreUnavailable(AgentError):
    """The SQLite database cannot be written, so the agent cannot promise to keep a command."""


class DatabaseInUse(AgentError):
    """Another agent holds the database (OUTBOX_DB), or its lock file cannot be opened; this one
    does not start."""
