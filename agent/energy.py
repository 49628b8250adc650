"""Energy per inference: power backends, a background sampler, and the arithmetic that yields ``wire.Energy``.

Backends, best first (``select_backend`` with ``kind="auto"``; any one can be forced by name):

========  ==================================================================================  =========
kind      source                                                                              measured
========  ==================================================================================  =========
hwmon     INA219/INA226/INA3221 (ina2xx/ina3221 drivers) under ``/sys/class/hwmon``: ``power1_input`` yes
          (µW) or Σ ``currN_input`` (mA) × ``inN_input`` (mV)
pmic      Raspberry Pi 5 ``vcgencmd pmic_read_adc``: Σ V·I over the PMIC rails, then the published yes (fit)
          fit ``real ≈ 1.1451·x + 0.5879 W`` (the rails miss the 5 V loads: USB, fan, HATs)
rapl      x86 ``/sys/class/powercap/intel-rapl:N/energy_uj`` counters (CPU package only, not the   yes
          whole machine); ``energy_uj`` is root-only on kernels ≥ 5.10
battery   ``/sys/class/power_supply/*`` of type Battery, only while ``Discharging``: ``power_now`` yes
          (µW) or ``current_now`` (µA) × ``voltage_now`` (µV). While charging or on AC the battery
          reading is the charge current, not the board's draw, so it is refused.
model     ``P = P_idle + (P_max − P_idle) · u`` from the board profile and the benchmark's CPU       **no**
          utilisation ``u`` (CPU seconds / wall seconds / cores)
========  ==================================================================================  =========

How the bench runner uses it (the benchmark itself runs in a child process; the parent samples)::

    meter = EnergyMeter.from_config(cfg.energy, board=detect_board())   # once, at daemon start
    idle_w = meter.idle_baseline(stop)              # cfg.idle_seconds of sampling, before the child
    meter.start()
    outcome = run_child(...)                        # child reports duration_s, count, cpu_util
    window = meter.stop()                           # or meter.stop(t0, t1): the child's timed loop,
                                                    # as time.monotonic() marks (system-wide clock)
    energy = meter.energy(window, inferences=count, duration_s=duration_s,
                          cpu_util=cpu_util, idle_w=idle_w)             # wire.Energy or None

``mj_per_inference = avg_power_w × duration_s / inferences × 1000`` is *whole-board* energy (idle draw
included); ``idle_power_w`` is reported beside it so a consumer can compute the net share. A measured
backend whose window holds no sample falls back to the model (labelled so), never to a made-up figure.

Errors (see :mod:`agent.board` for the tree): :class:`SensorError` when a read fails now (the sampler
skips and counts it); :class:`BackendUnavailable` when a backend is absent, with ``reason``.
"""

from __future__ import annotations

import itertools
import logging
import os
import re
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Protocol, runtime_checkable

from pydantic import BaseModel, ConfigDict, Field

from agent.board import (
    BoardInfo,
    CommandRunner,
    CommandUnavailable,
    HardwareError,
    PowerProfile,
    default_runner,
    detect_board,
    power_profile,
)
from agent.wire import Energy, EnergyMethod

log = logging.getLogger(__name__)

BackendKind = Literal["auto", "hwmon", "pmic", "rapl", "battery", "model"]
AUTO_ORDER: tuple[BackendKind, ...] = ("hwmon", "pmic", "rapl", "battery", "model")
HWMON_CHIPS = ("ina219", "ina220", "ina226", "ina230", "ina231", "ina2xx", "ina3221", "ina238")
PMIC_FIT_SLOPE = 1.1451
PMIC_FIT_OFFSET_W = 0.5879
DEFAULT_PROFILE_NAME = "power-profile.json"

Opener = Callable[[Path], str]
"""Reads a sysfs file as text; injected by tests to simulate EACCES (tests run as root)."""


def read_text(path: Path) -> str:
    return path.read_text(encoding="ascii", errors="replace").strip()


