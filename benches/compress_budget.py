"""The compressor under an accuracy budget: which variants ship, and how small/fast the best one is.

Three runs, each ``build_bundle`` with a budget (the default recipe, searched chains included), then
every SHIPPED variant timed again on the host, interleaved (1 thread; the helper of
``benches/compress.py``):

* ``seed``: the seed CNN on digits 28×28 (the ``compress --demo`` path), ``--max-drop 0.5``; floors: the
  best shipped variant ≥ 30× smaller than float32, ≥ 5× fewer MACs, ≥ 3× faster, test drop ≤ 0.5 points;
* ``w1``: the MobileNet-style model at width 1.0 (≈ 9.9k parameters) on digits 32×32, ``--max-drop 1``;
  floors: every shipped variant within 1 point on test, the smallest ≥ 2× smaller than float32;
* ``w6``: the same model at width 6.0 (≈ 258k parameters), ``--max-drop 1``; floors: int8 ≥ 3.5×
  smaller within 0.5 points, the best shipped variant within 1 point ≥ 6× smaller, every shipped
  variant within 1 point on test. Any ``wN`` runs width N; the int8 and best floors apply from 100k
  parameters (the issue's "widened to at least 100k parameters"). Why 6.0 and not 4.0: full-integer
  int8 stores a float32 scale and an int64 zero point per output channel for every weight and bias
  tensor (the TFLite schema; zero-point vectors are shared where equal), about 15 KB of the 136 KB
  int8 file at width 4.0 (119k parameters), which caps int8 at 3.40× there whatever the weights; the
  ratio is structural (measured on the converted files: 3.40× at width 4, 3.51× at 5, 3.59× at 6,
  3.69× at 8).

Each run reports its wall time (training, every transform, search trial, conversion and evaluation;
the interleaved timing afterwards is not included) against 10 minutes. ONE JSON object on stdout;
progress on stderr, including one ``RUN-RESULT {...}`` line per finished run (so a run cut short
still leaves the earlier ones).

    python benches/compress_budget.py [--runs seed,w1,w6] [--search-trials 5] [--quick]
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

_HERE = Path(__file__).resolve().parent
# benches/agent.py would shadow the `agent` package: drop this directory from sys.path.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _HERE]
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402


def _bench_helpers() -> Any:
    spec = importlib.util.spec_from_file_location("bench_compress", _HERE / "compress.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


_B = _bench_helpers()
log = _B.log
ratio = _B.ratio
interleaved_latency = _B.interleaved_latency

RUN_MAX_S = 600.0
RUNS = ("seed", "w1", "w6")  # smaller first; any wN is accepted
WIDE_PARAMS = 100_000  # the int8 and best floors apply from here
SEED_FLOORS = {"size_x": 30.0, "macs_x": 5.0, "latency_x": 3.0, "drop_points": 0.5}
WIDE_INT8 = {"size_x": 3.5, "drop_points": 0.5}
W4_BEST = {"size_x": 6.0, "drop_points": 1.0}
W1_SMALLEST_SIZE_X = 2.0


def _check(value: float | None, bound: float, upper: bool) -> dict[str, Any]:
    ok = value is not None and (value <= bound if upper else value >= bound)
    return {"value": value, ("max" if upper else "min"): bound, "pass": bool(ok)}


def _budget_section(report_md: str) -> list[str]:
    """The report's Budget section (search notes, what stayed out and why), as lines."""
    lines = report_md.splitlines()
    try:
        start = lines.index("## Budget")
    except ValueError:
        return []
    out = []
    for line in lines[start + 1 :]:
        if line.startswith("## "):
            break
        if line.strip():
            out.append(line.strip())
    return out


def _measure(result: Any, out: Path, x_test: np.ndarray, args: argparse.Namespace) -> dict[str, Any]:
    manifest = result.manifest
    files = {v.id: (out / v.file).read_bytes() for v in manifest.variants}
    log(f"latency: {len(files)} shipped variants, {args.rounds} interleaved rounds of {args.runs} runs")
    latency = interleaved_latency(files, x_test, args.rounds, args.runs)
    base = manifest.variant(manifest.baseline).metrics
    base_lat = latency[manifest.baseline]["p50_ms"]
    variants: dict[str, Any] = {}
    for v in manifest.variants:
        m = v.metrics
        lat = latency[v.id]["p50_ms"]
        variants[v.id] = {
            "quantization": v.quantization,
            "techniques": v.techniques,
            "size_bytes": m.size_bytes,
            "accuracy": m.accuracy,
            "drop_points": None if m.accuracy_drop is None else round(100 * m.accuracy_drop, 3),
            "params": m.params,
            "macs": m.macs,
            "latency_ms_p50": round(lat, 5),
            "latency_round_spread": latency[v.id]["spread"],
            "size_x": ratio(base.size_bytes, m.size_bytes),
            "macs_x": ratio(base.macs, m.macs),
            "latency_x": ratio(base_lat, lat),
        }
    report_md = (out / "report.md").read_text() if (out / "report.md").exists() else ""
    return {
        "baseline": manifest.baseline,
        "budget_met": result.budget_met,
        "closest": result.closest or None,
        "shipped": variants,
        "not_shipped": list(result.not_shipped),
        "budget_notes": _budget_section(report_md),
        "failures": [{"variant": f.variant, "stage": f.stage, "message": f.message} for f in result.failures],
    }


