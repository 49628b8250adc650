"""Evaluate a variant as the .tflite file itself, with ai-edge-litert's interpreter, on held-out data.

Integer inputs are quantized as ``q = clip(round(x / scale + zero_point), qmin, qmax)`` and integer
outputs dequantized as ``(q - zero_point) * scale``; the argmax of the output is the prediction.
Latency is host latency with one thread: warm-up runs discarded, then runs until ``latency_budget_s``
or ``max_runs``, whichever first (at least ``min_runs``); the median is reported.
"""

from __future__ import annotations

import gzip
import time
from dataclasses import dataclass
from typing import Any

import numpy as np

from agent.wire import QuantParams, TensorSpec
from compressor.errors import EvaluationError

_DTYPES = {"float32", "float16", "int8", "uint8", "int16", "int32", "int64", "bool"}


@dataclass(frozen=True, slots=True)
class Evaluation:
    accuracy: float
    predictions: np.ndarray  # (N,) int64 argmax per sample
    eval_samples: int
    inputs: list[TensorSpec]
    outputs: list[TensorSpec]
    latency_ms_p50: float
    latency_runs: int
    size_bytes: int
    gzip_bytes: int


def load_interpreter(data: bytes, *, threads: int = 1) -> Any:
    """An allocated ai-edge-litert Interpreter for ``data``; a load failure is an EvaluationError."""
    from ai_edge_litert.interpreter import Interpreter

    try:
        interpreter = Interpreter(model_content=data, num_threads=threads)
        interpreter.allocate_tensors()
    except (ValueError, RuntimeError) as err:
        raise EvaluationError(f"the interpreter cannot load this .tflite: {err}") from err
    return interpreter


def tensor_spec(detail: dict[str, Any]) -> TensorSpec:
    """A wire TensorSpec from one entry of ``get_input_details()`` / ``get_output_details()``."""
    dtype = np.dtype(detail["dtype"]).name
    if dtype not in _DTYPES:
        raise EvaluationError(f"tensor {detail['name']!r} has dtype {dtype}, which the wire contract lacks")
    qp = detail.get("quantization_parameters") or {}
    scales = [float(s) for s in np.asarray(qp.get("scales", []), dtype=np.float64).reshape(-1)]
    zero_points = [int(z) for z in np.asarray(qp.get("zero_points", []), dtype=np.int64).reshape(-1)]
    quant = QuantParams(scale=scales, zero_point=zero_points) if scales else None
    return TensorSpec(
        name=str(detail["name"])[:256],
        shape=[int(d) for d in detail["shape"]],
        dtype=dtype,  # checked against the wire literal above
        quantization=quant,
    )


def quantize_input(x: np.ndarray, spec: TensorSpec) -> np.ndarray:
    """Bring float inputs to the dtype (and quantization) a model input expects."""
    dtype = np.dtype(spec.dtype)
    if dtype.kind == "f":
        return np.ascontiguousarray(x, dtype=dtype)
    if spec.quantization is None or not spec.quantization.scale:
        raise EvaluationError(f"input {spec.name!r} is {spec.dtype} without quantization parameters")
    scale = spec.quantization.scale[0]
    zero_point = spec.quantization.zero_point[0] if spec.quantization.zero_point else 0
    info = np.iinfo(dtype)
    q = np.clip(np.round(x.astype(np.float64) / scale + zero_point), info.min, info.max)
    return np.ascontiguousarray(q, dtype=dtype)


def dequantize_output(q: np.ndarray, spec: TensorSpec) -> np.ndarray:
    if np.dtype(spec.dtype).kind == "f" or spec.quantization is None or not spec.quantization.scale:
        return q.astype(np.float32)
    zero_point = spec.quantization.zero_point[0] if spec.quantization.zero_point else 0
    return ((q.astype(np.float32) - zero_point) * spec.quantization.scale[0]).astype(np.float32)


def agreement(a: np.ndarray, b: np.ndarray) -> float:
    """Fraction of samples with the same top-1 prediction."""
    if len(a) != len(b) or len(a) == 0:
        raise EvaluationError(f"cannot compare {len(a)} predictions with {len(b)}")
    return float(np.mean(a == b))


def evaluate_tflite(
    data: bytes,
    x: np.ndarray,
    y: np.ndarray,
    *,
    latency_budget_s: float = 0.5,
    max_runs: int = 300,
    min_runs: int = 20,
    warmup_runs: int = 10,
) -> Evaluation:
    """Accuracy on (x, y) one sample at a time, tensor specs, size, gzip size and host p50 latency."""
    interpreter = load_interpreter(data, threads=1)
    in_details = interpreter.get_input_details()
    out_details = interpreter.get_output_details()
    if len(in_details) != 1 or len(out_details) != 1:
        raise EvaluationError(
            f"expected one input and one output, got {len(in_details)} and {len(out_details)}"
        )
    in_spec, out_spec = tensor_spec(in_details[0]), tensor_spec(out_details[0])
    in_index, out_index = in_details[0]["index"], out_details[0]["index"]
    batch = in_spec.shape[0] if in_spec.shape else 1
    if batch != 1:
        raise EvaluationError(f"expected a batch-1 input, got shape {in_spec.shape}")
    if tuple(in_spec.shape[1:]) != tuple(x.shape[1:]):
        raise EvaluationError(f"model input shape {in_spec.shape} does not fit data of shape {x.shape}")

    xq = quantize_input(x, in_spec)
    predictions = np.empty(len(x), dtype=np.int64)
    try:
        for i in range(len(xq)):
            interpreter.set_tensor(in_index, xq[i : i + 1])
            interpreter.invoke()
            out = dequantize_output(interpreter.get_tensor(out_index), out_spec)
            predictions[i] = int(np.argmax(out.reshape(-1)))

        sample = xq[:1]
        for _ in range(warmup_runs):
            interpreter.set_tensor(in_index, sample)
            interpreter.invoke()
        times: list[float] = []
        deadline = time.perf_counter() + latency_budget_s
        while len(times) < max_runs and (len(times) < min_runs or time.perf_counter() < deadline):
            interpreter.set_tensor(in_index, sample)
            start = time.perf_counter()
            interpreter.invoke()
            times.append(time.perf_counter() - start)
    except (ValueError, RuntimeError) as err:
        raise EvaluationError(f"the interpreter failed while running the model: {err}") from err

    return Evaluation(
        accuracy=float(np.mean(predictions == y)),
        predictions=predictions,
        eval_samples=len(y),
        inputs=[in_spec],
        outputs=[out_spec],
        latency_ms_p50=float(np.median(times) * 1000.0),
        latency_runs=len(times),
        size_bytes=len(data),
        gzip_bytes=len(gzip.compress(data, compresslevel=9, mtime=0)),
    )
