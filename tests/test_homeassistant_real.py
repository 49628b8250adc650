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
import os
import signal
import subprocess
import sys
import threading
import time
import zipfile
from collections.abc import Iterator
from pathlib import Path

import paho.mqtt.client as paho
import pytest
from paho.mqtt.enums import CallbackAPIVersion

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
