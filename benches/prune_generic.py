"""Structured pruning without labels: the generic recipe's pruned variants against full-integer int8.

For each unlabelled dev model (detector with two outputs, U-Net segmenter, keypoint regressor; built at
bench width, ``compressor.devmodels.make(..., width=W)``) one ``build_bundle`` with the ``generic``
recipe under a cosine budget (default 0.99): float32, int8, ``prune50-int8`` and ``prune-search-int8``
(pruned, fine-tuned toward the float model's outputs by :mod:`compressor.output_distill`, then int8).
Every figure is measured on the .tflite files themselves: bytes, held-out cosine against float32,
parameters, and host p50 latency timed interleaved (1 thread). Reported per model: what shipped, what
the budget kept out and why, and the smallest shipped variant against float32 and against int8.

Check (``ok``): every model builds ``prune50-int8``, and on at least one model a pruned variant ships
within the budget smaller than int8 (pruning must add something quantization alone does not).

ONE JSON object on stdout; progress on stderr.

    python benches/prune_generic.py [--models detector,segmenter,keypoints] [--width 4] [--quick]
"""

from __future__ import annotations

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


def _bench_helpers() -> Any:
    spec = importlib.util.spec_from_file_location("bench_compress", _HERE / "compress.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


_B = _bench_helpers()
log = _B.log
interleaved_latency = _B.interleaved_latency

MODELS = ("detector", "segmenter", "keypoints")
VARIANTS = ["float32", "int8", "prune50-int8", "prune-search-int8"]


def one_model(name: str, width: float, budget: float, tmp: Path, quick: bool) -> dict[str, Any]:
    from compressor.data import Dataset, Rows
    from compressor.devmodels import make, split_arrays
    from compressor.graph import graph_stats
    from compressor.pipeline import build_bundle

    t0 = time.perf_counter()
    model, data = make(name, seed=0, width=width, epochs=2 if quick else None)
    train_s = time.perf_counter() - t0

    def rows(split: str) -> Rows:
        return Rows(tuple(split_arrays(data, split, "x")))

    dataset = Dataset(name, rows("train"), rows("val"), rows("test"))
    out = tmp / name
    t0 = time.perf_counter()
    result = build_bundle(
        model,
        dataset,
        out,
        model_id=name,
        recipe="generic",
        variants=VARIANTS,
        min_metric=f"cosine={budget}",
        search_trials=2 if quick else 5,
        latency_budget_s=0.1,
        progress=lambda line: log(f"[{name}] {line}"),
    )
    build_s = time.perf_counter() - t0
    shipped = {v.id: v for v in result.manifest.variants}
    files = {vid: (out / v.file).read_bytes() for vid, v in shipped.items()}
    latency = interleaved_latency(files, dataset.test.inputs[0][:1], rounds=3 if quick else 7, runs=50)
    base = shipped["float32"]
    variants = {}
    for vid, v in shipped.items():
        blob = files[vid]
        variants[vid] = {
            "bytes": v.size,
            "size_x": round(base.size / v.size, 3),
            "cosine": round(v.metrics.named["cosine"], 5),
            "params": graph_stats(blob).params,
            "p50_ms": round(latency[vid]["p50_ms"], 4),
            "p50_ratio": round(latency[vid]["p50_ms"] / latency["float32"]["p50_ms"], 3),
            "notes": [n for n in v.notes if "fine-tuned" in n or "pruning" in n][:2],
        }
    pruned = [vid for vid in shipped if vid.startswith("prune")]
    smallest = min(pruned, key=lambda vid: shipped[vid].size) if pruned else None
    int8 = shipped.get("int8")
    return {
        "width": width,
        "train_s": round(train_s, 1),
        "build_s": round(build_s, 1),
        "variants": variants,
        "failed": sorted({f"{f.variant} ({f.stage}): {f.message}" for f in result.failures}),
        "outside_budget": list(result.not_shipped),
        "smallest_pruned": smallest,
        "smallest_pruned_vs_float32_x": variants[smallest]["size_x"] if smallest else None,
        "smallest_pruned_vs_int8_x": round(int8.size / shipped[smallest].size, 3)
        if smallest and int8
        else None,
        # built: shipped, or kept out by the budget only (a failure is not built)
        "prune50_built": not any(f.variant == "prune50-int8" for f in result.failures),
    }


def main() -> int:
    from agent.argparsing import StrictParser  # exact flags, a suggestion for a typo

    parser = StrictParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default=",".join(MODELS))
    parser.add_argument("--width", type=float, default=4.0)
    parser.add_argument("--budget", type=float, default=0.99, help="cosine budget (default 0.99)")
    parser.add_argument("--quick", action="store_true", help="2 training epochs, 2 search trials (CI)")
    args = parser.parse_args()
    start = time.perf_counter()
    results: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="prune-generic-") as tmp:
        for name in args.models.split(","):
            results[name] = one_model(name, args.width, args.budget, Path(tmp), args.quick)
            log(f"RUN-RESULT {json.dumps({name: results[name]})}")
    beats_int8 = [n for n, r in results.items() if (r["smallest_pruned_vs_int8_x"] or 0) > 1.0]
    ok = all(r["prune50_built"] for r in results.values()) and bool(beats_int8)
    print(
        json.dumps(
            {
                "bench": "prune_generic",
                "argv": sys.argv[1:],
                "budget": f"cosine >= {args.budget}",
                "ok": ok,
                "pruned_smaller_than_int8_within_budget": beats_int8,
                "models": results,
                "wall_s": round(time.perf_counter() - start, 1),
                "machine": {"platform": platform.platform(), "cpus": os.cpu_count()},
            }
        )
    )
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
