#!/usr/bin/env python3
"""cockpit-agent: runs whitelisted commands published by the Cockpit backend over Redis.

This file is the entry point and the wiring: it builds the parts in the order a message passes
them and hands each only what it uses. A message's path, one file each (runtime/):

    listener (SUBSCRIBE) -> inbox -> intake (commands row) -> queue -> workers (handler)
    -> outbox row -> flusher (PUBLISH, result key)

Beside them: heartbeat (the registry hash), watchdog (replaces a stuck listener or intake),
stream (COMMAND_STREAM=on), recovery (at start). SIGTERM/SIGINT only set a flag that the main
thread acts on (runtime/signals.py); service/ holds sd_notify, the metrics and their snapshot.
"""

from __future__ import annotations

import argparse
import functools
import logging
import queue
import sys
import threading
import time
from typing import Any

import redis

import cli
from config import VERSION, Config, load, secrets_of
from errors import EX_CONFIG, EX_SOFTWARE, ConfigError, DatabaseInUse
from handlers import REGISTRY, Children, Registry
from handlers.loader import registry_with_dir
from outbox import Store
from outbox.inspect import outbox_depth
from outbox.owner import DatabaseLock, instance_id
from runtime.answers import Answers
from runtime.cluster import ClusterRoutes, Routes
from runtime.connection import OneConnection
from runtime.flusher import Flusher
from runtime.heartbeat import Heartbeat
from runtime.inbox import Inbox
from runtime.intake import Intake, IntakeLoop, StreamTwins
from runtime.listener import Listener, Probe
from runtime.loop import Loop
from runtime.recovery import recover, recover_when_writable, warn_unwritable_repos
from runtime.signals import SignalWatcher
from runtime.stream import StreamReader
from runtime.watchdog import Slot, Watchdog
from runtime.workers import Job, Worker, WorkerPool
from service.audit import Audit
from service.health import Health, Tally, problems
from service.logs import setup_logging
from service.notify import Notifier

log = logging.getLogger("cockpit_agent")


