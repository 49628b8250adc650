"""The shared client factory: endpoint parsing, the rotation order, configs with several endpoints, and a
host session that skips a dead endpoint and fails over when its broker goes away (real mosquittos)."""

from __future__ import annotations

import argparse
import socket
from pathlib import Path

import pytest
from pydantic import ValidationError

from agent.config import parse_config
from agent.errors import ConfigError
from agent.mqttclient import ClientSpec, Endpoint, Rotation, build_client, parse_endpoints
from deploy.broker.client import BrokerOptions, MqttSession
from deploy.broker.spawn import MosquittoBroker, find_mosquitto, free_port
from deploy.errors import BrokerError
from deploy.hostconfig import resolve_broker

KEY = "MCowBQYDK2VwAyEAGb9ECWmEzf6FQbrBZ9w7lshQhqowtrbLDFw4rXAxZuE="


def test_endpoint_forms() -> None:
    assert Endpoint.model_validate("n1.lan:8883") == Endpoint(host="n1.lan", port=8883)
    e = Endpoint.model_validate("10.0.0.5:8883@broker.lan")
    assert (e.host, e.port, e.server_name) == ("10.0.0.5", 8883, "broker.lan")
    assert Endpoint.model_validate("[::1]:1884").host == "::1"
    assert str(Endpoint.model_validate("[::1]:1884")) == "[::1]:1884"
    assert [str(x) for x in parse_endpoints(["a:1,b:2", " c:3 "])] == ["a:1", "b:2", "c:3"]
    for bad in ("n1.lan", "n1:port", "n1:0", "n1:70000", "::1:1883", "[::1]"):
        with pytest.raises(ValidationError):
            Endpoint.model_validate(bad)
    with pytest.raises(ValidationError):
        Endpoint.model_validate({"host": "a", "port": 1, "tls_name": "x"})  # extra="forbid"


def test_rotation_order() -> None:
    eps = [Endpoint(host=h, port=1) for h in ("a", "b", "c")]
    r = Rotation(eps)
    assert r.peek().host == "a"
    order = [r.next_attempt().host for _ in range(7)]
    assert order == ["a", "b", "c", "a", "b", "c", "a"]
    assert not r.cycle_failed
    for _ in range(3):
        r.failed()
    assert r.cycle_failed and r.failed_in_row == 3
    r.connected()
    assert not r.cycle_failed and r.current.host == "a"
    assert r.peek().host == "b"
    single = Rotation(eps[:1])
    assert [single.next_attempt().host for _ in range(3)] == ["a", "a", "a"]
    with pytest.raises(ValueError, match="at least one"):
        Rotation([])


def _agent(mqtt: str) -> dict[str, object]:
    import tomllib

    return tomllib.loads(f'[device]\nid = "pi-1"\n[mqtt]\n{mqtt}\n[trust]\npublic_keys = ["{KEY}"]\n')


def test_agent_config_endpoints() -> None:
    old = parse_config(_agent('host = "broker.lan"\nport = 8883'), verify_keys=False)
    assert [str(e) for e in old.mqtt.broker_endpoints()] == ["broker.lan:8883"]
    new = parse_config(
        _agent('endpoints = ["n1:1883", {host = "n2", port = 1884, server_name = "b.lan"}]'),
        verify_keys=False,
    )
    assert [str(e) for e in new.mqtt.broker_endpoints()] == ["n1:1883", "n2:1884@b.lan"]
    with pytest.raises(ConfigError, match="either host/port or endpoints"):
        parse_config(_agent('host = "x"\nendpoints = ["n1:1883"]'), verify_keys=False)
    with pytest.raises(ConfigError, match="repeat"):
        parse_config(_agent('endpoints = ["n1:1883", "n1:1883"]'), verify_keys=False)
    with pytest.raises(ConfigError, match="host:port"):
        parse_config(_agent('endpoints = ["n1"]'), verify_keys=False)
    with pytest.raises(ConfigError, match="chunk_qos"):
        parse_config(_agent("chunk_qos = 2"), verify_keys=False)


