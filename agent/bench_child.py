"""Child process that loads one .tflite and benchmarks or health-checks it: ``python -m agent.bench_child``.

Reads one JSON request on stdin, prints one line ``EDGEFLEET-RESULT <json>`` on stdout. It runs in its
own process so that a malformed or hostile model can crash, hang or exhaust memory without touching the
daemon: the parent (:mod:`agent.bench`) enforces a wall-clock timeout and the child caps its own address
space with ``RLIMIT_AS`` once the runtime is imported (a MemoryError then reports OOM).

Request keys: ``mode`` ("bench" | "health"), ``model`` (path), ``sample`` (path to the variant's .npz, or
null), ``threads``, ``warmup_runs``, ``min_runs``, ``min_seconds``, ``max_runs``, ``memory_limit_mb``,
``inferences`` (health), ``max_eval`` (sample rows scored: top-1 predictions, accuracy and output
fidelity; also bounds the rows prepared), ``test_crash_signal`` (tests only: the child sends itself this
signal after loading, to prove CRASH). ``max_retries``, ``max_other_share``,
``max_involuntary_per_s``: a timed window disturbed past these (:mod:`agent.contention`) is run again up
to ``max_retries`` times; the least disturbed window is the one reported, with its figures under
``contention`` (``contended``, ``retries`` and every window's figures in ``windows``).

The sample (:mod:`agent.fidelity` reads its layout): inputs ``x`` (one input) or ``x_0, x_1, ...`` fed to
the model's inputs in order (float rows are quantized for an int8/uint8 input with its scale and zero
point; an input the sample lacks gets seeded random data), optional labels ``y``, and ``ref_0, ref_1,
...``: the host's float32 outputs of this file on the same rows. Without a sample every input is random.

Result keys (bench): ``runtime`` {name, version}, ``init_ms``, ``first_inference_ms``, ``accuracy`` and
``eval_samples`` (when the sample has ``y``), ``predictions`` (top-1 index of output 0 per sample row, for
the parent's agreement with the baseline), ``fidelity`` (when the sample has ``ref_*``: the worst over
every output of rows, cosine, sqnr_db, max_abs against the references, int outputs dequantized to float32
first) with ``fidelity_outputs`` (the same per output tensor, with its name and top1_agreement) — or
``fidelity_error`` when the outputs cannot be set against the references (count or shape differ, inputs
missing from the sample) —, ``latencies_ms`` (timed runs only), ``duration_s``, ``loop_monotonic``
[start, end] of the timed loop on ``time.monotonic()`` (system-wide, so the parent's power sampler can cut
its window), ``cpu_util`` (CPU seconds of this process per wall second, from ``getrusage``/
``process_time`` — psutil's per-process times read zero under qemu-user), ``threads``, ``peak_rss_bytes``
(``ru_maxrss``). Health mode returns ``first_inference_ms``, ``peak_rss_bytes`` and, when the sample has
``ref_*``, the same ``fidelity`` keys over up to ``max_eval`` sample rows.
"""

from __future__ import annotations

import json
import os
import re
import resource
import sys
import time
from dataclasses import dataclass
from typing import Any

from agent import contention

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


def _to_input(np: Any, x: Any, d: dict[str, Any]) -> Any:
    """One sample row in the dtype of input ``d``: float rows are quantized for an integer input."""
    dtype = np.dtype(d["dtype"])
    x = np.asarray(x)
    if x.dtype != dtype:
        scale, zero = d.get("quantization", (0.0, 0))
        if np.issubdtype(dtype, np.integer) and np.issubdtype(x.dtype, np.floating) and scale:
            info = np.iinfo(dtype)
            x = np.clip(np.round(x / scale + zero), info.min, info.max)
        x = x.astype(dtype)
    return x


