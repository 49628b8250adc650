"""Write a bundle directory: the variants, their evaluation samples, the manifest and a report.

Layout (file names are fixed; deploy reads the bundle through ``manifest.json`` only)::

    <out>/manifest.json             unsigned edgefleet Manifest (pretty-printed JSON)
    <out>/<variant>.tflite          each variant (Variant.file, hashed in Variant.sha256/chunks)
    <out>/<variant>.sample.npz      the first 128 held-out inputs in the variant's input dtype, arrays x
                                    and y (Variant.sample; np.savez, loads with allow_pickle=False). The
                                    SAME inputs in the same order for every variant, so a device can
                                    compare each variant's predictions with float32's on the same sample.
    <out>/report.md                 Markdown table of the variants, notes, and any that failed
    <out>/accuracy_vs_size.png      accuracy against file size, a marker per variant (legend)
    <out>/accuracy_vs_latency.png   accuracy against host latency (p50, 1 thread), likewise

The bundle is built in a hidden sibling directory and renamed into place, with ``manifest.json``
written last, so a half-built bundle is never mistaken for a good one. An existing ``<out>`` is
replaced only if it is empty or itself a bundle (has ``manifest.json``).
"""

from __future__ import annotations

import io
import os
import shutil
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np

from agent.fidelity import sample_arrays
from agent.wire import (
    MAX_SQNR_DB,
    BlobRef,
    HostMetrics,
    Manifest,
    MetricInfo,
    OutputTolerance,
    Variant,
    blob_fields,
)
from compressor.errors import BundleWriteError, VariantFailure
from compressor.evaluate import Evaluation, quantize_input

SAMPLE_SIZE = 128
SAMPLE_MAX_BYTES = 4 * 1024 * 1024  # inputs + reference outputs of a sample; big images ship fewer rows
MANIFEST = "manifest.json"
REPORT = "report.md"
PLOT = "accuracy_vs_size.png"
PLOT_LATENCY = "accuracy_vs_latency.png"
UNSTRUCTURED_STATEMENT = (
    "Magnitude pruning and weight clustering are unstructured: every weight tensor keeps its full shape, "
    "so the .tflite file is no smaller and no faster than without them. Their only gain is in the "
    "gzip-compressed size (download and storage), shown in the gzip column."
)


@dataclass(frozen=True, slots=True)
class BuiltVariant:
    """One converted and evaluated variant, ready to be written."""

    id: str
    quantization: str
    techniques: list[str]
    tflite: bytes
    evaluation: Evaluation
    accuracy_drop: float | None
    agreement: float | None
    params: int | None
    macs: int | None
    min_runtime: str | None
    sample: bytes | None
    sample_accuracy: float | None = None  # this file's accuracy on exactly the rows of ``sample``
    notes: list[str] = field(default_factory=list)
    named: dict[str, float] = field(default_factory=dict)
    required_custom_ops: list[str] = field(default_factory=list)
    tolerance: OutputTolerance | None = None

    @property
    def file(self) -> str:
        return f"{self.id}.tflite"

    @property
    def sample_file(self) -> str:
        return sample_file_name(self.id)


def sample_file_name(variant_id: str) -> str:
    return f"{variant_id}.sample.npz"


