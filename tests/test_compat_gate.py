"""The runtime compatibility gate, proven against the real tflite-runtime 2.14 (numpy<2, own venv).

For each model the gate predicts "safe on tflite-runtime 2.14" from the file alone; the test then runs the
file on tflite-runtime 2.14 in its own virtual environment and on ai-edge-litert here, and requires the
prediction to equal what happened: safe ⇔ loads and gives the same outputs.
"""

from __future__ import annotations

import json
import os
import platform
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from compressor.compat import inspect_tflite, version_tuple

ROOT = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.slow


def tfl214_python() -> Path | None:
    configured = os.environ.get("EDGEFLEET_TFLITE_RUNTIME_214_PYTHON")
    candidate = Path(configured) if configured else ROOT / ".venv-tfl214" / "bin" / "python"
    return candidate if candidate.exists() else None


# tflite-runtime 2.14 has wheels for CPython 3.11 on x86_64/aarch64/armv7l only.
HAS_WHEEL = sys.version_info[:2] == (3, 11) and platform.machine() in ("x86_64", "aarch64", "armv7l")


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import keras
    import tensorflow as tf

    keras.utils.set_random_seed(0)
    model = keras.Sequential(
        [
            keras.Input((28, 28, 1), batch_size=1),
            keras.layers.Conv2D(8, 3, activation="relu"),
            keras.layers.MaxPooling2D(),
            keras.layers.Flatten(),
            keras.layers.Dense(16, activation="relu"),
            keras.layers.Dense(10, activation="softmax"),
        ]
    )
    rng = np.random.default_rng(0)

    def representative():  # type: ignore[no-untyped-def]
        for _ in range(32):
            yield [rng.random((1, 28, 28, 1), dtype=np.float32)]

    def convert(**settings: object) -> bytes:
        converter = tf.lite.TFLiteConverter.from_keras_model(model)
        for name, value in settings.items():
            if name == "supported_types":
                converter.target_spec.supported_types = value
            elif name == "int8_io":
                converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
                converter.inference_input_type = tf.int8
                converter.inference_output_type = tf.int8
            else:
                setattr(converter, name, value)
        return bytes(converter.convert())

    dynamic = convert(optimizations=[tf.lite.Optimize.DEFAULT])
    files = {
        "float32": convert(),
        "float16": convert(optimizations=[tf.lite.Optimize.DEFAULT], supported_types=[tf.float16]),
        "dynamic_per_channel": dynamic,
        "dynamic_per_tensor": convert(
            optimizations=[tf.lite.Optimize.DEFAULT],
            _experimental_disable_per_channel_quantization_for_dense_layers=True,
        ),
        "int8": convert(
            optimizations=[tf.lite.Optimize.DEFAULT], representative_dataset=representative, int8_io=True
        ),
        # What some quantizers emit: hybrid per-channel FULLY_CONNECTED with op versions left at 1.
        "hybrid_v1": downgrade_op_versions(dynamic),
    }
    out = tmp_path_factory.mktemp("compat")
    paths = {}
    for name, data in files.items():
        paths[name] = out / f"{name}.tflite"
        paths[name].write_bytes(data)
    return paths


def downgrade_op_versions(data: bytes) -> bytes:
    """Rewrite every operator version to 1 and min_runtime_version to 1.5.0, in place in the flatbuffer."""
    import flatbuffers
    import tflite

    buf = bytearray(data)
    model = tflite.Model.GetRootAsModel(buf, 0)
    for i in range(model.OperatorCodesLength()):
        code = model.OperatorCodes(i)
        field = flatbuffers.number_types.UOffsetTFlags.py_type(code._tab.Offset(8))  # version
        if field:
            struct.pack_into("<i", buf, code._tab.Pos + field, 1)
    for i in range(model.MetadataLength()):
        entry = model.Metadata(i)
        if entry.Name() == b"min_runtime_version":
            buffer = model.Buffers(entry.Buffer())
            start, length = buffer._tab.Vector(buffer._tab.Offset(4)), buffer.DataLength()
            buf[start : start + length] = b"1.5.0".ljust(length, b"\0")
    return bytes(buf)