class SensorError(HardwareError):
    """A sensor that cannot be read right now (EIO, a disabled channel, a battery that started charging)."""


class BackendUnavailable(SensorError):
    """An energy backend that is absent or unusable on this board; ``reason`` is a sentence for the log."""

    def __init__(self, kind: str, reason: str) -> None:
        super().__init__(f"{kind}: {reason}")
        self.kind = kind
        self.reason = reason


class EnergyConfig(BaseModel):
    """``[energy]`` section of agent.toml: which power backend, how often to sample, the idle baseline."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    kind: BackendKind = Field(default="auto", description="auto = hwmon, pmic, rapl, battery, then model")
    require: bool = Field(
        default=False, description="a forced kind that is unavailable is an error instead of falling back"
    )
    interval_s: float = Field(default=0.05, ge=0.005, le=5, description="sampling period")
    idle_seconds: float = Field(
        default=1.0,
        ge=0,
        le=60,
        description="seconds of idle sampling just before each benchmark run (measured backends only; the "
        "model uses the profile's idle figure); 0 = off. Small by default so demos stay fast; 3–5 s gives a "
        "steadier baseline on a real board",
    )
    max_samples: int = Field(default=100_000, ge=16, description="sampler ring buffer bound")
    hwmon_device: str | None = Field(
        default=None, description="hwmon chip name (ina3221) or directory (hwmon2); default: first INA found"
    )
    hwmon_channels: list[int] | None = Field(
        default=None, description="INA3221 channels (1-3) to sum; default: every enabled channel"
    )
    pmic_fit_slope: float = Field(default=PMIC_FIT_SLOPE, gt=0, description="real W = slope · Σ V·I + offset")
    pmic_fit_offset_w: float = Field(default=PMIC_FIT_OFFSET_W, ge=0)
    command_timeout_s: float = Field(default=2.0, gt=0, le=30, description="vcgencmd timeout")
    profile_file: Path | None = Field(
        default=None,
        description="calibrated power profile JSON (written by `edgefleet-agent calibrate`); replaces the "
        f"built-in board profile. Default: <store.path>/{DEFAULT_PROFILE_NAME} when that file exists",
    )


def resolve_profile_file(config: EnergyConfig, store_path: Path) -> Path | None:
    """The calibration file to use: the configured one (must exist), else the store's if it exists."""
    if config.profile_file is not None:
        return config.profile_file
    default = store_path / DEFAULT_PROFILE_NAME
    return default if default.is_file() else None


# --------------------------------------------------------------------------------------------------------
# The backend interface


@runtime_checkable
class EnergyBackend(Protocol):
    """A power source. ``counter`` backends are read with :meth:`read_energy_j` (cumulative joules,
    monotonic, wrap-around already undone); the others with :meth:`read_power_w` (instantaneous watts)."""

    method: EnergyMethod
    sensor: str
    measured: bool
    counter: bool

    def read_power_w(self) -> float: ...

    def read_energy_j(self) -> float: ...


class _PowerOnly:
    counter = False

    def read_energy_j(self) -> float:
        raise SensorError(f"{type(self).__name__} is an instantaneous-power backend; use read_power_w")


def _num(opener: Opener, path: Path) -> float:
    try:
        return float(opener(path))
    except OSError as err:
        raise SensorError(f"cannot read {path}: {err.strerror or err}") from err
    except ValueError as err:
        raise SensorError(f"{path} does not hold a number: {err}") from err


# --------------------------------------------------------------------------------------------------------
# hwmon (INA2xx / INA3221)


