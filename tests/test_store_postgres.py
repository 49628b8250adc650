"""The fleet store on PostgreSQL as on SQLite: URLs, concurrent writers, schema versions and namespaces,
deciding from either, a collector that survives PostgreSQL restarting, and two collectors behind one
MQTT v5 shared subscription writing one PostgreSQL database while one of them is SIGKILLed and restarted.

Every PostgreSQL here is a throwaway cluster started by tests/pg_helpers.py (initdb + pg_ctl on a free
loopback port, stopped by PID). The store behaviour tests in test_deploy_collect.py and
test_fleet_store.py run on both backends through the ``store_url`` fixture.
"""

from __future__ import annotations

import json
import random
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import psycopg
import pytest
from broker_helpers import RunningCollector
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from pg_helpers import PostgresServer, unavailable_reason
from test_deploy_collect import event, report, status
from test_fleet_store import MODEL, POLICY, as_json, fleet, manifest

from agent import wire
from deploy import cli
from deploy.broker.client import BrokerOptions, MqttSession
from deploy.broker.spawn import MosquittoBroker, find_mosquitto, free_port
from deploy.control.select import load_policy, select
from deploy.observe.state import DB_ENV
from deploy.observe.store import (
    SCHEMA_VERSION,
    FleetStore,
    ReportRow,
    StoreNamespaceError,
    StoreSchemaError,
    StoreUnavailable,
    parse_db_url,
)
from deploy.observe.store_sql import StoreError

ROOT = Path(__file__).resolve().parent.parent


def wait_for(predicate: Callable[[], bool], timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.1)
    raise AssertionError(f"{what}: not reached within {timeout_s:g} s")


def raw_sql(url: str, statement: str) -> None:
    """Change a store behind FleetStore's back (to make an old or newer one)."""
    parsed = parse_db_url(url)
    if parsed.path is not None:
        with sqlite3.connect(parsed.path) as conn:
            conn.execute(statement)
        return
    with psycopg.connect(url, autocommit=True) as pg:
        pg.execute(statement)


def schema_version(url: str) -> str:
    parsed = parse_db_url(url)
    query = "SELECT value FROM meta WHERE key = 'schema_version'"
    if parsed.path is not None:
        with sqlite3.connect(parsed.path) as conn:
            return str(conn.execute(query).fetchone()[0])
    with psycopg.connect(url, autocommit=True) as pg:
        row = pg.execute(query).fetchone()
        assert row is not None
        return str(row[0])


# ------------------------------------------------------------------------------------------- unit


def test_database_urls() -> None:
    assert parse_db_url("fleet.db").path == Path("fleet.db")
    assert parse_db_url(Path("/x/fleet.db")).path == Path("/x/fleet.db")
    assert parse_db_url("sqlite:///var/lib/f.db").path == Path("/var/lib/f.db")
    pg = parse_db_url("postgresql://fleet:s3cret@127.0.0.1:5433/fleet")
    assert pg.kind == "postgresql" and pg.path is None
    assert pg.display == "postgresql://fleet:***@127.0.0.1:5433/fleet"  # never print a password
    assert "127.0.0.1:5433 (database fleet, user fleet)" in pg.where()
    assert parse_db_url("postgres://u@h/d").kind == "postgresql"
    with pytest.raises(StoreError, match="unsupported database URL scheme 'mysql'"):
        parse_db_url("mysql://u@h/d")
    with pytest.raises(StoreError, match="sqlite:///ABSOLUTE/PATH"):
        parse_db_url("sqlite://relative.db")


# ------------------------------------------------------------------------------------------- both backends


