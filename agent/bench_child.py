"""Child process that loads one .tflite and benchmarks or health-checks it: ``python -m agent.bench_child``.

Reads one JSON request on stdin, prints one line ``EDGEFLEET-RESULT <json>`` on stdout. It runs in its
own process so that a malformed or hostile model can crash, hang or exhaust memory without touching the
daemon: the parent (:mod:`agent.bench`) enforces a wall-clock timeout and the child caps its own address
space with ``RLIMIT_AS`` once the runtime is imported (a MemoryError then reports OOM).

Request keys: ``mode`` ("bench" | "health"), ``model`` (path), ``sample`` (path to .npz with x, y, or
null), ``threads``, ``warmup_runs``, ``min_runs``, ``min_seconds``, ``max_runs``, ``memory_limit_mb``,
``inferences`` (health), ``max_eval`` (sample rows scored for accuracy and top-1 predictions),
``test_crash_signal`` (tests only: the child sends itself this signal after loading, to prove CRASH).

Result keys (bench): ``runtime`` {name, version}, ``init_ms``, ``first_inference_ms``, ``accuracy`` and
``eval_samples`` (when the sample has ``y``), ``predictions`` (top-1 index per sample row, for the
parent's agreement with the baseline), ``latencies_ms`` (timed runs only), ``duration_s``,
``loop_monotonic`` [start, end] of the timed loop on ``time.monotonic()`` (system-wide, so the parent's
power sampler can cut its window), ``cpu_util`` (CPU seconds of this process per wall second, from
``getrusage``/``process_time`` — psutil's per-process times read zero under qemu-user), ``threads``,
``peak_rss_bytes`` (``ru_maxrss``).
"""

from __future__ import annotations

import json
import os
import re
import resource
import sys
import time
from typing import Any

RESULT_PREFIX = "EDGEFLEET-RESULT "
_UNSUPPORTED = re.compile(
    r"unsupported|unresolved|didn't find op|not supported|custom op|no registration|op builtin_code", re.I
)


_OOM = re.compile(r"error '12'|cannot allocate memory|bad_alloc|out of memory|ENOMEM", re.I)


class ChildFailure(Exception):
    def __init__(self, code: str, detail: str) -> None:
        super().__init__(detail)
        self.code = code
        self.detail = detail


def _limit_memory(limit_mb: int) -> None:
    limit = int(limit_mb) * 1024 * 1024
    _soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    if hard != resource.RLIM_INFINITY:
        limit = min(limit, hard)
    resource.setrlimit(resource.RLIMIT_AS, (limit, hard))


def _peak_rss_bytes() -> int:
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(rss) if sys.platform == "darwin" else int(rss) * 1024  # KiB on Linux


def _cpu_seconds() -> float:
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return float(ru.ru_utime + ru.ru_stime)


def _prepare_inputs(np: Any, details: list[dict[str, Any]], sample: Any) -> tuple[list[list[Any]], Any]:
    """Per-row input arrays for every input tensor, and the sample labels (or None)."""
    labels = None
    rows: list[list[Any]] = []
    rng = np.random.default_rng(0)
    xs = None
    if sample is not None and "x" in sample:
        xs = sample["x"]
        labels = sample.get("y")
    n_rows = len(xs) if xs is not None else 8
    for i in range(n_rows):
        row = []
        for k, d in enumerate(details):
            shape = [int(s) if s > 0 else 1 for s in d["shape"]]
            dtype = np.dtype(d["dtype"])
            if k == 0 and xs is not None:
                x = np.asarray(xs[i])
                if x.dtype != dtype:
                    scale, zero = d.get("quantization", (0.0, 0))
                    if np.issubdtype(dtype, np.integer) and np.issubdtype(x.dtype, np.floating) and scale:
                        info = np.iinfo(dtype)
                        x = np.clip(np.round(x / scale + zero), info.min, info.max)
                    x = x.astype(dtype)
                row.append(x.reshape(shape))
            elif np.issubdtype(dtype, np.floating):
                row.append(rng.standard_normal(shape).astype(dtype))
            elif dtype == np.bool_:
                row.append(rng.integers(0, 2, shape).astype(dtype))
            else:
                info = np.iinfo(dtype)
                row.append(rng.integers(max(info.min, -128), min(info.max, 127) + 1, shape).astype(dtype))
        rows.append(row)
    return rows, labels


def _check_finite(np: Any, interp: Any, outputs: list[dict[str, Any]], when: str) -> None:
    for d in outputs:
        o = interp.get_tensor(d["index"])
        if np.issubdtype(o.dtype, np.floating) and not np.all(np.isfinite(o)):
            raise ChildFailure("CRASH", f"output {d['name']} is not finite (NaN/Inf) on {when}")