class HwmonBackend(_PowerOnly):
    """INA power monitors under ``/sys/class/hwmon``.

    Channel pairing: the kernel numbers a channel's current ``currN_input`` like its *bus* voltage
    ``inN_input``. ina2xx (INA219/226/…): ``in0`` is the shunt drop, ``in1`` the bus, ``curr1``,
    ``power1_input`` — so ``power1_input`` is used when present, else ``curr1 × in1``. ina3221: ``in1–in3``
    bus, ``in4–in6`` shunt, ``curr1–curr3`` — so channel N is ``currN × inN``, summed over the channels
    (disabled channels read ENODATA or are absent and are skipped). ``inN`` with no ``currN`` (shunts) is
    never used.
    """

    method = EnergyMethod.HWMON
    measured = True

    def __init__(
        self, device: Path, chip: str, channels: Iterable[int] | None = None, opener: Opener = read_text
    ):
        self.device = device
        self.chip = chip
        self._opener = opener
        self.power_file: Path | None = device / "power1_input" if (device / "power1_input").exists() else None
        available = sorted(
            int(m.group(1))
            for p in device.glob("curr*_input")
            if (m := re.fullmatch(r"curr(\d+)_input", p.name)) and (device / f"in{m.group(1)}_input").exists()
        )
        wanted = set(channels) if channels is not None else None
        self.channels = [c for c in available if wanted is None or c in wanted]
        if channels is not None and self.power_file is not None and list(channels) != [1]:
            self.power_file = None  # a channel subset asked for: go per channel
        if self.power_file is None and not self.channels:
            raise BackendUnavailable("hwmon", f"{device} ({chip}) has no power1_input and no currN/inN pair")
        if self.power_file is not None:
            self.sensor = f"{chip} {device.name} power1_input"
        else:
            labels = [self._label(c) for c in self.channels]
            self.sensor = f"{chip} {device.name} Σ curr×in over {', '.join(labels)}"

    def _label(self, channel: int) -> str:
        try:
            return f"ch{channel}({self._opener(self.device / f'in{channel}_label')})"
        except OSError:
            return f"ch{channel}"

    def read_power_w(self) -> float:
        if self.power_file is not None:
            return _num(self._opener, self.power_file) / 1e6  # µW
        total = 0.0
        read = 0
        for c in self.channels:
            try:
                ma = _num(self._opener, self.device / f"curr{c}_input")
                mv = _num(self._opener, self.device / f"in{c}_input")
            except SensorError:
                continue  # channel switched off since; the others still count
            total += abs(ma) * mv / 1e6  # mA × mV = µW
            read += 1
        if read == 0:
            raise SensorError(f"no channel of {self.chip} {self.device.name} could be read")
        return total


def find_hwmon(
    root: Path, device: str | None = None, channels: Iterable[int] | None = None, opener: Opener = read_text
) -> HwmonBackend:
    base = root / "sys/class/hwmon"
    try:
        dirs = sorted(base.glob("hwmon*"), key=lambda p: int(p.name[5:]) if p.name[5:].isdigit() else 1 << 30)
    except OSError as err:
        raise BackendUnavailable("hwmon", f"cannot list {base}: {err}") from err
    seen: list[str] = []
    for d in dirs:
        try:
            name = opener(d / "name")
        except OSError:
            continue
        seen.append(f"{d.name}={name}")
        if device is not None and device not in {name, d.name}:
            continue
        if name in HWMON_CHIPS:
            return HwmonBackend(d, name, channels, opener)
    what = f"hwmon device {device!r}" if device else f"INA power monitor ({', '.join(HWMON_CHIPS[:4])}, …)"
    raise BackendUnavailable("hwmon", f"no {what} under {base} (found: {', '.join(seen) or 'nothing'})")


# --------------------------------------------------------------------------------------------------------
# Raspberry Pi 5 PMIC

_PMIC_LINE = re.compile(
    r"^\s*(?P<rail>\S+?)_(?P<unit>[AV])\s+(?:current|volt)\(\d+\)=(?P<value>[-+0-9.eE]+)(?P=unit)\s*$"
)


