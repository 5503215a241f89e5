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

# Publishes a response and stores it at its result key in one step; the result key is also its
# own "delivered" mark, so an answer costs one key: the stored value is the response JSON as
# published, followed by a newline once PUBLISH counted a receiver (JSON allows the trailing
# whitespace; a caller's GET parses the same object either way). A retry after a lost reply
# (Redis ran it, the connection died before we read its answer) then finds the delivered form
# and is a no-op instead of a second copy. Returns the number of receivers, or -1 if already
# delivered. GET is called with pcall: an ACL written before it was needed (docs/redis-acl.md)
# only costs that retry's protection, never the answer.
PUBLISH_ONCE = """
if #KEYS == 1 then
  local stored = redis.pcall('GET', KEYS[1])
  if stored == ARGV[2] .. '\\n' then return -1 end
end
local receivers = redis.call('PUBLISH', ARGV[1], ARGV[2])
if #KEYS == 1 then
  local value = ARGV[2]
  if receivers > 0 then value = value .. '\\n' end
  redis.call('SET', KEYS[1], value, 'EX', ARGV[3])
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


def publish_once_args(message: Message, ttl: int) -> list[Any]:
    """The EVALSHA arguments of PUBLISH_ONCE for ``message``."""
    keys = [message.result_key] if message.result_key else []
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
    """Publishes answers as soon as they are committed, on the connection of ``client`` (the
    agent's one command connection: ``runtime/connection.py``; the stream reader's own).

    It reads the run_id of the Redis it is connected to once per connection, not once per
    answer (INFO, even inside Lua, cost more than the PUBLISH): a TCP connection cannot
    outlive the redis-server it reached, so every PUBLISH on it went to that run_id. Any
    reconnection, by any thread using the connection, makes it unknown again, and one during a
    call leaves it unknown ("": confirmed only by publishing again). Owned by one thread.
    """

    def __init__(self, config: Config, client: redis.Redis):
        self.config, self.client = config, client
        self.run_id: str | None = None
        self.run_id_known = False  # False until read on the current connection
        self.connects = 0
        self._watched: set[int] = set()

    def _connected(self, connection: Any) -> None:
        self.connects += 1
        self.run_id_known = False

    def _connection(self) -> Any:
        """The pool's connection, connected now (not inside the call: the run_id is then read in it)."""
        pool = self.client.connection_pool
        connection = pool.get_connection()
        try:
            if id(connection) not in self._watched:
                self._watched.add(id(connection))
                connection.register_connect_callback(self._connected)
                self.run_id_known = False
            if not connection.is_connected:
                connection.connect()
        except BaseException:
            pool.release(connection)
            raise
        return connection

    def publish(self, messages: list[Message]) -> tuple[list[Any], str | None]:
        """As ``publish_messages``."""
        connection = self._connection()
        pool = self.client.connection_pool
        connects, known = self.connects, self.run_id_known
        try:
            if known and len(messages) == 1:
                results, run_id = [self._publish_one(connection, messages[0])], None
            else:
                pool.release(connection)
                connection = None
                results, run_id = publish_messages(self.client, messages, self.config.result_ttl,
                                                   read_run_id=not known)
        finally:
            if connection is not None:
                pool.release(connection)
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
        if not self.run_id_known:
            return False
        connects = self.connects
        pool = self.client.connection_pool
        try:
            connection = pool.get_connection()
        except Exception:
            return False
        try:
            connection.send_command("PING")
            connection.read_response()
        except Exception:
            connection.disconnect()
            return False
        finally:
            pool.release(connection)
        return self.connects == connects

    def _publish_one(self, connection: Any, message: Message) -> Any:
        """One answer, the common case, straight on the connection: redis-py's command path
        (retries, pooling, metrics hooks) cost a quarter of the round trip before the bytes left."""
        try:
            for attempt in (1, 2):
                connection.send_command("EVALSHA", *publish_once_args(message, self.config.result_ttl))
                try:
                    return connection.read_response()
                except redis.exceptions.NoScriptError as exc:  # nothing ran; a Redis that forgot it
                    for script in (PUBLISH_ONCE, RUN_ID):  # on this connection: it is ours for the turn
                        connection.send_command("SCRIPT", "LOAD", script)
                        connection.read_response()
                    if attempt == 2:
                        return exc
        except redis.ResponseError as exc:
            return exc
        except BaseException:
            connection.disconnect()  # whatever was in flight on it is lost; reconnects on next use
            raise


def read_run_id(client: redis.Redis) -> str | None:
    """The run_id of the Redis ``client`` reaches (None if INFO is refused)."""
    try:
        run_id = client.evalsha(RUN_ID_SHA, 0)
    except redis.exceptions.NoScriptError:
        load_scripts(client)
        run_id = client.evalsha(RUN_ID_SHA, 0)
    return run_id.decode() if run_id is not None else None
