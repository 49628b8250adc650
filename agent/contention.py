"""Was a timed benchmark window disturbed? Samples taken around it, and the documented threshold.

Measured on a device: with another process busy on the same cores, a variant's p50 rose from 10.3 ms to
18.4 ms while the child's own ``cpu_util`` still looked plausible (0.61-0.73). Only figures about the
*other* processes tell a disturbed window from a slow model, so the child samples, at both ends of each
timed window and for the cores it may run on (``os.sched_getaffinity``):

* ``/proc/stat`` per-CPU busy time (user + nice + system + irq + softirq + steal) minus the child's own
  CPU time (``getrusage``, every thread): the CPU seconds other processes took on those cores;
* its own involuntary context switches (``ru_nivcsw``): how often the scheduler took a core away;
* ``cpufreq/scaling_cur_freq`` of those cores and, on a Raspberry Pi, the firmware's ``get_throttled``.

The window is *disturbed* (:func:`assess`) when any of:

* ``other_share`` (others' CPU seconds / (window wall seconds x cores in the set)) > ``max_other_share``
  (default 0.10: another process held a tenth of the cores);
* involuntary switches per second > ``max_involuntary_per_s`` (default 50; a thread alone on its core
  sees a few per second, one sharing it with a busy process about 250 at CFS's 4 ms slices);
* the firmware reports throttling, capping or under-voltage now (bits 0-3 of ``get_throttled``).

The frequency is reported, not judged: governors lower an idle core's clock and raise it under load.
Everything here is a pure function of the samples (unit tests feed recorded ``/proc`` text); only
:func:`sample` reads the system. Stdlib only: the benchmark child imports it before its memory limit.
"""

from __future__ import annotations

import os
import resource
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# /proc/stat columns after "cpuN": user nice system idle iowait irq softirq steal guest guest_nice.
# Busy = everything but idle and iowait; guest time is already counted in user (kernel docs).
_BUSY_COLUMNS = (0, 1, 2, 5, 6, 7)


@dataclass(frozen=True, slots=True)
class Thresholds:
    """Past any of these a window is disturbed (see the module docstring for the defaults' reasons)."""

    max_other_share: float = 0.10
    max_involuntary_per_s: float = 50.0


@dataclass(frozen=True, slots=True)
class Sample:
    """One end of a timed window."""

    wall_s: float  # time.monotonic()
    busy_ticks: dict[int, int]  # per CPU of the affinity set, from /proc/stat
    own_cpu_s: float  # this process, every thread (getrusage)
    involuntary: int  # ru_nivcsw
    freq_khz: dict[int, int]  # scaling_cur_freq per CPU (empty when the board has no cpufreq)
    throttled_raw: int | None  # firmware get_throttled bits, None when not reported


@dataclass(frozen=True, slots=True)
class Assessment:
    """What disturbed one window, and whether that was past the threshold."""

    cores: list[int]
    other_cpu_s: float
    other_share: float
    involuntary_switches: int
    involuntary_per_s: float
    freq_mhz_min: float | None
    freq_mhz_max: float | None
    throttled: bool | None
    disturbed: bool
    why: list[str]

    def to_json(self) -> dict[str, Any]:
        return {
            "cores": self.cores,
            "other_cpu_s": round(self.other_cpu_s, 4),
            "other_share": round(self.other_share, 4),
            "involuntary_switches": self.involuntary_switches,
            "involuntary_per_s": round(self.involuntary_per_s, 2),
            "freq_mhz_min": self.freq_mhz_min,
            "freq_mhz_max": self.freq_mhz_max,
            "throttled": self.throttled,
            "disturbed": self.disturbed,
            "why": self.why,
        }


