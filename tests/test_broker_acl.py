"""The generated broker config (deploy.brokerconf) against a real mosquitto, beyond test_deploy_provision:

* device A cannot read device B's assignments: its subscription to B's assign topic is granted but
  filtered (FACTS.md), so a retained assignment the controller publishes for B reaches B and not A;
* a plain-TCP client (no TLS) to the TLS listener gets no MQTT session.
"""

from __future__ import annotations

import dataclasses
import os
import socket
import threading
from collections.abc import Iterator
from pathlib import Path

import paho.mqtt.client as paho
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from agent import wire
from deploy import brokerconf
from deploy.broker import MosquittoBroker, find_mosquitto, free_port
from deploy.brokerconf import BrokerSpec, write_broker_config
from deploy.errors import BrokerError
from deploy.mqtt import BrokerOptions, MqttSession

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(find_mosquitto() is None, reason="mosquitto is not installed"),
]


@pytest.fixture(scope="module")
def tls_broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[MosquittoBroker, Path]]:
    tmp = tmp_path_factory.mktemp("acl")
    out, state = tmp / "broker", tmp / "state"
    state.mkdir()
    port = free_port()
    spec = BrokerSpec(
        install_dir=out,
        port=port,
        bind="127.0.0.1",
        tls=True,
        state_dir=state,
        log_dest=f"file {state / 'mosquitto.log'}",
        extra=["user root"] if os.geteuid() == 0 else [],
    )
    write_broker_config(out, spec, devices=["pi-a", "pi-b"], server_names=["localhost", "127.0.0.1"])
    with MosquittoBroker(port=port, state_dir=state, config=(out / "mosquitto.conf").read_text()) as b:
        yield b, out


def _cred(out: Path, user: str) -> str:
    return (out / "credentials" / f"{user}.password").read_text().strip()


class Listener:
    """A TLS paho client (MQTT v5) that records what it receives."""

    def __init__(self, broker: MosquittoBroker, out: Path, user: str, topic: str) -> None:
        self.got: list[tuple[str, bytes]] = []
        self.granted: list[int] = []
        self.subscribed = threading.Event()
        self.c = paho.Client(CallbackAPIVersion.VERSION2, client_id=f"acl-{user}", protocol=paho.MQTTv5)
        self.c.username_pw_set(user, _cred(out, user))
        self.c.tls_set(ca_certs=str(out / "ca.crt"))
        self.c.on_message = lambda _c, _u, m: self.got.append((m.topic, bytes(m.payload)))
        self.c.on_connect = lambda c, _u, _f, rc, _p: c.subscribe(topic, 1)

        def on_subscribe(_c: paho.Client, _u: object, _mid: int, codes: list, _p: object) -> None:
            self.granted = [int(rc.value) for rc in codes]
            self.subscribed.set()

        self.c.on_subscribe = on_subscribe
        self.c.connect("127.0.0.1", broker.port)
        self.c.loop_start()
        assert self.subscribed.wait(10), f"{user}: no SUBACK"

    def close(self) -> None:
        self.c.disconnect()
        self.c.loop_stop()


def test_device_cannot_read_another_devices_assignments(tls_broker: tuple[MosquittoBroker, Path]) -> None:
    broker, out = tls_broker
    t = wire.Topics()
    b_topic = t.assign("pi-b", "digits")
    spy = Listener(broker, out, "pi-a", b_topic)  # A subscribes to B's assignment topic
    owner = Listener(broker, out, "pi-b", t.device_assignments("pi-b"))
    try:
        assert spy.granted == [1]  # mosquitto grants it (QoS 1) ... and then filters every message
        payload = b'{"schema": "edgefleet.assignment/1", "note": "for pi-b only"}'
        ctl = MqttSession(
            BrokerOptions(
                host="127.0.0.1",
                port=broker.port,
                username=brokerconf.CONTROLLER_USER,
                password=_cred(out, brokerconf.CONTROLLER_USER),
                tls_ca=out / "ca.crt",
                connect_timeout_s=5,
            )
        )
        with ctl:
            ctl.publish(b_topic, payload, retain=True)
            ctl.flush()
        deadline = threading.Event()
        for _ in range(30):  # B receives it ...
            if owner.got:
                break
            deadline.wait(0.1)
        assert owner.got == [(b_topic, payload)]
        deadline.wait(1.0)  # ... and A, subscribed to the very same topic, nothing within a second
        assert spy.got == []
        # a fresh subscription by A does not get the retained message either
        late = Listener(broker, out, "pi-a", f"{t.ns}/devices/+/assign/+")
        try:
            deadline.wait(0.5)
            assert late.got == []
        finally:
            late.close()
    finally:
        spy.close()
        owner.close()


def test_plain_tcp_client_is_refused_by_the_tls_listener(tls_broker: tuple[MosquittoBroker, Path]) -> None:
    broker, out = tls_broker
    opts = BrokerOptions(
        host="127.0.0.1",
        port=broker.port,
        username="pi-a",
        password=_cred(out, "pi-a"),
        connect_timeout_s=3,
    )
    with pytest.raises(BrokerError):
        MqttSession(opts).connect()  # right credentials, but no TLS
    # on the wire: a plaintext MQTT CONNECT gets no CONNACK (0x20); the TLS listener drops it
    connect = bytes.fromhex("101000044d5154540402003c0004") + b"test"
    with socket.create_connection(("127.0.0.1", broker.port), timeout=3) as sock:
        sock.sendall(connect)
        try:
            reply = sock.recv(16)
        except (TimeoutError, ConnectionResetError):
            reply = b""
    assert not reply.startswith(b"\x20"), f"plaintext CONNECT answered with {reply!r}"
    # with TLS and the same credentials it works (the refusal above is about TLS, nothing else)
    with MqttSession(dataclasses.replace(opts, tls_ca=out / "ca.crt")):
        pass
