"""The ``edgefleet compress`` subcommand. deploy/cli.py calls :func:`register` with its subparsers.

Exit codes: 0 bundle written (variants that failed are listed on stderr and in report.md, the others
are kept); 1 with ``--strict`` when any variant failed; 2 nothing written (bad input, bad recipe,
failed baseline, unwritable output). ``--check-recipe`` validates the recipe only: 0 valid, 1 invalid.
Progress (per stage, per epoch) goes to stderr; stdout gets the summary table and the manifest path
only. TensorFlow is imported only when the command runs, and its own log lines (C++ logging, converter
chatter, warnings) are kept off the terminal: ``--verbose`` keeps them in ``tensorflow.log`` in the
bundle. The model id is ``--model-id``, else the model file's name without its extension, else
``digits`` for ``--demo``.

Budget: ``--max-drop POINTS`` (accuracy points below float32) or ``--min-metric NAME=VALUE`` (any named
metric, in its direction) keeps every variant outside it on the validation split, or not confirmed on
the test split, out of the manifest (report.md says why; ``--keep-all`` ships them anyway). float32
always ships. When no other variant meets it, one line names the closest and ``--strict`` exits 1.
Searched chains (``keep = "search"``) try at most ``--search-trials`` settings and start none after
``--time-budget`` minutes; ``--trial-cache DIR`` keeps every trained chain's file so that a rerun
continues. Without a budget flag every built variant ships (as before) and searched
chains are not built.

Recipes: ``--recipe`` takes a TOML file or a built-in name (``default``, ``demo``, ``tflite``). Without
it, ``--demo`` and ``--model m.keras`` build the ``default`` recipe (about 2 min on 2 cores with
``--demo``; ``--recipe demo`` is the fast subset), ``--model m.tflite`` the ``tflite`` recipe
(ai-edge-quantizer only; the file has no Keras source).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from compressor.errors import BundleWriteError, CompressorError, DataError

if TYPE_CHECKING:
    from compressor.pipeline import BuildResult
    from compressor.recipe import RecipeFile

EXIT_OK, EXIT_PARTIAL, EXIT_ERROR = 0, 1, 2
DEMO_MODEL_ID = "digits"  # the demo's model is named after its data set
TF_LOG = "tensorflow.log"  # --verbose: TensorFlow's own output, in the bundle directory


def register(subparsers: Any) -> argparse.ArgumentParser:
    """Add ``compress`` to an argparse subparsers object; sets ``func`` to :func:`run`."""
    p = subparsers.add_parser(
        "compress",
        help="compress a Keras model into TFLite variants and write a bundle",
        description="Build a bundle (manifest.json, *.tflite, report) from a Keras model and a dataset.",
    )
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--demo", action="store_true", help="train the seed CNN on the built-in digits set")
    src.add_argument(
        "--model",
        type=Path,
        metavar="M",
        help="a Keras .keras model (or legacy .h5), or a .tflite, to compress",
    )
    src.add_argument(
        "--check-recipe",
        action="store_true",
        help="only validate --recipe (exit 0 valid, 1 invalid) and list its variants",
    )
    p.add_argument(
        "--data",
        default=None,
        metavar="D",
        help="a .npz: x_train, x_val[, x_test] (x_train_0, x_train_1, ... for several inputs), optional "
        "labels y_train, y_val[, y_test]; or the built-in name 'digits' (default with --demo)",
    )
    p.add_argument(
        "--calibration",
        type=Path,
        default=None,
        metavar="DIR|FILE.npz",
        help="unlabelled rows: a folder of PNG/JPEG images (resized/cropped to the input) or a .npz with "
        "one array per input; split with the seed into calibration and held-out rows without --data",
    )
    p.add_argument(
        "--input-range",
        default=None,
        metavar="LO,HI",
        help="value range images are scaled to (0,1 | -1,1 | 0,255; default 0,1), and of synthetic rows",
    )
    p.add_argument(
        "--layout",
        choices=("NHWC", "NCHW"),
        default=None,
        help="image layout of the model's input (default: guessed from its shape)",
    )
    p.add_argument(
        "--evaluator",
        default=None,
        metavar="MODULE:FUNCTION",
        help="a user metric hook (module:function or path/file.py:function) returning named metrics "
        "with their direction; see compressor/metrics.py",
    )
    p.add_argument(
        "--task",
        choices=("classification", "generic"),
        default=None,
        help="how to read labels: default classification when y holds class indices, else generic",
    )
    p.add_argument(
        "--allow-custom-ops",
        action="store_true",
        help="a .tflite with custom ops: bundle the float original as is instead of refusing",
    )
    p.add_argument(
        "--recipe",
        default=None,
        metavar="R",
        help="recipe TOML file or built-in name (default, demo, tflite); "
        "default: 'demo' with --demo, 'default' for a .keras, 'tflite' for a .tflite",
    )
    p.add_argument("--out", type=Path, default=None, metavar="B", help="bundle directory to write")
    p.add_argument("--epochs", type=_positive_int, default=8, metavar="N", help="training epochs (--demo)")
    p.add_argument("--seed", type=int, default=0, metavar="S", help="random seed (default 0)")
    p.add_argument(
        "--model-id",
        default=None,
        metavar="ID",
        help="model id in the manifest (default: the model file's name without its extension; "
        f"'{DEMO_MODEL_ID}' with --demo)",
    )
    p.add_argument(
        "--variants",
        default=None,
        metavar="a,b,c",
        help="variant ids of the recipe to build (default: all; the float32 baseline is always built)",
    )
    budget = p.add_mutually_exclusive_group()
    budget.add_argument(
        "--max-drop",
        type=_points,
        default=None,
        metavar="POINTS",
        help="ship only variants whose accuracy is at most POINTS percentage points below float32 on "
        "the validation split and, confirmed, on the test split (classification)",
    )
    budget.add_argument(
        "--min-metric",
        default=None,
        metavar="NAME=VALUE",
        help="ship only variants whose named metric (e.g. cosine=0.99, or a --evaluator metric) is "
        "within VALUE in the metric's direction, on validation and test",
    )
    p.add_argument(
        "--keep-all",
        action="store_true",
        help="with a budget: ship the variants outside it too (the report still says why)",
    )
    p.add_argument(
        "--search-trials",
        type=_positive_int,
        default=5,
        metavar="N",
        help='with a budget: at most N trials per searched chain (keep/width = "search"; default 5)',
    )
    p.add_argument(
        "--time-budget",
        type=_minutes,
        default=None,
        metavar="MINUTES",
        help="with a budget: start no new search trial after MINUTES (the report says so)",
    )
    p.add_argument(
        "--trial-cache",
        type=Path,
        default=None,
        metavar="DIR",
        help="keep each trained chain's .tflite in DIR (keyed by model, data, seed and steps) so that a "
        "rerun continues without training again",
    )
    p.add_argument(
        "--strict",
        action="store_true",
        help="exit 1 if any variant failed to build, or if no variant besides float32 meets the budget",
    )
    p.add_argument(
        "--verbose",
        action="store_true",
        help="keep TensorFlow's own log lines (hidden otherwise) in tensorflow.log in the bundle directory",
    )
    p.set_defaults(func=run)
    return p


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _points(text: str) -> float:
    value = float(text)
    if not value >= 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"must be a non-negative number of points, got {text}")
    return value


def _minutes(text: str) -> float:
    value = float(text)
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"must be a positive number of minutes, got {text}")
    return value


def resolve_model_id(model: Path | None, model_id: str | None) -> str:
    """``--model-id`` if given, else the model file's stem, else the demo's id; checked like the wire does.

    Raises IdentifierError for a bad ``--model-id`` and DataError for a file name that is not an id.
    """
    from agent.wire import ID_PATTERN, IdentifierError, check_id

    if model_id is not None:
        return check_id(model_id, "model id")
    if model is None:
        return DEMO_MODEL_ID
    try:
        return check_id(model.stem, "model id")
    except IdentifierError as err:
        raise DataError(
            f"the model file's name {model.stem!r} is not a valid model id (it must match {ID_PATTERN}: "
            "lowercase letters, digits, '-' and '_'); pass --model-id ID"
        ) from err


def _start_tf_log(out: Path) -> Path:
    """An empty file next to ``out`` for TensorFlow's output while the bundle is built (moved into it
    after: the bundle directory is only written at the end)."""
    log = out.absolute().parent / f"{out.name}.{TF_LOG}"
    try:
        log.parent.mkdir(parents=True, exist_ok=True)
        log.write_text("", encoding="utf-8")
    except OSError as err:
        raise BundleWriteError(f"cannot write the TensorFlow log {str(log)!r}: {err}") from err
    return log


def _keep_tf_log(log: Path, bundle: Path) -> Path:
    """Move the build's TensorFlow log into the bundle; if that fails, it stays where it is."""
    try:
        return log.replace(bundle / TF_LOG)
    except OSError:
        return log