def sample_rows(evaluation: Evaluation, count: int = SAMPLE_SIZE, max_bytes: int = SAMPLE_MAX_BYTES) -> int:
    """How many held-out rows the sample ships: ``count``, fewer when inputs and outputs are large (at
    least 4, so a device always has something to compare)."""
    n = evaluation.eval_samples
    per_row = sum(
        int(np.prod([max(d, 1) for d in s.shape[1:]] or [1])) * np.dtype(s.dtype).itemsize
        for s in evaluation.inputs
    )
    per_row += sum(int(np.prod(v.shape[1:] or (1,))) * 4 for v in evaluation.output_values)
    fit = max(4, max_bytes // max(per_row, 1))
    return int(min(count, n, fit))


def sample_accuracy(y: np.ndarray | None, evaluation: Evaluation, count: int = SAMPLE_SIZE) -> float | None:
    """Accuracy on the rows :func:`sample_npz` ships (the first rows of the held-out split)."""
    if y is None or evaluation.predictions is None:
        return None
    n = sample_rows(evaluation, count)
    return float(np.mean(evaluation.predictions[:n] == np.asarray(y[:n]).astype(np.int64)))


def sample_npz(
    inputs: tuple[np.ndarray, ...] | np.ndarray,
    y: np.ndarray | None,
    evaluation: Evaluation,
    count: int = SAMPLE_SIZE,
) -> bytes:
    """The first held-out rows in the file's input order and dtypes, the file's own outputs on them
    (``ref_*``, float32, in the file's output order) and the labels when there are any."""
    rows = (inputs,) if isinstance(inputs, np.ndarray) else inputs
    n = sample_rows(evaluation, count)
    order = evaluation.input_order or tuple(range(len(rows)))
    fed = [quantize_input(rows[order[k]][:n], spec) for k, spec in enumerate(evaluation.inputs)]
    refs: list[np.ndarray] = []
    if evaluation.output_values:
        out_order = evaluation.output_order or tuple(range(len(evaluation.output_values)))
        by_file = {pos: j for j, pos in enumerate(out_order)}
        refs = [evaluation.output_values[by_file[pos]][:n] for pos in range(len(out_order))]
    labels = None if y is None else np.ascontiguousarray(y[:n], dtype=np.int64)
    buf = io.BytesIO()
    arrays: dict[str, Any] = sample_arrays(fed, refs, labels)
    np.savez(buf, **arrays)
    return buf.getvalue()


def make_variant(bv: BuiltVariant) -> Variant:
    ev = bv.evaluation
    metrics = HostMetrics(
        accuracy=ev.accuracy,
        accuracy_drop=bv.accuracy_drop,
        agreement=bv.agreement,
        eval_samples=ev.eval_samples,
        sample_accuracy=bv.sample_accuracy,
        size_bytes=ev.size_bytes,
        gzip_bytes=ev.gzip_bytes,
        params=bv.params,
        macs=bv.macs,
        latency_ms_p50=ev.latency_ms_p50,
        named=bv.named,
    )
    return Variant(
        **blob_fields(bv.tflite),
        id=bv.id,
        file=bv.file,
        quantization=bv.quantization,  # recipes only use wire values
        techniques=bv.techniques,
        inputs=ev.inputs,
        outputs=ev.outputs,
        metrics=metrics,
        min_runtime=bv.min_runtime,
        sample=BlobRef.of(bv.sample) if bv.sample is not None else None,
        output_tolerance=bv.tolerance if bv.sample is not None else None,
        required_custom_ops=bv.required_custom_ops,
        notes=bv.notes,
    )


def make_manifest(
    model_id: str,
    created_at: float,
    labels: Sequence[str],
    variants: Sequence[BuiltVariant],
    baseline: str,
    *,
    task: Literal["classification", "generic"] = "classification",
    metrics: Mapping[str, MetricInfo] | None = None,
    primary_metric: str | None = None,
) -> Manifest:
    return Manifest(
        model=model_id,
        version=max(1, int(created_at * 1000)),
        created_at=created_at,
        task=task,
        labels=list(labels),
        metrics=dict(metrics or {}),
        primary_metric=primary_metric,
        baseline=baseline,
        variants=[make_variant(v) for v in variants],
    )


def render_report(
    manifest: Manifest,
    failures: Sequence[VariantFailure] = (),
    notes: Sequence[str] = (),
    sections: Sequence[str] = (),
) -> str:
    """The report; ``sections`` are extra Markdown lines (the budget and candidates) put before the
    variants that were not shipped."""
    lines = [
        f"# Bundle `{manifest.model}` version {manifest.version}",
        "",
        f"Task: {manifest.task}. Baseline: `{manifest.baseline}`. Every figure is measured on the .tflite "
        "file itself with ai-edge-litert on the held-out rows; latency is the host median, 1 thread. "
        "Parameters and MACs are read from the .tflite graph (Conv2D, DepthwiseConv2D, FullyConnected). "
        "Drop is in points against the baseline; agreement is top-1 agreement with it on the same inputs; "
        "cosine and SQNR compare every output with the baseline's on the same rows (worst output); "
        "'x smaller' is the baseline file's size over this file's.",
        "",
        *summary_table(manifest, markdown=True),
    ]
    n = manifest.variants[0].metrics.eval_samples
    lines += [
        "",
        f"Evaluation rows: {n}. Each `<variant>.sample.npz` holds the same first "
        f"{SAMPLE_SIZE if n is None else min(SAMPLE_SIZE, n)} (fewer for large inputs) held-out inputs in "
        "the same order, in that variant's input dtypes, with the variant's own outputs on them (ref_*), "
        "which a device must reproduce within the manifest's output tolerance.",
    ]
    techniques = {t for v in manifest.variants for t in v.techniques}
    if techniques & {"magnitude_prune", "cluster"}:
        lines += ["", f"**{UNSTRUCTURED_STATEMENT}**"]
    if notes:
        lines += ["", "## Notes", ""]
        lines += [f"- {note}" for note in notes]
    if any(v.notes for v in manifest.variants):
        lines += ["", "## Per-variant notes", ""]
        for v in manifest.variants:
            if v.notes:
                lines.append(f"- `{v.id}` ({', '.join(v.techniques) or 'no transform'}):")
                lines += [f"  - {note}" for note in v.notes]
    outputs = manifest.variants[0].outputs
    if len(outputs) > 1:
        lines += [
            "",
            "## Per output",
            "",
            "cosine / SQNR dB / max abs error against the baseline, per output:",
            "",
        ]
        names = [f"{j}: `{o.name}` {o.shape}" for j, o in enumerate(outputs)]
        lines.append("| variant | " + " | ".join(names) + " |")
        lines.append("|---|" + "---:|" * len(outputs))
        for v in manifest.variants:
            cells = []
            for j in range(len(outputs)):
                named = v.metrics.named
                cells.append(
                    f"{_fixed(named.get(f'cosine_{j}'), 5)} / {_db(named.get(f'sqnr_db_{j}'))} / "
                    f"{_num(named.get(f'max_abs_{j}'))}"
                )
            lines.append(f"| `{v.id}` | " + " | ".join(cells) + " |")
    lines += list(sections)
    if failures:
        lines += ["", "## Variants not shipped", ""]
        lines += [f"- `{f.variant}` ({f.stage}): {f.message}" for f in failures]
    return "\n".join(lines) + "\n"


def _columns(manifest: Manifest) -> list[tuple[str, Callable[[Variant], str], bool]]:
    """(header, cell, left-aligned) of the summary: task metrics first, then fidelity, size, speed."""
    base = manifest.variant(manifest.baseline).metrics.size_bytes
    cols: list[tuple[str, Callable[[Variant], str], bool]] = [
        ("variant", lambda v: v.id, True),
        ("quant", lambda v: v.quantization, True),
    ]
    if manifest.task == "classification":
        cols += [
            ("accuracy", lambda v: _pct(v.metrics.accuracy), False),
            ("drop", lambda v: _pts(v.metrics.accuracy_drop), False),
            ("agreement", lambda v: _pct(v.metrics.agreement), False),
        ]
    user = [n for n, info in manifest.metrics.items() if info.source == "evaluator"]
    for name in user:
        cols.append((name, _metric_cell(name), False))
    cols += [
        ("cosine", lambda v: _fixed(v.metrics.named.get("cosine"), 5), False),
        ("SQNR dB", lambda v: _db(v.metrics.named.get("sqnr_db")), False),
        ("size KiB", lambda v: f"{v.metrics.size_bytes / 1024:.1f}", False),
        ("x smaller", lambda v: f"{base / v.metrics.size_bytes:.2f}", False),
        ("gzip KiB", lambda v: _kib(v.metrics.gzip_bytes), False),
        ("params", lambda v: _int(v.metrics.params), False),
        ("MACs", lambda v: _int(v.metrics.macs), False),
        ("p50 ms", lambda v: _ms(v.metrics.latency_ms_p50), False),
        ("min rt", lambda v: v.min_runtime or "?", True),
    ]
    return cols


def _metric_cell(name: str) -> Callable[[Variant], str]:
    return lambda v: _num(v.metrics.value(name))


def summary_rows(manifest: Manifest) -> list[tuple[str, ...]]:
    cols = _columns(manifest)
    return [tuple(cell(v) for _, cell, _ in cols) for v in manifest.variants]


def summary_table(manifest: Manifest, *, markdown: bool = False) -> list[str]:
    """The variants as a Markdown table or as aligned plain text (the CLI's summary)."""
    cols = _columns(manifest)
    heads = [h for h, _, _ in cols]
    left = [lft for _, _, lft in cols]
    rows = summary_rows(manifest)
    if markdown:
        head = "| " + " | ".join(heads) + " |"
        align = "|" + "|".join("---" if lft else "---:" for lft in left) + "|"
        body = ["| " + " | ".join((f"`{r[0]}`", *r[1:])) + " |" for r in rows]
        return [head, align, *body]
    widths = [max(len(c), *(len(r[i]) for r in rows)) for i, c in enumerate(heads)]

    def fmt(cells: Sequence[str]) -> str:
        return "  ".join(
            c.ljust(w) if left[i] else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths, strict=True))
        ).rstrip()

    return [fmt(heads), *(fmt(r) for r in rows)]


