"""The controller's decision step, a pure function: (store snapshot, controller memory, policy) → actions.

``decide(snapshot, memory, policy)`` never reads or writes anything; ``deploy.control.controller`` reads the
store, calls it every tick, applies what it returns and journals it (``deploy.control.controller_journal``).

Per model (its mode ``auto`` / ``approve`` / ``manual``, nothing at all while paused or manual):

* **initial**: a device with a status and a report for the current manifest version, and no assignment
  for the model, gets its best variant (``deploy.control.select``), unless a rollout of that version is still
  planned or in flight (canaries first: the newcomer waits for them) or the version's rollout halted;
* **rollout**: devices assigned an older manifest version move to the new one through a staged rollout
  (``deploy.control.rollout``: canaries first, the rest once they committed, halt and restore when one rolls
  back). It starts once every online device concerned has reported on the new version, or
  ``rollout.report_wait_s`` after the controller first saw it; later reporters catch up after it completed;
* **reassign**: a device assigned the current version whose report is newer than its assignment, at
  least ``hysteresis.min_interval_s`` after it, and whose best variant now beats the assigned one by
  ``hysteresis.min_improvement`` (or whose assigned variant no longer meets the policy);
* **quarantine**: a device whose health check failed on ``quarantine.after_variants`` different files of
  a model is quarantined for it (an event; it keeps the model it rolled back to; ``edgefleet resume
  --device`` releases it).

Safety, whatever the mode: an assignment needs a successful, uncontended result of that very file in the
device's latest report, never a file whose health check failed on that device; at most
``limits.assignments_per_minute`` assignments in any 60 s, and at most ``limits.max_changing_share`` of
the fleet between an assignment and its outcome. What the limits hold back is deferred, not dropped (the
next tick decides again). Bad input (a manifest failing verification, a policy the manifest cannot
satisfy, a report from a device with no status) becomes a :class:`Note`, and nothing is assigned for it.
"""

from __future__ import annotations

import math
import tomllib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from agent import wire
from deploy.control.select import Decision, Policy, select, unreachable_rules
from deploy.errors import PolicyError
from deploy.observe.state import FleetState

Mode = Literal["auto", "approve", "manual"]
MODES: tuple[Mode, ...] = ("auto", "approve", "manual")
RATE_WINDOW_S = 60.0


# ---------------------------------------------------------------------------------------------- policy


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Hysteresis(_Strict):
    min_improvement: float = Field(
        default=0.05,
        ge=0,
        description="how much better the new best must be: the ranked quality's difference (accuracy 0.05 = "
        "5 points) or, for latency/energy (and quality ties), the relative gain (0.05 = 5 % faster)",
    )
    min_interval_s: float = Field(
        default=600.0, ge=0, description="no reassignment sooner after the last one"
    )


class Limits(_Strict):
    assignments_per_minute: int = Field(default=120, ge=1, description="assignments published in any 60 s")
    max_changing_share: float = Field(
        default=0.25, gt=0, le=1, description="share of the fleet between an assignment and its outcome"
    )
    settle_timeout_s: float = Field(
        default=600.0, gt=0, description="a device silent this long after an assignment no longer counts"
    )


class RolloutRules(_Strict):
    canaries: int | None = Field(default=None, ge=1, description="canary devices (default 1)")
    canary_percent: float | None = Field(default=None, gt=0, le=100)
    canary_devices: list[wire.Identifier] = Field(default_factory=list, description="preferred canaries")
    report_wait_s: float = Field(
        default=120.0, ge=0, description="start without the online devices that have not reported by then"
    )

    @model_validator(mode="after")
    def _one_count(self) -> RolloutRules:
        if self.canaries is not None and self.canary_percent is not None:
            raise ValueError("rollout: give canaries or canary_percent, not both")
        return self


class QuarantineRules(_Strict):
    after_variants: int = Field(default=2, ge=1, description="distinct files failing the health check")