class Agent:
    """Builds the parts, starts them, watches them, and stops them in order."""

    def __init__(self, config: Config, registry: Registry = REGISTRY):
        self.config, self.registry = config, registry
        self.started_at = time.time()
        self.db_lock = DatabaseLock(config.outbox_db)  # taken by start, before anything opens the store
        self.instance = instance_id(config.outbox_db)  # this machine + this database, in the registry
        # The one command connection (runtime/connection.py), taken in turns by the flusher, the
        # heartbeat and the intake; with the listener's subscription, two per agent. In a Redis
        # Cluster, one such connection per master, each command on its slot's (runtime/cluster.py).
        wait = 2 * config.redis_socket_timeout + 5
        self.redis: redis.Redis | None = None
        if config.redis_cluster_nodes:
            self.routes: Routes = ClusterRoutes(config, wait)
        else:
            self.redis = config.redis_client(health_check_interval=0)
            self.connection = OneConnection(self.redis, wait=wait)
            self.routes = Routes(self.redis)
        self.probe = Probe()  # the subscription self-check: published by the heartbeat, heard by the listener
        # What the threads signal each other with.
        self.outbox_wake = threading.Event()  # something for the flusher
        self.retry_now = threading.Event()  # Redis is back: what waits is due now
        self.heartbeat_now = threading.Event()
        self.redis_connected = threading.Event()  # the subscription is confirmed
        self.stop_requested = threading.Event()
        self.force_stop = threading.Event()  # a second signal
        self.unrecoverable = threading.Event()  # a part is stuck for good: exit non-zero (systemd restarts)
        # Shared by the parts below.
        self.answers = Answers(config, secrets_of(config))
        self.audit = Audit()
        self.children = Children()
        self.executed = Tally()
        self.stream_twins = StreamTwins()
        self.metrics = None  # built last, below: registering it reads health() (every part)

        # In path order: listener -> inbox -> intake -> queue -> workers -> flusher.
        self.inbox = Inbox(config.listener_buffer_bytes)
        self.listeners = Slot(self._new_listener, self._retire_listener)
        self.intakes = Slot(self._new_intake_loop, IntakeLoop.retire)
        self.queue: queue.Queue[Job | None] = queue.Queue()
        self.pool = WorkerPool(self.queue, config.worker_count, self._new_worker)
        self.flusher = Flusher("flusher", config, self.routes, self.open_store, self.outbox_wake, self.retry_now)
        self.heartbeat = Heartbeat(
            "heartbeat", config, self.routes, capabilities=registry.names(), started_at=self.started_at,
            instance=self.instance, executed=lambda: self.executed.value, connected=self.redis_connected,
            stopping=self.stop_requested, now=self.heartbeat_now, probe=self.probe,
            every_beat=self.audit.report_suppressed)
        self.watchdog = Watchdog("watchdog", config, self.listeners, self.intakes, self._give_up)
        self.stream_reader = None
        if config.command_stream:
            self.stream_reader = StreamReader("stream", config, self.open_store,
                                              functools.partial(self.make_intake, via="stream"), self.pool.pending,
                                              routes=self.routes)
        self.notifier = Notifier(self.health, config.shutdown_grace)  # a no-op outside systemd
        if config.metrics_port:
            from service.metrics import Metrics  # prometheus-client only when METRICS_PORT is set

            self.metrics = Metrics(config, self.health)

    # -- the parts' factories and callbacks ------------------------------------------------------

    def open_store(self) -> Store:
        """A new Store for the calling thread."""
        return Store(self.config.outbox_db, self.config.outbox_synchronous)

    def _new_worker(self, name: str, pool: WorkerPool) -> Worker:
        return Worker(name, self.config, pool, open_store=self.open_store, children=self.children, answers=self.answers,
                      audit=self.audit, on_done=self._done, wake_flusher=self.outbox_wake.set, force_stop=self.force_stop)

    def make_intake(self, store: Store, client: redis.Redis | None = None, via: str = "pubsub") -> Intake:
        """An Intake writing to ``store`` (the calling thread's), for the intake thread or the stream reader."""
        # The client only answers when the database cannot be written; it connects on that first use.
        # In a cluster its answers go through the routes (the response channel's master).
        target = self.routes if self.routes.cluster else (client or self.routes)
        return Intake(self.config, store, target, registry=self.registry, answers=self.answers,
                      audit=self.audit, pool=self.pool, wake_flusher=self.outbox_wake.set,
                      handover=self.flusher.handover, on_done=self._done, stream_twins=self.stream_twins, via=via)

    def _new_intake_loop(self) -> IntakeLoop:
        return IntakeLoop("intake", self.config, self.inbox, self.open_store, self.make_intake)

    def _new_listener(self) -> Listener:
        return Listener("listener", self.config, self.inbox, self.probe, online=self._online,
                        offline=self.redis_connected.clear, lost=self._subscription_lost, client=self.redis,
                        routes=self.routes)

    def _retire_listener(self, listener: Listener) -> None:
        listener.abandon()
        self.redis_connected.clear()

    def _online(self) -> None:
        """The listener's subscription is confirmed: online, and send what waits."""
        self.redis_connected.set()
        self.heartbeat_now.set()
        self.flush_now()

    def _subscription_lost(self) -> None:
        if self.metrics is not None:
            self.metrics.subscription_lost.inc()

    def _done(self, command: str, status: str, elapsed_ms: int) -> None:
        """A command finished (run by a worker, or answered on arrival)."""
        self.executed.add()
        self.heartbeat.executed_changed()
        if self.metrics is not None:
            self.metrics.command_done(command, status, elapsed_ms)

    def _give_up(self) -> None:
        self.unrecoverable.set()
        self.stop_requested.set()

    def flush_now(self) -> None:
        """Redis is back: publish what waits without sitting out its backoff."""
        self.retry_now.set()
        self.outbox_wake.set()

    @property
    def listener(self) -> Listener:
        """The listener now reading the subscription (the watchdog may have replaced it)."""
        return self.listeners.current

    @property
    def intake_loop(self) -> IntakeLoop:
        """The intake thread now taking from the inbox (the watchdog may have replaced it)."""
        return self.intakes.current

    def threads(self) -> list[Loop]:
        """Every thread of the agent, in path order."""
        optional = [self.stream_reader] if self.stream_reader is not None else []
        return [self.listener, self.intake_loop, *self.pool.workers, self.flusher, self.heartbeat, self.watchdog,
                *optional]

    def health(self, outbox: bool = True) -> Health:
        """The agent now, for sd_notify, the metrics and tests; ``outbox`` reads the outbox's depth."""
        return Health(
            stopping=self.stop_requested.is_set(),
            redis_connected=self.redis_connected.is_set(),
            redis_down_since=self.listener.failing_since,
            queued=self.pool.pending(),
            outbox=outbox_depth(self.config.outbox_db) if outbox else None,
            problems=problems(self.threads(), self.config),
            executed=self.executed.value,
            last_heartbeat=self.heartbeat.last_heartbeat,
            twin=self.heartbeat.twin,
            rejections=dict(self.audit.rejections),
        )

    # -- life cycle -----------------------------------------------------------------------------

    def recover(self) -> None:
        """Answer what an earlier run left running (interrupted) and queue what it left queued."""
        store = self.open_store()
        try:
            self.executed.set(recover(store, self.config, self.registry, self.answers, self.audit, self.pool.submit))
        finally:
            store.close()

    def start(self) -> bool:
        """Lock the database, recover, then start every thread (workers first, the listener last).

        Raises DatabaseInUse when another agent holds the database; False, with nothing
        started, when a stop was asked for while recovery waited for the database.
        """
        # The listener must read the subscription as fast as Redis writes it (past Redis's
        # client-output-buffer-limit pubsub the server closes it, with what it held): with the
        # default 5 ms it waited that long for the interpreter lock behind the intake thread at
        # each read; 0.5 ms let a 64 MB burst from another process through in 8 of 10 runs (5 of 10).
        sys.setswitchinterval(0.0005)
        self.db_lock.acquire()
        if not self._recover_when_writable():
            return False
        self.pool.start()
        self.flusher.start()
        self.heartbeat.start()
        self.intake_loop.start()
        self.listener.start()
        self.watchdog.start()
        if self.stream_reader is not None:
            self.stream_reader.start()
        # Last: the notifier says READY and judges every thread above, so all must be running.
        if self.metrics is not None:
            self.metrics.start()
        self.notifier.start()
        log.info("cockpit-agent %s started: %s", VERSION, self.config.describe())
        warn_unwritable_repos(self.config.git_repo_paths)
        return True

    def _recover_when_writable(self) -> bool:
        """``recover``, retried while the database cannot be written (runtime/recovery.py)."""
        def status(text: str, delay: float) -> None:
            # Still starting, as systemd sees it: keep TimeoutStartSec= from killing us meanwhile.
            self.notifier.notify.send(f"STATUS={text}", f"EXTEND_TIMEOUT_USEC={int((delay + 60) * 1_000_000)}")

        return recover_when_writable(self.recover, self.pool.forget, self.config.outbox_db, self.stop_requested,
                                     status)

    def request_stop(self, signum: int, frame: Any = None) -> None:
        """The first SIGTERM/SIGINT asks for a graceful stop, the second for an immediate one.

        Called by the SignalWatcher's thread, never inside a signal handler (it takes locks).
        """
        if self.stop_requested.is_set():
            self.force_stop.set()
        self.stop_requested.set()

    def run(self) -> int:
        """Run until SIGTERM/SIGINT; returns the process exit code."""
        signals = SignalWatcher(self.request_stop)
        signals.install()
        try:
            try:
                started = self.start()
            except DatabaseInUse as exc:
                log.critical("%s", exc)
                return EX_CONFIG
            if not started:
                self.db_lock.release()
                log.info("stopped before starting; the work left stays in %s", self.config.outbox_db)
                return 0
            died = False
            while not self.stop_requested.wait(1.0):
                for thread in self.threads():
                    if not thread.is_alive():
                        log.critical("%s died; stopping so that systemd restarts the agent", thread.name)
                        died = True
                        self.stop_requested.set()
            code = self.shutdown()
        finally:
            signals.close()
        # A non-zero exit is what makes Restart=on-failure restart us; 0 would mean "done".
        died = died or self.unrecoverable.is_set()
        return EX_SOFTWARE if died and code == 0 else code

    def _close_service(self) -> None:
        """Stop the notifier and the metrics endpoint; a failure is logged, the stop goes on."""
        for part in (self.notifier, self.metrics):
            if part is not None:
                try:
                    part.close()
                except Exception as exc:
                    log.warning("could not close %s: %s", type(part).__name__, exc)

    def _wait(self, condition, timeout: float) -> bool:
        """Wait for ``condition()`` up to ``timeout`` s, giving up early on a forced stop."""
        deadline = time.monotonic() + timeout
        while not condition():
            if self.force_stop.is_set() or time.monotonic() >= deadline:
                return False
            self.force_stop.wait(0.05)
        return True

    def shutdown(self) -> int:
        """Stop taking commands, let running ones finish, flush, say offline."""
        self.notifier.stopping()
        busy = self.pool.running()
        log.info("stopping: no new commands; %d running, up to %g s to finish", len(busy), self.config.shutdown_grace)
        self.watchdog.stop.set()
        self.watchdog.join(5.0)  # before anything below reads the listener or the intake
        self.listener.stop.set()
        if self.stream_reader is not None:
            self.stream_reader.stop.set()
        for worker in self.pool.workers:
            worker.stop.set()
        self.pool.drain()
        if not self._wait(lambda: not any(w.is_alive() for w in self.pool.workers), self.config.shutdown_grace):
            killed = self.children.kill_all()
            log.warning("grace period over: interrupted %d running commands", killed)
            self._wait(lambda: not any(w.is_alive() for w in self.pool.workers), 5.0)
        if self.force_stop.is_set():
            self._close_service()
            self.children.kill_all()
            log.warning("second signal: stopping at once; unfinished work stays in %s", self.config.outbox_db)
            return 1
        # What the listener read is accepted before the last flush: once the listener has
        # stopped reading, the intake thread takes everything left in the inbox as it stops.
        self.listener.join(5.0)
        self.intake_loop.stop.set()
        self.inbox.wake()
        self.intake_loop.join(10.0)
        if self.stream_reader is not None:
            self.stream_reader.join(5.0)  # its last answers too go out in the last flush
        self.flush_now()
        store = self.open_store()
        try:
            # Up to 5 s for what can go out now. Not for answers no one was subscribed to hear
            # (due again only after their backoff) nor for those already out and held until
            # confirmed (the flusher confirms them as it stops): they stay in the outbox, and
            # waiting for them only made every stop take 5 s while the backend was away.
            def nothing_due() -> bool:
                next_due = store.next_due()
                return next_due is None or next_due > time.time()

            self._wait(lambda: nothing_due() or not self.redis_connected.is_set(), 5.0)
            for thread in (self.flusher, self.heartbeat, self.listener):
                thread.stop.set()
            self.outbox_wake.set()
            self.heartbeat_now.set()
            for thread in (self.flusher, self.heartbeat, self.listener, self.watchdog, self.stream_reader):
                if thread is not None and thread.is_alive():
                    thread.join(5.0)
            # Counted after the flusher's last round, which deletes the answers it has confirmed.
            left = store.counts()
            # The metrics' read-only connections must not be the last ones open: only a writer's
            # close checkpoints the WAL and deletes it, leaving the database in one file.
            self._close_service()
        finally:
            store.close()
        try:
            self.heartbeat.beat("offline")
        except Exception as exc:
            log.warning("could not write status=offline: %s", exc)
        self.db_lock.release()
        log.info("stopped; %d queued commands and %d unsent messages kept in %s",
                 left["queued"], left["outbox"], self.config.outbox_db)
        return 0


