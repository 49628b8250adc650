"""Home Assistant discovery published by the agent itself (opt-in), checked on a private mosquitto."""

from __future__ import annotations

import json
import signal
import threading
import time
from pathlib import Path
from typing import Any

import paho.mqtt.client as paho
import pytest
from paho.mqtt.enums import CallbackAPIVersion
from test_agent_integration import DEVICE, PY, new_key, write_config

from agent.wire import Status, Telemetry, Topics
from deploy.broker.spawn import MosquittoBroker, find_mosquitto

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(find_mosquitto() is None, reason="mosquitto is not installed"),
]


def _collect(broker: MosquittoBroker, topic: str, until: float) -> dict[str, tuple[bytes, bool]]:
    got: dict[str, tuple[bytes, bool]] = {}
    lock = threading.Lock()

    def on_message(_c: Any, _u: Any, msg: paho.MQTTMessage) -> None:
        # The latest payload; retained if any delivery was: a topic retained on the broker reaches a new
        # subscriber first as a retained copy, and the agent may publish it again (live) meanwhile.
        with lock:
            retained = bool(msg.retain) or got.get(msg.topic, (b"", False))[1]
            got[msg.topic] = (bytes(msg.payload), retained)

    c = paho.Client(callback_api_version=CallbackAPIVersion.VERSION2, client_id=f"ha-{time.time()}")
    c.on_message = on_message
    c.connect(broker.host, broker.port)
    c.subscribe(topic, 1)
    c.loop_start()
    time.sleep(until)
    c.disconnect()
    c.loop_stop()
    return got


def test_agent_publishes_retained_discovery_that_matches_its_payloads(tmp_path: Path) -> None:
    import subprocess

    topics = Topics()
    _key, pub = new_key()
    with MosquittoBroker() as broker:
        cfg = write_config(tmp_path, broker, pub, tmp_path / "store")
        cfg.write_text(
            cfg.read_text().replace("interval_s = 1", "interval_s = 1\nhome_assistant = true")
            + '[models]\nfollow = ["digits"]\n'
        )
        proc = subprocess.Popen([PY, "-m", "agent", "--config", str(cfg)], stderr=subprocess.DEVNULL)
        try:
            deadline = time.monotonic() + 30
            configs: dict[str, tuple[bytes, bool]] = {}
            while time.monotonic() < deadline and len(configs) < 5:
                configs = _collect(broker, "homeassistant/#", 0.5)
            configs = _collect(broker, "homeassistant/#", 0.5)  # a late subscriber sees retained only
            device_msgs = _collect(broker, f"{topics.ns}/devices/{DEVICE}/#", 2.5)
        finally:
            proc.send_signal(signal.SIGTERM)
            proc.wait(timeout=20)
    assert len(configs) == 5, sorted(configs)  # connectivity, cpu temperature, 3 sensors of "digits"
    status = Status.from_json(device_msgs[topics.status(DEVICE)][0])
    telemetry = Telemetry.from_json(device_msgs[topics.telemetry(DEVICE)][0])
    assert status.online and telemetry.inferences == 0 and telemetry.rss_bytes
    state_topics = {topics.status(DEVICE), topics.telemetry(DEVICE), topics.report(DEVICE, "digits")}
    for topic, (payload, retained) in configs.items():
        assert retained, topic
        assert topic.startswith("homeassistant/") and f"/{DEVICE}/" in topic
        cfg_obj = json.loads(payload)
        assert cfg_obj["state_topic"] in state_topics
        assert cfg_obj["device"]["identifiers"] == [f"edgefleet_{DEVICE}"]
        template = cfg_obj["value_template"]
        if cfg_obj["state_topic"] == topics.status(DEVICE):
            assert "value_json.online" in template or "value_json.models" in template
            raw_status = json.loads(device_msgs[topics.status(DEVICE)][0])
            assert "online" in raw_status and "models" in raw_status and "board" in raw_status
        if cfg_obj["state_topic"] == topics.telemetry(DEVICE):
            assert "temperature_c" in template and "temperature_c" in Telemetry.model_fields
