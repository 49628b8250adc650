"""Which board this is, and how much power it draws idle and flat out (the utilisation model's profile).

Everything reads below a ``root`` path (``/`` on a device) so tests point it at a recorded tree. Board
detection, in order: ``<root>/proc/device-tree/model`` (NUL-terminated, e.g. ``Raspberry Pi 5 Model B Rev
1.0``), the ``Model`` line of ``<root>/proc/cpuinfo`` (Raspberry Pi OS kernels), the Raspberry Pi
``Revision`` code, the x86 ``model name`` line, and finally ``platform.machine()``.

External commands (``vcgencmd``) go through a :data:`CommandRunner` — a callable ``(argv, timeout) -> stdout``
— so tests replay recorded output and nothing here ever blocks without a timeout.

Exceptions (all :class:`agent.errors.AgentError`)::

    HardwareError             a sensor, a command or a profile this module or its siblings cannot use
    ├── CommandUnavailable    the command is not installed, failed, or timed out
    ├── ProfileError          a calibrated power-profile file that cannot be read or is invalid
    └── SensorError           (agent.energy) a sensor that cannot be read right now
        └── BackendUnavailable  (agent.energy) an energy backend absent on this board; ``reason`` says why
"""

from __future__ import annotations

import json
import os
import platform
import re
import shutil
import subprocess
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from agent.errors import AgentError

# --------------------------------------------------------------------------------------------------------
# Errors and the command seam


class HardwareError(AgentError):
    """Base of what the board, thermal and energy readers refuse."""


class CommandUnavailable(HardwareError):
    """An external command (``vcgencmd``) is not installed, exited non-zero, or timed out."""


class ProfileError(HardwareError):
    """A calibrated power-profile file that cannot be read or does not validate."""


CommandRunner = Callable[[Sequence[str], float], str]
"""``(argv, timeout_s) -> stdout``; raises :class:`CommandUnavailable` when the command cannot answer."""


def default_runner(argv: Sequence[str], timeout: float) -> str:
    """Run ``argv`` with a hard timeout and return its stdout.

    Raises :class:`CommandUnavailable` when the executable is not on ``PATH``, exits non-zero (vcgencmd
    does when the firmware refuses, e.g. ``pmic_read_adc`` on a Pi 4), or does not finish in time.
    """
    if not argv:
        raise CommandUnavailable("empty command")
    exe = shutil.which(argv[0])
    if exe is None:
        raise CommandUnavailable(f"{argv[0]} is not installed (not on PATH)")
    try:
        proc = subprocess.run([exe, *argv[1:]], capture_output=True, text=True, timeout=timeout, check=False)
    except subprocess.TimeoutExpired as err:
        raise CommandUnavailable(f"{' '.join(argv)} did not answer within {timeout:g} s") from err
    except OSError as err:
        raise CommandUnavailable(f"{' '.join(argv)} could not be started: {err}") from err
    if proc.returncode != 0:
        detail = (proc.stderr or proc.stdout).strip()[:200]
        raise CommandUnavailable(f"{' '.join(argv)} exited {proc.returncode}: {detail}")
    return proc.stdout


# --------------------------------------------------------------------------------------------------------
# Power profiles


@dataclass(frozen=True, slots=True)
class PowerProfile:
    """Whole-board power at idle and under full CPU load, in watts, and where the figures come from."""

    key: str
    idle_w: float
    max_w: float
    source: str
    calibrated: bool = False

    @property
    def name(self) -> str:
        """Alias of ``key``."""
        return self.key

    def power_at(self, utilisation: float) -> float:
        """``P_idle + (P_max − P_idle) · u`` with ``u`` clamped to [0, 1] (share of all cores busy)."""
        u = min(1.0, max(0.0, utilisation))
        return self.idle_w + (self.max_w - self.idle_w) * u


