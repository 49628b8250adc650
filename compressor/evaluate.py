"""Evaluate a variant as the .tflite file itself, with ai-edge-litert's interpreter, on held-out data.

Integer inputs are quantized as ``q = clip(round(x / scale + zero_point), qmin, qmax)`` and integer
outputs dequantized as ``(q - zero_point) * scale``; the argmax of the output is the prediction.
Latency is host latency with one thread: warm-up runs discarded, then runs until ``latency_budget_s``
or ``max_runs``, whichever first (at least ``min_runs``); the median is reported.
"""

from __future__ import annotations

import gzip
import re
import time
from dataclasses import dataclass
from typing import Any

import numpy as np

from agent.wire import QuantParams, TensorSpec
from compressor.data import Rows
from compressor.errors import EvaluationError

_DTYPES = {"float32", "float16", "int8", "uint8", "int16", "int32", "int64", "bool"}


@dataclass(frozen=True, slots=True)
class Evaluation:
    """One variant run on the held-out rows.

    ``outputs`` are every output tensor over every row, dequantized to float32, in the model's logical
    output order (the Keras model's, or the file's own for a .tflite input), so that variants converted
    separately compare output by output. ``inputs``/``outputs`` specs are in the file's order (the order
    a device feeds and reads); ``input_order[k]`` is the logical input behind the file's input k and
    ``output_order[j]`` the file's position of logical output j.
    """

    accuracy: float | None
    predictions: np.ndarray | None  # (N,) top-1 of output 0 when the task is classification
    eval_samples: int
    inputs: list[TensorSpec]
    outputs: list[TensorSpec]
    latency_ms_p50: float
    latency_runs: int
    size_bytes: int
    gzip_bytes: int
    output_values: tuple[np.ndarray, ...] = ()
    input_order: tuple[int, ...] = ()
    output_order: tuple[int, ...] = ()


def load_interpreter(data: bytes, *, threads: int = 1, preserve_all_tensors: bool = False) -> Any:
    """An allocated ai-edge-litert Interpreter for ``data``; a load failure is an EvaluationError.
    ``preserve_all_tensors``: every intermediate tensor stays readable after ``invoke`` (TFLite's own
    kernels, no XNNPACK: a delegate keeps its intermediates to itself)."""
    import warnings

    from ai_edge_litert.interpreter import Interpreter, OpResolverType

    kwargs: dict[str, Any] = {}
    if preserve_all_tensors:
        kwargs = {
            "experimental_preserve_all_tensors": True,
            "experimental_op_resolver_type": OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES,
        }
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # "intended for debugging": it is what we want
            interpreter = Interpreter(model_content=data, num_threads=threads, **kwargs)
        interpreter.allocate_tensors()
    except (ValueError, RuntimeError) as err:
        raise EvaluationError(f"the interpreter cannot load this .tflite: {err}") from err
    return interpreter


def tensor_spec(detail: dict[str, Any]) -> TensorSpec:
    """A wire TensorSpec from one entry of ``get_input_details()`` / ``get_output_details()``."""
    dtype = np.dtype(detail["dtype"]).name
    if dtype not in _DTYPES:
        raise EvaluationError(f"tensor {detail['name']!r} has dtype {dtype}, which the wire contract lacks")
    sig = detail.get("shape_signature")
    shape = sig if sig is not None and len(sig) == len(detail["shape"]) else detail["shape"]
    qp = detail.get("quantization_parameters") or {}
    scales = [float(s) for s in np.asarray(qp.get("scales", []), dtype=np.float64).reshape(-1)]
    zero_points = [int(z) for z in np.asarray(qp.get("zero_points", []), dtype=np.int64).reshape(-1)]
    quant = QuantParams(scale=scales, zero_point=zero_points) if scales else None
    return TensorSpec(
        name=str(detail["name"])[:256],
        shape=[int(d) for d in shape],  # -1 where the dimension is free (a sequence length, ...)
        dtype=dtype,  # checked against the wire literal above
        quantization=quant,
    )


def quantize_input(x: np.ndarray, spec: TensorSpec) -> np.ndarray:
    """Bring float inputs to the dtype (and quantization) a model input expects."""
    dtype = np.dtype(spec.dtype)
    if dtype.kind == "f":
        return np.ascontiguousarray(x, dtype=dtype)
    if spec.quantization is None or not spec.quantization.scale or not spec.quantization.scale[0]:
        if np.asarray(x).dtype.kind in "iub":  # an integer input (token ids, uint8 pixels): as it is
            return np.ascontiguousarray(x, dtype=dtype)
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


_IN_NAME = re.compile(r"(?:^|_)ef_in_(\d+)(?::\d+)?$")
_OUT_NAME = re.compile(r"^output_(\d+)$")


def signature_map(interpreter: Any) -> dict[str, Any]:
    """The file's signatures: key → {"inputs": {name: tensor index}, "outputs": {...}}; {} without any."""
    try:
        return dict(interpreter._get_full_signature_list() or {})
    except (AttributeError, RuntimeError, ValueError):
        return {}