def parse_pmic_adc(text: str) -> dict[str, tuple[float, float]]:
    """``vcgencmd pmic_read_adc`` output → rail → (volts, amps), for rails that have both readings.

    Lines look like ``VDD_CORE_A current(7)=2.01500000A`` and ``VDD_CORE_V volt(15)=0.79000000V``; rails
    are paired by the name before ``_A``/``_V``. Voltage-only rails (``EXT5V_V``, ``BATT_V``) are dropped.
    """
    amps: dict[str, float] = {}
    volts: dict[str, float] = {}
    for line in text.splitlines():
        m = _PMIC_LINE.match(line)
        if m is None:
            continue
        (amps if m["unit"] == "A" else volts)[m["rail"]] = float(m["value"])
    return {rail: (volts[rail], amps[rail]) for rail in sorted(amps.keys() & volts.keys())}


class PmicBackend(_PowerOnly):
    """Pi 5 PMIC ADC. Each read runs ``vcgencmd`` (~10 ms), so sample at ≥ 50 ms."""

    method = EnergyMethod.PMIC
    measured = True

    def __init__(
        self,
        runner: CommandRunner = default_runner,
        slope: float = PMIC_FIT_SLOPE,
        offset_w: float = PMIC_FIT_OFFSET_W,
        timeout: float = 2.0,
    ) -> None:
        self._runner = runner
        self.slope = slope
        self.offset_w = offset_w
        self.timeout = timeout
        try:
            rails = parse_pmic_adc(runner(["vcgencmd", "pmic_read_adc"], timeout))
        except CommandUnavailable as err:
            raise BackendUnavailable("pmic", f"vcgencmd pmic_read_adc unavailable: {err}") from err
        if not rails:
            raise BackendUnavailable("pmic", "vcgencmd pmic_read_adc printed no rail with both V and A")
        self.rails = sorted(rails)
        self.sensor = (
            f"vcgencmd pmic_read_adc Σ V·I over {len(rails)} rails, fit {slope:g}·x + {offset_w:g} W"
        )

    def raw_rail_power_w(self) -> float:
        try:
            rails = parse_pmic_adc(self._runner(["vcgencmd", "pmic_read_adc"], self.timeout))
        except CommandUnavailable as err:
            raise SensorError(f"vcgencmd pmic_read_adc failed: {err}") from err
        if not rails:
            raise SensorError("vcgencmd pmic_read_adc printed no rail readings")
        return sum(v * abs(a) for v, a in rails.values())

    def read_power_w(self) -> float:
        return self.slope * self.raw_rail_power_w() + self.offset_w


# --------------------------------------------------------------------------------------------------------
# RAPL


class RaplBackend:
    """Sum of the top-level ``intel-rapl:N`` package counters, wrap-around undone.

    The counter wraps at ``max_energy_range_uj``; a reading below the previous one adds that range. This
    is exact as long as reads come more often than one wrap (≥ 60 s at package power), which the sampler
    guarantees. Not thread-safe: one sampler at a time.
    """

    method = EnergyMethod.RAPL
    measured = True
    counter = True

    def __init__(self, root: Path, opener: Opener = read_text) -> None:
        base = root / "sys/class/powercap"
        self._opener = opener
        zones = sorted(p for p in base.glob("intel-rapl:*") if p.name.count(":") == 1)
        if not zones:
            raise BackendUnavailable(
                "rapl", f"no intel-rapl zone under {base} (not x86, or powercap not loaded)"
            )
        self.zones = zones
        self._ranges: list[float] = []
        self._last: list[float] = []
        self._total_uj = 0.0
        for zone in zones:
            try:
                self._last.append(float(opener(zone / "energy_uj")))
            except PermissionError as err:
                raise BackendUnavailable(
                    "rapl",
                    f"{zone / 'energy_uj'} is readable by root only (kernel ≥ 5.10); run the agent as "
                    "root or grant read access with a udev rule / tmpfiles.d chmod",
                ) from err
            except (OSError, ValueError) as err:
                raise BackendUnavailable("rapl", f"cannot read {zone / 'energy_uj'}: {err}") from err
            try:
                self._ranges.append(float(opener(zone / "max_energy_range_uj")))
            except (OSError, ValueError):
                self._ranges.append(float(2**32))
        names = []
        for zone in zones:
            try:
                names.append(f"{zone.name}({opener(zone / 'name')})")
            except OSError:
                names.append(zone.name)
        self.sensor = f"powercap {' + '.join(names)} energy_uj"

    def read_energy_j(self) -> float:
        for i, zone in enumerate(self.zones):
            raw = _num(self._opener, zone / "energy_uj")
            delta = raw - self._last[i]
            if delta < 0:  # wrapped since the last read
                delta += self._ranges[i]
            self._total_uj += delta
            self._last[i] = raw
        return self._total_uj / 1e6

    def read_power_w(self) -> float:
        raise SensorError("RAPL is a counter backend; use read_energy_j")


