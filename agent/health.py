"""Post-activation health check: the new model must load, give finite outputs and still be right.

Two child processes (:func:`agent.bench.run_child`, so a bad model cannot take the daemon down):

1. ``health`` mode: load, allocate, run ``health.inferences`` inferences on the bundle's evaluation
   sample (or generated inputs when there is none) and check every output is finite;
2. when the variant ships a labelled sample and the manifest gives its host accuracy: score up to
   ``health.max_eval`` sample rows and refuse the model if on-device accuracy is below
   ``host accuracy - health.accuracy_tolerance`` (a model that loads and returns garbage, FACTS.md).

``None`` means healthy; otherwise a one-line reason the daemon puts in the rollback Event.

Off the main loop (:class:`HealthChecks`): a check loads the model and runs inferences in a child for up
to ``health.timeout_s`` (seconds on a Pi), and pings, commands, assignments and status must not wait for
it. Each check runs on a small dedicated thread of its own rather than as a job of the pipeline worker:
the worker may be in the middle of a benchmark sweep of another model (minutes), and a freshly activated
model must not sit unchecked behind it. The thread only runs the child and hands the outcome back on
:attr:`HealthChecks.done` (a ``queue.Queue``); the main loop drains it (:meth:`HealthChecks.finished`,
called from :meth:`agent.activation.Activation.tick`) and makes every state move itself (rollback on a
failure, the probation timer on success), so state moves stay single-threaded. A check is cancelled by
setting its own ``stop`` (:meth:`HealthChecks.cancel`: a rollback command, shutdown); the agent's stop is
copied into it every 0.25 s by the child's poll (``tick``), and ``run_child`` kills the child's process
group at once. A cancelled check's outcome is dropped: whoever cancelled it owns the record.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from agent.config import HealthConfig
from agent.wire import Variant

log = logging.getLogger(__name__)

_JOIN_S = 5.0  # shutdown: the child is killed within 0.25 s of the stop


@dataclass(slots=True)
class HealthCheck:
    """One health check of one activated variant (``sha256``) of ``model``."""

    model: str
    sha256: str
    stop: threading.Event = field(default_factory=threading.Event)
    problem: str | None = None  # set by the check's thread before it is put on ``done``
    thread: threading.Thread | None = None


class HealthChecks:
    """Runs :func:`check_health` on a dedicated thread per check; at most one check per model.

    ``start``, ``cancel``, ``finished``, ``busy`` and ``shutdown`` are for the main loop only (``running``
    is not locked); the check threads touch nothing but their own :class:`HealthCheck` and ``done``.
    """

    def __init__(self, cfg: HealthConfig, *, memory_limit_mb: int, stop: threading.Event) -> None:
        self.cfg = cfg
        self.memory_limit_mb = memory_limit_mb
        self.agent_stop = stop
        self.done: queue.Queue[HealthCheck] = queue.Queue()  # check threads → main loop
        self.running: dict[str, HealthCheck] = {}

    def start(
        self, model: str, sha256: str, model_path: Path, sample_path: Path | None, variant: Variant | None
    ) -> HealthCheck:
        """Check ``model_path`` (variant ``sha256`` of ``model``) on a new thread; cancels an older check."""
        self.cancel(model)
        check = HealthCheck(model, sha256)
        check.thread = threading.Thread(
            target=self._run,
            args=(check, model_path, sample_path, variant),
            name=f"edgefleet-health-{model}",
            daemon=True,
        )
        self.running[model] = check
        check.thread.start()
        return check

    def _run(
        self, check: HealthCheck, model_path: Path, sample_path: Path | None, variant: Variant | None
    ) -> None:
        def follow_agent_stop() -> None:  # run_child polls this every 0.25 s, then looks at check.stop
            if self.agent_stop.is_set():
                check.stop.set()

        try:
            check.problem = check_health(
                model_path,
                sample_path,
                variant,
                self.cfg,
                memory_limit_mb=self.memory_limit_mb,
                stop=check.stop,
                tick=follow_agent_stop,
            )
        except Exception as err:  # an unhealthy check, never a dead thread the main loop waits on forever
            log.exception("health check of %s failed to run", check.model)
            check.problem = f"CRASH: health check could not run: {type(err).__name__}: {err}"
        self.done.put(check)

    def cancel(self, model: str) -> bool:
        """Stop the running check of ``model`` (its child is killed); True if there was one."""
        check = self.running.pop(model, None)
        if check is None:
            return False
        check.stop.set()
        log.info("health check of %s cancelled", model)
        return True

    def busy(self, model: str) -> bool:
        return model in self.running

    def finished(self) -> list[HealthCheck]:
        """Checks that ended since the last call and were not cancelled (oldest first)."""
        out: list[HealthCheck] = []
        while True:
            try:
                check = self.done.get_nowait()
            except queue.Empty:
                return out
            if self.running.get(check.model) is check and not check.stop.is_set():
                del self.running[check.model]
                out.append(check)

    def shutdown(self) -> None:
        """Cancel every check (the model stays in PROBATION: recovery checks it again) and join them."""
        checks = list(self.running.values())
        for check in checks:
            self.cancel(check.model)
        for check in checks:
            if check.thread is not None:
                check.thread.join(timeout=_JOIN_S)
                if check.thread.is_alive():
                    log.warning(
                        "health check of %s still running after %.0f s; leaving it", check.model, _JOIN_S
                    )


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
    """Check ``model_path`` on the calling thread (children with a timeout); None = healthy."""
    from agent.bench import accuracy_mismatch, health_check, run_child  # lazy: an idle daemon needs none

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
