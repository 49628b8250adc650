"""The controller, unit level: the pure decision step (initial assignments, staged rollouts, hysteresis,
quarantine, modes, rate limits, bad input), its journal on a real SQLite store, the leader lock, and one
tick of the loop against a fake bus."""

from __future__ import annotations

import contextlib
import shutil
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from test_deploy import make_manifest, make_report, make_status, make_variant, ok_result
from test_rollout import FakeBus, FakeClock

from agent import wire
from deploy.control.controller import Controller, LeaderLock
from deploy.control.controller_journal import Journal, JournalError, summary_lines
from deploy.control.controller_policy import (
    AdvanceRollout,
    AssignAction,
    Assigned,
    ControllerPolicy,
    HealthFailure,
    Memory,
    Note,
    Propose,
    QuarantineAction,
    RolloutView,
    Snapshot,
    StartRollout,
    Withdraw,
    decide,
    load_controller_policy,
)
from deploy.errors import PolicyError
from deploy.observe.state import FleetState
from deploy.observe.store import FleetStore

MODEL = "digits"
NOW = 10_000.0
FP32 = make_variant("fp32", b"a" * 300, 0.90)
INT8 = make_variant("int8", b"b" * 100, 0.95, "int8")
MANIFEST = make_manifest([FP32, INT8], version=2)


def policy(**kw: object) -> ControllerPolicy:
    base: dict[str, object] = {"limits": {"max_changing_share": 1.0}}
    base.update(kw)
    return ControllerPolicy.model_validate(base)


def report(device: str, ts: float = NOW - 10, int8_ok: bool = True, **int8: object) -> wire.Report:
    r8 = ok_result(INT8, 5.0) if int8_ok else None
    if r8 is not None and int8:
        r8 = r8.model_copy(update=int8)
    results = [ok_result(FP32, 10.0)] + ([r8] if r8 is not None else [])
    return make_report(device, MANIFEST, results, ts=ts)


def assignment(
    device: str, variant: wire.Variant, version: int, issued_at: float = NOW - 1000
) -> wire.Assignment:
    return wire.Assignment(
        device=device,
        model=MODEL,
        variant=variant.id,
        sha256=variant.sha256,
        manifest_version=version,
        issued_at=issued_at,
        policy="p",
    )


def fleet(
    devices: list[str],
    assigned: dict[str, wire.Assignment] | None = None,
    reports: dict[str, wire.Report] | None = None,
    statuses: list[str] | None = None,
) -> FleetState:
    state = FleetState()
    state.manifests[MODEL] = MANIFEST
    for d in statuses if statuses is not None else devices:
        state.statuses[d] = make_status(d, manifest=MANIFEST)
    for d in devices:
        state.reports[(d, MODEL)] = (reports or {}).get(d) or report(d)
    for d, a in (assigned or {}).items():
        state.assignments[(d, MODEL)] = a
    return state


def snap(state: FleetState, failures: tuple[HealthFailure, ...] = (), now: float = NOW) -> Snapshot:
    return Snapshot(now, state, failures)


# ------------------------------------------------------------------------------------------ decide


def test_a_device_without_assignment_gets_its_best_variant() -> None:
    out = decide(snap(fleet(["pi-1", "pi-2"])), Memory(), policy())
    assigns = out.of(AssignAction)
    assert [(a.decision.device, a.decision.variant, a.kind) for a in assigns] == [
        ("pi-1", "int8", "initial"),
        ("pi-2", "int8", "initial"),
    ]
    assert "no assignment" in assigns[0].why


def test_bad_input_is_noted_and_never_assigned() -> None:
    # a report from a device with no status, and a variant whose only result is contended
    state = fleet(["pi-1", "ghost"], statuses=["pi-1"], reports={"pi-1": report("pi-1", contended=True)})
    out = decide(snap(state), Memory(), policy())
    notes = [n.why for n in out.of(Note)]
    assert any("no status" in n for n in notes), notes
    # select ranks only on results it accepts: fp32 wins when int8 is contended (select's constraint),
    # or the controller's own guard refuses int8: either way int8 is never assigned
    assert all(a.decision.variant != "int8" for a in out.of(AssignAction))
    assert all(a.decision.device != "ghost" for a in out.of(AssignAction))


