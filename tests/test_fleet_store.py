"""Deciding on the whole fleet: a cut retained burst is detected and refused, the collector's store decides.

Integration tests run a private mosquitto with ``max_queued_messages 100`` (mosquitto's default is
1000; a smaller limit shows the same cut with a few hundred simulated devices).
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

import paho.mqtt.client as paho
import pytest
from broker_helpers import RunningCollector
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from test_deploy import make_manifest, make_report, make_status, make_variant, ok_result

from agent import wire
from deploy import cli
from deploy.broker.client import BrokerOptions, MqttSession, Watch
from deploy.broker.spawn import MosquittoBroker, find_mosquitto
from deploy.control.select import Decision, Policy, load_policy, select
from deploy.keys import init_keys, load_signing_key, trusted_keys
from deploy.observe.state import DB_ENV, burst_problems, collect_state, parse_state, state_from_store
from deploy.observe.store import FleetStore

MODEL = "digits"
QUEUE = 100  # the test broker's max_queued_messages
INFLIGHT = 20  # and its max_inflight_messages (mosquitto's default)
POLICY = (
    'name = "lab"\n[default]\nobjective = "accuracy"\nmax_p95_ms = 9\n[classes.fast]\nobjective = "latency"\n'
)


def manifest() -> wire.Manifest:
    return make_manifest(
        [
            make_variant("fp32", b"a" * 3000, 0.97),
            make_variant("fp16", b"b" * 2000, 0.96, "float16"),
            make_variant("int8", b"c" * 1000, 0.95, "int8"),
        ]
    )


def fleet(m: wire.Manifest, n: int) -> tuple[dict[str, wire.Status], dict[str, wire.Report]]:
    """``n`` devices of two classes with varied latencies, so that decisions differ between devices."""
    statuses: dict[str, wire.Status] = {}
    reports: dict[str, wire.Report] = {}
    for i in range(n):
        device = f"dev-{i:04d}"
        statuses[device] = make_status(device, "fast" if i % 3 == 0 else None, m.variant("fp32"), m)
        slow = 1.0 + (i % 7)  # fp16 passes max_p95_ms 9 on some devices only
        results = [
            ok_result(m.variant("fp32"), 6.0 * slow),
            ok_result(m.variant("fp16"), 4.0 * slow),
            ok_result(m.variant("int8"), 1.0 * slow),
        ]
        reports[device] = make_report(device, m, results, ts=1000.0 + i)
    return statuses, reports


def retained(
    topics: wire.Topics,
    signed: wire.Manifest,
    statuses: dict[str, wire.Status],
    reports: dict[str, wire.Report],
) -> dict[str, bytes]:
    raw = {topics.manifest(MODEL): signed.to_json()}
    for device, status in statuses.items():
        raw[topics.status(device)] = status.to_json()
    for device, report in reports.items():
        raw[topics.report(device, MODEL)] = report.to_json()
    return raw


def as_json(decisions: Iterable[Decision]) -> list[dict[str, object]]:
    return [d.to_json() for d in decisions]


@pytest.fixture(autouse=True)
def no_default_db(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """No collector database at the default path unless a test creates one there."""
    path = tmp_path / "default" / "fleet.db"
    monkeypatch.setenv(DB_ENV, str(path))
    return path


def stored_fleet(db: Path, n: int) -> tuple[wire.Manifest, dict[str, wire.Status], dict[str, wire.Report]]:
    m = manifest()
    statuses, reports = fleet(m, n)
    with FleetStore(db) as store, store.transaction():
        store.ingest_manifest(wire.sign(m, Ed25519PrivateKey.generate()))
        for s in statuses.values():
            store.ingest_status(s)
        for r in reports.values():
            store.ingest_report(r)
    return m, statuses, reports


# ------------------------------------------------------------------------------------------- unit


class FifoBus:
    """A bus that delivers a SUBSCRIBE's retained messages filter by filter and drops past ``limit``,
    as mosquitto does past max_inflight_messages + max_queued_messages; ``lose`` drops chosen topics
    whatever the order (a broker that cuts elsewhere)."""

    def __init__(self, store: dict[str, bytes], limit: int, lose: Iterable[str] = ()) -> None:
        self.store = store
        self.limit = limit
        self.lose = set(lose)
        self.topics = wire.Topics()
        self.reads: list[list[str]] = []

    def publish(self, topic: str, payload: bytes, retain: bool = False, qos: int = 1) -> None:
        raise AssertionError("reading only")

    def flush(self, timeout_s: float | None = None) -> None:
        return None

    def collect_retained(
        self, filters: Iterable[str], quiet_s: float = 0.3, timeout_s: float = 10.0
    ) -> dict[str, bytes]:
        fs = list(filters)
        self.reads.append(fs)
        out: dict[str, bytes] = {}
        sent = 0
        for f in fs:
            for topic, payload in sorted(self.store.items()):
                if paho.topic_matches_sub(f, topic):
                    sent += 1
                    if sent <= self.limit and topic not in self.lose:
                        out[topic] = payload
        return out

    def watch(self, filters: Iterable[str], timeout_s: float = 10.0) -> Watch:
        raise AssertionError("not used")


@pytest.fixture
def small() -> tuple[wire.Topics, dict[str, bytes]]:
    m = manifest()
    statuses, reports = fleet(m, 40)
    topics = wire.Topics()
    return topics, retained(topics, wire.sign(m, Ed25519PrivateKey.generate()), statuses, reports)


def test_a_whole_burst_is_not_suspected(small: tuple[wire.Topics, dict[str, bytes]]) -> None:
    _, raw = small
    state = collect_state(FifoBus(raw, limit=10_000), MODEL)
    assert state.cut == [] and state.cut_message() == ""
    assert (len(state.statuses), len(state.reports), state.arrived) == (40, 40, 81)


def test_a_fifo_cut_loses_the_manifest_subscribed_last(small: tuple[wire.Topics, dict[str, bytes]]) -> None:
    _, raw = small
    state = collect_state(FifoBus(raw, limit=60), MODEL)
    assert state.arrived == 60
    assert state.cut == ["1 of 1 manifest(s), subscribed last, exist but never arrived"]
    assert MODEL in state.manifests  # read again on its own: an unknown model's error stays right
    message = state.cut_message()
    assert "60 messages arrived" in message and "--db FILE" in message and "max_queued_messages" in message


def test_devices_without_a_report_are_checked_one_by_one_and_are_fine(
    small: tuple[wire.Topics, dict[str, bytes]],
) -> None:
    topics, raw = small
    never = [topics.report(f"dev-{i:04d}", MODEL) for i in (3, 17)]
    bus = FifoBus({t: p for t, p in raw.items() if t not in never}, limit=10_000)
    state = collect_state(bus, MODEL)
    assert len(bus.reads) == 3 and set(bus.reads[2]) == set(never)  # burst, manifests, the sample
    assert state.cut == []  # they do not exist: devices that have not reported yet


def test_sampled_topics_that_exist_prove_a_cut(small: tuple[wire.Topics, dict[str, bytes]]) -> None:
    topics, raw = small
    lost = {topics.report("dev-0005", MODEL)}

    class Flaky(FifoBus):
        def collect_retained(
            self, filters: Iterable[str], quiet_s: float = 0.3, timeout_s: float = 10.0
        ) -> dict[str, bytes]:
            got = super().collect_retained(filters, quiet_s, timeout_s)
            if len(self.reads) == 1:  # only the wildcard burst loses it
                return {t: p for t, p in got.items() if t not in lost}
            return got

    state = collect_state(Flaky(raw, limit=10_000), MODEL)
    assert len(state.cut) == 1
    assert "per-device topics read one by one exist but were not in the burst" in state.cut[0]
    assert "dev-0005" in state.cut[0]


def test_without_manifests_a_round_count_or_an_orphan_is_suspect() -> None:
    topics = wire.Topics()
    m = manifest()
    statuses, reports = fleet(m, 55)
    raw = retained(topics, m, statuses, reports)
    del raw[topics.manifest(MODEL)]
    cut = {t: p for t, p in sorted(raw.items())[:100]}
    state = parse_state(cut, topics)
    problems = burst_problems(cut, {}, state)
    assert any("stopped at 100 messages" in p for p in problems)
    whole = parse_state(raw, topics)
    assert burst_problems(raw, {}, whole) == []  # 110 messages
    orphan = {k: v for k, v in raw.items() if k != topics.status("dev-0001")}
    problems = burst_problems(orphan, {}, parse_state(orphan, topics))
    assert problems == ["1 device(s) have a report or assignment but no status (dev-0001, ...)"]


def test_the_store_gives_the_same_state_as_a_whole_broker_read(store_url: str) -> None:
    key = Ed25519PrivateKey.generate()
    m = manifest()
    signed = wire.sign(m, key)
    statuses, reports = fleet(m, 12)
    assignment = wire.sign(
        wire.Assignment(
            device="dev-0001",
            model=MODEL,
            variant="int8",
            sha256=m.variant("int8").sha256,
            manifest_version=1,
            issued_at=5.0,
            policy="lab",
            reason="test",
        ),
        key,
    )
    topics = wire.Topics()
    raw = retained(topics, signed, statuses, reports)
    raw[topics.assign("dev-0001", MODEL)] = assignment.to_json()
    db = store_url
    with FleetStore(db) as store, store.transaction():
        assert store.ingest_manifest(signed, raw=signed.to_json())
        assert not store.ingest_manifest(signed, raw=signed.to_json())  # idempotent
        for s in statuses.values():
            store.ingest_status(s)
        for r in reports.values():
            store.ingest_report(r)
        assert store.ingest_assignment(assignment)
    from_store = state_from_store(db, MODEL, trusted_keys(key))
    from_broker = parse_state(raw, topics, trusted_keys(key))
    assert from_store.source == str(db) and from_store.cut == []
    for part in ("manifests", "statuses", "reports", "assignments"):
        assert getattr(from_store, part) == getattr(from_broker, part), part
    policy = Policy(name="lab")
    assert as_json(select(m, from_store.reports_for(MODEL), from_store.statuses, policy)) == as_json(
        select(m, reports, statuses, policy)
    )
    # A manifest signed by another key is skipped, as from the broker.
    other = state_from_store(db, MODEL, trusted_keys(Ed25519PrivateKey.generate()))
    assert other.manifests == {} and other.skipped
    # Clearing the retained topics on the broker clears them in the store.
    with FleetStore(db) as store, store.transaction():
        assert store.clear_retained(topics.parse(topics.assign("dev-0001", MODEL)))
        assert store.clear_retained(topics.parse(topics.manifest(MODEL)))
    cleared = state_from_store(db, MODEL)
    assert cleared.assignments == {} and cleared.manifests == {}


def test_select_db_decides_from_the_store_alone(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    db = tmp_path / "fleet.db"
    m, statuses, reports = stored_fleet(db, 30)
    policy = tmp_path / "lab.toml"
    policy.write_text(POLICY)
    # No broker runs on this port: --db needs none when the store has the manifest.
    argv = ["select", "--model", MODEL, "--policy", str(policy), "--db", str(db), "--port", "1", "--json"]
    assert cli.main(argv) == 0
    got = json.loads(capsys.readouterr().out)
    assert got == as_json(select(m, reports, statuses, load_policy(policy)))
    assert len(got) == 30


def test_the_default_database_is_read_when_it_exists(
    no_default_db: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    m, statuses, reports = stored_fleet(no_default_db, 5)
    select_args = ["select", "--model", MODEL, "--json", "--port", "1", "--timeout", "1"]
    assert cli.main(select_args) == 0
    captured = capsys.readouterr()
    assert json.loads(captured.out) == as_json(select(m, reports, statuses, Policy(name="default")))
    assert f"reading the collector database {no_default_db} (last write" in captured.err
    assert "--from-broker reads the broker instead" in captured.err
    assert cli.main(["fleet", "--json", "--port", "1"]) == 0
    assert len(json.loads(capsys.readouterr().out)) == 5
    # --from-broker: the lab mode goes to the broker (none listens on port 1 here).
    assert cli.main([*select_args, "--from-broker"]) == 2
    captured = capsys.readouterr()
    assert "reading the collector database" not in captured.err and "127.0.0.1:1" in captured.err
    assert cli.main([*select_args, "--from-broker", "--db", str(no_default_db)]) == 1  # one or the other


def test_a_missing_database_is_an_expected_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["select", "--model", MODEL, "--db", str(tmp_path / "none.db")]) == 2
    assert "does not exist (run `edgefleet collect --db" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------- integration


needs_mosquitto = pytest.mark.skipif(find_mosquitto() is None, reason="mosquitto is not installed")


@pytest.fixture
def broker() -> Iterator[MosquittoBroker]:
    # Later lines override the generated config's: mosquitto keeps the last value of an option.
    extra = f"max_inflight_messages {INFLIGHT}\nmax_queued_messages {QUEUE}\n"
    with MosquittoBroker(extra_config=extra) as b:
        yield b


def options(broker: MosquittoBroker, ns: str) -> BrokerOptions:
    return BrokerOptions(host=broker.host, port=broker.port, namespace=ns, connect_timeout_s=5)


def broker_args(broker: MosquittoBroker, ns: str) -> list[str]:
    return ["--host", broker.host, "--port", str(broker.port), "--namespace", ns]


def wait_for(predicate: Callable[[], bool], timeout_s: float = 20.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.05)
    raise AssertionError("condition not reached in time")


def publish_fleet(
    session: MqttSession,
    signed: wire.Manifest,
    statuses: dict[str, wire.Status],
    reports: dict[str, wire.Report],
    between: Callable[[int], None] | None = None,
    slice_size: int = 40,
) -> None:
    """Retained manifest, statuses and reports, as devices publish them; ``between(n)`` after every
    slice of devices (``n`` devices so far), to let a collector keep pace."""
    topics = session.topics
    session.publish(topics.manifest(MODEL), signed.to_json(), retain=True)
    devices = sorted(statuses)
    for start in range(0, len(devices), slice_size):
        for device in devices[start : start + slice_size]:
            session.publish(topics.status(device), statuses[device].to_json(), retain=True)
            session.publish(topics.report(device, MODEL), reports[device].to_json(), retain=True)
        session.flush()
        if between is not None:
            between(min(start + slice_size, len(devices)))


@needs_mosquitto
@pytest.mark.integration
def test_a_cut_burst_is_refused_then_allowed_and_warned(
    broker: MosquittoBroker, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    ns = "cut"
    m = manifest()
    statuses, reports = fleet(m, 300)  # 601 retained messages against 20 + 100
    with MqttSession(options(broker, ns)) as s:
        publish_fleet(s, wire.sign(m, Ed25519PrivateKey.generate()), statuses, reports)
    policy = tmp_path / "lab.toml"
    policy.write_text(POLICY)
    common = ["--model", MODEL, "--policy", str(policy), "--from-broker", *broker_args(broker, ns)]

    assert cli.main(["select", *common, "--json"]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    lines = [ln for ln in captured.err.splitlines() if "looks cut" in ln]
    assert len(lines) == 1
    assert f"({QUEUE + INFLIGHT} messages arrived" in lines[0]
    assert "manifest(s), subscribed last, exist but never arrived" in lines[0]
    assert "--db FILE" in lines[0] and "max_queued_messages" in lines[0] and "--allow-partial" in lines[0]

    key = init_keys(tmp_path / "keys").private_path
    assert cli.main(["assign", *common, "--key", str(key)]) == 2
    assert "looks cut" in capsys.readouterr().err
    rollout = ["rollout", MODEL, "--policy", str(policy), "--key", str(key), "--from-broker"]
    rollout += broker_args(broker, ns)
    assert cli.main([*rollout, "--state-db", str(tmp_path / "rollouts.db")]) == 2
    assert "looks cut" in capsys.readouterr().err

    assert cli.main(["select", *common, "--json", "--allow-partial"]) == 0
    captured = capsys.readouterr()
    decided = json.loads(captured.out)
    assert len(decided) < len(statuses)  # measured: 0 of 300 (every message that arrived was a status)
    assert "warning: the broker's retained burst looks cut" in captured.err

    assert cli.main(["fleet", "--json", "--from-broker", *broker_args(broker, ns)]) == 0
    captured = capsys.readouterr()
    assert len({r["device"] for r in json.loads(captured.out)}) < len(statuses)
    assert "edgefleet: warning: the broker's retained burst looks cut" in captured.err


def count(db: Path, table: str) -> int:
    with FleetStore(db, readonly=True) as store:
        return store.counts()[table]


@needs_mosquitto
@pytest.mark.integration
def test_the_collectors_store_decides_every_device_the_burst_cannot(
    broker: MosquittoBroker, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    ns = "whole"
    n = 300
    key_pair = init_keys(tmp_path / "keys")
    key = load_signing_key(key_pair.private_path)
    m = manifest()
    signed = wire.sign(m, key)
    statuses, reports = fleet(m, n)
    db = tmp_path / "fleet.db"
    policy = tmp_path / "lab.toml"
    policy.write_text(POLICY)
    truth = as_json(select(m, reports, statuses, load_policy(policy)))
    assert len(truth) == n and len({d["variant"] for d in truth}) > 1

    with RunningCollector(options(broker, ns), db, duration_s=120, name="t"):
        with MqttSession(options(broker, ns)) as s:
            # Devices publish while the collector runs; each slice (80 messages) fits the broker's queue.
            publish_fleet(
                s, signed, statuses, reports, between=lambda k: wait_for(lambda: count(db, "reports") == k)
            )
        wait_for(lambda: count(db, "statuses") == n and count(db, "manifests") == 1)

        common = ["--model", MODEL, "--policy", str(policy)]
        # The broker-read path on the same broker reports the cut ...
        assert cli.main(["select", *common, "--from-broker", *broker_args(broker, ns), "--json"]) == 2
        assert "looks cut" in capsys.readouterr().err
        # ... the store decides every device, exactly as the ground truth.
        assert cli.main(["select", *common, "--db", str(db), "--json"]) == 0
        assert json.loads(capsys.readouterr().out) == truth

        # assign --db publishes the signed decisions; the collector stores them as well.
        assign = ["assign", *common, "--db", str(db), "--key", str(key_pair.private_path)]
        assert cli.main([*assign, *broker_args(broker, ns)]) == 0
        assert f"assigned {n}," in capsys.readouterr().err
        wait_for(lambda: count(db, "assignments") == n)
        stored = state_from_store(db, MODEL, trusted_keys(key))
        assert stored.manifests[MODEL].version == 1 and stored.cut == []
        chosen = {d["device"]: d["variant"] for d in truth}
        assert {dev: a.variant for (dev, _), a in stored.assignments.items()} == chosen
        for (_, _), a in list(stored.assignments.items())[:5]:
            wire.verify_signed(wire.Assignment, a.to_json(), trusted_keys(key))

        # Re-running from the store sees its own assignments: nothing is published again.
        assert cli.main([*assign, *broker_args(broker, ns)]) == 0
        assert f"assigned 0, unchanged {n}" in capsys.readouterr().err

        assert cli.main(["fleet", "--db", str(db), "--model", MODEL, "--json"]) == 0
        rows = json.loads(capsys.readouterr().out)
        assert len(rows) == n
        assert {r["device"]: r["assigned"] for r in rows} == chosen
