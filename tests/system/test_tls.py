"""Redis over TLS against a real ``redis-server --port 0 --tls-port N`` with certificates made
here by the openssl CLI: verified connections, mutual TLS, REDIS_URL=rediss://, and the
failures an operator meets (wrong CA, wrong name, missing client certificate) as one clear
log line while the agent keeps retrying."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest
import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from conftest import PASSWORD, RedisServer, wait_for


def openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True)


@pytest.fixture(scope="module")
def certs(tmp_path_factory) -> dict[str, Path]:
    """A CA, an unrelated CA, a server certificate for localhost/127.0.0.1, one for another name,
    and a client certificate; all from the openssl CLI."""
    d = tmp_path_factory.mktemp("tls")
    for ca in ("ca", "other-ca"):
        openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", f"/CN=cockpit test {ca}",
                "-keyout", f"{ca}.key", "-out", f"{ca}.crt", cwd=d)
    leaves = {"server": "subjectAltName=DNS:localhost,IP:127.0.0.1", "wrong-name": "subjectAltName=DNS:wrong.example",
              "client": "extendedKeyUsage=clientAuth"}
    for name, ext in leaves.items():
        (d / f"{name}.ext").write_text(ext + "\n")
        openssl("req", "-newkey", "rsa:2048", "-nodes", "-subj", f"/CN={name}", "-keyout", f"{name}.key",
                "-out", f"{name}.csr", cwd=d)
        openssl("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.crt", "-CAkey", "ca.key", "-CAcreateserial",
                "-days", "2", "-extfile", f"{name}.ext", "-out", f"{name}.crt", cwd=d)
    for key in d.glob("*.key"):
        key.chmod(0o600)
    return {p.stem + p.suffix.replace(".", "_"): p for p in d.iterdir()}


class TLSRedisServer(RedisServer):
    """redis-server speaking TLS only (--port 0)."""

    def __init__(self, workdir: Path, certs: dict[str, Path], cert: str = "server", client_certs: bool = False):
        super().__init__(workdir)
        self.certs, self.cert, self.client_certs = certs, cert, client_certs

    def argv(self) -> list[str]:
        argv = super().argv()
        argv[argv.index("--port") + 1] = "0"
        return argv + [
            "--tls-port", str(self.port), "--tls-cert-file", str(self.certs[f"{self.cert}_crt"]),
            "--tls-key-file", str(self.certs[f"{self.cert}_key"]), "--tls-ca-cert-file", str(self.certs["ca_crt"]),
            "--tls-auth-clients", "yes" if self.client_certs else "no", "--loglevel", "verbose",
        ]

    def client(self, **kwargs) -> redis.Redis:
        kwargs.setdefault("socket_timeout", 5)
        return redis.Redis(host="localhost", port=self.port, password=self.password, ssl=True,
                           ssl_ca_certs=str(self.certs["ca_crt"]), ssl_certfile=str(self.certs["client_crt"]),
                           ssl_keyfile=str(self.certs["client_key"]), ssl_check_hostname=self.cert == "server",
                           **kwargs)

    def failed_handshakes(self) -> int:
        log = (self.workdir / "redis.log").read_text()
        return len(re.findall(r"Error accepting a client connection", log))


@pytest.fixture
def tls_server(tmp_path, certs):
    servers = []

    def start(**kwargs) -> TLSRedisServer:
        server = TLSRedisServer(tmp_path / f"redis-tls-{len(servers)}", certs, **kwargs).start()
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.kill()


def tls_env(agent_env: dict, server: TLSRedisServer, certs, **extra: str) -> dict:
    env = {**agent_env, "REDIS_HOST": "127.0.0.1", "REDIS_PORT": str(server.port), "REDIS_SSL": "1",
           "REDIS_TLS_CA_CERT": str(certs["ca_crt"])}
    env.update(extra)
    return {k: v for k, v in env.items() if v != ""}


def test_tls_verified_round_trip(tls_server, certs, agent_env, agent_process, make_backend):
    server = tls_server()
    agent = agent_process(tls_env(agent_env, server, certs)).start()
    agent.wait_subscribed(server)
    backend = make_backend(agent.env["AGENT_ID"], server=server)
    assert backend.call("echo", {"message": "over tls"})["output"] == "over tls"
    registry = server.client().hgetall(f"agents:{agent.env['AGENT_ID']}")
    assert registry[b"status"] == b"online"
    assert "tls=on" in agent.log()
    # The plain port is closed: TLS is the only way in.
    with pytest.raises(redis.ConnectionError):
        redis.Redis(port=server.port, password=PASSWORD, socket_timeout=2, socket_connect_timeout=2,
                    retry=Retry(NoBackoff(), 0)).ping()
    assert agent.terminate() == 0


def test_tls_mutual_client_certificate(tls_server, certs, agent_env, agent_process, make_backend):
    server = tls_server(client_certs=True)
    env = tls_env(agent_env, server, certs, REDIS_TLS_CERT=str(certs["client_crt"]),
                  REDIS_TLS_KEY=str(certs["client_key"]))
    agent = agent_process(env).start()
    agent.wait_subscribed(server)
    assert make_backend(env["AGENT_ID"], server=server).call("echo")["output"] == "pong"

    # Without a client certificate the server ends the handshake; the agent says what is missing.
    env2 = tls_env(agent_env, server, certs, AGENT_ID=env["AGENT_ID"] + "-nocert",
                   OUTBOX_DB=env["OUTBOX_DB"] + "-2")
    bare = agent_process(env2).start()
    wait_for(lambda: "REDIS_TLS_CERT and REDIS_TLS_KEY" in bare.log(), 20, message="the client-certificate hint")
    assert bare.proc.poll() is None


def test_tls_via_rediss_url(tls_server, certs, agent_env, agent_process, make_backend):
    server = tls_server()
    env = {k: v for k, v in agent_env.items() if k not in ("REDIS_HOST", "REDIS_PORT")}
    env.update(REDIS_URL=f"rediss://localhost:{server.port}/0", REDIS_TLS_CA_CERT=str(certs["ca_crt"]))
    agent = agent_process(env).start()
    agent.wait_subscribed(server)
    assert make_backend(env["AGENT_ID"], server=server).call("echo")["output"] == "pong"


def test_tls_redis_url_with_redis_ssl(tls_server, certs, config_from):
    """REDIS_URL=redis://... plus REDIS_SSL=1 speaks TLS too (redis-py's from_url takes no ssl=True)."""
    server = tls_server()
    config = config_from({"AGENT_ID": "url-ssl", "REDIS_URL": f"redis://localhost:{server.port}",
                          "REDIS_PASSWORD": PASSWORD, "REDIS_SSL": "1", "REDIS_TLS_CA_CERT": str(certs["ca_crt"])})
    assert config.redis_client().ping()


