"""Turn decisions into signed, retained assignments: ``plan`` (read + select) and ``assign`` (publish).

An assignment is published retained, QoS1, on ``{ns}/devices/{device}/assign/{model}``, signed with the
fleet key, and carries the variant id, its sha256, the manifest version, the policy name and the
decision's reason. A decision that keeps the current variant publishes nothing; an assignment already
retained for the same variant, file and manifest version is left as it is (re-running is harmless).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from agent import wire
from deploy.broker.client import Bus
from deploy.control.select import Decision, Policy, select, unreachable_rules
from deploy.errors import PolicyError, StateError
from deploy.observe.state import FleetState, collect_state

Progress = Callable[[str], None]


def _quiet(_: str) -> None:
    return None


@dataclass(frozen=True, slots=True)
class Plan:
    manifest: wire.Manifest
    decisions: list[Decision]
    state: FleetState
    devices_without_report: list[str]


def plan(state: FleetState, model: str, policy: Policy, devices: Iterable[str] | None = None) -> Plan:
    """Select variants for ``model`` from a collected state (pure), optionally for some devices only."""
    manifest = state.manifest(model)
    unreachable = unreachable_rules(policy, manifest)
    if unreachable:
        raise PolicyError("; ".join(unreachable))
    reports = state.reports_for(model)
    wanted = set(devices) if devices is not None else None
    if wanted is not None:
        reports = {d: r for d, r in reports.items() if d in wanted}
    decisions = select(manifest, reports, state.statuses, policy)
    decided = {d.device for d in decisions}
    pool = wanted if wanted is not None else set(state.statuses) | set(reports)
    missing = sorted(pool - decided)
    return Plan(manifest, decisions, state, missing)


def collect_plan(
    session: Bus,
    model: str,
    policy: Policy,
    devices: Iterable[str] | None = None,
    allow_partial: bool = False,
) -> Plan:
    """Read the retained state of ``model`` from the broker, then :func:`plan`.

    A burst that looks cut (:attr:`deploy.observe.state.FleetState.cut`) is refused unless ``allow_partial``.
    """
    state = collect_state(session, model)
    if state.cut and not allow_partial:
        raise StateError(state.cut_message())
    return plan(state, model, policy, devices)


def make_assignment(
    decision: Decision,
    key: Ed25519PrivateKey,
    issued_at: float | None = None,
    rollout: str | None = None,
) -> wire.Assignment:
    """The signed assignment for a decision that chose a variant (``rollout``: the staged rollout's id)."""
    if decision.variant is None or decision.sha256 is None:
        raise ValueError(f"decision for {decision.device} keeps the current variant; nothing to assign")
    assignment = wire.Assignment(
        device=decision.device,
        model=decision.model,
        variant=decision.variant,
        sha256=decision.sha256,
        manifest_version=decision.manifest_version,
        issued_at=wire.now() if issued_at is None else issued_at,
        policy=decision.policy[:200],
        reason=decision.why[:4000],
        rollout=rollout,
    )
    return wire.sign(assignment, key)


@dataclass(frozen=True, slots=True)
class AssignResult:
    published: list[wire.Assignment]
    unchanged: list[str]  # devices whose retained assignment already matched
    kept: list[str]  # devices where no variant met the policy


def assign(
    decisions: Sequence[Decision],
    key: Ed25519PrivateKey,
    session: Bus,
    existing: FleetState | None = None,
    progress: Progress = _quiet,
) -> AssignResult:
    """Publish one signed retained assignment per decision that chose a variant."""
    published: list[wire.Assignment] = []
    unchanged: list[str] = []
    kept: list[str] = []
    for d in decisions:
        if d.variant is None:
            kept.append(d.device)
            progress(f"  {d.device}: {d.why}")
            continue
        prior = existing.assignments.get((d.device, d.model)) if existing else None
        if prior is not None and (prior.variant, prior.sha256, prior.manifest_version) == (
            d.variant,
            d.sha256,
            d.manifest_version,
        ):
            unchanged.append(d.device)
            progress(f"  {d.device}: already assigned {d.variant} (v{d.manifest_version})")
            continue
        signed = make_assignment(d, key)
        session.publish(session.topics.assign(d.device, d.model), signed.to_json(), retain=True)
        published.append(signed)
        progress(f"  {d.device}: assigned {d.variant} — {d.why}")
    session.flush()
    return AssignResult(published, unchanged, kept)
