"""Deprecated thin facade over :mod:`agent.board`, :mod:`agent.thermal` and :mod:`agent.energy`.

Board detection, temperature, throttling and the energy model each have one implementation, in those
modules; this module only keeps the older call signatures working. New code imports the modules above.
"""

from __future__ import annotations

from pathlib import Path

from agent import board as _board
from agent import energy as _energy
from agent import thermal as _thermal
from agent.board import PROFILES, PowerProfile
from agent.wire import Energy

__all__ = [
    "PROFILES",
    "PowerProfile",
    "board_name",
    "cpu_count",
    "cpu_temperature",
    "modelled_energy",
    "power_profile",
    "throttled",
]


def board_name(root: Path = Path("/")) -> str:
    """The board's model string (``Raspberry Pi 5 Model B Rev 1.0``), from ``detect_board``."""
    info = _board.detect_board(root)
    return info.model_string or info.name


def cpu_temperature(thermal_dir: Path | None = None) -> float | None:
    """°C; ``thermal_dir`` is a ``/sys/class/thermal``-like directory (no psutil fallback then)."""
    if thermal_dir is None:
        return _thermal.cpu_temperature()
    return _thermal.zone_temperature(thermal_dir)


def throttled() -> bool | None:
    """Throttled now (any of bits 0–3), None where the firmware interface is missing."""
    state = _thermal.read_throttled()
    return None if state is None else state.any_now


def cpu_count() -> int:
    return _board.detect_board().cpu_count


def power_profile(board: str) -> PowerProfile:
    """The built-in profile for a board model string."""
    return _board.power_profile(_board.profile_key_for(board))


def modelled_energy(cpu_util: float, cores: int, seconds_per_inference: float, board: str) -> Energy:
    """Utilisation model for one inference of ``seconds_per_inference`` (``method=model, measured=False``)."""
    return _energy.modelled_energy(power_profile(board), cpu_util, cores, 1, seconds_per_inference)