def test_tls_wrong_ca_is_a_clear_error_and_the_agent_keeps_retrying(tls_server, certs, agent_env, agent_process):
    server = tls_server()
    agent = agent_process(tls_env(agent_env, server, certs, REDIS_TLS_CA_CERT=str(certs["other-ca_crt"]))).start()
    line = wait_for(lambda: next((x for x in agent.log().splitlines() if "cannot use Redis" in x), None), 20,
                    message="a clear error line")
    assert "ERROR" in line and "certificate is not trusted" in line and "REDIS_TLS_CA_CERT" in line
    assert str(certs["other-ca_crt"]) in line and "CERTIFICATE_VERIFY_FAILED" in line
    # Not a hang and not a crash: the agent lives and keeps trying (each try is a refused handshake).
    seen = server.failed_handshakes()
    wait_for(lambda: server.failed_handshakes() >= seen + 6, 40, message="more connection attempts")
    assert agent.proc.poll() is None
    assert server.client().pubsub_numsub(f"cockpit-agent:{agent.env['AGENT_ID']}")[0][1] == 0
    assert PASSWORD not in agent.log()


def test_tls_wrong_server_name_is_a_clear_error(tls_server, certs, agent_env, agent_process):
    server = tls_server(cert="wrong-name")
    agent = agent_process(tls_env(agent_env, server, certs)).start()
    line = wait_for(lambda: next((x for x in agent.log().splitlines() if "cannot use Redis" in x), None), 20,
                    message="a clear error line")
    assert "is not valid for '127.0.0.1'" in line
    assert agent.proc.poll() is None


def test_tls_verify_off_accepts_any_certificate(tls_server, certs, agent_env, agent_process, make_backend):
    """REDIS_TLS_VERIFY=0 (documented as unsafe) connects despite an untrusted CA and a wrong name."""
    server = tls_server(cert="wrong-name")
    env = tls_env(agent_env, server, certs, REDIS_TLS_CA_CERT=str(certs["other-ca_crt"]), REDIS_TLS_VERIFY="0")
    agent = agent_process(env).start()
    agent.wait_subscribed(server)
    assert make_backend(env["AGENT_ID"], server=server).call("echo")["output"] == "pong"


def test_tls_settings_reach_redis_py(certs, config_from):
    """The names config.py passes are redis-py 8.1's own keyword arguments."""
    config = config_from({"AGENT_ID": "kw", "REDIS_PASSWORD": "p", "REDIS_SSL": "1",
                          "REDIS_TLS_CA_CERT": str(certs["ca_crt"]), "REDIS_TLS_CERT": str(certs["client_crt"]),
                          "REDIS_TLS_KEY": str(certs["client_key"])})
    client = config.redis_client()
    kwargs = client.connection_pool.connection_kwargs
    assert client.connection_pool.connection_class is redis.SSLConnection
    connection = client.connection_pool.make_connection()
    import ssl
    assert connection.cert_reqs == ssl.CERT_REQUIRED and connection.check_hostname is True
    assert (connection.ca_certs, connection.certfile, connection.keyfile) == \
        (str(certs["ca_crt"]), str(certs["client_crt"]), str(certs["client_key"]))
    assert kwargs["ssl_cert_reqs"] == "required"
