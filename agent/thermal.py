"""CPU temperature, Raspberry Pi throttling flags, and waiting for the CPU to cool before a benchmark.

Temperature: ``<root>/sys/class/thermal/thermal_zone*/temp`` (millidegrees), a zone whose ``type`` is
``cpu-thermal`` (Raspberry Pi), ``x86_pkg_temp`` or ``soc*`` preferred, else the first readable zone, else
``psutil.sensors_temperatures()``; None when there is nothing (VMs, qemu-user).

Throttling: ``vcgencmd get_throttled`` → ``throttled=0x50005`` (through a :data:`agent.board.CommandRunner`),
falling back to the firmware's sysfs attribute ``<root>/sys/devices/platform/soc/soc:firmware/get_throttled``
(hex, no prefix). Bits 0–3 are the state now (under-voltage, ARM frequency capped, throttled, soft
temperature limit), bits 16–19 the same conditions at any time since boot.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from agent.board import CommandRunner, CommandUnavailable, default_runner

log = logging.getLogger(__name__)

_PREFERRED_ZONES = ("cpu-thermal", "cpu_thermal", "x86_pkg_temp", "soc")
_PSUTIL_PREFERRED = ("cpu_thermal", "cpu-thermal", "coretemp", "k10temp", "soc_thermal")
SensorsFn = Callable[[], dict[str, list[Any]]]


class ThermalConfig(BaseModel):
    """``[thermal]`` section of agent.toml: cool down before each benchmark run so runs start alike."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    cool_below_c: float | None = Field(
        default=70.0,
        ge=20,
        le=110,
        description="before each benchmark run (variant × thread count), wait until the CPU is below this "
        "temperature; null = never wait. A no-op where no temperature sensor exists (VMs, qemu). 70 °C only "
        "waits on a board that is clearly hot; 60 °C gives steadier figures on a Pi 4/5 at the cost of time",
    )
    cool_timeout_s: float = Field(
        default=60.0, ge=0, le=3600, description="longest wait per run; then benchmark anyway (logged)"
    )
    poll_s: float = Field(default=1.0, gt=0, le=60, description="temperature poll period while waiting")


# --------------------------------------------------------------------------------------------------------
# Temperature


def _psutil_sensors() -> dict[str, list[Any]]:
    import psutil  # lazy: a board with thermal zones never needs it (0.8 MB of the idle daemon)

    fn = getattr(psutil, "sensors_temperatures", None)  # absent on macOS/Windows
    if fn is None:
        return {}
    try:
        result: dict[str, list[Any]] = fn()
    except (OSError, RuntimeError):
        return {}
    return result


def _zone_temperatures_in(base: Path) -> list[tuple[str, float]]:
    try:
        zones = sorted(p for p in base.iterdir() if p.name.startswith("thermal_zone"))
    except OSError:
        return []
    out: list[tuple[str, float]] = []
    for zone in zones:
        try:
            milli = int((zone / "temp").read_text().strip())
        except (OSError, ValueError):
            continue  # a zone whose sensor is off reads EINVAL/ENODATA
        try:
            kind = (zone / "type").read_text().strip().lower()
        except OSError:
            kind = ""
        out.append((kind, milli / 1000.0))
    return out


def zone_temperature(thermal_dir: Path) -> float | None:
    """CPU temperature in °C from the ``thermal_zone*`` directories of ``thermal_dir`` only (no psutil)."""
    return _pick_zone(_zone_temperatures_in(thermal_dir))


def _pick_zone(zones: list[tuple[str, float]]) -> float | None:
    for preferred in _PREFERRED_ZONES:
        for kind, temp in zones:
            if kind.startswith(preferred):
                return temp
    return zones[0][1] if zones else None


def cpu_temperature(root: Path = Path("/"), sensors: SensorsFn | None = _psutil_sensors) -> float | None:
    """CPU temperature in °C, or None when no sensor answers; ``sensors=None`` disables psutil."""
    zones = _zone_temperatures_in(root / "sys/class/thermal")
    if zones:
        return _pick_zone(zones)
    if sensors is None:
        return None
    readings = sensors()
    for name in (*_PSUTIL_PREFERRED, *sorted(readings)):
        entries = readings.get(name) or []
        for entry in entries:
            current = getattr(entry, "current", None)
            if isinstance(current, int | float):
                return float(current)
    return None


# --------------------------------------------------------------------------------------------------------
# Throttling


