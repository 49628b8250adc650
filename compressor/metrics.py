"""Named metrics of a variant: accuracy (labels), fidelity to the float reference, and user metrics.

Every variant gets, on the held-out rows, against the baseline's outputs on the same rows
(:mod:`agent.fidelity`, the same code a device runs):

* ``cosine``, ``sqnr_db``, ``max_abs`` — the worst over every output tensor; with several outputs also
  per output, suffixed by the output's logical index (``cosine_0``, ``sqnr_db_1``, ...);
* ``top1_agreement`` — where an output is a class vector, the fraction of rows whose argmax agrees (the
  worst such output; per output ``top1_agreement_<j>`` with several outputs);
* ``accuracy`` — with class labels, top-1 accuracy of output 0.

A user evaluator (``--evaluator module:function`` or ``path/to/file.py:function``) adds task metrics::

    def evaluate(predictions: list[np.ndarray], data: compressor.metrics.EvalData) -> dict[str, Metric]:
        masks = predictions[0] > 0.5            # (N, H, W, 1) for a segmenter
        truth = data.targets > 0.5              # y_test from --data, kept as targets (not class labels)
        inter = (masks & truth).sum((1, 2, 3)); union = (masks | truth).sum((1, 2, 3))
        return {"miou": Metric(float((inter / np.maximum(union, 1)).mean()), "higher")}

``predictions`` holds every output over every held-out row (float32, dequantized, in the model's output
order); ``data`` the held-out inputs, class labels (or None) and targets (or None). A metric is a
:class:`Metric` or a ``(value, "higher" | "lower")`` tuple: the direction is required, since the policy
ranks and limits on it. Names are lowercase identifiers (``^[a-z][a-z0-9_]{0,62}$``). An evaluator that
cannot be imported, raises, or returns something else stops the build with one line saying so.
"""

from __future__ import annotations

import importlib
import importlib.util
import math
import re
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, NamedTuple

import numpy as np

from agent.fidelity import compare_outputs
from agent.wire import METRIC_PATTERN, MetricInfo
from compressor.errors import DataError

Direction = Literal["higher", "lower"]


class Metric(NamedTuple):
    value: float
    direction: Direction


class EvaluatorError(DataError):
    """A user evaluator cannot be imported, raised, or returned something that is not named metrics."""


@dataclass(frozen=True, slots=True)
class EvalData:
    """What a user evaluator gets besides the predictions: the held-out rows."""

    inputs: list[np.ndarray]
    labels: np.ndarray | None
    targets: np.ndarray | None
    task: str
    output_names: list[str]


BUILTIN: dict[str, MetricInfo] = {
    "accuracy": MetricInfo(direction="higher", source="labels", description="top-1 accuracy of output 0"),
    "cosine": MetricInfo(
        direction="higher", description="cosine similarity with the float32 outputs (worst output)"
    ),
    "sqnr_db": MetricInfo(
        direction="higher", description="signal-to-quantization-noise ratio vs float32, dB (worst output)"
    ),
    "max_abs": MetricInfo(direction="lower", description="largest absolute difference from float32 outputs"),
    "top1_agreement": MetricInfo(
        direction="higher", description="rows whose argmax agrees with float32 (class-vector outputs)"
    ),
}
_METRIC_RE = re.compile(METRIC_PATTERN)


def builtin_info(name: str) -> MetricInfo | None:
    """The description of a built-in metric, including the per-output ``<name>_<j>`` forms."""
    if name in BUILTIN:
        return BUILTIN[name]
    base, _, index = name.rpartition("_")
    if index.isdigit() and base in BUILTIN:
        info = BUILTIN[base]
        return info.model_copy(update={"description": f"{info.description}, output {index}"})
    return None


def fidelity_metrics(reference: tuple[np.ndarray, ...], outputs: tuple[np.ndarray, ...]) -> dict[str, float]:
    """cosine / sqnr_db / max_abs / top1_agreement of ``outputs`` against ``reference`` (see module doc)."""
    per = compare_outputs(list(reference), list(outputs))
    out: dict[str, float] = {
        "cosine": min(t.cosine for t in per),
        "sqnr_db": min(t.sqnr_db for t in per),
        "max_abs": _finite(max(t.max_abs for t in per)),
    }
    agreements = [t.top1_agreement for t in per if t.top1_agreement is not None]
    if agreements:
        out["top1_agreement"] = min(agreements)
    if len(per) > 1:
        for j, t in enumerate(per):
            out[f"cosine_{j}"] = t.cosine
            out[f"sqnr_db_{j}"] = t.sqnr_db
            out[f"max_abs_{j}"] = _finite(t.max_abs)
            if t.top1_agreement is not None:
                out[f"top1_agreement_{j}"] = t.top1_agreement
    return out