def _fit_free_dims(interp: Any, details: list[dict[str, Any]], xs: list[Any] | None) -> bool:
    """Resize inputs with free dimensions (shape_signature -1, e.g. a sequence length) to the sample's
    rows; the runtime reports such a dimension as 1 until then. True when something was resized."""
    resized = False
    for d, arr in zip(details, xs or [], strict=False):
        sig = d.get("shape_signature")
        want = [int(s) for s in (sig if sig is not None and len(sig) else d["shape"])]
        row = [int(s) for s in arr.shape[1:]]
        if -1 not in want[1:] or len(row) != len(want) - 1 or row == [int(s) for s in d["shape"][1:]]:
            continue
        if all(w in (-1, r) for w, r in zip(want[1:], row, strict=True)):
            interp.resize_tensor_input(d["index"], [1, *row])
            resized = True
    if resized:
        interp.allocate_tensors()
    return resized


def _prepare_inputs(
    np: Any, details: list[dict[str, Any]], xs: list[Any] | None, limit: int
) -> tuple[list[list[Any]], int]:
    """Per-row input arrays for every input tensor, and how many inputs the sample fed.

    ``xs`` (the sample's input arrays, one per model input in order; None without a sample) feed the
    first ``len(xs)`` inputs for up to ``limit`` rows; any other input gets seeded random data (8 rows
    when nothing comes from the sample).
    """
    rng = np.random.default_rng(0)
    xs = xs or []
    if len(xs) > len(details):
        raise ChildFailure(
            "LOAD_ERROR", f"the sample has {len(xs)} input arrays for a model with {len(details)} input(s)"
        )
    shapes = [[int(s) if s > 0 else 1 for s in d["shape"]] for d in details]
    for k, arr in enumerate(xs):
        per_row = int(np.prod(arr.shape[1:])) if arr.ndim else -1
        if per_row != int(np.prod(shapes[k])):
            raise ChildFailure(
                "LOAD_ERROR",
                f"sample input {k} has rows of shape {list(arr.shape[1:])}, which do not fit model input "
                f"{details[k]['name']!r} of shape {shapes[k]}",
            )
    n_rows = min([len(a) for a in xs] + [max(1, limit)]) if xs else 8
    if n_rows == 0:  # an empty sample feeds nothing
        xs, n_rows = [], 8
    rows: list[list[Any]] = []
    for i in range(n_rows):
        row = []
        for k, d in enumerate(details):
            shape = shapes[k]
            dtype = np.dtype(d["dtype"])
            if k < len(xs):
                row.append(_to_input(np, xs[k][i], d).reshape(shape))
            elif np.issubdtype(dtype, np.floating):
                row.append(rng.standard_normal(shape).astype(dtype))
            elif dtype == np.bool_:
                row.append(rng.integers(0, 2, shape).astype(dtype))
            else:
                info = np.iinfo(dtype)
                row.append(rng.integers(max(info.min, -128), min(info.max, 127) + 1, shape).astype(dtype))
        rows.append(row)
    return rows, len(xs)


def _check_finite(np: Any, interp: Any, outputs: list[dict[str, Any]], when: str) -> None:
    for d in outputs:
        o = interp.get_tensor(d["index"])
        if np.issubdtype(o.dtype, np.floating) and not np.all(np.isfinite(o)):
            raise ChildFailure("CRASH", f"output {d['name']} is not finite (NaN/Inf) on {when}")


def _output_float(np: Any, interp: Any, d: dict[str, Any]) -> Any:
    """Output tensor ``d`` as float32; an integer output is dequantized with its scale and zero point
    (the same float32 arithmetic as the host's references)."""
    o = interp.get_tensor(d["index"])
    scale, zero = d.get("quantization", (0.0, 0))
    if np.issubdtype(o.dtype, np.integer) and scale:
        return ((o.astype(np.float32) - zero) * scale).astype(np.float32)
    return o.astype(np.float32)


class _Sample:
    """A variant's sample as the child uses it: inputs, labels and the host's reference outputs."""

    def __init__(self, arrays: dict[str, Any] | None) -> None:
        self.inputs: list[Any] | None = None
        self.labels: Any = None
        self.references: list[Any] = []
        if arrays is None:
            return
        from agent.fidelity import sample_inputs, sample_references

        self.inputs = sample_inputs(arrays)
        if self.inputs is not None:
            self.labels = arrays.get("y")
            self.references = sample_references(arrays)