def test_contended_or_failed_health_files_are_refused_by_the_guard() -> None:
    from deploy.control.controller_policy import unsafe_reason
    from deploy.control.select import Policy, select

    rep = report("pi-1")
    d = select(MANIFEST, {"pi-1": rep}, {}, Policy())[0]
    assert d.variant == "int8"
    assert unsafe_reason(d, rep, frozenset()) is None
    assert "health check" in (unsafe_reason(d, rep, frozenset({INT8.sha256})) or "")
    contended = report("pi-1", contended=True)
    assert "contended" in (unsafe_reason(d, contended, frozenset()) or "")
    missing = report("pi-1", int8_ok=False)
    assert "not benchmarked" in (unsafe_reason(d, missing, frozenset()) or "")


def test_unsatisfiable_policy_is_a_note_not_an_assignment() -> None:
    p = policy(selection={"default": {"objective": "metric", "rank_metric": "miou"}})
    out = decide(snap(fleet(["pi-1"])), Memory(), p)
    assert not out.of(AssignAction)
    assert any("policy" in n.why for n in out.of(Note))


def test_new_version_rolls_out_once_every_online_device_reported() -> None:
    old = {d: assignment(d, FP32, 1) for d in ("pi-1", "pi-2")}
    state = fleet(["pi-1"], assigned=old, statuses=["pi-1", "pi-2"])
    memory = Memory(first_seen={(MODEL, 2): NOW - 5})
    out = decide(snap(state), memory, policy())
    assert not out.of(StartRollout)  # pi-2 is online and has not reported on v2 yet
    state.reports[("pi-2", MODEL)] = report("pi-2")
    out = decide(snap(state), memory, policy())
    (start,) = out.of(StartRollout)
    assert (start.model, start.manifest_version, start.devices) == (MODEL, 2, ("pi-1", "pi-2"))
    # or after report_wait_s without the silent one
    del state.reports[("pi-2", MODEL)]
    late = Memory(first_seen={(MODEL, 2): NOW - 500})
    (start,) = decide(snap(state), late, policy(rollout={"report_wait_s": 60})).of(StartRollout)
    assert start.devices == ("pi-1",) and "had not reported" in start.why


def test_newcomers_wait_for_the_canaries_then_late_reporters_catch_up() -> None:
    old = {"pi-1": assignment("pi-1", FP32, 1)}
    state = fleet(["pi-1", "pi-new"], assigned=old)
    in_flight = RolloutView("r1", MODEL, 2, "canary_assigned", frozenset({"pi-1"}))
    out = decide(snap(state), Memory(rollouts={(MODEL, 2): in_flight}), policy())
    assert not out.of(AssignAction) and not out.of(StartRollout)
    (adv,) = out.of(AdvanceRollout)
    assert adv.rollout == "r1" and adv.assign_limit > 0
    # completed: the newcomer gets v2 directly; a device that was not in the rollout catches up
    state.assignments[("pi-late", MODEL)] = assignment("pi-late", FP32, 1)
    state.statuses["pi-late"] = make_status("pi-late", manifest=MANIFEST)
    state.reports[("pi-late", MODEL)] = report("pi-late")
    done = RolloutView("r1", MODEL, 2, "completed", frozenset({"pi-1"}))
    out = decide(snap(state), Memory(rollouts={(MODEL, 2): done}), policy())
    kinds = {a.decision.device: a.kind for a in out.of(AssignAction)}
    assert kinds == {"pi-new": "initial", "pi-late": "catch-up"}


