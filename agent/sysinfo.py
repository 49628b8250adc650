"""What the device is and how it is doing: board, CPU temperature, throttling, RAM, modelled energy.

Every reader takes a root path so tests can point it at a recorded sysfs/procfs tree.
"""

from __future__ import annotations

import os
import platform
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

from agent.wire import Energy, EnergyMethod


def board_name(root: Path = Path("/")) -> str:
    """``/proc/device-tree/model`` (Pi, most ARM boards), else the DMI product, else the platform."""
    for rel in (
        "proc/device-tree/model",
        "sys/firmware/devicetree/base/model",
        "sys/class/dmi/id/product_name",
    ):
        try:
            text = (root / rel).read_bytes().rstrip(b"\x00\n ").decode("utf-8", "replace").strip()
        except OSError:
            continue
        if text:
            return text[:200]
    return f"{platform.system()} {platform.machine()}"[:200]


def cpu_temperature(root: Path = Path("/sys/class/thermal")) -> float | None:
    """CPU temperature in °C from the thermal zones (a cpu-type zone preferred), None if none."""
    try:
        zones = sorted(p for p in root.iterdir() if p.name.startswith("thermal_zone"))
    except OSError:
        return None
    best: float | None = None
    for zone in zones:
        try:
            milli = int((zone / "temp").read_text().strip())
        except (OSError, ValueError):
            continue
        try:
            kind = (zone / "type").read_text().strip().lower()
        except OSError:
            kind = ""
        if "cpu" in kind or "soc" in kind or "x86_pkg" in kind:
            return milli / 1000.0
        if best is None:
            best = milli / 1000.0
    return best


def throttled() -> bool | None:
    """Raspberry Pi: any of bits 0-3 of ``vcgencmd get_throttled`` (throttled now). None where unavailable."""
    exe = shutil.which("vcgencmd")
    if exe is None:
        return None
    try:
        out = subprocess.run(
            [exe, "get_throttled"], capture_output=True, text=True, timeout=2, check=False
        ).stdout
        return bool(int(out.strip().split("=", 1)[1], 16) & 0xF)
    except (OSError, subprocess.SubprocessError, ValueError, IndexError):
        return None


def cpu_count() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


@dataclass(frozen=True, slots=True)
class PowerProfile:
    name: str
    idle_w: float
    max_w: float


# ARCHITECTURE §4, measured at the wall. Sources differ by 30-50 %: calibrate per board.
PROFILES: tuple[tuple[str, PowerProfile], ...] = (
    ("raspberry pi 5", PowerProfile("pi5", 2.8, 9.7)),
    ("raspberry pi 4", PowerProfile("pi4b", 1.6, 5.0)),
    ("raspberry pi 3", PowerProfile("pi3b+", 3.1, 5.6)),
)
GENERIC = PowerProfile("generic", 2.0, 6.0)


def power_profile(board: str) -> PowerProfile:
    low = board.lower()
    return next((p for key, p in PROFILES if key in low), GENERIC)


def modelled_energy(cpu_util: float, cores: int, seconds_per_inference: float, board: str) -> Energy:
    """Utilisation model ``P = P_idle + (P_max − P_idle) · u`` with ``u`` the share of all cores busy.

    Always ``method=model, measured=False``: a modelled figure is never presented as measured.
    """
    prof = power_profile(board)
    u = min(1.0, max(0.0, cpu_util / max(1, cores)))
    power = prof.idle_w + (prof.max_w - prof.idle_w) * u
    return Energy(
        method=EnergyMethod.MODEL,
        measured=False,
        sensor=f"utilisation-model:{prof.name}",
        mj_per_inference=power * seconds_per_inference * 1000.0,
        avg_power_w=power,
        idle_power_w=prof.idle_w,
        samples=0,
    )
