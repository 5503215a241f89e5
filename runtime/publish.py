"""Publishing responses: the Lua scripts, one pipelined round trip for many, and the intake's
own connection for answers published on arrival.

A response is PUBLISHed and SET at its result key in one step (``PUBLISH_ONCE``); who answered
is told by Redis's run_id (``RUN_ID``), which the flusher uses to confirm a PUBLISH is final.
"""

from __future__ import annotations

import hashlib
from typing import Any

import redis

from config import Config
from outbox import Message
from runtime.loop import REDIS_DOWN

# How long a published response stays held in the outbox (out of ``due``) while its
# publication is confirmed; past it, it is due again and published again.
HOLD_SECONDS = 30.0

# Publishes a response and stores it at its result key in one step. The "delivered" marker
# (``delivered_key``) makes a retry after a lost reply (Redis answered, the connection died
# before we read it) a no-op instead of a second copy. Returns the number of receivers, or -1
# if already delivered.
PUBLISH_ONCE = """
if #KEYS == 2 and redis.call('EXISTS', KEYS[2]) == 1 then return -1 end
local receivers = redis.call('PUBLISH', ARGV[1], ARGV[2])
if #KEYS == 2 then
  redis.call('SET', KEYS[1], ARGV[2], 'EX', ARGV[3])
  if receivers > 0 then redis.call('SET', KEYS[2], '1', 'EX', ARGV[3]) end
end
return receivers
"""

# Which Redis answered: its run_id, read inside Redis so the client parses 40 characters, not
# the whole INFO text (redis-py's INFO parser cost more than the PUBLISH). false if INFO is
# refused (ACL without +info): a PUBLISH with receivers is then taken as final.
RUN_ID = """
local info = redis.pcall('INFO', 'server')
if type(info) ~= 'string' then return false end
return string.match(info, 'run_id:(%x+)')
"""
PUBLISH_ONCE_SHA = hashlib.sha1(PUBLISH_ONCE.encode()).hexdigest()
RUN_ID_SHA = hashlib.sha1(RUN_ID.encode()).hexdigest()


RESULT_PREFIX = "cockpit-agent-result:"
DELIVERED_PREFIX = "cockpit-agent-delivered:"


def delivered_key(result_key: str) -> str:
    """The delivered marker of the response stored at ``result_key``:
    ``cockpit-agent-delivered:{agent_id}:{command_id}``. Under a prefix of its own, because as
    ``{result_key}:delivered`` the marker of command X was the result key of command
    ``X:delivered``, and publishing that one silenced X's answer."""
    return DELIVERED_PREFIX + (result_key[len(RESULT_PREFIX):] if result_key.startswith(RESULT_PREFIX) else result_key)


def publish_once_args(message: Message, ttl: int) -> list[Any]:
    """The EVALSHA arguments of PUBLISH_ONCE for ``message``."""
    keys = [message.result_key, delivered_key(message.result_key)] if message.result_key else []
    return [PUBLISH_ONCE_SHA, len(keys), *keys, message.channel, message.payload, ttl]


def publish_messages(client: redis.Redis, messages: list[Message], ttl: int,
                     read_run_id: bool = True) -> tuple[list[Any], str | None]:
    """PUBLISH ``messages`` (each also SET at its result key) in one round trip, in order.

    Returns each message's result (receivers, -1 if already delivered, or the exception Redis
    answered with, e.g. NoScriptError: nothing was published for that one) and the run_id of
    the Redis that did it: None if INFO is refused (or ``read_run_id`` is False), "" if it
    could not be read (it then never matches, and the message is published again rather than
    trusted). Raises if Redis cannot be reached. EVALSHA straight away: registered Scripts
    would first ask SCRIPT EXISTS, a second round trip each time; a Redis that forgot them
    (restarted) gets them loaded here.
    """
    for attempt in (1, 2):
        pipe = client.pipeline(transaction=False)
        for message in messages:
            pipe.evalsha(*publish_once_args(message, ttl))
        if read_run_id:
            pipe.evalsha(RUN_ID_SHA, 0)
        results = pipe.execute(raise_on_error=False)
        run_id = results.pop() if read_run_id else None
        for result in (run_id, *results):
            if isinstance(result, REDIS_DOWN):
                raise result
        missing = [isinstance(result, redis.exceptions.NoScriptError) for result in (*results, run_id)]
        if not any(missing):
            break
        load_scripts(client)
        if attempt == 2 or not all(missing[:len(results)]):
            break  # some did run: the caller sends the others again, in its own order
    if isinstance(run_id, Exception):
        return results, ""
    return results, run_id.decode() if run_id is not None else None


