"""REDIS_CLUSTER_NODES against a real local Redis Cluster (three masters, three replicas):
the protocol with classic and with sharded pub/sub, the connection budget, and a master
killed mid-run (its replica takes over; nothing lost, one answer each)."""

from __future__ import annotations

import json
import threading
import time
import uuid

import pytest
import redis

from conftest import Backend, LocalCluster, denials, documented_rules, wait_for

pytestmark = pytest.mark.xdist_group("cluster")


@pytest.fixture(scope="module")
def shared_cluster(tmp_path_factory):
    """One cluster for the tests that leave its topology as they found it."""
    cluster = LocalCluster(tmp_path_factory.mktemp("cluster")).start()
    yield cluster
    cluster.close()


def cluster_env(agent_env, cluster: LocalCluster, **more) -> dict:
    env = {**agent_env, "REDIS_CLUSTER_NODES": cluster.nodes(), **more}
    env.pop("REDIS_HOST"), env.pop("REDIS_PORT")
    return env


def agent_connections(cluster: LocalCluster, agent_id: str) -> dict[int, int]:
    """The agent's connections (by client name) on each live node, by port."""
    counts = {}
    for server in cluster.alive():
        clients = server.client(socket_timeout=2).client_list()
        counts[server.port] = sum(1 for c in clients if c.get("name") == f"cockpit-agent:{agent_id}")
    return counts


@pytest.mark.parametrize("sharded", [False, True], ids=["classic", "sharded"])
def test_the_protocol_runs_on_a_cluster(shared_cluster, agent_env, running_agent, git_repos, fake_docker, sharded):
    """Echo, git_pull, docker_restart, an unknown command and a replay, answered through the
    cluster; the registry and the result keys live on their slots' masters; the agent holds
    at most one connection per master and its subscription."""
    agent = running_agent(REDIS_CLUSTER_NODES=shared_cluster.nodes(), PUBSUB_SHARDED="on" if sharded else "off")
    agent_id = agent.config.agent_id
    backend = Backend(shared_cluster, agent_id, sharded=sharded)
    try:
        reply = backend.call("echo", {"message": "hello cluster"})
        assert reply["status"] == "success" and reply["output"].strip() == "hello cluster"
        git_repos.commit(f"change-{sharded}")
        assert backend.call("git_pull", {"repo": str(git_repos.clone)})["status"] == "success"
        assert backend.call("docker_restart", {"container": "grafana"})["status"] == "success"
        assert fake_docker.calls() == [["restart", "--", "grafana"]]
        assert backend.call("no_such_command")["status"] == "error"
        replay_id = backend.send("echo", {"message": "once"})
        first = backend.wait(replay_id)
        backend.publish(backend.message("echo", {"message": "once"}, command_id=replay_id))
        wait_for(lambda: len(backend.responses_for(replay_id)) == 2, 10, message="the replay's answer")
        assert backend.responses_for(replay_id)[1] == first  # its stored response, not a second run

        client = shared_cluster.client()
        stored = client.get(f"cockpit-agent-result:{agent_id}:{replay_id}")
        assert json.loads(stored) == first and stored.endswith(b"\n")  # its own delivered mark
        assert client.ttl(f"cockpit-agent-result:{agent_id}:{replay_id}") > 0
        wait_for(lambda: client.hget(f"agents:{agent_id}", "status") == b"online", 10, message="online")
        assert client.ttl(f"agents:{agent_id}") > 0
        counts = agent_connections(shared_cluster, agent_id)
        masters = shared_cluster.master_ports()
        assert sum(counts.values()) <= 1 + len(masters), counts
        assert all(counts[port] <= 2 for port in counts), counts  # one command connection per node, one subscription
        assert all(counts[port] == 0 for port in counts if port not in masters), counts  # no replica used
        client.close()
    finally:
        backend.close()


