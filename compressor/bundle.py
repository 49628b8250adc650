"""Write a bundle directory: the variants, their evaluation samples, the manifest and a report.

Layout (file names are fixed; deploy reads the bundle through ``manifest.json`` only)::

    <out>/manifest.json             unsigned edgefleet Manifest (pretty-printed JSON)
    <out>/<variant>.tflite          each variant (Variant.file, hashed in Variant.sha256/chunks)
    <out>/<variant>.sample.npz      the first 128 held-out inputs in the variant's input dtype, arrays x
                                    and y (Variant.sample; np.savez, loads with allow_pickle=False). The
                                    SAME inputs in the same order for every variant, so a device can
                                    compare each variant's predictions with float32's on the same sample.
    <out>/report.md                 Markdown table of the variants, notes, and any that failed
    <out>/accuracy_vs_size.png      accuracy against file size, every point labelled
    <out>/accuracy_vs_latency.png   accuracy against host latency (p50, 1 thread), every point labelled

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

import numpy as np

from agent.wire import BlobRef, HostMetrics, Manifest, Variant, blob_fields
from compressor.errors import BundleWriteError, VariantFailure
from compressor.evaluate import Evaluation, quantize_input

SAMPLE_SIZE = 128
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
    accuracy_drop: float
    agreement: float
    params: int | None
    macs: int | None
    min_runtime: str | None
    sample: bytes
    sample_accuracy: float | None = None  # this file's accuracy on exactly the rows of ``sample``
    notes: list[str] = field(default_factory=list)

    @property
    def file(self) -> str:
        return f"{self.id}.tflite"

    @property
    def sample_file(self) -> str:
        return sample_file_name(self.id)


def sample_file_name(variant_id: str) -> str:
    return f"{variant_id}.sample.npz"


def sample_accuracy(y: np.ndarray, evaluation: Evaluation, count: int = SAMPLE_SIZE) -> float:
    """Accuracy on the rows :func:`sample_npz` ships (the first ``count`` held-out samples)."""
    n = min(count, len(y), len(evaluation.predictions))
    return float(np.mean(evaluation.predictions[:n] == np.asarray(y[:n]).astype(np.int64)))


def sample_npz(x: np.ndarray, y: np.ndarray, evaluation: Evaluation, count: int = SAMPLE_SIZE) -> bytes:
    """The first ``count`` held-out samples, inputs already in the variant's input dtype."""
    xq = quantize_input(x[:count], evaluation.inputs[0])
    buf = io.BytesIO()
    np.savez(buf, x=xq, y=np.ascontiguousarray(y[:count], dtype=np.int64))
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
        sample=BlobRef.of(bv.sample),
        notes=bv.notes,
    )


def make_manifest(
    model_id: str, created_at: float, labels: Sequence[str], variants: Sequence[BuiltVariant], baseline: str
) -> Manifest:
    return Manifest(
        model=model_id,
        version=max(1, int(created_at * 1000)),
        created_at=created_at,
        labels=list(labels),
        baseline=baseline,
        variants=[make_variant(v) for v in variants],
    )


def render_report(
    manifest: Manifest,
    failures: Sequence[VariantFailure] = (),
    notes: Sequence[str] = (),
) -> str:
    lines = [
        f"# Bundle `{manifest.model}` version {manifest.version}",
        "",
        f"Baseline: `{manifest.baseline}`. Every figure is measured on the .tflite file itself with "
        "ai-edge-litert on the held-out test split; latency is the host median, 1 thread. Parameters "
        "and MACs are read from the .tflite graph (Conv2D, DepthwiseConv2D, FullyConnected). Drop is in "
        "points against float32; agreement is top-1 agreement with float32 on the same inputs.",
        "",
        *summary_table(manifest, markdown=True),
    ]
    n = manifest.variants[0].metrics.eval_samples
    lines += [
        "",
        f"Evaluation samples: {n}. Each `<variant>.sample.npz` holds the same first "
        f"{SAMPLE_SIZE if n is None else min(SAMPLE_SIZE, n)} test inputs in the same order, in that "
        "variant's input dtype.",
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
    if failures:
        lines += ["", "## Variants not built", ""]
        lines += [f"- `{f.variant}` ({f.stage}): {f.message}" for f in failures]
    return "\n".join(lines) + "\n"


SUMMARY_COLUMNS = (
    "variant",
    "quant",
    "accuracy",
    "drop",
    "agreement",
    "size KiB",
    "gzip KiB",
    "params",
    "MACs",
    "p50 ms",
    "min rt",
)


_LEFT = (0, 1, 10)  # text columns


def summary_rows(manifest: Manifest) -> list[tuple[str, ...]]:
    rows: list[tuple[str, ...]] = []
    for v in manifest.variants:
        m = v.metrics
        rows.append(
            (
                v.id,
                v.quantization,
                _pct(m.accuracy),
                _pts(m.accuracy_drop),
                _pct(m.agreement),
                f"{m.size_bytes / 1024:.1f}",
                _kib(m.gzip_bytes),
                _int(m.params),
                _int(m.macs),
                _ms(m.latency_ms_p50),
                v.min_runtime or "?",
            )
        )
    return rows


def summary_table(manifest: Manifest, *, markdown: bool = False) -> list[str]:
    """The variants as a Markdown table or as aligned plain text (the CLI's summary)."""
    rows = summary_rows(manifest)
    if markdown:
        head = "| " + " | ".join(SUMMARY_COLUMNS) + " |"
        align = (
            "|" + "|".join("---" if i in (0, 1, 10) else "---:" for i in range(len(SUMMARY_COLUMNS))) + "|"
        )
        body = ["| " + " | ".join((f"`{r[0]}`", *r[1:])) + " |" for r in rows]
        return [head, align, *body]
    widths = [max(len(c), *(len(r[i]) for r in rows)) for i, c in enumerate(SUMMARY_COLUMNS)]

    def fmt(cells: Sequence[str]) -> str:
        return "  ".join(
            c.ljust(w) if i in (0, 1, 10) else c.rjust(w)
            for i, (c, w) in enumerate(zip(cells, widths, strict=True))
        ).rstrip()

    return [fmt(SUMMARY_COLUMNS), *(fmt(r) for r in rows)]


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
    """PNG scatter of accuracy against .tflite size (KiB, log scale), each point labelled."""
    _plot(
        manifest,
        path,
        x=lambda v: v.metrics.size_bytes / 1024,
        xlabel=".tflite size (KiB, log scale)",
        title="accuracy vs size",
    )


def plot_accuracy_vs_latency(manifest: Manifest, path: Path) -> None:
    """PNG scatter of accuracy against host latency (p50 ms, 1 thread, log scale), each point labelled."""
    _plot(
        manifest,
        path,
        x=lambda v: v.metrics.latency_ms_p50 or 1e-3,
        xlabel="host latency p50, 1 thread (ms, log scale)",
        title="accuracy vs host latency",
    )


def _plot(manifest: Manifest, path: Path, *, x: Callable[[Variant], float], xlabel: str, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7.2, 4.8), dpi=110)
    ax = fig.add_subplot()
    for v in manifest.variants:
        xv = x(v)
        acc = 100 * (v.metrics.accuracy or 0.0)
        ax.scatter([xv], [acc], s=40)
        ax.annotate(v.id, (xv, acc), textcoords="offset points", xytext=(6, 4), fontsize=8)
    ax.set_xscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel("test accuracy (%)")
    ax.set_title(f"{manifest.model}: {title}")
    ax.grid(True, alpha=0.3)
    fig.tight_layout()
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
