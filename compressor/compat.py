"""Runtime compatibility gate: read a .tflite file (no TensorFlow) and decide which runtimes run it right.

The converter records ``min_runtime_version`` metadata computed from each operator's version; a runtime
older than that refuses to load the file (e.g. TF 2.21's dynamic-range FULLY_CONNECTED is version 12,
``min_runtime_version`` 2.17.0, and tflite-runtime 2.14 fails at ``Interpreter()``). Worse, some files
load on tflite-runtime 2.14 and compute garbage with no error (FACTS.md): int4 weights, hybrid
FULLY_CONNECTED with per-channel weight scales, custom ops and resource-variable ops. For those the
metadata is no guide, so the gate raises the oldest safe runtime above 2.14 and says why.

Versions are TensorFlow-Lite versions (``2.14.0``); the agent maps its runtime (tflite-runtime,
ai-edge-litert, tensorflow) onto that scale before comparing.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from agent.wire import TensorSpec, version_tuple
from compressor.errors import EvaluationError

# The oldest runtime edgefleet ships to: tflite-runtime 2.14 (armv7l boards, frozen since Oct 2023).
OLDEST_SHIPPED_RUNTIME = "2.14.0"
# First version after the oldest shipped one; used when a file is known to misbehave on 2.14 but the
# exact first good release is not established.
AFTER_OLDEST = "2.15.0"
_RESOURCE_OPS = {"VAR_HANDLE", "READ_VARIABLE", "ASSIGN_VARIABLE", "CALL_ONCE"}


@dataclass(frozen=True, slots=True)
class OpInfo:
    name: str
    version: int
    custom_code: str | None = None


@dataclass(frozen=True, slots=True)
class CompatReport:
    """What the file needs. ``min_runtime`` is the oldest TFLite version it is safe on."""

    ops: tuple[OpInfo, ...]
    metadata_min_runtime: str | None
    min_runtime: str
    findings: tuple[str, ...] = field(default=())
    tensor_types: tuple[str, ...] = field(default=())

    @property
    def safe_on_oldest(self) -> bool:
        """True when tflite-runtime 2.14 loads this file and computes the right outputs."""
        return version_tuple(self.min_runtime) <= version_tuple(OLDEST_SHIPPED_RUNTIME)

    def safe_on(self, runtime_version: str) -> bool:
        return version_tuple(self.min_runtime) <= version_tuple(runtime_version)


def _max_version(a: str, b: str) -> str:
    return a if version_tuple(a) >= version_tuple(b) else b


def tensor_name(tensor: Any, index: int) -> str:
    """A tensor's name, or ``tensor #index`` when it has none (shipped variants drop the names of
    intermediate tensors: compressor.tflite_quant.strip_tensor_names)."""
    raw = tensor.Name()
    return raw.decode(errors="replace") if raw else f"tensor #{index}"


def inspect_tflite(data: bytes) -> CompatReport:
    """Parse ``data`` with the ``tflite`` flatbuffer package and apply the gate's rules."""
    try:
        import tflite  # the flatbuffer schema only; no TensorFlow
    except ImportError as err:  # pragma: no cover - part of the [host] extra
        raise EvaluationError(
            "the compatibility gate needs the `tflite` package (pip install tflite)"
        ) from err
    try:
        model = tflite.Model.GetRootAsModel(data, 0)
        op_names = {v: k for k, v in vars(tflite.BuiltinOperator).items() if not k.startswith("_")}
        type_names = {v: k for k, v in vars(tflite.TensorType).items() if not k.startswith("_")}
        ops = []
        for i in range(model.OperatorCodesLength()):
            oc = model.OperatorCodes(i)
            # Codes above 127 live in builtin_code; older files only fill deprecated_builtin_code.
            code = max(oc.BuiltinCode(), oc.DeprecatedBuiltinCode())
            custom = oc.CustomCode()
            ops.append(
                OpInfo(op_names.get(code, f"OP_{code}"), oc.Version(), custom.decode() if custom else None)
            )
        metadata = _metadata(model)
        findings: list[str] = []
        tensor_types: set[str] = set()
        for s in range(model.SubgraphsLength()):
            graph = model.Subgraphs(s)
            tensor_types.update(
                type_names.get(graph.Tensors(t).Type(), "?") for t in range(graph.TensorsLength())
            )
            findings.extend(_hybrid_per_channel_fc(model, graph, ops, type_names))
    except EvaluationError:
        raise
    except Exception as err:  # the flatbuffer reader raises assorted errors on garbage input
        raise EvaluationError(f"not a readable .tflite flatbuffer: {err}") from err

    raw_min = metadata.get("min_runtime_version")
    metadata_min = raw_min.split(b"\0", 1)[0].decode("ascii", "replace").strip() if raw_min else None
    min_runtime = metadata_min or "1.0.0"
    if metadata_min and version_tuple(metadata_min) > version_tuple(OLDEST_SHIPPED_RUNTIME):
        findings.append(
            f"min_runtime_version {metadata_min}: operator versions newer than tflite-runtime "
            f"{OLDEST_SHIPPED_RUNTIME} supports (it refuses to load the file)"
        )
    if "INT4" in tensor_types:
        findings.append("int4 tensors: tflite-runtime 2.14 may load them and compute garbage")
    for op in ops:
        if op.custom_code is not None:
            findings.append(f"custom op {op.custom_code}: needs a runtime built with it")
        elif op.name in _RESOURCE_OPS:
            findings.append(f"resource-variable op {op.name}: not reliable on tflite-runtime 2.14")
    if findings:
        min_runtime = _max_version(min_runtime, AFTER_OLDEST)
    return CompatReport(
        ops=tuple(ops),
        metadata_min_runtime=metadata_min,
        min_runtime=min_runtime,
        findings=tuple(dict.fromkeys(findings)),
        tensor_types=tuple(sorted(tensor_types)),
    )


