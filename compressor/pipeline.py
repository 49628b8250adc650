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
4. with a budget (``max_drop`` / ``min_metric``, :mod:`compressor.budget`), every variant is also
   evaluated on the validation rows; searched chains (``keep = "search"``) are bisected there; a
   variant ships only when it is within the budget on validation and on test (``keep_all``: always),
   the rest are listed in report.md with why. Without a budget every built variant ships;
5. the manifest (task, named metrics with directions, primary metric) and the bundle are written.

Progress lines go to the ``progress`` callback, never to stdout. A variant that fails (an
UnsupportedLayerError, a converter crash, anything) is recorded and the others are still built; only the
baseline is mandatory. A failing user evaluator stops the build (EvaluatorError).
"""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from agent.wire import HostMetrics, Manifest, MetricInfo, Variant, blob_fields
from compressor.budget import (
    KEEP_GRID,
    MAX_TRIALS,
    WIDTH_GRID,
    Budget,
    Candidate,
    Judgement,
    Trial,
    TrialCache,
    accuracy_intervals,
    bisect_strongest,
    closest,
    judge,
    make_budget,
    render_candidates,
)
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
from compressor.evaluate import Evaluation
from compressor.graph import graph_stats
from compressor.measure import (
    MeasureContext,
    check_changed,
    compare_unstructured,
    evaluate_on_val,
    held_quantization,
    measure,
)
from compressor.metrics import (
    Direction,
    Evaluator,
    EvaluatorError,
    builtin_info,
    load_evaluator,
)
from compressor.recipe import (
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
    # With a budget: whether any variant besides the baseline met it, the one-line closest candidate
    # when none did, and one line per variant kept out of the manifest.
    budget_met: bool | None = None
    closest: str = ""
    not_shipped: tuple[str, ...] = ()


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
    max_drop: float | None = None,
    min_metric: str | None = None,
    keep_all: bool = False,
    search_trials: int = MAX_TRIALS,
    time_budget_s: float | None = None,
    trial_cache: Path | None = None,
) -> BuildResult:
    """Like :func:`build_demo_bundle` but also returns the failures and the wall time.

    The recipe defaults to :data:`DEMO_RECIPE`; ``recipe="demo"`` is the fast subset. The budget
    arguments are :func:`build_bundle`'s.
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
        max_drop=max_drop,
        min_metric=min_metric,
        keep_all=keep_all,
        search_trials=search_trials,
        time_budget_s=time_budget_s,
        trial_cache=trial_cache,
    )
    return dataclasses.replace(result, seconds=time.perf_counter() - start)


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
    max_drop: float | None = None,
    min_metric: str | None = None,
    keep_all: bool = False,
    search_trials: int = MAX_TRIALS,
    time_budget_s: float | None = None,
    trial_cache: Path | None = None,
) -> BuildResult:
    """Build, evaluate and write every selected variant of ``recipe``.

    Budget (:mod:`compressor.budget`): ``max_drop`` (accuracy points) or ``min_metric``
    (``"NAME=VALUE"``) keeps out of the manifest every variant outside it on the validation split or,
    confirmed, on the test split (``keep_all``: shipped anyway; the report still says why); searched
    chains (``keep = "search"``) try at most ``search_trials`` settings each, none started after
    ``time_budget_s``. Without a budget every built variant ships and searched chains are not built.
    ``trial_cache``: a directory keeping the .tflite of every transformed chain (keyed by model, data,
    seed and steps), so that a rerun continues without training again.

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
    # free input dimensions are measured on the rows' own shapes: images and synthetic rows have none
    if io.free_dims() and calibration is not None and calibration.is_dir():
        raise _free_dims_error(io, "images cannot be sized to them")
    data = _assemble_data(data, io, calibration, input_range, layout, seed, report, task)
    if io.free_dims() and data.synthetic:
        raise _free_dims_error(io, "no rows were given")
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

    wants_budget = max_drop is not None or min_metric is not None
    skipped_search = [r.id for r in recipes if r.search_steps and not wants_budget]
    recipes = [r for r in recipes if not (r.search_steps and not wants_budget)]
    built: list[BuiltVariant] = []
    failures: list[VariantFailure] = []
    merged: list[str] = []
    val_named: dict[str, dict[str, float]] = {}
    base_val: Evaluation | None = None
    budget: Budget | None = None
    candidates: list[Candidate] = []
    search_notes: list[str] = []
    settings: dict[str, str] = {}  # a searched variant's chosen setting, for the report
    cache = None
    if trial_cache is not None and isinstance(builder, KerasBuilder):
        cache = TrialCache(trial_cache, model, data, seed)

    def build_one(r: Recipe) -> BuiltVariant | None:
        """Build, check and measure one chain; a non-baseline failure is recorded and gives None."""
        nonlocal base_val
        stage = ["transform"]  # where this variant is, for the failure record

        def set_stage(name: str, box: list[str] = stage) -> None:
            box[0] = name

        try:
            key = json.dumps([st.model_dump_json() for st in r.steps])
            hit = cache.get(key) if cache is not None and r.transforms else None
            if hit is not None:
                tflite, stage_notes = hit[0], [*hit[1], "reused from the trial cache (not trained again)"]
                report(f"cache {r.id}: reusing the file already built for these steps")
            else:
                tflite, stage_notes = builder.build(r, set_stage)
                if r.id != rf.baseline:  # the reference stays as converted (or as given)
                    tflite = strip_names(tflite, stage_notes)
                if cache is not None and r.transforms:
                    cache.put(key, tflite, stage_notes)
            set_stage("check")
            stats = graph_stats(tflite)
            check_changed(r, tflite, stats, ctx.baseline)
            set_stage("evaluate")
            bv = measure(r, tflite, stats, ctx, stage_notes)
            if wants_budget:
                val_ev, val_named[r.id] = evaluate_on_val(tflite, ctx, base_val, r.id)
                if r.id == rf.baseline:
                    base_val = val_ev
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
            return None
        return bv

    def judged(bv: BuiltVariant) -> Judgement | None:
        if budget is None or bv.id == rf.baseline:
            return None
        base = built[0]
        base_v = val_named.get(rf.baseline, {})
        m = budget.metric
        return judge(
            budget, bv.id, val_named.get(bv.id, {}).get(m), bv.named.get(m), base_v.get(m), base.named.get(m)
        )

    def time_left() -> str:
        if time_budget_s is not None and time.perf_counter() - start > time_budget_s:
            return f"time budget of {time_budget_s / 60:g} min reached"
        return ""

    for r in recipes:
        if r.search_steps:
            chosen = _search(
                r, build_one, judged, candidates, val_named, settings, search_trials, time_left, report
            )
            search_notes.append(chosen[1])
            if chosen[0] is None:
                continue
            bv = chosen[0]
        else:
            maybe = build_one(r)
            if maybe is None:
                continue
            bv = maybe
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
            if wants_budget:
                available = sorted(set(bv.named) | set(ctx.user_directions))
                budget = make_budget(max_drop, min_metric, data.task, available, ctx.user_directions)
                report(f"budget: {budget.describe() if budget else 'none'}")
                if budget is not None and budget.metric == "cosine" and not budget.max_drop:
                    builder.cosine_budget = budget.limit  # the int4 search aims at the user's budget
        built.append(bv)

    compare_unstructured(built, recipes)
    # Which variants ship: all without a budget; with one, those within it on validation and test.
    shipped: list[BuiltVariant] = []
    outside: list[str] = []
    met: bool | None = None
    closest_line = ""
    judgements: list[Judgement] = []
    for bv in built:
        j = judged(bv)
        ok = j is None or (j.passes_val and j.passes_test)
        if j is not None:
            judgements.append(j)
            j.shipped = ok or keep_all
            if not ok:
                line = f"`{bv.id}` {j.why}" + ("; shipped anyway (--keep-all)" if keep_all else "")
                outside.append(line)
                if keep_all:
                    bv.notes.append(f"outside the budget, shipped because of --keep-all: {j.why}")
        if j is None or j.shipped:
            shipped.append(bv)
    if budget is not None:
        met = any(j.passes_val and j.passes_test for j in judgements)
        trial_judgements = [c.judgement for c in candidates if c.judgement is not None]
        near = closest(judgements + trial_judgements)
        if not judgements:
            report(f"nothing besides the baseline was built to hold to the budget ({budget.describe()})")
        elif not met:
            closest_line = f"no variant meets the budget ({budget.describe()})" + (
                f"; closest: {near.id}, {near.why}" if near is not None else ""
            )
            report(closest_line)
    shipped_ids = {bv.id for bv in shipped}
    candidates = [*_variant_candidates(built, judgements, val_named, shipped_ids, settings), *candidates]
    metric_infos, primary = _metric_catalogue(shipped, data.task, ctx.user_directions)
    metric_name = budget.metric if budget is not None else primary
    direction: Direction = (
        budget.direction
        if budget is not None
        else metric_infos[primary].direction
        if primary in metric_infos
        else "higher"
    )
    base_v = val_named.get(rf.baseline, {}).get(metric_name)
    sections: list[str] = []
    intervals = accuracy_intervals(candidates) if budget is None else ""
    if budget is not None:
        sections += render_candidates(
            candidates,
            metric_name,
            direction,
            budget,
            base_v,
            built[0].named.get(metric_name),
            val_rows=len(data.val),
        )
        sections += [
            "",
            "## Budget",
            "",
            f"- budget: {budget.describe()}{' (--keep-all: everything ships)' if keep_all else ''}",
        ]
        sections += [f"- {line}" for line in search_notes]
        if closest_line:
            sections.append(f"- **{closest_line}**; only what meets it ships besides `{rf.baseline}`")
        if outside:
            sections += [
                "",
                "### Outside the budget"
                + (" (shipped: --keep-all)" if keep_all else " (not in the manifest)"),
                "",
            ]
            sections += [f"- {line}" for line in outside]
    built = shipped
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
    notes += [intervals] if intervals else []
    if cache is not None:
        notes.append(f"trial cache {trial_cache}: {cache.hits} chain(s) reused, not trained again")
    notes += [
        f"`{vid}` searches a setting and is built only with a budget (--max-drop / --min-metric)"
        for vid in skipped_search
    ]
    report(f"write: {out}")
    path = write_bundle(out, manifest, files, render_report(manifest, failures, notes, sections))
    return BuildResult(
        manifest,
        path,
        tuple(failures),
        time.perf_counter() - start,
        rf.name,
        tuple(merged),
        met,
        closest_line,
        tuple(outside),
    )


def _free_dims_error(io: ModelIO, why: str) -> DataError:
    return DataError(
        f"the model's inputs have free dimensions ({io.describe()}): {why}; give rows with --data or "
        "--calibration FILE.npz of the shapes the devices will feed"
    )


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


def _search(
    r: Recipe,
    build_one: Callable[[Recipe], BuiltVariant | None],
    judged: Callable[[BuiltVariant], Judgement | None],
    candidates: list[Candidate],
    val_named: dict[str, dict[str, float]],
    settings: dict[str, str],
    max_trials: int,
    should_stop: Callable[[], str],
    report: Progress,
) -> tuple[BuiltVariant | None, str]:
    """Bisect the searched setting of ``r``; the strongest trial within the budget, renamed to ``r.id``,
    and one line for the report. Every trial becomes a candidate row."""
    (index,) = r.search_steps
    kind = r.steps[index].kind
    name = "keep" if kind == "prune" else "width"
    grid = KEEP_GRID if kind == "prune" else WIDTH_GRID
    results: dict[float, BuiltVariant] = {}

    def trial(value: float) -> Trial:
        t = r.with_setting(value)
        report(f"search {r.id}: trial {name} {value:g}")
        bv = build_one(t)
        if bv is None:
            return Trial(value, False, "failed to build")
        j = judged(bv)
        passed = j is not None and j.passes_val
        results[value] = bv
        candidates.append(
            Candidate(
                id=t.id,
                chain=r.id,
                setting=f"{name} {value:g}",
                size_bytes=bv.evaluation.size_bytes,
                macs=bv.macs,
                latency_ms=bv.evaluation.latency_ms_p50,
                val=dict(val_named.get(t.id, {})),
                test=dict(bv.named),
                test_rows=bv.evaluation.eval_samples,
                judgement=j,
                shipped=False,
                trial=True,
            )
        )
        report(f"search {r.id}: {name} {value:g} {'passes' if passed else 'fails'} on validation")
        return Trial(value, passed)

    outcome = bisect_strongest(grid, trial, max_trials, should_stop)
    tried = ", ".join(f"{t.setting:g} {'pass' if t.passed else 'fail'}" for t in outcome.trials)
    stopped = f"; stopped: {outcome.stopped}" if outcome.stopped else ""
    if outcome.best is None:
        return None, f"`{r.id}`: no {name} within the budget (trials: {tried or 'none'}){stopped}"
    best = results[outcome.best]
    trial_id = r.with_setting(outcome.best).id
    for c in candidates:
        if c.id == trial_id and c.judgement is not None:
            c.judgement.why += f"; chosen: becomes `{r.id}`"
    line = f"`{r.id}`: {name} {outcome.best:g} chosen by bisection (trials: {tried}){stopped}"
    chosen = dataclasses.replace(best, id=r.id, notes=[*best.notes, line.replace(f"`{r.id}`: ", "")])
    # The variant is judged again under its own id, on the chosen trial's figures.
    val_named[r.id] = val_named.get(trial_id, {})
    settings[r.id] = f"{name} {outcome.best:g} (searched)"
    return chosen, line


def _variant_candidates(
    built: list[BuiltVariant],
    judgements: list[Judgement],
    val_named: dict[str, dict[str, float]],
    shipped: set[str],
    settings: dict[str, str],
) -> list[Candidate]:
    by_id = {j.id: j for j in judgements}
    return [
        Candidate(
            id=bv.id,
            chain=bv.id,
            setting=settings.get(bv.id, ""),
            size_bytes=bv.evaluation.size_bytes,
            macs=bv.macs,
            latency_ms=bv.evaluation.latency_ms_p50,
            val=val_named.get(bv.id, {}),
            test=dict(bv.named),
            test_rows=bv.evaluation.eval_samples,
            judgement=by_id.get(bv.id),
            shipped=bv.id in shipped,
        )
        for bv in built
    ]


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
        quantization=held_quantization(builder.stats),
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
