"""Run every .tflite of a bundle with the device's TFLite runtime and print one JSON object.

This program runs INSIDE the emulated arm64 Python (``scripts/arm64-smoke`` starts it under
``qemu-aarch64-static``) and, unchanged, on the host as the x86 reference the arm64 outputs are
compared with. It needs only what a device has: the stdlib, numpy and the ``agent`` package (which
brings pydantic and the TFLite runtime through ``agent.runtime``); never TensorFlow.

    python scripts/arm64_smoke_check.py --bundle DIR [--inputs FILE.npy] [--max-samples N]
        [--expect-runtime ai-edge-litert|tflite-runtime] [--bench | --no-bench]

Per variant (``<id>.tflite``, evaluated on ``<id>.sample.npz`` with arrays x, y, or on the fixed inputs
of ``--inputs``): raw outputs (lists, in the output tensor's dtype), predicted labels, accuracy on the
sample, init and per-inference latency. Latencies under qemu-user are EMULATED timings, roughly 50×
slower than a Raspberry Pi: they prove the model runs, nothing about its speed on a board.

With ``--bench`` and an ``agent.bench.benchmark_variant`` that accepts the current call, the agent's own
child-process benchmark is run on each variant too; any mismatch in that API is reported as skipped.
Exit status: 0 when every variant ran, 1 when one failed, 2 for a setup problem (no agent, no runtime).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import statistics
import sys
import time
import traceback
from pathlib import Path
from typing import Any

SCHEMA = "edgefleet.arm64-smoke-check/1"
TIMING_NOTE = (
    "latencies are wall-clock timings of this process; under qemu-user they are EMULATED "
    "(roughly 50x slower than a Raspberry Pi) and prove only that the model runs"
)


def _emit(obj: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(obj, sort_keys=True) + "\n")
    sys.stdout.flush()


def _load_runtime(expect: str | None) -> tuple[Any, str, str, str]:
    """(Interpreter class, runtime name, version, how it was loaded)."""
    try:
        from agent.runtime import load_runtime
    except ImportError as err:  # the module is optional for this check
        how = f"direct import (agent.runtime unavailable: {err})"
    else:
        interpreter, info = load_runtime()
        return interpreter, info.name, info.version, "agent.runtime.load_runtime"
    import importlib.metadata

    for module, dist in (
        ("ai_edge_litert.interpreter", "ai-edge-litert"),
        ("tflite_runtime.interpreter", "tflite-runtime"),
    ):
        if expect and dist != expect:
            continue
        try:
            mod = __import__(module, fromlist=["Interpreter"])
        except ImportError:
            continue
        return mod.Interpreter, dist, importlib.metadata.version(dist), how
    raise SystemExit(f"no TFLite runtime importable ({how})")


def _discover(bundle: Path) -> list[dict[str, Any]]:
    """Variants of a bundle: from manifest.json when present, else every *.tflite in the folder."""
    variants: list[dict[str, Any]] = []
    manifest_path = bundle / "manifest.json"
    if manifest_path.is_file():
        manifest = json.loads(manifest_path.read_text())
        for v in manifest.get("variants", []):
            vid = v.get("id")
            file = v.get("file") or f"{vid}.tflite"
            if vid and (bundle / file).is_file():
                variants.append({"id": vid, "file": file, "manifest_entry": v})
    if not variants:
        for p in sorted(bundle.glob("*.tflite")):
            variants.append({"id": p.stem, "file": p.name, "manifest_entry": None})
    return variants


def _to_input_dtype(np: Any, x: Any, detail: dict[str, Any]) -> Any:
    """Cast (quantizing float data for an integer input tensor) like the agent's bench child does."""
    dtype = np.dtype(detail["dtype"])
    x = np.asarray(x)
    if x.dtype == dtype:
        return x
    scale, zero = detail.get("quantization", (0.0, 0))
    if np.issubdtype(dtype, np.integer) and np.issubdtype(x.dtype, np.floating) and scale:
        info = np.iinfo(dtype)
        x = np.clip(np.round(x / scale + zero), info.min, info.max)
    return x.astype(dtype)