def test_concurrent_writers_keep_the_newest_once(store_url: str) -> None:
    """Four writers, each its own connection, ingest overlapping, shuffled batches of the same messages:
    one history row per distinct report, one event row per distinct event, the newest report and status
    per device, ``last_seen`` the latest, whatever the interleaving (no read-modify-write to race)."""
    devices = [f"pi-{i}" for i in range(12)]
    reports = [report(d, "digits", float(ts), p50=1.0 + ts) for d in devices for ts in range(8)]
    statuses = [status(d, float(ts), online=ts % 2 == 0) for d in devices for ts in range(8)]
    events = [event(d, float(ts)) for d in devices for ts in range(8)]
    FleetStore(store_url, namespace="edgefleet").close()  # create the schema once, as a collector would
    errors: list[BaseException] = []

    def writer(seed: int) -> None:
        rng = random.Random(seed)
        mine = [(r, s, e) for r, s, e in zip(reports, statuses, events, strict=True) if rng.random() < 0.7]
        rng.shuffle(mine)
        try:
            with FleetStore(store_url, namespace="edgefleet", timeout_s=30) as store:
                for start in range(0, len(mine), 16):
                    chunk = mine[start : start + 16]
                    for _ in range(20):  # a deadlock or a locked SQLite is retried, as the collector does
                        try:
                            with store.transaction():
                                store.ingest_reports([ReportRow.of(r, 100.0 + seed) for r, _, _ in chunk])
                                for _, s, e in chunk:
                                    store.ingest_status(s, 100.0 + seed)
                                    store.ingest_event(e, 100.0 + seed)
                            break
                        except StoreUnavailable:
                            time.sleep(0.05)
                    else:
                        raise AssertionError("a batch was never written")
        except BaseException as err:
            errors.append(err)

    threads = [threading.Thread(target=writer, args=(seed,)) for seed in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors, errors
    assert not any(t.is_alive() for t in threads)
    # Whatever the writers skipped, the union of what they wrote is what the store must hold.
    seen: set[tuple[str, float]] = set()
    for seed in range(4):
        rng = random.Random(seed)
        seen |= {(r.device, r.ts) for r in reports if rng.random() < 0.7}
    with FleetStore(store_url, readonly=True) as store:
        counts = store.counts()
        assert counts["report_history"] == len(seen)
        assert counts["events"] == len(seen)
        newest = {d: max(ts for dd, ts in seen if dd == d) for d in {d for d, _ in seen}}
        assert {d: r.ts for d, r in store.latest_reports("digits").items()} == newest
        assert {d: s.ts for d, s in store.latest_statuses().items()} == newest
        assert all(row.last_seen >= 100.0 for row in store.devices())


def test_a_readers_snapshot_is_one_state(store_url: str) -> None:
    with FleetStore(store_url) as writer, writer.transaction():
        writer.ingest_status(status("pi-1", 1.0))
    with FleetStore(store_url, readonly=True) as reader:
        with reader.snapshot():
            assert list(reader.latest_statuses()) == ["pi-1"]
            with FleetStore(store_url) as writer, writer.transaction():
                writer.ingest_status(status("pi-2", 1.0))
            assert list(reader.latest_statuses()) == ["pi-1"]  # what select decides on stays whole
        assert list(reader.latest_statuses()) == ["pi-1", "pi-2"]


def test_schema_versions_and_namespaces(store_url: str, capsys: pytest.CaptureFixture[str]) -> None:
    display = parse_db_url(store_url).display
    with FleetStore(store_url, namespace="edgefleet") as store, store.transaction():
        store.ingest_status(status("pi-1", 1.0))
    assert schema_version(store_url) == str(SCHEMA_VERSION)

    # An older store: readers say what to run; a collector (writer) upgrades it.
    raw_sql(store_url, "UPDATE meta SET value = '1' WHERE key = 'schema_version'")
    raw_sql(store_url, "DROP INDEX reports_model")
    with pytest.raises(StoreSchemaError) as old:
        FleetStore(store_url, readonly=True)
    assert str(old.value) == (
        f"{display} has store schema v1, this edgefleet reads v{SCHEMA_VERSION}: run "
        f"`edgefleet collect --db {display}` (it upgrades the store when it starts), then retry"
    )
    assert cli.main(["fleet", "--db", store_url, "--json"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "has store schema v1" in err and "edgefleet collect --db" in err
    FleetStore(store_url, namespace="edgefleet").close()
    assert schema_version(store_url) == str(SCHEMA_VERSION)
    with FleetStore(store_url, readonly=True) as store:
        assert list(store.latest_statuses()) == ["pi-1"]
    raw_sql(store_url, "DROP INDEX reports_model")  # the upgrade did create it

    # A newer store: refused by readers and writers, and left as it was.
    raw_sql(store_url, "UPDATE meta SET value = '99' WHERE key = 'schema_version'")
    for readonly in (True, False):
        with pytest.raises(StoreSchemaError, match=r"has store schema v99, newer than this edgefleet's"):
            FleetStore(store_url, readonly=readonly, namespace=None if readonly else "edgefleet")
    assert schema_version(store_url) == "99"
    raw_sql(store_url, f"UPDATE meta SET value = '{SCHEMA_VERSION}' WHERE key = 'schema_version'")

    # Another namespace's collector is refused in one line, before it connects to any broker.
    with pytest.raises(StoreNamespaceError, match="is the store of MQTT namespace 'edgefleet'"):
        FleetStore(store_url, namespace="lab")
    argv = ["collect", "--db", store_url, "--namespace", "lab", "--port", str(free_port()), "--duration", "5"]
    assert cli.main(argv) == 2
    out = capsys.readouterr()
    line = f"{display} is the store of MQTT namespace 'edgefleet', this collector's is 'lab'"
    assert line in out.out + out.err
    with FleetStore(store_url, readonly=True) as store:
        assert store.namespace == "edgefleet"
        assert store.counts()["statuses"] == 1


def test_select_decides_the_same_from_postgresql_and_sqlite(
    pg_url: str, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    m = manifest()
    signed = wire.sign(m, Ed25519PrivateKey.generate())
    statuses, reports = fleet(m, 40)
    sqlite_db = str(tmp_path / "fleet.db")
    for url in (sqlite_db, pg_url):
        with FleetStore(url) as store, store.transaction():
            store.ingest_manifest(signed)
            for s in statuses.values():
                store.ingest_status(s)
            for r in reports.values():
                store.ingest_report(r)
    policy = tmp_path / "lab.toml"
    policy.write_text(POLICY)
    decided = []
    for url in (sqlite_db, pg_url):
        argv = ["select", "--model", MODEL, "--policy", str(policy), "--db", url, "--port", "1", "--json"]
        assert cli.main(argv) == 0
        decided.append(json.loads(capsys.readouterr().out))
    assert decided[0] == decided[1] == as_json(select(m, reports, statuses, load_policy(policy)))
    assert len(decided[1]) == 40
    # The default store may be a URL too ($EDGEFLEET_COLLECTOR_DB).
    monkeypatch.setenv(DB_ENV, pg_url)
    assert cli.main(["fleet", "--json", "--port", "1"]) == 0
    captured = capsys.readouterr()
    assert len(json.loads(captured.out)) == 40
    assert f"reading the collector database {pg_url} (last write" in captured.err


def test_unreachable_and_missing_databases_are_one_line(
    postgres: PostgresServer, capsys: pytest.CaptureFixture[str]
) -> None:
    port = free_port()  # nothing listens there
    url = f"postgresql://edgefleet@127.0.0.1:{port}/fleet"
    assert cli.main(["select", "--model", MODEL, "--db", url, "--port", "1"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1, err
    assert f"cannot reach PostgreSQL at 127.0.0.1:{port} (database fleet, user edgefleet)" in err
    assert "check that the server runs and listens there" in err
    assert cli.main(["collect", "--db", url, "--port", str(free_port()), "--duration", "5"]) == 2
    assert f"cannot reach PostgreSQL at 127.0.0.1:{port}" in capsys.readouterr().out
    missing = postgres.url("no_such_db")
    with pytest.raises(StoreUnavailable, match=r"does not exist: create it \(createdb -h 127.0.0.1"):
        FleetStore(missing)
    empty = postgres.create_database()
    with pytest.raises(StoreSchemaError, match="holds no edgefleet store yet: run `edgefleet collect"):
        FleetStore(empty, readonly=True)
    with psycopg.connect(empty, autocommit=True) as pg:  # the reader wrote nothing
        assert pg.execute("SELECT to_regclass('meta')").fetchone() == (None,)


# ------------------------------------------------------------------------------------------- with a broker


@pytest.fixture
def broker() -> Iterator[MosquittoBroker]:
    if find_mosquitto() is None:
        pytest.skip("mosquitto is not installed")
    with MosquittoBroker() as b:
        yield b


def publisher(broker: MosquittoBroker, name: str) -> MqttSession:
    return MqttSession(BrokerOptions(host=broker.host, port=broker.port, client_id=name))


@pytest.mark.integration
def test_collector_keeps_its_messages_while_postgresql_restarts(
    broker: MosquittoBroker, tmp_path: Path
) -> None:
    why = unavailable_reason()
    if why is not None:
        pytest.skip(why)
    t = wire.Topics()
    with PostgresServer(tmp_path) as server:  # its own: the session's server is not restarted under others
        url = server.start().create_database("fleet")
        options = BrokerOptions(host=broker.host, port=broker.port)
        with RunningCollector(options, url) as run, publisher(broker, "fake-device") as dev:
            for i in range(100):
                dev.publish(t.events(f"pi-{i % 5}"), event(f"pi-{i % 5}", float(i)).to_json())
            dev.flush()
            wait_for(lambda: run.collector.stats.stored >= 100, 20, "first 100 events stored")
            server.stop()  # fast shutdown: the collector's connection is cut
            for i in range(100, 200):
                dev.publish(t.events(f"pi-{i % 5}"), event(f"pi-{i % 5}", float(i)).to_json())
            dev.flush()
            wait_for(lambda: run.collector.stats.store_errors > 0, 20, "a failed write while PG is down")
            assert run.collector.stats.stored == 100  # nothing was acknowledged without a commit
            server.start()
            wait_for(lambda: run.collector.stats.stored >= 200, 30, "every event stored after the restart")
            assert run.collector.stats.malformed == 0
        with FleetStore(url, readonly=True) as store:
            assert store.counts()["events"] == 200
            assert sorted(e.ts for e in store.events(limit=1000)) == [float(i) for i in range(200)]


@pytest.mark.integration
def test_a_message_the_database_refuses_does_not_stall_the_collector(
    broker: MosquittoBroker, store_url: str
) -> None:
    """A value the schema accepts and the database cannot hold (a 2**70 manifest version: past 64 bits)
    fails its batch on every retry: it is recorded as malformed, the rest of its batch is stored."""
    t = wire.Topics()
    poison = report("pi-9", MODEL, 5.0).model_copy(update={"manifest_version": 2**70})
    with (
        RunningCollector(BrokerOptions(host=broker.host, port=broker.port), store_url, batch_size=500) as run,
        publisher(broker, "fake-device") as dev,
    ):
        for i in range(60):
            if i == 30:
                dev.publish(t.report("pi-9", MODEL), poison.to_json())
            dev.publish(t.events(f"pi-{i % 3}"), event(f"pi-{i % 3}", float(i)).to_json())
        dev.flush()
        wait_for(lambda: run.collector.stats.received >= 61, 20, "61 messages handled")
        stats = run.collector.stats
        assert (stats.stored, stats.malformed) == (60, 1)
    with FleetStore(store_url, readonly=True) as store:
        counts = store.counts()
        assert (counts["events"], counts["malformed"], counts["report_history"]) == (60, 1, 0)


def _collector(broker: MosquittoBroker, url: str, name: str, log: Path) -> subprocess.Popen[bytes]:
    argv = [sys.executable, "-m", "deploy", "collect", "--db", url, "--name", name, "--share", "collectors"]
    argv += ["--host", broker.host, "--port", str(broker.port)]
    with log.open("ab") as out:
        return subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, cwd=ROOT)


def _stop(proc: subprocess.Popen[bytes]) -> int:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
    try:
        return proc.wait(30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(10)
        raise


@pytest.mark.integration
def test_shared_collectors_write_one_postgresql_exactly_once_across_a_kill(
    broker: MosquittoBroker, pg_url: str, tmp_path: Path
) -> None:
    """Two collectors behind $share/collectors write one PostgreSQL; the second is SIGKILLed mid-way
    (whatever it held unacknowledged is redelivered) and restarted: every report stored exactly once."""
    t = wire.Topics()
    devices, rounds = 200, 5
    n = devices * rounds
    FleetStore(pg_url, namespace=t.ns).close()  # the schema exists before both collectors start
    logs = {name: tmp_path / f"collector-{name}.log" for name in ("a", "b")}
    procs = {name: _collector(broker, pg_url, name, log) for name, log in logs.items()}
    try:
        for log in logs.values():
            wait_for(lambda log=log: "connected as" in log.read_text(), 30, f"{log.name} connected")
        time.sleep(0.5)  # SUBACK
        with publisher(broker, "fake-fleet") as dev:
            for k in range(rounds):
                for d in range(devices):
                    device = f"dev-{d:04d}"
                    payload = report(device, MODEL, float(k), p50=1.0 + d).to_json()
                    dev.publish(t.report(device, MODEL), payload, retain=True)
                    if (k, d) == (1, devices // 2):
                        # SIGKILL while reports flow: whatever it holds uncommitted or unacknowledged
                        # stays in its session on the broker.
                        procs["b"].kill()
                        procs["b"].wait(10)
                dev.flush()
                if k == 3:
                    procs["b"] = _collector(broker, pg_url, "b", logs["b"])

        def stored() -> int:
            with FleetStore(pg_url, readonly=True) as store:
                return store.counts()["report_history"]

        wait_for(lambda: stored() >= n, 60, f"{n} reports stored")
        time.sleep(1.0)  # anything more (a duplicate row) would show now
    finally:
        codes = {name: _stop(proc) for name, proc in procs.items()}
    assert codes == {"a": 0, "b": 0}, {name: log.read_text()[-2000:] for name, log in logs.items()}
    with FleetStore(pg_url, readonly=True) as store:
        counts = store.counts()
        assert counts["report_history"] == n
        assert counts["reports"] == devices and counts["devices"] == devices
        assert counts["malformed"] == 0
        latest = store.latest_reports(MODEL)
        assert {r.ts for r in latest.values()} == {float(rounds - 1)}
    # The restarted collector took a share of what came after it (shared subscription, same session).
    final = logs["b"].read_text().strip().splitlines()[-1]
    assert final.startswith("collected: received "), final
    assert int(final.split("received ")[1].split(",")[0]) > 0, final