def _num(v: float | None, digits: int = 4) -> str:
    return "–" if v is None else f"{v:.{digits}g}"


def _fixed(v: float | None, decimals: int) -> str:
    return "–" if v is None else f"{v:.{decimals}f}"


def _db(v: float | None) -> str:
    if v is None:
        return "–"
    return "exact" if v >= MAX_SQNR_DB else f"{v:.1f}"


def _pct(v: float | None) -> str:
    return "–" if v is None else f"{100 * v:.2f} %"


def _pts(v: float | None) -> str:
    return "–" if v is None else f"{100 * v:+.2f}"


def _kib(v: int | None) -> str:
    return "–" if v is None else f"{v / 1024:.1f}"


def _int(v: int | None) -> str:
    return "–" if v is None else f"{v:,}"


def _ms(v: float | None) -> str:
    return "–" if v is None else f"{v:.3f}"


def plot_accuracy_vs_size(manifest: Manifest, path: Path) -> None:
    """PNG scatter of accuracy against .tflite size (KiB, log scale), a marker per variant."""
    _plot(
        manifest,
        path,
        x=lambda v: v.metrics.size_bytes / 1024,
        xlabel=".tflite size (KiB, log scale)",
        title="accuracy vs size",
    )


def plot_accuracy_vs_latency(manifest: Manifest, path: Path) -> None:
    """PNG scatter of accuracy against host latency (p50 ms, 1 thread, log scale), a marker per variant."""
    _plot(
        manifest,
        path,
        x=lambda v: v.metrics.latency_ms_p50 or 1e-3,
        xlabel="host latency p50, 1 thread (ms, log scale)",
        title="accuracy vs host latency",
    )