def _tensor_info(d: dict[str, Any]) -> dict[str, Any]:
    scale, zero = d.get("quantization", (0.0, 0))
    return {
        "name": str(d.get("name")),
        "dtype": getattr(d["dtype"], "__name__", str(d["dtype"])),
        "shape": [int(s) for s in d["shape"]],
        "scale": float(scale),
        "zero_point": int(zero),
    }


def run_variant(np: Any, interpreter_cls: Any, bundle: Path, v: dict[str, Any], args: Any) -> dict[str, Any]:
    path = bundle / v["file"]
    res: dict[str, Any] = {"file": v["file"], "sha256": hashlib.sha256(path.read_bytes()).hexdigest()}
    t0 = time.perf_counter()
    interp = interpreter_cls(model_path=str(path), num_threads=args.threads)
    interp.allocate_tensors()
    res["init_ms"] = (time.perf_counter() - t0) * 1000.0
    inp = interp.get_input_details()
    out = interp.get_output_details()
    res["input"] = _tensor_info(inp[0])
    res["output"] = _tensor_info(out[0])

    labels = None
    if args.inputs:
        xs = np.load(args.inputs, allow_pickle=False)
        res["data"] = f"fixed inputs {Path(args.inputs).name}"
    else:
        sample = bundle / f"{v['id']}.sample.npz"
        if not sample.is_file():
            raise FileNotFoundError(f"{sample.name} missing and no --inputs given")
        with np.load(sample, allow_pickle=False) as npz:
            xs = npz["x"]
            labels = npz["y"] if "y" in npz.files else None
        res["data"] = sample.name
    n = len(xs) if args.max_samples <= 0 else min(len(xs), args.max_samples)
    shape = [int(s) if s > 0 else 1 for s in inp[0]["shape"]]
    outputs: list[Any] = []
    predicted: list[int] = []
    lat: list[float] = []
    for i in range(n):
        x = _to_input_dtype(np, xs[i], inp[0]).reshape(shape)
        interp.set_tensor(inp[0]["index"], x)
        start = time.perf_counter()
        interp.invoke()
        lat.append((time.perf_counter() - start) * 1000.0)
        o = np.array(interp.get_tensor(out[0]["index"]))
        outputs.append(o.reshape(-1).tolist())
        predicted.append(int(np.argmax(o.reshape(-1))))
    res["n"] = n
    res["outputs"] = outputs
    res["predicted"] = predicted
    if labels is not None:
        y = [int(np.asarray(labels[i]).reshape(-1)[0]) for i in range(n)]
        res["labels"] = y
        res["accuracy"] = sum(int(p == t) for p, t in zip(predicted, y, strict=True)) / n if n else None
    else:
        res["labels"] = None
        res["accuracy"] = None
    res["latency_ms"] = {
        "median": statistics.median(lat) if lat else None,
        "min": min(lat) if lat else None,
        "max": max(lat) if lat else None,
        "n": len(lat),
        "emulated_if_qemu": True,
    }
    return res


def run_agent_bench(bundle: Path, variants: list[dict[str, Any]], args: Any) -> dict[str, Any]:
    """The agent's own benchmark (child process, timeout) on each variant; skipped if the API differs."""
    try:
        from agent import bench as agent_bench
        from agent.config import BenchConfig
        from agent.wire import Variant
    except Exception as err:  # noqa: BLE001 - the agent is being written concurrently
        return {"skipped": f"agent.bench/agent.config/agent.wire not importable: {type(err).__name__}: {err}"}
    fn = getattr(agent_bench, "benchmark_variant", None)
    if fn is None:
        return {"skipped": "agent.bench has no benchmark_variant()"}
    try:
        cfg = BenchConfig(
            warmup_runs=2,
            min_runs=args.bench_runs,
            min_seconds=0.0,
            max_runs=max(args.bench_runs, 1),
            timeout_s=args.bench_timeout,
        )
    except Exception as err:  # noqa: BLE001
        return {"skipped": f"BenchConfig did not accept the smoke settings: {type(err).__name__}: {err}"}
    results: dict[str, Any] = {
        "api": "agent.bench.benchmark_variant",
        "executable": sys.executable,
        "variants": {},
    }
    for v in variants:
        entry = v.get("manifest_entry")
        if entry is None:
            results["variants"][v["id"]] = {"skipped": "no manifest.json entry to build a Variant from"}
            continue
        try:
            variant = Variant.model_validate(entry)
            sample = bundle / f"{v['id']}.sample.npz"
            t0 = time.perf_counter()
            r = fn(
                variant,
                bundle / v["file"],
                sample if sample.is_file() else None,
                cfg,
                board="qemu-aarch64" if os.environ.get("QEMU_CPU") else "host",
            )
            wall = time.perf_counter() - t0
            d = r.model_dump(mode="json")
            lat = d.get("latency_ms") or {}
            results["variants"][v["id"]] = {
                "ok": d.get("ok"),
                "error": d.get("error"),
                "error_detail": d.get("error_detail"),
                "runtime": d.get("runtime"),
                "accuracy": d.get("accuracy"),
                "init_ms": d.get("init_ms"),
                "p50_ms": lat.get("p50"),
                "runs": lat.get("count"),
                "cpu_util": d.get("cpu_util"),
                "peak_rss_bytes": d.get("peak_rss_bytes"),
                "wall_s": round(wall, 2),
            }
        except TypeError as err:
            return {"skipped": f"benchmark_variant() signature differs: {err}"}
        except Exception as err:  # noqa: BLE001 - report, never crash the smoke check
            results["variants"][v["id"]] = {"ok": False, "error": f"{type(err).__name__}: {err}"}
    return results


