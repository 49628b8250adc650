"""End to end: (model, rows, recipe) → converted, evaluated, checked variants → bundle directory.

``build_demo`` trains the seed CNN on the built-in digits set; ``build_bundle`` takes any model — a
Keras model object, a ``.keras`` path, or a float ``.tflite`` (float32 or float16 weights) with no Keras
source — with any number of inputs and outputs, and the rows to judge it on: ``--data`` splits
(labelled: classification; unlabelled or with non-class targets: generic), ``--calibration`` rows (split
with the seed into calibration and held-out rows), both, or neither (synthetic rows, labelled so). Order:

1. the model's inputs/outputs (and, for a .tflite, the compatibility gate: custom ops are refused unless
   ``allow_custom_ops``, which bundles the original as is);
2. the rows are assembled and checked against the model (:mod:`compressor.validate`) before anything
   trains: bad input is a DataError in seconds;
3. per recipe variant, :mod:`compressor.builders` makes the file (Keras transforms cached by step prefix
   and TensorFlow conversion; or :mod:`compressor.tflite_quant` / :mod:`compressor.mixed` on the file),
   intermediate tensor names are stripped, and :mod:`compressor.measure` evaluates it as the .tflite
   on the held-out rows and checks it: a variant that changed nothing is not shipped, one byte-identical
   to a kept variant is merged into it;
4. the manifest (task, named metrics with directions, primary metric) and the bundle are written.

Progress lines go to the ``progress`` callback, never to stdout. A variant that fails (an
UnsupportedLayerError, a converter crash, anything) is recorded and the others are still built; only the
baseline is mandatory. A failing user evaluator stops the build (EvaluatorError).
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from agent.wire import HostMetrics, Manifest, MetricInfo, Variant, blob_fields
from compressor.builders import Builder, KerasBuilder, TfliteBuilder, strip_names
from compressor.bundle import (
    BuiltVariant,
    check_out,
    make_manifest,
    render_report,
    sample_file_name,
    write_bundle,
)
from compressor.compat import CompatReport, custom_ops, flatbuffer_io
from compressor.data import (
    SYNTHETIC_ROWS,
    Dataset,
    Rows,
    load_calibration,
    load_digits,
    split_rows,
    synthetic_rows,
)
from compressor.errors import (
    CompressorError,
    ConversionError,
    DataError,
    EvaluationError,
    VariantFailure,
)
from compressor.graph import graph_stats
from compressor.measure import MeasureContext, check_changed, compare_unstructured, measure
from compressor.metrics import (
    Direction,
    Evaluator,
    EvaluatorError,
    builtin_info,
    load_evaluator,
)
from compressor.recipe import (
    RecipeFile,
    load_recipe,
)
from compressor.validate import ModelIO, keras_io, tflite_io, validate

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
    merged: tuple[str, ...] = ()


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
    data, _, _ = validate(model, data)
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
    data: Dataset | None,
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
    calibration: Path | None = None,
    input_range: tuple[float, float] | None = None,
    layout: str | None = None,
    evaluator: str | Evaluator | None = None,
    allow_custom_ops: bool = False,
    task: str | None = None,
) -> BuildResult:
    """Build, evaluate and write every selected variant of ``recipe``.

    ``model``: a Keras model, a ``.keras`` path, or a ``.tflite`` path (then the default recipe is the
    built-in ``tflite`` one). ``data``: labelled or unlabelled splits (:func:`compressor.data.load_npz`)
    or None; ``calibration``: a folder of images or a .npz of unlabelled rows, split into calibration
    and held-out rows when there is no ``data``. With neither, rows are synthetic (weight-only and
    dynamic variants still build; full-integer int8 is refused). Raises CompressorError subclasses for
    unusable input, a failed baseline, a failing evaluator or a failed write; any other variant's
    failure is recorded in the result and the report.
    """
    report = progress or _noop
    start = time.perf_counter()
    check_out(out)
    is_tflite = isinstance(model, str | Path) and Path(model).suffix == ".tflite"
    user_evaluator = load_evaluator(evaluator) if isinstance(evaluator, str) else evaluator
    builder: Builder
    # Every input check runs here, before any transform trains anything (compressor.validate).
    if is_tflite:
        tfl = TfliteBuilder(Path(model), report)
        gate = tfl.gate(allow_custom_ops)
        if gate is not None:  # custom ops, allowed: the original as is, nothing to evaluate here
            return _custom_op_bundle(tfl, gate, out, model_id, created_at, start, report)
        io = tflite_io(tfl.data, str(model))
        raw_model: Any = tfl.data
    else:
        if isinstance(model, str | Path):
            from compressor.models import load_keras_model

            report(f"load: {model}")
            model = load_keras_model(Path(model))
        io = keras_io(model)
        raw_model = model
    report(f"model: {io.describe()}")
    data = _assemble_data(data, io, calibration, input_range, layout, seed, report, task)
    data, io, sig = validate(raw_model, data)
    default_recipe = "tflite" if is_tflite else ("default" if data.task == "classification" else "generic")
    rf = _recipe(recipe, default_recipe)
    recipes = rf.select(None if variants is None else list(variants))
    report(f"recipe: {rf.name} ({len(recipes)} variants: {', '.join(r.id for r in recipes)})")
    if is_tflite:
        tfl.data_rows = data
        builder = tfl
    else:
        builder = KerasBuilder(model, data, seed, report, deterministic)
    what = f"{sig.num_classes} classes, {sig.output}" if sig is not None else "generic: no class labels"
    calib = len(data.calibration_rows)
    report(
        f"check: data fits the model ({what}; {data.num_inputs} input(s); calibration rows {calib}, "
        f"held-out rows {len(data.test)}{', synthetic' if data.synthetic else ''})"
    )
    ctx = MeasureContext(
        data=data,
        report=report,
        latency_budget_s=latency_budget_s,
        sample_size=sample_size,
        evaluator=user_evaluator,
        output_names=[o.name for o in io.outputs],
    )

    built: list[BuiltVariant] = []
    failures: list[VariantFailure] = []
    merged: list[str] = []
    for r in recipes:
        stage = ["transform"]  # where this variant is, for the failure record

        def set_stage(name: str, box: list[str] = stage) -> None:
            box[0] = name

        try:
            tflite, stage_notes = builder.build(r, set_stage)
            if r.id != rf.baseline:  # the reference stays as converted (or as given)
                tflite = strip_names(tflite, stage_notes)
            set_stage("check")
            stats = graph_stats(tflite)
            check_changed(r, tflite, stats, ctx.baseline)
            set_stage("evaluate")
            bv = measure(r, tflite, stats, ctx, stage_notes)
        except Exception as err:
            if isinstance(err, EvaluatorError):
                raise
            where = _stage_of(err, stage[0])
            if r.id == rf.baseline:
                if type(err) in (CompressorError, ConversionError, EvaluationError, DataError):
                    raise type(err)(f"baseline {r.id}: {err}") from err
                raise ConversionError(f"baseline {r.id}: {type(err).__name__}: {err}") from err
            message = str(err) if isinstance(err, CompressorError) else f"{type(err).__name__}: {err}"
            failures.append(VariantFailure(r.id, where, message))
            report(f"{'SKIPPED' if where == 'skipped' else 'FAILED'} {r.id} ({where}): {message}")
            continue
        twin = next((b for b in built if b.tflite == bv.tflite), None)
        if twin is not None:  # same bytes as a variant already kept: one variant, both names noted
            twin.notes.append(
                f"also built as `{r.id}` ({', '.join(r.techniques) or r.quantize.mode}): same bytes"
            )
            merged.append(f"`{r.id}` is byte-identical to `{twin.id}` and was merged into it")
            report(f"merge {r.id}: byte-identical to {twin.id}")
            continue
        if r.id == rf.baseline:
            ctx.baseline = bv
        built.append(bv)

    compare_unstructured(built, recipes)
    created = time.time() if created_at is None else created_at
    metric_infos, primary = _metric_catalogue(built, data.task, ctx.user_directions)
    manifest = make_manifest(
        model_id,
        created,
        data.labels,
        built,
        rf.baseline,
        task=data.task,
        metrics=metric_infos,
        primary_metric=primary,
    )
    files: dict[str, bytes] = {}
    for bv in built:
        files[bv.file] = bv.tflite
        if bv.sample is not None:
            files[sample_file_name(bv.id)] = bv.sample
    rows_note = (
        f"rows: {len(data.calibration_rows)} calibration, {len(data.val)} validation, {len(data.test)} "
        f"held-out test rows{' (the validation rows are the test rows)' if data.test_is_val else ''}"
        f"{' — SYNTHETIC, not real inputs' if data.synthetic else ''}"
    )
    notes = [f"recipe: {rf.name}", f"dataset: {data.name}", rows_note, *data.notes, *builder.notes, *merged]
    report(f"write: {out}")
    path = write_bundle(out, manifest, files, render_report(manifest, failures, notes))
    return BuildResult(manifest, path, tuple(failures), time.perf_counter() - start, rf.name, tuple(merged))


def _assemble_data(
    data: Dataset | None,
    io: ModelIO,
    calibration: Path | None,
    input_range: tuple[float, float] | None,
    layout: str | None,
    seed: int,
    report: Progress,
    task: str | None,
) -> Dataset:
    """The rows every variant is built and judged on: --data, --calibration, both, or synthetic rows."""
    inputs = list(io.inputs)
    calib = None
    if calibration is not None:
        calib = load_calibration(calibration, inputs, value_range=input_range, layout=layout)
        report(f"calibration: {len(calib)} rows from {calibration}")
    if data is not None:
        if task == "generic" and data.task == "classification":
            data = dataclasses.replace(
                data,
                train=Rows(data.train.inputs, None, data.train.y),
                val=Rows(data.val.inputs, None, data.val.y),
                test=Rows(data.test.inputs, None, data.test.y),
                labels=(),
            )
        return data if calib is None else dataclasses.replace(data, calibration=calib)
    if calib is not None and calibration is not None:
        train, held = split_rows(calib, seed=seed)
        note = (
            f"--calibration {calibration}: {len(calib)} rows split with seed {seed} into {len(train)} "
            f"calibration rows and {len(held)} held-out evaluation rows"
        )
        report(note)
        name = calibration.stem or "calibration"
        return Dataset(name, train, held, held, test_is_val=True, notes=(note,))
    rows = synthetic_rows(inputs, 2 * SYNTHETIC_ROWS, seed=seed, value_range=input_range)
    train, held = rows.head(SYNTHETIC_ROWS), rows.take(slice(SYNTHETIC_ROWS, None))
    lo, hi = input_range or (-1.0, 1.0)
    note = (
        f"no --data and no --calibration: fidelity is measured on {len(held)} SYNTHETIC rows (uniform "
        f"{lo:g}..{hi:g}), not on real inputs; full-integer int8 needs --calibration DIR|FILE.npz"
    )
    report(note)
    return Dataset("synthetic", train, held, held, test_is_val=True, notes=(note,), synthetic=True)


def _metric_catalogue(
    built: list[BuiltVariant], task: str, user: dict[str, Direction]
) -> tuple[dict[str, MetricInfo], str]:
    """Every named metric the variants carry, with its direction, and the primary one."""
    infos: dict[str, MetricInfo] = {}
    for bv in built:
        for name in bv.named:
            if name in infos:
                continue
            if name in user:
                infos[name] = MetricInfo(direction=user[name], source="evaluator")
            else:
                info = builtin_info(name)
                if info is not None:
                    infos[name] = info
    if task == "classification":
        primary = "accuracy"
    elif user:
        primary = next(iter(user))
    else:
        primary = "cosine"
    return infos, primary


def _stage_of(err: BaseException, stage: str) -> str:
    from compressor.convert import NeedsKerasError

    if isinstance(err, NeedsKerasError):
        return "skipped"
    if isinstance(err, EvaluationError):
        return "evaluate"
    return stage


def _custom_op_bundle(
    builder: TfliteBuilder,
    compat: CompatReport,
    out: Path,
    model_id: str,
    created_at: float | None,
    start: float,
    report: Progress,
) -> BuildResult:
    """--allow-custom-ops: the original file as the only variant, not evaluated (nothing here loads it)."""
    needs = custom_ops(compat)
    inputs, outputs = flatbuffer_io(builder.data)
    variant = Variant(
        **blob_fields(builder.data),
        id="original",
        file="original.tflite",
        quantization="float16" if builder.stats.float16_weights else "none",
        inputs=inputs,
        outputs=outputs,
        metrics=HostMetrics(
            size_bytes=len(builder.data), params=builder.stats.params, macs=builder.stats.macs
        ),
        min_runtime=compat.min_runtime,
        required_custom_ops=needs,
        notes=[
            f"bundled as is (--allow-custom-ops): needs a runtime built with {', '.join(needs)}; not "
            "evaluated on the host (the stock interpreter cannot load it); devices without the op report "
            "UNSUPPORTED_OP"
        ],
    )
    created = time.time() if created_at is None else created_at
    manifest = Manifest(
        model=model_id,
        version=max(1, int(created * 1000)),
        created_at=created,
        task="generic",
        baseline="original",
        variants=[variant],
    )
    report(f"write: {out} (the original only: custom ops {', '.join(needs)})")
    notes = [*builder.notes, *compat.findings]
    path = write_bundle(out, manifest, {"original.tflite": builder.data}, render_report(manifest, (), notes))
    return BuildResult(manifest, path, (), time.perf_counter() - start, "tflite")
