"""The Prometheus endpoint (``METRICS_PORT``; off by default).

Counters and the duration histogram are updated by the workers as commands finish; the
gauges (outbox and queue depth, Redis connected, heartbeat age) and the count of rejected
messages are read at scrape time, so they are never stale. Each Agent has its own CollectorRegistry, so several agents in one
process (the tests) do not share numbers.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Histogram, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, InfoMetricFamily

from config import VERSION, Config
from service.health import Health

log = logging.getLogger("cockpit_agent.metrics")

# Seconds: echo answers in microseconds, git pulls take seconds, docker restarts up to a minute.
DURATION_BUCKETS = (0.005, 0.025, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)


class _Gauges:
    """Reads one ``Health`` snapshot at scrape time (on the HTTP server's thread)."""

    def __init__(self, agent_id: str, health: Callable[[], Health]):
        self.agent_id, self.health = agent_id, health

    def collect(self):
        health = self.health()
        yield InfoMetricFamily("cockpit_agent", "The agent's version and id.",
                               value={"version": VERSION, "agent_id": self.agent_id})
        yield GaugeMetricFamily("cockpit_agent_outbox_depth", "Messages waiting in the outbox to be published.",
                                value=math.nan if health.outbox is None else health.outbox)
        yield GaugeMetricFamily("cockpit_agent_queue_depth", "Accepted commands waiting for a worker.",
                                value=health.queued)
        yield GaugeMetricFamily("cockpit_agent_redis_connected", "1 while the command subscription is up.",
                                value=1 if health.redis_connected else 0)
        yield GaugeMetricFamily("cockpit_agent_twin_detected",
                                "1 while another agent with this agent id writes its registry hash.",
                                value=1 if health.twin is not None else 0)
        last = health.last_heartbeat
        yield GaugeMetricFamily(
            "cockpit_agent_heartbeat_age_seconds",
            "Seconds since the last successful heartbeat (NaN before the first).",
            value=math.nan if last is None else max(0.0, time.time() - last),
        )
        # Counted by the audit (which sees every one, logged or not): nothing on the hot path.
        rejected = CounterMetricFamily(
            "cockpit_agent_rejected_messages",
            "Messages refused before they became a command (never run), by reason: malformed, oversize, "
            "unauthenticated (never answered).", labels=["reason"])
        for kind in ("malformed", "oversize", "unauthenticated"):
            rejected.add_metric([kind], health.rejections.get(kind, 0))
        yield rejected


class Metrics:
    """The agent's metrics and, once started, the HTTP endpoint that serves them."""

    def __init__(self, config: Config, health: Callable[[], Health]):
        self.config = config
        self.registry = CollectorRegistry(auto_describe=True)
        self.commands = Counter("cockpit_agent_commands", "Commands run, by command and status.",
                                ["command", "status"], registry=self.registry)
        self.duration = Histogram("cockpit_agent_command_duration_seconds", "How long commands took to run.",
                                  ["command"], buckets=DURATION_BUCKETS, registry=self.registry)
        self.subscription_lost = Counter(
            "cockpit_agent_subscription_lost",
            "Times the command subscription's connection was closed under the agent (by Redis, e.g. past "
            "client-output-buffer-limit pubsub, or by the network); what was published meanwhile was lost.",
            registry=self.registry)
        self.registry.register(_Gauges(config.agent_id, health))
        self.server = None

    def command_done(self, command: str, status: str, elapsed_ms: int) -> None:
        """Count one finished command (called by the worker that ran it)."""
        self.commands.labels(command, status).inc()
        self.duration.labels(command).observe(elapsed_ms / 1000)

    def start(self) -> None:
        """Serve ``/metrics`` on METRICS_ADDR:METRICS_PORT; a port in use is logged, not fatal."""
        config = self.config
        try:
            self.server, _ = start_http_server(config.metrics_port, config.metrics_addr, self.registry)
        except OSError as exc:
            log.error("cannot serve metrics on %s:%s: %s; running without them",
                      config.metrics_addr, config.metrics_port, exc)
            return
        log.info("metrics on http://%s:%s/metrics", config.metrics_addr, config.metrics_port)

    def close(self) -> None:
        """Stop the HTTP endpoint."""
        if self.server is not None:
            self.server.shutdown()
            self.server.server_close()
            self.server = None