def run(req: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {"ok": False}
    import numpy as np

    from agent.runtime import load_interpreter

    interpreter_cls, runtime_name, runtime_version = load_interpreter()
    out["runtime"] = {"name": runtime_name, "version": runtime_version}
    _limit_memory(int(req.get("memory_limit_mb", 1024)))
    sample = None
    if req.get("sample"):
        try:
            with np.load(req["sample"], allow_pickle=False) as npz:
                sample = {k: npz[k] for k in npz.files}
        except (OSError, ValueError) as err:
            out["sample_error"] = f"{type(err).__name__}: {err}"

    threads = int(req.get("threads", 1))
    t0 = time.perf_counter()
    try:
        interp = interpreter_cls(model_path=req["model"], num_threads=threads)
        interp.allocate_tensors()
    except MemoryError as err:
        raise ChildFailure("OOM", f"out of memory loading the model: {err}") from err
    except Exception as err:
        msg = f"{type(err).__name__}: {err}"
        if _OOM.search(msg):
            raise ChildFailure(
                "OOM", f"out of memory loading the model (address-space limit): {msg}"
            ) from err
        raise ChildFailure("UNSUPPORTED_OP" if _UNSUPPORTED.search(msg) else "LOAD_ERROR", msg) from err
    out["init_ms"] = (time.perf_counter() - t0) * 1000.0
    out["threads"] = threads
    crash = req.get("test_crash_signal")
    if crash:
        os.kill(os.getpid(), int(crash))
    inputs = interp.get_input_details()
    outputs = interp.get_output_details()
    rows, labels = _prepare_inputs(np, inputs, sample)

    def infer(row: list[Any]) -> float:
        for d, arr in zip(inputs, row, strict=True):
            interp.set_tensor(d["index"], arr)
        start = time.perf_counter()
        interp.invoke()
        return (time.perf_counter() - start) * 1000.0

    try:
        out["first_inference_ms"] = infer(rows[0])
        _check_finite(np, interp, outputs, "the first inference")
        if req.get("mode") == "health":
            for i in range(int(req.get("inferences", 8))):
                infer(rows[i % len(rows)])
                _check_finite(np, interp, outputs, f"inference {i}")
            out["ok"] = True
            out["peak_rss_bytes"] = _peak_rss_bytes()
            return out

        if sample is not None and "x" in sample:
            n = min(len(rows), int(req.get("max_eval", 1000)))
            predictions: list[int] = []
            for i in range(n):
                infer(rows[i])
                predictions.append(int(np.argmax(interp.get_tensor(outputs[0]["index"]).reshape(-1))))
            out["predictions"] = predictions
            if labels is not None and n:
                truth = [int(np.asarray(labels[i]).reshape(-1)[0]) for i in range(n)]
                out["accuracy"] = sum(p == t for p, t in zip(predictions, truth, strict=True)) / n
                out["eval_samples"] = n

        for i in range(int(req.get("warmup_runs", 5))):
            infer(rows[i % len(rows)])
        min_runs, max_runs = int(req.get("min_runs", 50)), int(req.get("max_runs", 10_000))
        min_seconds = float(req.get("min_seconds", 1.0))
        latencies: list[float] = []
        mono0 = time.monotonic()  # system-wide clock: the parent's energy sampler windows on it
        cpu0, wall0, proc0 = _cpu_seconds(), time.perf_counter(), time.process_time()
        while len(latencies) < max_runs:
            latencies.append(infer(rows[len(latencies) % len(rows)]))
            if len(latencies) >= min_runs and time.perf_counter() - wall0 >= min_seconds:
                break
        wall = time.perf_counter() - wall0
        mono1 = time.monotonic()
        cpu = max(_cpu_seconds() - cpu0, time.process_time() - proc0)
    except MemoryError as err:
        raise ChildFailure("OOM", f"out of memory during inference: {err}") from err
    except ChildFailure:
        raise
    except Exception as err:
        raise ChildFailure("CRASH", f"inference failed: {type(err).__name__}: {err}") from err
    out.update(
        ok=True,
        latencies_ms=latencies,
        duration_s=wall,
        loop_monotonic=[mono0, mono1],
        cpu_util=cpu / wall if wall > 0 else None,
        peak_rss_bytes=_peak_rss_bytes(),
    )
    return out


def main() -> int:
    try:
        req = json.loads(sys.stdin.read())
        result = run(req)
    except ChildFailure as err:
        result = {
            "ok": False,
            "error": err.code,
            "detail": err.detail[:2000],
            "peak_rss_bytes": _peak_rss_bytes(),
        }
    except MemoryError:
        result = {"ok": False, "error": "OOM", "detail": "out of memory (address-space limit)"}
    except Exception as err:  # noqa: BLE001 - report anything as a typed failure, never a traceback only
        result = {"ok": False, "error": "LOAD_ERROR", "detail": f"{type(err).__name__}: {err}"[:2000]}
    sys.stdout.write(RESULT_PREFIX + json.dumps(result) + "\n")
    sys.stdout.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
