"""A REAL Home Assistant (2024.3.3) on our discovery configs and statuses (opt-in: EDGEFLEET_HA_TEST=1).

Home Assistant keeps an entity's subscription and templates when a discovery config is republished on
the same topic, so sensors that picked "the active variant" out of the report showed the previous
variant's figures after an assignment. The figure sensors now read the status, which carries the
active file's own figures: this test starts Home Assistant against a private mosquitto and checks that
the p50 and energy sensors show the running variant's numbers within seconds of each activation, and
"unknown" before any.

Home Assistant is installed once into ``~/.cache/edgefleet/ha-2024.3.3`` from its wheel's own
constraints file (``homeassistant/package_constraints.txt``: resolves in under a minute where a plain
install backtracks for long); it installs its integrations' requirements itself on first start (PyPI).
Its entities' states are read back over MQTT through its ``mqtt_statestream`` integration (no HTTP
auth needed). Bounded: every wait has a timeout; Home Assistant and mosquitto are stopped by PID.
"""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import threading
import time
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import paho.mqtt.client as paho
import pytest
from agent_helpers import publish_many, signed_assignment, terminate
from paho.mqtt.enums import CallbackAPIVersion
from test_agent_chaos import chunk_items
from test_agent_integration import (  # noqa: F401  (tiny_models: a fixture)
    Bus,
    new_key,
    start_agent,
    tiny_models,
    variant_for,
    write_config,
)

from agent import wire
from agent.homeassistant import DeviceInfo, discovery_messages
from agent.publishing import with_figures
from deploy.broker.spawn import MosquittoBroker, find_mosquitto, free_port

HA_VERSION = "2024.3.3"
HA_HOME = Path.home() / ".cache" / "edgefleet" / f"ha-{HA_VERSION}"

pytestmark = [
    pytest.mark.homeassistant,
    pytest.mark.skipif(os.environ.get("EDGEFLEET_HA_TEST") != "1", reason="opt-in: EDGEFLEET_HA_TEST=1"),
    pytest.mark.skipif(find_mosquitto() is None, reason="mosquitto is not installed"),
]

DEVICE, MODEL = "pi-kitchen", "digits"
AGENT_DEVICE = "pi-hall"  # the real agent's own entities, apart from the payload test's


def _install() -> Path:
    """Home Assistant's venv, created once (its wheel's own constraints file)."""
    hass = HA_HOME / "venv" / "bin" / "hass"
    if hass.exists():
        return hass
    HA_HOME.mkdir(parents=True, exist_ok=True)
    subprocess.run([sys.executable, "-m", "venv", str(HA_HOME / "venv")], check=True, timeout=120)
    pip = [str(HA_HOME / "venv" / "bin" / "python"), "-m", "pip", "-q"]
    wheels = HA_HOME / "wheel"
    subprocess.run(
        [*pip, "download", "--no-deps", f"homeassistant=={HA_VERSION}", "-d", str(wheels)],
        check=True,
        timeout=300,
    )
    wheel = next(wheels.glob("homeassistant-*.whl"))
    with zipfile.ZipFile(wheel) as z:
        (HA_HOME / "constraints.txt").write_bytes(z.read("homeassistant/package_constraints.txt"))
    subprocess.run(
        [*pip, "install", str(wheel), "-c", str(HA_HOME / "constraints.txt")], check=True, timeout=900
    )
    return hass


class States:
    """Home Assistant's entity states as mqtt_statestream publishes them (retained)."""

    def __init__(self, port: int) -> None:
        self.values: dict[str, str] = {}
        self.lock = threading.Lock()
        self.c = paho.Client(CallbackAPIVersion.VERSION2, protocol=paho.MQTTv5)
        self.c.on_connect = lambda c, *_: c.subscribe("hastates/#")
        self.c.on_message = self._on_message
        self.c.connect("127.0.0.1", port)
        self.c.loop_start()

    def _on_message(self, c: paho.Client, u: object, msg: paho.MQTTMessage) -> None:
        with self.lock:
            self.values[msg.topic] = msg.payload.decode()

    def wait(self, entity: str, want: str, timeout_s: float = 30.0) -> float:
        """Seconds until ``sensor.<entity>``'s state is ``want``."""
        t0 = time.monotonic()
        topic = f"hastates/sensor/{entity}/state"
        while time.monotonic() - t0 < timeout_s:
            with self.lock:
                if self.values.get(topic) == want:
                    return time.monotonic() - t0
            time.sleep(0.1)
        with self.lock:
            raise AssertionError(f"{entity}: {self.values.get(topic)!r}, waited for {want!r}")

    def wait_value(self, entity: str, want: float, timeout_s: float = 30.0) -> float:
        """Seconds until ``sensor.<entity>``'s state is the number ``want`` (Home Assistant may print it
        with another number of digits than the JSON it read)."""
        t0 = time.monotonic()
        topic = f"hastates/sensor/{entity}/state"
        while time.monotonic() - t0 < timeout_s:
            with self.lock:
                text = self.values.get(topic, "")
            try:
                if math.isclose(float(text), want, rel_tol=1e-6, abs_tol=1e-9):
                    return time.monotonic() - t0
            except ValueError:
                pass
            time.sleep(0.1)
        raise AssertionError(f"{entity}: {text!r}, waited for {want!r}")

    def close(self) -> None:
        self.c.loop_stop()
        self.c.disconnect()


