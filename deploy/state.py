"""What the broker holds retained about the fleet: manifests, device statuses, reports, assignments.

``collect_state(session, model)`` reads it once (subscribe, gather until quiet, unsubscribe) and decodes
every payload with the wire models. A payload that fails to decode is skipped and listed in
``FleetState.skipped``, never fatal: one broken device must not hide the rest of the fleet.

The wildcards used here (statuses, reports, assignments) are fine for a lab-sized fleet; mosquitto cuts
a retained burst past ``max_queued_messages`` (1000 by default), so past that size run a collector
that stores state continuously instead.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass, field

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from agent import wire
from deploy.errors import StateError
from deploy.mqtt import Bus, decode_all


@dataclass
class FleetState:
    manifests: dict[str, wire.Manifest] = field(default_factory=dict)
    statuses: dict[str, wire.Status] = field(default_factory=dict)
    reports: dict[tuple[str, str], wire.Report] = field(default_factory=dict)  # (device, model)
    assignments: dict[tuple[str, str], wire.Assignment] = field(default_factory=dict)  # (device, model)
    skipped: list[str] = field(default_factory=list)  # "topic: why" for payloads that did not decode
    collected_at: float = field(default_factory=time.time)

    def reports_for(self, model: str) -> dict[str, wire.Report]:
        return {dev: r for (dev, m), r in self.reports.items() if m == model}

    @property
    def devices(self) -> list[str]:
        return sorted(set(self.statuses) | {d for d, _ in self.reports} | {d for d, _ in self.assignments})

    def manifest(self, model: str) -> wire.Manifest:
        """The manifest of ``model``; StateError naming the published models if the broker has none."""
        manifest = self.manifests.get(model)
        if manifest is None:
            known = ", ".join(sorted(self.manifests))
            published = (
                f"models published: {known}" if known else "no model is published yet (edgefleet publish)"
            )
            raise StateError(f"no manifest for model {model!r} on the broker; {published}")
        return manifest


def collect_state(
    session: Bus,
    model: str | None = None,
    trusted: Mapping[str, Ed25519PublicKey] | None = None,
    quiet_s: float = 0.3,
    timeout_s: float = 10.0,
) -> FleetState:
    """Read the retained fleet state (for one model, or all); with ``trusted``, manifests must verify."""
    raw = session.collect_retained(state_filters(session.topics, model), quiet_s=quiet_s, timeout_s=timeout_s)
    return parse_state(raw, session.topics, trusted)


def state_filters(topics: wire.Topics, model: str | None = None) -> list[str]:
    """The subscriptions that read the retained state of one model (or of all)."""
    ns = topics.ns
    if model is not None:
        wire.check_id(model, "model")
        return [
            topics.all_manifests(),  # every model's: an unknown model's error lists the published ones
            topics.all_statuses(),
            f"{ns}/devices/+/reports/{model}",
            f"{ns}/devices/+/assign/{model}",
        ]
    return [
        topics.all_manifests(),
        topics.all_statuses(),
        topics.all_reports(),
        f"{ns}/devices/+/assign/+",
    ]


def parse_state(
    raw: Mapping[str, bytes], topics: wire.Topics, trusted: Mapping[str, Ed25519PublicKey] | None = None
) -> FleetState:
    """Decode retained payloads by topic into a FleetState (pure; used by collect_state and tests)."""
    state = FleetState()
    for parsed, payload in decode_all(raw, topics):
        topic_text = _topic_text(parsed)
        try:
            if parsed.kind is wire.TopicKind.MANIFEST and parsed.model:
                if trusted is not None:
                    manifest = wire.verify_signed(wire.Manifest, payload, trusted)
                else:
                    manifest = wire.decode(wire.Manifest, payload)
                _expect(manifest.model == parsed.model, "model does not match its topic")
                state.manifests[parsed.model] = manifest
            elif parsed.kind is wire.TopicKind.STATUS and parsed.device:
                status = wire.decode(wire.Status, payload)
                _expect(status.device == parsed.device, "device does not match its topic")
                state.statuses[parsed.device] = status
            elif parsed.kind is wire.TopicKind.REPORT and parsed.device and parsed.model:
                report = wire.decode(wire.Report, payload)
                _expect(
                    (report.device, report.model) == (parsed.device, parsed.model),
                    "device/model do not match the topic",
                )
                state.reports[(parsed.device, parsed.model)] = report
            elif parsed.kind is wire.TopicKind.ASSIGN and parsed.device and parsed.model:
                assignment = wire.decode(wire.Assignment, payload)
                state.assignments[(parsed.device, parsed.model)] = assignment
        except wire.WireError as err:
            state.skipped.append(f"{topic_text}: {err}")
    return state


def _expect(ok: bool, message: str) -> None:
    if not ok:
        raise wire.PayloadError(message)


def _topic_text(parsed: wire.ParsedTopic) -> str:
    parts = [parsed.kind.value, parsed.device or "", parsed.model or "", parsed.sha256 or ""]
    return "/".join(p for p in parts if p)