# --------------------------------------------------------------------------------------------------------
# Battery


class BatteryBackend(_PowerOnly):
    """A discharging battery: the board's draw. While charging/full the reading is refused (SensorError)."""

    method = EnergyMethod.BATTERY
    measured = True

    def __init__(self, supply: Path, opener: Opener = read_text) -> None:
        self.supply = supply
        self._opener = opener
        self.uses_power_now = (supply / "power_now").exists()
        if not self.uses_power_now and not (
            (supply / "current_now").exists() and (supply / "voltage_now").exists()
        ):
            raise BackendUnavailable(
                "battery", f"{supply} has neither power_now nor current_now + voltage_now"
            )
        what = "power_now" if self.uses_power_now else "current_now × voltage_now"
        self.sensor = f"power_supply {supply.name} {what} (discharging)"

    def status(self) -> str:
        try:
            return self._opener(self.supply / "status")
        except OSError:
            return "Unknown"

    def read_power_w(self) -> float:
        status = self.status()
        if status != "Discharging":
            raise SensorError(f"battery {self.supply.name} is {status}; its reading is not the board's draw")
        if self.uses_power_now:
            return abs(_num(self._opener, self.supply / "power_now")) / 1e6  # µW
        ua = _num(self._opener, self.supply / "current_now")
        uv = _num(self._opener, self.supply / "voltage_now")
        return abs(ua) * uv / 1e12  # µA × µV = pW


def find_battery(root: Path, opener: Opener = read_text) -> BatteryBackend:
    base = root / "sys/class/power_supply"
    found: list[str] = []
    for supply in sorted(base.glob("*")):
        try:
            kind = opener(supply / "type")
        except OSError:
            continue
        if kind != "Battery":
            continue
        backend = BatteryBackend(supply, opener)
        status = backend.status()
        if status == "Discharging":
            return backend
        found.append(f"{supply.name} is {status}")
    if found:
        raise BackendUnavailable(
            "battery", f"{'; '.join(found)} — only a discharging battery measures the board's draw"
        )
    raise BackendUnavailable("battery", f"no power supply of type Battery under {base}")


# --------------------------------------------------------------------------------------------------------
# Utilisation model


def _system_utilisation() -> Callable[[], float]:
    """A stateful reader of system-wide busy share since its previous call (psutil cpu_times)."""
    import psutil  # lazy: first needed when power is read; the idle daemon does without it (0.8 MB)

    last = psutil.cpu_times()

    def read() -> float:
        nonlocal last
        cur = psutil.cpu_times()
        busy = (cur.user + cur.system + getattr(cur, "nice", 0.0)) - (
            last.user + last.system + getattr(last, "nice", 0.0)
        )
        total = sum(cur) - sum(last)
        last = cur
        return busy / total if total > 0 else 0.0

    return read


class ModelBackend(_PowerOnly):
    """``P = P_idle + (P_max − P_idle) · u``. Never measured.

    :meth:`power_w` takes the benchmark's own utilisation (what :meth:`EnergyMeter.energy` uses);
    :meth:`read_power_w` models the *system-wide* utilisation since the previous read, which is all a
    sampler can see.
    """

    method = EnergyMethod.MODEL
    measured = False

    def __init__(self, profile: PowerProfile, utilisation: Callable[[], float] | None = None) -> None:
        self.profile = profile
        self._utilisation = utilisation
        self.sensor = (
            f"utilisation model {profile.key} {profile.idle_w:g}–{profile.max_w:g} W ({profile.source})"
        )[:200]

    def power_w(self, utilisation: float) -> float:
        return self.profile.power_at(utilisation)

    def read_power_w(self) -> float:
        if self._utilisation is None:
            self._utilisation = _system_utilisation()
        return self.power_w(self._utilisation())


