"""The agent's named errors, one tree under ``AgentError``, and its exit codes.

Their text is what an operator reads, in a response's ``error`` field or on the one line the
agent prints before it refuses to start, so each says what was wrong and what is allowed.
"""

# Exit codes of the agent and of the operator commands (sysexits.h where one fits). The unit
# does not restart on EX_CONFIG (RestartPreventExitStatus=78); on EX_SOFTWARE it does.
EX_OK = 0
EX_FAIL = 1  # a check failed, the command answered an error, or the agent was stopped by force
EX_USAGE = 2  # the command line is wrong
EX_NO_RESPONSE = 3  # `send`: no response within the timeout
EX_UNAVAILABLE = 69  # Redis cannot be reached
EX_SOFTWARE = 70  # a part of the agent died or is stuck for good: systemd restarts it
EX_CONFIG = 78  # the configuration is invalid, or another agent holds the database
EX_INTERRUPTED = 130  # an operator command stopped by Ctrl-C (128 + SIGINT, as the shell reports it)


class AgentError(Exception):
    """Base of every error the agent raises on purpose."""


class ConfigError(AgentError):
    """A configuration value is missing or malformed; the agent does not start.

    ``config.load`` reports every bad value at once: ``problems`` holds one line each, and the
    text is that line, or ``N problems:`` and one indented line per problem; ``warnings`` the
    variables it does not know, which may explain a problem (REDIS_PASWORD: REDIS_PASSWORD unset).
    """

    def __init__(self, *problems: str, warnings: tuple[str, ...] = ()):
        super().__init__(*problems)
        self.problems: tuple[str, ...] = problems
        self.warnings = warnings  # what else load noticed (a misspelt variable may be the cause)

    def __str__(self) -> str:
        if len(self.problems) <= 1:
            return self.problems[0] if self.problems else ""
        return f"{len(self.problems)} problems:" + "".join(f"\n  {p}" for p in self.problems)


class ValidationError(AgentError):
    """A command or its parameters are malformed; nothing runs."""


class NotAllowed(ValidationError):
    """A well-formed command asks for something outside the whitelist; nothing runs."""


class StoreUnavailable(AgentError):
    """The SQLite database cannot be read or written (a full disk, an I/O error), so the agent
    cannot promise to keep a command. Raised by the Store for every ``sqlite3.Error``, the
    original chained as its cause."""


class DatabaseInUse(AgentError):
    """Another agent holds the database (OUTBOX_DB), or its lock file cannot be opened; this one
    does not start."""
