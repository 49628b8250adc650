"""Bad input from the hardware: an energy sensor that disappears while the sampler runs, and a
``vcgencmd`` that prints something unexpected. Neither may crash a run; each says why in the log."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Sequence
from pathlib import Path

import pytest
from test_agent_energy import PI5, ina219

from agent.energy import EnergyConfig, EnergyMeter, EnergyMethod, find_hwmon
from agent.thermal import read_throttled, throttled_during


def _meter(root: Path) -> EnergyMeter:
    config = EnergyConfig.model_validate({"interval_s": 0.005, "idle_seconds": 0})
    return EnergyMeter(find_hwmon(root), PI5, cores=4, config=config)


def test_hwmon_file_removed_mid_run_still_reports(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """power1_input vanishes (driver unbound) halfway through the loop: the run still gives an energy
    figure from the samples taken before, and the log names the failing file."""
    device = ina219(tmp_path)
    meter = _meter(tmp_path)

    def run() -> int:
        time.sleep(0.1)
        (device / "power1_input").unlink()  # the sensor disappears while the sampler thread runs
        time.sleep(0.1)
        return 50

    with caplog.at_level(logging.WARNING, logger="agent.energy"):
        energy = meter.measure(run, threading.Event())
    assert not meter.sampler.running
    assert energy is not None and energy.method is EnergyMethod.HWMON and energy.measured
    assert energy.samples >= 2 and energy.avg_power_w == pytest.approx(4.25)
    assert meter.sampler.errors >= 1
    warned = [r.getMessage() for r in caplog.records if "energy sensor read failed" in r.getMessage()]
    assert len(warned) == 1 and "power1_input" in warned[0]  # once, with the reason; then counted


def test_hwmon_gone_for_the_whole_window_falls_back_labelled(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The sensor is gone before the first sample: the figure falls back to the utilisation model and is
    labelled as such (never presented as measured), with the reason logged."""
    device = ina219(tmp_path)
    meter = _meter(tmp_path)
    (device / "power1_input").unlink()

    def run() -> int:
        deadline = time.process_time() + 0.05
        while time.process_time() < deadline:  # some CPU for the model to work with
            pass
        return 10

    with caplog.at_level(logging.WARNING, logger="agent.energy"):
        energy = meter.measure(run, threading.Event())
    assert energy is not None
    assert energy.method is EnergyMethod.MODEL and energy.measured is False
    text = caplog.text
    assert "power1_input" in text and "falling back to the utilisation model" in text


@pytest.mark.parametrize(
    "output",
    [
        "",
        "throttled=",
        "throttled=0xZZZ\n",
        'error=2 error_msg="Command not registered"',
        "VCHI initialization failed\n",
        "\x00\xff garbage \n",
    ],
)
def test_vcgencmd_garbage_is_none_with_a_reason(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, output: str
) -> None:
    def runner(argv: Sequence[str], timeout: float) -> str:
        assert list(argv) == ["vcgencmd", "get_throttled"]
        return output

    with caplog.at_level(logging.WARNING, logger="agent.thermal"):
        state = read_throttled(tmp_path, runner)  # no sysfs fallback under tmp_path
    assert state is None
    assert "unreadable output" in caplog.text
    assert throttled_during(state, state) is None  # unknown, not "not throttled"