def _fidelity(
    np: Any,
    details: list[dict[str, Any]],
    fed: int,
    n_inputs: int,
    refs: list[Any],
    collected: list[list[Any]],
) -> dict[str, Any]:
    """``fidelity`` (worst over outputs) and ``fidelity_outputs`` of the collected device outputs (one
    list of float32 rows per output tensor) against the sample's ``ref_*``; or ``fidelity_error``."""
    from agent.fidelity import compare_outputs, worst

    if fed < n_inputs:
        return {
            "fidelity_error": f"the sample feeds {fed} of the model's {n_inputs} inputs, so its outputs "
            "cannot be compared with the host's references"
        }
    if len(refs) != len(details):
        return {
            "fidelity_error": f"the sample has {len(refs)} reference output(s), the model {len(details)} "
            "output(s)"
        }
    n = min(len(c) for c in collected)
    references, device = [], []
    for j, (d, ref, got) in enumerate(zip(details, refs, collected, strict=True)):
        if ref.ndim == 0 or len(ref) < n:
            return {"fidelity_error": f"ref_{j} has {0 if ref.ndim == 0 else len(ref)} rows, {n} were run"}
        row_shape = tuple(ref.shape[1:])
        if got and got[0].size != int(np.prod(row_shape)):
            return {
                "fidelity_error": f"output {d['name']!r} of shape {list(got[0].shape)} does not fit the "
                f"rows of ref_{j}, shaped {list(row_shape)}"
            }
        references.append(ref[:n])
        device.append(np.stack([g.reshape(row_shape) for g in got[:n]]))
    try:
        per_tensor = compare_outputs(references, device)
    except (TypeError, ValueError) as err:
        return {"fidelity_error": f"reference outputs unusable: {err}"}
    summary = worst(per_tensor)
    return {
        "fidelity": summary.model_dump(mode="json"),
        "fidelity_outputs": [
            {
                "name": str(d["name"]),
                "rows": t.rows,
                "cosine": t.cosine,
                "sqnr_db": t.sqnr_db,
                "max_abs": t.max_abs if np.isfinite(t.max_abs) else 1e300,
                "top1_agreement": t.top1_agreement,
            }
            for d, t in zip(details, per_tensor, strict=True)
        ],
    }