def test_a_device_whose_health_check_failed_on_the_file_is_left_out_of_its_rollout() -> None:
    old = {d: assignment(d, FP32, 1) for d in ("pi-1", "pi-2")}
    state = fleet(["pi-1", "pi-2"], assigned=old)
    failed = (HealthFailure("pi-1", MODEL, INT8.sha256, "int8", NOW - 50),)
    out = decide(snap(state, failed), Memory(), policy())
    (start,) = out.of(StartRollout)
    assert start.devices == ("pi-2",)
    assert any(n.device == "pi-1" and "failed its health check" in n.why for n in out.of(Note))
    # the only device concerned is left out: nothing to roll out, newcomers are not held back
    state = fleet(["pi-1", "pi-new"], assigned={"pi-1": assignment("pi-1", FP32, 1)})
    out = decide(snap(state, failed), Memory(), policy())
    assert not out.of(StartRollout)
    assert [a.decision.device for a in out.of(AssignAction)] == ["pi-new"]


def test_contended_results_are_assigned_only_when_the_policy_opts_out() -> None:
    state = fleet(["pi-1"], reports={"pi-1": report("pi-1", contended=True)})
    state.reports[("pi-1", MODEL)] = state.reports[("pi-1", MODEL)].model_copy(
        update={
            "results": [
                r.model_copy(update={"contended": True}) for r in state.reports[("pi-1", MODEL)].results
            ]
        }
    )
    out = decide(snap(state), Memory(), policy())
    assert not out.of(AssignAction)
    assert any("contended" in n.why for n in out.of(Note))
    lax = policy(selection={"default": {"reject_contended": False}})
    (a,) = decide(snap(state), Memory(), lax).of(AssignAction)
    assert a.decision.variant == "int8"


def test_a_halted_version_is_assigned_to_no_one() -> None:
    state = fleet(["pi-1", "pi-new"], assigned={"pi-1": assignment("pi-1", FP32, 1)})
    halted = RolloutView("r1", MODEL, 2, "halted", frozenset({"pi-1"}))
    out = decide(snap(state), Memory(rollouts={(MODEL, 2): halted}), policy())
    assert not out.of(AssignAction) and not out.of(StartRollout)
    assert any("halted" in n.why for n in out.of(Note))


def test_hysteresis_margin_interval_and_newer_report() -> None:
    # assigned fp32 at v2; int8 is 5 points more accurate (0.95 vs 0.90)
    a = assignment("pi-1", FP32, 2, issued_at=NOW - 1000)
    state = fleet(["pi-1"], assigned={"pi-1": a})
    out = decide(snap(state), Memory(), policy(hysteresis={"min_improvement": 0.04, "min_interval_s": 60}))
    (re,) = out.of(AssignAction)
    assert re.kind == "reassign" and re.decision.variant == "int8" and "gain 0.05" in re.why
    # below the margin: nothing
    assert not decide(snap(state), Memory(), policy(hysteresis={"min_improvement": 0.2})).of(AssignAction)
    # too soon after the last assignment: nothing
    soon = policy(hysteresis={"min_improvement": 0.0, "min_interval_s": 5000})
    assert not decide(snap(state), Memory(), soon).of(AssignAction)
    # no report since the assignment: nothing
    state.reports[("pi-1", MODEL)] = report("pi-1", ts=NOW - 2000)
    assert not decide(snap(state), Memory(), policy(hysteresis={"min_improvement": 0.0})).of(AssignAction)


def test_latency_objective_uses_relative_gain() -> None:
    a = assignment("pi-1", FP32, 2, issued_at=NOW - 1000)
    state = fleet(["pi-1"], assigned={"pi-1": a})
    sel = {"default": {"objective": "latency"}}
    (re,) = decide(snap(state), Memory(), policy(selection=sel, hysteresis={"min_improvement": 0.4})).of(
        AssignAction
    )
    assert "gain 0.5" in re.why  # 10 ms -> 5 ms
    assert not decide(snap(state), Memory(), policy(selection=sel, hysteresis={"min_improvement": 0.6})).of(
        AssignAction
    )


