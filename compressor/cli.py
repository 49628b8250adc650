"""The ``edgefleet compress`` subcommand. deploy/cli.py calls :func:`register` with its subparsers.

Exit codes: 0 bundle written (variants that failed are listed on stderr and in report.md, the others
are kept); 1 with ``--strict`` when any variant failed; 2 nothing written (bad input, bad recipe,
failed baseline, unwritable output). ``--check-recipe`` validates the recipe only: 0 valid, 1 invalid.
Progress (per stage, per epoch) goes to stderr; stdout gets the summary table and the manifest path
only (TensorFlow's own noise goes to stderr). TensorFlow is imported only when the command runs.

Recipes: ``--recipe`` takes a TOML file or a built-in name (``default``, ``demo``, ``tflite``). Without
it, ``--demo`` and ``--model m.keras`` build the ``default`` recipe (about 2 min on 2 cores with
``--demo``; ``--recipe demo`` is the fast subset), ``--model m.tflite`` the ``tflite`` recipe
(ai-edge-quantizer only; the file has no Keras source).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from compressor.errors import CompressorError, DataError

EXIT_OK, EXIT_PARTIAL, EXIT_ERROR = 0, 1, 2


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
        "--model", type=Path, metavar="M", help="a Keras 3 .keras model, or a float .tflite, to compress"
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
        help="a .npz (x_train, y_train, x_val, y_val[, x_test, y_test]) "
        "or the built-in name 'digits' (default with --demo)",
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
    p.add_argument("--model-id", default="digits", metavar="ID", help="model id in the manifest")
    p.add_argument(
        "--variants",
        default=None,
        metavar="a,b,c",
        help="variant ids of the recipe to build (default: all; the float32 baseline is always built)",
    )
    p.add_argument("--strict", action="store_true", help="exit 1 if any variant failed to build")
    p.set_defaults(func=run)
    return p


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _progress(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def run(args: argparse.Namespace) -> int:
    """Run ``compress``; returns the exit code."""
    from agent.wire import IdentifierError, check_id
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

    from compressor.data import load_dataset
    from compressor.pipeline import DEMO_RECIPE, BuildResult, build_bundle, build_demo

    variants = [v for v in args.variants.split(",") if v.strip()] if args.variants else None
    try:
        if args.out is None:
            raise DataError("--out is required (the bundle directory to write)")
        check_id(args.model_id, "model id")
        is_tflite = args.model is not None and args.model.suffix == ".tflite"
        default = DEMO_RECIPE if args.demo else ("tflite" if is_tflite else "default")
        recipe = load_recipe(args.recipe or default)
        recipe.select(variants)  # fail on a typo before training
        result: BuildResult
        if args.demo:
            if args.data not in (None, "digits"):
                raise DataError("--demo trains on the built-in digits set; drop --data or use --model")
            result = build_demo(
                args.out,
                epochs=args.epochs,
                seed=args.seed,
                variants=variants,
                model_id=args.model_id,
                progress=_progress,
                recipe=recipe,
            )
        else:
            if args.data is None:
                raise DataError("--model needs --data (a .npz or 'digits')")
            if not args.model.is_file():
                raise DataError(f"model file {str(args.model)!r} does not exist")
            data = load_dataset(args.data, seed=args.seed)
            result = build_bundle(
                args.model,
                data,
                args.out,
                recipe=recipe,
                variants=variants,
                model_id=args.model_id,
                seed=args.seed,
                progress=_progress,
            )
    except (CompressorError, IdentifierError) as err:
        print(f"edgefleet compress: error: {err}", file=sys.stderr)
        return EXIT_ERROR

    from compressor.bundle import summary_table

    for line in summary_table(result.manifest):
        print(line)
    print(f"bundle: {result.out / 'manifest.json'} (recipe {result.recipe}, {result.seconds:.1f} s)")
    for f in result.failures:
        print(f"edgefleet compress: variant {f.variant} not built ({f.stage}): {f.message}", file=sys.stderr)
    return EXIT_PARTIAL if result.failures and args.strict else EXIT_OK


def main(argv: list[str] | None = None) -> int:
    """Stand-alone entry (``python -m compressor.cli``) for use before deploy/cli.py exists."""
    parser = argparse.ArgumentParser(prog="edgefleet")
    sub = parser.add_subparsers(dest="command", required=True)
    register(sub)
    args = parser.parse_args(argv)
    return int(args.func(args))


if __name__ == "__main__":
    sys.exit(main())
