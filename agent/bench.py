"""Benchmark and health-check models in a child process (``python -m agent.bench_child``).

The parent enforces a wall-clock timeout (the child's process group is killed → RUN_TIMEOUT); the child
caps its address space (MemoryError → OOM); a child killed by a signal → CRASH; a model that does not load
→ LOAD_ERROR (UNSUPPORTED_OP when the runtime names a missing op). The daemon never loads a model itself.

Method (after TFLite's benchmark_model): load + allocate (``init_ms``), first inference, accuracy on the
variant's sample if present, ``warmup_runs`` discarded, then at least ``min_runs`` and ``min_seconds``
(capped by ``max_runs``); latency statistics over the timed runs, peak RSS of the child, CPU seconds per
wall second, CPU temperature before/after, and a *modelled* energy figure (never marked measured).
"""

from __future__ import annotations

import contextlib
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
from agent.config import BenchConfig
from agent.runtime import detect_runtime
from agent.sysinfo import cpu_count, cpu_temperature, modelled_energy, throttled
from agent.wire import BenchError, BenchResult, LatencyStats, RuntimeInfo, Variant, now

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
) -> ChildOutcome:
    """Run ``agent.bench_child`` with ``request``; kill its process group on timeout or ``stop``."""
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
    wall = time.monotonic() - t0
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


def _runtime(data: dict[str, Any]) -> RuntimeInfo | None:
    raw = data.get("runtime")
    if isinstance(raw, dict):
        with contextlib.suppress(ValueError):
            return RuntimeInfo.model_validate(raw)
    return detect_runtime()


def benchmark_variant(
    variant: Variant,
    model_path: Path,
    sample_path: Path | None,
    cfg: BenchConfig,
    *,
    board: str,
    threads: int = 1,
    stop: threading.Event | None = None,
    tick: Callable[[], None] | None = None,
) -> BenchResult:
    """One BenchResult for ``variant`` at ``threads``; a failure is a result with an error code."""
    request = {
        "mode": "bench",
        "model": str(model_path),
        "sample": str(sample_path) if sample_path else None,
        "threads": threads,
        "warmup_runs": cfg.warmup_runs,
        "min_runs": cfg.min_runs,
        "min_seconds": cfg.min_seconds,
        "max_runs": cfg.max_runs,
        "memory_limit_mb": cfg.memory_limit_mb,
    }
    temp_before = cpu_temperature()
    outcome = run_child(request, cfg.timeout_s, stop, tick)
    temp_after = cpu_temperature()
    data = outcome.data
    common: dict[str, Any] = {
        "variant": variant.id,
        "sha256": variant.sha256,
        "runtime": _runtime(data),
        "threads": threads,
        "warmup_runs": cfg.warmup_runs,
        "temperature_c_before": temp_before,
        "temperature_c_after": temp_after,
        "throttled": throttled(),
        "ts": now(),
    }
    if outcome.error is not None:
        log.warning(
            "benchmark of %s (%d thread(s)) failed: %s %s", variant.id, threads, outcome.error, outcome.detail
        )
        return BenchResult(
            ok=False,
            error=outcome.error,
            error_detail=outcome.detail,
            init_ms=data.get("init_ms"),
            peak_rss_bytes=data.get("peak_rss_bytes"),
            **common,
        )
    stats = latency_stats(data["latencies_ms"])
    cpu_util = data.get("cpu_util")
    energy = None
    if cpu_util is not None and stats.count:
        energy = modelled_energy(cpu_util, cpu_count(), data["duration_s"] / stats.count, board)
    accuracy = data.get("accuracy")
    ok, error, detail = True, None, None
    host_acc = variant.metrics.accuracy
    if accuracy is not None and host_acc is not None and accuracy < host_acc - cfg.accuracy_tolerance:
        ok, error = False, BenchError.ACCURACY_MISMATCH
        detail = (
            f"on-device accuracy {accuracy:.4f} is more than {cfg.accuracy_tolerance:g} "
            f"below the host's {host_acc:.4f}"
        )
    result = BenchResult(
        ok=ok,
        error=error,
        error_detail=detail,
        duration_s=data.get("duration_s"),
        latency_ms=stats,
        init_ms=data.get("init_ms"),
        first_inference_ms=data.get("first_inference_ms"),
        peak_rss_bytes=data.get("peak_rss_bytes"),
        cpu_util=cpu_util,
        energy=energy,
        accuracy=accuracy,
        **common,
    )
    log.info(
        "benchmarked %s (%d thread(s)): p50 %.3f ms p95 %.3f ms over %d runs, init %.1f ms, rss %.1f MiB%s",
        variant.id,
        threads,
        stats.p50,
        stats.p95,
        stats.count,
        result.init_ms or 0.0,
        (result.peak_rss_bytes or 0) / 2**20,
        f", accuracy {accuracy:.4f}" if accuracy is not None else "",
    )
    return result


def health_check(
    model_path: Path,
    sample_path: Path | None,
    *,
    inferences: int,
    timeout_s: float,
    memory_limit_mb: int,
    stop: threading.Event | None = None,
    tick: Callable[[], None] | None = None,
) -> str | None:
    """Load the model in a child, run ``inferences`` inferences, check outputs are finite. None = healthy."""
    request = {
        "mode": "health",
        "model": str(model_path),
        "sample": str(sample_path) if sample_path else None,
        "inferences": inferences,
        "memory_limit_mb": memory_limit_mb,
    }
    outcome = run_child(request, timeout_s, stop, tick)
    if outcome.error is None:
        return None
    return f"{outcome.error.value}: {outcome.detail}"