def _build_kwargs(args: argparse.Namespace, max_drop: float, cache: Path) -> dict[str, Any]:
    return {
        "max_drop": max_drop,
        "search_trials": args.search_trials,
        "time_budget_s": None if args.time_budget is None else 60.0 * args.time_budget,
        "trial_cache": cache,
        "progress": log,
        "recipe": args.recipe,
    }


def _non_baseline(run: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in run["shipped"].items() if k != run["baseline"]}


def _all_within(run: dict[str, Any], limit: float) -> dict[str, Any]:
    worst = [(v["drop_points"], k) for k, v in _non_baseline(run).items() if v["drop_points"] is not None]
    outside = [k for d, k in worst if d > limit]
    return {
        "rule": f"every shipped variant's test drop <= {limit} points",
        "worst": max(worst)[1] if worst else None,
        "worst_drop_points": max(worst)[0] if worst else None,
        "outside": outside,
        "pass": not outside,
    }


def run_seed(args: argparse.Namespace, tmp: Path) -> dict[str, Any]:
    from compressor.data import load_digits
    from compressor.pipeline import build_demo

    out = tmp / "seed"
    kw = _build_kwargs(args, SEED_FLOORS["drop_points"], tmp / "cache-seed")
    result = build_demo(out, epochs=args.epochs, seed=args.seed, **kw)
    run = _measure(result, out, load_digits(seed=args.seed).x_test, args)
    run["model"] = "seed CNN (Conv32-Pool-Dense128-Dense10), digits 28x28x1"
    run["max_drop"] = SEED_FLOORS["drop_points"]
    run["seconds"] = round(result.seconds, 1)
    # Best = meets most floors, then the largest size ratio.
    scored = {}
    for vid, row in _non_baseline(run).items():
        checks = {
            "size_x": _check(row["size_x"], SEED_FLOORS["size_x"], upper=False),
            "macs_x": _check(row["macs_x"], SEED_FLOORS["macs_x"], upper=False),
            "latency_x": _check(row["latency_x"], SEED_FLOORS["latency_x"], upper=False),
            "drop_points": _check(row["drop_points"], SEED_FLOORS["drop_points"], upper=True),
        }
        scored[vid] = checks
    floors: dict[str, Any] = {}
    if scored:
        best = max(
            scored,
            key=lambda v: (sum(c["pass"] for c in scored[v].values()), run["shipped"][v]["size_x"] or 0.0),
        )
        floors["best"] = {
            "variant": best,
            "rule": "shipped variant meeting the most floors, then the largest size ratio",
            **scored[best],
            "pass": all(c["pass"] for c in scored[best].values()),
        }
    else:
        floors["best"] = {"pass": False, "error": "only the baseline shipped"}
    floors["wall_time"] = _check(run["seconds"], RUN_MAX_S, upper=True)
    run["floors"] = floors
    run["pass"] = all(f["pass"] for f in floors.values())
    return run


def run_mobilenet(args: argparse.Namespace, tmp: Path, width: float) -> dict[str, Any]:
    from compressor.devmodels import mobilenet_digits, mobilenet_digits_data, train_mobilenet_digits
    from compressor.pipeline import build_bundle

    name = f"w{width:g}"
    out = tmp / name
    max_drop = 1.0
    start = time.perf_counter()
    data = mobilenet_digits_data(seed=args.seed)
    model = mobilenet_digits(width, seed=args.seed)
    params = int(model.count_params())
    log(f"train: mobilenet_digits width {width:g} ({params} params), {args.mobilenet_epochs} epochs")
    train_mobilenet_digits(model, data, epochs=args.mobilenet_epochs, seed=args.seed)
    train_s = time.perf_counter() - start
    kw = _build_kwargs(args, max_drop, tmp / f"cache-{name}")
    result = build_bundle(model, data, out, model_id=f"digits32-{name}", seed=args.seed, **kw)
    seconds = time.perf_counter() - start
    run = _measure(result, out, data.x_test, args)
    run["model"] = f"MobileNet-style width {width:g} ({params} params), digits 32x32x1"
    run["max_drop"] = max_drop
    run["seconds"] = round(seconds, 1)
    run["train_seconds"] = round(train_s, 1)
    floors: dict[str, Any] = {"all_within_budget": _all_within(run, max_drop)}
    rows = _non_baseline(run)
    if params >= WIDE_PARAMS:
        int8 = rows.get("int8")
        if int8 is None:
            floors["int8"] = {"pass": False, "error": "int8 not shipped (see not_shipped / failures)"}
        else:
            checks = {
                "size_x": _check(int8["size_x"], WIDE_INT8["size_x"], upper=False),
                "drop_points": _check(int8["drop_points"], WIDE_INT8["drop_points"], upper=True),
            }
            floors["int8"] = {**checks, "pass": all(c["pass"] for c in checks.values())}
        limit = W4_BEST["drop_points"]
        within = {k: v for k, v in rows.items() if v["drop_points"] is not None and v["drop_points"] <= limit}
        if within:
            best = max(within, key=lambda k: within[k]["size_x"] or 0.0)
            floors["best"] = {
                "variant": best,
                "rule": f"largest size ratio among shipped variants within {W4_BEST['drop_points']} points",
                "size_x": _check(within[best]["size_x"], W4_BEST["size_x"], upper=False),
                "drop_points": within[best]["drop_points"],
            }
            floors["best"]["pass"] = floors["best"]["size_x"]["pass"]
        else:
            floors["best"] = {"pass": False, "error": "no shipped variant within the budget"}
    else:
        if rows:
            smallest = max(rows, key=lambda k: rows[k]["size_x"] or 0.0)
            floors["smallest"] = {
                "variant": smallest,
                "size_x": _check(rows[smallest]["size_x"], W1_SMALLEST_SIZE_X, upper=False),
                "drop_points": rows[smallest]["drop_points"],
            }
            floors["smallest"]["pass"] = floors["smallest"]["size_x"]["pass"]
        else:
            floors["smallest"] = {"pass": False, "error": "only the baseline shipped"}
    floors["wall_time"] = _check(run["seconds"], RUN_MAX_S, upper=True)
    run["floors"] = floors
    run["pass"] = all(f["pass"] for f in floors.values())
    return run


