"""Home Assistant discovery: documented keys only, topics the ACL allows, templates that fit the wire."""

from __future__ import annotations

import json
import re

import pytest

from agent import wire
from agent.publishing import with_figures
from deploy.observe.homeassistant import (
    DeviceInfo,
    active_attributes_template,
    active_figure_template,
    discovery_messages,
    removal_messages,
    result_template,
)

# Full (unabbreviated) option names documented for MQTT sensor / binary_sensor discovery.
COMMON = {
    "name",
    "unique_id",
    "object_id",
    "default_entity_id",
    "state_topic",
    "value_template",
    "device",
    "origin",
    "qos",
    "icon",
    "device_class",
    "entity_category",
    "enabled_by_default",
    "expire_after",
    "force_update",
    "json_attributes_topic",
    "json_attributes_template",
    "availability_topic",
    "availability_template",
    "availability",
    "availability_mode",
    "payload_available",
    "payload_not_available",
    "encoding",
}
SENSOR = COMMON | {
    "unit_of_measurement",
    "state_class",
    "suggested_display_precision",
    "last_reset_value_template",
}
BINARY_SENSOR = COMMON | {"payload_on", "payload_off", "off_delay"}
DEVICE = {
    "identifiers",
    "name",
    "model",
    "manufacturer",
    "sw_version",
    "hw_version",
    "connections",
    "via_device",
}
TOPIC = re.compile(r"^homeassistant/(sensor|binary_sensor)/([a-z0-9][a-z0-9_-]*)/([A-Za-z0-9_-]+)/config$")


def messages() -> list:
    info = DeviceInfo("pi-kitchen", board="Raspberry Pi 5", agent_version="0.1.0")
    return discovery_messages(info, models=["digits"])


def test_payloads_use_documented_keys_and_topics() -> None:
    msgs = messages()
    assert len(msgs) == 5
    unique = set()
    for m in msgs:
        match = TOPIC.match(m.topic)
        assert match, m.topic
        assert match.group(2) == "pi-kitchen"  # node id = device id: the ACL's homeassistant/+/%u/+/config
        allowed = SENSOR if match.group(1) == "sensor" else BINARY_SENSOR
        payload = json.loads(m.payload_bytes())
        assert set(payload) <= allowed, set(payload) - allowed
        assert set(payload["device"]) <= DEVICE
        assert payload["device"]["identifiers"] == ["edgefleet_pi-kitchen"]
        assert payload["default_entity_id"] == f"{match.group(1)}.{payload['unique_id']}"
        assert m.retain and m.qos == 1
        unique.add(payload["unique_id"])
        if match.group(1) == "sensor":
            assert payload["availability_topic"] == "edgefleet/devices/pi-kitchen/status"
            assert (payload["payload_available"], payload["payload_not_available"]) == ("online", "offline")
    assert len(unique) == len(msgs)
    by_id = {json.loads(m.payload_bytes())["unique_id"]: json.loads(m.payload_bytes()) for m in msgs}
    latency = by_id["edgefleet_pi_kitchen_digits_latency_p50"]
    assert (latency["unit_of_measurement"], latency["state_class"]) == ("ms", "measurement")
    # figures come from the status, republished on every activation: never a previous variant's numbers
    assert latency["state_topic"] == latency["json_attributes_topic"] == "edgefleet/devices/pi-kitchen/status"
    temp = by_id["edgefleet_pi_kitchen_cpu_temperature"]
    assert (temp["device_class"], temp["unit_of_measurement"], temp["expire_after"]) == (
        "temperature",
        "°C",
        180,
    )
    assert (
        by_id["edgefleet_pi_kitchen_energy"]
        if False
        else by_id["edgefleet_pi_kitchen_digits_energy"]["unit_of_measurement"] == "mJ"
    )
    conn = by_id["edgefleet_pi_kitchen_connectivity"]
    assert conn["device_class"] == "connectivity" and "availability_topic" not in conn
    assert all(m.payload_bytes() == b"" for m in removal_messages(msgs))