# One colour and marker per variant, named in a legend beside the axes: variants of almost the same
# size or latency sit on top of each other, and text labels at the points would overlap.
_MARKERS = "osD^v<>pP*hX"


def _plot(manifest: Manifest, path: Path, *, x: Callable[[Variant], float], xlabel: str, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    fig = Figure(figsize=(8.6, 4.8), dpi=110, layout="constrained")
    ax = fig.add_subplot()
    metric = manifest.primary_metric or "accuracy"
    scale = 100.0 if metric == "accuracy" else 1.0
    colours = matplotlib.colormaps["tab10" if len(manifest.variants) <= 10 else "tab20"]
    for i, v in enumerate(manifest.variants):
        value = v.metrics.value(metric)
        if value is None:
            continue
        y = scale * min(value, 120.0) if metric == "sqnr_db" else scale * value
        ax.scatter(
            [x(v)],
            [y],
            s=48,
            marker=_MARKERS[i % len(_MARKERS)],
            color=colours(i % colours.N),
            edgecolors="black",
            linewidths=0.4,
            alpha=0.9,
            label=v.id,
            zorder=3,
        )
    ax.set_xscale("log")
    ax.ticklabel_format(axis="y", useOffset=False)  # accuracies as they are, not "+8.6e1"
    ax.set_xlabel(xlabel)
    ax.set_ylabel("test accuracy (%)" if metric == "accuracy" else f"{metric} (held-out rows)")
    ax.set_title(f"{manifest.model}: {title}")
    ax.grid(True, alpha=0.3)
    if ax.collections:
        ax.legend(title="variant", fontsize=8, loc="upper left", bbox_to_anchor=(1.02, 1.0), borderaxespad=0)
    fig.savefig(path, metadata={"Software": None})


def check_out(out: Path) -> None:
    """Refuse early an output path that write_bundle would refuse (not empty and not a bundle)."""
    if out.exists() and not _replaceable(out):
        raise BundleWriteError(
            f"{str(out)!r} exists and is not a bundle (no {MANIFEST}) nor empty; choose another --out"
        )


def write_bundle(
    out: Path,
    manifest: Manifest,
    files: Mapping[str, bytes],
    report_md: str,
) -> Path:
    """Write ``files`` + report + plot + manifest (last) to a temp sibling, then swap it into ``out``."""
    out = out.absolute()
    check_out(out)
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    old = out.parent / f".{out.name}.old-{os.getpid()}"
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir()
        for name, data in files.items():
            _write(tmp / name, data)
        _write(tmp / REPORT, report_md.encode("utf-8"))
        plot_accuracy_vs_size(manifest, tmp / PLOT)
        plot_accuracy_vs_latency(manifest, tmp / PLOT_LATENCY)
        body = manifest.model_dump_json(by_alias=True, exclude_none=True, indent=2) + "\n"
        _write(tmp / MANIFEST, body.encode("utf-8"))
        _fsync_dir(tmp)
        if out.exists():
            out.rename(old)
        tmp.rename(out)
        _fsync_dir(out.parent)
    except OSError as err:
        shutil.rmtree(tmp, ignore_errors=True)
        if old.exists() and not out.exists():
            old.rename(out)
        raise BundleWriteError(f"cannot write bundle {str(out)!r}: {err}") from err
    shutil.rmtree(old, ignore_errors=True)
    return out


def _replaceable(path: Path) -> bool:
    return path.is_dir() and ((path / MANIFEST).is_file() or not any(path.iterdir()))


def _write(path: Path, data: bytes) -> None:
    with open(path, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