class ControllerPolicy(_Strict):
    interval_s: float = Field(default=2.0, gt=0, le=300, description="seconds between two ticks")
    default_mode: Mode = "auto"
    modes: dict[wire.Identifier, Mode] = Field(default_factory=dict, description="per model")
    hysteresis: Hysteresis = Field(default_factory=Hysteresis)
    limits: Limits = Field(default_factory=Limits)
    rollout: RolloutRules = Field(default_factory=RolloutRules)
    quarantine: QuarantineRules = Field(default_factory=QuarantineRules)
    selection: dict[str, Any] = Field(
        default_factory=dict, description="a deploy.control.select policy (name, default, classes)"
    )

    def selection_policy(self) -> Policy:
        return Policy.from_mapping(self.selection, name=str(self.selection.get("name", "controller")))

    def mode_for(self, model: str, overrides: Mapping[str, Mode]) -> Mode:
        return overrides.get(model) or self.modes.get(model) or self.default_mode


def load_controller_policy(path: Path | str | None) -> ControllerPolicy:
    """The controller's TOML (None: the defaults); PolicyError names the file and the bad key."""
    if path is None:
        policy = ControllerPolicy()
    else:
        try:
            data = tomllib.loads(Path(path).read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as err:
            raise PolicyError(f"cannot read the controller policy {path}: {err}") from err
        try:
            policy = ControllerPolicy.model_validate(data)
        except ValidationError as err:
            first = err.errors()[0]
            where = ".".join(str(x) for x in first["loc"]) or "(top)"
            raise PolicyError(f"{path}: {where}: {first['msg']}") from err
    policy.selection_policy()  # a broken [selection] fails now, not on the first tick
    return policy


# ---------------------------------------------------------------------------------------------- inputs


@dataclass(frozen=True, slots=True)
class Assigned:
    """The newest assignment of a device for a model, from the store or from the controller's journal."""

    variant: str
    sha256: str
    manifest_version: int
    issued_at: float
    rollout: str | None = None


@dataclass(frozen=True, slots=True)
class HealthFailure:
    device: str
    model: str
    sha256: str
    variant: str | None
    ts: float


@dataclass(frozen=True, slots=True)
class Snapshot:
    """What the store says now (manifests already verified; the ones that failed are in state.skipped)."""

    now: float
    state: FleetState
    health_failures: Sequence[HealthFailure] = ()


@dataclass(frozen=True, slots=True)
class RolloutView:
    id: str
    model: str
    manifest_version: int
    state: str  # deploy.control.rollout.RolloutState value
    devices: frozenset[str]
    needs_restore: bool = False  # halted with devices not yet restored

    @property
    def finished(self) -> bool:
        return self.state in ("completed", "halted") and not self.needs_restore


@dataclass(frozen=True, slots=True)
class Memory:
    """The controller's own state, read back from the store every tick (so a successor has it too)."""

    paused: bool = False
    paused_models: frozenset[str] = frozenset()
    mode_overrides: Mapping[str, Mode] = field(default_factory=dict)
    quarantined: frozenset[tuple[str, str]] = frozenset()  # (device, model)
    applied: Mapping[tuple[str, str], Assigned] = field(default_factory=dict)  # by this controller
    recent_assignments: Sequence[float] = ()  # when the controller published, last 60 s
    rollouts: Mapping[tuple[str, int], RolloutView] = field(default_factory=dict)  # latest per (model, v)
    settled_versions: frozenset[tuple[str, int]] = frozenset()  # rollout found nothing to change
    first_seen: Mapping[tuple[str, int], float] = field(default_factory=dict)  # manifest versions
    rollout_changing: int = 0  # rollout devices assigned, outcome not known yet
    pending: frozenset[str] = frozenset()  # keys of proposals waiting for `edgefleet approve`
    approved: frozenset[str] = frozenset()  # keys approved, not yet applied


# ---------------------------------------------------------------------------------------------- actions


@dataclass(frozen=True, slots=True)
class AssignAction:
    kind: Literal["initial", "reassign", "catch-up"]
    decision: Decision
    why: str

    @property
    def key(self) -> str:
        d = self.decision
        return f"assign:{d.model}:{d.device}:v{d.manifest_version}:{d.variant}"

    @property
    def model(self) -> str:
        return self.decision.model

    @property
    def device(self) -> str | None:
        return self.decision.device


@dataclass(frozen=True, slots=True)
class StartRollout:
    model: str
    manifest_version: int
    devices: tuple[str, ...]
    why: str

    @property
    def key(self) -> str:
        return f"rollout:{self.model}:v{self.manifest_version}"

    device: None = None


@dataclass(frozen=True, slots=True)
class AdvanceRollout:
    model: str
    rollout: str
    assign_limit: int  # rollout assignments this tick may publish (rate limits)
    why: str = "rollout in flight"
    device: None = None

    @property
    def key(self) -> str:
        return f"advance:{self.rollout}"


@dataclass(frozen=True, slots=True)
class QuarantineAction:
    device: str
    model: str
    why: str

    @property
    def key(self) -> str:
        return f"quarantine:{self.model}:{self.device}"


@dataclass(frozen=True, slots=True)
class Propose:
    """``approve`` mode: record ``action`` as a proposal for `edgefleet approve`."""

    action: AssignAction | StartRollout

    @property
    def key(self) -> str:
        return self.action.key


@dataclass(frozen=True, slots=True)
class Withdraw:
    """A pending proposal the controller would no longer make (its figures or the manifest changed)."""

    key: str
    why: str


@dataclass(frozen=True, slots=True)
class Note:
    """Something the operator should see (bad input, a blocked version); the shell logs it once."""

    why: str
    model: str | None = None
    device: str | None = None

    @property
    def key(self) -> str:
        return f"note:{self.model}:{self.device}:{self.why}"


Action = AssignAction | StartRollout | AdvanceRollout | QuarantineAction | Propose | Withdraw | Note


@dataclass(frozen=True, slots=True)
class Outcome:
    actions: list[Action]
    deferred: int = 0  # assignments held back by the rate limits (decided again next tick)

    def of(self, kind: type[Any]) -> list[Any]:
        return [a for a in self.actions if isinstance(a, kind)]


# ---------------------------------------------------------------------------------------------- helpers


def current_assignment(state: FleetState, memory: Memory, device: str, model: str) -> Assigned | None:
    """The newer of the store's assignment and the one this controller journaled (the collector may not
    have stored what was just published)."""
    a = state.assignments.get((device, model))
    stored = Assigned(a.variant, a.sha256, a.manifest_version, a.issued_at, a.rollout) if a else None
    mine = memory.applied.get((device, model))
    if stored is None or (mine is not None and mine.issued_at > stored.issued_at):
        return mine
    return stored


def unsafe_reason(
    decision: Decision, report: wire.Report, failed: frozenset[str], allow_contended: bool = False
) -> str | None:
    """Why the decided file must not be assigned (None: it may): it must have a successful, uncontended
    result for that very sha256 in the device's report, and not have failed its health check there.
    ``allow_contended``: only when the selection policy's rule says ``reject_contended = false``."""
    if decision.variant is None or decision.sha256 is None:
        return "no variant meets the policy"
    if decision.sha256 in failed:
        return f"{decision.variant} failed its health check on this device before"
    results = [r for r in report.results if r.variant == decision.variant and r.sha256 == decision.sha256]
    good = [r for r in results if r.ok and (allow_contended or not getattr(r, "contended", None))]
    if good:
        return None
    if not results:
        return f"{decision.variant} was not benchmarked by this device"
    if any(r.ok for r in results):
        return f"every result of {decision.variant} on this device is contended"
    return f"{decision.variant} failed its benchmark on this device"


def improvement(old: Decision, new: Decision) -> float:
    """How much ``new``'s chosen candidate beats ``old``'s (both decided under the same rule): the ranked
    quality's difference (accuracy, a named metric), else the relative gain in energy or p50 latency."""
    a, b = old.chosen, new.chosen
    if a is None or b is None:
        return math.inf
    qa, qb = a.metric_value, b.metric_value
    if new.objective in ("accuracy", "metric") and qa is not None and qb is not None and qa != qb:
        return abs(qb - qa)
    if new.objective == "energy" and a.energy_mj and b.energy_mj is not None:
        return (a.energy_mj - b.energy_mj) / a.energy_mj
    if a.p50_ms and b.p50_ms is not None:
        return (a.p50_ms - b.p50_ms) / a.p50_ms  # latency, and how quality ties are broken
    return 0.0


def _only(report: wire.Report, variant: str) -> wire.Report:
    return report.model_copy(update={"results": [r for r in report.results if r.variant == variant]})


def _health(snapshot: Snapshot) -> dict[tuple[str, str], frozenset[str]]:
    out: dict[tuple[str, str], set[str]] = {}
    for f in snapshot.health_failures:
        out.setdefault((f.device, f.model), set()).add(f.sha256)
    return {k: frozenset(v) for k, v in out.items()}


def _changing(snapshot: Snapshot, memory: Memory, settle_s: float) -> int:
    """Devices between an assignment this controller published and its outcome (committed/rolled back)."""
    n = 0
    moving = (wire.ModelState.ACTIVATING, wire.ModelState.PROBATION)
    for (device, model), a in memory.applied.items():
        if snapshot.now - a.issued_at > settle_s:
            continue
        status = snapshot.state.statuses.get(device)
        ms = status.models.get(model) if status else None
        if (
            ms is not None
            and ms.active is not None
            and ms.active.sha256 == a.sha256
            and ms.state not in moving
        ):
            continue  # it runs the file (committed, or benchmarking a newer manifest since)
        if ms is not None and ms.state is wire.ModelState.ROLLED_BACK and status and status.ts > a.issued_at:
            continue
        n += 1
    return n + memory.rollout_changing  # rollouts are paced by the same budget (AdvanceRollout)


# ---------------------------------------------------------------------------------------------- decide


def decide(snapshot: Snapshot, memory: Memory, policy: ControllerPolicy) -> Outcome:
    """Every action the controller should take now, in order (see the module docstring)."""
    state = snapshot.state
    actions: list[Action] = []
    wanted: list[AssignAction | StartRollout] = []
    if memory.paused:
        return Outcome([])
    selection = policy.selection_policy()
    health = _health(snapshot)

    for line in state.skipped:
        if line.startswith("manifest/"):
            actions.append(Note(f"manifest ignored, nothing assigned for it: {line}"))

    for model, manifest in sorted(state.manifests.items()):
        mode = policy.mode_for(model, memory.mode_overrides)
        if mode == "manual" or model in memory.paused_models:
            continue
        version = manifest.version
        unreachable = unreachable_rules(selection, manifest)
        if unreachable:
            actions.append(
                Note(f"policy cannot be satisfied, nothing assigned: {'; '.join(unreachable)}", model)
            )
            continue
        reports = state.reports_for(model)
        orphans = sorted(d for d in reports if d not in state.statuses)
        for d in orphans:
            actions.append(Note("report from a device with no status in the store: ignored", model, d))
        reports = {d: r for d, r in reports.items() if d in state.statuses}
        try:
            decisions = {d.device: d for d in select(manifest, reports, state.statuses, selection)}
        except PolicyError as err:
            actions.append(Note(f"policy cannot be applied, nothing assigned: {err}", model))
            continue

        # quarantine first: a quarantined device takes part in nothing below
        quarantined = {d for d, m in memory.quarantined if m == model}
        for (device, m), shas in sorted(health.items()):
            if m == model and device not in quarantined and len(shas) >= policy.quarantine.after_variants:
                actions.append(
                    QuarantineAction(
                        device,
                        model,
                        f"health check failed on {len(shas)} different files of {model}; "
                        "left on the model it rolled back to",
                    )
                )
                quarantined.add(device)

        rollout = memory.rollouts.get((model, version))
        in_flight = next((r for r in memory.rollouts.values() if r.model == model and not r.finished), None)
        if in_flight is not None:
            actions.append(AdvanceRollout(model, in_flight.id, 0))
        if rollout is not None and rollout.state == "halted":
            actions.append(Note(f"v{version} halted in rollout {rollout.id}: not assigned to anyone", model))
            continue
        settled = (model, version) in memory.settled_versions or (
            rollout is not None and rollout.state == "completed"
        )

        older: list[str] = []  # devices assigned an older version: the rollout's
        for device in sorted(state.statuses):
            if device in quarantined:
                continue
            current = current_assignment(state, memory, device, model)
            if current is not None and current.manifest_version < version:
                older.append(device)

        if older and rollout is None and not settled and in_flight is None:
            reported = []
            for d in older:
                if d not in decisions:
                    continue
                sha = decisions[d].sha256
                if sha is not None and sha in health.get((d, model), frozenset()):
                    why = (
                        f"not in the v{version} rollout: {decisions[d].variant} failed its health check here"
                    )
                    actions.append(Note(why, model, d))
                    continue
                reported.append(d)
            waiting = [d for d in older if d not in decisions and state.statuses[d].online]
            seen = memory.first_seen.get((model, version), snapshot.now)
            if reported and (not waiting or snapshot.now - seen >= policy.rollout.report_wait_s):
                why = f"v{version}: {len(reported)} device(s) on an older version"
                if waiting:
                    wait = policy.rollout.report_wait_s
                    why += f"; {len(waiting)} online device(s) had not reported after {wait:g} s"
                wanted.append(StartRollout(model, version, tuple(reported), why))
            elif not reported and not waiting:
                settled = True  # every device concerned is excluded: nothing to roll out, nothing waits
        rollout_pending = in_flight is not None or (bool(older) and not settled and rollout is None)

        for device, decision in sorted(decisions.items()):
            if device in quarantined:
                continue
            current = current_assignment(state, memory, device, model)
            failed = health.get((device, model), frozenset())
            report = reports[device]
            if current is None:
                if rollout_pending:
                    continue  # newcomers wait for the canaries of this version
                kind: Literal["initial", "reassign", "catch-up"] = "initial"
                why = f"no assignment for {model}: {decision.why}"
            elif current.manifest_version < version:
                if not settled or (rollout is not None and device in rollout.devices):
                    continue  # the rollout's (or waiting for it)
                if decision.sha256 == current.sha256:
                    continue
                kind, why = "catch-up", f"v{version} rolled out; reported late: {decision.why}"
            else:
                if in_flight is not None and device in in_flight.devices:
                    continue
                if decision.variant is None or decision.sha256 == current.sha256:
                    continue
                if report.ts <= current.issued_at:
                    continue  # nothing new since the assignment
                if snapshot.now - current.issued_at < policy.hysteresis.min_interval_s:
                    continue
                old = select(manifest, {device: _only(report, current.variant)}, state.statuses, selection)
                gain = improvement(old[0], decision) if old else math.inf
                if gain < policy.hysteresis.min_improvement:
                    continue
                shown = "no longer meets the policy" if math.isinf(gain) else f"gain {gain:.3g}"
                kind, why = (
                    "reassign",
                    f"new report: {decision.variant} beats {current.variant} ({shown}): {decision.why}",
                )
            rule = selection.rule_for(decision.device_class)
            allow = not getattr(rule, "reject_contended", True)
            unsafe = unsafe_reason(decision, report, failed, allow)
            if unsafe is not None:
                detail = decision.why if decision.variant is None else unsafe
                actions.append(Note(f"not assigned: {detail}", model, device))
                continue
            wanted.append(AssignAction(kind, decision, why))

    # modes: approve turns decisions into proposals, applied once approved
    proposed: set[str] = set()
    budget = policy.limits.assignments_per_minute - sum(
        1 for t in memory.recent_assignments if snapshot.now - t < RATE_WINDOW_S
    )
    fleet = max(1, len(state.statuses))
    room = max(1, math.floor(policy.limits.max_changing_share * fleet)) - _changing(
        snapshot, memory, policy.limits.settle_timeout_s
    )
    allowed = max(0, min(budget, room))
    deferred = 0
    for w in wanted:
        mode = policy.mode_for(w.model, memory.mode_overrides)
        if mode == "approve" and w.key not in memory.approved:
            proposed.add(w.key)
            if w.key not in memory.pending:
                actions.append(Propose(w))
            continue
        if isinstance(w, AssignAction):
            if allowed <= 0:
                deferred += 1
                continue
            allowed -= 1
        actions.append(w)
    for key in sorted((memory.pending | memory.approved) - {a.key for a in wanted}):
        actions.append(Withdraw(key, "no longer what the controller would do (new report or manifest)"))
    # rollouts in flight get what the limits leave
    out: list[Action] = []
    for a in actions:
        if isinstance(a, AdvanceRollout):
            out.append(AdvanceRollout(a.model, a.rollout, allowed, a.why))
        else:
            out.append(a)
    return Outcome(out, deferred)