def load_scripts(client: redis.Redis) -> None:
    """Load the Lua scripts into a Redis that does not have them (restarted, SCRIPT FLUSH)."""
    client.script_load(PUBLISH_ONCE)
    client.script_load(RUN_ID)


class AnswerPublisher:
    """The intake's own Redis connection, for publishing answers as soon as they are committed.

    It reads the run_id of the Redis it is connected to once per connection, not once per
    answer (INFO, even inside Lua, cost more than the PUBLISH): a TCP connection cannot
    outlive the redis-server it reached, so every PUBLISH on it went to that run_id. A
    reconnection during a call leaves the run_id unknown ("": confirmed only by publishing
    again). Owned by one thread.
    """

    def __init__(self, config: Config):
        self.config = config
        self.client: redis.Redis | None = None
        self.run_id: str | None = None
        self.run_id_known = False  # False until read on the current connection
        self.connects = 0

    def _connected(self, connection: Any) -> None:
        self.connects += 1
        self.run_id_known = False

    def publish(self, messages: list[Message]) -> tuple[list[Any], str | None]:
        """As ``publish_messages``."""
        if self.client is None:
            client = self.config.redis_client(single_connection_client=True)  # connects now
            client.connection.register_connect_callback(self._connected)
            self.client = client
        if not self.client.connection.is_connected:
            self.client.connection.connect()  # now, not inside the call: the run_id is then read in it
        connects, known = self.connects, self.run_id_known
        if known and len(messages) == 1:
            results, run_id = [self._publish_one(messages[0])], None
        else:
            results, run_id = publish_messages(self.client, messages, self.config.result_ttl, read_run_id=not known)
        if self.connects != connects:
            return results, ""
        if known:
            return results, self.run_id
        if run_id != "":
            self.run_id, self.run_id_known = run_id, True
        return results, run_id

    def confirm(self) -> bool:
        """True if a PING on the connection of the last ``publish`` is answered by the same
        server: the PUBLISHes before it are then final. False if that cannot be told."""
        if self.client is None or not self.run_id_known:
            return False
        connects, connection = self.connects, self.client.connection
        try:
            connection.send_command("PING")
            connection.read_response()
        except Exception:
            connection.disconnect()
            return False
        return self.connects == connects

    def _publish_one(self, message: Message) -> Any:
        """One answer, the common case, straight on the connection: redis-py's command path
        (retries, pooling, metrics hooks) cost a quarter of the round trip before the bytes left."""
        connection = self.client.connection
        try:
            for attempt in (1, 2):
                connection.send_command("EVALSHA", *publish_once_args(message, self.config.result_ttl))
                try:
                    return connection.read_response()
                except redis.exceptions.NoScriptError as exc:  # nothing ran; a Redis that forgot it
                    load_scripts(self.client)
                    if attempt == 2:
                        return exc
        except redis.ResponseError as exc:
            return exc
        except BaseException:
            connection.disconnect()  # whatever was in flight on it is lost; reconnects on next use
            raise

    def close(self) -> None:
        """Close the connection."""
        if self.client is not None:
            try:
                self.client.close()
            except Exception:
                pass
            self.client = None


def read_run_id(client: redis.Redis) -> str | None:
    """The run_id of the Redis ``client`` reaches (None if INFO is refused)."""
    try:
        run_id = client.evalsha(RUN_ID_SHA, 0)
    except redis.exceptions.NoScriptError:
        load_scripts(client)
        run_id = client.evalsha(RUN_ID_SHA, 0)
    return run_id.decode() if run_id is not None else None