# --------------------------------------------------------------------------------------------------------
# Selection


def _build(
    kind: BackendKind,
    *,
    cfg: EnergyConfig,
    root: Path,
    runner: CommandRunner,
    profile: PowerProfile,
    opener: Opener,
) -> EnergyBackend:
    if kind == "hwmon":
        return find_hwmon(root, cfg.hwmon_device, cfg.hwmon_channels, opener)
    if kind == "pmic":
        return PmicBackend(runner, cfg.pmic_fit_slope, cfg.pmic_fit_offset_w, cfg.command_timeout_s)
    if kind == "rapl":
        return RaplBackend(root, opener)
    if kind == "battery":
        return find_battery(root, opener)
    return ModelBackend(profile)


def _probe(backend: EnergyBackend) -> None:
    """One read, so a backend that lists but cannot be read is skipped at selection, not mid-benchmark."""
    try:
        if backend.counter:
            backend.read_energy_j()
        else:
            backend.read_power_w()
    except SensorError as err:
        raise BackendUnavailable(backend.method.value, f"first read failed: {err}") from err


def select_backend(
    config: EnergyConfig | None = None,
    root: Path = Path("/"),
    runner: CommandRunner = default_runner,
    profile: PowerProfile | None = None,
    opener: Opener = read_text,
) -> tuple[EnergyBackend, list[str]]:
    """The backend to use and, for every better one passed over, why.

    ``kind="auto"`` tries hwmon, pmic, rapl, battery and ends at the model, which always works. A forced
    kind that is unavailable falls back to the model with the reason recorded, or raises
    :class:`BackendUnavailable` when ``require`` is set. ``profile`` defaults to the detected board's
    (``config.profile_file`` replacing it).
    """
    cfg = config or EnergyConfig()
    if profile is None:
        profile = power_profile(detect_board(root).profile_key, cfg.profile_file)
    order: tuple[BackendKind, ...] = AUTO_ORDER if cfg.kind == "auto" else (cfg.kind,)
    skipped: list[str] = []
    for kind in order:
        if kind == "model":
            break
        try:
            backend = _build(kind, cfg=cfg, root=root, runner=runner, profile=profile, opener=opener)
            _probe(backend)
        except BackendUnavailable as err:
            if cfg.require and cfg.kind != "auto":
                raise
            skipped.append(f"{kind}: {err.reason}")
            continue
        return backend, skipped
    return ModelBackend(profile), skipped


# --------------------------------------------------------------------------------------------------------
# Sampling


@dataclass(frozen=True, slots=True)
class PowerWindow:
    """Average power over a sampled window. ``avg_power_w`` is None when the window holds too few samples."""

    avg_power_w: float | None
    seconds: float
    samples: int
    errors: int = 0

    @property
    def energy_j(self) -> float | None:
        return None if self.avg_power_w is None else self.avg_power_w * self.seconds


def average_power(samples: Iterable[tuple[float, float]], counter: bool) -> tuple[float | None, float, int]:
    """(avg W, seconds spanned, n) of ``(t, value)`` samples: time-weighted watts, or Δjoules/Δt."""
    pts = list(samples)
    n = len(pts)
    if n == 0:
        return None, 0.0, 0
    span = pts[-1][0] - pts[0][0]
    if counter:
        if n < 2 or span <= 0:
            return None, span, n
        return max(0.0, (pts[-1][1] - pts[0][1]) / span), span, n
    if n == 1 or span <= 0:
        return sum(v for _, v in pts) / n, span, n
    area = sum((t1 - t0) * (v0 + v1) / 2 for (t0, v0), (t1, v1) in itertools.pairwise(pts))
    return area / span, span, n


