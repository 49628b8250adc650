"""Failover on a clustered broker: a real agent against a three-node NATS JetStream cluster with MQTT.

A bundle whose variants need hundreds of chunks (1 KiB chunks) is published retained to the cluster by a
host session (deploy.broker.client.MqttSession, MQTT 3.1.1) whose first listed endpoint is dead; an agent with
all three endpoints fetches it, logged in as a NATS user limited to its own topics; while it fetches,
the node it is connected to is killed (SIGKILL). The agent reconnects to another node, finishes the
fetch (chunks already stored are kept), verifies every blob and publishes its report. The retained
manifest and every chunk are then read back from a surviving node: the retained stream
(``stream_replicas: 3``) survived the loss.

Also: every character class an identifier may hold (wire.ID_PATTERN: ``a-z``, ``0-9``, ``_``, ``-``) and
the sha/index levels round-trip as topic levels on NATS and on mosquitto; ``.`` (NATS drops a client that
publishes on such a topic) is not allowed by the contract.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import secrets
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import paho.mqtt.client as paho
import pytest
from agent_helpers import kill9, start_agent, terminate
from nats_helpers import NatsCluster, NatsUser, find_nats_server
from paho.mqtt.enums import CallbackAPIVersion
from test_agent_integration import new_key, tiny_models, variant_for  # noqa: F401 (fixture)

from agent import wire
from agent.mqttclient import Endpoint
from agent.wire import BlobRef, Manifest, Topics, iter_chunks, sign
from deploy.broker.client import BrokerOptions, MqttSession
from deploy.broker.spawn import MosquittoBroker, find_mosquitto, free_port

pytestmark = [pytest.mark.integration]
needs_nats = pytest.mark.skipif(
    find_nats_server() is None,
    reason="nats-server is not installed (scripts/setup.sh installs it as root: "
    "apt-get install -y nats-server)",
)

DEVICE = "pi-nats"
MODEL = "digits"
CHUNK = 1024  # test_agent_integration's chunk size: variant_for() builds the refs with it
JUNK_CHUNKS = 400  # a variant of this many chunks keeps the fetch busy long enough to kill a node in it


class Client:
    """A plain MQTT 3.1.1 client on one node; subscriptions at QoS 0 (no JetStream consumer: see
    docs/operator.md "Clustered broker") record every message."""

    def __init__(self, port: int, name: str, user: NatsUser | None = None) -> None:
        self.messages: list[tuple[str, bytes]] = []
        self.cond = threading.Condition()
        self.client = paho.Client(
            callback_api_version=CallbackAPIVersion.VERSION2, client_id=name, protocol=paho.MQTTv311
        )
        if user is not None:
            self.client.username_pw_set(user.name, user.password)
        connected = threading.Event()
        self.client.on_connect = lambda *_a: connected.set()
        self.client.on_message = self._on_message
        self.client.connect("127.0.0.1", port)
        self.client.loop_start()
        assert connected.wait(30), f"no CONNACK from the NATS node on {port}"

    def _on_message(self, _c: Any, _u: Any, msg: paho.MQTTMessage) -> None:
        with self.cond:
            self.messages.append((msg.topic, bytes(msg.payload)))
            self.cond.notify_all()

    def publish_all(self, items: list[tuple[str, bytes]]) -> None:
        infos = [self.client.publish(t, p, qos=1, retain=True) for t, p in items]
        deadline = time.monotonic() + 60
        for info in infos:
            info.wait_for_publish(max(0.1, deadline - time.monotonic()))
            assert info.is_published(), "publish not acknowledged by the cluster within 60 s"

    def wait_for(self, pred: Callable[[str, bytes], bool], timeout: float) -> bytes:
        deadline = time.monotonic() + timeout
        seen = 0
        with self.cond:
            while True:
                for topic, payload in self.messages[seen:]:
                    seen += 1
                    if pred(topic, payload):
                        return payload
                left = deadline - time.monotonic()
                if left <= 0:
                    raise AssertionError(f"timed out; last: {[t for t, _ in self.messages[-10:]]}")
                self.cond.wait(min(left, 0.5))

    def read_retained(self, topics: list[str], timeout: float = 30) -> dict[str, bytes]:
        """Subscribe each topic (QoS 0, 32 at a time) and return what the node holds retained."""
        got: dict[str, bytes] = {}
        for start in range(0, len(topics), 32):
            window = topics[start : start + 32]
            for t in window:
                self.client.subscribe(t, 0)
            deadline = time.monotonic() + timeout
            with self.cond:
                while time.monotonic() < deadline:
                    got.update((t, p) for t, p in self.messages if t in window)
                    if all(t in got for t in window):
                        break
                    self.cond.wait(0.2)
            self.client.unsubscribe(window)
        return got

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


# NATS users (docs/operator.md "Clustered broker"): the host may do anything; the device publishes under
# its own topics only and subscribes to what the agent needs, plus $MQTT.sub.> (the delivery subject of
# the JetStream consumer behind each QoS1 subscription: without it every QoS1 SUBACK is 0x80).
HOST = NatsUser("edgefleet-host", secrets.token_hex(8))
AGENT = NatsUser(
    DEVICE,
    secrets.token_hex(8),
    publish=(f"edgefleet.devices.{DEVICE}.>",),
    subscribe=(
        "edgefleet.models.*.manifest",
        "edgefleet.blobs.>",
        f"edgefleet.devices.{DEVICE}.assign.*",
        f"edgefleet.devices.{DEVICE}.cmd",
        "$MQTT.sub.>",
    ),
)


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[NatsCluster]:
    with NatsCluster(tmp_path / "nats", users=(HOST, AGENT)) as c:
        yield c


def _config(tmp_path: Path, cluster: NatsCluster, pub: str, store: Path) -> Path:
    endpoints = ", ".join(f'"127.0.0.1:{n.mqtt_port}"' for n in cluster.nodes)
    cfg = tmp_path / "agent.toml"
    cfg.write_text(
        f"""