def test_host_config_broker_flag(tmp_path: Path) -> None:
    cfg = tmp_path / "host.toml"
    cfg.write_text('[broker]\nendpoints = ["n1:1883", "n2:1883"]\n')
    r = resolve_broker(argparse.Namespace(config=cfg))
    assert [str(e) for e in r.options.endpoints] == ["n1:1883", "n2:1883"]
    assert (r.options.host, r.options.port) == ("n1", 1883)
    assert "n1:1883,n2:1883" in r.describe()
    r = resolve_broker(argparse.Namespace(config=cfg, broker=["a:1,b:2", "c:3"]))
    assert [str(e) for e in r.options.endpoints] == ["a:1", "b:2", "c:3"]
    r = resolve_broker(argparse.Namespace(config=cfg, host="solo", port=1884))
    assert (r.options.endpoints, r.options.host, r.options.port) == ((), "solo", 1884)
    from deploy.hostconfig import HostConfigError

    with pytest.raises(HostConfigError, match="host:port"):
        resolve_broker(argparse.Namespace(config=cfg, broker=["nope"]))


def test_spec_builds_v311_persistent_and_v5() -> None:
    eps = (Endpoint(host="127.0.0.1", port=1),)
    v311 = build_client(ClientSpec("c1", eps, protocol="v311", persistent_session=True))
    assert v311.protocol == 4 and v311._clean_session is False
    v5 = build_client(ClientSpec("c2", eps))
    assert v5.protocol == 5


def _dead_port() -> int:
    port = free_port()
    with socket.socket() as s:  # nothing listens: the bind above was released
        assert s.connect_ex(("127.0.0.1", port)) != 0
    return port


@pytest.mark.skipif(find_mosquitto() is None, reason="mosquitto is not installed")
def test_session_skips_a_dead_endpoint_and_fails_over() -> None:
    dead = _dead_port()
    with MosquittoBroker() as a, MosquittoBroker() as b:
        eps = (
            Endpoint(host="127.0.0.1", port=dead),
            Endpoint(host="127.0.0.1", port=a.port),
            Endpoint(host="127.0.0.1", port=b.port),
        )
        opts = BrokerOptions(endpoints=eps, connect_timeout_s=5)
        with MqttSession(opts, ack_timeout_s=20) as s:
            assert s.address == f"127.0.0.1:{a.port}"
            a.stop()  # the node goes away: paho reconnects, to the next endpoint (b)
            s.publish("edgefleet/x", b"1", retain=True)
            s.flush(20)
            assert s.address == f"127.0.0.1:{b.port}"
            got = s.collect_retained(["edgefleet/x"], timeout_s=5)
            assert got == {"edgefleet/x": b"1"}
    with pytest.raises(BrokerError) as err:
        MqttSession(
            BrokerOptions(endpoints=(*eps[:1], Endpoint(host="127.0.0.1", port=_dead_port())))
        ).connect()
    assert "no broker endpoint accepted" in str(err.value) and str(dead) in str(err.value)


@pytest.mark.skipif(find_mosquitto() is None, reason="mosquitto is not installed")
def test_endpoint_server_name_is_what_tls_verifies(tmp_path: Path) -> None:
    """The broker's certificate names localhost and 127.0.0.1: ``@localhost`` verifies, ``@another`` is a
    hostname mismatch although the address dialled is the same."""
    from broker_helpers import generated_tls_broker

    with generated_tls_broker(tmp_path, ["pi-a"]) as (broker, out, _):
        user = "pi-a"
        password = (out / "credentials" / f"{user}.password").read_text().strip()

        def options(name: str) -> BrokerOptions:
            ep = Endpoint(host="127.0.0.1", port=broker.port, server_name=name)
            return BrokerOptions(
                endpoints=(ep,), username=user, password=password, tls_ca=out / "ca.crt", connect_timeout_s=5
            )

        with MqttSession(options("localhost")) as s:
            assert s.address == f"127.0.0.1:{broker.port}"
        with pytest.raises(BrokerError, match="hostname mismatch"):
            MqttSession(options("another.example")).connect()