def _finite(x: float) -> float:
    return x if math.isfinite(x) else 1e300


# --------------------------------------------------------------------------------------------------------
# user evaluators

Evaluator = Callable[[list[np.ndarray], EvalData], Mapping[str, Any]]


def load_evaluator(spec: str) -> Evaluator:
    """``module:function`` (importable) or ``path/to/file.py:function``; EvaluatorError if it is not."""
    module_name, sep, func_name = spec.rpartition(":")
    if not sep or not module_name or not func_name:
        raise EvaluatorError(f"--evaluator {spec!r} must be 'module:function' or 'path/to/file.py:function'")
    try:
        if module_name.endswith(".py"):
            path = Path(module_name)
            if not path.is_file():
                raise EvaluatorError(f"--evaluator {spec!r}: file {module_name!r} does not exist")  # noqa: TRY301
            name = f"edgefleet_evaluator_{abs(hash(path.resolve()))}"
            loader_spec = importlib.util.spec_from_file_location(name, path)
            if loader_spec is None or loader_spec.loader is None:
                raise EvaluatorError(f"--evaluator {spec!r}: cannot load {module_name!r} as Python")  # noqa: TRY301
            module = importlib.util.module_from_spec(loader_spec)
            sys.modules[name] = module
            loader_spec.loader.exec_module(module)
        else:
            module = importlib.import_module(module_name)
    except EvaluatorError:
        raise
    except Exception as err:  # any import-time failure of user code
        raise EvaluatorError(
            f"--evaluator {spec!r}: cannot import {module_name!r} ({type(err).__name__}: {err}); "
            "check the module is on PYTHONPATH or give a path to a .py file"
        ) from err
    func = getattr(module, func_name, None)
    if not callable(func):
        raise EvaluatorError(f"--evaluator {spec!r}: {module_name!r} has no function {func_name!r}")
    return func


def run_evaluator(
    evaluator: Evaluator, predictions: tuple[np.ndarray, ...], data: EvalData, variant: str
) -> dict[str, Metric]:
    """Call the user's evaluator on one variant's predictions; check what it returns."""
    name = getattr(evaluator, "__name__", "evaluator")
    try:
        raw = evaluator([p.copy() for p in predictions], data)
    except Exception as err:  # user code
        raise EvaluatorError(
            f"evaluator {name} raised on variant {variant}: {type(err).__name__}: {err}; fix the evaluator "
            "or drop --evaluator"
        ) from err
    if not isinstance(raw, Mapping) or not raw:
        raise EvaluatorError(
            f"evaluator {name} returned {type(raw).__name__}; it must return a non-empty dict of "
            "name -> Metric(value, 'higher'|'lower')"
        )
    out: dict[str, Metric] = {}
    for key, item in raw.items():
        if not isinstance(key, str) or not _METRIC_RE.fullmatch(key):
            raise EvaluatorError(f"evaluator {name}: metric name {key!r} must match {METRIC_PATTERN}")
        if key in BUILTIN or builtin_info(key) is not None:
            raise EvaluatorError(f"evaluator {name}: metric name {key!r} is built in; choose another name")
        if not (isinstance(item, tuple) and len(item) == 2 and item[1] in ("higher", "lower")):
            raise EvaluatorError(
                f"evaluator {name}: metric {key!r} is {item!r}; give Metric(value, 'higher'|'lower') or a "
                "(value, direction) tuple — the direction is needed to rank and limit on it"
            )
        try:
            value = float(item[0])
        except (TypeError, ValueError) as err:
            raise EvaluatorError(
                f"evaluator {name}: metric {key!r} value {item[0]!r} is not a number"
            ) from err
        if not math.isfinite(value):
            raise EvaluatorError(f"evaluator {name}: metric {key!r} is {value} on variant {variant}")
        out[key] = Metric(value, item[1])
    return out