@pytest.fixture(scope="module")
def home_assistant(tmp_path_factory: pytest.TempPathFactory) -> Iterator[int]:
    """(broker port) with Home Assistant connected to that broker, mqtt discovery and statestream on."""
    hass = _install()
    cfg = tmp_path_factory.mktemp("ha")
    with MosquittoBroker() as broker:
        (cfg / ".storage").mkdir()
        (cfg / "configuration.yaml").write_text(
            "homeassistant:\n  name: edgefleet-test\n  unit_system: metric\n  time_zone: UTC\n"
            "  latitude: 0\n  longitude: 0\n  elevation: 0\n"
            f"http:\n  server_host: 127.0.0.1\n  server_port: {free_port()}\n"
            "mqtt_statestream:\n  base_topic: hastates\n  publish_attributes: true\n"
            "logger:\n  default: warning\n"
        )
        entry = {
            "entry_id": "edgefleettestmqttentry000000000",
            "version": 1,
            "minor_version": 1,
            "domain": "mqtt",
            "title": "edgefleet test broker",
            "data": {"broker": broker.host, "port": broker.port, "discovery": True},
            "options": {},
            "pref_disable_new_entities": False,
            "pref_disable_polling": False,
            "source": "user",
            "unique_id": None,
            "disabled_by": None,
        }
        store = {"version": 1, "minor_version": 1, "key": "core.config_entries", "data": {"entries": [entry]}}
        (cfg / ".storage" / "core.config_entries").write_text(json.dumps(store))
        log = (cfg / "ha.log").open("wb")
        proc = subprocess.Popen(
            [str(hass), "-c", str(cfg)], stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
        try:
            yield broker.port
        finally:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=10)
            log.close()


def test_figure_sensors_follow_each_activation(home_assistant: int) -> None:
    port = home_assistant
    topics = wire.Topics()
    lat = {
        v: wire.LatencyStats(count=100, mean=p, std=0, min=p, p50=p, p90=p, p95=p, p99=p, max=p)
        for v, p in (("int8", 0.008), ("float32", 0.0157))
    }
    mj = {"int8": 0.153, "float32": 0.274}
    sha = {"int8": "a" * 64, "float32": "b" * 64}
    report = wire.Report(
        device=DEVICE,
        model=MODEL,
        manifest_version=1,
        ts=time.time(),
        results=[
            wire.BenchResult(
                variant=v,
                sha256=sha[v],
                ok=True,
                latency_ms=lat[v],
                energy=wire.Energy(
                    method=wire.EnergyMethod.MODEL, measured=False, mj_per_inference=mj[v], avg_power_w=2
                ),
                ts=time.time(),
            )
            for v in ("int8", "float32")
        ],
    )
    pub = paho.Client(CallbackAPIVersion.VERSION2, protocol=paho.MQTTv5)
    pub.connect("127.0.0.1", port)
    pub.loop_start()
    states = States(port)
    try:

        def status(variant: str | None) -> None:
            active = None
            if variant is not None:
                active = wire.ActiveVariant(
                    variant=variant, sha256=sha[variant], manifest_version=1, activated_at=time.time()
                )
            ms = with_figures(wire.ModelStatus(state=wire.ModelState.COMMITTED, active=active), report)
            st = wire.Status(device=DEVICE, online=True, ts=time.time(), models={MODEL: ms})
            pub.publish(topics.status(DEVICE), st.to_json(), qos=1, retain=True).wait_for_publish(5)

        # what the agent publishes: its discovery configs, its report and its status
        for msg in discovery_messages(DeviceInfo(DEVICE, board="Raspberry Pi 5"), [MODEL]):
            pub.publish(msg.topic, msg.payload_bytes(), qos=1, retain=True).wait_for_publish(5)
        pub.publish(topics.report(DEVICE, MODEL), report.to_json(), qos=1, retain=True).wait_for_publish(5)
        status(None)
        entity = f"edgefleet_{DEVICE.replace('-', '_')}_{MODEL}"
        # first start installs the MQTT integration's requirements: allow it time
        states.wait(f"{entity}_active_variant", "none", timeout_s=240)
        states.wait(f"{entity}_latency_p50", "unknown")
        timings = []
        for variant in ("int8", "float32", "int8"):
            status(variant)
            timings.append(states.wait(f"{entity}_latency_p50", str(lat[variant].p50)))
            timings.append(states.wait(f"{entity}_energy", str(mj[variant])))
            assert states.wait(f"{entity}_active_variant", variant) < 10
        print(
            f"\nHome Assistant showed the active variant's figures {max(timings):.2f} s after an activation"
        )
        assert max(timings) < 10
    finally:
        states.close()
        pub.loop_stop()
        pub.disconnect()


