"""The collector on a clustered broker: ``edgefleet collect`` against a three-node NATS JetStream cluster.

The collector runs as the operator runs it (``python -m deploy collect --db ... --broker n0,n1,n2 --mqtt
v311``), logged in as a NATS user that may subscribe only to what the collector reads. ``edgefleet
publish`` puts a signed bundle on the cluster; simulated devices (benches/_sim_device.py: the agent's
statuses, events and reports, built with the wire models, after checking the manifest's signature)
answer it through a host session on another node. Then the node the collector is connected to is
killed (SIGKILL) while a numbered stream of events and the rest of the fleet's answers keep coming. The
collector reconnects to another node and resumes its session, and every message the cluster
acknowledged (PUBACK to the publisher) is in the store, those published while the collector had no
connection included. ``edgefleet select --db`` then decides every device from that store.

What NATS (2.9.10) guarantees here, and what the test asserts: the collector's session is persistent
(MQTT 3.1.1 ``clean_session=False``, a fixed client id), so each of its QoS1 subscriptions is a durable
JetStream consumer on the ``$MQTT_msgs`` stream; with ``stream_replicas: 3`` the stream, the consumers
and the session record have a copy on every node. A QoS1 message the cluster acknowledged to its
publisher is stored in that stream before the PUBACK and stays there until the collector's consumer
has it acknowledged, whichever node the collector is on, so nothing published while the collector was
reconnecting is lost: it is delivered when the session resumes. A message delivered but not yet
acknowledged when the node died is delivered again (the store counts it as a duplicate, never a second
row). Not covered: a clean session (a collector with another client id) gets only what is retained,
and QoS0 telemetry has no such guarantee on any broker.
"""

from __future__ import annotations

import json
import logging
import os
import re
import secrets
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from datetime import datetime
from pathlib import Path

import pytest
from broker_helpers import RunningCollector, read_store
from nats_helpers import NatsCluster, NatsUser, find_nats_server

from agent import wire
from agent.mqttclient import Endpoint
from deploy.broker.client import BrokerOptions, MqttSession
from deploy.keys import init_keys
from deploy.observe.store import FleetStore

BENCHES = Path(__file__).resolve().parent.parent / "benches"
sys.path.append(str(BENCHES))  # after the `agent` package is imported: benches/agent.py must not shadow it

from _sim_device import Counters, SimDevice, SimSettings  # noqa: E402
from _sim_models import write_bundle  # noqa: E402

pytestmark = [pytest.mark.integration]
needs_nats = pytest.mark.skipif(
    find_nats_server() is None,
    reason="nats-server is not installed (scripts/setup.sh installs it as root: "
    "apt-get install -y nats-server)",
)

PY = sys.executable
MODEL = "kws"
DEVICES = 30  # the first half answers before the kill, the second half during the failover
STREAM = "pi-stream"  # a device whose numbered events run through the failover
STREAM_PER_S = 100

HOST = NatsUser("edgefleet-host", secrets.token_hex(8))
# what `edgefleet collect` needs on NATS: subscribe to what it stores, plus $MQTT.sub.> (the delivery
# subject of the JetStream consumer behind each QoS1 subscription: without it every SUBACK is 0x80)
COLLECTOR = NatsUser(
    "edgefleet-collector",
    secrets.token_hex(8),
    subscribe=(
        "edgefleet.devices.*.status",
        "edgefleet.devices.*.reports.*",
        "edgefleet.devices.*.events",
        "edgefleet.models.*.manifest",
        "edgefleet.devices.*.assign.*",
        "$MQTT.sub.>",
    ),
)


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[NatsCluster]:
    with NatsCluster(tmp_path / "nats", users=(HOST, COLLECTOR)) as c:
        yield c


def _broker_flags(cluster: NatsCluster, user: NatsUser, tmp: Path) -> list[str]:
    secret = tmp / f"{user.name}.password"
    secret.write_text(user.password + "\n", encoding="utf-8")
    secret.chmod(0o600)
    nodes = ",".join(f"{h}:{p}" for h, p in cluster.endpoints)
    return ["--broker", nodes, "--mqtt", "v311", "--username", user.name, "--password-file", str(secret)]


def _cli(args: list[str], env: dict[str, str], timeout_s: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [PY, "-m", "deploy", *args], env=env, capture_output=True, text=True, timeout=timeout_s, check=False
    )


def _counts(db: Path) -> dict[str, int]:
    return read_store(db, FleetStore.counts) or {}


def _wait(what: str, done: Callable[[], bool], timeout_s: float, log: Path) -> None:
    deadline = time.monotonic() + timeout_s
    while not done():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not within {timeout_s:g} s\n{log.read_text()[-3000:]}")
        time.sleep(0.1)


def _connections(log: Path) -> list[tuple[int, bool, float]]:
    """(port, session present, when: epoch seconds) of every connection the collector logged."""
    found = re.findall(
        r"^(\S+ \S+) INFO edgefleet\.collect: connected as \S+ to 127\.0\.0\.1:(\d+) "
        r"\(session present: (True|False)\)",
        log.read_text(),
        re.MULTILINE,
    )
    return [
        (int(port), present == "True", datetime.strptime(at, "%Y-%m-%d %H:%M:%S,%f").timestamp())
        for at, port, present in found
    ]