def test_an_idle_agent_on_a_cluster_sends_one_command_per_interval(shared_cluster, agent_env, running_agent):
    """Classic pub/sub: the beat (one EVALSHA on the registry's master) is all; the probe it
    publishes there reaches the subscription on another master through the cluster bus."""
    agent = running_agent(REDIS_CLUSTER_NODES=shared_cluster.nodes(), HEARTBEAT_INTERVAL=1)
    registry_master = shared_cluster.master_of(f"agents:{agent.config.agent_id}")
    interval = agent.config.heartbeat_interval

    def calls() -> dict[str, int]:
        stats = {}  # masters only: a replica counts what replication brings it
        for client in clients:
            for name, value in client.info("commandstats").items():
                stats[name] = stats.get(name, 0) + value["calls"]
        return stats

    clients = [server.client() for server in map(shared_cluster.server_at, shared_cluster.master_ports())]
    calls()
    before = calls()
    # Three intervals: a fixed span is the measurement here (commands per unit of time), not a wait for an event.
    time.sleep(3 * interval + 0.5)
    after = calls()
    spent = {name: after[name] - before.get(name, 0) for name in after if after[name] != before.get(name, 0)}
    # Our own commandstats and the cluster's own traffic (the nodes' INFO/CLIENT via this test) aside.
    spent.pop("cmdstat_info", None)
    spent.pop("cmdstat_replconf", None)  # the replicas' acknowledgements
    evalsha = spent.get("cmdstat_evalsha", 0)
    assert 2 <= evalsha <= 4, spent
    assert not {name for name in spent if name not in ("cmdstat_evalsha", "cmdstat_hmget", "cmdstat_hset",
                                                        "cmdstat_expire", "cmdstat_publish", "cmdstat_ping")}, spent
    assert spent.get("cmdstat_ping", 0) == 0, spent  # the probe came back every time: no PING of the listener's
    assert registry_master.client().hget(f"agents:{agent.config.agent_id}", "status") == b"online"


@pytest.mark.parametrize("victim", ["response", "command"])
def test_a_master_killed_mid_run_fails_over_and_nothing_is_lost(tmp_path, agent_env, agent_process, victim):
    """SIGKILL the master holding the response channel's slot (the agent's answers buffer, then
    go to its promoted replica) or the command channel's (the agent subscribes again on the new
    master; the backend sends unanswered commands again, same command_id). Every command is
    answered, and each command_id has exactly one response (run at most once)."""
    cluster = LocalCluster(tmp_path / "cluster").start()
    try:
        # An agent_id whose three slots (commands, responses, registry) sit on three different masters.
        while True:
            agent_id = f"fail-{uuid.uuid4().hex[:6]}"
            owners = {cluster.master_of(name).port for name in
                      (f"cockpit-agent:{agent_id}", f"cockpit-agent-response:{agent_id}", f"agents:{agent_id}")}
            if len(owners) == 3:
                break
        env = {**cluster_env(agent_env, cluster), "AGENT_ID": agent_id}
        agent = agent_process(env).start()
        backend = Backend(cluster, agent_id)
        wait_for(lambda: cluster.client().hget(f"agents:{agent_id}", "status") == b"online", 20,
                 message=f"the agent online:\n{agent.log()}")
        sent: dict[str, dict] = {}
        last_sent: dict[str, float] = {}
        stop, creating = threading.Event(), threading.Event()
        creating.set()

        def send_loop():
            """A new command every 0.1 s while ``creating``; any without an answer after 3 s is
            sent again (a PUBLISH to a dead node, or one no subscription heard), as a backend would."""
            index = 0
            while not stop.is_set():
                if creating.is_set():
                    message = backend.message("echo", {"message": f"m{index}"})
                    sent[message["command_id"]] = message
                    index += 1
                for command_id, msg in list(sent.items()):
                    if not backend.responses_for(command_id) and time.monotonic() - last_sent.get(command_id, 0) > 3:
                        try:
                            backend.publish(msg)
                            last_sent[command_id] = time.monotonic()
                        except (redis.RedisError, redis.exceptions.RedisClusterException):
                            pass  # the node it asked is the dead one: sent again next round
                stop.wait(0.1)

        sender = threading.Thread(target=send_loop, daemon=True)
        sender.start()
        wait_for(lambda: sum(1 for c in list(sent) if backend.responses_for(c)) >= 10, 20, message="answers")
        name = f"cockpit-agent-response:{agent_id}" if victim == "response" else f"cockpit-agent:{agent_id}"
        killed = cluster.kill_master_of(name)
        wait_for(lambda: killed.port not in cluster.master_ports() and len(cluster.master_ports()) == 3, 30,
                 interval=0.2, message="the replica to take over")
        # Answered after the failover too.
        count = len(sent)
        wait_for(lambda: sum(1 for c in list(sent)[count:] if backend.responses_for(c)) >= 10, 30,
                 message=f"answers after the failover:\n{agent.log()[-3000:]}")
        creating.clear()
        wait_for(lambda: all(backend.responses_for(c) for c in list(sent)), 40,
                 message=f"every command answered:\n{agent.log()[-3000:]}")
        stop.set()
        sender.join(5)
        for command_id in sent:
            distinct = {json.dumps(r, sort_keys=True) for r in backend.responses_for(command_id)}
            assert len(distinct) == 1, (command_id, distinct)
        assert agent.proc.poll() is None
        backend.close()
    finally:
        cluster.close()