@dataclass(frozen=True, slots=True)
class ThrottleState:
    """Decoded ``get_throttled`` bit field."""

    raw: int
    under_voltage_now: bool
    freq_capped_now: bool
    throttled_now: bool
    soft_temp_limit_now: bool
    under_voltage_since_boot: bool
    freq_capped_since_boot: bool
    throttled_since_boot: bool
    soft_temp_limit_since_boot: bool

    @property
    def any_now(self) -> bool:
        return bool(self.raw & 0xF)

    @property
    def any_since_boot(self) -> bool:
        return bool(self.raw & 0xF000F)

    @classmethod
    def decode(cls, value: int) -> ThrottleState:
        def bit(n: int) -> bool:
            return bool(value >> n & 1)

        return cls(value, bit(0), bit(1), bit(2), bit(3), bit(16), bit(17), bit(18), bit(19))

    def describe(self) -> str:
        now = [n for n, on in self._named(0) if on]
        past = [n for n, on in self._named(16) if on]
        if not now and not past:
            return "not throttled"
        return f"now: {', '.join(now) or 'none'}; since boot: {', '.join(past) or 'none'}"

    def _named(self, offset: int) -> list[tuple[str, bool]]:
        names = ("under-voltage", "frequency capped", "throttled", "soft temperature limit")
        return [(name, bool(self.raw >> (offset + i) & 1)) for i, name in enumerate(names)]


def parse_throttled(text: str) -> ThrottleState:
    """``throttled=0x50005`` (vcgencmd) or ``50005`` (sysfs) → :class:`ThrottleState`, else ValueError."""
    value = text.strip().rpartition("=")[2].strip()
    if not value:
        raise ValueError(f"no throttled value in {text!r}")
    return ThrottleState.decode(int(value, 16))


def read_throttled(
    root: Path = Path("/"), runner: CommandRunner = default_runner, timeout: float = 2.0
) -> ThrottleState | None:
    """Current throttling flags, or None on boards without the Raspberry Pi firmware interface."""
    try:
        return parse_throttled(runner(["vcgencmd", "get_throttled"], timeout))
    except CommandUnavailable as err:
        log.debug("vcgencmd get_throttled unavailable: %s", err)
    except ValueError as err:
        log.warning("vcgencmd get_throttled gave unreadable output: %s", err)
    try:
        text = (root / "sys/devices/platform/soc/soc:firmware/get_throttled").read_text()
        return parse_throttled(text)
    except (OSError, ValueError):
        return None


def throttled_during(before: ThrottleState | None, after: ThrottleState | None) -> bool | None:
    """Whether the CPU was throttled (or capped, or under-voltage) during a run bracketed by two reads.

    True when a *now* bit is set before or after, or when a *since boot* bit appeared between the two
    reads (the condition came and went during the run). None when neither read worked (no firmware
    interface): unknown, not "no".
    """
    if before is None and after is None:
        return None
    if (before is not None and before.any_now) or (after is not None and after.any_now):
        return True
    if before is not None and after is not None:
        return bool((after.raw & ~before.raw) & 0xF0000)
    return False


# --------------------------------------------------------------------------------------------------------
# Cooling down


class CoolOutcome(StrEnum):
    COOL = "cool"  # below the threshold
    TIMEOUT = "timeout"  # still hot when the time ran out
    STOPPED = "stopped"  # the stop event was set
    NO_SENSOR = "no_sensor"  # nothing to wait for


def wait_until_cool(
    threshold_c: float,
    timeout_s: float,
    stop: threading.Event,
    *,
    read_temp: Callable[[], float | None] = cpu_temperature,
    poll_s: float = 1.0,
    clock: Callable[[], float] = time.monotonic,
) -> CoolOutcome:
    """Wait until the CPU is below ``threshold_c``, at most ``timeout_s``, waking early on ``stop``."""
    deadline = clock() + timeout_s
    while True:
        temp = read_temp()
        if temp is None:
            return CoolOutcome.NO_SENSOR
        if temp < threshold_c:
            return CoolOutcome.COOL
        remaining = deadline - clock()
        if remaining <= 0:
            log.info("CPU still at %.1f °C after %.0f s (threshold %.1f °C)", temp, timeout_s, threshold_c)
            return CoolOutcome.TIMEOUT
        if stop.wait(min(poll_s, remaining)):
            return CoolOutcome.STOPPED
