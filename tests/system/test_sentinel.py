"""Redis Sentinel on loopback: a master, a replica, three sentinels (all with passwords). The
master is SIGKILLed while commands flow; the agent follows the new master and loses nothing."""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path

import pytest
import redis
from redis.sentinel import Sentinel

from conftest import PASSWORD, Backend, RedisServer, free_port, wait_for

SENTINEL_PASSWORD = "sentinel-password-81d2"
MASTER = "cockpit"


class Sentinels:
    """Three ``redis-server --sentinel`` processes watching one master, with fast failover."""

    def __init__(self, base: Path, master_port: int):
        self.procs: list[subprocess.Popen] = []
        self.ports = [free_port() for _ in range(3)]
        for port in self.ports:
            workdir = base / f"sentinel-{port}"
            workdir.mkdir(parents=True)
            conf = workdir / "sentinel.conf"  # sentinel rewrites it, so one writable file each
            conf.write_text("\n".join([
                f"port {port}", "bind 127.0.0.1", f"dir {workdir}", f"logfile {workdir / 'sentinel.log'}",
                f"requirepass {SENTINEL_PASSWORD}", f"sentinel sentinel-pass {SENTINEL_PASSWORD}",
                f"sentinel monitor {MASTER} 127.0.0.1 {master_port} 2",
                f"sentinel auth-pass {MASTER} {PASSWORD}",
                f"sentinel down-after-milliseconds {MASTER} 500",
                f"sentinel failover-timeout {MASTER} 3000",
                f"sentinel parallel-syncs {MASTER} 1",
            ]) + "\n")
            self.procs.append(subprocess.Popen(["redis-server", str(conf), "--sentinel"],
                                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        for port in self.ports:
            wait_for(lambda p=port: self._answers(p), 10, message=f"sentinel on {port}")

    @staticmethod
    def _answers(port: int) -> bool:
        try:
            return redis.Redis(port=port, password=SENTINEL_PASSWORD, socket_timeout=0.5).ping()
        except redis.RedisError:
            return False

    def spec(self) -> str:
        return ",".join(f"127.0.0.1:{p}" for p in self.ports)

    def sentinel(self) -> Sentinel:
        return Sentinel([("127.0.0.1", p) for p in self.ports],
                        sentinel_kwargs={"password": SENTINEL_PASSWORD, "socket_timeout": 1})

    def master_port(self) -> int:
        return self.sentinel().discover_master(MASTER)[1]

    def close(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait(10)


class MasterOf:
    """What the Backend needs of a server (``client()``), resolved through the sentinels."""

    def __init__(self, sentinels: Sentinels):
        self.sentinels = sentinels

    def client(self, **kwargs):
        kwargs.setdefault("socket_timeout", 5)
        return self.sentinels.sentinel().master_for(MASTER, password=PASSWORD, **kwargs)


@pytest.fixture
def cluster(tmp_path):
    master = RedisServer(tmp_path / "master")
    master.extra = ["--masterauth", PASSWORD]
    master.start()
    replica = RedisServer(tmp_path / "replica", extra=["--masterauth", PASSWORD,
                                                       "--replicaof", "127.0.0.1", str(master.port)])
    replica.start()
    wait_for(lambda: master.client().info("replication")["connected_slaves"] == 1, 15, message="the replica to sync")
    sentinels = Sentinels(tmp_path / "sentinels", master.port)
    # Every sentinel must know the replica and the other sentinels before a failover can happen.
    wait_for(lambda: all(
        redis.Redis(port=p, password=SENTINEL_PASSWORD).sentinel_master(MASTER)["num-slaves"] == 1
        and redis.Redis(port=p, password=SENTINEL_PASSWORD).sentinel_master(MASTER)["num-other-sentinels"] == 2
        for p in sentinels.ports), 30, interval=0.2, message="the sentinels to see each other and the replica")
    yield master, replica, sentinels
    sentinels.close()
    for server in (master, replica):
        server.kill()


def test_agent_follows_a_sentinel_failover_and_loses_nothing(cluster, running_agent, fake_docker):
    master, replica, sentinels = cluster
    agent = running_agent(REDIS_SENTINELS=sentinels.spec(), REDIS_SENTINEL_MASTER=MASTER,
                          REDIS_SENTINEL_PASSWORD=SENTINEL_PASSWORD)
    agent_id = agent.config.agent_id
    assert "sentinel master cockpit" in agent.config.describe()
    backend = Backend(MasterOf(sentinels), agent_id)
    try:
        heard: list[str] = []

        def send(i: int) -> None:
            """Publish until the agent hears it (a publish while no master, or while the agent
            has not resubscribed, is not a delivery; the backend retries it)."""
            message = backend.message("docker_restart" if i % 3 == 0 else "echo",
                                      {"container_name": "grafana"} if i % 3 == 0 else {"message": f"m{i}"})
            def published():
                try:
                    return backend.publish(json.dumps(message)) >= 1
                except (redis.RedisError, OSError):
                    return False
            wait_for(published, 60, interval=0.1, message=f"command {i} to reach the agent")
            heard.append(message["command_id"])

        for i in range(10):
            send(i)
        # PUBLISH counts the agent as a receiver before Redis has written the message to the
        # agent's socket; a master killed in between loses the command itself (pub/sub's own
        # limit, which the stream is for), and the test waited 60 s for its answer. So: kill
        # once the agent has recorded all ten, while their answers may still be on the way.
        store = agent.open_store()
        wait_for(lambda: all(store.get(cid) for cid in heard), 15, message="the agent to record the first ten")
        store.close()
        master.kill()  # mid-stream: responses may be waiting in the outbox
        killed_at = time.monotonic()
        for i in range(10, 30):
            send(i)
        wait_for(lambda: sentinels.master_port() == replica.port, 30, message="the failover to the replica")
        failover = time.monotonic() - killed_at

        for cid in heard:
            backend.wait(cid, 60)
        for cid in heard:
            distinct = {json.dumps(r, sort_keys=True) for r in backend.responses_for(cid)}
            assert len(distinct) == 1, f"{cid}: {len(distinct)} different responses"
        assert len(fake_docker.calls()) == 10, "each docker command ran exactly once"
        wait_for(lambda: agent.open_store().counts()["outbox"] == 0, 30, message="the outbox to drain")
        # The agent is on the new master: its registry entry and subscription are there.
        new_master = replica.client()
        wait_for(lambda: new_master.pubsub_numsub(agent.config.command_channel)[0][1] == 1, 20)
        wait_for(lambda: new_master.hget(agent.config.registry_key, "status") == b"online", 20)
        assert failover < 30
    finally:
        backend.close()


@pytest.mark.parametrize("env, named", [
    ({"REDIS_SENTINELS": "127.0.0.1:26379"}, "REDIS_SENTINEL_MASTER"),
    ({"REDIS_SENTINELS": "127.0.0.1", "REDIS_SENTINEL_MASTER": "m"}, "REDIS_SENTINELS"),
    ({"REDIS_SENTINEL_MASTER": "m"}, "REDIS_SENTINELS"),
    ({"REDIS_SENTINELS": "h:1", "REDIS_SENTINEL_MASTER": "m", "REDIS_URL": "redis://:p@h:6379"}, "REDIS_URL"),
])
def test_sentinel_settings_are_checked_at_start(config_from, env, named):
    from errors import ConfigError

    with pytest.raises(ConfigError) as raised:
        config_from({"REDIS_PASSWORD": "pw-1234", "AGENT_ID": "a1", **env})
    assert str(raised.value).startswith(named + ":")


def test_sentinel_password_never_shows(config_from):
    config = config_from({"REDIS_PASSWORD": "pw-1234", "AGENT_ID": "a1", "REDIS_SENTINELS": "h1:26379,h2:26380",
                          "REDIS_SENTINEL_MASTER": "m", "REDIS_SENTINEL_PASSWORD": "sentinel-secret-99"})
    assert config.redis_sentinels == (("h1", 26379), ("h2", 26380))
    assert "sentinel-secret-99" not in repr(config) and "sentinel-secret-99" not in config.describe()
    from config import secrets_of
    assert "sentinel-secret-99" in secrets_of(config)