def run(req: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {"ok": False}
    import numpy as np

    from agent.runtime import load_interpreter

    interpreter_cls, runtime_name, runtime_version = load_interpreter()
    out["runtime"] = {"name": runtime_name, "version": runtime_version}
    if req.get("sample"):
        import agent.fidelity  # noqa: F401  - before the address-space limit, like the runtime
    _limit_memory(int(req.get("memory_limit_mb", 1024)))
    arrays = None
    if req.get("sample"):
        try:
            with np.load(req["sample"], allow_pickle=False) as npz:
                arrays = {k: npz[k] for k in npz.files}
        except (OSError, ValueError) as err:
            out["sample_error"] = f"{type(err).__name__}: {err}"
    sample = _Sample(arrays)
    max_eval = int(req.get("max_eval", 1000))

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
    if _fit_free_dims(interp, inputs, sample.inputs):
        inputs = interp.get_input_details()
    outputs = interp.get_output_details()
    health = req.get("mode") == "health"
    inferences = int(req.get("inferences", 8))
    rows, fed = _prepare_inputs(np, inputs, sample.inputs, max(max_eval, inferences) if health else max_eval)
    n_eval = min(len(rows), max_eval) if fed else 0
    compare = bool(sample.references) and n_eval > 0

    def infer(row: list[Any]) -> float:
        for d, arr in zip(inputs, row, strict=True):
            interp.set_tensor(d["index"], arr)
        start = time.perf_counter()
        interp.invoke()
        return (time.perf_counter() - start) * 1000.0

    def score(with_predictions: bool) -> None:
        """Run the first ``n_eval`` sample rows: top-1 of output 0 and every output for the fidelity."""
        predictions: list[int] = []
        collected: list[list[Any]] = [[] for _ in outputs]
        for i in range(n_eval):
            infer(rows[i])
            if with_predictions:
                predictions.append(int(np.argmax(interp.get_tensor(outputs[0]["index"]).reshape(-1))))
            if compare:
                for j, d in enumerate(outputs):
                    collected[j].append(_output_float(np, interp, d))
        if with_predictions:
            out["predictions"] = predictions
            if sample.labels is not None and n_eval:
                truth = [int(np.asarray(sample.labels[i]).reshape(-1)[0]) for i in range(n_eval)]
                out["accuracy"] = sum(p == t for p, t in zip(predictions, truth, strict=True)) / n_eval
                out["eval_samples"] = n_eval
        if compare:
            out.update(_fidelity(np, outputs, fed, len(inputs), sample.references, collected))

    try:
        out["first_inference_ms"] = infer(rows[0])
        _check_finite(np, interp, outputs, "the first inference")
        if health:
            for i in range(inferences):
                infer(rows[i % len(rows)])
                _check_finite(np, interp, outputs, f"inference {i}")
            if compare:
                score(with_predictions=False)
            out["ok"] = True
            out["peak_rss_bytes"] = _peak_rss_bytes()
            return out

        if sample.inputs is not None:
            score(with_predictions=True)

        for i in range(int(req.get("warmup_runs", 5))):
            infer(rows[i % len(rows)])
        min_runs, max_runs = int(req.get("min_runs", 50)), int(req.get("max_runs", 10_000))
        min_seconds = float(req.get("min_seconds", 1.0))
        thresholds = contention.Thresholds(
            max_other_share=float(req.get("max_other_share", 0.10)),
            max_involuntary_per_s=float(req.get("max_involuntary_per_s", 50.0)),
        )
        cores = contention.affinity()
        windows: list[_Window] = []
        # A disturbed window is run again (bounded); the least disturbed one is kept.
        for _attempt in range(1 + max(0, int(req.get("max_retries", 2)))):
            windows.append(_timed_window(infer, rows, min_runs, max_runs, min_seconds, cores, thresholds))
            if not windows[-1].assessment.disturbed:
                break
        best = min(windows, key=lambda w: (w.assessment.disturbed, w.assessment.other_share))
    except MemoryError as err:
        raise ChildFailure("OOM", f"out of memory during inference: {err}") from err
    except ChildFailure:
        raise
    except Exception as err:
        raise ChildFailure("CRASH", f"inference failed: {type(err).__name__}: {err}") from err
    out.update(
        ok=True,
        latencies_ms=best.latencies,
        duration_s=best.wall,
        loop_monotonic=[best.mono0, best.mono1],
        cpu_util=best.cpu / best.wall if best.wall > 0 else None,
        peak_rss_bytes=_peak_rss_bytes(),
        contention={
            **best.assessment.to_json(),
            "contended": best.assessment.disturbed,
            "retries": len(windows) - 1,
            "windows": [w.assessment.to_json() for w in windows],
        },
    )
    return out


@dataclass(frozen=True, slots=True)
class _Window:
    """One timed loop: its latencies, clocks and how disturbed it was."""

    latencies: list[float]
    wall: float
    mono0: float
    mono1: float
    cpu: float
    assessment: contention.Assessment


def _timed_window(
    infer: Any,
    rows: list[list[Any]],
    min_runs: int,
    max_runs: int,
    min_seconds: float,
    cores: list[int],
    thresholds: contention.Thresholds,
) -> _Window:
    """At least ``min_runs`` runs and ``min_seconds`` (at most ``max_runs``), sampled at both ends."""
    latencies: list[float] = []
    before = contention.sample(cores)
    mono0 = time.monotonic()  # system-wide clock: the parent's energy sampler windows on it
    cpu0, wall0, proc0 = _cpu_seconds(), time.perf_counter(), time.process_time()
    while len(latencies) < max_runs:
        latencies.append(infer(rows[len(latencies) % len(rows)]))
        if len(latencies) >= min_runs and time.perf_counter() - wall0 >= min_seconds:
            break
    wall = time.perf_counter() - wall0
    mono1 = time.monotonic()
    cpu = max(_cpu_seconds() - cpu0, time.process_time() - proc0)
    after = contention.sample(cores)
    return _Window(latencies, wall, mono0, mono1, cpu, contention.assess(before, after, thresholds))


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