def run(args: argparse.Namespace) -> int:
    """Run ``compress``; returns the exit code."""
    from agent.wire import IdentifierError
    from compressor.recipe import RecipeError, load_recipe

    if args.check_recipe:
        try:
            rf = load_recipe(args.recipe or "default")
        except RecipeError as err:
            print(f"edgefleet compress: {err}", file=sys.stderr)
            return EXIT_PARTIAL
        for v in rf.variants:
            print(f"{v.id:24s} {' -> '.join(s.kind for s in v.steps):40s} {v.quantize.mode}")
        print(f"recipe {rf.name!r}: {len(rf.variants)} variants, valid")
        return EXIT_OK

    from compressor._tf import quiet_tensorflow
    from compressor.pipeline import DEMO_RECIPE

    variants = [v for v in args.variants.split(",") if v.strip()] if args.variants else None
    log: Path | None = None
    try:
        if args.out is None:
            raise DataError("--out is required (the bundle directory to write)")
        model_id = resolve_model_id(args.model, args.model_id)
        recipe = None
        if args.recipe or args.demo:
            recipe = load_recipe(args.recipe or DEMO_RECIPE)
            recipe.select(variants)  # fail on a typo before training
        log = _start_tf_log(args.out) if args.verbose else None
        result: BuildResult
        with quiet_tensorflow(log):
            result = _build(args, model_id, recipe, variants)
    except (CompressorError, IdentifierError) as err:
        print(f"edgefleet compress: error: {err}", file=sys.stderr)
        if log is not None:
            print(f"edgefleet compress: TensorFlow's log: {log}", file=sys.stderr)
        return EXIT_ERROR

    from compressor.bundle import summary_table

    for line in summary_table(result.manifest):
        print(line)
    print(f"bundle: {result.out / 'manifest.json'} (recipe {result.recipe}, {result.seconds:.1f} s)")
    for line in failure_lines(result.failures):
        print(f"edgefleet compress: {line}", file=sys.stderr)
    for line in result.merged:
        print(f"edgefleet compress: {line}", file=sys.stderr)
    for line in result.not_shipped:
        print(f"edgefleet compress: {line.replace('`', '')}", file=sys.stderr)
    if result.closest:
        print(f"edgefleet compress: {result.closest}", file=sys.stderr)
    if log is not None:
        print(f"edgefleet compress: TensorFlow's log: {_keep_tf_log(log, result.out)}", file=sys.stderr)
    missed = result.budget_met is False
    return EXIT_PARTIAL if (result.failures or missed) and args.strict else EXIT_OK