class PowerSampler:
    """Reads a backend every ``interval_s`` on a daemon thread into a bounded ring buffer.

    ``start()`` takes a first sample synchronously; ``stop()`` signals the thread, joins it (bounded), takes
    a last sample in the caller's thread and returns the window. Failed reads are counted, not raised.
    """

    def __init__(
        self,
        backend: EnergyBackend,
        interval_s: float = 0.05,
        max_samples: int = 100_000,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.backend = backend
        self.interval_s = interval_s
        self._clock = clock
        self._samples: deque[tuple[float, float]] = deque(maxlen=max_samples)
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.errors = 0

    @property
    def running(self) -> bool:
        return self._thread is not None

    def _sample(self) -> None:
        t = self._clock()
        try:
            value = self.backend.read_energy_j() if self.backend.counter else self.backend.read_power_w()
        except SensorError as err:
            with self._lock:
                self.errors += 1
                first = self.errors == 1
            if first:
                log.warning("energy sensor read failed (further failures counted silently): %s", err)
            return
        with self._lock:
            self._samples.append((t, value))

    def _loop(self, stop: threading.Event) -> None:
        while not stop.wait(self.interval_s):
            self._sample()

    def start(self) -> None:
        if self._thread is not None:
            raise RuntimeError("sampler already running")
        with self._lock:
            self._samples.clear()
            self.errors = 0
        self._stop = threading.Event()  # fresh per run: a hung old thread never resumes into a new run
        self._sample()
        self._thread = threading.Thread(
            target=self._loop, args=(self._stop,), name="edgefleet-power-sampler", daemon=True
        )
        self._thread.start()

    def stop(self, start: float | None = None, end: float | None = None) -> PowerWindow:
        """Stop sampling; the window over ``[start, end]`` (``time.monotonic()`` values) or everything."""
        thread, self._thread = self._thread, None
        if thread is not None:
            self._stop.set()
            thread.join(timeout=self.interval_s * 4 + 5.0)
            if thread.is_alive():
                log.warning("power sampler thread did not stop within its bound (a sensor read hangs?)")
            else:
                self._sample()
        return self.window(start, end)

    def window(self, start: float | None = None, end: float | None = None) -> PowerWindow:
        with self._lock:
            pts = [
                (t, v)
                for t, v in self._samples
                if (start is None or t >= start) and (end is None or t <= end)
            ]
            errors = self.errors
        avg, span, n = average_power(pts, self.backend.counter)
        if start is not None and end is not None:
            span = max(span, end - start)
        return PowerWindow(avg, span, n, errors)

    def __enter__(self) -> PowerSampler:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self.running:
            self.stop()


# --------------------------------------------------------------------------------------------------------
# Energy per inference


def energy_from_power(
    backend: EnergyBackend,
    avg_power_w: float,
    inferences: int,
    duration_s: float,
    *,
    idle_w: float | None = None,
    samples: int = 0,
) -> Energy:
    """``mj_per_inference = avg_power_w × duration_s / inferences × 1000`` labelled with the backend."""
    if inferences < 1:
        raise ValueError(f"inferences must be >= 1, got {inferences}")
    if duration_s < 0 or avg_power_w < 0:
        raise ValueError(f"negative duration ({duration_s}) or power ({avg_power_w})")
    return Energy(
        method=backend.method,
        measured=backend.measured,
        sensor=backend.sensor[:200],
        mj_per_inference=avg_power_w * duration_s / inferences * 1000.0,
        avg_power_w=avg_power_w,
        idle_power_w=idle_w,
        samples=samples,
    )


def modelled_energy(
    profile: PowerProfile, cpu_util: float, cores: int, inferences: int, duration_s: float
) -> Energy:
    """The utilisation model: ``u = cpu_util / cores`` (cpu_util = CPU seconds per wall second)."""
    backend = ModelBackend(profile)
    u = cpu_util / max(1, cores)
    return energy_from_power(
        backend, backend.power_w(u), inferences, duration_s, idle_w=profile.idle_w, samples=0
    )


class EnergyMeter:
    """The chosen backend, its sampler and the board profile behind one start/stop API."""

    def __init__(
        self,
        backend: EnergyBackend,
        profile: PowerProfile,
        cores: int,
        config: EnergyConfig | None = None,
        skipped: list[str] | None = None,
    ) -> None:
        self.config = config or EnergyConfig()
        self.backend = backend
        self.profile = profile
        self.cores = max(1, cores)
        self.skipped = skipped or []
        self.sampler = PowerSampler(backend, self.config.interval_s, self.config.max_samples)

    @classmethod
    def from_config(
        cls,
        config: EnergyConfig | None = None,
        board: BoardInfo | None = None,
        root: Path = Path("/"),
        runner: CommandRunner = default_runner,
        opener: Opener = read_text,
    ) -> EnergyMeter:
        cfg = config or EnergyConfig()
        board = board or detect_board(root)
        profile = power_profile(board.profile_key, cfg.profile_file)
        backend, skipped = select_backend(cfg, root, runner, profile, opener)
        for reason in skipped:
            log.info("energy backend skipped — %s", reason)
        log.info(
            "energy backend: %s (%s, measured=%s)", backend.method.value, backend.sensor, backend.measured
        )
        return cls(backend, profile, board.cpu_count, cfg, skipped)

    def idle_baseline(self, stop: threading.Event, seconds: float | None = None) -> float | None:
        """Average power over ``seconds`` of idling (config ``idle_seconds``); the profile's idle for
        the model backend; None when the baseline is off."""
        if not self.backend.measured:
            return self.profile.idle_w
        seconds = self.config.idle_seconds if seconds is None else seconds
        if seconds <= 0:
            return None
        self.sampler.start()
        try:
            stop.wait(seconds)
        finally:
            window = self.sampler.stop()
        return window.avg_power_w

    def start(self) -> None:
        self.sampler.start()

    def stop(self, start: float | None = None, end: float | None = None) -> PowerWindow:
        return self.sampler.stop(start, end)

    def energy(
        self,
        window: PowerWindow | None,
        inferences: int,
        duration_s: float,
        cpu_util: float | None = None,
        idle_w: float | None = None,
    ) -> Energy | None:
        """``wire.Energy`` for ``inferences`` runs taking ``duration_s``; None when nothing can be said.

        Measured backends use the window's average power; the model (or a measured backend whose window is
        empty) uses ``cpu_util``, CPU seconds per wall second of the benchmark, over the board's cores.
        """
        if inferences < 1:
            return None
        if self.backend.measured and window is not None and window.avg_power_w is not None:
            return energy_from_power(
                self.backend,
                window.avg_power_w,
                inferences,
                duration_s,
                idle_w=idle_w,
                samples=window.samples,
            )
        if self.backend.measured:
            log.warning("no power sample in the benchmark window; falling back to the utilisation model")
        if cpu_util is not None:
            return modelled_energy(self.profile, cpu_util, self.cores, inferences, duration_s)
        if window is not None and window.avg_power_w is not None:  # model backend, system-wide samples
            return energy_from_power(
                self.backend,
                window.avg_power_w,
                inferences,
                duration_s,
                idle_w=self.profile.idle_w,
                samples=window.samples,
            )
        return None

    def measure(self, run: Callable[[], int], stop: threading.Event) -> Energy | None:
        """Idle baseline, then ``run()`` (returns the number of inferences it did) under the sampler.

        For in-process loops and tests; CPU utilisation for the model comes from ``os.times()`` of this
        process and its waited-for children.
        """
        idle_w = self.idle_baseline(stop)
        cpu0, t0 = _cpu_seconds(), time.monotonic()
        self.start()
        try:
            n = run()
        finally:
            window = self.stop()
        wall = time.monotonic() - t0
        cpu_util = (_cpu_seconds() - cpu0) / wall if wall > 0 else None
        return self.energy(window, n, wall, cpu_util, idle_w)


def _cpu_seconds() -> float:
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system