def test_quarantine_after_failures_on_different_files() -> None:
    state = fleet(["pi-1", "pi-2"])
    one = (HealthFailure("pi-1", MODEL, INT8.sha256, "int8", NOW - 50),)
    out = decide(snap(state, one), Memory(), policy())
    assert not out.of(QuarantineAction)
    assert {a.decision.device for a in out.of(AssignAction)} == {"pi-2"}  # never int8 again on pi-1
    two = (*one, HealthFailure("pi-1", MODEL, FP32.sha256, "fp32", NOW - 40))
    out = decide(snap(state, two), Memory(), policy())
    (q,) = out.of(QuarantineAction)
    assert (q.device, q.model) == ("pi-1", MODEL) and "2 different files" in q.why
    assert {a.decision.device for a in out.of(AssignAction)} == {"pi-2"}
    # once quarantined: no action for it at all
    out = decide(snap(state, two), Memory(quarantined=frozenset({("pi-1", MODEL)})), policy())
    assert not out.of(QuarantineAction)


def test_modes_approve_manual_and_pause() -> None:
    state = fleet(["pi-1"])
    approve = policy(modes={MODEL: "approve"})
    out = decide(snap(state), Memory(), approve)
    (prop,) = out.of(Propose)
    assert not out.of(AssignAction)
    key = prop.key
    assert key == "assign:digits:pi-1:v2:int8"
    assert not decide(snap(state), Memory(pending=frozenset({key})), approve).actions  # still pending
    (a,) = decide(snap(state), Memory(approved=frozenset({key})), approve).of(AssignAction)
    assert a.key == key
    # a proposal the controller no longer makes is withdrawn
    stale = "assign:digits:pi-1:v1:fp32"
    (w,) = decide(snap(state), Memory(pending=frozenset({key, stale})), approve).of(Withdraw)
    assert w.key == stale
    assert not decide(snap(state), Memory(), policy(default_mode="manual")).actions
    assert not decide(snap(state), Memory(mode_overrides={MODEL: "manual"}), policy()).actions
    assert not decide(snap(state), Memory(paused=True), policy()).actions
    assert not decide(snap(state), Memory(paused_models=frozenset({MODEL})), policy()).actions


def test_rate_limits_defer_what_they_hold_back() -> None:
    devices = [f"pi-{i}" for i in range(10)]
    state = fleet(devices)
    out = decide(
        snap(state), Memory(), policy(limits={"assignments_per_minute": 3, "max_changing_share": 1.0})
    )
    assert len(out.of(AssignAction)) == 3 and out.deferred == 7
    recent = (NOW - 10, NOW - 20)  # two in the last minute, one long ago
    out = decide(
        snap(state),
        Memory(recent_assignments=(*recent, NOW - 100)),
        policy(limits={"assignments_per_minute": 3, "max_changing_share": 1.0}),
    )
    assert len(out.of(AssignAction)) == 1
    # share of the fleet changing at once: 20 % of 10 devices = 2, one of them already changing
    changing = {("pi-0", MODEL): Assigned("int8", INT8.sha256, 2, NOW - 5)}
    out = decide(snap(state), Memory(applied=changing), policy(limits={"max_changing_share": 0.2}))
    assert len(out.of(AssignAction)) == 1 and out.deferred == 8


def test_controller_policy_errors_name_the_key(tmp_path: Path) -> None:
    bad = tmp_path / "c.toml"
    bad.write_text('default_mode = "yolo"\n')
    with pytest.raises(PolicyError, match="default_mode"):
        load_controller_policy(bad)
    bad.write_text("[limits]\nassignments_per_minut = 3\n")
    with pytest.raises(PolicyError, match="assignments_per_minut"):
        load_controller_policy(bad)
    bad.write_text('[selection.default]\nobjective = "speed"\n')
    with pytest.raises(PolicyError):
        load_controller_policy(bad)
    good = tmp_path / "ok.toml"
    good.write_text(
        '[modes]\ndigits = "approve"\n[rollout]\ncanaries = 2\n[selection.default]\nmax_p95_ms = 50\n'
    )
    p = load_controller_policy(good)
    assert p.mode_for("digits", {}) == "approve" and p.rollout.canaries == 2


# ------------------------------------------------------------------------------------------ journal