def io_order(interpreter: Any) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """(logical input of each file input, file position of each logical output).

    A Keras model converted by :func:`compressor.convert.batch1_model` names its inputs ``ef_in_<i>``,
    and the converter's signature names its outputs ``output_<j>`` in the Keras order, while the file may
    order both differently (measured: two inputs and two outputs come out reversed). Outputs of any file
    whose signature names them ``output_<j>`` follow that order; inputs not named ``ef_in_<i>``, and
    outputs of a file without such a signature, keep the file's own order.
    """
    in_details = interpreter.get_input_details()
    out_details = interpreter.get_output_details()
    identity_in = tuple(range(len(in_details)))
    identity_out = tuple(range(len(out_details)))
    signatures = signature_map(interpreter)
    if len(signatures) != 1:
        return identity_in, identity_out
    sig = next(iter(signatures.values()))
    in_order = list(identity_in)
    names = {int(t): n for n, t in sig.get("inputs", {}).items()}
    matched = {k: _IN_NAME.search(names.get(int(d["index"]), "")) for k, d in enumerate(in_details)}
    if all(matched.values()) and sorted(int(m.group(1)) for m in matched.values() if m) == list(identity_in):
        in_order = [int(m.group(1)) for _, m in sorted(matched.items()) if m]
    out_pos = {int(d["index"]): k for k, d in enumerate(out_details)}
    outs = sig.get("outputs", {})
    by_logical: dict[int, int] = {}
    for name, tensor in outs.items():
        m = _OUT_NAME.match(name)
        if m and int(tensor) in out_pos:
            by_logical[int(m.group(1))] = out_pos[int(tensor)]
    out_order = identity_out
    if sorted(by_logical) == list(identity_out) and len(set(by_logical.values())) == len(identity_out):
        out_order = tuple(by_logical[j] for j in identity_out)
    return tuple(in_order), out_order


def evaluate_tflite(
    data: bytes,
    rows: Rows,
    *,
    classification: bool | None = None,
    latency_budget_s: float = 0.5,
    max_runs: int = 300,
    min_runs: int = 20,
    warmup_runs: int = 10,
) -> Evaluation:
    """Every output on every held-out row (one row at a time), accuracy when ``rows`` has labels, tensor
    specs, size, gzip size and host p50 latency (1 thread)."""
    interpreter = load_interpreter(data, threads=1)
    in_details = interpreter.get_input_details()
    out_details = interpreter.get_output_details()
    if len(in_details) != len(rows.inputs):
        raise EvaluationError(f"the file has {len(in_details)} inputs but the data {len(rows.inputs)}")
    in_specs = [tensor_spec(d) for d in in_details]
    out_specs = [tensor_spec(d) for d in out_details]
    in_order, out_order = io_order(interpreter)
    fed: list[np.ndarray] = []
    for k, (d, spec) in enumerate(zip(in_details, in_specs, strict=True)):
        x = rows.inputs[in_order[k]]
        if spec.shape and spec.shape[0] not in (1, -1):
            raise EvaluationError(f"expected a batch-1 input, got shape {spec.shape} for {spec.name!r}")
        if tuple(spec.shape[1:]) != tuple(x.shape[1:]) or spec.shape[:1] != [1]:
            interpreter.resize_tensor_input(d["index"], [1, *x.shape[1:]])
        fed.append(quantize_input(x, spec))
    if any(list(s.shape) != [1, *f.shape[1:]] for s, f in zip(in_specs, fed, strict=True)):
        try:
            interpreter.allocate_tensors()
        except (ValueError, RuntimeError) as err:
            raise EvaluationError(f"the model does not accept inputs of the data's shape: {err}") from err
    n = len(rows)
    out_details = interpreter.get_output_details()  # free output dimensions follow the resized inputs
    results: list[np.ndarray] = [
        np.empty((n, *(int(v) for v in d["shape"][1:])), dtype=np.float32) for d in out_details
    ]

    def feed(i: int) -> None:
        for d, arr in zip(in_details, fed, strict=True):
            interpreter.set_tensor(d["index"], arr[i : i + 1])

    try:
        for i in range(n):
            feed(i)
            interpreter.invoke()
            for j, (d, spec) in enumerate(zip(out_details, out_specs, strict=True)):
                out = dequantize_output(interpreter.get_tensor(d["index"]), spec)
                if out.shape[1:] != results[j].shape[1:]:
                    raise EvaluationError(f"output {spec.name!r} changes shape between rows: {out.shape}")
                results[j][i] = out[0]
        for _ in range(warmup_runs):
            feed(0)
            interpreter.invoke()
        times: list[float] = []
        deadline = time.perf_counter() + latency_budget_s
        while len(times) < max_runs and (len(times) < min_runs or time.perf_counter() < deadline):
            feed(0)
            start = time.perf_counter()
            interpreter.invoke()
            times.append(time.perf_counter() - start)
    except (ValueError, RuntimeError) as err:
        raise EvaluationError(f"the interpreter failed while running the model: {err}") from err

    logical = tuple(results[out_order[j]] for j in range(len(results)))
    labelled = rows.y is not None if classification is None else classification and rows.y is not None
    predictions = accuracy = None
    if labelled:
        assert rows.y is not None
        predictions = np.argmax(logical[0].reshape(n, -1), axis=1).astype(np.int64)
        accuracy = float(np.mean(predictions == rows.y))
    return Evaluation(
        accuracy=accuracy,
        predictions=predictions,
        eval_samples=n,
        inputs=in_specs,
        outputs=out_specs,
        latency_ms_p50=float(np.median(times) * 1000.0),
        latency_runs=len(times),
        size_bytes=len(data),
        gzip_bytes=len(gzip.compress(data, compresslevel=9, mtime=0)),
        output_values=logical,
        input_order=tuple(in_order),
        output_order=tuple(out_order),
    )