# Published figures differ between sources by 30–50 % (ARCHITECTURE §4 gives Pi 4B 1.6/5.0 W and Pi 3B+
# 3.1/5.6 W at the wall; FACTS.md gives 2.7/6.4 W and 1.9/5.1 W). One source is used per board and named
# in ``source``; these are starting points only — run a calibration on the real board (idle, then
# ``stress-ng --cpu 0`` behind a USB power meter) and pass the resulting JSON to :func:`power_profile`.
PROFILES: dict[str, PowerProfile] = {
    "pi5": PowerProfile("pi5", 2.8, 9.7, "published, at the wall (ARCHITECTURE §4 and FACTS.md agree)"),
    "pi4b": PowerProfile("pi4b", 2.7, 6.4, "published idle / stress figure (FACTS.md 'Power')"),
    "pi3b+": PowerProfile("pi3b+", 1.9, 5.1, "published idle / stress figure (FACTS.md 'Power')"),
    "zero2w": PowerProfile(
        "zero2w", 0.6, 3.0, "idle ≈ 0.6 W published (FACTS.md); max 3.0 W is an estimate (4× A53 at 1 GHz)"
    ),
    "generic-arm": PowerProfile("generic-arm", 2.0, 6.0, "generic guess for an unknown ARM board"),
    "generic-x86": PowerProfile("generic-x86", 5.0, 25.0, "generic guess for an unknown x86 laptop/VM"),
    "generic": PowerProfile("generic", 3.0, 10.0, "generic guess for an unknown machine"),
}


