"""The fleet at a glance from a collected :class:`FleetState`: one row per device and model, table or JSON."""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

from pydantic import BaseModel, ConfigDict

from agent import wire
from deploy.select import Decision
from deploy.state import FleetState


class DeviceModelRow(BaseModel):
    model_config = ConfigDict(frozen=True)

    device: str
    online: bool | None = None
    board: str | None = None
    runtime: str | None = None
    device_class: str | None = None
    model: str | None = None
    state: str | None = None
    active: str | None = None
    active_version: int | None = None
    assigned: str | None = None
    report_age_s: float | None = None
    p50_ms: float | None = None
    p99_ms: float | None = None


def _active_latency(report: wire.Report | None, sha: str | None) -> tuple[float | None, float | None]:
    if report is None or sha is None:
        return None, None
    ok = [r for r in report.results if r.sha256 == sha and r.ok and r.latency_ms is not None]
    if not ok:
        return None, None
    best = min(ok, key=lambda r: r.latency_ms.p50 if r.latency_ms else 0.0)
    assert best.latency_ms is not None
    return best.latency_ms.p50, best.latency_ms.p99


def fleet_rows(state: FleetState, now: float | None = None) -> list[DeviceModelRow]:
    """One row per (device, model) the device knows or reported on; a device with no model gets one row."""
    now = time.time() if now is None else now
    rows: list[DeviceModelRow] = []
    for device in state.devices:
        status: wire.Status | None = state.statuses.get(device)
        models = set(status.models) if status else set()
        models |= {m for d, m in state.reports if d == device}
        models |= {m for d, m in state.assignments if d == device}
        base: dict[str, Any] = {"device": device}
        if status is not None:
            base.update(
                online=status.online,
                board=status.board,
                runtime=f"{status.runtime.name} {status.runtime.version}" if status.runtime else None,
                device_class=status.device_class,
            )
        if not models:
            rows.append(DeviceModelRow(**base))
            continue
        for model in sorted(models):
            ms = status.models.get(model) if status else None
            report: wire.Report | None = state.reports.get((device, model))
            assignment: wire.Assignment | None = state.assignments.get((device, model))
            active = ms.active if ms else None
            p50, p99 = _active_latency(report, active.sha256 if active else None)
            rows.append(
                DeviceModelRow(
                    **base,
                    model=model,
                    state=ms.state.value if ms else None,
                    active=active.variant if active else None,
                    active_version=active.manifest_version if active else None,
                    assigned=assignment.variant if assignment else None,
                    report_age_s=max(0.0, now - report.ts) if report else None,
                    p50_ms=p50,
                    p99_ms=p99,
                )
            )
    return rows


def _age(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    if seconds < 120:
        return f"{seconds:.0f}s"
    if seconds < 7200:
        return f"{seconds / 60:.0f}m"
    if seconds < 172800:
        return f"{seconds / 3600:.0f}h"
    return f"{seconds / 86400:.0f}d"


def _num(x: float | None) -> str:
    return "-" if x is None else f"{x:.3g}"


def render_table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """Plain left-aligned text table."""
    widths = [len(h) for h in headers]
    for row in rows:
        for i, cell in enumerate(row):
            widths[i] = max(widths[i], len(cell))
    lines = ["  ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True)).rstrip()]
    lines.append("  ".join("-" * w for w in widths))
    lines += ["  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() for row in rows]
    return "\n".join(lines)


def fleet_table(rows: Sequence[DeviceModelRow]) -> str:
    headers = [
        "DEVICE",
        "ONLINE",
        "BOARD",
        "RUNTIME",
        "CLASS",
        "MODEL",
        "STATE",
        "ACTIVE",
        "REPORT",
        "P50ms",
        "P99ms",
    ]
    cells = []
    for r in rows:
        online = "-" if r.online is None else ("yes" if r.online else "no")
        active = f"{r.active} (v{r.active_version})" if r.active else "-"
        if r.assigned and r.assigned != r.active:
            active += f" → {r.assigned}"
        cells.append(
            [
                r.device,
                online,
                r.board or "-",
                r.runtime or "-",
                r.device_class or "-",
                r.model or "-",
                r.state or "-",
                active,
                _age(r.report_age_s),
                _num(r.p50_ms),
                _num(r.p99_ms),
            ]
        )
    return render_table(headers, cells)


def decisions_table(decisions: Sequence[Decision]) -> str:
    """Per device: the choice and why; then one indented line per variant that lost."""
    headers = ["DEVICE", "CLASS", "CURRENT", "CHOSEN", "P50ms", "P95ms", "ACCURACY"]
    cells = []
    for d in decisions:
        c = d.chosen
        cells.append(
            [
                d.device,
                d.device_class or "-",
                d.current or "-",
                d.variant or "(keep)",
                _num(c.p50_ms if c else None),
                _num(c.p95_ms if c else None),
                _num(c.accuracy if c else None),
            ]
        )
    out = [render_table(headers, cells), ""]
    for d in decisions:
        out.append(f"{d.device}: {d.why}")
        out += [f"    {vid}: {why}" for vid, why in d.lost.items()]
    return "\n".join(out)
