"""End to end: (Keras model, dataset) → converted, evaluated variants → bundle directory.

``build_demo_bundle`` trains the seed CNN on the built-in digits set; ``build_bundle`` takes any
single-input classifier (a Keras model object or a ``.keras`` path) and a :class:`Dataset`.
Progress lines (``train: ...``, ``convert <variant>``, ``evaluate <variant>``) go to the ``progress``
callback, never to stdout. A variant that fails to convert or evaluate is recorded and skipped; only
the float32 baseline is mandatory (without it nothing can be compared).
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from agent.wire import Manifest
from compressor.bundle import (
    BuiltVariant,
    check_out,
    make_manifest,
    render_report,
    sample_file_name,
    sample_npz,
    write_bundle,
)
from compressor.compat import OLDEST_SHIPPED_RUNTIME, inspect_tflite, version_tuple
from compressor.convert import BASELINE, Recipe, convert, resolve_recipes
from compressor.data import Dataset, load_digits
from compressor.errors import CompressorError, ConversionError, VariantFailure
from compressor.evaluate import Evaluation, agreement, evaluate_tflite

Progress = Callable[[str], None]


@dataclass(frozen=True, slots=True)
class BuildResult:
    manifest: Manifest
    out: Path
    failures: tuple[VariantFailure, ...]
    seconds: float


def _noop(_: str) -> None:
    return None


def build_demo_bundle(
    out: Path,
    *,
    epochs: int = 8,
    seed: int = 0,
    variants: Sequence[str] | None = None,
    model_id: str = "digits",
    progress: Progress | None = None,
) -> Manifest:
    """Train the seed CNN on ``digits`` and write a bundle of its variants to ``out``."""
    return build_demo(
        out, epochs=epochs, seed=seed, variants=variants, model_id=model_id, progress=progress
    ).manifest


def build_demo(
    out: Path,
    *,
    epochs: int = 8,
    seed: int = 0,
    variants: Sequence[str] | None = None,
    model_id: str = "digits",
    progress: Progress | None = None,
    latency_budget_s: float = 0.5,
) -> BuildResult:
    """Like :func:`build_demo_bundle` but also returns the failures and the wall time."""
    from compressor.models import build_seed_cnn, train

    report = progress or _noop
    start = time.perf_counter()
    check_out(out)
    data = load_digits(seed=seed)
    report(f"data: digits train {len(data.y_train)} val {len(data.y_val)} test {len(data.y_test)}")
    model = build_seed_cnn(data.input_shape, data.num_classes, seed=seed)
    report(f"train: seed CNN, {epochs} epochs, seed {seed}")
    train(model, data, epochs=epochs, seed=seed, progress=report)
    result = build_bundle(
        model,
        data,
        out,
        variants=variants,
        model_id=model_id,
        seed=seed,
        progress=progress,
        latency_budget_s=latency_budget_s,
    )
    return BuildResult(result.manifest, result.out, result.failures, time.perf_counter() - start)


def build_bundle(
    model: Any,
    data: Dataset,
    out: Path,
    *,
    variants: Sequence[str] | None = None,
    model_id: str = "digits",
    seed: int = 0,
    progress: Progress | None = None,
    created_at: float | None = None,
    latency_budget_s: float = 0.5,
) -> BuildResult:
    """Convert ``model`` (a Keras model or a .keras path) with each recipe, evaluate, write a bundle.

    Raises CompressorError subclasses for unusable input, a failed baseline or a failed write.
    """
    from compressor.models import count_macs, count_params, load_keras_model

    report = progress or _noop
    start = time.perf_counter()
    check_out(out)
    if isinstance(model, str | Path):
        report(f"load: {model}")
        model = load_keras_model(Path(model))
    recipes = resolve_recipes(variants)
    params, macs = count_params(model), count_macs(model)

    built: list[BuiltVariant] = []
    failures: list[VariantFailure] = []
    baseline: Evaluation | None = None
    for recipe in recipes:
        try:
            bv = _build_variant(
                recipe,
                model,
                data,
                seed=seed,
                baseline=baseline,
                params=params,
                macs=macs,
                report=report,
                latency_budget_s=latency_budget_s,
            )
        except CompressorError as err:
            stage = "convert" if isinstance(err, ConversionError) else "evaluate"
            if recipe.id == BASELINE:
                raise type(err)(f"baseline {BASELINE}: {err}") from err
            failures.append(VariantFailure(recipe.id, stage, str(err)))
            report(f"FAILED {recipe.id} ({stage}): {err}")
            continue
        if recipe.id == BASELINE:
            baseline = bv.evaluation
        built.append(bv)

    created = time.time() if created_at is None else created_at
    manifest = make_manifest(model_id, created, data.labels, built, BASELINE)
    files: dict[str, bytes] = {}
    for bv in built:
        files[bv.file] = bv.tflite
        files[sample_file_name(bv.id)] = bv.sample
    notes = [f"dataset: {data.name}", *data.notes]
    report(f"write: {out}")
    path = write_bundle(out, manifest, files, render_report(manifest, failures, notes))
    return BuildResult(manifest, path, tuple(failures), time.perf_counter() - start)


def _build_variant(
    recipe: Recipe,
    model: Any,
    data: Dataset,
    *,
    seed: int,
    baseline: Evaluation | None,
    params: int | None,
    macs: int | None,
    report: Progress,
    latency_budget_s: float,
) -> BuiltVariant:
    report(f"convert {recipe.id}")
    with warnings.catch_warnings():
        # The int8 converter warns that it has no input statistics; it takes them from the representative set.
        warnings.filterwarnings("ignore", message="Statistics for quantized inputs were expected")
        tflite = convert(model, recipe, data, seed=seed)
    report(f"evaluate {recipe.id}")
    ev = evaluate_tflite(tflite, data.x_test, data.y_test, latency_budget_s=latency_budget_s)
    ref = baseline or ev
    runtime, notes = _min_runtime(tflite)
    report(
        f"evaluate {recipe.id}: accuracy {ev.accuracy:.4f} size {ev.size_bytes} B "
        f"p50 {ev.latency_ms_p50:.3f} ms"
    )
    return BuiltVariant(
        id=recipe.id,
        quantization=recipe.quantization,
        techniques=recipe.techniques,
        tflite=tflite,
        evaluation=ev,
        accuracy_drop=ref.accuracy - ev.accuracy,
        agreement=agreement(ref.predictions, ev.predictions),
        params=params,
        macs=macs,
        min_runtime=runtime,
        sample=sample_npz(data.x_test, data.y_test, ev),
        notes=notes,
    )


def _min_runtime(tflite: bytes) -> tuple[str | None, list[str]]:
    """The gate's oldest safe runtime, never below the oldest runtime edgefleet ships to and tests."""
    try:
        compat = inspect_tflite(tflite)
    except CompressorError as err:  # an unreadable file must not lose the variant; say so instead
        return None, [f"min_runtime unknown: {err}"]
    notes = list(compat.findings)
    if version_tuple(compat.min_runtime) < version_tuple(OLDEST_SHIPPED_RUNTIME):
        return OLDEST_SHIPPED_RUNTIME, notes
    return compat.min_runtime, notes
