"""Staged rollouts and signed commands against a real, private mosquitto, with fake devices.

Each fake device is a paho client that publishes a retained Status (Last Will: offline) and Report as
the agent would, and answers assignments (commit, or roll back as a failed health check would) and
commands (ping, rollback) on the wire. The controller runs through the ``edgefleet`` CLI.
"""

from __future__ import annotations

import itertools
import json
import os
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import paho.mqtt.client as paho
import pytest
from broker_helpers import read_store
from paho.mqtt.enums import CallbackAPIVersion
from test_deploy import make_manifest, make_report, make_variant, ok_result

from agent import wire
from deploy import cli
from deploy.broker.client import BrokerOptions, MqttSession
from deploy.broker.spawn import MosquittoBroker, find_mosquitto
from deploy.control.rollout import Outcome, Role, RolloutState, RolloutStore
from deploy.keys import init_keys, load_signing_key, trusted_keys

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(find_mosquitto() is None, reason="mosquitto is not installed"),
]
ROOT = Path(__file__).resolve().parent.parent
MODEL = "digits"
_ns = itertools.count()


@pytest.fixture(scope="module")
def broker() -> Iterator[MosquittoBroker]:
    with MosquittoBroker() as b:
        yield b


@pytest.fixture
def ns() -> str:
    return f"ro{os.getpid()}x{next(_ns)}"


def manifest() -> wire.Manifest:
    return make_manifest(
        [
            make_variant("fp32", b"a" * 300, 0.97),
            make_variant("fp16", b"b" * 200, 0.97),
            make_variant("int8", b"c" * 100, 0.95),
        ],
        model=MODEL,
        version=1,
    )