def test_figure_sensors_follow_a_real_agent(
    home_assistant: int,
    tiny_models: Path,  # noqa: F811
    tmp_path: Path,
) -> None:
    """The same with a REAL agent (``python -m agent``, Home Assistant discovery on): it fetches and
    benchmarks two real variants, reports, and is assigned one then the other; Home Assistant's p50 and
    energy sensors show, within seconds of each commit, the figures the agent's status carries for the
    file it runs (which are its own report's figures for that file)."""
    from types import SimpleNamespace

    models = tiny_models
    f32, f16 = (models / "float32.tflite").read_bytes(), (models / "float16.tflite").read_bytes()
    variants = {
        "float32": variant_for("float32", f32, "none"),
        "float16": variant_for("float16", f16, "float16"),
    }
    key, pub = new_key()
    manifest = wire.sign(
        wire.Manifest(
            model=MODEL,
            version=1,
            created_at=time.time(),
            baseline="float32",
            variants=list(variants.values()),
        ),
        key,
    )
    broker: Any = SimpleNamespace(host="127.0.0.1", port=home_assistant)  # write_config/Bus read these
    cfg = write_config(tmp_path, broker, pub, tmp_path / "store")
    text = cfg.read_text().replace('id = "pi-test"', f'id = "{AGENT_DEVICE}"')  # not the payload test's
    cfg.write_text(text.replace("[telemetry]\n", "[telemetry]\nhome_assistant = true\n"))
    topics = wire.Topics()
    bus = Bus(broker, topics)
    states = States(home_assistant)
    proc = start_agent(cfg, tmp_path / "agent.log")
    entity = f"edgefleet_{AGENT_DEVICE.replace('-', '_')}_{MODEL}"
    try:
        publish_many(bus.client, [*chunk_items(f32), *chunk_items(f16)])
        bus.publish(topics.manifest(MODEL), manifest.to_json())
        bus.wait_for(lambda t, o: t == topics.report(AGENT_DEVICE, MODEL), timeout=120)
        states.wait(f"{entity}_active_variant", "none", timeout_s=240)  # discovery seen, nothing active
        states.wait(f"{entity}_latency_p50", "unknown")
        timings = []
        for i, name in enumerate(("float16", "float32", "float16")):
            v = variants[name]
            assignment = signed_assignment(key, AGENT_DEVICE, MODEL, name, v.sha256, 1, policy=f"round-{i}")
            bus.publish(topics.assign(AGENT_DEVICE, MODEL), assignment)
            status = bus.wait_for(
                lambda t, o, name=name: (
                    t == topics.status(AGENT_DEVICE)
                    and (o.get("models", {}).get(MODEL) or {}).get("state") == "committed"
                    and o["models"][MODEL]["active"]["variant"] == name
                ),
                timeout=60,
            )
            t_commit = time.monotonic()
            active = status["models"][MODEL]["active"]
            p50, mj = active["latency_ms_p50"], active["energy_mj_per_inference"]
            assert p50 is not None and p50 > 0 and mj is not None
            assert states.wait_value(f"{entity}_latency_p50", p50) < 30
            assert states.wait_value(f"{entity}_energy", mj) < 30
            assert states.wait(f"{entity}_active_variant", name) < 30
            timings.append(time.monotonic() - t_commit)
        print(
            f"\nreal agent: Home Assistant showed the active file's figures {max(timings):.2f} s after commit"
        )
        assert max(timings) < 10
        assert proc.poll() is None
    finally:
        states.close()
        bus.close()
        terminate(proc, timeout=30)
