"""Benchmark and health-check children left running by a killed agent: recorded, found and ended.

The children run in sessions of their own (``start_new_session``: the parent kills the whole group on a
timeout), so a kill -9 of the agent does not reach them; without systemd's cgroup they are orphaned and
keep measuring, and the restarted agent's own benchmark then competes with them for the cores. Each
child is recorded in ``<store>/children/<pid>.json`` with its start time from ``/proc/<pid>/stat``
(field 22, clock ticks since boot) while it runs; a restarted agent (:func:`adopt`) kills the process
group of every recorded child whose pid *and* start time still match (a pid reused by an unrelated
process since is left alone) and removes the records.

The daemon calls :func:`adopt` once at start; :mod:`agent.bench` records every child it starts in the
registry adopted (none: nothing recorded, as for benches and scripts that measure without a daemon).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
from pathlib import Path

from agent.store import atomic_write

log = logging.getLogger(__name__)

CHILDREN_DIR = "children"


def start_ticks(pid: int, proc: Path = Path("/proc")) -> int | None:
    """Start time of ``pid`` in clock ticks since boot, or None when there is no such process."""
    try:
        text = (proc / str(pid) / "stat").read_text()
    except OSError:
        return None
    # the command name (field 2) may hold spaces and parentheses: split after its closing one
    fields = text[text.rfind(")") + 2 :].split()
    try:
        return int(fields[19])  # field 22 overall; fields[0] here is field 3
    except (IndexError, ValueError):
        return None


class ChildRegistry:
    """Pidfiles of running children under one directory."""

    def __init__(self, directory: Path) -> None:
        self.dir = directory

    def record(self, pid: int) -> None:
        ticks = start_ticks(pid)
        if ticks is None:
            return  # already gone
        try:
            self.dir.mkdir(parents=True, exist_ok=True)
            atomic_write(self.dir / f"{pid}.json", json.dumps({"pid": pid, "start_ticks": ticks}).encode())
        except OSError as err:  # a full disk must not stop a measurement
            log.warning("could not record benchmark child %d: %s", pid, err)

    def forget(self, pid: int) -> None:
        with contextlib.suppress(FileNotFoundError):
            (self.dir / f"{pid}.json").unlink()

    def reap(self) -> list[int]:
        """Kill the process group of every recorded child that is still the same process; clear records."""
        killed: list[int] = []
        if not self.dir.is_dir():
            return killed
        for path in self.dir.iterdir():
            if not path.name.endswith(".json"):  # a record torn by a kill mid-write (temp file)
                with contextlib.suppress(FileNotFoundError):
                    path.unlink()
                continue
            try:
                rec = json.loads(path.read_bytes())
                pid, ticks = int(rec["pid"]), int(rec["start_ticks"])
            except (OSError, ValueError, KeyError, TypeError):
                pid, ticks = -1, -1
            if pid > 0 and start_ticks(pid) == ticks:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(pid, signal.SIGKILL)  # the child leads its own session and group
                    killed.append(pid)
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
        if killed:
            log.warning(
                "ended %d benchmark/health child(ren) a previous agent left running: %s", len(killed), killed
            )
        return killed


_adopted: ChildRegistry | None = None


def adopt(store_root: Path) -> list[int]:
    """At daemon start: end what a predecessor left, then record this agent's children there."""
    global _adopted  # noqa: PLW0603 - one registry per daemon process, set once at its start
    registry = ChildRegistry(store_root / CHILDREN_DIR)
    killed = registry.reap()
    _adopted = registry
    return killed


def adopted() -> ChildRegistry | None:
    return _adopted