class FakeDevice:
    """A paho client speaking the device side of the contract, with a scripted health check."""

    def __init__(
        self,
        broker: MosquittoBroker,
        ns: str,
        name: str,
        m: wire.Manifest,
        trusted: dict[str, Any],
        behaviour: str = "commit",
        delay_s: float = 0.0,
    ) -> None:
        self.name, self.m, self.trusted = name, m, trusted
        self.behaviour, self.delay_s = behaviour, delay_s
        self.t = wire.Topics(ns)
        base = m.variant("fp32")
        self.active: wire.ActiveVariant | None = wire.ActiveVariant(
            variant=base.id, sha256=base.sha256, manifest_version=m.version, activated_at=1.0
        )
        self.previous: wire.ActiveVariant | None = None
        self.state = wire.ModelState.COMMITTED
        self.assignments: list[wire.Assignment] = []
        self.commands: list[wire.Command] = []
        self.lock = threading.Lock()
        self.c = paho.Client(CallbackAPIVersion.VERSION2, client_id=f"fake-{ns}-{name}", protocol=paho.MQTTv5)
        offline = wire.Status(device=name, online=False, ts=wire.now())
        self.c.will_set(self.t.status(name), offline.to_json(), qos=1, retain=True)
        self.c.on_connect = self._on_connect
        self.c.on_message = self._on_message
        self.ready = threading.Event()
        self.c.connect(broker.host, broker.port)
        self.c.loop_start()
        assert self.ready.wait(5)
        results = [ok_result(v, 10.0 - i) for i, v in enumerate(m.variants)]
        report = make_report(name, m, results, ts=wire.now())
        self.c.publish(self.t.report(name, MODEL), report.to_json(), qos=1, retain=True).wait_for_publish(5)
        self.publish_status()

    def _on_connect(self, c: paho.Client, u: Any, f: Any, rc: Any, p: Any) -> None:
        c.subscribe([(self.t.device_assignments(self.name), 1), (self.t.cmd(self.name), 1)])
        self.ready.set()

    def publish_status(self, detail: str | None = None) -> None:
        st = wire.Status(
            device=self.name,
            online=True,
            ts=wire.now(),
            board="fake",
            models={
                MODEL: wire.ModelStatus(
                    state=self.state, manifest_version=self.m.version, active=self.active, detail=detail
                )
            },
        )
        self.c.publish(self.t.status(self.name), st.to_json(), qos=1, retain=True)
        self.last_status_ts = st.ts

    def event(self, kind: wire.EventKind, **kw: Any) -> None:
        ev = wire.Event(device=self.name, ts=wire.now(), kind=kind, **kw)
        self.c.publish(self.t.events(self.name), ev.to_json(), qos=1)

    def _on_message(self, c: paho.Client, u: Any, msg: paho.MQTTMessage) -> None:
        if msg.topic == self.t.cmd(self.name):
            self._on_command(wire.verify_signed(wire.Command, msg.payload, self.trusted))
            return
        if not msg.payload:
            return  # a cleared assignment: the agent ignores it
        a = wire.verify_signed(wire.Assignment, msg.payload, self.trusted)
        with self.lock:
            self.assignments.append(a)
        if self.active is not None and a.sha256 == self.active.sha256:
            self.state = wire.ModelState.COMMITTED  # e.g. the previous assignment, restored
            self.publish_status()
            return
        if self.delay_s:
            threading.Timer(self.delay_s, self._apply, args=(a,)).start()
        else:
            self._apply(a)

    def _apply(self, a: wire.Assignment) -> None:
        target = wire.ActiveVariant(
            variant=a.variant, sha256=a.sha256, manifest_version=a.manifest_version, activated_at=wire.now()
        )
        if self.behaviour == "commit":
            self.previous, self.active, self.state = self.active, target, wire.ModelState.COMMITTED
            self.event(wire.EventKind.COMMITTED, model=MODEL, variant=a.variant, sha256=a.sha256)
            self.publish_status()
        else:
            self.state = wire.ModelState.ROLLED_BACK
            self.event(
                wire.EventKind.ROLLED_BACK,
                model=MODEL,
                variant=a.variant,
                sha256=a.sha256,
                reason=wire.ReasonCode.HEALTH_CHECK_FAILED,
                detail="health check failed: NaN in the output",
            )
            self.publish_status("health check failed")

    def _on_command(self, cmd: wire.Command) -> None:
        with self.lock:
            self.commands.append(cmd)
        if cmd.action is wire.CommandAction.PING:
            self.event(wire.EventKind.PONG, correlation_id=cmd.id, detail="fake agent")
        elif cmd.action is wire.CommandAction.ROLLBACK:
            if self.previous is None:
                self.event(
                    wire.EventKind.REJECTED,
                    model=cmd.model,
                    reason=wire.ReasonCode.NO_PREVIOUS,
                    detail="nothing to roll back to",
                    correlation_id=cmd.id,
                )
                return
            failed, self.active, self.previous = self.active, self.previous, None
            self.state = wire.ModelState.ROLLED_BACK
            assert failed is not None
            self.event(
                wire.EventKind.ROLLED_BACK,
                model=MODEL,
                variant=failed.variant,
                sha256=failed.sha256,
                reason=wire.ReasonCode.COMMAND,
                correlation_id=cmd.id,
            )
            self.publish_status("rollback command")

    def close(self) -> None:
        self.c.disconnect()
        self.c.loop_stop()