def test_journal_round_trip(store_url: str, tmp_path: Path) -> None:
    db = store_url  # an SQLite file, then a throwaway PostgreSQL database
    with Journal(db) as j:
        j.record("assign", "assign:digits:pi-1:v2:int8", "applied", "initial", "c1", MODEL, "pi-1", "int8",
                 INT8.sha256, 2, issued_at=NOW - 5, at=NOW - 5)  # fmt: skip
        j.record("assign", "assign:digits:pi-2:v2:int8", "proposed", "initial", "c1", MODEL, "pi-2", at=NOW)
        j.record("rollout", "rollout:digits:v3", "settled", "nothing", "c1", MODEL, manifest_version=3)
        j.set_setting("paused:digits", "1")
        j.set_setting("mode:digits", "approve")
        assert j.quarantine("pi-3", MODEL, "two files", NOW) and not j.quarantine("pi-3", MODEL, "x", NOW)
        j.see_version(MODEL, 2, NOW - 100)
        j.see_version(MODEL, 2, NOW)  # the first sighting stays
        m = j.memory(NOW)
        assert m.applied[("pi-1", MODEL)] == Assigned("int8", INT8.sha256, 2, NOW - 5)
        assert m.recent_assignments == (NOW - 5,)
        assert m.pending == {"assign:digits:pi-2:v2:int8"} and not m.approved
        assert m.settled_versions == {(MODEL, 3)}
        assert m.paused_models == {MODEL} and m.mode_overrides == {MODEL: "approve"}
        assert m.quarantined == {("pi-3", MODEL)} and m.first_seen == {(MODEL, 2): NOW - 100}
        (row,) = j.approve(model=MODEL)
        assert j.memory(NOW).approved == {row.key}
        with pytest.raises(JournalError, match="no pending proposal 999"):
            j.approve([999])
        assert j.close_proposals(row.key, "done") == 1
        assert j.release("pi-3") == 1
    lines = summary_lines(db)
    assert any("paused" in ln for ln in lines) and any("assign:digits:pi-1" in ln for ln in lines)
    assert summary_lines(tmp_path / "none.db") == []


# ------------------------------------------------------------------------------------------ leader


def test_postgresql_leader_lock_is_an_advisory_lock(pg_url: str) -> None:
    from deploy.control.controller import AdvisoryLock, leader_lock

    a, b = leader_lock(pg_url), leader_lock(pg_url)
    assert isinstance(a, AdvisoryLock)
    assert not a.try_acquire("a")  # no store there yet: stand by (the collector creates it)
    FleetStore(pg_url).close()
    try:
        assert a.try_acquire("a") and a.try_acquire("a")
        assert not b.try_acquire("b")
        a.release()  # the session ends: the server drops the lock
        assert b.try_acquire("b")
    finally:
        a.release()
        b.release()


def test_leader_lock_is_exclusive_and_dies_with_its_holder(tmp_path: Path) -> None:
    db = tmp_path / "fleet.db"
    a, b = LeaderLock(db), LeaderLock(db)
    assert a.try_acquire("a") and a.try_acquire("a")
    assert not b.try_acquire("b")
    assert "a pid" in b.holder()
    a.release()
    assert b.try_acquire("b")
    b.release()
    holder = textwrap.dedent(
        f"""
        import sys, time
        from pathlib import Path
        from deploy.control.controller import LeaderLock
        lock = LeaderLock(Path({str(db)!r}))
        assert lock.try_acquire("child")
        print("locked", flush=True)
        time.sleep(60)
        """
    )
    proc = subprocess.Popen([sys.executable, "-c", holder], stdout=subprocess.PIPE)
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == b"locked"
        assert not b.try_acquire("b")
        proc.kill()  # SIGKILL: the kernel drops the lock
        proc.wait(10)
        assert b.try_acquire("b")
    finally:
        proc.kill()
        proc.wait(10)
        if proc.stdout is not None:
            proc.stdout.close()
        b.release()


# ------------------------------------------------------------------------------------------ the loop