# Runs in either interpreter: tflite-runtime 2.14 in its own venv, ai-edge-litert here (the reference).
RUNNER = r"""
import json, sys, numpy as np
if sys.argv[1] == "tflite_runtime":
    from tflite_runtime.interpreter import Interpreter
else:
    from ai_edge_litert.interpreter import Interpreter
out = {}
for path in sys.argv[2:]:
    try:
        it = Interpreter(model_path=path)
        it.allocate_tensors()
        d = it.get_input_details()[0]
        x = np.random.RandomState(0).rand(*d["shape"]).astype(np.float32)
        if d["dtype"] == np.int8:
            s, z = d["quantization"]
            x = np.clip(np.round(x / s + z), -128, 127).astype(np.int8)
        it.set_tensor(d["index"], x)
        it.invoke()
        o = it.get_output_details()[0]
        y = it.get_tensor(o["index"]).astype(np.float64)
        if o["dtype"] == np.int8:
            s, z = o["quantization"]
            y = (y - z) * s
        out[path] = {"ok": True, "y": y.ravel().tolist()}
    except Exception as e:
        out[path] = {"ok": False, "error": str(e)[:300]}
print(json.dumps(out))
"""


def run_models(python: str | Path, runtime: str, paths: list[Path]) -> dict[str, dict[str, object]]:
    proc = subprocess.run(
        [str(python), "-c", RUNNER, runtime, *map(str, paths)],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    return json.loads(proc.stdout)  # type: ignore[no-any-return]


def test_gate_reads_versions_without_tensorflow(models: dict[str, Path]) -> None:
    report = inspect_tflite(models["dynamic_per_channel"].read_bytes())
    fc = [op for op in report.ops if op.name == "FULLY_CONNECTED"]
    assert fc and max(op.version for op in fc) >= 12
    assert version_tuple(report.min_runtime) > version_tuple("2.14.0")
    assert inspect_tflite(models["float32"].read_bytes()).safe_on_oldest
    assert inspect_tflite(models["int8"].read_bytes()).safe_on_oldest
    hybrid = inspect_tflite(models["hybrid_v1"].read_bytes())
    assert hybrid.metadata_min_runtime == "1.5.0"  # the metadata lies ...
    assert not hybrid.safe_on_oldest  # ... the gate does not
    assert any("per-channel" in f for f in hybrid.findings)


@pytest.mark.skipif(not HAS_WHEEL, reason="tflite-runtime 2.14 has wheels only for CPython 3.11")
def test_gate_predicts_exactly_what_tflite_runtime_214_does(models: dict[str, Path]) -> None:
    python = tfl214_python()
    assert python is not None, "tflite-runtime 2.14 venv missing: scripts/setup.sh test creates .venv-tfl214"
    paths = list(models.values())
    on_214 = run_models(python, "tflite_runtime", paths)
    reference = run_models(sys.executable, "ai_edge_litert", paths)
    verdicts = {}
    for name, path in models.items():
        got = on_214[str(path)]
        ref = reference[str(path)]
        assert ref["ok"], f"ai-edge-litert cannot run {name}: {ref}"
        correct = got["ok"] and np.allclose(np.array(got["y"]), np.array(ref["y"]), atol=0.02)
        verdicts[name] = (inspect_tflite(path.read_bytes()).safe_on_oldest, bool(correct))
    mismatched = {n: v for n, v in verdicts.items() if v[0] != v[1]}
    assert not mismatched, f"gate (predicted, actual) disagree: {mismatched}; all: {verdicts}"
    # The interesting cases really are interesting: one refused at load, one silently wrong.
    assert not on_214[str(models["dynamic_per_channel"])]["ok"]
    assert on_214[str(models["hybrid_v1"])]["ok"] and not verdicts["hybrid_v1"][1]
