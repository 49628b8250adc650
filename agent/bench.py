"""Benchmark and health-check models in a child process (``python -m agent.bench_child``).

The parent enforces a wall-clock timeout (the child's process group is killed → RUN_TIMEOUT); the child
caps its address space with RLIMIT_AS (MemoryError or an allocation failure → OOM); a child killed by a
signal → CRASH; a model that does not load → LOAD_ERROR (UNSUPPORTED_OP when the runtime names a missing
or custom op); on-device accuracy further than ``accuracy_tolerance`` from the host's, or outputs on the
sample further from the host's reference outputs (``ref_*``) than ``variant.output_tolerance`` allows →
ACCURACY_MISMATCH; a variant whose ``min_runtime`` this device's runtime does not meet is not run →
RUNTIME_TOO_OLD. The daemon never loads a model itself.

Method (after TFLite's benchmark_model): load + allocate (``init_ms``), first inference, top-1 predictions,
accuracy and output fidelity (:mod:`agent.fidelity`, every output against the host's) on the variant's
sample if present, ``warmup_runs`` discarded, then at least ``min_runs`` and at least ``min_seconds``
(capped by ``max_runs``); latency statistics over the timed runs, peak RSS of the
child, CPU seconds per wall second of the child (rusage), the thread count and runtime; how much other
processes disturbed the timed window (:mod:`agent.contention`: a disturbed window is repeated up to
``max_retries`` times, a result still disturbed is ``contended`` with its figures). Around the child:
optional cool-down (``[thermal]``), CPU temperature and throttling flags before/after, an idle power
baseline and power sampling cut to the child's timed loop (:class:`agent.energy.EnergyMeter`).

Use without a daemon (benches, scripts)::

    from agent.bench import benchmark_variant
    result = benchmark_variant(variant, Path("m.tflite"), Path("m.sample.npz"), BenchConfig(), threads=2)

``board`` (a model string or :class:`agent.board.BoardInfo`) picks the power profile when no ``meter`` is
given (then energy is the utilisation model, ``measured=False``); pass an ``EnergyMeter.from_config(...)``
to measure with a sensor. :func:`measure_variant` also returns the sample predictions (for agreement).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from agent.bench_child import RESULT_PREFIX
from agent.board import BoardInfo, detect_board, power_profile, profile_key_for
from agent.children import ChildRegistry, adopted
from agent.config import BenchConfig
from agent.energy import EnergyConfig, EnergyMeter, ModelBackend, PowerWindow
from agent.runtime import detect_runtime
from agent.thermal import (
    CoolOutcome,
    ThermalConfig,
    ThrottleState,
    cpu_temperature,
    read_throttled,
    throttled_during,
    wait_until_cool,
)
from agent.wire import (
    BenchError,
    BenchResult,
    Contention,
    LatencyStats,
    OutputFidelity,
    OutputTolerance,
    RuntimeInfo,
    Variant,
    now,
    runtime_supports,
    tflite_version,
)

log = logging.getLogger(__name__)


def percentile(sorted_values: Sequence[float], q: float) -> float:
    """Linear-interpolated percentile (numpy's default method) of already sorted values."""
    if not sorted_values:
        raise ValueError("no values")
    pos = (len(sorted_values) - 1) * q / 100.0
    lo = math.floor(pos)
    hi = min(lo + 1, len(sorted_values) - 1)
    return sorted_values[lo] + (sorted_values[hi] - sorted_values[lo]) * (pos - lo)


def latency_stats(samples_ms: Sequence[float]) -> LatencyStats:
    """count, mean, population std, min, p50/p90/p95/p99, max of the timed runs in milliseconds."""
    if not samples_ms:
        raise ValueError("latency_stats needs at least one sample")
    s = sorted(float(x) for x in samples_ms)
    n = len(s)
    mean = sum(s) / n
    std = math.sqrt(sum((x - mean) ** 2 for x in s) / n)
    return LatencyStats(
        count=n,
        mean=mean,
        std=std,
        min=s[0],
        p50=percentile(s, 50),
        p90=percentile(s, 90),
        p95=percentile(s, 95),
        p99=percentile(s, 99),
        max=s[-1],
    )


@dataclass(frozen=True, slots=True)
class ChildOutcome:
    """What came back from one child run: the child's JSON, or a parent-side failure code."""

    data: dict[str, Any]
    error: BenchError | None
    detail: str | None
    wall_s: float


def run_child(
    request: dict[str, Any],
    timeout_s: float,
    stop: threading.Event | None = None,
    tick: Callable[[], None] | None = None,
    registry: ChildRegistry | None = None,
) -> ChildOutcome:
    """Run ``agent.bench_child`` with ``request``; kill its process group on timeout or ``stop``.

    While it runs the child is recorded in ``registry`` (default: the one the daemon adopted, see
    :mod:`agent.children`) so that an agent restarted after a kill -9 can end it.
    """
    registry = registry if registry is not None else adopted()
    t0 = time.monotonic()
    env = dict(os.environ)
    env.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    proc = subprocess.Popen(
        [sys.executable, "-m", "agent.bench_child"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        start_new_session=True,
        env=env,
    )
    if registry is not None:
        registry.record(proc.pid)
    try:
        stdout, stderr, killed = _wait_child(proc, request, timeout_s, t0, stop, tick)
    finally:
        if registry is not None:
            registry.forget(proc.pid)
    return _outcome(proc, stdout, stderr, killed, timeout_s, time.monotonic() - t0)


def _wait_child(
    proc: subprocess.Popen[bytes],
    request: dict[str, Any],
    timeout_s: float,
    t0: float,
    stop: threading.Event | None,
    tick: Callable[[], None] | None,
) -> tuple[bytes, bytes, str | None]:
    payload: bytes | None = json.dumps(request).encode()
    stdout, stderr = b"", b""
    killed: str | None = None
    while True:
        try:
            out, err = proc.communicate(input=payload, timeout=0.25)
            stdout, stderr = out or b"", err or b""
            break
        except subprocess.TimeoutExpired:
            payload = None
            if tick is not None:
                tick()
            if time.monotonic() - t0 > timeout_s:
                killed = "timeout"
            elif stop is not None and stop.is_set():
                killed = "stopped"
            if killed:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                out, err = proc.communicate()
                stdout, stderr = out or b"", err or b""
                break
    return stdout, stderr, killed


def _outcome(
    proc: subprocess.Popen[bytes],
    stdout: bytes,
    stderr: bytes,
    killed: str | None,
    timeout_s: float,
    wall: float,
) -> ChildOutcome:
    tail = stderr.decode("utf-8", "replace").strip()[-600:]
    if killed == "timeout":
        return ChildOutcome({}, BenchError.RUN_TIMEOUT, f"killed after {timeout_s:g} s wall clock", wall)
    if killed == "stopped":
        return ChildOutcome({}, BenchError.CRASH, "agent stopping; benchmark interrupted", wall)
    data: dict[str, Any] | None = None
    for line in stdout.decode("utf-8", "replace").splitlines():
        if line.startswith(RESULT_PREFIX):
            with contextlib.suppress(ValueError):
                data = json.loads(line[len(RESULT_PREFIX) :])
    if data is None:
        rc = proc.returncode
        if rc is not None and rc < 0:
            sig = signal.Signals(-rc).name if -rc in signal.Signals._value2member_map_ else str(-rc)
            code = BenchError.OOM if "bad_alloc" in tail else BenchError.CRASH
            return ChildOutcome({}, code, f"child killed by {sig}: {tail}".strip(), wall)
        if "MemoryError" in tail or "bad_alloc" in tail:
            return ChildOutcome({}, BenchError.OOM, tail, wall)
        return ChildOutcome({}, BenchError.CRASH, f"child exited with code {rc} and no result: {tail}", wall)
    if not data.get("ok"):
        try:
            code = BenchError(data.get("error", "CRASH"))
        except ValueError:
            code = BenchError.CRASH
        return ChildOutcome(data, code, str(data.get("detail", ""))[:2000], wall)
    return ChildOutcome(data, None, None, wall)


def _runtime(data: dict[str, Any], fallback: RuntimeInfo | None) -> RuntimeInfo | None:
    raw = data.get("runtime")
    if isinstance(raw, dict):
        with contextlib.suppress(ValueError):
            return RuntimeInfo.model_validate(raw)
    return fallback


@dataclass(frozen=True, slots=True)
class VariantRun:
    """One benchmark's result and the top-1 predictions on the sample (None without a sample)."""

    result: BenchResult
    predictions: list[int] | None = None


def default_meter(board: str | BoardInfo | None = None) -> EnergyMeter:
    """A utilisation-model meter (never measured) for ``board``; detected when None."""
    if isinstance(board, BoardInfo):
        info = board
    else:
        info = detect_board()
        if board:
            info = dataclasses.replace(info, profile_key=profile_key_for(board, info.arch))
    profile = power_profile(info.profile_key)
    return EnergyMeter(ModelBackend(profile), profile, info.cpu_count, EnergyConfig(kind="model"))


def _agreement(predictions: list[int] | None, baseline: Sequence[int] | None) -> float | None:
    if not predictions or not baseline:
        return None
    n = min(len(predictions), len(baseline))
    return sum(a == b for a, b in zip(predictions[:n], baseline[:n], strict=True)) / n


def top1_comparable(variant: Variant, task: str = "classification") -> bool:
    """Whether output 0's top-1 index means anything (so ``agreement`` with the baseline does): always for
    a classification manifest; for a generic one only when output 0 is a class vector."""
    from agent.fidelity import is_class_vector  # numpy: loaded once a model is measured, not at start

    return task == "classification" or is_class_vector(variant.outputs[0].shape)


def output_fidelity(data: dict[str, Any]) -> OutputFidelity | None:
    """The child's ``fidelity`` (worst over every output), or None when the sample had no ``ref_*``."""
    raw = data.get("fidelity")
    if isinstance(raw, dict):
        with contextlib.suppress(ValueError):
            return OutputFidelity.model_validate(raw)
    return None


def fidelity_mismatch(data: dict[str, Any], tolerance: OutputTolerance | None) -> str | None:
    """Why the child's outputs on the sample fall outside ``tolerance`` of the host's reference outputs.

    None when within, when no tolerance is set, or when the sample carries no references (a schema-1
    sample). Outputs that cannot be set against the references at all (other count or shape) are
    outside any tolerance.
    """
    from agent.fidelity import tolerance_violation

    if tolerance is None:
        return None
    fid = output_fidelity(data)
    if fid is not None:
        return tolerance_violation(fid, tolerance)
    problem = data.get("fidelity_error") or (
        f"unusable fidelity figures {data['fidelity']!r}" if "fidelity" in data else None
    )
    if problem is None:
        return None
    return f"outputs on the sample cannot be compared with the host's: {problem}"[:2000]


@dataclass(frozen=True, slots=True)
class ChildContention:
    """The child's verdict on its kept window and the figures published with it."""

    contended: bool
    figures: Contention


def child_contention(data: dict[str, Any]) -> ChildContention | None:
    """The child's ``contention`` block as wire figures; None when absent or unreadable (older child)."""
    raw = data.get("contention")
    if not isinstance(raw, dict):
        return None
    fields = {k: raw[k] for k in Contention.model_fields if k in raw}
    try:
        figures = Contention.model_validate(fields)
    except ValueError as err:
        log.warning("ignoring unreadable contention figures from the benchmark child: %s", err)
        return None
    return ChildContention(bool(raw.get("contended")), figures)


def _power_window(meter: EnergyMeter, data: dict[str, Any]) -> PowerWindow | None:
    """Samples inside the child's timed loop; a loop shorter than two samples widens by one period."""
    marks = data.get("loop_monotonic")
    if not (isinstance(marks, list) and len(marks) == 2):
        return None
    t0, t1 = float(marks[0]), float(marks[1])
    window = meter.sampler.window(t0, t1)
    if window.samples < 2:
        pad = meter.sampler.interval_s
        window = meter.sampler.window(t0 - pad, t1 + pad)
    return window


def measure_variant(
    variant: Variant,
    model_path: Path,
    sample_path: Path | None,
    cfg: BenchConfig,
    *,
    board: str | BoardInfo | None = None,
    threads: int = 1,
    stop: threading.Event | None = None,
    tick: Callable[[], None] | None = None,
    meter: EnergyMeter | None = None,
    runtime: RuntimeInfo | None = None,
    thermal: ThermalConfig | None = None,
    baseline_predictions: Sequence[int] | None = None,
    is_baseline: bool = False,
    task: str = "classification",
    read_temp: Callable[[], float | None] = cpu_temperature,
    read_throttle: Callable[[], ThrottleState | None] = read_throttled,
) -> VariantRun:
    """Benchmark ``variant`` at ``threads`` in a child; a failure is a result with an error code.

    ``runtime`` (default: detected from package metadata) gates ``variant.min_runtime``: too old → not
    run, error RUNTIME_TOO_OLD. ``baseline_predictions`` (the float32 variant's top-1 on the same sample,
    on this device) gives ``agreement``; ``is_baseline`` marks the baseline itself (agreement 1.0). For a
    ``task`` other than classification, agreement (and the returned predictions) only exist when output 0
    is a class vector. With ``ref_*`` in the sample the result carries ``fidelity`` (worst over outputs);
    outside ``variant.output_tolerance`` it is ACCURACY_MISMATCH, like accuracy far from the host's.
    ``thermal.cool_below_c`` waits for the CPU to cool first. ``meter`` defaults to the utilisation model.
    """
    stop = stop if stop is not None else threading.Event()
    runtime = runtime if runtime is not None else detect_runtime()
    base: dict[str, Any] = {
        "variant": variant.id,
        "sha256": variant.sha256,
        "runtime": runtime,
        "threads": threads,
        "warmup_runs": cfg.warmup_runs,
    }
    if runtime is not None and not runtime_supports(runtime, variant.min_runtime):
        why = (
            f"variant needs TFLite runtime >= {variant.min_runtime}; this device has {runtime.name} "
            f"{runtime.version} (TFLite {tflite_version(runtime)}); not run"
        )
        log.warning("benchmark of %s skipped: %s", variant.id, why)
        return VariantRun(
            BenchResult(ok=False, error=BenchError.RUNTIME_TOO_OLD, error_detail=why, ts=now(), **base)
        )
    meter = meter if meter is not None else default_meter(board)
    if thermal is not None and thermal.cool_below_c is not None:
        cooled = wait_until_cool(
            thermal.cool_below_c, thermal.cool_timeout_s, stop, read_temp=read_temp, poll_s=thermal.poll_s
        )
        if cooled is CoolOutcome.TIMEOUT:
            log.warning("benchmarking %s with the CPU above %g °C", variant.id, thermal.cool_below_c)
    idle_w = meter.idle_baseline(stop)
    request = {
        "mode": "bench",
        "model": str(model_path),
        "sample": str(sample_path) if sample_path else None,
        "threads": threads,
        "warmup_runs": cfg.warmup_runs,
        "min_runs": cfg.min_runs,
        "min_seconds": cfg.min_seconds,
        "max_runs": cfg.max_runs,
        "max_eval": cfg.max_eval,
        "memory_limit_mb": cfg.memory_limit_mb,
        "max_retries": cfg.max_retries,
        "max_other_share": cfg.max_other_share,
        "max_involuntary_per_s": cfg.max_involuntary_per_s,
    }
    temp_before, throttle_before = read_temp(), read_throttle()
    meter.start()
    try:
        outcome = run_child(request, cfg.timeout_s, stop, tick)
    finally:
        meter.stop()
    temp_after, throttle_after = read_temp(), read_throttle()
    data = outcome.data
    common: dict[str, Any] = {
        **base,
        "runtime": _runtime(data, runtime),
        "threads": int(data.get("threads", threads)),
        "temperature_c_before": temp_before,
        "temperature_c_after": temp_after,
        "throttled": throttled_during(throttle_before, throttle_after),
        "ts": now(),
    }
    if outcome.error is not None:
        log.warning(
            "benchmark of %s (%d thread(s)) failed: %s %s", variant.id, threads, outcome.error, outcome.detail
        )
        failed = BenchResult(
            ok=False,
            error=outcome.error,
            error_detail=outcome.detail,
            init_ms=data.get("init_ms"),
            peak_rss_bytes=data.get("peak_rss_bytes"),
            **common,
        )
        return VariantRun(failed)
    stats = latency_stats(data["latencies_ms"])
    cpu_util = data.get("cpu_util")
    duration = float(data["duration_s"])
    energy = meter.energy(_power_window(meter, data), stats.count, duration, cpu_util, idle_w)
    predictions = data.get("predictions")
    predictions = [int(p) for p in predictions] if isinstance(predictions, list) else None
    if not top1_comparable(variant, task):
        predictions = None
    agreement = 1.0 if is_baseline and predictions else _agreement(predictions, baseline_predictions)
    accuracy = data.get("accuracy")
    fidelity = output_fidelity(data)
    problems = [
        p
        for p in (
            accuracy_mismatch(accuracy, data.get("eval_samples"), variant, cfg.accuracy_tolerance),
            fidelity_mismatch(data, variant.output_tolerance),
        )
        if p is not None
    ]
    contention = child_contention(data)
    ok, error, detail = True, None, None
    if problems:
        ok, error, detail = False, BenchError.ACCURACY_MISMATCH, "; ".join(problems)[:2000]
    result = BenchResult(
        ok=ok,
        error=error,
        error_detail=detail,
        duration_s=duration,
        latency_ms=stats,
        init_ms=data.get("init_ms"),
        first_inference_ms=data.get("first_inference_ms"),
        peak_rss_bytes=data.get("peak_rss_bytes"),
        cpu_util=cpu_util,
        energy=energy,
        accuracy=accuracy,
        agreement=agreement,
        fidelity=fidelity,
        contended=contention.contended if contention is not None else None,
        contention=contention.figures if contention is not None else None,
        **common,
    )
    if contention is not None and contention.contended:
        log.warning(
            "benchmark of %s stayed disturbed after %d retr%s: %s; published as contended",
            variant.id,
            contention.figures.retries,
            "y" if contention.figures.retries == 1 else "ies",
            "; ".join(contention.figures.why),
        )
    log.info(
        "benchmarked %s (%d thread(s)): p50 %.3f ms p95 %.3f ms over %d runs, init %.1f ms, "
        "rss %.1f MiB%s%s%s%s",
        variant.id,
        threads,
        stats.p50,
        stats.p95,
        stats.count,
        result.init_ms or 0.0,
        (result.peak_rss_bytes or 0) / 2**20,
        f", accuracy {accuracy:.4f}" if accuracy is not None else "",
        f", agreement {agreement:.4f}" if agreement is not None else "",
        f", outputs vs host cosine {fidelity.cosine:.5f} SQNR {fidelity.sqnr_db:.1f} dB "
        f"max abs {fidelity.max_abs:.3g} over {fidelity.rows} rows"
        if fidelity is not None
        else "",
        f", {energy.mj_per_inference:.4f} mJ/inference ({energy.method.value}"
        f"{'' if energy.measured else ', modelled'})"
        if energy is not None
        else "",
    )
    return VariantRun(result, predictions)


def benchmark_variant(
    variant: Variant,
    model_path: Path,
    sample_path: Path | None,
    cfg: BenchConfig,
    *,
    board: str | BoardInfo | None = None,
    threads: int = 1,
    stop: threading.Event | None = None,
    tick: Callable[[], None] | None = None,
    meter: EnergyMeter | None = None,
    runtime: RuntimeInfo | None = None,
    thermal: ThermalConfig | None = None,
) -> BenchResult:
    """One BenchResult for ``variant`` at ``threads`` (see :func:`measure_variant`); runs without a daemon."""
    return measure_variant(
        variant,
        model_path,
        sample_path,
        cfg,
        board=board,
        threads=threads,
        stop=stop,
        tick=tick,
        meter=meter,
        runtime=runtime,
        thermal=thermal,
    ).result


def accuracy_mismatch(accuracy: float | None, rows: object, variant: Variant, tolerance: float) -> str | None:
    """Why the device's accuracy on the sample departs from the host's, or None when it agrees.

    Symmetric: a device far *above* the host also means the two are not computing the same thing. The
    reference is the host's accuracy on the same sample rows when the manifest gives it (then any gap is
    the runtime's doing), else its held-out accuracy (then sampling noise counts against the tolerance).
    """
    reference = variant.reference_accuracy
    if accuracy is None or reference is None:
        return None
    if abs(float(accuracy) - reference) <= tolerance + 1e-9:  # epsilon: 1.0 vs 0.95 at 0.05 is inside
        return None
    what = "on the same sample" if variant.metrics.sample_accuracy is not None else "on held-out data"
    return (
        f"on-device accuracy {float(accuracy):.4f} on {rows} sample rows differs from the host's "
        f"{reference:.4f} ({what}) by more than {tolerance:g}"
    )


def health_check(
    model_path: Path,
    sample_path: Path | None,
    *,
    inferences: int,
    timeout_s: float,
    memory_limit_mb: int,
    stop: threading.Event | None = None,
    tick: Callable[[], None] | None = None,
    tolerance: OutputTolerance | None = None,
    max_eval: int = 200,
) -> str | None:
    """Load the model in a child, run ``inferences`` inferences, check outputs are finite. None = healthy.

    With ``tolerance`` (the variant's ``output_tolerance``) and a sample carrying the host's reference
    outputs, up to ``max_eval`` sample rows are run too and outputs that depart from the host's are a
    failure (``ACCURACY_MISMATCH: ...``): a model that loads and computes garbage, for any task.
    """
    request = {
        "mode": "health",
        "model": str(model_path),
        "sample": str(sample_path) if sample_path else None,
        "inferences": inferences,
        "memory_limit_mb": memory_limit_mb,
        "max_eval": max_eval if tolerance is not None else 0,
    }
    outcome = run_child(request, timeout_s, stop, tick)
    if outcome.error is not None:
        return f"{outcome.error.value}: {outcome.detail}"
    mismatch = fidelity_mismatch(outcome.data, tolerance)
    return None if mismatch is None else f"{BenchError.ACCURACY_MISMATCH.value}: {mismatch}"