def test_agent_retries_a_refused_subscription(monkeypatch: pytest.MonkeyPatch) -> None:
    """SUBACK >= 0x80 (NATS while JetStream re-elects): the agent's client subscribes again, bounded;
    a topic unsubscribed meanwhile is not retried. paho's subscribe is faked (no broker: logic only)."""
    import threading

    from paho.mqtt.reasoncodes import ReasonCode

    import agent.mqtt as amqtt

    monkeypatch.setattr(amqtt, "SUB_RETRY_S", 0.01)
    monkeypatch.setattr(amqtt, "SUB_RETRIES", 3)
    config = parse_config(_agent('endpoints = ["127.0.0.1:1", "127.0.0.1:2"]'), verify_keys=False)
    broker = amqtt.PahoBroker(config, will=("edgefleet/devices/pi-1/status", b""))
    sent: list[str] = []
    retried = threading.Condition()

    def fake_subscribe(topic: str, qos: int = 0) -> tuple[int, int]:
        with retried:
            sent.append(topic)
            retried.notify_all()
        return 0, len(sent)  # MQTT_ERR_SUCCESS, mid

    monkeypatch.setattr(broker._client, "subscribe", fake_subscribe)
    broker._connected.set()
    broker.subscribe("a/b", 1)
    refused = [ReasonCode(9, identifier=0x80)]  # 9: SUBACK
    for _ in range(6):  # the broker keeps refusing: 1 + SUB_RETRIES attempts, then it gives up
        mid = len(sent)
        broker._on_subscribe(broker._client, None, mid, refused, None)
        with retried:
            retried.wait_for(lambda m=mid: len(sent) > m, timeout=1)
    assert sent == ["a/b"] * 4
    broker.subscribe("c/d", 1)
    broker.unsubscribe("c/d")
    broker._on_subscribe(broker._client, None, len(sent), refused, None)
    with retried:
        retried.wait_for(lambda: len(sent) > 5, timeout=0.2)
    assert sent == ["a/b"] * 4 + ["c/d"]
    broker._stopping = True


@pytest.mark.integration
@pytest.mark.parametrize("protocol", ["v5", "v311"])
def test_a_reconnect_into_a_kept_session_does_not_resend_retained(tmp_path: Path, protocol: str) -> None:
    """Real mosquitto with persistence, restarted under a connected agent client: the session and its
    subscription survive, so the reconnect must not bring every retained message again (v5: retain
    handling 1). A fresh client (a restarted agent) still gets them, and new messages still arrive.
    MQTT 3.1.1 has no retain handling: the resend is kept there, and the test pins that down."""
    import time

    import agent.mqtt as amqtt

    if find_mosquitto() is None:
        pytest.skip("mosquitto is not installed")

    def drain(client: amqtt.PahoBroker, topic: str, wait_s: float) -> list[bytes]:
        got, end = [], time.monotonic() + wait_s
        while time.monotonic() < end:
            try:
                msg = client.inbox.get(timeout=0.05)
            except Exception:  # queue.Empty
                continue
            if msg.topic == topic:
                got.append(msg.payload)
        return got

    broker = MosquittoBroker(persistence=True, state_dir=tmp_path / "state").start()
    host, port = broker.host, broker.port
    mqtt = f'host = "{host}"\nport = {port}\nprotocol = "{protocol}"\n'
    mqtt += "reconnect_min_s = 0.2\nreconnect_max_s = 0.5"
    config = parse_config(_agent(mqtt), verify_keys=False)
    topic = "edgefleet/blobs/" + "a" * 64 + "/0"
    client: amqtt.PahoBroker | None = None
    try:
        with MqttSession(BrokerOptions(host=host, port=port)) as pub:
            pub.publish(topic, b"chunk", retain=True)
            pub.flush()
        client = amqtt.PahoBroker(config, will=("edgefleet/devices/pi-1/status", b""))
        client.subscribe(topic, 1)
        client.start()
        assert client.wait_connected(10)
        assert drain(client, topic, 1.0) == [b"chunk"]  # first connection: the retained copy
        broker.stop()
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and client._connected.is_set():
            time.sleep(0.05)
        assert not client._connected.is_set(), "the client did not notice the broker stop"
        broker = MosquittoBroker(port=port, persistence=True, state_dir=tmp_path / "state").start()
        assert client.wait_connected(15)
        again = drain(client, topic, 1.5)
        assert again == ([] if protocol == "v5" else [b"chunk"])
        with MqttSession(BrokerOptions(host=host, port=port)) as pub:
            pub.publish(topic, b"new", retain=True)
            pub.flush()
        assert drain(client, topic, 2.0) == [b"new"]  # the kept subscription still delivers
    finally:
        if client is not None:
            client.stop()
        broker.stop()
