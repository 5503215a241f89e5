"""The seed's manual check, end to end, against an in-process agent and a real redis-server."""

from conftest import wait_for


def test_echo_round_trip(running_agent, make_backend):
    agent = running_agent()
    backend = make_backend(agent.config.agent_id)
    response = backend.call("echo", {"message": "hello"})
    assert response["status"] == "success"
    assert response["output"] == "hello"
    assert wait_for(lambda: agent.open_store().counts()["outbox"] == 0)
