"""The fleet at a glance from a collected :class:`FleetState`: one row per device and model, table or JSON."""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

from pydantic import BaseModel, ConfigDict

from agent import wire
from deploy.control.select import Decision
from deploy.observe.state import FleetState


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
    energy_mj: float | None = None
    energy_measured: bool | None = None
    energy_method: str | None = None
    rollout: str | None = None


def active_result(report: wire.Report | None, sha: str | None) -> wire.BenchResult | None:
    """The device's best successful result for the file ``sha`` (lowest p50 over thread counts)."""
    if report is None or sha is None:
        return None
    ok = [r for r in report.results if r.sha256 == sha and r.ok and r.latency_ms is not None]
    if not ok:
        return None
    return min(ok, key=lambda r: r.latency_ms.p50 if r.latency_ms else 0.0)


def energy_text(mj: float | None, measured: bool | None) -> str:
    """Energy per inference; a figure not known to be measured always says "(modelled)"."""
    if mj is None:
        return "-"
    return f"{mj:.3g} mJ" + ("" if measured else " (modelled)")


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
            best = active_result(report, active.sha256 if active else None)
            lat = best.latency_ms if best else None
            energy = best.energy if best else None
            rows.append(
                DeviceModelRow(
                    **base,
                    model=model,
                    state=ms.state.value if ms else None,
                    active=active.variant if active else None,
                    active_version=active.manifest_version if active else None,
                    assigned=assignment.variant if assignment else None,
                    report_age_s=max(0.0, now - report.ts) if report else None,
                    p50_ms=lat.p50 if lat else None,
                    p99_ms=lat.p99 if lat else None,
                    energy_mj=energy.mj_per_inference if energy else None,
                    energy_measured=energy.measured if energy else None,
                    energy_method=energy.method.value if energy else None,
                    rollout=assignment.rollout if assignment else None,
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
        "ENERGY/INF",
    ]
    cells = []
    for r in rows:
        online = "-" if r.online is None else ("yes" if r.online else "no")
        active = f"{r.active} (v{r.active_version})" if r.active else "-"
        if r.assigned and r.assigned != r.active:
            active += f" → {r.assigned}"
        if r.rollout:
            active += f" [{r.rollout}]"
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
                energy_text(r.energy_mj, r.energy_measured),
            ]
        )
    return render_table(headers, cells)


class ResultRow(BaseModel):
    """One benchmark result of one device, for ``edgefleet report``."""

    model_config = ConfigDict(frozen=True)

    device: str
    model: str
    manifest_version: int
    variant: str
    sha256: str
    active: bool = False
    threads: int
    ok: bool
    p50_ms: float | None = None
    p95_ms: float | None = None
    p99_ms: float | None = None
    init_ms: float | None = None
    peak_rss_mb: float | None = None
    host_accuracy: float | None = None
    device_accuracy: float | None = None
    energy_mj: float | None = None
    energy_method: str | None = None
    energy_measured: bool | None = None
    throttled: bool | None = None
    error: str | None = None
    error_detail: str | None = None
    report_age_s: float | None = None


def report_rows(
    state: FleetState, device: str, model: str | None = None, now: float | None = None
) -> list[ResultRow]:
    """Every result the device reported (per model, variant and thread count), in manifest order."""
    now = time.time() if now is None else now
    status = state.statuses.get(device)
    rows: list[ResultRow] = []
    for (dev, m), report in sorted(state.reports.items()):
        if dev != device or (model is not None and m != model):
            continue
        manifest = state.manifests.get(m)
        order = {v.id: i for i, v in enumerate(manifest.variants)} if manifest else {}
        ms = status.models.get(m) if status else None
        active_sha = ms.active.sha256 if ms and ms.active else None
        for r in sorted(
            report.results, key=lambda r: (order.get(r.variant, len(order)), r.variant, r.threads)
        ):
            host_acc = None
            if manifest is not None:
                v = next((v for v in manifest.variants if v.id == r.variant and v.sha256 == r.sha256), None)
                host_acc = v.metrics.accuracy if v else None
            lat = r.latency_ms
            rows.append(
                ResultRow(
                    device=device,
                    model=m,
                    manifest_version=report.manifest_version,
                    variant=r.variant,
                    sha256=r.sha256,
                    active=r.sha256 == active_sha,
                    threads=r.threads,
                    ok=r.ok,
                    p50_ms=lat.p50 if lat else None,
                    p95_ms=lat.p95 if lat else None,
                    p99_ms=lat.p99 if lat else None,
                    init_ms=r.init_ms,
                    peak_rss_mb=r.peak_rss_bytes / (1024 * 1024) if r.peak_rss_bytes is not None else None,
                    host_accuracy=host_acc,
                    device_accuracy=r.accuracy,
                    energy_mj=r.energy.mj_per_inference if r.energy else None,
                    energy_method=r.energy.method.value if r.energy else None,
                    energy_measured=r.energy.measured if r.energy else None,
                    throttled=r.throttled,
                    error=r.error.value if r.error else None,
                    error_detail=r.error_detail,
                    report_age_s=max(0.0, now - report.ts),
                )
            )
    return rows


def report_table(rows: Sequence[ResultRow]) -> str:
    headers = [
        "MODEL",
        "VARIANT",
        "THR",
        "P50ms",
        "P95ms",
        "P99ms",
        "INITms",
        "RSS MiB",
        "ACC host",
        "ACC dev",
        "ENERGY/INF",
        "METHOD",
        "ERROR",
    ]
    cells = []
    for r in rows:
        name = f"{r.variant} *" if r.active else r.variant
        cells.append(
            [
                f"{r.model} v{r.manifest_version}",
                name,
                str(r.threads),
                _num(r.p50_ms),
                _num(r.p95_ms),
                _num(r.p99_ms),
                _num(r.init_ms),
                _num(r.peak_rss_mb),
                _num(r.host_accuracy),
                _num(r.device_accuracy),
                energy_text(r.energy_mj, r.energy_measured),
                r.energy_method or "-",
                (r.error or "") + (" (throttled)" if r.throttled else "") or "-",
            ]
        )
    return render_table(headers, cells) + "\n(* = active variant)"


def decisions_table(decisions: Sequence[Decision]) -> str:
    """Per device: the choice and why; then one indented line per variant that lost.

    The last column is the chosen variant's accuracy, or, when some decision ranked on a named metric
    (a generic manifest's cosine, a policy's rank_metric), that metric's name and figure.
    """
    named = any(d.chosen is not None and d.chosen.metric not in (None, "accuracy") for d in decisions)
    headers = ["DEVICE", "CLASS", "CURRENT", "CHOSEN", "P50ms", "P95ms", "METRIC" if named else "ACCURACY"]
    cells = []
    for d in decisions:
        c = d.chosen
        if c is None:
            quality = "-"
        elif named:  # four digits: fidelity figures crowd near 1 (cosine 0.9991)
            shown = "-" if c.metric_value is None else f"{c.metric_value:.4g}"
            quality = f"{c.metric or 'accuracy'} {shown}"
        else:
            quality = _num(c.accuracy)
        cells.append(
            [
                d.device,
                d.device_class or "-",
                d.current or "-",
                d.variant or "(keep)",
                _num(c.p50_ms if c else None),
                _num(c.p95_ms if c else None),
                quality,
            ]
        )
    out = [render_table(headers, cells), ""]
    for d in decisions:
        out.append(f"{d.device}: {d.why}")
        out += [f"    {vid}: {why}" for vid, why in d.lost.items()]
    return "\n".join(out)
