"""The compressor's default recipe on the seed CNN (digits at 28×28, the ``compress --demo`` path).

Prints ONE JSON object on stdout (everything else, TensorFlow's noise included, goes to stderr):

* per variant: size, gzip size, accuracy, drop (points), agreement with float32, params, MACs, host
  latency p50 (1 thread), and ratios against float32 (size ×, gzip ×, MACs ×, latency ×);
* the wall time of the whole recipe (data, training, every transform, conversion and evaluation);
* the machine (cpu count, loadavg before/after, python);
* ``targets``: full-integer int8 ≥ 3.5× smaller with ≤ 0.5 point drop; the best combined variant
  (structured pruning and/or distillation + int8) meeting ≥ 10× smaller, ≤ 1.0 point drop, ≥ 3× fewer
  MACs, ≥ 2× faster; the default recipe within 10 minutes on 2 cores.

Host latency on a shared, noisy machine: the pipeline's own per-variant p50s are taken minutes apart,
so here every variant is timed again, interleaved, in several rounds in this one process (a fresh
rotation of the order each round); a variant's latency is the median of its per-round medians, so the
ratios compare like with like.

    python benches/compress.py [--epochs 8] [--rounds 7] [--runs 200] [--recipe default]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

# benches/agent.py would shadow the `agent` package: drop this directory from sys.path.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402

INT8_SIZE_X = 3.5
INT8_MAX_DROP = 0.5
COMBINED = {"size_x": 10.0, "drop_points": 1.0, "macs_x": 3.0, "latency_x": 2.0}
RECIPE_MAX_S = 600.0
STRUCTURED = {"prune", "distill"}


def log(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def interleaved_latency(files: dict[str, bytes], x: np.ndarray, rounds: int, runs: int) -> dict[str, Any]:
    """Median of per-round medians (ms) per variant; each round times every variant, order rotated."""
    from compressor.evaluate import load_interpreter, quantize_input, tensor_spec

    runners: dict[str, tuple[Any, int, np.ndarray]] = {}
    for vid, data in files.items():
        interp = load_interpreter(data, threads=1)
        detail = interp.get_input_details()[0]
        runners[vid] = (interp, detail["index"], quantize_input(x[:1], tensor_spec(detail)))
    order = list(runners)
    per_round: dict[str, list[float]] = {vid: [] for vid in order}
    for r in range(rounds):
        shift = r % len(order)
        for vid in order[shift:] + order[:shift]:
            interp, index, sample = runners[vid]
            for _ in range(10):  # warm-up
                interp.set_tensor(index, sample)
                interp.invoke()
            times = np.empty(runs)
            for i in range(runs):
                interp.set_tensor(index, sample)
                start = time.perf_counter()
                interp.invoke()
                times[i] = time.perf_counter() - start
            per_round[vid].append(float(np.median(times)) * 1000.0)
        log(f"latency round {r + 1}/{rounds} done")
    return {
        vid: {
            "p50_ms": float(np.median(ms)),
            "round_p50s_ms": [round(v, 5) for v in ms],
            "spread": float((max(ms) - min(ms)) / np.median(ms)) if np.median(ms) > 0 else None,
        }
        for vid, ms in per_round.items()
    }


def ratio(base: float | None, value: float | None) -> float | None:
    if base is None or value is None or value == 0:
        return None
    return round(base / value, 3)


def run(args: argparse.Namespace) -> dict[str, Any]:
    from compressor.data import load_digits
    from compressor.pipeline import build_demo
    from compressor.recipe import INT8_MODES, load_recipe

    load_before = os.getloadavg()
    rf = load_recipe(args.recipe)
    with tempfile.TemporaryDirectory(prefix="edgefleet-bench-compress-") as tmp:
        out = Path(tmp) / "bundle"
        result = build_demo(out, epochs=args.epochs, seed=args.seed, recipe=rf, progress=log)
        manifest = result.manifest
        files = {v.id: (out / v.file).read_bytes() for v in manifest.variants}
    recipe_seconds = result.seconds
    load_after_build = os.getloadavg()

    x_test = load_digits(seed=args.seed).x_test
    log(f"latency: {len(files)} variants, {args.rounds} interleaved rounds of {args.runs} runs, 1 thread")
    latency = interleaved_latency(files, x_test, args.rounds, args.runs)

    by_id = {v.id: v for v in manifest.variants}
    base = by_id[manifest.baseline].metrics
    base_lat = latency[manifest.baseline]["p50_ms"]
    variants: dict[str, Any] = {}
    for v in manifest.variants:
        m = v.metrics
        lat = latency[v.id]["p50_ms"]
        variants[v.id] = {
            "quantization": v.quantization,
            "techniques": v.techniques,
            "size_bytes": m.size_bytes,
            "gzip_bytes": m.gzip_bytes,
            "accuracy": m.accuracy,
            "drop_points": None if m.accuracy_drop is None else round(100 * m.accuracy_drop, 3),
            "agreement": m.agreement,
            "params": m.params,
            "macs": m.macs,
            "latency_ms_p50": round(lat, 5),
            "latency_round_spread": latency[v.id]["spread"],
            "pipeline_latency_ms_p50": m.latency_ms_p50,  # measured during the build, not interleaved
            "size_x": ratio(base.size_bytes, m.size_bytes),
            "gzip_x": ratio(base.gzip_bytes, m.gzip_bytes),
            "macs_x": ratio(base.macs, m.macs),
            "latency_x": ratio(base_lat, lat),
        }

    # ---- targets
    targets: dict[str, Any] = {}
    int8 = variants.get("int8")
    if int8 is None:
        targets["int8"] = {"pass": False, "error": "no 'int8' variant was built"}
    else:
        size_ok = (int8["size_x"] or 0) >= INT8_SIZE_X
        drop_ok = int8["drop_points"] is not None and int8["drop_points"] <= INT8_MAX_DROP
        targets["int8"] = {
            "variant": "int8",
            "size_x": {"value": int8["size_x"], "min": INT8_SIZE_X, "pass": size_ok},
            "drop_points": {"value": int8["drop_points"], "max": INT8_MAX_DROP, "pass": drop_ok},
            "pass": size_ok and drop_ok,
        }

    recipes = {r.id: r for r in rf.variants}
    candidates: dict[str, Any] = {}
    for vid, row in variants.items():
        r = recipes.get(vid)
        if r is None or r.quantize.mode not in INT8_MODES:
            continue
        kinds = {s.kind for s in r.transforms}
        if not kinds or not kinds <= STRUCTURED:
            continue  # needs pruning and/or distillation, and nothing gzip-only
        checks = {
            "size_x": {
                "value": row["size_x"],
                "min": COMBINED["size_x"],
                "pass": (row["size_x"] or 0) >= COMBINED["size_x"],
            },
            "drop_points": {
                "value": row["drop_points"],
                "max": COMBINED["drop_points"],
                "pass": row["drop_points"] is not None and row["drop_points"] <= COMBINED["drop_points"],
            },
            "macs_x": {
                "value": row["macs_x"],
                "min": COMBINED["macs_x"],
                "pass": (row["macs_x"] or 0) >= COMBINED["macs_x"],
            },
            "latency_x": {
                "value": row["latency_x"],
                "min": COMBINED["latency_x"],
                "pass": (row["latency_x"] or 0) >= COMBINED["latency_x"],
            },
        }
        candidates[vid] = {**checks, "passed": sum(c["pass"] for c in checks.values()), "pass": False}
        candidates[vid]["pass"] = candidates[vid]["passed"] == len(checks)
    if candidates:
        # Best = meets every criterion; among those (or, if none does, among those meeting the most
        # criteria) the smallest drop, then the largest size ratio.
        best_id = max(
            candidates,
            key=lambda vid: (
                candidates[vid]["passed"],
                -(variants[vid]["drop_points"] or 0.0),
                variants[vid]["size_x"] or 0.0,
            ),
        )
        best = candidates[best_id]
        targets["combined"] = {
            "variant": best_id,
            "rule": "pruning and/or distillation + int8 meeting all of: "
            + ", ".join(f"{k} {'<=' if k == 'drop_points' else '>='} {v}" for k, v in COMBINED.items())
            + "; among those the smallest drop, then the largest size ratio",
            **{k: best[k] for k in COMBINED},
            "pass": best["pass"],
            "candidates": {vid: {"passed": c["passed"], "pass": c["pass"]} for vid, c in candidates.items()},
            "all_passing": [vid for vid, c in candidates.items() if c["pass"]],
        }
    else:
        targets["combined"] = {"pass": False, "error": "no pruning/distillation + int8 variant was built"}

    cpus = os.cpu_count()
    targets["recipe_time"] = {
        "recipe": rf.name,
        "seconds": round(recipe_seconds, 1),
        "max_s": RECIPE_MAX_S,
        "cpu_count": cpus,
        "pass": recipe_seconds <= RECIPE_MAX_S,
        "note": None if cpus == 2 else f"measured on {cpus} cores; the target is stated for 2",
    }
    targets["all_pass"] = all(t.get("pass") for k, t in targets.items() if isinstance(t, dict))

    return {
        "bench": "compress",
        "recipe": rf.name,
        "model": "seed CNN (Conv32-Pool-Dense128-Dense10), digits 28x28x1",
        "epochs": args.epochs,
        "seed": args.seed,
        "baseline": manifest.baseline,
        "recipe_seconds": round(recipe_seconds, 1),
        "failures": [{"variant": f.variant, "stage": f.stage, "message": f.message} for f in result.failures],
        "latency_method": {
            "threads": 1,
            "rounds": args.rounds,
            "runs_per_round": args.runs,
            "statistic": "median over rounds of each round's median; variants interleaved, order rotated",
        },
        "variants": variants,
        "targets": targets,
        "machine": {
            "cpu_count": cpus,
            "loadavg_before": [round(v, 2) for v in load_before],
            "loadavg_after_build": [round(v, 2) for v in load_after_build],
            "loadavg_end": [round(v, 2) for v in os.getloadavg()],
            "python": platform.python_version(),
            "platform": platform.platform(),
        },
    }


def print_json_only(produce: Callable[[], dict[str, Any]]) -> None:
    """Run ``produce`` with everything it writes, C-level writes to fd 1 by TensorFlow included, sent to
    stderr; then print its JSON object alone on stdout."""
    sys.stdout.flush()
    json_fd = os.dup(1)
    os.dup2(2, 1)
    try:
        report = produce()
    finally:
        sys.stdout.flush()
        os.dup2(json_fd, 1)
        os.close(json_fd)
    print(json.dumps(report, indent=2))


def main() -> int:
    from agent.argparsing import StrictParser  # exact flags, a suggestion for a typo

    parser = StrictParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipe", default="default", help="built-in recipe name or TOML (default: default)")
    parser.add_argument("--epochs", type=int, default=8, help="seed CNN training epochs (default 8)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--rounds", type=int, default=7, help="interleaved latency rounds (default 7)")
    parser.add_argument("--runs", type=int, default=200, help="timed invocations per variant per round")
    args = parser.parse_args()

    print_json_only(lambda: run(args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