[device]
id = "{DEVICE}"
[mqtt]
endpoints = [{endpoints}]
protocol = "v311"
chunk_qos = 0
username = "{AGENT.name}"
password = "{AGENT.password}"
reconnect_min_s = 1
reconnect_max_s = 2
keepalive_s = 5
[trust]
public_keys = ["{pub}"]
[store]
path = "{store}"
min_free_mb = 1
[bench]
threads = [1]
warmup_runs = 1
min_runs = 5
min_seconds = 0.01
max_runs = 50
timeout_s = 60
[telemetry]
interval_s = 5
[fetch]
timeout_s = 60
""",
        encoding="utf-8",
    )
    return cfg


def _connected_port(log: Path, after: int = 0) -> int | None:
    ports = re.findall(r"connected to 127\.0\.0\.1:(\d+); subscribing", log.read_text(errors="replace"))
    return int(ports[-1]) if len(ports) > after else None


@needs_nats
def test_agent_fails_over_mid_fetch(cluster: NatsCluster, tiny_models: Path, tmp_path: Path) -> None:  # noqa: F811
    topics = Topics()
    key, pub = new_key()
    store = tmp_path / "store"
    f32 = (tiny_models / "float32.tflite").read_bytes()
    sample = (tiny_models / "sample.npz").read_bytes()
    junk = os.urandom(JUNK_CHUNKS * CHUNK - 5)
    sample_ref = BlobRef.of(sample, CHUNK)
    variants = [variant_for("float32", f32, "none", sample_ref), variant_for("junk", junk, "none")]
    manifest = sign(
        Manifest(model=MODEL, version=1, created_at=time.time(), baseline="float32", variants=variants), key
    )
    retained: list[tuple[str, bytes]] = []
    for data in (f32, sample, junk):
        sha = hashlib.sha256(data).hexdigest()
        retained += [(topics.blob(sha, i), c) for i, c in enumerate(iter_chunks(data, CHUNK))]
    retained.append((topics.manifest(MODEL), manifest.to_json()))

    last = cluster.nodes[-1]  # the test's own client lives on the node the agent reaches last
    bus = Client(last.mqtt_port, "test-bus", HOST)
    bus.client.subscribe(f"{topics.ns}/devices/#", 0)
    t0 = time.monotonic()
    # published the way host commands do (deploy.broker.client.MqttSession, MQTT 3.1.1), with a dead endpoint
    # listed first: the session skips it and publishes through the next one
    host_options = BrokerOptions(
        endpoints=(
            Endpoint(host="127.0.0.1", port=free_port()),
            *(Endpoint(host=h, port=p) for h, p in cluster.endpoints),
        ),
        protocol="v311",
        username=HOST.name,
        password=HOST.password,
        connect_timeout_s=20,
    )
    with MqttSession(host_options, ack_timeout_s=60) as session:
        assert session.address == f"127.0.0.1:{cluster.nodes[0].mqtt_port}"
        for topic, payload in retained:
            session.publish(topic, payload, retain=True)
        session.flush()
    print(f"published {len(retained)} retained messages to the cluster in {time.monotonic() - t0:.1f} s")

    log = tmp_path / "agent.log"
    proc = start_agent(_config(tmp_path, cluster, pub, store), log)
    try:
        junk_sha = variants[1].sha256
        partial = store / "partial" / junk_sha
        deadline = time.monotonic() + 60
        stored = 0
        while time.monotonic() < deadline:  # kill once the fetch of the big variant is under way
            stored = len(os.listdir(partial)) if partial.is_dir() else 0
            if stored >= 20:
                break
            assert proc.poll() is None, log.read_text()[-3000:]
            time.sleep(0.01)
        assert 20 <= stored < JUNK_CHUNKS, f"fetch not caught in flight ({stored} chunks stored)"
        port = _connected_port(log)
        assert port is not None, log.read_text()[-3000:]
        victim = cluster.node_on(port)
        cluster.kill(victim)
        t_kill = time.monotonic()
        print(
            f"killed {victim.name} (port {port}) with {stored}/{JUNK_CHUNKS} chunks of the big variant stored"
        )

        payload = bus.wait_for(
            lambda t, p: t == topics.report(DEVICE, MODEL) and json.loads(p).get("manifest_version") == 1,
            timeout=75,
        )
        print(f"report {time.monotonic() - t_kill:.1f} s after the kill")
        report = wire.decode(wire.Report, payload)
        by_id = {r.variant: r for r in report.results}
        assert set(by_id) == {"float32", "junk"} and by_id["float32"].ok

        new_port = _connected_port(log, after=1)
        assert new_port is not None and new_port != port, "the agent did not reconnect to another node"
        for data in (f32, junk):
            sha = hashlib.sha256(data).hexdigest()
            assert hashlib.sha256((store / "blobs" / f"{sha}.tflite").read_bytes()).hexdigest() == sha
        assert not partial.exists() or not any(partial.iterdir())
    finally:
        try:
            terminate(proc, timeout=20)
        except Exception:
            kill9(proc)
        print(log.read_text(errors="replace")[-2500:])
        bus.close()

    # the retained manifest and every chunk are still on the surviving nodes
    survivor = next(n for n in cluster.nodes if n.alive and n is not last)
    reader = Client(survivor.mqtt_port, "test-reader", HOST)
    try:
        want = dict(retained)
        got = reader.read_retained(list(want))
    finally:
        reader.close()
    missing = [t for t in want if got.get(t) != want[t]]
    assert not missing, f"{len(missing)} retained messages lost or changed, e.g. {missing[:3]}"


# ------------------------------------------------------------------------------------------- topic levels


# every character class wire.ID_PATTERN allows ([a-z0-9] first, then [a-z0-9_-]), shortest and longest
NAMES = ["a", "9", "z0-9_x", "0-lead-digit", "a_b-c", "x" * 63, "m--__--0"]


def _topic_items() -> list[tuple[str, bytes]]:
    topics = Topics("ns-1_b")
    for name in NAMES:
        wire.check_id(name)
    items = [(topics.status(n), n.encode()) for n in NAMES]
    items += [(topics.report(n, n), n.encode()) for n in NAMES]
    items += [(topics.assign(n, n), n.encode()) for n in NAMES]
    items += [(topics.blob("0123456789abcdef" * 4, 999_999), b"chunk")]
    return items


def _round_trip(port: int) -> dict[str, bytes]:
    pub = Client(port, "levels-pub")
    reader = Client(port, "levels-read")
    try:
        items = _topic_items()
        pub.publish_all(items)
        return reader.read_retained([t for t, _ in items], timeout=10)
    finally:
        pub.close()
        reader.close()


@needs_nats
def test_identifier_characters_are_topic_levels_on_nats(tmp_path: Path) -> None:
    """Every identifier the contract allows round-trips as a topic level on NATS; '.' (which NATS 2.9
    refuses, closing the connection: "characters ' ' and '.' not supported for MQTT topics") is already
    refused by the contract."""
    with NatsCluster(tmp_path / "nats", nodes_count=1, stream_replicas=1) as one:
        node = one.nodes[0]
        assert _round_trip(node.mqtt_port) == dict(_topic_items())
        assert "not supported for MQTT topics" not in node.log_text()
        # what a '.' in a topic level does to a client on NATS: the server drops the connection
        dotted = Client(node.mqtt_port, "levels-dot")
        gone = threading.Event()
        dotted.client.on_disconnect = lambda *_a: gone.set()
        try:
            dotted.client.publish("ns-1_b/devices/a.b/status", b"x", qos=1, retain=True)
            assert gone.wait(10), "NATS kept a client that published on a topic with '.'"
        finally:
            dotted.close()
        assert "not supported for MQTT topics" in node.log_text()
    for bad in ("a.b", "a b", "A", "-a", "_a", "x" * 64, "a/b", "a+", "a#"):
        with pytest.raises(wire.IdentifierError):
            Topics().status(bad)


@pytest.mark.skipif(find_mosquitto() is None, reason="mosquitto is not installed")
def test_identifier_characters_are_topic_levels_on_mosquitto() -> None:
    with MosquittoBroker() as broker:
        assert _round_trip(broker.port) == dict(_topic_items())