def test_one_tick_assigns_journals_and_a_second_controller_stands_by(tmp_path: Path) -> None:
    key = Ed25519PrivateKey.generate()
    db = tmp_path / "fleet.db"
    now = time.time()
    with FleetStore(db) as store:
        store.ingest_manifest(wire.sign(MANIFEST, key))
        for d in ("pi-1", "pi-2"):
            store.ingest_status(make_status(d, manifest=MANIFEST).model_copy(update={"ts": now}))
            store.ingest_report(report(d, ts=now))
        store.ingest_report(report("ghost", ts=now))  # a report, never a status
        store.commit()
    bus = FakeBus(FakeClock())
    ctl = Controller(db, policy(), key, lambda: bus, name="c1")
    other = Controller(db, policy(), key, lambda: bus, name="c2")
    try:
        result = ctl.tick()
        assert result.role == "leader", result.error
        assert sorted(result.applied) == ["assign:digits:pi-1:v2:int8", "assign:digits:pi-2:v2:int8"]
        for d in ("pi-1", "pi-2"):
            (payload,) = bus.published_to(bus.topics.assign(d, MODEL))
            a = wire.verify_signed(
                wire.Assignment, payload, {wire.key_id_for(key.public_key()): key.public_key()}
            )
            assert (a.variant, a.manifest_version) == ("int8", 2)
        assert not bus.published_to(bus.topics.assign("ghost", MODEL))
        assert other.tick().role == "standby"
        # the collector has not stored the assignments yet: the journal keeps the controller from repeating
        assert ctl.tick().applied == []
        lines = summary_lines(db)
        assert any("no status" in ln for ln in lines), lines
    finally:
        ctl.close()
        other.close()
    # a wrongly signed manifest: a note, nothing assigned, the loop keeps going
    with FleetStore(db) as store:
        store.ingest_manifest(
            wire.sign(MANIFEST.model_copy(update={"version": 3}), Ed25519PrivateKey.generate())
        )
        store.ingest_report(report("pi-3", ts=now))
        store.ingest_status(make_status("pi-3", manifest=MANIFEST).model_copy(update={"ts": now}))
        store.commit()
    bus2 = FakeBus(FakeClock())
    ctl = Controller(db, policy(), key, lambda: bus2, name="c3")
    try:
        result = ctl.tick()
        assert result.role == "leader" and result.applied == [], result
        assert not bus2.log
        assert any("manifest ignored" in ln for ln in summary_lines(db))
    finally:
        ctl.close()


# ------------------------------------------------------------------------------------------ systemd

UNIT = Path(__file__).resolve().parent.parent / "systemd" / "edgefleet-controller.service"


def test_the_loop_notifies_systemd_ready_and_watchdog(tmp_path: Path) -> None:
    import socket

    from agent.notify import Notifier

    sock_path = tmp_path / "notify.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(str(sock_path))
        sock.settimeout(5)
        bus = FakeBus(FakeClock())
        ctl = Controller(
            tmp_path / "fleet.db",
            policy(interval_s=0.05),
            Ed25519PrivateKey.generate(),
            lambda: bus,
            notifier=Notifier(str(sock_path), min_interval_s=0.0),
        )
        assert ctl.run(max_ticks=3) == 0
        got = []
        with contextlib.suppress(TimeoutError):
            while len(got) < 8:
                got.append(sock.recv(4096).decode())
    assert got[0].startswith("READY=1"), got
    assert got.count("WATCHDOG=1") == 3 and got[-1] == "STOPPING=1", got
    assert any("STATUS=" in g and "leading" in g for g in got), got
    # no store yet: each tick said so and the loop went on; the store is the collector's to create
    assert not (tmp_path / "fleet.db").exists()
    try:
        assert "does not exist" in (ctl.tick().error or "")
    finally:
        ctl.close()