def _build(
    args: argparse.Namespace, model_id: str, recipe: RecipeFile | None, variants: list[str] | None
) -> BuildResult:
    """Train (--demo) or load, then build the bundle; TensorFlow is imported here, not before."""
    from compressor.data import load_dataset
    from compressor.pipeline import build_bundle, build_demo
    from compressor.progress import TerminalProgress

    progress = TerminalProgress(sys.stderr)  # lines in a log, an in-place bar per training on a terminal

    budget: dict[str, Any] = {
        "max_drop": args.max_drop,
        "min_metric": args.min_metric,
        "keep_all": args.keep_all,
        "search_trials": args.search_trials,
        "time_budget_s": None if args.time_budget is None else 60.0 * args.time_budget,
        "trial_cache": args.trial_cache,
    }
    if args.demo:
        if args.data not in (None, "digits"):
            raise DataError("--demo trains on the built-in digits set; drop --data or use --model")
        return build_demo(
            args.out,
            epochs=args.epochs,
            seed=args.seed,
            variants=variants,
            model_id=model_id,
            progress=progress,
            recipe=recipe,
            **budget,
        )
    from compressor.models import check_model_path

    check_model_path(args.model)  # one line on a missing file, a directory or another format
    value_range = None
    if args.input_range:
        from compressor.images import parse_input_range

        value_range = parse_input_range(args.input_range)
    data = None if args.data is None else load_dataset(args.data, seed=args.seed, task=args.task)
    return build_bundle(
        args.model,
        data,
        args.out,
        recipe=recipe,
        variants=variants,
        model_id=model_id,
        seed=args.seed,
        progress=progress,
        calibration=args.calibration,
        input_range=value_range,
        layout=args.layout,
        evaluator=args.evaluator,
        allow_custom_ops=args.allow_custom_ops,
        task=args.task,
        **budget,
    )


# Options whose values may start with "-" ("--input-range -1,1"): argparse would take the value for an
# option and fail with "expected one argument"; they are rewritten to "--input-range=-1,1" first.
DASH_VALUE_OPTIONS = ("--input-range",)


def join_dash_values(argv: Sequence[str]) -> list[str]:
    out: list[str] = []
    items = list(argv)
    i = 0
    while i < len(items):
        if items[i] in DASH_VALUE_OPTIONS and i + 1 < len(items) and items[i + 1].startswith("-"):
            out.append(f"{items[i]}={items[i + 1]}")
            i += 2
            continue
        out.append(items[i])
        i += 1
    return out


def main(argv: list[str] | None = None) -> int:
    """Stand-alone entry (``python -m compressor.cli``) for use before deploy/cli.py exists."""
    from agent.argparsing import StrictParser

    parser = StrictParser(prog="edgefleet")
    sub = parser.add_subparsers(dest="command", required=True)
    register(sub)
    args = parser.parse_args(join_dash_values(sys.argv[1:] if argv is None else argv))
    return int(args.func(args))


if __name__ == "__main__":
    sys.exit(main())


def failure_lines(failures: Sequence[Any]) -> list[str]:
    """One line per distinct (stage, reason): the variants that failed the same way share it (an LSTM
    model fails seven pruned or int8 chains for two reasons, not seven)."""
    groups: dict[tuple[str, str], list[str]] = {}
    for f in failures:
        groups.setdefault((f.stage, f.message), []).append(f.variant)
    return [
        f"variant{'s' if len(names) > 1 else ''} {', '.join(names)} not shipped ({stage}): {message}"
        for (stage, message), names in groups.items()
    ]