@pytest.mark.parametrize("env, named", [
    ({"REDIS_CLUSTER_NODES": "h1:6379", "REDIS_SENTINELS": "h:26379", "REDIS_SENTINEL_MASTER": "m"},
     "REDIS_CLUSTER_NODES"),
    ({"REDIS_CLUSTER_NODES": "h1:6379", "REDIS_URL": "redis://:p@h:6379"}, "REDIS_URL"),
    ({"REDIS_CLUSTER_NODES": "h1:6379", "REDIS_DB": "3"}, "REDIS_DB"),
    ({"REDIS_CLUSTER_NODES": "h1"}, "REDIS_CLUSTER_NODES"),
    ({"PUBSUB_SHARDED": "on"}, "PUBSUB_SHARDED"),
])
def test_cluster_settings_are_checked_at_start(config_from, env, named):
    from errors import ConfigError

    with pytest.raises(ConfigError) as raised:
        config_from({"REDIS_PASSWORD": "pw-1234", "AGENT_ID": "a1", **env})
    assert str(raised.value).startswith(named + ":"), str(raised.value)


def test_cluster_settings_are_read_and_described_without_the_password(config_from):
    config = config_from({"REDIS_PASSWORD": "pw-1234-secret", "AGENT_ID": "a1",
                          "REDIS_CLUSTER_NODES": "10.0.0.1:7000, 10.0.0.2:7001", "PUBSUB_SHARDED": "on"})
    assert config.redis_cluster_nodes == (("10.0.0.1", 7000), ("10.0.0.2", 7001)) and config.pubsub_sharded
    assert "cluster via 10.0.0.1:7000,10.0.0.2:7001 pubsub=sharded" in config.describe()
    assert "pw-1234-secret" not in config.describe()


def test_an_agent_started_while_the_cluster_is_down_comes_online_when_it_is_up(tmp_path, agent_env, agent_process):
    """The cluster client cannot read the slots at start: the agent keeps trying, like any outage."""
    cluster = LocalCluster(tmp_path / "late")
    try:
        agent = agent_process(cluster_env(agent_env, cluster)).start()
        wait_for(lambda: "Redis unreachable" in agent.log(), 15, message="the outage logged")
        assert agent.proc.poll() is None
        cluster.start()
        agent.wait_subscribed(cluster, 30)
        backend = Backend(cluster, agent_env["AGENT_ID"])
        assert backend.call("echo", {"message": "late"}, timeout=20)["status"] == "success"
        backend.close()
    finally:
        cluster.close()


@pytest.mark.parametrize("sharded", [False, True], ids=["classic", "sharded"])
def test_the_agent_works_under_the_documented_cluster_acl(shared_cluster, running_agent, git_repos, sharded):
    """docs/redis-acl.md's user, with its cluster (and sharded) additions, installed on every
    node as the docs say: the protocol and the heartbeat run, and no node refused anything."""
    agent_id = f"acl-{uuid.uuid4().hex[:8]}"
    password = f"agent-pw-{uuid.uuid4().hex}"
    blocks = ["acl", "acl-cluster", *(["acl-sharded"] if sharded else [])]
    admins = [server.client(socket_timeout=5) for server in shared_cluster.alive()]
    for admin in admins:
        admin.acl_log_reset()
        for block in blocks:
            username, rules = documented_rules(agent_id, password, block)
            admin.execute_command("ACL", "SETUSER", username, *rules)
    running_agent(REDIS_CLUSTER_NODES=shared_cluster.nodes(), PUBSUB_SHARDED="on" if sharded else "off",
                  AGENT_ID=agent_id, REDIS_USERNAME=username, REDIS_PASSWORD=password)
    backend = Backend(shared_cluster, agent_id, sharded=sharded)
    try:
        assert backend.call("echo", {"message": "least privilege"})["output"] == "least privilege"
        assert backend.call("git_status")["status"] == "success"
        client = shared_cluster.client()
        wait_for(lambda: client.hget(f"agents:{agent_id}", "status") == b"online", 10, message="online")
        # One more heartbeat (HEARTBEAT_INTERVAL=2), with its subscription probe.
        seen = client.hget(f"agents:{agent_id}", "last_heartbeat")
        wait_for(lambda: client.hget(f"agents:{agent_id}", "last_heartbeat") != seen, 10, message="a heartbeat")
        client.close()
    finally:
        backend.close()
    refused = [(admin.connection_pool.connection_kwargs["port"], entry) for admin in admins
               for entry in denials(admin, username)]
    assert refused == []
    for admin in admins:
        admin.execute_command("ACL", "DELUSER", username)
        admin.close()