def _metadata(model: object) -> dict[str, bytes]:
    out: dict[str, bytes] = {}
    for i in range(model.MetadataLength()):  # type: ignore[attr-defined]
        entry = model.Metadata(i)  # type: ignore[attr-defined]
        buf = model.Buffers(entry.Buffer())  # type: ignore[attr-defined]
        out[entry.Name().decode("utf-8", "replace")] = (
            buf.DataAsNumpy().tobytes() if buf.DataLength() else b""
        )
    return out


def _hybrid_per_channel_fc(
    model: object, graph: object, ops: list[OpInfo], type_names: dict[int, str]
) -> list[str]:
    """FULLY_CONNECTED with float activations and per-channel int8 weights (hybrid): garbage on 2.14."""
    found = []
    for o in range(graph.OperatorsLength()):  # type: ignore[attr-defined]
        op = graph.Operators(o)  # type: ignore[attr-defined]
        if ops[op.OpcodeIndex()].name != "FULLY_CONNECTED" or op.InputsLength() < 2:
            continue
        act, weights = graph.Tensors(op.Inputs(0)), graph.Tensors(op.Inputs(1))  # type: ignore[attr-defined]
        if type_names.get(act.Type()) != "FLOAT32" or type_names.get(weights.Type()) not in ("INT8", "INT4"):
            continue
        quant = weights.Quantization()
        if quant is not None and quant.ScaleLength() > 1:
            name = tensor_name(weights, op.Inputs(1))
            found.append(
                f"hybrid FULLY_CONNECTED with per-channel weights ({name}): "
                "tflite-runtime 2.14 computes wrong outputs for it"
            )
    return found


def custom_ops(report: CompatReport) -> list[str]:
    """The custom ops a file needs, each once, in file order."""
    return list(dict.fromkeys(op.custom_code for op in report.ops if op.custom_code))


def flatbuffer_io(data: bytes) -> tuple[list[TensorSpec], list[TensorSpec]]:
    """Input and output tensor specs of subgraph 0, read from the flatbuffer alone (for a file the
    interpreter here cannot load, e.g. one with custom ops)."""
    import numpy as np
    import tflite

    from agent.wire import QuantParams

    type_names = {v: k.lower() for k, v in vars(tflite.TensorType).items() if not k.startswith("_")}
    try:
        graph = tflite.Model.GetRootAsModel(data, 0).Subgraphs(0)

        def spec(index: int) -> TensorSpec:
            t = graph.Tensors(index)
            dtype = type_names.get(t.Type(), "?")
            if dtype not in ("float32", "float16", "int8", "uint8", "int16", "int32", "int64", "bool"):
                raise EvaluationError(f"tensor {tensor_name(t, index)!r} has type {dtype}")  # noqa: TRY301
            q = t.Quantization()
            quant = None
            if q is not None and q.ScaleLength():
                quant = QuantParams(
                    scale=[float(x) for x in np.asarray(q.ScaleAsNumpy()).reshape(-1)],
                    zero_point=[int(x) for x in np.asarray(q.ZeroPointAsNumpy()).reshape(-1)],
                )
            shape = [int(d) for d in t.ShapeAsNumpy()] if t.ShapeLength() else []
            return TensorSpec(name=tensor_name(t, index)[:256], shape=shape, dtype=dtype, quantization=quant)

        ins = [spec(int(i)) for i in graph.InputsAsNumpy()]
        outs = [spec(int(i)) for i in graph.OutputsAsNumpy()]
    except EvaluationError:
        raise
    except Exception as err:  # the flatbuffer reader raises assorted errors on garbage input
        raise EvaluationError(f"not a readable .tflite flatbuffer: {err}") from err
    return ins, outs