def main(argv: list[str] | None = None) -> int:
    from agent.argparsing import StrictParser  # exact flags, a suggestion for a typo

    ap = StrictParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--bundle", required=True, type=Path)
    ap.add_argument("--inputs", help=".npy of fixed inputs used instead of each variant's sample")
    ap.add_argument("--max-samples", type=int, default=0, help="rows per variant (0 = all)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--expect-runtime", help="fail unless this runtime (distribution name) is picked")
    ap.add_argument(
        "--bench",
        action=argparse.BooleanOptionalAction,
        default=False,
        help="also run agent.bench.benchmark_variant (child process) on each variant",
    )
    ap.add_argument("--bench-runs", type=int, default=10)
    ap.add_argument("--bench-timeout", type=float, default=600.0)
    args = ap.parse_args(argv)

    t_start = time.perf_counter()
    report: dict[str, Any] = {
        "schema": SCHEMA,
        "machine": platform.machine(),
        "python": platform.python_version(),
        "libc": "-".join(platform.libc_ver()),
        "qemu_cpu": os.environ.get("QEMU_CPU"),
        "timing_note": TIMING_NOTE,
        "ok": False,
    }
    try:
        import agent.wire  # the wire contract must import on the device

        report["wire_import"] = {"ok": True, "module": agent.wire.__name__}
    except Exception as err:  # noqa: BLE001
        report["wire_import"] = {"ok": False, "error": f"{type(err).__name__}: {err}"}
        report["error"] = "agent.wire does not import"
        _emit(report)
        return 2
    try:
        import numpy as np

        report["numpy"] = np.__version__
        interpreter_cls, name, version, how = _load_runtime(args.expect_runtime)
    except (Exception, SystemExit) as err:  # noqa: BLE001
        report["error"] = f"runtime: {type(err).__name__}: {err}"
        _emit(report)
        return 2
    report["runtime"] = {"name": name, "version": version, "loaded_by": how}
    if args.expect_runtime and name != args.expect_runtime:
        report["error"] = f"expected runtime {args.expect_runtime}, agent.runtime picked {name}"
        _emit(report)
        return 2

    variants = _discover(args.bundle)
    if not variants:
        report["error"] = f"no .tflite in {args.bundle}"
        _emit(report)
        return 2
    report["variants"] = {}
    failed = False
    for v in variants:
        try:
            report["variants"][v["id"]] = run_variant(np, interpreter_cls, args.bundle, v, args)
        except Exception as err:  # noqa: BLE001 - one broken variant must not hide the others
            failed = True
            report["variants"][v["id"]] = {
                "file": v["file"],
                "error": f"{type(err).__name__}: {err}",
                "traceback": traceback.format_exc()[-1500:],
            }
    if args.bench:
        report["agent_bench"] = run_agent_bench(args.bundle, variants, args)
    else:
        report["agent_bench"] = {"skipped": "not requested (--no-bench)"}
    report["ok"] = not failed
    report["wall_s"] = round(time.perf_counter() - t_start, 2)
    _emit(report)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
