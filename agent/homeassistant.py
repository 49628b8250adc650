"""Home Assistant MQTT discovery for edgefleet devices: pure payload builders, no MQTT client.

Only the standard library and :mod:`agent.wire` are imported. The agent publishes these on every
connect when ``[telemetry] home_assistant = true``; ``deploy.observe.homeassistant`` re-exports them for the
host
(the agent never imports ``deploy``). Every entity reads the topics of the wire contract directly — the
device publishes nothing extra for Home Assistant besides these retained config messages:

=====================================  =====================  ==========================================
entity                                 state topic            value
=====================================  =====================  ==========================================
``binary_sensor`` connectivity         status                 ``ON`` if ``online`` (no availability:
                                                              it must show OFF when the Will fires)
``sensor`` <model> active variant      status                 ``models[<model>].active.variant``
``sensor`` <model> p50 latency (ms)    status                 ``models[<model>].active.latency_ms_p50``
``sensor`` <model> energy (mJ/inf.)    status                 ``...active.energy_mj_per_inference``
``sensor`` CPU temperature (°C)        telemetry              ``temperature_c`` (expires after 3 periods)
=====================================  =====================  ==========================================

The latency and energy sensors read the STATUS, where the agent puts the active file's figures from its
latest benchmark of it (:func:`agent.publishing.with_figures`), and which it republishes on every
activation, rollback and report: Home Assistant keeps its subscription and templates when a discovery
config is republished with the same topic, so sensors that picked "the active variant" out of the report
kept showing the previous variant's numbers after an assignment (measured in Home Assistant 2024.3.3).
Before any activation they are "unknown" (no running variant, no figure to show). The configs do not
depend on which variant runs, so they never need republishing when it changes.

Config topics are ``homeassistant/<component>/<device id>/<object id>/config`` (QoS1, retained), which the
broker ACL lets each device write for its own id only. Keys are Home Assistant's full (unabbreviated)
names; ``default_entity_id`` (HA ≥ 2025.10) and the older ``object_id`` are both given.
Templates output ``None`` when a value is missing, which HA shows as "unknown".
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from agent import wire

DISCOVERY_PREFIX = "homeassistant"
ORIGIN_NAME = "edgefleet"
ONLINE = "online"
OFFLINE = "offline"
AVAILABILITY_TEMPLATE = "{{ 'online' if value_json.online else 'offline' }}"


@dataclass(frozen=True, slots=True)
class DiscoveryMessage:
    """One retained discovery config; an empty ``payload`` removes the entity."""

    topic: str
    payload: Mapping[str, Any] | None
    qos: int = 1
    retain: bool = True

    def payload_bytes(self) -> bytes:
        if self.payload is None:
            return b""
        return json.dumps(self.payload, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


@dataclass(frozen=True, slots=True)
class DeviceInfo:
    device: str
    board: str | None = None
    agent_version: str | None = None
    manufacturer: str = "edgefleet"
    device_class: str | None = None

    @classmethod
    def from_status(cls, status: wire.Status) -> DeviceInfo:
        return cls(status.device, status.board, status.agent_version, device_class=status.device_class)

    def block(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "identifiers": [f"edgefleet_{self.device}"],
            "name": self.device,
            "manufacturer": self.manufacturer,
            "model": self.board or "edge device",
        }
        if self.agent_version:
            out["sw_version"] = self.agent_version
        return out


def config_topic(component: str, device: str, object_id: str, prefix: str = DISCOVERY_PREFIX) -> str:
    wire.check_id(device, "device")
    for part in (component, object_id):
        if not part or not all(c.isalnum() or c in "_-" for c in part):
            raise wire.IdentifierError(f"discovery topic part {part!r} must be [a-zA-Z0-9_-]+")
    return f"{prefix}/{component}/{device}/{object_id}/config"


def _literal(text: str) -> str:
    """A Jinja string literal for an identifier (ids match ^[a-z0-9][a-z0-9_-]*$, nothing to escape)."""
    return "'" + wire.check_id(text) + "'"


def active_variant_template(model: str) -> str:
    return (
        f"{{% set m = value_json.models.get({_literal(model)}) %}}"
        "{{ m.active.variant if m and m.get('active') else 'none' }}"
    )


def active_figure_template(model: str, field: str) -> str:
    """The active variant's ``field`` (``latency_ms_p50``, ``energy_mj_per_inference``) from the status;
    ``None`` with no active variant or no figure."""
    return (
        f"{{% set m = value_json.models.get({_literal(model)}) %}}"
        f"{{{{ m.active.get({field!r}) if m and m.get('active') else None }}}}"
    )


def active_attributes_template(model: str) -> str:
    """Attributes of the figure sensors: which variant and manifest version the figures belong to."""
    return (
        f"{{% set m = value_json.models.get({_literal(model)}) %}}"
        "{{ {'variant': m.active.variant if m and m.get('active') else None,"
        " 'manifest_version': m.active.manifest_version if m and m.get('active') else None} | tojson }}"
    )


def result_template(path: str, variant: str | None = None) -> str:
    """First value at ``path`` (e.g. ``latency_ms.p50``) of the ``variant``'s successful result, or the
    smallest over all successful results when no variant is given; ``None`` when there is none."""
    top = path.split(".", 1)[0]
    chain = "value_json.results | selectattr('ok')"
    if variant is not None:
        chain += f" | selectattr('variant', 'eq', {_literal(variant)})"
    chain += f" | selectattr({top!r}, 'defined') | map(attribute={path!r})"
    if variant is None:
        chain += " | sort"
    return f"{{{{ ({chain} | list + [None]) | first }}}}"


TEMPERATURE_TEMPLATE = "{{ value_json.temperature_c if value_json.temperature_c is defined else None }}"
CONNECTIVITY_TEMPLATE = "{{ 'ON' if value_json.online else 'OFF' }}"


def _entity(
    info: DeviceInfo,
    component: str,
    object_id: str,
    *,
    name: str,
    state_topic: str,
    value_template: str,
    origin: Mapping[str, Any],
    availability_topic: str | None,
    **extra: Any,
) -> DiscoveryMessage:
    unique_id = f"edgefleet_{info.device}_{object_id}".replace("-", "_")
    payload: dict[str, Any] = {
        "name": name,
        "unique_id": unique_id,
        "object_id": unique_id,
        "default_entity_id": f"{component}.{unique_id}",
        "state_topic": state_topic,
        "value_template": value_template,
        "device": info.block(),
        "origin": dict(origin),
        "qos": 1,
    }
    if availability_topic is not None:
        payload |= {
            "availability_topic": availability_topic,
            "availability_template": AVAILABILITY_TEMPLATE,
            "payload_available": ONLINE,
            "payload_not_available": OFFLINE,
        }
    payload |= extra
    return DiscoveryMessage(config_topic(component, info.device, object_id), payload)


def discovery_messages(
    info: DeviceInfo,
    models: Iterable[str] = (),
    active: Mapping[str, str] | None = None,
    namespace: str = wire.DEFAULT_NAMESPACE,
    telemetry_interval_s: float | None = 60.0,
) -> list[DiscoveryMessage]:
    """Every discovery config of one device. ``active`` is accepted for callers of earlier versions and
    not used: the figure sensors read the active variant from the status (module docstring)."""
    topics = wire.Topics(namespace)
    device = wire.check_id(info.device, "device")
    status = topics.status(device)
    origin = {"name": ORIGIN_NAME, "sw_version": info.agent_version or "unknown"}
    out = [
        _entity(
            info,
            "binary_sensor",
            "connectivity",
            name="Connectivity",
            state_topic=status,
            value_template=CONNECTIVITY_TEMPLATE,
            origin=origin,
            availability_topic=None,
            device_class="connectivity",
            payload_on="ON",
            payload_off="OFF",
            entity_category="diagnostic",
            json_attributes_topic=status,
            json_attributes_template=(
                "{{ {'board': value_json.get('board'), 'arch': value_json.get('arch'),"
                " 'class': value_json.get('device_class'),"
                " 'agent_version': value_json.get('agent_version')} | tojson }}"
            ),
        )
    ]
    for model in sorted(set(models)):
        wire.check_id(model, "model")
        out += [
            _entity(
                info,
                "sensor",
                f"{model}_active_variant",
                name=f"{model} active variant",
                state_topic=status,
                value_template=active_variant_template(model),
                origin=origin,
                availability_topic=status,
                icon="mdi:chip",
            ),
            _entity(
                info,
                "sensor",
                f"{model}_latency_p50",
                name=f"{model} p50 latency",
                state_topic=status,
                value_template=active_figure_template(model, "latency_ms_p50"),
                origin=origin,
                availability_topic=status,
                unit_of_measurement="ms",
                state_class="measurement",
                device_class="duration",
                suggested_display_precision=2,
                json_attributes_topic=status,
                json_attributes_template=active_attributes_template(model),
            ),
            _entity(
                info,
                "sensor",
                f"{model}_energy",
                name=f"{model} energy per inference",
                state_topic=status,
                value_template=active_figure_template(model, "energy_mj_per_inference"),
                origin=origin,
                availability_topic=status,
                unit_of_measurement="mJ",
                state_class="measurement",
                suggested_display_precision=3,
                icon="mdi:lightning-bolt",
            ),
        ]
    temperature: dict[str, Any] = {
        "unit_of_measurement": "°C",
        "device_class": "temperature",
        "state_class": "measurement",
        "entity_category": "diagnostic",
    }
    if telemetry_interval_s is not None:
        temperature["expire_after"] = max(1, round(3 * telemetry_interval_s))
    out.append(
        _entity(
            info,
            "sensor",
            "cpu_temperature",
            name="CPU temperature",
            state_topic=topics.telemetry(device),
            value_template=TEMPERATURE_TEMPLATE,
            origin=origin,
            availability_topic=status,
            **temperature,
        )
    )
    return out


def removal_messages(messages: Iterable[DiscoveryMessage]) -> list[DiscoveryMessage]:
    """Empty retained payloads that remove these entities from Home Assistant."""
    return [DiscoveryMessage(m.topic, None) for m in messages]
