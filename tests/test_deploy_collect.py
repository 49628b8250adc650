"""The collector and its SQLite store: unit tests, and integration tests against a private mosquitto."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from broker_helpers import RunningCollector

from agent import wire
from deploy.broker.client import BrokerOptions, MqttSession
from deploy.broker.spawn import MosquittoBroker, find_mosquitto
from deploy.observe.collect import CollectorOptions, subscriptions
from deploy.observe.store import FleetStore

SHA = "a" * 64
needs_mosquitto = pytest.mark.skipif(find_mosquitto() is None, reason="mosquitto is not installed")


def status(device: str, ts: float, online: bool = True) -> wire.Status:
    return wire.Status(device=device, online=online, ts=ts, board="pi5", arch="aarch64", device_class="fast")


def report(device: str, model: str, ts: float, p50: float = 1.0) -> wire.Report:
    lat = wire.LatencyStats(count=50, mean=p50, std=0.1, min=p50, p50=p50, p90=p50, p95=p50, p99=p50, max=p50)
    result = wire.BenchResult(variant="int8", sha256=SHA, ok=True, latency_ms=lat, ts=ts)
    return wire.Report(device=device, model=model, manifest_version=1, ts=ts, results=[result])


def event(device: str, ts: float, kind: wire.EventKind = wire.EventKind.DOWNLOADED) -> wire.Event:
    return wire.Event(device=device, ts=ts, kind=kind, model="digits", variant="int8", sha256=SHA)


# ------------------------------------------------------------------------------------------- store (unit)


def test_store_keeps_latest_and_is_idempotent(store_url: str) -> None:
    with FleetStore(store_url) as store, store.transaction():
        assert store.ingest_status(status("pi-1", 10.0))
        assert not store.ingest_status(status("pi-1", 5.0, online=False))  # older: ignored
        assert store.ingest_status(status("pi-1", 20.0, online=False))
        assert store.ingest_report(report("pi-1", "digits", 10.0, p50=2.0))
        assert store.ingest_report(report("pi-1", "digits", 11.0, p50=1.5))
        assert store.ingest_report(report("pi-1", "digits", 11.0, p50=1.5))  # same ts: replace is a no-op
        assert store.ingest_event(event("pi-1", 1.0))
        assert not store.ingest_event(event("pi-1", 1.0))  # redelivery
        assert store.ingest_event(event("pi-1", 1.0, wire.EventKind.VERIFIED))
    with FleetStore(store_url) as store:
        assert store.latest_statuses()["pi-1"].online is False
        latest = store.latest_reports("digits")["pi-1"]
        assert latest.results[0].latency_ms is not None
        assert latest.results[0].latency_ms.p50 == 1.5
        assert len(store.report_history("pi-1", "digits")) == 2
        assert [e.kind for e in store.events(device="pi-1")] == ["downloaded", "verified"]
        assert store.events(since=1.0) == []
        assert store.counts()["events"] == 2
        assert store.devices()[0].board == "pi5"


def test_store_samples_and_prunes_telemetry(store_url: str) -> None:
    with FleetStore(store_url, telemetry_every_s=10, telemetry_retention_s=100) as store:
        now = time.time()
        stored = [
            store.ingest_telemetry(wire.Telemetry(device="pi-1", ts=now - 200 + i, uptime_s=i))
            for i in range(200)
        ]
        store.commit()
        assert sum(stored) == 20
        assert store.prune(now) == 10
        assert len(store.telemetry("pi-1")) == 10


def test_subscriptions_are_shared_on_request() -> None:
    topics = wire.Topics()
    plain = subscriptions(topics, CollectorOptions())
    assert ("edgefleet/devices/+/reports/+", 1) in plain
    assert all("telemetry" not in f for f, _ in plain)
    shared = subscriptions(topics, CollectorOptions(share="collectors", telemetry=True))
    assert ("$share/collectors/edgefleet/devices/+/telemetry", 0) in shared
    with pytest.raises(wire.IdentifierError):
        CollectorOptions(name="Bad Name")


# ------------------------------------------------------------------------------------------- integration


@pytest.fixture
def broker() -> Iterator[MosquittoBroker]:
    if find_mosquitto() is None:
        pytest.skip("mosquitto is not installed")
    with MosquittoBroker() as b:
        yield b


def Running(broker: MosquittoBroker, db: Path, **options: Any) -> RunningCollector:
    """A collector on the test broker, running in a thread until the ``with`` block ends."""
    return RunningCollector(BrokerOptions(host=broker.host, port=broker.port), db, **options)


def device_session(broker: MosquittoBroker) -> MqttSession:
    return MqttSession(BrokerOptions(host=broker.host, port=broker.port, client_id="fake-device"))


def wait_for(predicate: object, timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():  # type: ignore[operator]
            return
        time.sleep(0.05)
    raise AssertionError("condition not reached in time")


def rows(db: Path, table: str) -> int:
    with FleetStore(db) as store:
        return store.counts()[table]


@pytest.mark.integration
def test_collects_counts_malformed_and_survives_restart(broker: MosquittoBroker, tmp_path: Path) -> None:
    db = tmp_path / "fleet.db"
    t = wire.Topics()
    with Running(broker, db) as run, device_session(broker) as dev:
        dev.publish(t.status("pi-1"), status("pi-1", 1.0).to_json(), retain=True)
        dev.publish(t.report("pi-1", "digits"), report("pi-1", "digits", 1.0).to_json(), retain=True)
        for i in range(20):
            dev.publish(t.events("pi-1"), event("pi-1", float(i)).to_json())
        dev.publish(t.events("pi-1"), event("pi-1", 0.0).to_json())  # a duplicate
        dev.publish(t.events("pi-1"), b"{not json")
        dev.publish(t.events("pi-2"), event("pi-1", 99.0).to_json())  # topic/payload mismatch
        dev.publish(t.status("pi-3"), b'{"schema": "edgefleet.status/1"}')
        dev.publish("edgefleet/devices/BAD!/events", event("pi-1", 98.0).to_json())  # not a contract topic
        dev.flush()
        wait_for(lambda: run.collector.stats.received >= 27)
        stats = run.collector.stats
        assert (stats.stored, stats.duplicates, stats.malformed) == (22, 1, 4)
    assert rows(db, "events") == 20
    assert rows(db, "malformed") == 4

    # Collector down: a new report and events are published; the persistent session queues the events
    # and the report is retained.
    with device_session(broker) as dev:
        dev.publish(t.report("pi-1", "digits"), report("pi-1", "digits", 2.0, p50=0.5).to_json(), retain=True)
        for i in range(100, 130):
            dev.publish(t.events("pi-1"), event("pi-1", float(i)).to_json())
        dev.publish(t.status("pi-1"), status("pi-1", 3.0, online=False).to_json(), retain=True)
        dev.flush()
    with Running(broker, db) as run:
        wait_for(lambda: run.collector.stats.received >= 33)
        time.sleep(0.3)
    with FleetStore(db) as store:
        assert store.counts()["events"] == 50
        assert len(store.events(device="pi-1", since=99)) == 30
        latest = store.latest_reports("digits")["pi-1"]
        assert latest.ts == 2.0
        assert len(store.report_history("pi-1", "digits")) == 2
        assert store.latest_statuses()["pi-1"].online is False


@pytest.mark.integration
def test_shared_subscription_splits_events_without_loss(broker: MosquittoBroker, tmp_path: Path) -> None:
    t = wire.Topics()
    dbs = [tmp_path / "a.db", tmp_path / "b.db"]
    n = 400
    with (
        Running(broker, dbs[0], name="a", share="collectors") as a,
        Running(broker, dbs[1], name="b", share="collectors") as b,
        device_session(broker) as dev,
    ):
        for i in range(n):
            device = f"pi-{i % 4}"
            dev.publish(t.events(device), event(device, float(i)).to_json())
        dev.flush()
        wait_for(lambda: a.collector.stats.received + b.collector.stats.received >= n)
        time.sleep(0.3)
        assert a.collector.stats.received + b.collector.stats.received == n
    counts = [rows(db, "events") for db in dbs]
    assert sum(counts) == n
    assert all(c > n // 10 for c in counts), counts  # both took a real share
    seen: set[tuple[str, float]] = set()
    for db in dbs:
        with FleetStore(db) as store:
            seen |= {(e.device, e.ts) for e in store.events(limit=10 * n)}
    assert len(seen) == n


@pytest.mark.integration
def test_shared_collectors_can_write_one_database(broker: MosquittoBroker, tmp_path: Path) -> None:
    """Two collectors behind one shared subscription, one SQLite file: WAL serialises their commits."""
    t = wire.Topics()
    db = tmp_path / "fleet.db"
    n = 600
    with (
        Running(broker, db, name="a", share="collectors") as a,
        Running(broker, db, name="b", share="collectors") as b,
        device_session(broker) as dev,
    ):
        for i in range(n):
            device = f"pi-{i % 6}"
            if i % 2:
                dev.publish(t.events(device), event(device, float(i)).to_json())
            else:
                dev.publish(t.report(device, "digits"), report(device, "digits", float(i)).to_json())
        dev.flush()
        wait_for(lambda: a.collector.stats.received + b.collector.stats.received >= n, timeout_s=20)
        time.sleep(0.3)
        assert a.collector.stats.received > n // 10 and b.collector.stats.received > n // 10
        assert a.collector.stats.store_errors == b.collector.stats.store_errors == 0
    with FleetStore(db) as store:
        counts = store.counts()
        assert counts["events"] == n // 2
        assert counts["report_history"] == n // 2
        assert {d: r.ts for d, r in store.latest_reports("digits").items()} == {
            f"pi-{k}": float(n - 6 + k) for k in range(0, 6, 2)
        }


@pytest.mark.integration
def test_ingest_rate(broker: MosquittoBroker, tmp_path: Path) -> None:
    """Not a benchmark gate: a floor that catches a per-message commit or a blocking callback."""
    t = wire.Topics()
    n = 3000
    with Running(broker, tmp_path / "fleet.db") as run, device_session(broker) as dev:
        start = time.perf_counter()
        for i in range(n):
            dev.publish(t.events(f"pi-{i % 10}"), event(f"pi-{i % 10}", float(i)).to_json())
        dev.flush()
        wait_for(lambda: run.collector.stats.stored >= n, timeout_s=30)
        rate = n / (time.perf_counter() - start)
    print(f"collector ingest: {rate:.0f} events/s end to end")
    assert rate > 300
