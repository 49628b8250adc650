"""Staged rollouts, unit level: the transition table, the store, and the controller against a fake bus.

The fake bus is a tiny in-memory broker (retained messages, live watches, topic wildcards); fake
devices are hooks on it that answer an assignment as an agent would (commit, roll back, or stay
silent). The clock is fake too, so timeouts cost no real time.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterable
from pathlib import Path

import paho.mqtt.client as paho
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from test_deploy import make_manifest, make_report, make_variant, ok_result

from agent import wire
from deploy.broker.client import Watch
from deploy.control import command as command_mod
from deploy.control.rollout import (
    TRANSITIONS,
    Outcome,
    Role,
    Rollout,
    RolloutController,
    RolloutState,
    RolloutStore,
    canary_count,
    check_transition,
    order_canaries,
)
from deploy.control.select import Policy
from deploy.errors import CommandTimeout, RolloutError
from deploy.keys import trusted_keys

S = RolloutState
MODEL = "digits"


class FakeClock:
    def __init__(self) -> None:
        self.now = 1_000.0

    def time(self) -> float:
        return self.now

    def monotonic(self) -> float:
        return self.now

    def advance(self, s: float) -> None:
        self.now += s


class FakeWatch(Watch):
    def __init__(self, filters: Iterable[str], clock: FakeClock) -> None:
        super().__init__(filters)
        self.clock = clock

    def wait(self, timeout_s: float) -> bool:
        if not super().wait(0):
            self.clock.advance(timeout_s)  # nothing queued: time passes, instantly
        return super().wait(0)


Hook = Callable[[str, bytes], None]


class FakeBus:
    """Retained store + live watches + publish hooks (devices)."""

    def __init__(self, clock: FakeClock, ns: str = "edgefleet") -> None:
        self._topics = wire.Topics(ns)
        self.clock = clock
        self.retained: dict[str, bytes] = {}
        self.watches: list[FakeWatch] = []
        self.log: list[tuple[str, bytes, bool]] = []
        self.hooks: list[Hook] = []

    @property
    def topics(self) -> wire.Topics:
        return self._topics

    def publish(self, topic: str, payload: bytes, retain: bool = False, qos: int = 1) -> None:
        self.log.append((topic, payload, retain))
        if retain:
            if payload:
                self.retained[topic] = payload
            else:
                self.retained.pop(topic, None)
        for w in self.watches:
            if not w.closed and w.matches(topic):
                w.put(topic, payload)
        for hook in list(self.hooks):
            hook(topic, payload)

    def flush(self, timeout_s: float | None = None) -> None:
        return None

    def collect_retained(
        self, filters: Iterable[str], quiet_s: float = 0.3, timeout_s: float = 10.0
    ) -> dict[str, bytes]:
        fs = list(filters)
        return {t: p for t, p in self.retained.items() if any(paho.topic_matches_sub(f, t) for f in fs)}

    def watch(self, filters: Iterable[str], timeout_s: float = 10.0) -> Watch:
        w = FakeWatch(filters, self.clock)
        self.watches.append(w)
        for t, p in self.retained.items():
            if w.matches(t):
                w.put(t, p)
        return w

    def published_to(self, topic: str) -> list[bytes]:
        return [p for t, p, _ in self.log if t == topic]


def status_for(
    device: str,
    ts: float,
    state: wire.ModelState,
    active: wire.ActiveVariant | None,
    version: int = 2,
    online: bool = True,
) -> wire.Status:
    return wire.Status(
        device=device,
        online=online,
        ts=ts,
        models={MODEL: wire.ModelStatus(state=state, manifest_version=version, active=active)},
    )


class FakeDevice:
    """Answers its assignment like an agent (``commit``, ``rollback`` or ``silent``); obeys commands."""

    def __init__(self, bus: FakeBus, name: str, manifest: wire.Manifest, behaviour: str = "commit") -> None:
        self.bus, self.name, self.behaviour = bus, name, behaviour
        self.manifest = manifest
        base = manifest.variant("fp32")
        self.active: wire.ActiveVariant | None = wire.ActiveVariant(
            variant=base.id, sha256=base.sha256, manifest_version=1, activated_at=1.0
        )
        self.previous: wire.ActiveVariant | None = None
        self.assignments: list[wire.Assignment] = []
        self.commands: list[wire.Command] = []
        self.ticks = itertools.count(1)
        bus.hooks.append(self.on_message)
        self.publish_status(wire.ModelState.COMMITTED)
        results = [ok_result(v, 10.0 - i) for i, v in enumerate(manifest.variants)]
        bus.publish(
            bus.topics.report(name, MODEL), make_report(name, manifest, results).to_json(), retain=True
        )

    def publish_status(self, state: wire.ModelState, detail: str | None = None) -> None:
        ts = self.bus.clock.time() + next(self.ticks) * 1e-3
        st = status_for(self.name, ts, state, self.active, version=self.manifest.version)
        if detail:
            st = st.model_copy(
                update={"models": {MODEL: st.models[MODEL].model_copy(update={"detail": detail})}}
            )
        self.bus.publish(self.bus.topics.status(self.name), st.to_json(), retain=True)

    def event(self, kind: wire.EventKind, **kw: object) -> None:
        ev = wire.Event(device=self.name, ts=self.bus.clock.time(), kind=kind, model=MODEL, **kw)  # type: ignore[arg-type]
        self.bus.publish(self.bus.topics.events(self.name), ev.to_json())

    def on_message(self, topic: str, payload: bytes) -> None:
        t = self.bus.topics
        if topic == t.assign(self.name, MODEL) and payload:
            a = wire.Assignment.from_json(payload)
            self.assignments.append(a)
            if self.active is not None and a.sha256 == self.active.sha256:
                return
            if self.behaviour == "silent":
                return
            target = wire.ActiveVariant(
                variant=a.variant, sha256=a.sha256, manifest_version=a.manifest_version, activated_at=2.0
            )
            if self.behaviour == "commit":
                self.previous, self.active = self.active, target
                self.publish_status(wire.ModelState.COMMITTED)
                self.event(wire.EventKind.COMMITTED, variant=a.variant, sha256=a.sha256)
            else:
                self.event(
                    wire.EventKind.ROLLED_BACK,
                    variant=a.variant,
                    sha256=a.sha256,
                    reason=wire.ReasonCode.HEALTH_CHECK_FAILED,
                    detail="health check failed: output NaN",
                )
                self.publish_status(wire.ModelState.ROLLED_BACK, "health check failed")
        elif topic == t.cmd(self.name):
            cmd = wire.Command.from_json(payload)
            self.commands.append(cmd)
            if cmd.action is wire.CommandAction.PING:
                self.bus.publish(
                    t.events(self.name),
                    wire.Event(
                        device=self.name, ts=1.0, kind=wire.EventKind.PONG, correlation_id=cmd.id
                    ).to_json(),
                )
            elif cmd.action is wire.CommandAction.ROLLBACK and self.previous is not None:
                failed = self.active
                self.active, self.previous = self.previous, None
                self.publish_status(wire.ModelState.ROLLED_BACK, "rollback command")
                assert failed is not None
                self.event(
                    wire.EventKind.ROLLED_BACK,
                    variant=failed.variant,
                    sha256=failed.sha256,
                    reason=wire.ReasonCode.COMMAND,
                    correlation_id=cmd.id,
                )


@pytest.fixture
def manifest() -> wire.Manifest:
    variants = [
        make_variant("fp32", b"a" * 300, 0.97),
        make_variant("fp16", b"b" * 200, 0.97),
        make_variant("int8", b"c" * 100, 0.95),
    ]
    return make_manifest(variants, model=MODEL, version=2)


class World:
    def __init__(self, tmp_path: Path, manifest: wire.Manifest) -> None:
        self.clock = FakeClock()
        self.bus = FakeBus(self.clock)
        self.key = Ed25519PrivateKey.generate()
        self.db = tmp_path / "rollouts.db"
        self.store = RolloutStore(self.db)
        self.manifest = manifest
        self.devices: dict[str, FakeDevice] = {}
        self.bus.publish(self.bus.topics.manifest(MODEL), manifest.to_json(), retain=True)

    def add(self, name: str, behaviour: str = "commit") -> FakeDevice:
        self.devices[name] = FakeDevice(self.bus, name, self.manifest, behaviour)
        return self.devices[name]

    def controller(self, store: RolloutStore | None = None) -> RolloutController:
        return RolloutController(self.bus, store or self.store, self.key, clock=self.clock, poll_s=1.0)

    def start(self, canaries: int = 2, **kw: object) -> tuple[RolloutController, Rollout]:
        ctl = self.controller()
        result = ctl.plan(MODEL, Policy(name="lab"), canaries=canaries, **kw)  # type: ignore[arg-type]
        assert result.rollout is not None
        return ctl, result.rollout


# ---------------------------------------------------------------- the table


def test_transition_table_allows_the_happy_path_and_halts_only() -> None:
    path = [S.PLANNED, S.CANARY_ASSIGNED, S.CANARY_COMMITTED, S.ROLLING_OUT, S.COMPLETED]
    for a, b in itertools.pairwise(path):
        check_transition(a, b)
    for s in path[:-1]:
        check_transition(s, S.HALTED)
    assert TRANSITIONS[S.COMPLETED] == frozenset() and TRANSITIONS[S.HALTED] == frozenset()
    for a, b in [
        (S.PLANNED, S.ROLLING_OUT),
        (S.CANARY_ASSIGNED, S.COMPLETED),
        (S.COMPLETED, S.HALTED),
        (S.HALTED, S.PLANNED),
        (S.ROLLING_OUT, S.CANARY_ASSIGNED),
    ]:
        with pytest.raises(RolloutError, match=f"illegal rollout transition {a} -> {b}"):
            check_transition(a, b)


def test_store_rejects_illegal_and_stale_transitions(tmp_path: Path) -> None:
    store = RolloutStore(tmp_path / "r.db")
    r = Rollout("digits-v1-aaaaaa", MODEL, 1, "lab", S.PLANNED, 1.0, 1.0)
    store.create(r, [])
    with pytest.raises(RolloutError, match="illegal"):
        store.transition(r, S.COMPLETED, "skip ahead", 2.0)
    r2 = store.transition(r, S.CANARY_ASSIGNED, "go", 2.0)
    with pytest.raises(RolloutError, match="another controller"):
        store.transition(r, S.CANARY_ASSIGNED, "stale copy", 3.0)  # the caller's copy is out of date
    assert store.get(r.id) == r2
    with pytest.raises(RolloutError, match="still canary_assigned"):
        store.create(Rollout("digits-v1-bbbbbb", MODEL, 1, "lab", S.PLANNED, 4.0, 4.0), [])
    store.transition(r2, S.HALTED, "stop", 5.0)
    assert [t.to_state for t in store.transitions(r.id)] == [S.PLANNED, S.CANARY_ASSIGNED, S.HALTED]
    store.create(Rollout("digits-v1-cccccc", MODEL, 1, "lab", S.PLANNED, 6.0, 6.0), [])  # one finished: fine
    assert store.unfinished(MODEL) is not None and store.latest(MODEL).id == "digits-v1-cccccc"  # type: ignore[union-attr]


def test_canary_count_and_order() -> None:
    assert canary_count(10, 2) == 2
    assert canary_count(10) == 1
    assert canary_count(10, percent=25) == 3
    assert canary_count(10, percent=1) == 1
    assert canary_count(3, 5) == 3
    assert canary_count(0, 2) == 0
    statuses = {
        "pi-b": status_for("pi-b", 1, wire.ModelState.COMMITTED, None),
        "pi-a": status_for("pi-a", 1, wire.ModelState.COMMITTED, None, online=False),
        "pi-c": status_for("pi-c", 1, wire.ModelState.COMMITTED, None),
    }
    assert order_canaries(["pi-a", "pi-b", "pi-c", "pi-d"], statuses) == ["pi-b", "pi-c", "pi-a", "pi-d"]
    assert order_canaries(["pi-a", "pi-b", "pi-c"], statuses, ["pi-c", "nope"]) == ["pi-c", "pi-b", "pi-a"]


# ---------------------------------------------------------------- the controller


def test_canaries_commit_then_the_rest_is_assigned(tmp_path: Path, manifest: wire.Manifest) -> None:
    w = World(tmp_path, manifest)
    for i in range(5):
        w.add(f"pi-{i}")
    ctl, r = w.start(canaries=2)
    devices = w.store.devices(r.id)
    assert [d.device for d in devices if d.role is Role.CANARY] == ["pi-0", "pi-1"]
    assert r.state is S.PLANNED and not w.bus.log[-1][0].endswith(f"assign/{MODEL}")  # nothing sent yet

    r = ctl.run(r, wait=True, timeout_s=30)
    assert r.state is S.COMPLETED, r.reason
    states = [t.to_state for t in w.store.transitions(r.id)]
    assert states == [S.PLANNED, S.CANARY_ASSIGNED, S.CANARY_COMMITTED, S.ROLLING_OUT, S.COMPLETED]
    order = [t.split("/")[2] for t, p, _ in w.bus.log if t.endswith(f"/assign/{MODEL}") and p]
    assert order[:2] == ["pi-0", "pi-1"] and sorted(order[2:]) == ["pi-2", "pi-3", "pi-4"]
    trusted = trusted_keys(w.key)
    for name, dev in w.devices.items():
        a = wire.verify_signed(wire.Assignment, w.bus.retained[w.bus.topics.assign(name, MODEL)], trusted)
        assert a.rollout == r.id and a.variant == "fp16"
        assert dev.active is not None and dev.active.sha256 == a.sha256
    assert all(d.outcome is Outcome.COMMITTED for d in w.store.devices(r.id))


def test_canary_rollback_halts_and_restores(tmp_path: Path, manifest: wire.Manifest) -> None:
    w = World(tmp_path, manifest)
    good = w.add("pi-0")  # canary that commits
    w.add("pi-1", "rollback")  # canary whose health check fails
    for i in range(2, 5):
        w.add(f"pi-{i}")
    # pi-0 had an assignment before the rollout: it is republished byte for byte on halt.
    old = wire.sign(
        wire.Assignment(
            device="pi-0",
            model=MODEL,
            variant="fp32",
            sha256=manifest.variant("fp32").sha256,
            manifest_version=2,
            issued_at=5.0,
            policy="old",
        ),
        w.key,
    ).to_json()
    w.bus.publish(w.bus.topics.assign("pi-0", MODEL), old, retain=True)
    good.assignments.clear()

    ctl, r = w.start(canaries=2)
    r = ctl.run(r, wait=True, timeout_s=30)
    assert r.state is S.HALTED
    assert "canary pi-1 rolled back" in (r.reason or "")
    t = w.bus.topics
    assert w.bus.retained[t.assign("pi-0", MODEL)] == old  # previous assignment restored
    assert t.assign("pi-1", MODEL) not in w.bus.retained  # none before: cleared
    assert w.bus.published_to(t.assign("pi-1", MODEL))[-1] == b""
    # pi-0 had committed the rollout's variant: it got a signed rollback command and is back on fp32.
    assert [c.action for c in good.commands] == [wire.CommandAction.ROLLBACK]
    wire.verify_signed(wire.Command, w.bus.published_to(t.cmd("pi-0"))[0], trusted_keys(w.key))
    assert good.active is not None and good.active.variant == "fp32"
    assert w.devices["pi-1"].commands == []  # rolled back by itself: no command
    for i in range(2, 5):  # non-canaries were never assigned
        assert w.devices[f"pi-{i}"].assignments == []
        assert w.bus.published_to(t.assign(f"pi-{i}", MODEL)) == []
    rows = {d.device: d for d in w.store.devices(r.id)}
    assert rows["pi-0"].restored == f"rollback command {good.commands[0].id}; previous assignment republished"
    assert rows["pi-1"].restored == "assignment cleared" and rows["pi-1"].outcome is Outcome.ROLLED_BACK
    assert rows["pi-2"].assigned_at is None and rows["pi-2"].restored is None


def test_resume_after_a_crash_between_transition_and_publish(tmp_path: Path, manifest: wire.Manifest) -> None:
    w = World(tmp_path, manifest)
    for i in range(3):
        w.add(f"pi-{i}", "silent" if i == 0 else "commit")
    ctl, r = w.start(canaries=1)
    r = ctl.step(r)[0]  # persisted canary_assigned ... and the controller dies before publishing
    assert r.state is S.CANARY_ASSIGNED
    assert not any(p for t, p, _ in w.bus.log if t.endswith(f"/assign/{MODEL}"))

    # A new controller (new process, same database) resumes: it publishes the canary assignment.
    store2 = RolloutStore(w.db)
    r2 = store2.unfinished(MODEL)
    assert r2 is not None and r2.state is S.CANARY_ASSIGNED
    ctl2 = w.controller(store2)
    r2 = ctl2.run(r2, wait=True, timeout_s=5)  # the canary is silent: times out, state kept
    assert r2.state is S.CANARY_ASSIGNED
    assert len(w.bus.published_to(w.bus.topics.assign("pi-0", MODEL))) == 1

    # The canary commits (e.g. the agent finished fetching); the next run carries on to the end.
    canary = w.devices["pi-0"]
    canary.behaviour = "commit"
    canary.on_message(w.bus.topics.assign("pi-0", MODEL), w.bus.retained[w.bus.topics.assign("pi-0", MODEL)])
    r3 = w.controller(RolloutStore(w.db)).run(store2.unfinished(MODEL), wait=True, timeout_s=5)  # type: ignore[arg-type]
    assert r3.state is S.COMPLETED
    assert len(w.bus.published_to(w.bus.topics.assign("pi-0", MODEL))) == 1  # not re-sent once marked


def test_wait_times_out_on_fake_clock(tmp_path: Path, manifest: wire.Manifest) -> None:
    w = World(tmp_path, manifest)
    w.add("pi-0", "silent")
    w.add("pi-1")
    ctl, r = w.start(canaries=1)
    t0 = w.clock.now
    r = ctl.run(r, wait=True, timeout_s=120)
    assert r.state is S.CANARY_ASSIGNED
    assert 120 <= w.clock.now - t0 < 125
    assert w.devices["pi-1"].assignments == []


def test_stale_rolled_back_status_does_not_count(tmp_path: Path, manifest: wire.Manifest) -> None:
    """A device that was already rolled_back before the rollout is not a failed canary."""
    w = World(tmp_path, manifest)
    dev = w.add("pi-0", "silent")
    dev.publish_status(wire.ModelState.ROLLED_BACK, "an old failure")
    ctl, r = w.start(canaries=1)
    r = ctl.run(r, wait=True, timeout_s=3)
    assert r.state is S.CANARY_ASSIGNED


def test_abort_during_rollout_restores_assigned_devices(tmp_path: Path, manifest: wire.Manifest) -> None:
    w = World(tmp_path, manifest)
    w.add("pi-0")
    w.add("pi-1", "silent")
    ctl, r = w.start(canaries=1)
    r = ctl.run(r, wait=True, timeout_s=3)
    assert r.state is S.ROLLING_OUT
    r = ctl.abort(r)
    assert r.state is S.HALTED and r.reason == "aborted by the operator"
    rows = {d.device: d for d in w.store.devices(r.id)}
    assert rows["pi-0"].restored and rows["pi-0"].restored.startswith("rollback command")
    assert rows["pi-1"].restored == "assignment cleared"
    with pytest.raises(RolloutError, match="already halted"):
        ctl.abort(r)


def test_nothing_to_roll_out(tmp_path: Path, manifest: wire.Manifest) -> None:
    w = World(tmp_path, manifest)
    dev = w.add("pi-0")
    dev.active = wire.ActiveVariant(
        variant="fp16", sha256=manifest.variant("fp16").sha256, manifest_version=2, activated_at=1.0
    )
    dev.publish_status(wire.ModelState.COMMITTED)
    result = w.controller().plan(MODEL, Policy(name="lab"))  # fp16: tied accuracy, lower latency
    assert result.rollout is None and result.skipped == {"pi-0": "already runs fp16 (committed)"}


# ---------------------------------------------------------------- commands


def test_command_is_signed_and_answer_is_matched(tmp_path: Path, manifest: wire.Manifest) -> None:
    w = World(tmp_path, manifest)
    w.add("pi-0")
    cmd = command_mod.make_command("pi-0", "ping", w.key)
    answer = command_mod.send_and_wait(w.bus, cmd, wait_s=1.0)
    assert answer.event.kind is wire.EventKind.PONG and answer.event.correlation_id == cmd.id
    sent = w.bus.log[-2]
    assert sent[0] == w.bus.topics.cmd("pi-0") and sent[2] is False  # not retained
    wire.verify_signed(wire.Command, sent[1], trusted_keys(w.key))
    silent = command_mod.make_command("pi-9", "ping", w.key)
    with pytest.raises(CommandTimeout, match="pi-9 did not answer ping"):
        command_mod.send_and_wait(w.bus, silent, wait_s=0.05)
    with pytest.raises(ValueError, match="needs a model"):
        command_mod.make_command("pi-0", "rollback", w.key)


def test_crash_during_halt_finishes_restoring_on_the_next_run(
    tmp_path: Path, manifest: wire.Manifest
) -> None:
    w = World(tmp_path, manifest)
    w.add("pi-0", "silent")
    w.add("pi-1")
    ctl, r = w.start(canaries=1)
    r = ctl.run(r)  # canary assigned, no answer yet
    assert r.state is S.CANARY_ASSIGNED
    # The controller persisted "halted" and died before restoring anything.
    w.store.transition(r, S.HALTED, "canary pi-0 rolled back", w.clock.time())
    assert w.store.unfinished(MODEL) is None
    pending = w.store.halted_unrestored(MODEL)
    assert pending is not None and pending.id == r.id
    r = w.controller(RolloutStore(w.db)).run(pending)
    assert r.state is S.HALTED
    assert w.store.halted_unrestored(MODEL) is None
    assert w.bus.published_to(w.bus.topics.assign("pi-0", MODEL))[-1] == b""