def test_unit_is_notify_with_watchdog_and_hardened_like_the_agent() -> None:
    import re

    text = UNIT.read_text()
    keys = dict(re.findall(r"^(\w+)=(.*)$", text, re.M))
    assert keys["Type"] == "notify" and int(keys["WatchdogSec"]) > 0
    assert "edgefleet controller --db" in keys["ExecStart"]
    agent = (UNIT.parent / "edgefleet-agent.service").read_text()
    hardening = [
        k for k in re.findall(r"^(Protect\w+|Restrict\w+|NoNewPrivileges|LockPersonality)=", agent, re.M)
    ]
    missing = [k for k in hardening if k not in keys]
    assert not missing, missing


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze is not installed")
def test_systemd_analyze_verify_accepts_the_unit(tmp_path: Path) -> None:
    text = UNIT.read_text()
    stub = tmp_path / "opt/edgefleet/venv/bin/edgefleet"
    stub.parent.mkdir(parents=True)
    stub.write_text("#!/bin/sh\nexit 0\n")
    stub.chmod(0o755)
    copy = tmp_path / UNIT.name
    copy.write_text(text.replace("/opt/edgefleet/venv/bin/", f"{tmp_path}/opt/edgefleet/venv/bin/"))
    proc = subprocess.run(
        ["systemd-analyze", "verify", str(copy)], capture_output=True, text=True, timeout=60, check=False
    )
    out = (proc.stdout + proc.stderr).strip()
    assert proc.returncode == 0 and not out, out


def test_the_documented_controller_policy_loads(tmp_path: Path) -> None:
    operator = (UNIT.parent.parent / "docs" / "operator.md").read_text(encoding="utf-8")
    section = operator.split("\n## Controller\n", 1)[1].split("\n## ", 1)[0]
    (text,) = [part.split("```", 1)[0] for part in section.split("```toml\n")[1:]]
    path = tmp_path / "controller.toml"
    path.write_text(text)
    p = load_controller_policy(path)
    assert p.mode_for("digits", {}) == "approve" and p.selection_policy().name == "lab"


def test_approve_pause_resume_from_the_command_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from deploy import cli

    key = Ed25519PrivateKey.generate()
    db = tmp_path / "fleet.db"
    now = time.time()
    with FleetStore(db) as store:
        store.ingest_manifest(wire.sign(MANIFEST, key))
        store.ingest_status(make_status("pi-1", manifest=MANIFEST).model_copy(update={"ts": now}))
        store.ingest_report(report("pi-1", ts=now))
        store.commit()
    bus = FakeBus(FakeClock())
    ctl = Controller(db, policy(modes={MODEL: "approve"}), key, lambda: bus, name="c1")
    try:
        assert ctl.tick().proposed == ["assign:digits:pi-1:v2:int8"]
        assert ctl.tick().proposed == []  # proposed once, then pending
        assert not bus.log
        assert cli.main(["fleet", "--db", str(db)]) == 0
        out = capsys.readouterr().out
        assert "pending proposals (1" in out and "assign:digits:pi-1:v2:int8" in out
        assert cli.main(["pause", "--db", str(db)]) == 0
        assert cli.main(["approve", "--model", MODEL, "--db", str(db)]) == 0
        assert "approved #" in capsys.readouterr().out
        assert ctl.tick().role == "paused" and not bus.log
        assert cli.main(["resume", "--db", str(db)]) == 0
        assert ctl.tick().applied == ["assign:digits:pi-1:v2:int8"]
        assert len(bus.published_to(bus.topics.assign("pi-1", MODEL))) == 1
        assert cli.main(["approve", "42", "--db", str(db)]) == 2  # no such proposal: one line, exit 2
        assert "no pending proposal 42" in capsys.readouterr().err
        assert cli.main(["approve", "--db", str(db)]) == 1  # nothing named
        assert cli.main(["resume", "--device", "pi-1", "--db", str(db)]) == 0
        assert "released pi-1" in capsys.readouterr().out
        # a mode set from the command line wins over the policy file; a bad one is a usage error
        assert cli.main(["mode", MODEL, "yolo", "--db", str(db)]) == 1
        assert cli.main(["mode", MODEL, "manual", "--db", str(db)]) == 0
        with Journal(db) as j:
            assert j.memory(time.time()).mode_overrides == {MODEL: "manual"}
        assert cli.main(["mode", MODEL, "policy", "--db", str(db)]) == 0
        with Journal(db) as j:
            assert j.memory(time.time()).mode_overrides == {}
    finally:
        ctl.close()


