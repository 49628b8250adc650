"""One PNG per model: device latency (p50, log scale) against host accuracy, a marker per device.

matplotlib is part of the ``[host]`` extra and is imported inside :func:`plot_model` only, with the
non-interactive Agg backend, so importing ``deploy`` stays light and works on a headless host.
"""

from __future__ import annotations

from pathlib import Path

from agent import wire
from deploy.errors import DeployError, StateError
from deploy.fleet import active_result
from deploy.state import FleetState

_MARKERS = "osD^v<>pP*hX"


def plot_points(state: FleetState, model: str) -> dict[str, list[tuple[str, float, float, bool]]]:
    """device → [(variant, host accuracy, p50 ms, is active)] for variants with both figures."""
    manifest = state.manifests.get(model)
    if manifest is None:
        raise StateError(f"the broker holds no manifest for model {model!r}: publish a bundle first")
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
        from matplotlib.ticker import FuncFormatter
    except ImportError as err:
        raise DeployError(f"plot needs matplotlib (pip install 'edgefleet[host]'): {err}") from err

    manifest = state.manifests[model]
    fig, ax = plt.subplots(figsize=(8, 5.5))
    try:
        for i, (device, pts) in enumerate(points.items()):
            marker = _MARKERS[i % len(_MARKERS)]
            xs = [p[1] for p in pts]
            ys = [p[2] for p in pts]
            (line,) = ax.plot(xs, ys, linestyle="none", marker=marker, markersize=7, alpha=0.8, label=device)
            for vid, x, y, active in pts:
                if active:
                    ax.plot(
                        [x],
                        [y],
                        marker=marker,
                        markersize=15,
                        markerfacecolor="none",
                        markeredgewidth=2.2,
                        color=line.get_color(),
                    )
                    ax.annotate(
                        f"{vid} (active)", (x, y), textcoords="offset points", xytext=(8, 6), fontsize=8
                    )
        # Label each variant once, at its accuracy, along the top.
        for v in manifest.variants:
            if v.metrics.accuracy is not None:
                ax.axvline(v.metrics.accuracy, color="0.85", linewidth=0.8, zorder=0)
                ax.annotate(
                    v.id,
                    (v.metrics.accuracy, 1.0),
                    xycoords=("data", "axes fraction"),
                    textcoords="offset points",
                    xytext=(2, -12),
                    fontsize=8,
                    rotation=90,
                    va="top",
                    color="0.4",
                )
        ax.set_yscale("log")
        ax.yaxis.set_major_formatter(FuncFormatter(lambda y, _: f"{y:g}"))
        ax.yaxis.set_minor_formatter(FuncFormatter(lambda y, _: f"{y:g}"))
        ax.set_xlabel("host accuracy (held-out data, .tflite)")
        ax.set_ylabel("p50 latency on the device, ms (log)")
        ax.set_title(
            f"{model} v{manifest.version}: latency vs accuracy per device (large hollow marker = active)"
        )
        ax.grid(True, which="both", axis="y", alpha=0.3)
        ax.legend(fontsize=8, loc="best", title="device")
        fig.tight_layout()
        out.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(out, dpi=120)
    except OSError as err:
        raise DeployError(f"cannot write the plot to {out}: {err}") from err
    finally:
        plt.close(fig)
    return out
