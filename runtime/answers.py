"""The response of a command: truncated to OUTPUT_LIMIT, signed, and with every secret masked."""

from __future__ import annotations

from typing import Any

import protocol
import sealed
from config import Config
from handlers import Result
from outbox import Message


class Answers:
    """Builds responses and their outbox Messages for one agent; any thread.

    ``secrets`` (the configured ones: Redis password, shared secret) are masked as ``***`` in
    every output and error, with a command's decrypted params where it has any.
    """

    def __init__(self, config: Config, secrets: list[str]):
        self.config = config
        self.secrets = sealed.maskable(secrets)

    def answer(self, command_id: str, status: str, output: str | None, error: str | None,
               elapsed_ms: int, result_key: bool = True) -> tuple[dict[str, Any], Message]:
        """The response for a command and the outbox Message that carries it."""
        extra: dict[str, Any] = {}
        limit = self.config.output_limit
        if output is not None and len(output) > limit:
            extra = {"truncated": True, "output_size": len(output)}
            half = limit // 2
            output = f"{output[:half]}\n[... {len(output) - 2 * half} characters omitted ...]\n{output[-half:]}"
        response = protocol.response(command_id, status, output, error, elapsed_ms, self.config.agent_id, **extra)
        if self.config.shared_secret:
            response = protocol.sign_response(response, self.config.shared_secret)
        key = self.config.result_key(command_id) if result_key else None
        return response, Message(self.config.response_channel, protocol.encode(response), command_id, key)

    def error_answer(self, command_id: str, error: str, result_key: bool = True) -> tuple[dict[str, Any], Message]:
        """An error response for a command that will not run."""
        return self.answer(command_id, "error", None, self.mask(error), 0, result_key)

    def mask(self, text: str | None, plain: tuple[str, ...] = ()) -> str | None:
        """``text`` with the configured secrets and a command's decrypted params (``plain``) as ``***``."""
        if not plain:
            return sealed.mask(text, self.secrets)
        # Also as the agent's own errors quote a value (preview: repr), escapes and all.
        forms = [form for value in plain for form in (value, repr(value)[1:-1])]
        return sealed.mask(text, sealed.maskable((*self.secrets, *forms)))

    def redacted(self, result: Result, plain: tuple[str, ...] = ()) -> Result:
        """``result`` with every secret masked (``mask``): its output, error and full output.

        Applied once, right after a command ran, before its Result becomes a response or a row:
        a child can print the secrets, and the agent's own error texts quote the child's stderr.
        """
        if not self.secrets and not plain:
            return result
        return Result(result.status, self.mask(result.output, plain), self.mask(result.error, plain),
                      self.mask(result.full_output, plain), result.exit_code)
