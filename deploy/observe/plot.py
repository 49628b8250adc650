"""One PNG per model: device latency (p50, log scale) against host accuracy, a marker per device.

matplotlib is part of the ``[host]`` extra and is imported inside :func:`plot_model` only, with the
non-interactive Agg backend, so importing ``deploy`` stays light and works on a headless host.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from agent import wire
from deploy.errors import DeployError, StateError
from deploy.observe.fleet import active_result
from deploy.observe.state import FleetState

_MARKERS = "osD^v<>pP*hX"


def plot_points(state: FleetState, model: str) -> dict[str, list[tuple[str, float, float, bool]]]:
    """device → [(variant, host accuracy, p50 ms, is active)] for variants with both figures."""
    manifest = state.manifest(model)
    out: dict[str, list[tuple[str, float, float, bool]]] = {}
    for device, report in sorted(state.reports_for(model).items()):
        status = state.statuses.get(device)
        ms = status.models.get(model) if status else None
        assignment = state.assignments.get((device, model))
        chosen = ms.active.sha256 if ms and ms.active else (assignment.sha256 if assignment else None)
        points = []
        for v in manifest.variants:
            best = active_result(report, v.sha256)
            if best is None or best.latency_ms is None or v.metrics.accuracy is None:
                continue
            points.append((v.id, v.metrics.accuracy, best.latency_ms.p50, v.sha256 == chosen))
        if points:
            out[device] = points
    return out


def _heading(text: str) -> Any:
    """A legend entry with no marker: the title of the entries after it."""
    from matplotlib.lines import Line2D

    return Line2D([], [], linestyle="none", marker="none", label=text)


def plot_model(state: FleetState, model: str, out: Path) -> Path:
    """Write the plot of ``model`` to ``out`` (PNG); StateError if no device reported usable figures."""
    wire.check_id(model, "model")
    points = plot_points(state, model)
    if not points:
        raise StateError(f"no device has reported latency for a variant of {model} with a host accuracy")
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from matplotlib.lines import Line2D
        from matplotlib.ticker import FuncFormatter, LogFormatter
    except ImportError as err:
        raise DeployError(f"plot needs matplotlib (pip install 'edgefleet[host]'): {err}") from err

    manifest = state.manifests[model]
    # Marker = device, colour = variant, both named in legends beside the axes: text at the points
    # (or along the top at each variant's accuracy) overlaps when variants are about as accurate.
    variant_ids = [v.id for v in manifest.variants]
    colours = plt.get_cmap("tab10" if len(variant_ids) <= 10 else "tab20")
    colour = {vid: colours(i % colours.N) for i, vid in enumerate(variant_ids)}
    fig, ax = plt.subplots(figsize=(9, 5.5), layout="constrained")
    try:
        device_handles = []
        for i, (device, pts) in enumerate(points.items()):
            marker = _MARKERS[i % len(_MARKERS)]
            for vid, x, y, active in pts:
                ax.plot(
                    [x], [y], linestyle="none", marker=marker, markersize=7, alpha=0.85, color=colour[vid]
                )
                if active:
                    ax.plot(
                        [x],
                        [y],
                        marker=marker,
                        markersize=15,
                        markerfacecolor="none",
                        markeredgewidth=2.2,
                        color=colour[vid],
                    )
            device_handles.append(
                Line2D([], [], linestyle="none", marker=marker, color="0.35", markersize=7, label=device)
            )
        shown = [vid for vid in variant_ids if any(p[0] == vid for pts in points.values() for p in pts)]
        handles = [
            _heading("device"),
            *device_handles,
            _heading("variant"),
            *[
                Line2D([], [], linestyle="none", marker="s", color=colour[vid], markersize=8, label=vid)
                for vid in shown
            ],
        ]
        # One legend, so the device and variant lists cannot run into each other; two columns when long.
        ax.legend(
            handles=handles,
            fontsize=8,
            loc="upper left",
            bbox_to_anchor=(1.02, 1.0),
            borderaxespad=0,
            ncols=1 if len(handles) <= 22 else 2,
        )
        ax.set_yscale("log")
        ax.yaxis.set_major_formatter(FuncFormatter(lambda y, _: f"{y:g}"))
        # minor ticks are labelled only when the axis spans about a decade, where they have room
        ax.yaxis.set_minor_formatter(LogFormatter(labelOnlyBase=False))
        ax.ticklabel_format(axis="x", useOffset=False)  # accuracies as they are, not "+9.7e-1"
        ax.set_xlabel("host accuracy (held-out data, .tflite)")
        ax.set_ylabel("p50 latency on the device, ms (log)")
        ax.set_title(
            f"{model} v{manifest.version}: latency vs accuracy per device (large hollow marker = active)"
        )
        ax.grid(True, which="both", axis="y", alpha=0.3)
        out.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(out, dpi=120)
    except OSError as err:
        raise DeployError(f"cannot write the plot to {out}: {err}") from err
    finally:
        plt.close(fig)
    return out
