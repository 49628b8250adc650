"""``edgefleet-agent calibrate`` against a recorded hwmon tree, and its refusal where there is no sensor."""

from __future__ import annotations

import base64
import json
import time
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from agent.board import BoardInfo, power_profile
from agent.calibrate import CalibrationError, busy_all_cores, calibrate
from agent.cli import main
from agent.config import AgentConfig, parse_config
from agent.daemon import energy_meter

BOARD = BoardInfo("Raspberry Pi 5", "Raspberry Pi 5 Model B Rev 1.0", "aarch64", 4, 8 << 30, "pi5")


def _config(tmp_path: Path, **energy: object) -> AgentConfig:
    key = Ed25519PrivateKey.generate().public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)
    return parse_config(
        {
            "device": {"id": "pi"},
            "trust": {"public_keys": [base64.b64encode(key).decode()]},
            "store": {"path": str(tmp_path / "store")},
            "energy": {"interval_s": 0.01, **energy},
        }
    )


def _ina219(root: Path, microwatts: int) -> Path:
    dev = root / "sys/class/hwmon/hwmon0"
    dev.mkdir(parents=True)
    (dev / "name").write_text("ina219\n")
    power = dev / "power1_input"
    power.write_text(f"{microwatts}\n")
    return power


def test_calibrate_measures_idle_and_load(tmp_path: Path) -> None:
    root = tmp_path / "root"
    power = _ina219(root, 2_500_000)
    loads: list[tuple[float, int]] = []

    def load(seconds: float, cores: int) -> None:  # what a stress run does to the sensor
        loads.append((seconds, cores))
        power.write_text("6500000\n")
        time.sleep(seconds)
        power.write_text("2500000\n")

    cfg = _config(tmp_path)
    cal = calibrate(cfg, 0.3, root=root, board=BOARD, load=load)
    assert loads == [(0.3, 4)]
    assert cal.profile.idle_w == pytest.approx(2.5) and cal.profile.max_w == pytest.approx(6.5, rel=0.05)
    assert cal.idle_samples >= 5 and cal.load_samples >= 5
    assert cal.path == tmp_path / "store" / "power-profile.json"
    saved = json.loads(cal.path.read_text())
    assert saved["board"] == BOARD.model_string and "ina219" in saved["source"]
    prof = power_profile("pi5", cal.path)
    assert prof.calibrated and prof.idle_w == pytest.approx(2.5)
    meter = energy_meter(cfg, BOARD)  # the daemon picks the calibrated profile up from the store
    assert meter.profile.calibrated and meter.profile.max_w == pytest.approx(cal.profile.max_w)


def test_no_sensor_means_nothing_to_calibrate(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(CalibrationError, match="nothing to calibrate against"):
        calibrate(_config(tmp_path), 0.1, root=tmp_path / "empty", board=BOARD)
    cfg_file = tmp_path / "agent.toml"
    cfg_file.write_text(_toml(tmp_path))
    argv = ["calibrate", "--config", str(cfg_file), "--seconds", "0.1", "--root", str(tmp_path / "empty")]
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert "no power sensor" in err and "power-profile.json" in err
    assert not (tmp_path / "store" / "power-profile.json").exists()


def test_cli_calibrate_writes_the_profile(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    root = tmp_path / "root"
    _ina219(root, 3_000_000)
    cfg_file = tmp_path / "agent.toml"
    cfg_file.write_text(_toml(tmp_path))
    t0 = time.monotonic()
    assert main(["calibrate", "--config", str(cfg_file), "--seconds", "0.3", "--root", str(root)]) == 0
    assert time.monotonic() - t0 < 15
    assert "wrote" in capsys.readouterr().out
    saved = json.loads((tmp_path / "store" / "power-profile.json").read_text())
    assert saved["idle_w"] == pytest.approx(3.0) and saved["max_w"] == pytest.approx(3.0)


def test_busy_load_is_bounded() -> None:
    t0 = time.monotonic()
    busy_all_cores(0.2, 2)
    assert time.monotonic() - t0 < 5


def _toml(tmp_path: Path) -> str:
    key = Ed25519PrivateKey.generate().public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)
    return (
        f'[device]\nid = "pi"\n[trust]\npublic_keys = ["{base64.b64encode(key).decode()}"]\n'
        f'[store]\npath = "{tmp_path / "store"}"\n[energy]\ninterval_s = 0.01\n'
    )