def test_a_rollout_on_postgresql_survives_a_change_of_controller(pg_url: str) -> None:
    """Rollouts live in the PostgreSQL store itself: a second controller resumes the first one's."""
    key = Ed25519PrivateKey.generate()
    now = time.time()

    def status(device: str, active: wire.Variant, ts: float) -> wire.Status:
        return make_status(device, manifest=MANIFEST, active=active).model_copy(update={"ts": ts})

    with FleetStore(pg_url) as store:
        store.ingest_manifest(wire.sign(MANIFEST, key))
        for d in ("pi-1", "pi-2"):
            store.ingest_status(status(d, FP32, now))
            store.ingest_report(report(d, ts=now))
            store.ingest_assignment(assignment(d, FP32, 1, issued_at=now - 100))
        store.commit()
    bus = FakeBus(FakeClock())
    p = policy(rollout={"canary_devices": ["pi-1"]})
    first = Controller(pg_url, p, key, lambda: bus, name="c1")
    try:
        assert first.tick().applied == ["rollout:digits:v2"]  # planned
        first.tick()  # canary assigned
        assert [
            wire.Assignment.from_json(x).variant for x in bus.published_to(bus.topics.assign("pi-1", MODEL))
        ] == ["int8"]
        assert not bus.published_to(bus.topics.assign("pi-2", MODEL))
    finally:
        first.close()  # the leader goes away mid-rollout
    with FleetStore(pg_url) as store:
        store.ingest_status(status("pi-1", INT8, now + 5))  # the canary committed
        store.commit()
    second = Controller(pg_url, p, key, lambda: bus, name="c2")
    try:
        second.tick()  # canary_committed -> rolling_out: pi-2 assigned
        assert len(bus.published_to(bus.topics.assign("pi-2", MODEL))) == 1
        with FleetStore(pg_url) as store:
            store.ingest_status(status("pi-2", INT8, now + 6))
            store.commit()
        second.tick()
        with Journal(pg_url) as j:
            (view,) = j.memory(time.time()).rollouts.values()
        assert view.state == "completed" and view.devices == {"pi-1", "pi-2"}
        assert any("completed" in ln for ln in summary_lines(pg_url))
    finally:
        second.close()


def test_the_rate_limit_paces_a_rollouts_rest_stage(tmp_path: Path) -> None:
    from deploy.control.rollout import Role, RolloutController, RolloutState, RolloutStore

    key = Ed25519PrivateKey.generate()
    devices = ["pi-1", "pi-2", "pi-3", "pi-4"]
    state = fleet(devices, assigned={d: assignment(d, FP32, 1) for d in devices})
    for d in devices:
        state.statuses[d] = make_status(d, manifest=MANIFEST, active=FP32)
    bus = FakeBus(FakeClock())
    with RolloutStore(tmp_path / "fleet.db") as store:
        rc = RolloutController(bus, store, key)
        rc.statuses = dict(state.statuses)
        planned = rc.plan_from_state(
            state, MODEL, ControllerPolicy().selection_policy(), canary_devices=["pi-1"]
        )
        r = planned.rollout
        assert r is not None
        rc.assign_limit = 1
        r, _ = rc.step(r)  # planned -> canary_assigned
        r, _ = rc.step(r)  # the canary is assigned
        rc.statuses["pi-1"] = make_status("pi-1", manifest=MANIFEST, active=INT8).model_copy(
            update={"ts": 200.0}
        )
        for _ in range(3):
            r, _ = rc.step(r)
        assert r.state is RolloutState.ROLLING_OUT
        rest = [d for d in store.devices(r.id) if d.role is Role.REST]
        assert sum(d.assigned_at is not None for d in rest) == 1  # one per step, as the budget allows
        rc.assign_limit = 0
        rc.step(r)
        assert sum(d.assigned_at is not None for d in store.devices(r.id) if d.role is Role.REST) == 1
        rc.assign_limit = None
        rc.step(r)
        assert all(d.assigned_at is not None for d in store.devices(r.id))
