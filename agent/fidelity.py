"""Output fidelity: how closely one set of model outputs reproduces a reference set.

Shared by both sides of the wire (numpy only, no TensorFlow): the compressor measures every variant's
outputs against the float32 reference on held-out rows, and the agent measures its own outputs on a
variant's sample against the host's outputs of the same file (``ref_*`` in the sample). Same formulas,
one implementation.

* SQNR (dB): ``10·log10(Σ ref² / Σ (ref − out)²)`` over every element of an output tensor; identical
  outputs give :data:`agent.wire.MAX_SQNR_DB` (JSON has no infinity), an all-zero reference with a
  non-zero error gives ``-MAX_SQNR_DB``.
* cosine: between the flattened reference and output of each row, averaged over rows (an all-zero
  pair counts as 1, one zero vector against a non-zero one as 0); an output of one value per row is
  compared as one vector over all rows.
* max_abs: the largest absolute element difference.
* top-1 agreement: where an output is a class vector (one axis of length ≥ 2 besides the batch), the
  fraction of rows whose argmax agrees.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from agent.wire import OutputFidelity, OutputTolerance

# agent.wire.MAX_SQNR_DB, repeated so that the benchmark child imports numpy only, not pydantic
# (tests/test_wire.py checks the two agree).
MAX_SQNR_DB = 300.0


@dataclass(frozen=True, slots=True)
class TensorFidelity:
    """One output tensor compared over ``rows`` rows."""

    rows: int
    sqnr_db: float
    cosine: float
    max_abs: float
    top1_agreement: float | None


def sqnr_db(reference: np.ndarray, output: np.ndarray) -> float:
    ref = np.asarray(reference, dtype=np.float64)
    err = ref - np.asarray(output, dtype=np.float64)
    signal, noise = float(np.sum(ref * ref)), float(np.sum(err * err))
    if noise == 0.0:
        return MAX_SQNR_DB
    if signal == 0.0:
        return -MAX_SQNR_DB
    return float(np.clip(10.0 * math.log10(signal / noise), -MAX_SQNR_DB, MAX_SQNR_DB))


def row_cosine(reference: np.ndarray, output: np.ndarray) -> float:
    """Mean over rows (axis 0) of the cosine between the flattened reference and output rows.

    An output of one value per row (a face flag, a regression score) has no direction within a row: its
    row cosine would only say whether the sign agrees. It is compared as one vector over all rows."""
    ref = np.asarray(reference, dtype=np.float64).reshape(len(reference), -1)
    out = np.asarray(output, dtype=np.float64).reshape(len(output), -1)
    if ref.shape[1] == 1:
        ref, out = ref.reshape(1, -1), out.reshape(1, -1)
    if len(ref) == 0:
        return 1.0
    dot = np.sum(ref * out, axis=1)
    norms = np.linalg.norm(ref, axis=1) * np.linalg.norm(out, axis=1)
    both_zero = (np.linalg.norm(ref, axis=1) == 0) & (np.linalg.norm(out, axis=1) == 0)
    with np.errstate(invalid="ignore", divide="ignore"):
        cos = np.where(norms > 0, dot / np.where(norms > 0, norms, 1.0), 0.0)
    cos = np.where(both_zero, 1.0, cos)
    return float(np.clip(np.mean(cos), -1.0, 1.0))


def is_class_vector(shape: Sequence[int]) -> bool:
    """(batch, K) or (batch, 1, K) ...: exactly one non-batch axis longer than 1, and it is ≥ 2 long."""
    dims = [int(d) for d in shape[1:]]
    return sum(d > 1 for d in dims) == 1 and max(dims, default=0) >= 2


def top1(output: np.ndarray) -> np.ndarray:
    arr = np.asarray(output)
    return np.asarray(np.argmax(arr.reshape(len(arr), -1), axis=1))


def compare_tensor(reference: np.ndarray, output: np.ndarray) -> TensorFidelity:
    """Compare one output tensor over its rows (axis 0 is the row axis)."""
    ref = np.asarray(reference, dtype=np.float64)
    out = np.asarray(output, dtype=np.float64)
    if ref.shape != out.shape:
        raise ValueError(f"output shape {out.shape} does not match the reference shape {ref.shape}")
    if not np.all(np.isfinite(out)):
        return TensorFidelity(len(ref), -MAX_SQNR_DB, 0.0, math.inf, None)
    agreement = float(np.mean(top1(ref) == top1(out))) if is_class_vector(ref.shape) and len(ref) else None
    max_abs = float(np.max(np.abs(ref - out))) if ref.size else 0.0
    return TensorFidelity(len(ref), sqnr_db(ref, out), row_cosine(ref, out), max_abs, agreement)


def compare_outputs(references: Sequence[np.ndarray], outputs: Sequence[np.ndarray]) -> list[TensorFidelity]:
    """Compare every output tensor with its reference, in order."""
    if len(references) != len(outputs):
        raise ValueError(f"{len(outputs)} outputs against {len(references)} references")
    return [compare_tensor(r, o) for r, o in zip(references, outputs, strict=True)]


def worst(per_tensor: Sequence[TensorFidelity]) -> OutputFidelity:
    """The wire summary: the worst figure over every output tensor."""
    from agent.wire import OutputFidelity

    if not per_tensor:
        raise ValueError("no outputs to summarise")
    max_abs = max(t.max_abs for t in per_tensor)
    return OutputFidelity(
        rows=min(t.rows for t in per_tensor),
        cosine=min(t.cosine for t in per_tensor),
        sqnr_db=min(t.sqnr_db for t in per_tensor),
        max_abs=max_abs if math.isfinite(max_abs) else 1e300,
    )


def tolerance_violation(fid: OutputFidelity, tol: OutputTolerance) -> str | None:
    """Why ``fid`` falls outside ``tol`` (one sentence), or None when within."""
    problems = []
    if fid.cosine < tol.min_cosine - 1e-9:
        problems.append(f"cosine {fid.cosine:.4f} < {tol.min_cosine:g}")
    if tol.min_sqnr_db is not None and fid.sqnr_db < tol.min_sqnr_db - 1e-9:
        problems.append(f"SQNR {fid.sqnr_db:.1f} dB < {tol.min_sqnr_db:g} dB")
    if tol.max_abs is not None and fid.max_abs > tol.max_abs + 1e-12:
        problems.append(f"max abs error {fid.max_abs:.4g} > {tol.max_abs:g}")
    if not problems:
        return None
    return f"outputs on {fid.rows} sample rows depart from the host's: " + ", ".join(problems)


# --------------------------------------------------------------------------------------------------------
# The sample .npz layout (written by the compressor, read by the agent)


def sample_arrays(
    inputs: Sequence[np.ndarray], references: Sequence[np.ndarray], labels: np.ndarray | None = None
) -> dict[str, np.ndarray]:
    """Arrays of a variant's sample: ``x`` for a single input (schema-1 layout) or ``x_0, x_1, ...``;
    ``ref_0, ref_1, ...`` the host's float32 outputs; ``y`` the labels when there are any."""
    out: dict[str, np.ndarray] = {}
    if len(inputs) == 1:
        out["x"] = np.ascontiguousarray(inputs[0])
    else:
        out.update({f"x_{i}": np.ascontiguousarray(a) for i, a in enumerate(inputs)})
    out.update({f"ref_{j}": np.ascontiguousarray(r, dtype=np.float32) for j, r in enumerate(references)})
    if labels is not None:
        out["y"] = np.ascontiguousarray(labels)
    return out


def _indexed(sample: dict[str, np.ndarray], prefix: str) -> list[np.ndarray]:
    found: list[np.ndarray] = []
    while f"{prefix}_{len(found)}" in sample:
        found.append(sample[f"{prefix}_{len(found)}"])
    return found


def sample_inputs(sample: dict[str, np.ndarray]) -> list[np.ndarray] | None:
    """The input arrays of a sample, one per model input, or None when it has none."""
    if "x" in sample:
        return [sample["x"]]
    found = _indexed(sample, "x")
    return found or None


def sample_references(sample: dict[str, np.ndarray]) -> list[np.ndarray]:
    """The host's reference outputs of a sample, one per model output (empty for a schema-1 sample)."""
    return _indexed(sample, "ref")