def main(argv: list[str] | None = None) -> int:
    """The command line: ``agent.py [run]`` runs the agent; the operator commands are in cli.py."""
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--env-file", default=argparse.SUPPRESS,
                        help="read variables from this file (default: $COCKPIT_AGENT_ENV_FILE or ./.env)")
    parser = argparse.ArgumentParser(
        prog="cockpit-agent",
        description="Run whitelisted commands published by the Cockpit backend over Redis.",
        epilog=cli.EXIT_CODES, formatter_class=argparse.RawDescriptionHelpFormatter, parents=[common],
    )
    parser.add_argument("--version", action="version", version=f"cockpit-agent {VERSION}")
    sub = parser.add_subparsers(dest="cmd", metavar="COMMAND")
    sub.add_parser("run", help="run the agent in the foreground (the default)", parents=[common],
                   description="Run the agent in the foreground, configured by the environment (and .env).")
    cli.add_commands(sub, common, parser)
    args = parser.parse_args(argv)
    args.env_file = getattr(args, "env_file", None)
    if args.cmd not in (None, "run"):
        return cli.run(args)
    try:
        config = load(args.env_file)
    except ConfigError as exc:
        print(f"cockpit-agent: configuration error: {exc}", file=sys.stderr)
        return EX_CONFIG
    setup_logging(config)
    try:
        registry = registry_with_dir(REGISTRY, config.handlers_dir, env_file=args.env_file).for_config(config)
    except ConfigError as exc:
        log.critical("configuration error: %s", exc)
        return EX_CONFIG
    return Agent(config, registry).run()


if __name__ == "__main__":
    sys.exit(main())