class CalibratedProfile(BaseModel):
    """The JSON a calibration run writes: ``{"idle_w": 3.1, "max_w": 8.6, "source": "..."}``."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    idle_w: float = Field(ge=0, le=1000, description="whole-board watts at idle")
    max_w: float = Field(gt=0, le=1000, description="whole-board watts with every core busy")
    source: str = Field(default="calibrated", max_length=200, description="how and when it was measured")
    board: str | None = Field(default=None, max_length=200, description="model string it was measured on")

    @model_validator(mode="after")
    def _ordered(self) -> CalibratedProfile:
        if self.max_w < self.idle_w:
            raise ValueError(f"max_w {self.max_w} is below idle_w {self.idle_w}")
        return self


def power_profile(profile_key: str, calibration_file: Path | None = None) -> PowerProfile:
    """The built-in profile for ``profile_key``, replaced by ``calibration_file`` when one is given.

    A configured calibration file that is missing or invalid raises :class:`ProfileError` rather than
    silently falling back: the operator asked for it.
    """
    if calibration_file is None:
        return PROFILES.get(profile_key, PROFILES["generic"])
    try:
        raw = json.loads(calibration_file.read_text(encoding="utf-8"))
        cal = CalibratedProfile.model_validate(raw)
    except OSError as err:
        raise ProfileError(f"power profile {calibration_file}: cannot read: {err.strerror}") from err
    except (ValueError, ValidationError) as err:
        raise ProfileError(f"power profile {calibration_file}: not a valid profile: {err}") from err
    return PowerProfile(profile_key, cal.idle_w, cal.max_w, f"{cal.source} ({calibration_file})", True)


# --------------------------------------------------------------------------------------------------------
# Board detection


@dataclass(frozen=True, slots=True)
class BoardInfo:
    name: str  # short human name: "Raspberry Pi 5", "x86_64 (Intel(R) Core(TM) i7 ...)"
    model_string: str  # as the firmware/kernel reports it
    arch: str  # platform.machine(): aarch64, armv7l, x86_64
    cpu_count: int
    ram_bytes: int
    profile_key: str  # key into PROFILES

    @property
    def is_raspberry_pi(self) -> bool:
        return self.profile_key in {"pi5", "pi4b", "pi3b+", "zero2w"}


# (pattern on the model string, short name, profile key); first match wins, so Zero 2 before the rest.
_MODEL_RULES: tuple[tuple[re.Pattern[str], str, str], ...] = (
    (re.compile(r"raspberry pi zero 2", re.I), "Raspberry Pi Zero 2 W", "zero2w"),
    (re.compile(r"raspberry pi (5|500)\b|compute module 5", re.I), "Raspberry Pi 5", "pi5"),
    (re.compile(r"raspberry pi (4|400)\b|compute module 4", re.I), "Raspberry Pi 4", "pi4b"),
    # The 3B and 3A+ have no profile of their own; the 3B+ figures are the closest published.
    (re.compile(r"raspberry pi 3", re.I), "Raspberry Pi 3", "pi3b+"),
)

# New-style Raspberry Pi revision codes: bit 23 set, board type in bits 4–11.
_REVISION_TYPES: dict[int, str] = {
    0x08: "Raspberry Pi 3 Model B",
    0x0D: "Raspberry Pi 3 Model B Plus",
    0x0E: "Raspberry Pi 3 Model A Plus",
    0x11: "Raspberry Pi 4 Model B",
    0x12: "Raspberry Pi Zero 2 W",
    0x13: "Raspberry Pi 400",
    0x14: "Raspberry Pi Compute Module 4",
    0x17: "Raspberry Pi 5 Model B",
    0x18: "Raspberry Pi Compute Module 5",
    0x19: "Raspberry Pi 500",
}


def _read(path: Path) -> str | None:
    try:
        return path.read_bytes().replace(b"\x00", b"").decode("utf-8", "replace").strip()
    except OSError:
        return None


def parse_cpuinfo(text: str) -> tuple[dict[str, str], int]:
    """First value of every ``key : value`` line, and the number of ``processor`` entries."""
    fields: dict[str, str] = {}
    processors = 0
    for line in text.splitlines():
        key, sep, value = line.partition(":")
        if not sep:
            continue
        key = key.strip().lower()
        if key == "processor":
            processors += 1
        fields.setdefault(key, value.strip())
    return fields, processors


def decode_revision(code: str) -> str | None:
    """Board name from a new-style Raspberry Pi revision code (``c04170`` → Pi 5), else None."""
    try:
        value = int(code, 16)
    except ValueError:
        return None
    if not value & (1 << 23):
        return None
    return _REVISION_TYPES.get((value >> 4) & 0xFF)


def _board_model_line(value: str) -> str:
    """cpuinfo ``Model`` names the board on Raspberry Pi OS; on x86, ``model`` is a CPU model number."""
    return value if any(ch.isalpha() for ch in value) else ""


def _ram_bytes(root: Path) -> int:
    text = _read(root / "proc/meminfo")
    if text:
        m = re.search(r"^MemTotal:\s+(\d+)\s*kB", text, re.M)
        if m:
            return int(m.group(1)) * 1024
    if root != Path("/"):
        return 0
    import psutil  # lazy: only without /proc/meminfo; the idle daemon does without it (0.8 MB)

    return int(psutil.virtual_memory().total)


def _local_cpu_count() -> int:
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def profile_key_for(model: str, arch: str | None = None) -> str:
    """The :data:`PROFILES` key for a board model string (``Raspberry Pi 5 Model B`` → ``pi5``).

    Unknown boards get ``generic-x86``/``generic-arm`` by ``arch``, else ``generic``.
    """
    for pattern, _name, key in _MODEL_RULES:
        if pattern.search(model):
            return key
    low = (arch or "").lower()
    if low in {"x86_64", "amd64", "i386", "i686"}:
        return "generic-x86"
    if low.startswith(("arm", "aarch")):
        return "generic-arm"
    return "generic"


def detect_board(root: Path = Path("/"), machine: str | None = None) -> BoardInfo:
    """Identify the board under ``root``; never raises (an unreadable tree gives a generic board)."""
    arch = machine if machine is not None else platform.machine()
    cpuinfo, processors = parse_cpuinfo(_read(root / "proc/cpuinfo") or "")
    model = (
        _read(root / "proc/device-tree/model")
        or _read(root / "sys/firmware/devicetree/base/model")
        or _board_model_line(cpuinfo.get("model", ""))
        or decode_revision(cpuinfo.get("revision", ""))
        or ""
    )
    cpus = processors or (_local_cpu_count() if root == Path("/") else 1)
    ram = _ram_bytes(root)
    for pattern, name, key in _MODEL_RULES:
        if pattern.search(model):
            return BoardInfo(name, model[:200], arch, cpus, ram, key)
    x86 = arch.lower() in {"x86_64", "amd64", "i386", "i686"}
    cpu_name = cpuinfo.get("model name", "")
    if x86:
        name = f"{arch} ({cpu_name})" if cpu_name else arch
        return BoardInfo(name[:200], (model or cpu_name or arch)[:200], arch, cpus, ram, "generic-x86")
    arm = arch.lower().startswith(("arm", "aarch"))
    label = model or cpuinfo.get("hardware", "") or arch or "unknown"
    return BoardInfo(label[:200], label[:200], arch, cpus, ram, "generic-arm" if arm else "generic")