def test_templates_reference_wire_fields() -> None:
    """Every value_json.<field> and attribute path in the templates exists in the wire models."""
    fields = set()
    for cls in (
        wire.Status,
        wire.ModelStatus,
        wire.ActiveVariant,
        wire.Report,
        wire.BenchResult,
        wire.LatencyStats,
        wire.Energy,
        wire.Telemetry,
    ):
        fields |= {f.alias or n for n, f in cls.model_fields.items()}
    for m in messages():
        payload = m.payload or {}
        for key in ("value_template", "availability_template", "json_attributes_template"):
            text = payload.get(key, "")
            names = set(re.findall(r"value_json\.(\w+)", text)) - {"get"}
            names |= {p for path in re.findall(r"attribute='([\w.]+)'", text) for p in path.split(".")}
            names |= set(re.findall(r"selectattr\('(\w+)'", text))
            names |= set(re.findall(r"m\.(?:get\(')?(\w+)", text)) - {"get"}
            names |= set(re.findall(r"active\.(?:get\(')?(\w+)", text)) - {"get"}
            names |= set(re.findall(r"value_json\.get\('(\w+)'", text))
            assert names <= fields, (m.topic, key, names - fields)


def render(template: str, payload: bytes) -> str:
    jinja2 = pytest.importorskip("jinja2")
    return jinja2.Environment().from_string(template).render(value_json=json.loads(payload))


def test_templates_render_with_jinja() -> None:
    lat = wire.LatencyStats(count=5, mean=2, std=0, min=2, p50=2.5, p90=2, p95=2, p99=2, max=2)
    energy = wire.Energy(method=wire.EnergyMethod.MODEL, measured=False, mj_per_inference=1.5, avg_power_w=3)
    results = [
        wire.BenchResult(variant="int8", sha256="a" * 64, ok=True, latency_ms=lat, energy=energy, ts=1),
        wire.BenchResult(variant="f32", sha256="b" * 64, ok=False, error=wire.BenchError.OOM, ts=1),
    ]
    report = wire.Report(device="pi-1", model="digits", manifest_version=1, ts=1, results=results).to_json()
    assert render(result_template("latency_ms.p50", "int8"), report) == "2.5"
    assert render(result_template("latency_ms.p50"), report) == "2.5"
    assert render(result_template("latency_ms.p50", "f32"), report) == "None"
    assert render(result_template("energy.mj_per_inference", "int8"), report) == "1.5"


def test_figure_sensors_follow_the_active_variant() -> None:
    """The status carries the ACTIVE file's figures (from the device's latest report), so the p50 and
    energy sensors change the moment an activation changes the status, and never mix two variants."""
    lat = {
        v: wire.LatencyStats(count=5, mean=p, std=0, min=p, p50=p, p90=p, p95=p, p99=p, max=p)
        for v, p in (("int8", 0.008), ("f32", 0.0157))
    }
    energy = {
        v: wire.Energy(method=wire.EnergyMethod.MODEL, measured=False, mj_per_inference=mj, avg_power_w=3)
        for v, mj in (("int8", 0.153), ("f32", 0.274))
    }
    sha = {"int8": "a" * 64, "f32": "b" * 64}
    results = [
        wire.BenchResult(variant=v, sha256=sha[v], ok=True, latency_ms=lat[v], energy=energy[v], ts=1)
        for v in ("int8", "f32")
    ]
    report = wire.Report(device="pi-1", model="digits", manifest_version=1, ts=1, results=results)
    fig = active_figure_template("digits", "latency_ms_p50")
    mj = active_figure_template("digits", "energy_mj_per_inference")
    attrs = active_attributes_template("digits")

    def status(variant: str | None) -> bytes:
        active = None
        if variant is not None:
            active = wire.ActiveVariant(
                variant=variant, sha256=sha[variant], manifest_version=1, activated_at=1
            )
        ms = with_figures(wire.ModelStatus(state=wire.ModelState.COMMITTED, active=active), report)
        return wire.Status(device="pi-1", online=True, ts=1, models={"digits": ms}).to_json()

    assert (render(fig, status(None)), render(mj, status(None))) == ("None", "None")  # nothing runs yet
    assert (render(fig, status("int8")), render(mj, status("int8"))) == ("0.008", "0.153")
    assert (render(fig, status("f32")), render(mj, status("f32"))) == ("0.0157", "0.274")
    assert json.loads(render(attrs, status("f32"))) == {"variant": "f32", "manifest_version": 1}
    # an active file the report has no successful result for: no figure rather than another variant's
    other = wire.ActiveVariant(variant="fp16", sha256="c" * 64, manifest_version=1, activated_at=1)
    ms = with_figures(wire.ModelStatus(state=wire.ModelState.COMMITTED, active=other), report)
    assert ms.active is not None and ms.active.latency_ms_p50 is None
