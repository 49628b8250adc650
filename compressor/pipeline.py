"""End to end: (model, dataset, recipe) → converted, evaluated variants → bundle directory.

``build_demo`` trains the seed CNN on the built-in digits set; ``build_bundle`` takes any single-input
classifier (a Keras model object, a ``.keras`` path, or a float ``.tflite`` path with no Keras source)
and a :class:`Dataset`. Before anything trains, :func:`compressor.validate.validate` checks the data
alone and against the model (sample shape, class indices in ``[0, K)``, a (batch, K >= 2) softmax or
logit output, at least 10 samples per split, finite values): bad input is a DataError in seconds.

Keras input: for each recipe variant the model transforms run in order, then the quantize step
converts. Transformed Keras models are cached by step prefix, so variants that start with the same
steps share one fine-tuned model (``prune keep 0.5`` runs once for ``prune50-int8``,
``prune50-dynint8`` and ``prune50-distill-int8``). ``.tflite`` input: float32 is the file itself and
the int8 modes come from ai-edge-quantizer; variants that need the Keras model are listed as skipped.

Every variant is evaluated as the .tflite file (:mod:`compressor.evaluate`), its parameters and MACs
read from the file's graph (:mod:`compressor.graph`), and checked: a variant whose file holds no int8
weights is never labelled int8; identical bytes to float32, a slower host latency or an accuracy drop
beyond the tolerances are written to ``Variant.notes`` and the report.

Progress lines go to the ``progress`` callback, never to stdout. A variant that fails (an
UnsupportedLayerError, a converter crash, anything) is recorded and the others are still built; only the
float32 baseline is mandatory.
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from agent.wire import Manifest, version_tuple
from compressor.bundle import (
    BuiltVariant,
    check_out,
    make_manifest,
    render_report,
    sample_accuracy,
    sample_file_name,
    sample_npz,
    write_bundle,
)
from compressor.compat import OLDEST_SHIPPED_RUNTIME, inspect_tflite
from compressor.data import Dataset, load_digits
from compressor.errors import (
    CompressorError,
    ConversionError,
    DataError,
    EvaluationError,
    VariantFailure,
)
from compressor.evaluate import Evaluation, agreement, evaluate_tflite
from compressor.graph import graph_stats
from compressor.recipe import INT8_MODES, UNSTRUCTURED_KINDS, Recipe, RecipeFile, load_recipe
from compressor.validate import validate

Progress = Callable[[str], None]
RecipeSpec = RecipeFile | str | Path | None

# A quantized variant slower than float32 by more than this fraction, or less accurate by more than
# this many points, gets a note (FACTS.md: ai-edge-quantizer's int8 files can be slower).
LATENCY_TOLERANCE = 0.10
ACCURACY_TOLERANCE = 0.01
SAMPLE_SIZE = 128
# ``compress --demo`` builds the full default recipe: about 2 minutes on 2 shared cores (measured
# 116 s with 8 training epochs). ``--recipe demo`` is the fast subset (float32, float16, dynint8,
# int8, prune50-int8).
DEMO_RECIPE = "default"


@dataclass(frozen=True, slots=True)
class BuildResult:
    manifest: Manifest
    out: Path
    failures: tuple[VariantFailure, ...]
    seconds: float
    recipe: str = "default"


def _noop(_: str) -> None:
    return None


def _recipe(spec: RecipeSpec, default: str) -> RecipeFile:
    if isinstance(spec, RecipeFile):
        return spec
    return load_recipe(default if spec is None else spec)


def build_demo_bundle(
    out: Path,
    *,
    epochs: int = 8,
    seed: int = 0,
    variants: Sequence[str] | None = None,
    model_id: str = "digits",
    progress: Progress | None = None,
    recipe: RecipeSpec = None,
) -> Manifest:
    """Train the seed CNN on ``digits`` and write a bundle of its variants to ``out``."""
    return build_demo(
        out,
        epochs=epochs,
        seed=seed,
        variants=variants,
        model_id=model_id,
        progress=progress,
        recipe=recipe,
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
    recipe: RecipeSpec = None,
    deterministic: bool = True,
) -> BuildResult:
    """Like :func:`build_demo_bundle` but also returns the failures and the wall time.

    The recipe defaults to :data:`DEMO_RECIPE`; ``recipe="demo"`` is the fast subset.
    """
    from compressor.models import build_seed_cnn, train

    report = progress or _noop
    start = time.perf_counter()
    check_out(out)
    rf = _recipe(recipe, DEMO_RECIPE)
    rf.select(None if variants is None else list(variants))  # a typo fails before training
    data = load_digits(seed=seed)
    report(f"data: digits train {len(data.y_train)} val {len(data.y_val)} test {len(data.y_test)}")
    model = build_seed_cnn(data.input_shape, data.num_classes, seed=seed)
    data, _ = validate(model, data)
    report(f"train: seed CNN, {epochs} epochs, seed {seed}")
    train(model, data, epochs=epochs, seed=seed, progress=report, deterministic=deterministic)
    result = build_bundle(
        model,
        data,
        out,
        recipe=rf,
        variants=variants,
        model_id=model_id,
        seed=seed,
        progress=progress,
        latency_budget_s=latency_budget_s,
        deterministic=deterministic,
    )
    return BuildResult(
        result.manifest, result.out, result.failures, time.perf_counter() - start, result.recipe
    )


def build_bundle(
    model: Any,
    data: Dataset,
    out: Path,
    *,
    recipe: RecipeSpec = None,
    variants: Sequence[str] | None = None,
    model_id: str = "digits",
    seed: int = 0,
    progress: Progress | None = None,
    created_at: float | None = None,
    latency_budget_s: float = 0.5,
    sample_size: int = SAMPLE_SIZE,
    deterministic: bool = True,
) -> BuildResult:
    """Build, evaluate and write every selected variant of ``recipe``.

    ``model``: a Keras model, a ``.keras`` path, or a ``.tflite`` path (then the default recipe is the
    built-in ``tflite`` one). Raises CompressorError subclasses for unusable input, a failed baseline or
    a failed write; any other variant's failure is recorded in the result and the report.
    """
    report = progress or _noop
    start = time.perf_counter()
    check_out(out)
    is_tflite = isinstance(model, str | Path) and Path(model).suffix == ".tflite"
    rf = _recipe(recipe, "tflite" if is_tflite else "default")
    recipes = rf.select(None if variants is None else list(variants))
    report(f"recipe: {rf.name} ({len(recipes)} variants: {', '.join(r.id for r in recipes)})")
    builder: _Builder
    # Every input check runs here, before any transform trains anything (compressor.validate).
    if is_tflite:
        builder = _TfliteBuilder(Path(model), report)
        data, sig = validate(builder.data, data)
    else:
        if isinstance(model, str | Path):
            from compressor.models import load_keras_model

            report(f"load: {model}")
            model = load_keras_model(Path(model))
        data, sig = validate(model, data)
        builder = _KerasBuilder(model, data, seed, report, deterministic)
    report(
        f"check: data fits the model (input {data.input_shape}, {sig.num_classes} classes, "
        f"{sig.output}; train {len(data.y_train)} val {len(data.y_val)} test {len(data.y_test)})"
    )

    built: list[BuiltVariant] = []
    failures: list[VariantFailure] = []
    baseline: tuple[BuiltVariant, Evaluation] | None = None
    for r in recipes:
        stage = ["transform"]  # where this variant is, for the failure record

        def set_stage(name: str, box: list[str] = stage) -> None:
            box[0] = name

        try:
            tflite, stage_notes = builder.build(r, set_stage)
            set_stage("evaluate")
            bv = _measure(r, tflite, data, baseline, stage_notes, report, latency_budget_s, sample_size)
        except Exception as err:
            where = _stage_of(err, stage[0])
            if r.id == rf.baseline:
                if type(err) in (CompressorError, ConversionError, EvaluationError, DataError):
                    raise type(err)(f"baseline {r.id}: {err}") from err
                raise ConversionError(f"baseline {r.id}: {type(err).__name__}: {err}") from err
            message = str(err) if isinstance(err, CompressorError) else f"{type(err).__name__}: {err}"
            failures.append(VariantFailure(r.id, where, message))
            report(f"FAILED {r.id} ({where}): {message}")
            continue
        if r.id == rf.baseline:
            baseline = (bv, bv.evaluation)
        built.append(bv)

    _compare_unstructured(built, recipes)
    created = time.time() if created_at is None else created_at
    manifest = make_manifest(model_id, created, data.labels, built, rf.baseline)
    files: dict[str, bytes] = {}
    for bv in built:
        files[bv.file] = bv.tflite
        files[sample_file_name(bv.id)] = bv.sample
    notes = [f"recipe: {rf.name}", f"dataset: {data.name}", *data.notes, *builder.notes]
    report(f"write: {out}")
    path = write_bundle(out, manifest, files, render_report(manifest, failures, notes))
    return BuildResult(manifest, path, tuple(failures), time.perf_counter() - start, rf.name)


def _stage_of(err: BaseException, stage: str) -> str:
    from compressor.convert import NeedsKerasError

    if isinstance(err, NeedsKerasError):
        return "skipped"
    if isinstance(err, EvaluationError):
        return "evaluate"
    return stage


# --------------------------------------------------------------------------------------------------------
# builders: recipe variant → .tflite bytes


class _Builder:
    notes: list[str]

    def build(self, recipe: Recipe, stage: Callable[[str], None]) -> tuple[bytes, list[str]]:
        raise NotImplementedError


class _KerasBuilder(_Builder):
    """Runs the transforms (cached by step prefix) and converts with TensorFlow."""

    def __init__(self, model: Any, data: Dataset, seed: int, report: Progress, deterministic: bool) -> None:
        from compressor.convert import TransformContext

        self.ctx = TransformContext(data=data, seed=seed, teacher=model, progress=report)
        self.report = report
        self.cache: dict[tuple[str, ...], tuple[Any, list[str]] | BaseException] = {(): (model, [])}
        self.notes = []
        self.deterministic = deterministic

    def transformed(self, steps: list[Any]) -> tuple[Any, list[str]]:
        from compressor.convert import MODEL_TRANSFORMS

        keys = tuple(s.model_dump_json() for s in steps)
        for i in range(1, len(keys) + 1):
            key = keys[:i]
            entry = self.cache.get(key)
            if isinstance(entry, BaseException):
                raise entry
            if entry is not None:
                self.report(f"transform {steps[i - 1].kind}: reusing the model already built for this prefix")
                continue
            parent = self.cache[key[:-1]]
            assert not isinstance(parent, BaseException)
            step = steps[i - 1]
            self.report(f"transform {step.kind}: {_step_text(step)}")
            if self.deterministic:
                from compressor._tf import tf

                tf().config.experimental.enable_op_determinism()
            try:
                new_model, notes = MODEL_TRANSFORMS[step.kind](step, parent[0], self.ctx)
            except Exception as err:
                self.cache[key] = err  # the variants sharing this prefix fail the same way, without retrying
                raise
            self.cache[key] = (new_model, [*parent[1], *notes])
        entry = self.cache[keys]
        assert not isinstance(entry, BaseException)
        return entry

    def build(self, recipe: Recipe, stage: Callable[[str], None]) -> tuple[bytes, list[str]]:
        from compressor.convert import quantize_keras

        stage("transform")
        model, notes = self.transformed(recipe.transforms)
        stage("convert")
        self.report(f"convert {recipe.id}")
        with warnings.catch_warnings():
            # The int8 converter warns that it has no input statistics; it takes them from the
            # representative set.
            warnings.filterwarnings("ignore", message="Statistics for quantized inputs were expected")
            tflite = quantize_keras(model, recipe.quantize, self.ctx.data, seed=self.ctx.seed)
        if recipe.quantize.mode == "weight_only_int8":
            notes = [*notes, "weight-only int8 by ai-edge-quantizer from the float32 .tflite"]
        return tflite, list(notes)


class _TfliteBuilder(_Builder):
    """An existing float .tflite: the file is the baseline; ai-edge-quantizer makes the int8 variants."""

    def __init__(self, path: Path, report: Progress) -> None:
        if not path.is_file():
            raise DataError(f"model file {str(path)!r} does not exist")
        self.data = path.read_bytes()
        self.report = report
        report(f"load: {path} ({len(self.data)} B, no Keras source)")
        try:
            stats = graph_stats(self.data)
        except EvaluationError as err:
            raise DataError(f"{str(path)!r} is not a readable .tflite: {err}") from err
        self.notes = [f"input: an existing .tflite ({path.name}) without a Keras source"]
        if stats.weight_types and set(stats.weight_types) != {"FLOAT32"}:
            self.notes.append(
                f"the input .tflite already stores weights as {', '.join(stats.weight_types)}: "
                "it is not a float model, so quantizing it again may change nothing"
            )

    def build(self, recipe: Recipe, stage: Callable[[str], None]) -> tuple[bytes, list[str]]:
        from compressor.convert import NeedsKerasError, quantize_tflite

        if recipe.transforms:
            kinds = ", ".join(s.kind for s in recipe.transforms)
            raise NeedsKerasError(f"{kinds} needs the Keras model (a .tflite input has no Keras source)")
        stage("convert")
        self.report(f"convert {recipe.id}")
        tflite = quantize_tflite(self.data, recipe.quantize)
        notes = [] if recipe.quantize.mode == "float32" else ["quantized by ai-edge-quantizer"]
        return tflite, notes


def _step_text(step: Any) -> str:
    return ", ".join(f"{k}={v}" for k, v in step.model_dump(exclude={"kind"}).items() if v is not None)


# --------------------------------------------------------------------------------------------------------
# measuring and checking one variant


def _measure(
    recipe: Recipe,
    tflite: bytes,
    data: Dataset,
    baseline: tuple[BuiltVariant, Evaluation] | None,
    notes: list[str],
    report: Progress,
    latency_budget_s: float,
    sample_size: int,
) -> BuiltVariant:
    report(f"evaluate {recipe.id}")
    ev = evaluate_tflite(tflite, data.x_test, data.y_test, latency_budget_s=latency_budget_s)
    stats = graph_stats(tflite)
    runtime, compat_notes = _min_runtime(tflite)
    quantization, check_notes = _check_quantization(recipe, tflite, stats, ev, baseline)
    ref = baseline[1] if baseline else ev
    report(
        f"evaluate {recipe.id}: accuracy {ev.accuracy:.4f} size {ev.size_bytes} B "
        f"p50 {ev.latency_ms_p50:.3f} ms"
    )
    return BuiltVariant(
        id=recipe.id,
        quantization=quantization,
        techniques=recipe.techniques,
        tflite=tflite,
        evaluation=ev,
        accuracy_drop=ref.accuracy - ev.accuracy,
        agreement=agreement(ref.predictions, ev.predictions),
        params=stats.params,
        macs=stats.macs,
        min_runtime=runtime,
        sample=sample_npz(data.x_test, data.y_test, ev, count=sample_size),
        sample_accuracy=sample_accuracy(data.y_test, ev, count=sample_size),
        notes=[*notes, *check_notes, *compat_notes],
    )


def _check_quantization(
    recipe: Recipe,
    tflite: bytes,
    stats: Any,
    ev: Evaluation,
    baseline: tuple[BuiltVariant, Evaluation] | None,
) -> tuple[str, list[str]]:
    """The wire quantization label the file deserves, and notes on what did not work as asked."""
    mode = recipe.quantize.mode
    label = recipe.quantization
    notes: list[str] = []
    if mode in INT8_MODES and not stats.int8_weights:
        label = "float16" if stats.float16_weights else "none"
        notes.append(
            f"asked for {mode} but the file has no int8 weight tensors (weights: "
            f"{', '.join(stats.weight_types) or 'none found'}): labelled {label!r}, not int8"
        )
    elif mode == "float16" and not stats.float16_weights:
        label = "none"
        notes.append("asked for float16 but the file has no float16 weight tensors: labelled 'none'")
    if baseline is None or mode == "float32":
        return label, notes
    base_bv, base_ev = baseline
    if tflite == base_bv.tflite:
        notes.append("quantization changed nothing: the file is byte-identical to float32")
    if ev.latency_ms_p50 > base_ev.latency_ms_p50 * (1 + LATENCY_TOLERANCE):
        notes.append(
            f"slower than float32 on the host: p50 {ev.latency_ms_p50:.3f} ms vs "
            f"{base_ev.latency_ms_p50:.3f} ms (tolerance {LATENCY_TOLERANCE:.0%})"
        )
    drop = base_ev.accuracy - ev.accuracy
    if drop > ACCURACY_TOLERANCE:
        notes.append(
            f"accuracy {100 * drop:.2f} points below float32 (tolerance {100 * ACCURACY_TOLERANCE:.0f})"
        )
    return label, notes


def _compare_unstructured(built: list[BuiltVariant], recipes: list[Recipe]) -> None:
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
