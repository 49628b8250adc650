"""A quality budget: which variants ship, and the strongest setting of a technique within it.

A budget is either ``--max-drop POINTS`` (classification: accuracy drop against the float baseline, in
percentage points) or ``--min-metric NAME=VALUE`` (any named metric of the manifest, its direction from
the metric's info: ``higher`` means at least VALUE, ``lower`` at most VALUE). Every candidate is judged
on the validation split and confirmed on the test split: it ships only when both pass (``--keep-all``
ships everything anyway). The float baseline always ships. Without a budget every built variant ships,
as before.

Search: a recipe step with ``keep = "search"`` (prune) or ``width = "search"`` (distill) is tried at a
few settings of a fixed grid, strongest first in bisection order (:func:`bisect_strongest`), each trial
fine-tuned, converted and evaluated as the .tflite on the validation rows; the strongest setting that
passes becomes the variant. The metric is assumed monotone in the setting (more kept, no worse).
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from compressor.data import Dataset
from compressor.errors import DataError
from compressor.metrics import Direction, builtin_info

# Settings searched, strongest compression first. Keep/width 1.0 is the unpruned model and not tried.
KEEP_GRID: tuple[float, ...] = (0.125, 0.1875, 0.25, 0.375, 0.5, 0.625, 0.75, 0.875)
WIDTH_GRID: tuple[float, ...] = KEEP_GRID
MAX_TRIALS = 5
# Floating-point slack when comparing a measured value with the budget: 1/360 rows is exact in points,
# but 100 * (a - b) is not.
EPSILON = 1e-9


@dataclass(frozen=True, slots=True)
class Budget:
    """``metric`` judged against ``limit``: a drop in points (``max_drop``) or a value bound."""

    metric: str
    limit: float
    max_drop: bool  # True: limit is the accuracy drop in points against the baseline
    direction: Direction = "higher"

    def describe(self) -> str:
        if self.max_drop:
            return f"accuracy drop ≤ {self.limit:g} points against the baseline"
        op = "≥" if self.direction == "higher" else "≤"
        return f"{self.metric} {op} {self.limit:g}"

    def slack(self, value: float | None, base: float | None) -> float | None:
        """How far inside the budget (positive) or outside (negative) ``value`` is; None if unmeasured.

        ``max_drop``: in points (``value`` and ``base`` are accuracies in [0, 1])."""
        if value is None:
            return None
        if self.max_drop:
            if base is None:
                return None
            return self.limit - 100.0 * (base - value)
        return value - self.limit if self.direction == "higher" else self.limit - value

    def shown(self, value: float | None, base: float | None) -> str:
        """The judged quantity as the report shows it (a drop in points, or the metric's value)."""
        if value is None:
            return "–"
        if self.max_drop:
            return "–" if base is None else f"drop {100.0 * (base - value):.2f}"
        return f"{self.metric} {value:.4g}"


def parse_min_metric(text: str) -> tuple[str, float]:
    """``NAME=VALUE`` → (name, value); DataError naming the problem otherwise."""
    name, sep, value = text.partition("=")
    name = name.strip()
    if not sep or not name:
        raise DataError(f"--min-metric {text!r} must be NAME=VALUE, e.g. cosine=0.99")
    try:
        number = float(value)
    except ValueError as err:
        raise DataError(f"--min-metric {text!r}: {value.strip()!r} is not a number") from err
    if not math.isfinite(number):
        raise DataError(f"--min-metric {text!r}: the value must be finite")
    return name, number


def make_budget(
    max_drop: float | None,
    min_metric: str | None,
    task: str,
    available: Sequence[str],
    user_directions: dict[str, Direction],
) -> Budget | None:
    """The budget for this build, checked against the metrics the baseline really has."""
    if max_drop is not None and min_metric is not None:
        raise DataError("give --max-drop or --min-metric, not both")
    if max_drop is not None:
        if max_drop < 0 or not math.isfinite(max_drop):
            raise DataError(f"--max-drop must be a non-negative number of points, got {max_drop:g}")
        if task != "classification":
            raise DataError(
                "--max-drop is an accuracy drop and needs class labels; this model has none (generic "
                "task): use --min-metric NAME=VALUE (e.g. cosine=0.99)"
            )
        return Budget("accuracy", max_drop, max_drop=True)
    if min_metric is None:
        return None
    name, value = parse_min_metric(min_metric)
    if name not in available:
        raise DataError(
            f"--min-metric {name}: the variants have no metric {name!r}; they have {', '.join(available)}"
        )
    direction: Direction
    if name in user_directions:
        direction = user_directions[name]
    else:
        info = builtin_info(name)
        direction = info.direction if info is not None else "higher"
    return Budget(name, value, max_drop=False, direction=direction)


@dataclass(slots=True)
class Judgement:
    """One candidate (a recipe variant or a search trial) against the budget, on both splits."""

    id: str
    val: float | None
    test: float | None
    val_slack: float | None
    test_slack: float | None
    shipped: bool = False
    why: str = ""

    @property
    def passes_val(self) -> bool:
        return self.val_slack is not None and self.val_slack >= -EPSILON

    @property
    def passes_test(self) -> bool:
        return self.test_slack is not None and self.test_slack >= -EPSILON


def judge(
    budget: Budget,
    variant_id: str,
    val: float | None,
    test: float | None,
    base_val: float | None,
    base_test: float | None,
) -> Judgement:
    """Judge on validation, confirm on test; ``why`` says what failed, in the report's words."""
    j = Judgement(variant_id, val, test, budget.slack(val, base_val), budget.slack(test, base_test))
    v, t = budget.shown(val, base_val), budget.shown(test, base_test)
    if not j.passes_val:
        j.why = f"outside the budget on validation ({v}; budget: {budget.describe()})"
    elif not j.passes_test:
        j.why = (
            f"passes validation ({v}) but fails the test split ({t}; budget: {budget.describe()}): "
            "not confirmed"
        )
    else:
        j.why = f"within the budget (validation {v}, test {t})"
    return j


def closest(judgements: Sequence[Judgement]) -> Judgement | None:
    """The candidate nearest the budget on validation (the split it is judged on)."""
    measured = [j for j in judgements if j.val_slack is not None]
    return max(measured, key=lambda j: j.val_slack or 0.0, default=None)


# --------------------------------------------------------------------------------------------------------
# search


@dataclass(frozen=True, slots=True)
class Trial:
    setting: float
    passed: bool
    note: str = ""


@dataclass(slots=True)
class SearchOutcome:
    trials: list[Trial] = field(default_factory=list)
    best: float | None = None  # the strongest setting that passed
    stopped: str = ""  # why the search ended early ("time budget", ...), empty otherwise


def bisect_strongest(
    grid: Sequence[float],
    trial: Callable[[float], Trial],
    max_trials: int = MAX_TRIALS,
    should_stop: Callable[[], str] | None = None,
) -> SearchOutcome:
    """The strongest setting of ``grid`` (strongest first) whose trial passes, by bisection.

    Assumes monotone: if a setting passes, every weaker one does. ``max_trials`` bounds the trials;
    ``should_stop`` returns a reason to start no new trial (empty: go on). A trial that raised is the
    caller's to turn into ``passed=False``.
    """
    out = SearchOutcome()
    lo, hi = 0, len(grid)  # the answer's index is in [lo, hi]; hi == len(grid): none passes
    while lo < hi and len(out.trials) < max_trials:
        reason = should_stop() if should_stop is not None else ""
        if reason:
            out.stopped = reason
            break
        mid = (lo + hi) // 2
        result = trial(grid[mid])
        out.trials.append(result)
        if result.passed:
            hi = mid
            out.best = grid[mid]
        else:
            lo = mid + 1
    return out


# --------------------------------------------------------------------------------------------------------
# statistics for the report


def wilson(successes: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """Wilson score interval (95 % by default) of a proportion measured on ``n`` rows."""
    if n <= 0:
        return 0.0, 1.0
    p = successes / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return max(0.0, centre - half), min(1.0, centre + half)


def pareto_front(points: Sequence[tuple[float, float, float]]) -> set[int]:
    """Indices of the points no other point dominates; each point is (size, latency, -metric): lower is
    better in every coordinate."""
    front: set[int] = set()
    for i, p in enumerate(points):
        dominated = any(
            all(a <= b for a, b in zip(q, p, strict=True)) and any(a < b for a, b in zip(q, p, strict=True))
            for k, q in enumerate(points)
            if k != i
        )
        if not dominated:
            front.add(i)
    return front


# --------------------------------------------------------------------------------------------------------
# report


@dataclass(frozen=True, slots=True)
class Candidate:
    """One row of the report's candidate table: a recipe variant or a search trial."""

    id: str
    chain: str  # the recipe variant it belongs to (a trial's chain; a variant's own id)
    setting: str  # "keep 0.375", "width 0.5", or "" for a fixed chain
    size_bytes: int
    macs: int | None
    latency_ms: float | None
    val: dict[str, float]
    test: dict[str, float]
    test_rows: int
    judgement: Judgement | None = None
    shipped: bool = True
    trial: bool = False


def render_candidates(
    candidates: Sequence[Candidate],
    metric: str,
    direction: Direction,
    budget: Budget | None,
    base_val: float | None,
    base_test: float | None,
    val_rows: int = 0,
) -> list[str]:
    """Markdown: every candidate with size, MACs, host latency, ``metric`` on validation and test (95 %
    interval on test for accuracy), the Pareto front over (size, latency, test metric), and whether it
    shipped and why."""
    sign = 1.0 if direction == "higher" else -1.0
    points = [
        (float(c.size_bytes), c.latency_ms or 0.0, -sign * c.test.get(metric, -sign * math.inf))
        for c in candidates
    ]
    front = pareto_front(points)
    n = max((c.test_rows for c in candidates), default=0)
    lines = ["", "## Candidates", ""]
    if metric == "accuracy" and n:
        lines.append(
            f"Accuracy on {n} test rows: one row is {100.0 / n:.2f} points; the interval is the 95 % "
            "Wilson score interval of the test accuracy. ★ marks the Pareto front over (file size, host "
            "latency, test metric): no other candidate is at least as good on all three and better on one."
        )
    else:
        lines.append(
            f"{metric} on {n} test rows (no interval: {metric} is not a proportion of rows). ★ marks the "
            "Pareto front over (file size, host latency, test metric)."
        )
    if budget is not None:
        lines.append(
            f"Budget: {budget.describe()}, judged on the validation split ({val_rows} rows"
            + (f": one row is {100.0 / val_rows:.2f} points" if metric == "accuracy" and val_rows else "")
            + ") and confirmed on the test split."
        )
    lines += [
        "",
        f"| candidate | setting | size KiB | MACs | p50 ms | {metric} val | {metric} test | 95 % CI | "
        "Pareto | shipped | why |",
        "|---|---|---:|---:|---:|---:|---:|---:|:-:|:-:|---|",
    ]
    for i, c in enumerate(candidates):
        val, test = c.val.get(metric), c.test.get(metric)
        ci = "–"
        if metric == "accuracy" and test is not None and c.test_rows:
            lo, hi = wilson(round(test * c.test_rows), c.test_rows)
            ci = f"{100 * lo:.1f}–{100 * hi:.1f} %"
        val_cell, test_cell = _cell(metric, val), _cell(metric, test)
        if budget is not None and budget.max_drop:
            val_cell += f" ({budget.shown(val, base_val)})" if val is not None else ""
            test_cell += f" ({budget.shown(test, base_test)})" if test is not None else ""
        why = c.judgement.why if c.judgement is not None else ("baseline" if i == 0 else "")
        lines.append(
            f"| `{c.id}` | {c.setting or '–'} | {c.size_bytes / 1024:.1f} | "
            f"{'–' if c.macs is None else f'{c.macs:,}'} | "
            f"{'–' if c.latency_ms is None else f'{c.latency_ms:.3f}'} | {val_cell} | {test_cell} | {ci} | "
            f"{'★' if i in front else ''} | {'yes' if c.shipped else 'no'} | {why} |"
        )
    return lines


def accuracy_intervals(candidates: Sequence[Candidate]) -> str:
    """One report line without a budget: what one test row is worth and each variant's 95 % Wilson
    interval of its test accuracy ("" without accuracy)."""
    rows = [(c.id, c.test["accuracy"], c.test_rows) for c in candidates if "accuracy" in c.test]
    if not rows or not rows[0][2]:
        return ""
    n = rows[0][2]
    cells = []
    for vid, acc, count in rows:
        lo, hi = wilson(round(acc * count), count)
        cells.append(f"`{vid}` {100 * lo:.1f}–{100 * hi:.1f} %")
    return (
        f"test accuracy on {n} rows: one row is {100.0 / n:.2f} points; 95 % Wilson intervals: "
        + ", ".join(cells)
    )


def _cell(metric: str, value: float | None) -> str:
    if value is None:
        return "–"
    return f"{100 * value:.2f} %" if metric == "accuracy" else f"{value:.4g}"


# --------------------------------------------------------------------------------------------------------
# trial cache


class TrialCache:
    """Built .tflite files of transformed chains, on disk, so that a rerun continues where it stopped.

    A file's key hashes the model (architecture and weights, or the file's bytes), every row of the
    data, the seed, the chain's exact steps and the versions of what computes them (edgefleet,
    TensorFlow, Keras, ai-edge-quantizer, ai-edge-litert: :data:`CACHE_PACKAGES`): another model, other
    data, another setting or an upgraded toolchain never reuses it. The cache holds only what training
    made; evaluation always runs again.
    """

    def __init__(self, root: Path, model: Any, data: Dataset, seed: int) -> None:
        self.root = root
        h = hashlib.sha256()
        h.update(_model_digest(model))
        for rows in (data.train, data.val, data.test, data.calibration_rows):
            for arr in (*rows.inputs, rows.y, rows.targets):
                if arr is not None:
                    a = np.ascontiguousarray(arr)
                    h.update(f"{a.dtype}{a.shape}".encode())
                    h.update(a.tobytes())
        h.update(f"seed={seed}".encode())
        h.update(toolchain_versions().encode())
        self.prefix = h.hexdigest()
        self.hits = 0

    def _path(self, steps_json: str) -> Path:
        key = hashlib.sha256(f"{self.prefix}\n{steps_json}".encode()).hexdigest()
        return self.root / f"{key[:32]}.tflite"

    def get(self, steps_json: str) -> tuple[bytes, list[str]] | None:
        path = self._path(steps_json)
        try:
            data = path.read_bytes()
            notes = json.loads(path.with_suffix(".json").read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None
        self.hits += 1
        return data, [str(n) for n in notes]

    def put(self, steps_json: str, tflite: bytes, notes: list[str]) -> None:
        """Best effort: a cache that cannot be written only costs time on the next run."""
        path = self._path(steps_json)
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(".tmp")
            tmp.write_bytes(tflite)
            path.with_suffix(".json").write_text(json.dumps(notes), encoding="utf-8")
            tmp.replace(path)  # the .tflite last: a half-written entry is never read
        except OSError:
            return


CACHE_PACKAGES = ("edgefleet", "tensorflow", "keras", "ai-edge-quantizer", "ai-edge-litert")


def toolchain_versions() -> str:
    """``name=version`` of every package whose code a cached file depends on (missing: ``none``)."""
    from importlib.metadata import PackageNotFoundError, version

    parts = []
    for name in CACHE_PACKAGES:
        try:
            parts.append(f"{name}={version(name)}")
        except PackageNotFoundError:
            parts.append(f"{name}=none")
    return ";".join(parts)


def _model_digest(model: Any) -> bytes:
    h = hashlib.sha256()
    if isinstance(model, bytes | bytearray):
        h.update(model)
        return h.digest()
    h.update(str(model.to_json()).encode())
    for w in model.weights:
        a = np.ascontiguousarray(np.asarray(w))
        h.update(f"{a.dtype}{a.shape}".encode())
        h.update(a.tobytes())
    return h.digest()
