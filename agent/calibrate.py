"""``edgefleet-agent calibrate``: measure this board's idle and full-load power and write its profile.

The utilisation model (``P = P_idle + (P_max − P_idle) · u``) starts from published figures that differ
between sources by 30–50 %. Where a measured power backend exists (hwmon INA2xx, Pi 5 PMIC, RAPL, a
discharging battery), this measures both ends on the board itself: ``seconds`` of idle sampling, then
``seconds`` with one busy-looping child process per CPU (each bounded by its own deadline and killed if it
overstays), and writes :class:`agent.board.CalibratedProfile` JSON to ``[energy].profile_file`` (default
``<store.path>/power-profile.json``), which the daemon then uses for the model. With no measured backend
there is nothing to calibrate against: :class:`CalibrationError`, exit 1.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from pydantic import ValidationError

from agent.board import BoardInfo, CalibratedProfile, HardwareError, detect_board, power_profile
from agent.config import AgentConfig
from agent.energy import DEFAULT_PROFILE_NAME, EnergyBackend, PowerSampler, select_backend

log = logging.getLogger(__name__)

_BUSY = (
    "import sys, time\nend = time.monotonic() + float(sys.argv[1])\nwhile time.monotonic() < end:\n    pass\n"
)
LoadFn = Callable[[float, int], None]


class CalibrationError(HardwareError):
    """Nothing to calibrate against, or the sensor gave no usable reading."""


@dataclass(frozen=True, slots=True)
class Calibration:
    profile: CalibratedProfile
    path: Path
    idle_samples: int
    load_samples: int


def busy_all_cores(seconds: float, cores: int) -> None:
    """Keep ``cores`` CPUs busy for ``seconds`` with child processes; bounded (killed at seconds + 5)."""
    procs = [
        subprocess.Popen([sys.executable, "-c", _BUSY, f"{seconds:.3f}"], stdin=subprocess.DEVNULL)
        for _ in range(max(1, cores))
    ]
    deadline = time.monotonic() + seconds + 5.0
    for proc in procs:
        try:
            proc.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            proc.wait(timeout=5.0)


def profile_path(config: AgentConfig) -> Path:
    return config.energy.profile_file or config.store.path / DEFAULT_PROFILE_NAME


def _sample(sampler: PowerSampler, seconds: float, work: Callable[[], None]) -> tuple[float, int]:
    """Average power while ``work`` runs, skipping the first fifth (ramp-up, frequency governor)."""
    t0 = time.monotonic()
    sampler.start()
    try:
        work()
    finally:
        sampler.stop()
    settle = t0 + min(1.0, seconds * 0.2)
    window = sampler.window(settle, None)
    if window.avg_power_w is None or window.samples < 2:
        window = sampler.window()
    if window.avg_power_w is None:
        raise CalibrationError(f"{sampler.backend.sensor}: no power reading in {seconds:g} s")
    return window.avg_power_w, window.samples


def calibrate(
    config: AgentConfig,
    seconds: float,
    *,
    root: Path = Path("/"),
    backend: EnergyBackend | None = None,
    board: BoardInfo | None = None,
    load: LoadFn = busy_all_cores,
    stop: threading.Event | None = None,
) -> Calibration:
    """Measure idle then full-load power for ``seconds`` each and write the profile JSON atomically."""
    if not 0 < seconds <= 600:
        raise CalibrationError(f"--seconds must be in (0, 600], got {seconds:g}")
    stop = stop or threading.Event()
    board = board or detect_board(root)
    skipped: list[str] = []
    profile = power_profile(board.profile_key)
    if backend is None:
        backend, skipped = select_backend(config.energy, root, profile=profile)
    if not backend.measured:
        raise CalibrationError(
            "no power sensor on this board, so nothing to calibrate against (tried: "
            + ("; ".join(skipped) or "nothing")
            + f"). The utilisation model keeps the built-in {profile.key} profile "
            f"({profile.idle_w:g} W idle, {profile.max_w:g} W full load). Measure at the wall with a USB "
            f'power meter and write {{"idle_w": ..., "max_w": ...}} to {profile_path(config)} instead.'
        )
    sampler = PowerSampler(backend, config.energy.interval_s, config.energy.max_samples)
    cores = board.cpu_count
    log.info("calibrating with %s: %g s idle, then %g s on %d cores", backend.sensor, seconds, seconds, cores)

    def idle() -> None:
        stop.wait(seconds)

    idle_w, idle_n = _sample(sampler, seconds, idle)
    max_w, load_n = _sample(sampler, seconds, lambda: load(seconds, cores))
    stamp = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime())
    try:
        result = CalibratedProfile(
            idle_w=round(idle_w, 4),
            max_w=round(max(max_w, idle_w), 4),
            source=f"edgefleet-agent calibrate {stamp}: {seconds:g} s idle + {seconds:g} s load on "
            f"{cores} cores, {backend.method.value} ({backend.sensor})"[:200],
            board=board.model_string[:200] or None,
        )
    except ValidationError as err:
        raise CalibrationError(
            f"{backend.sensor}: implausible readings ({idle_w} / {max_w} W): {err}"
        ) from err
    path = profile_path(config)
    _write_atomic(path, json.dumps(result.model_dump(mode="json"), indent=2) + "\n")
    return Calibration(result, path, idle_n, load_n)


def _write_atomic(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    with tmp.open("w", encoding="utf-8") as fh:
        fh.write(text)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
