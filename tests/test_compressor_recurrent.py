"""Recurrent models (a Keras 3 LSTM converts to a WHILE loop with its weights in the body subgraph):
the compressor builds what applies and refuses the rest in one line each, never crashing the process
(TF 2.21's full-integer int8 calibrator dies with SIGSEGV on such a loop: measured, see
compressor.convert.quantize_keras)."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

pytestmark = pytest.mark.slow


def test_lstm_builds_what_applies_and_refuses_int8_in_one_line(tmp_path: Path) -> None:
    from compressor._tf import keras
    from compressor.convert import recurrent_layers
    from compressor.data import Dataset
    from compressor.graph import graph_stats
    from compressor.pipeline import build_bundle

    k = keras()
    k.utils.set_random_seed(0)
    inp = k.Input((12, 16))
    h = k.layers.Bidirectional(k.layers.LSTM(32, name="lstm"))(inp)
    model = k.Model(inp, k.layers.Dense(2, activation="softmax")(h))
    assert recurrent_layers(model) == ["LSTM 'backward_lstm'", "LSTM 'forward_lstm'"]
    rng = np.random.default_rng(0)
    x = rng.normal(size=(120, 12, 16)).astype(np.float32)
    y = (x[:, :, 0].mean(axis=1) > 0).astype(np.int64)
    data = Dataset.from_arrays(
        "seq", x[:80], y[:80], x[80:100], y[80:100], x[100:], y[100:], labels=("a", "b")
    )
    result = build_bundle(
        model, data, tmp_path / "b", variants=["float32", "dynint8", "int8"], latency_budget_s=0.05
    )
    built = {v.id: v for v in result.manifest.variants}
    assert set(built) == {"float32", "dynint8"}
    (failure,) = result.failures
    assert failure.variant == "int8" and failure.stage == "convert"
    assert "recurrent layers (LSTM 'backward_lstm', LSTM 'forward_lstm')" in failure.message
    # the weights in the loop bodies are counted, and dynamic int8 really quantized them
    dyn = (tmp_path / "b" / built["dynint8"].file).read_bytes()
    assert graph_stats(dyn).int8_weights
    assert built["float32"].metrics.params >= 2 * 4 * 32 * (16 + 32)  # TF leaves kernels < 1024 float


def test_failures_that_share_a_reason_share_a_line() -> None:
    from compressor.cli import failure_lines

    f = [
        SimpleNamespace(variant="int8", stage="convert", message="no"),
        SimpleNamespace(variant="prune50-int8", stage="transform", message="unsupported"),
        SimpleNamespace(variant="mag75-int8", stage="convert", message="no"),
    ]
    assert failure_lines(f) == [
        "variants int8, mag75-int8 not shipped (convert): no",
        "variant prune50-int8 not shipped (transform): unsupported",
    ]
