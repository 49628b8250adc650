"""compressor.gptq: int4 weights rounded against the layers' real inputs (GPTQ).

A small CNN (conv VALID stride 1, depthwise, conv stride 2, two dense) converted to float32 .tflite;
inputs are realistic image crops (scikit-learn's sample photos), since on white noise every input
direction weighs the same and GPTQ has nothing to exploit."""

from __future__ import annotations

import os
from typing import Any

import numpy as np
import pytest

from compressor import gptq
from compressor.evaluate import load_interpreter
from compressor.images import sample_images
from compressor.tflite_quant import _read_model, int4_weight_tensors, quantize_tflite, weight_layers

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def cnn() -> bytes:
    from compressor._tf import keras, tf

    k, t = keras(), tf()
    k.utils.set_random_seed(0)
    inp = k.Input((32, 32, 3), batch_size=1)
    x = k.layers.Conv2D(32, 3, activation="relu")(inp)
    x = k.layers.DepthwiseConv2D(3, activation="relu")(x)
    x = k.layers.Conv2D(64, 3, strides=2, padding="same", activation="relu")(x)
    x = k.layers.GlobalAveragePooling2D()(x)
    x = k.layers.Dense(128, activation="relu")(x)
    model = k.Model(inp, k.layers.Dense(10)(x))
    return bytes(t.lite.TFLiteConverter.from_keras_model(model).convert())


def _rows(n: int, seed: int) -> list[list[np.ndarray]]:
    return [[x[None]] for x in sample_images(n, 32, 32, 3, value_range=(-1.0, 1.0), seed=seed)]


def _conv_ops(data: bytes) -> list[tuple[Any, Any, str]]:
    """(op, options, scope) of every CONV_2D, with the model's tensors."""
    from compressor import tflite_quant as tq

    model = _read_model(data)
    tq._normalize_opcodes(model)
    names = tq._module("ai_edge_quantizer.utils.tfl_flatbuffer_utils")
    codes = tq._op_codes(model)
    sg = model.subgraphs[0]
    out = []
    for op in sg.operators:
        name = names.TFL_OP_CODE_TO_NAME.get(codes[op.opcodeIndex])  # DEQUANTIZE (6) is not in it
        if name is not None and str(name.value) == "CONV_2D":
            out.append((op, model, str(names.get_op_scope(op, sg.tensors))))
    return out


def test_im2col_reproduces_the_runtime_conv(cnn: bytes) -> None:
    """Patches @ weightsᵀ + bias = TFLite's own CONV_2D output (VALID stride 1 and SAME stride 2)."""
    from compressor import tflite_quant as tq

    it = load_interpreter(cnn, preserve_all_tensors=True)
    x = _rows(1, seed=3)[0][0]
    it.set_tensor(it.get_input_details()[0]["index"], x)
    it.invoke()
    checked = 0
    for op, model, _ in _conv_ops(cnn):
        sg = model.subgraphs[0]
        w = tq._tensor_array(model, sg.tensors[op.inputs[1]]).reshape(
            [int(d) for d in sg.tensors[op.inputs[1]].shape]
        )
        b = tq._tensor_array(model, sg.tensors[op.inputs[2]])
        cols = gptq._im2col(it.get_tensor(op.inputs[0]), w.shape, op.builtinOptions)
        ours = np.maximum(cols @ w.reshape(w.shape[0], -1).T + b, 0.0)  # fused ReLU
        theirs = it.get_tensor(op.outputs[0]).reshape(-1, w.shape[0])
        np.testing.assert_allclose(ours, theirs, rtol=1e-4, atol=1e-4)
        checked += 1
    assert checked == 2


def test_weights_on_the_int4_grid_survive_the_quantizer(cnn: bytes) -> None:
    """Every channel's levels are integers in -7..7 reaching ±7 (so ai-edge-quantizer's max|w|/7 scale
    is ours), and the int4 file's dequantized weights are exactly those values."""
    weights, notes = gptq.gptq_int4_weights(cnn, _rows(16, seed=1))
    assert len(weights) == 4 and "rounded by GPTQ" in notes[0], notes  # 2 CONV_2D + 2 FULLY_CONNECTED
    for arr in weights.values():
        rows = arr.reshape(arr.shape[0], -1).astype(np.float64)
        scale = np.abs(rows).max(axis=1, keepdims=True) / 7
        levels = rows / np.where(scale > 0, scale, 1)
        assert np.allclose(levels, np.rint(levels), atol=1e-4) and np.all(np.abs(levels) <= 7 + 1e-4)
    scope = next(s for s in weights if s in {w.scope for w in weight_layers(cnn)} and weights[s].ndim == 4)
    q, _ = quantize_tflite(cnn, "weight_only_int4", int4_scopes=[scope], int4_weights=weights)
    assert int4_weight_tensors(q) == 1
    it = load_interpreter(q, preserve_all_tensors=True)
    it.set_tensor(it.get_input_details()[0]["index"], _rows(1, seed=2)[0][0])
    it.invoke()
    op = next(op for op, _, s in _conv_ops(q) if s == scope)
    np.testing.assert_allclose(it.get_tensor(op.inputs[1]), weights[scope], rtol=1e-5, atol=1e-7)


def test_gptq_beats_nearest_rounding_on_held_out_inputs(cnn: bytes) -> None:
    """Layer output error on crops GPTQ never saw: below nearest rounding at the same scales."""
    from compressor import tflite_quant as tq

    weights, _ = gptq.gptq_int4_weights(cnn, _rows(32, seed=1))
    it = load_interpreter(cnn, preserve_all_tensors=True)
    held = _rows(8, seed=7)
    for op, model, scope in _conv_ops(cnn):
        if scope not in weights:
            continue
        sg = model.subgraphs[0]
        w = tq._tensor_array(model, sg.tensors[op.inputs[1]]).reshape(
            [int(d) for d in sg.tensors[op.inputs[1]].shape]
        )
        rows = w.reshape(w.shape[0], -1).astype(np.float64)
        scale = tq._least_error_clip(rows, 7) / 7
        nearest = np.clip(np.rint(rows / scale), -7, 7) * scale
        ours = weights[scope].reshape(rows.shape).astype(np.float64)
        err_ours = err_nearest = 0.0
        for row in held:
            it.set_tensor(it.get_input_details()[0]["index"], row[0])
            it.invoke()
            cols = gptq._im2col(it.get_tensor(op.inputs[0]), w.shape, op.builtinOptions).astype(np.float64)
            exact = cols @ rows.T
            err_ours += float(((cols @ ours.T - exact) ** 2).sum())
            err_nearest += float(((cols @ nearest.T - exact) ** 2).sum())
        assert err_ours < 0.8 * err_nearest, (scope, err_ours, err_nearest)


def test_rows_that_do_not_fit_are_refused(cnn: bytes) -> None:
    from compressor.errors import ConversionError

    with pytest.raises(ConversionError, match="shape"):
        gptq.gptq_int4_weights(cnn, [[np.zeros((1, 16, 16, 3), np.float32)]])
    assert gptq.gptq_int4_weights(cnn, []) == ({}, [])
