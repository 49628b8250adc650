"""The demo's fallback broker: amqtt in a child process, chosen when mosquitto is not installed.

Unit tests inject the mosquitto finder; the integration tests run the real amqtt child, first against
its known defects (v5 refused, other clients' retained messages delivered), then the whole demo loop
(deploy.demo.run_demo with a small budget) and a Ctrl-C of ``edgefleet demo --broker amqtt``.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from deploy.broker.client import BrokerOptions, MqttSession
from deploy.broker.embedded import (
    NEITHER_INSTALLED,
    AmqttBroker,
    amqtt_available,
    choose_broker,
    main,
    start_broker,
)
from deploy.broker.spawn import MosquittoBroker
from deploy.demo import DEMO_DEVICES, DemoSettings, run_demo
from deploy.errors import BrokerError

ROOT = Path(__file__).resolve().parent.parent
needs_amqtt = pytest.mark.skipif(not amqtt_available(), reason="amqtt is not installed")


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie still answers kill(0); it is dead for our purpose
        return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
    except OSError:
        return False


def no_mosquitto() -> str | None:
    return None


# ------------------------------------------------------------------------------------------- choice


def test_auto_picks_amqtt_when_mosquitto_is_not_found(tmp_path: Path) -> None:
    broker = choose_broker("auto", state_dir=tmp_path, finder=no_mosquitto, amqtt_finder=lambda: True)
    assert isinstance(broker, AmqttBroker)
    assert broker.protocol == "v311" and broker.pid is None and broker.host == "127.0.0.1"
    assert broker.log_path.parent == tmp_path


def test_auto_prefers_mosquitto_when_found(tmp_path: Path) -> None:
    broker = choose_broker("auto", state_dir=tmp_path, finder=lambda: "/opt/x/mosquitto")
    assert isinstance(broker, MosquittoBroker) and broker.binary == "/opt/x/mosquitto"
    forced = choose_broker("amqtt", finder=lambda: "/opt/x/mosquitto", amqtt_finder=lambda: True)
    assert isinstance(forced, AmqttBroker)


def test_neither_installed_says_what_to_install() -> None:
    with pytest.raises(BrokerError) as err:
        choose_broker("auto", finder=no_mosquitto, amqtt_finder=lambda: False)
    assert str(err.value) == NEITHER_INSTALLED
    assert "apt-get install -y mosquitto" in NEITHER_INSTALLED and "amqtt==0.12.1" in NEITHER_INSTALLED
    with pytest.raises(BrokerError, match=r"mosquitto is not installed.*--broker amqtt"):
        choose_broker("mosquitto", finder=no_mosquitto)
    with pytest.raises(BrokerError, match=r"pip install 'amqtt==0\.12\.1'"):
        choose_broker("amqtt", finder=no_mosquitto, amqtt_finder=lambda: False)
    with pytest.raises(ValueError, match="unknown broker"):
        choose_broker("hivemq", finder=no_mosquitto)  # type: ignore[arg-type]


def test_child_refuses_a_non_loopback_listener(tmp_path: Path) -> None:
    config = tmp_path / "amqtt.json"
    config.write_text('{"listeners": {"default": {"type": "tcp", "bind": "0.0.0.0:1883"}}}')
    with pytest.raises(SystemExit) as exit_:
        main(["--port", "1883", "--config", str(config), "--log", str(tmp_path / "log")])
    assert exit_.value.code == 2


@needs_amqtt
def test_start_broker_runs_amqtt_as_a_child_stopped_by_pid(tmp_path: Path) -> None:
    broker = start_broker("auto", state_dir=tmp_path, finder=no_mosquitto)
    try:
        assert isinstance(broker, AmqttBroker)
        pid = broker.pid
        assert pid is not None and alive(pid) and pid != os.getpid()
        assert "listening on 127.0.0.1:" in broker.log_path.read_text()
        options = BrokerOptions(host=broker.host, port=broker.port, protocol="v311")
        with MqttSession(options) as session:
            session.publish("t/x", b"1", retain=True)
            session.flush()
            assert session.collect_retained(["t/x"]) == {"t/x": b"1"}
    finally:
        broker.stop()
    assert not alive(pid)


# ------------------------------------------------------------------------------------------- defects


@pytest.mark.integration
@needs_amqtt
def test_amqtt_defects_are_contained(tmp_path: Path) -> None:
    """v5 is refused with a hint; another client's retained messages never reach collect_retained."""
    with AmqttBroker(state_dir=tmp_path) as broker:
        with pytest.raises(BrokerError, match="unsupported protocol version"):
            MqttSession(BrokerOptions(host=broker.host, port=broker.port)).connect()
        options = BrokerOptions(host=broker.host, port=broker.port, protocol="v311")
        with MqttSession(options) as pub, MqttSession(options) as other:
            for i in range(5):
                pub.publish(f"ns/a/{i}", b"A", retain=True)
                pub.publish(f"ns/b/{i}", b"B", retain=True)
            pub.flush()
            with other.watch(["ns/a/#"]) as w:
                time.sleep(0.3)
                with MqttSession(options) as fresh:
                    got = fresh.collect_retained(["ns/b/1"], quiet_s=0.5)
                assert all(t.startswith("ns/a/") for t, _ in w.drain())
        assert got == {"ns/b/1": b"B"}  # amqtt also sent ns/a/* (the other client's filter): ignored