class Fleet:
    """The fake devices, the signing key and the rollout database; ``source`` is where the rollout plans
    from: "store" (a collector runs beside the fleet and the rollout gets --db) or "broker"."""

    def __init__(self, broker: MosquittoBroker, ns: str, tmp_path: Path, source: str = "broker") -> None:
        self.broker, self.ns, self.tmp = broker, ns, tmp_path
        self.source = source
        self.store_db = tmp_path / "fleet.db"
        self.collector: Any = None
        self.key_path = init_keys(tmp_path / "keys").private_path
        self.key = load_signing_key(self.key_path)
        self.trusted = trusted_keys(self.key)
        self.m = manifest()
        self.db = tmp_path / "rollouts.db"
        self.devices: dict[str, FakeDevice] = {}
        with self.session() as s:
            s.publish(s.topics.manifest(MODEL), wire.sign(self.m, self.key).to_json(), retain=True)
            s.flush()

    def session(self) -> MqttSession:
        return MqttSession(BrokerOptions(host=self.broker.host, port=self.broker.port, namespace=self.ns))

    def add(self, name: str, behaviour: str = "commit", delay_s: float = 0.0) -> FakeDevice:
        dev = FakeDevice(self.broker, self.ns, name, self.m, self.trusted, behaviour, delay_s)
        self.devices[name] = dev
        return dev

    def args(self) -> list[str]:
        return [
            "--host",
            self.broker.host,
            "--port",
            str(self.broker.port),
            "--namespace",
            self.ns,
            "--key",
            str(self.key_path),
            "--state-db",
            str(self.db),
        ]

    def rollout_args(self) -> list[str]:
        """:meth:`args` plus where the plan reads the fleet (:meth:`where`)."""
        return [*self.args(), *self.where()]

    def where(self) -> list[str]:
        """Where the commands read the fleet: ``--from-broker``, or ``--db`` once the collector has
        stored every device's latest status and its report (what an operator's store would hold)."""
        if self.source == "broker":
            return ["--from-broker"]
        if self.collector is None:
            from broker_helpers import RunningCollector

            options = BrokerOptions(host=self.broker.host, port=self.broker.port, namespace=self.ns)
            self.collector = RunningCollector(options, self.store_db, name="fixture").__enter__()
        self.synced()
        return ["--db", str(self.store_db)]

    def synced(self, timeout_s: float = 15.0) -> None:
        deadline = time.monotonic() + timeout_s
        behind: list[str] = list(self.devices)
        while time.monotonic() < deadline:
            latest = read_store(self.store_db, lambda s: (s.latest_statuses(), s.latest_reports(MODEL)))
            if latest is not None:
                statuses, reports = latest
                behind = [
                    name
                    for name, d in self.devices.items()
                    if name not in reports or name not in statuses or statuses[name].ts < d.last_status_ts
                ]
                if not behind:
                    return
            time.sleep(0.1)
        raise AssertionError(f"the collector has not stored the latest status/report of {behind}")

    def retained(self, topic: str) -> bytes | None:
        with self.session() as s:
            return s.collect_retained([topic], quiet_s=0.2).get(topic)

    def close(self) -> None:
        if self.collector is not None:
            self.collector.__exit__(None, None, None)
        for d in self.devices.values():
            d.close()


@pytest.fixture(params=["store", "broker"])
def fleet(
    broker: MosquittoBroker, ns: str, tmp_path: Path, request: pytest.FixtureRequest
) -> Iterator[Fleet]:
    f = Fleet(broker, ns, tmp_path, source=request.param)
    yield f
    f.close()