def _width(name: str) -> float | None:
    """``w4`` → 4.0, ``w0.5`` → 0.5; None for anything else."""
    try:
        width = float(name[1:]) if name.startswith("w") else 0.0
    except ValueError:
        return None
    return width if width > 0 else None


def run(args: argparse.Namespace) -> dict[str, Any]:
    wanted = [r.strip() for r in args.runs_list.split(",") if r.strip()]
    unknown = [r for r in wanted if r != "seed" and _width(r) is None]
    if unknown:
        raise SystemExit(f"--runs: unknown {', '.join(unknown)}; choose from seed and wN (width N: w1, w6)")
    load_before = os.getloadavg()
    runs: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="edgefleet-bench-budget-") as tmp_name:
        tmp = Path(tmp_name)
        for name in wanted:
            if args.stop_at is not None and time.time() >= args.stop_at:
                runs[name] = {"skipped": "not started: --stop-at reached"}
                log(f"skip {name}: --stop-at reached")
                continue
            log(f"=== run {name}")
            t0 = time.perf_counter()
            try:
                if name == "seed":
                    runs[name] = run_seed(args, tmp)
                else:
                    runs[name] = run_mobilenet(args, tmp, _width(name) or 1.0)
            except Exception as err:  # one failed run must not lose the others
                runs[name] = {"error": f"{type(err).__name__}: {err}", "pass": False}
            runs[name]["bench_seconds"] = round(time.perf_counter() - t0, 1)
            log("RUN-RESULT " + json.dumps({name: runs[name]}))
    cpus = os.cpu_count()
    return {
        "bench": "compress_budget",
        "recipe": args.recipe,
        "seed": args.seed,
        "epochs": {"seed_cnn": args.epochs, "mobilenet": args.mobilenet_epochs},
        "search_trials": args.search_trials,
        "time_budget_min": args.time_budget,
        "latency_method": {
            "threads": 1,
            "rounds": args.rounds,
            "runs_per_round": args.runs,
            "statistic": "median over rounds of each round's median; shipped variants interleaved",
        },
        "runs": runs,
        "all_pass": all(r.get("pass") for r in runs.values()),
        "machine": {
            "cpu_count": cpus,
            "loadavg_before": [round(v, 2) for v in load_before],
            "loadavg_end": [round(v, 2) for v in os.getloadavg()],
            "python": platform.python_version(),
            "platform": platform.platform(),
        },
    }


def main() -> int:
    from agent.argparsing import StrictParser  # exact flags, a suggestion for a typo

    parser = StrictParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", dest="runs_list", default=",".join(RUNS), help="seed,w1,w6 (wN: width N)")
    parser.add_argument("--recipe", default="default", help="built-in recipe name or TOML (default: default)")
    parser.add_argument("--epochs", type=int, default=8, help="seed CNN training epochs (default 8)")
    parser.add_argument("--mobilenet-epochs", type=int, default=30, help="MobileNet training epochs")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--search-trials", type=int, default=5, help="trials per searched chain")
    parser.add_argument("--time-budget", type=float, default=None, help="minutes; no trial starts after")
    parser.add_argument("--rounds", type=int, default=5, help="interleaved latency rounds (default 5)")
    parser.add_argument("--latency-runs", dest="runs", type=int, default=200, help="invocations per round")
    parser.add_argument("--stop-at", type=float, default=None, help="unix time: start no run after it")
    parser.add_argument("--quick", action="store_true", help="demo recipe, few epochs, 2 trials")
    args = parser.parse_args()
    if args.quick:
        args.recipe, args.epochs, args.mobilenet_epochs = "demo", 2, 4
        args.search_trials, args.rounds, args.runs = 2, 2, 50

    _B.print_json_only(lambda: run(args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