# ------------------------------------------------------------------------------------------- the loop


@pytest.fixture(scope="module")
def amqtt_demo(tmp_path_factory: pytest.TempPathFactory) -> tuple[Any, list[str]]:
    if not amqtt_available():
        pytest.skip("amqtt is not installed")
    lines: list[str] = []
    settings = DemoSettings(
        workdir=tmp_path_factory.mktemp("amqtt-demo"),
        epochs=1,
        variants=("float32", "int8"),
        bench_min_runs=50,
        bench_min_seconds=0.2,
        probation_s=0.5,
        timeout_s=120,
        broker="amqtt",
    )
    return run_demo(settings, lines.append), lines


@pytest.mark.integration
@pytest.mark.slow
def test_whole_demo_loop_on_amqtt(amqtt_demo: tuple[Any, list[str]]) -> None:
    result, lines = amqtt_demo
    assert result.broker.startswith("amqtt 127.0.0.1:")
    assert len(result.devices) == len(DEMO_DEVICES)
    for row in result.devices:
        assert row["state"] == "committed"
        assert row["variant"] in {"float32", "int8"}
        assert 0 < row["p50_ms"] <= row["p99_ms"]
        toml = (result.workdir / "devices" / row["device"] / "agent.toml").read_text()
        assert 'protocol = "v311"' in toml
        log = (result.workdir / "devices" / row["device"] / "agent.log").read_text()
        assert "(MQTT v311)" in log
    assert any(re.match(r"\s+amqtt pid \d+ on 127\.0\.0\.1:\d+ \(MQTT v311\)", line) for line in lines)
    fallback = [line for line in lines if "embedded amqtt fallback, for a one-machine demo only" in line]
    assert len(fallback) == 1 and "MQTT 3.1.1 only" in fallback[0]
    assert "mosquitto not found" not in fallback[0]  # --broker amqtt was asked for, not a fallback
    assert sum("report stored" in line for line in lines) == len(DEMO_DEVICES)


@pytest.mark.integration
@pytest.mark.slow
def test_amqtt_demo_leaves_no_process_behind(amqtt_demo: tuple[Any, list[str]]) -> None:
    _, lines = amqtt_demo
    pids = [int(p) for line in lines for p in re.findall(r"\bpid (\d+)", line)]
    assert len(pids) == 1 + len(DEMO_DEVICES)  # broker + agents
    assert not [p for p in pids if alive(p)]


@pytest.mark.integration
@pytest.mark.slow
@needs_amqtt
def test_ctrl_c_of_demo_on_amqtt_stops_broker_and_agents(tmp_path: Path) -> None:
    cmd = [sys.executable, "-m", "deploy", "demo", "--broker", "amqtt", "--workdir", str(tmp_path)]
    with subprocess.Popen(
        [*cmd, "--epochs", "1", "--json"],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,  # our SIGINT goes to the demo process alone
    ) as proc:
        assert proc.stderr is not None and proc.stdout is not None
        pids: list[int] = []
        agents = 0
        deadline = time.monotonic() + 120
        try:
            for line in proc.stderr:
                pids += [int(p) for p in re.findall(r"\bpid (\d+)", line)]
                agents += bool(re.search(r"class \w+, \d thread\(s\), pid \d+", line))
                if agents == len(DEMO_DEVICES) or time.monotonic() > deadline:
                    break
            assert agents == len(DEMO_DEVICES), "the demo never started its agents"
            assert len(pids) == 1 + len(DEMO_DEVICES) and all(alive(p) for p in pids)
            proc.send_signal(signal.SIGINT)
            code = proc.wait(timeout=60)
        finally:
            if proc.poll() is None:
                proc.kill()
        out = proc.stdout.read()
        err = proc.stderr.read()
    assert code == 130 and out == "", f"exit {code}, stdout {out[-500:]!r}, stderr {err[-2000:]}"
    end = time.monotonic() + 15
    while any(alive(p) for p in pids) and time.monotonic() < end:
        time.sleep(0.2)
    assert not [p for p in pids if alive(p)], "processes left behind after Ctrl-C"