def parse_proc_stat(text: str, cores: set[int] | list[int]) -> dict[int, int]:
    """Busy jiffies per CPU in ``cores`` from ``/proc/stat`` text (a CPU missing from it is skipped)."""
    wanted = set(cores)
    out: dict[int, int] = {}
    for line in text.splitlines():
        name, _, rest = line.partition(" ")
        if not name.startswith("cpu") or name == "cpu":
            continue
        try:
            cpu = int(name[3:])
            fields = [int(x) for x in rest.split()]
        except ValueError:
            continue
        if cpu in wanted:
            out[cpu] = sum(fields[i] for i in _BUSY_COLUMNS if i < len(fields))
    return out


def _read_freqs(cores: list[int], root: Path) -> dict[int, int]:
    out: dict[int, int] = {}
    for cpu in cores:
        path = root / f"sys/devices/system/cpu/cpu{cpu}/cpufreq/scaling_cur_freq"
        try:
            out[cpu] = int(path.read_text().strip())
        except (OSError, ValueError):
            continue
    return out


def _read_throttled(root: Path) -> int | None:
    try:
        text = (root / "sys/devices/platform/soc/soc:firmware/get_throttled").read_text()
        return int(text.strip().rpartition("=")[2], 16)
    except (OSError, ValueError):
        return None


def affinity() -> list[int]:
    """The CPUs this process may run on (all of them where affinity is not supported)."""
    if hasattr(os, "sched_getaffinity"):
        return sorted(os.sched_getaffinity(0))
    return list(range(os.cpu_count() or 1))


def sample(cores: list[int], root: Path = Path("/")) -> Sample:
    """Read every figure for one end of a window (cheap: a few small /proc and /sys reads)."""
    ru = resource.getrusage(resource.RUSAGE_SELF)
    try:
        busy = parse_proc_stat((root / "proc/stat").read_text(), cores)
    except OSError:
        busy = {}
    return Sample(
        wall_s=time.monotonic(),
        busy_ticks=busy,
        own_cpu_s=float(ru.ru_utime + ru.ru_stime),
        involuntary=int(ru.ru_nivcsw),
        freq_khz=_read_freqs(cores, root),
        throttled_raw=_read_throttled(root),
    )


def assess(
    before: Sample, after: Sample, thresholds: Thresholds, clock_ticks: int | None = None
) -> Assessment:
    """Judge the window between two samples (pure: recorded samples give the same answer)."""
    hz = clock_ticks if clock_ticks is not None else os.sysconf("SC_CLK_TCK")
    cores = sorted(set(before.busy_ticks) & set(after.busy_ticks))
    wall = max(after.wall_s - before.wall_s, 1e-9)
    busy_s = sum(max(0, after.busy_ticks[c] - before.busy_ticks[c]) for c in cores) / hz
    own_s = max(0.0, after.own_cpu_s - before.own_cpu_s)
    # jiffies are coarse (10 ms): clamp at 0 rather than report negative time for others
    other_s = max(0.0, busy_s - own_s)
    share = other_s / (wall * len(cores)) if cores else 0.0
    inv = max(0, after.involuntary - before.involuntary)
    inv_rate = inv / wall
    freqs = [f / 1000.0 for f in (*before.freq_khz.values(), *after.freq_khz.values())]
    throttled: bool | None = None
    raws = [r for r in (before.throttled_raw, after.throttled_raw) if r is not None]
    if raws:
        throttled = any(r & 0xF for r in raws)
    why: list[str] = []
    if share > thresholds.max_other_share:
        why.append(
            f"other processes used {share:.0%} of cores {cores} (max {thresholds.max_other_share:.0%})"
        )
    if inv_rate > thresholds.max_involuntary_per_s:
        why.append(
            f"{inv_rate:.0f} involuntary context switches/s (max {thresholds.max_involuntary_per_s:g})"
        )
    if throttled:
        why.append("the firmware reports throttling")
    return Assessment(
        cores=cores,
        other_cpu_s=other_s,
        other_share=share,
        involuntary_switches=inv,
        involuntary_per_s=inv_rate,
        freq_mhz_min=min(freqs) if freqs else None,
        freq_mhz_max=max(freqs) if freqs else None,
        throttled=throttled,
        disturbed=bool(why),
        why=why,
    )
