"""The Prometheus endpoint (METRICS_PORT), scraped over HTTP from a running agent."""

from __future__ import annotations

import math
import urllib.request

from prometheus_client.parser import text_string_to_metric_families

from conftest import free_port, wait_for


def scrape(port: int) -> dict[tuple[str, tuple], float]:
    """Every sample on /metrics as {(name, sorted labels): value}."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as reply:
        assert reply.status == 200
        text = reply.read().decode()
    samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


def test_metrics_are_off_by_default(running_agent):
    agent = running_agent()
    assert agent.metrics is None


def test_scrape_counts_durations_depths_and_redis_state(running_agent, make_backend, fake_docker, redis_server):
    port = free_port()
    agent = running_agent(METRICS_PORT=port)
    backend = make_backend(agent.config.agent_id)
    assert backend.call("echo", {"message": "a"})["status"] == "success"
    assert backend.call("echo", {"message": "b"})["status"] == "success"
    assert backend.call("docker_restart", {"container_name": "grafana"})["status"] == "success"
    fake_docker.behave("fail")
    assert backend.call("docker_restart", {"container_name": "web-1"})["status"] == "error"
    wait_for(lambda: agent.heartbeat.last_heartbeat is not None, message="a heartbeat")

    samples = scrape(port)
    assert samples[("cockpit_agent_commands_total", (("command", "echo"), ("status", "success")))] == 2
    assert samples[("cockpit_agent_commands_total", (("command", "docker_restart"), ("status", "success")))] == 1
    assert samples[("cockpit_agent_commands_total", (("command", "docker_restart"), ("status", "error")))] == 1
    assert samples[("cockpit_agent_command_duration_seconds_count", (("command", "echo"),))] == 2
    assert samples[("cockpit_agent_command_duration_seconds_count", (("command", "docker_restart"),))] == 2
    assert samples[("cockpit_agent_command_duration_seconds_bucket", (("command", "echo"), ("le", "+Inf")))] == 2
    assert samples[("cockpit_agent_queue_depth", ())] == 0
    assert samples[("cockpit_agent_redis_connected", ())] == 1
    assert 0 <= samples[("cockpit_agent_heartbeat_age_seconds", ())] < 30
    info = [k for k in samples if k[0] == "cockpit_agent_info"]
    assert info and ("agent_id", agent.config.agent_id) in info[0][1]
    wait_for(lambda: scrape(port)[("cockpit_agent_outbox_depth", ())] == 0, message="an empty outbox")

    redis_server.kill()
    wait_for(lambda: scrape(port)[("cockpit_agent_redis_connected", ())] == 0, 20, message="redis_connected 0")
    age = scrape(port)[("cockpit_agent_heartbeat_age_seconds", ())]
    assert not math.isnan(age) and age >= 0

    redis_server.start()
    wait_for(lambda: scrape(port)[("cockpit_agent_redis_connected", ())] == 1, 20, message="redis_connected 1 again")
