"""Post-activation health check: the new model must load, give finite outputs and still be right.

Two child processes (:func:`agent.bench.run_child`, so a bad model cannot take the daemon down):

1. ``health`` mode: load, allocate, run ``health.inferences`` inferences on the bundle's evaluation
   sample (or generated inputs when there is none) and check every output is finite;
2. when the variant ships a labelled sample and the manifest gives its host accuracy: score up to
   ``health.max_eval`` sample rows and refuse the model if on-device accuracy is below
   ``host accuracy - health.accuracy_tolerance`` (a model that loads and returns garbage, FACTS.md).

``None`` means healthy; otherwise a one-line reason the daemon puts in the rollback Event.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from pathlib import Path

from agent.bench import accuracy_mismatch, health_check, run_child
from agent.config import HealthConfig
from agent.wire import Variant


def check_health(
    model_path: Path,
    sample_path: Path | None,
    variant: Variant | None,
    cfg: HealthConfig,
    *,
    memory_limit_mb: int,
    stop: threading.Event | None = None,
    tick: Callable[[], None] | None = None,
) -> str | None:
    problem = health_check(
        model_path,
        sample_path,
        inferences=cfg.inferences,
        timeout_s=cfg.timeout_s,
        memory_limit_mb=memory_limit_mb,
        stop=stop,
        tick=tick,
        tolerance=variant.output_tolerance if variant is not None else None,
        max_eval=cfg.max_eval,
    )
    if problem is not None or sample_path is None or variant is None or variant.reference_accuracy is None:
        return problem
    request = {
        "mode": "bench",
        "model": str(model_path),
        "sample": str(sample_path),
        "threads": 1,
        "warmup_runs": 0,
        "min_runs": 1,
        "max_runs": 1,
        "min_seconds": 0.0,
        "max_eval": cfg.max_eval,
        "memory_limit_mb": memory_limit_mb,
    }
    outcome = run_child(request, cfg.timeout_s, stop, tick)
    if outcome.error is not None:
        return f"{outcome.error.value}: {outcome.detail}"
    # No labels in the sample: finite outputs are all we can check.
    mismatch = accuracy_mismatch(
        outcome.data.get("accuracy"), outcome.data.get("eval_samples"), variant, cfg.accuracy_tolerance
    )
    return None if mismatch is None else f"ACCURACY_MISMATCH: {mismatch}"