class Fleet:
    """Simulated devices answering through one host session (timers run at once: no waiting here)."""

    def __init__(self, session: MqttSession, public_key: str) -> None:
        self.session = session
        key = wire.public_key_from_text(public_key)
        self.trusted = {wire.key_id_for(key): key}
        self.sent: dict[str, int] = {}  # topic kind ("events", "reports", "status") -> messages sent
        self.settings = SimSettings(wire.DEFAULT_NAMESPACE, 7, 0.0, 0.0, 0.0, 0.0)

    def _send(self, topic: str, payload: bytes, retain: bool) -> None:
        self.session.publish(topic, payload, retain=retain)
        kind = "reports" if "/reports/" in topic else topic.rsplit("/", 1)[1]
        self.sent[kind] = self.sent.get(kind, 0) + 1

    def answer(self, device: str, manifest: bytes) -> None:
        dev = SimDevice(device, self.settings, self.trusted, self._send, lambda _d, fn: fn(), Counters())
        dev.publish_status()
        dev.handle(wire.Topics().manifest(MODEL), manifest)
        assert dev.models[MODEL].state is wire.ModelState.REPORTED, f"{device} did not accept the manifest"


@needs_nats
def test_collector_fails_over_and_select_decides_from_its_store(cluster: NatsCluster, tmp_path: Path) -> None:
    topics = wire.Topics()
    keys = init_keys(tmp_path / "keys")
    env = dict(
        os.environ,
        EDGEFLEET_HOME=str(tmp_path / "keys"),
        EDGEFLEET_COLLECTOR_DB=str(tmp_path / "none.db"),
        PYTHONUNBUFFERED="1",
    )
    env.pop("EDGEFLEET_HOST_CONFIG", None)
    write_bundle(tmp_path / "bundle", MODEL, 1, time.time())
    done = _cli(["publish", str(tmp_path / "bundle"), *_broker_flags(cluster, HOST, tmp_path)], env)
    assert done.returncode == 0, done.stderr[-2000:]

    db = tmp_path / "fleet.db"
    log = tmp_path / "collector.log"
    with log.open("wb") as out:
        collector = subprocess.Popen(
            [PY, "-m", "deploy", "collect", "--db", str(db), "--name", "nats",
             *_broker_flags(cluster, COLLECTOR, tmp_path)],
            env=env, stdout=out, stderr=subprocess.STDOUT,
        )  # fmt: skip
    # the devices' side talks to the last node (listed first), so that it outlives the kill below
    nodes = [Endpoint(host=h, port=p) for h, p in cluster.endpoints]
    options = BrokerOptions(
        endpoints=(nodes[-1], *nodes[:-1]),
        protocol="v311",
        username=HOST.name,
        password=HOST.password,
        client_id="fake-fleet",
        connect_timeout_s=20,
    )
    try:
        # ready: the retained signed manifest `publish` left on the cluster is in the store
        _wait("the retained manifest stored", lambda: _counts(db).get("manifests", 0) >= 1, 60, log)
        first = _connections(log)
        assert first and first[0][0] == nodes[0].port, first

        with MqttSession(options, ack_timeout_s=60) as session:
            manifest = session.collect_retained([topics.manifest(MODEL)])[topics.manifest(MODEL)]
            fleet = Fleet(session, keys.public_text)
            devices = [f"sim-{i:03d}" for i in range(DEVICES)]
            for device in devices[: DEVICES // 2]:
                fleet.answer(device, manifest)
            session.flush()
            _wait(
                "the first half's reports stored",
                lambda: _counts(db).get("reports", 0) >= DEVICES // 2,
                30,
                log,
            )

            victim = cluster.node_on(first[0][0])
            cluster.kill(victim)
            t_kill = time.time()
            stream: list[float] = []
            base = time.time()
            sent_at: list[float] = []  # when each stream event was handed over (a full window blocks)
            seen_back: float | None = None  # when this loop saw the reconnect in the log
            second = iter(devices[DEVICES // 2 :])
            # events keep coming, and the other half answers, until 3 s after the collector is back
            while seen_back is None or time.time() < seen_back + 3:
                assert time.time() - t_kill < 90, f"no reconnect in 90 s\n{log.read_text()[-3000:]}"
                ts = base + len(stream)
                ev = wire.Event(device=STREAM, ts=ts, kind=wire.EventKind.ACK, detail=f"#{len(stream)}")
                session.publish(topics.events(STREAM), ev.to_json())
                stream.append(ts)
                sent_at.append(time.time())
                if len(stream) % 10 == 0 and (device := next(second, None)) is not None:
                    fleet.answer(device, manifest)
                if seen_back is None and len(_connections(log)) > 1:
                    seen_back = time.time()
                time.sleep(1 / STREAM_PER_S)
            for device in second:
                fleet.answer(device, manifest)
            session.flush()  # every message above acknowledged by the cluster (PublishError otherwise)
        connections = _connections(log)
        port, present, reconnected_at = connections[-1]
        gap = reconnected_at - t_kill  # from the collector's log: this loop may have waited in publish()
        offline = sum(1 for t in sent_at if t < reconnected_at)
        assert offline > 0  # some were handed to the cluster while the collector had no connection
        stall = max(b - a for a, b in zip([t_kill, *sent_at], sent_at, strict=False))
        assert port != victim.mqtt_port and present, connections

        want_events = fleet.sent["events"] + len(stream)
        _wait(
            "every acknowledged message stored",
            lambda: _counts(db).get("events", 0) >= want_events and _counts(db).get("reports", 0) >= DEVICES,
            60,
            log,
        )
        with FleetStore(db, readonly=True) as store:
            got = {e.ts for e in store.events(device=STREAM, limit=100_000)}
            counts = store.counts()
            statuses = store.latest_statuses()
        missing = sorted(set(stream) - got)
        assert not missing, f"{len(missing)} acknowledged events lost, first #{int(missing[0] - base)}"
        assert counts["events"] == want_events and counts["reports"] == DEVICES
        assert counts["malformed"] == 0
        assert sorted(statuses) == sorted(devices)
    finally:
        if collector.poll() is None:
            collector.send_signal(signal.SIGTERM)
        try:
            collector.wait(20)
        except subprocess.TimeoutExpired:
            collector.kill()
            collector.wait(5)
        text = log.read_text(errors="replace")
        print(text[-2500:])
    assert collector.returncode == 0, text[-2000:]
    summary = re.search(r"collected: received (\d+), stored (\d+), duplicates (\d+), malformed (\d+)", text)
    assert summary is not None
    received, stored, duplicates, malformed = map(int, summary.groups())
    print(
        f"collector on NATS: node {victim.name} killed, back on port {port} (session present) "
        f"{gap:.1f} s later; {len(stream)} stream events published through the failover "
        f"({offline} before it was back; longest publish stall {stall:.1f} s), {counts['events']} events and "
        f"{counts['reports']} reports stored, 0 lost; received {received}, duplicates {duplicates}"
    )
    assert malformed == 0 and stored == received - duplicates

    decided = _cli(["select", "--model", MODEL, "--db", str(db), "--json"], env)
    assert decided.returncode == 0, decided.stderr[-2000:]
    decisions = json.loads(decided.stdout)
    assert sorted(d["device"] for d in decisions) == sorted(devices)
    assert all(d.get("variant") for d in decisions), decisions[:3]


@needs_nats
def test_refused_subscription_is_retried(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """NATS refuses new QoS1 subscriptions for a while after a node died (SUBACK 0x80); the collector
    asks again every second instead of storing nothing on those topics until its next reconnect. Made
    deterministic here with permissions: the collector's user may not subscribe to the events at first,
    then the configuration grants it and the node reloads it (SIGHUP)."""
    no_events = NatsUser(
        COLLECTOR.name,
        COLLECTOR.password,
        subscribe=tuple(s for s in COLLECTOR.subscribe or () if "events" not in s),
    )
    topics = wire.Topics()
    with NatsCluster(tmp_path / "nats", nodes_count=1, stream_replicas=1, users=(HOST, no_events)) as one:
        node = one.nodes[0]
        assert node.process is not None
        endpoints = tuple(Endpoint(host=h, port=p) for h, p in one.endpoints)
        collector_opts = BrokerOptions(
            endpoints=endpoints, protocol="v311", username=COLLECTOR.name, password=COLLECTOR.password
        )
        host_opts = BrokerOptions(
            endpoints=endpoints, protocol="v311", username=HOST.name, password=HOST.password
        )
        db = tmp_path / "fleet.db"
        caplog.set_level(logging.WARNING, logger="edgefleet.collect")
        with RunningCollector(collector_opts, db, name="retry") as run, MqttSession(host_opts) as host:
            deadline = time.monotonic() + 10
            while "refused subscriptions" not in caplog.text:
                assert time.monotonic() < deadline, "the events subscription was not refused"
                time.sleep(0.05)
            lost = wire.Event(device="pi-1", ts=1.0, kind=wire.EventKind.ACK)
            host.publish(topics.events("pi-1"), lost.to_json())
            host.flush()
            time.sleep(0.5)
            assert run.collector.stats.received == 0  # no subscription: not delivered, and never will be
            one.users = (HOST, COLLECTOR)
            node.config_path.write_text(one.config_text(node))
            os.kill(node.process.pid, signal.SIGHUP)  # nats-server reloads its users and permissions
            deadline = time.monotonic() + 15
            sent = 0
            while run.collector.stats.stored < 1:  # an event a second until the retried subscription works
                assert time.monotonic() < deadline, caplog.text[-2000:]
                ev = wire.Event(device="pi-1", ts=10.0 + sent, kind=wire.EventKind.ACK)
                host.publish(topics.events("pi-1"), ev.to_json())
                sent += 1
                time.sleep(0.2)
            host.flush()
    assert "retrying in 1 s" in caplog.text and "giving up" not in caplog.text
