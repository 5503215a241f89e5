"""The durable SQLite store behind the agent's promise to lose nothing."""

from outbox.store import SCHEMA, Accepted, Message, State, Store

__all__ = ["SCHEMA", "Accepted", "Message", "State", "Store"]