def test_rollout_over_ten_devices_completes(fleet: Fleet, capsys: pytest.CaptureFixture[str]) -> None:
    for i in range(10):
        fleet.add(f"pi-{i:02d}")
    started = time.monotonic()
    code = cli.main(
        ["rollout", MODEL, "--canary", "2", "--wait", "--timeout", "30", "--json", *fleet.rollout_args()]
    )
    elapsed = time.monotonic() - started
    out = capsys.readouterr()
    assert code == 0, out.err
    summary = json.loads(out.out)
    assert summary["state"] == "completed"
    assert [t["to"] for t in summary["transitions"]] == [
        "planned",
        "canary_assigned",
        "canary_committed",
        "rolling_out",
        "completed",
    ]
    canaries = [d["device"] for d in summary["devices"] if d["role"] == "canary"]
    assert canaries == ["pi-00", "pi-01"]
    for d in summary["devices"]:
        assert d["outcome"] == "committed"
    for dev in fleet.devices.values():
        assert [a.rollout for a in dev.assignments] == [summary["id"]]
        assert dev.active is not None and dev.active.variant == "fp16"
    # Canaries were assigned before any other device.
    with RolloutStore(fleet.db) as store:
        rows = store.devices(summary["id"])
    last_canary = max(d.assigned_at or 0 for d in rows if d.role is Role.CANARY)
    assert all((d.assigned_at or 0) >= last_canary for d in rows if d.role is Role.REST)
    print(f"\nrollout of 10 fake devices, 2 canaries: {elapsed:.2f} s end to end", file=sys.stderr)
    assert elapsed < 20

    # Status is read from the database only; a second run has nothing left to do.
    assert cli.main(["rollout", "status", MODEL, "--state-db", str(fleet.db)]) == 0
    text = capsys.readouterr().out
    assert "completed" in text and "pi-09" in text and "canary" in text
    assert cli.main(["rollout", MODEL, *fleet.rollout_args()]) == 0
    assert "nothing to roll out" in capsys.readouterr().out

    # The fleet view shows the rollout id of each device's assignment; plot and report read the same source.
    broker_args = [*fleet.args()[:6], *fleet.where()]
    assert cli.main(["fleet", "--json", *broker_args]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert {(r["active"], r["rollout"]) for r in rows} == {("fp16", summary["id"])}
    png = fleet.tmp / "digits.png"
    assert cli.main(["plot", MODEL, "--out", str(png), *broker_args]) == 0
    assert png.read_bytes()[:4] == b"\x89PNG"
    assert cli.main(["report", "pi-03", *broker_args]) == 0
    assert "fp16 *" in capsys.readouterr().out


def test_canary_rollback_halts_restores_and_spares_the_rest(
    fleet: Fleet, capsys: pytest.CaptureFixture[str]
) -> None:
    good = fleet.add("pi-00")
    fleet.add("pi-01", "rollback", delay_s=0.3)
    rest = [fleet.add(f"pi-{i:02d}") for i in range(2, 6)]
    # pi-00 had an assignment before; pi-01 had none.
    old = wire.sign(
        wire.Assignment(
            device="pi-00",
            model=MODEL,
            variant="fp32",
            sha256=fleet.m.variant("fp32").sha256,
            manifest_version=1,
            issued_at=1.0,
            policy="before",
        ),
        fleet.key,
    ).to_json()
    with fleet.session() as s:
        s.publish(s.topics.assign("pi-00", MODEL), old, retain=True)
        s.flush()
    deadline = time.monotonic() + 5
    while not good.assignments and time.monotonic() < deadline:
        time.sleep(0.02)
    good.assignments.clear()

    code = cli.main(
        ["rollout", MODEL, "--canary", "2", "--wait", "--timeout", "20", "--json", *fleet.rollout_args()]
    )
    out = capsys.readouterr()
    assert code == 2, out.err
    summary = json.loads(out.out)
    assert summary["state"] == "halted" and "canary pi-01 rolled back" in summary["reason"]
    assert "halted" in out.err
    t = wire.Topics(fleet.ns)
    assert fleet.retained(t.assign("pi-00", MODEL)) == old  # restored byte for byte
    assert fleet.retained(t.assign("pi-01", MODEL)) is None  # cleared
    deadline = time.monotonic() + 5
    while (good.active is None or good.active.variant != "fp32") and time.monotonic() < deadline:
        time.sleep(0.02)
    assert good.active is not None and good.active.variant == "fp32"  # rolled back by command
    assert [c.action for c in good.commands] == [wire.CommandAction.ROLLBACK]
    for dev in rest:
        assert dev.assignments == [], dev.name
        assert fleet.retained(t.assign(dev.name, MODEL)) is None
    by = {d["device"]: d for d in summary["devices"]}
    assert by["pi-01"]["outcome"] == "rolled_back"
    assert by["pi-00"]["restored"].endswith("previous assignment republished")
    assert all(by[d.name]["assigned_at"] is None for d in rest)


def test_controller_killed_mid_rollout_resumes(fleet: Fleet, capsys: pytest.CaptureFixture[str]) -> None:
    for i in range(2):
        fleet.add(f"pi-{i:02d}", delay_s=1.5)  # slow canaries: the controller is killed while it waits
    for i in range(2, 6):
        fleet.add(f"pi-{i:02d}")
    cmd = [sys.executable, "-m", "deploy", "rollout", MODEL, "--canary", "2", "--wait", *fleet.rollout_args()]
    proc = subprocess.Popen(
        cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True
    )
    try:
        deadline = time.monotonic() + 15
        state = None
        while time.monotonic() < deadline:
            if fleet.db.exists():
                with sqlite3.connect(fleet.db) as c:
                    row = c.execute("SELECT state FROM rollouts").fetchone() if _has_table(c) else None
                state = row[0] if row else None
                if state == "canary_assigned":
                    break
            time.sleep(0.02)
        assert state == "canary_assigned", proc.stderr.read().decode() if proc.poll() is not None else state
        os.kill(proc.pid, signal.SIGKILL)  # our own child, by pid
        proc.wait(5)
    finally:
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait(5)
        if proc.stderr is not None:
            proc.stderr.close()

    code = cli.main(
        ["rollout", MODEL, "--resume", "--wait", "--timeout", "20", "--json", *fleet.rollout_args()]
    )
    out = capsys.readouterr()
    assert code == 0, out.err
    assert "resuming rollout" in out.err
    summary = json.loads(out.out)
    assert summary["state"] == "completed"
    with RolloutStore(fleet.db) as store:
        rows = store.devices(summary["id"])
    assert all(d.outcome is Outcome.COMMITTED for d in rows)
    for dev in fleet.devices.values():
        assert dev.active is not None and dev.active.variant == "fp16"
        assert {a.rollout for a in dev.assignments} == {summary["id"]}
    with RolloutStore(fleet.db) as store:
        assert store.latest(MODEL).state is RolloutState.COMPLETED  # type: ignore[union-attr]


def _has_table(c: sqlite3.Connection) -> bool:
    return c.execute("SELECT 1 FROM sqlite_master WHERE name = 'rollouts'").fetchone() is not None


def test_cmd_ping_and_rollback_wait_for_the_answer(fleet: Fleet, capsys: pytest.CaptureFixture[str]) -> None:
    fleet.add("pi-00")
    base = fleet.args()[:-2]  # no --state-db for cmd
    assert cli.main(["cmd", "pi-00", "ping", "--wait", "5", *base]) == 0
    ev = json.loads(capsys.readouterr().out)
    assert ev["kind"] == "pong" and ev["device"] == "pi-00" and ev["correlation_id"].startswith("cmd-")
    # Nothing to roll back to: the device refuses; the answer is printed, exit 2.
    assert cli.main(["cmd", "pi-00", "rollback", "--model", MODEL, "--wait", "5", *base]) == 2
    out = capsys.readouterr()
    assert json.loads(out.out)["reason"] == "NO_PREVIOUS" and "refused rollback" in out.err
    assert cli.main(["cmd", "pi-00", "rollback", *base]) == 1  # usage: needs --model
    assert cli.main(["cmd", "pi-99", "ping", "--wait", "0.5", *base]) == 2
    assert "pi-99 did not answer ping" in capsys.readouterr().err
    assert cli.main(["cmd", "pi-00", "rebenchmark", "--model", MODEL, *base]) == 0
    assert json.loads(capsys.readouterr().out)["action"] == "rebenchmark"
    assert fleet.retained(wire.Topics(fleet.ns).cmd("pi-00")) is None  # commands are not retained


def test_rollout_plans_from_the_collectors_store(fleet: Fleet, capsys: pytest.CaptureFixture[str]) -> None:
    """With --db the rollout decides on what the collector stored: a device the store has not seen (it
    appeared after the collector stopped) is not in the plan, while --from-broker sees it."""
    from broker_helpers import RunningCollector

    db = fleet.tmp / "fleet.db"
    options = BrokerOptions(host=fleet.broker.host, port=fleet.broker.port, namespace=fleet.ns)
    from deploy.observe.store import FleetStore

    def stored_reports() -> int:
        if not db.exists():
            return 0
        with FleetStore(db, readonly=True) as store:
            return store.counts()["reports"]

    with RunningCollector(options, db):
        for i in range(3):
            fleet.add(f"pi-{i:02d}")
        deadline = time.monotonic() + 15
        while stored_reports() < 3 and time.monotonic() < deadline:
            time.sleep(0.2)
    assert stored_reports() == 3
    fleet.add("pi-late")  # on the broker only
    args = fleet.args()
    run = ["rollout", MODEL, "--canary", "1", "--wait", "--timeout", "30", "--json"]
    assert cli.main([*run, "--db", str(db), *args]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["state"] == "completed"
    assert sorted(d["device"] for d in summary["devices"]) == ["pi-00", "pi-01", "pi-02"]
    assert fleet.devices["pi-late"].assignments == []
    # the broker's burst has the late device; the stored ones already run the variant
    assert cli.main([*run, "--from-broker", *args]) == 0
    again = json.loads(capsys.readouterr().out)
    assert [d["device"] for d in again["devices"]] == ["pi-late"]
