"""Figures read from the .tflite file itself (``tflite`` flatbuffer parser, no TensorFlow): parameters,
MACs, and what the weights really are (to never label a variant int8 that is not).

* **params**: elements of the constant weight tensors (filter and bias) of CONV_2D, DEPTHWISE_CONV_2D and
  FULLY_CONNECTED, followed through a DEQUANTIZE of a constant (float16 and weight-only int8 files
  store the weights that way). Counted once per tensor.
* **MACs** for one inference: CONV_2D ``oh·ow·oc·kh·kw·ic``, DEPTHWISE_CONV_2D ``oh·ow·oc·kh·kw``,
  FULLY_CONNECTED ``rows·out·in`` (rows = output elements / out); other ops are not counted (the same
  rule as the Keras count in :func:`compressor.models.count_macs`).
* **weight types**: the storage types of those weight tensors (e.g. ``INT8``, ``FLOAT16``, ``FLOAT32``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from compressor.errors import EvaluationError

_COUNTED = ("CONV_2D", "DEPTHWISE_CONV_2D", "FULLY_CONNECTED")
_STORED = ("INT8", "INT4", "FLOAT16", "UINT8", "INT16")


@dataclass(frozen=True, slots=True)
class GraphStats:
    params: int
    macs: int
    weight_types: tuple[str, ...]  # storage types of the counted weight tensors (filters only)
    tensor_types: tuple[str, ...]  # every tensor type in the file

    @property
    def int8_weights(self) -> bool:
        return "INT8" in self.weight_types

    @property
    def float16_weights(self) -> bool:
        return "FLOAT16" in self.weight_types


def graph_stats(data: bytes) -> GraphStats:
    """Parameters, MACs and weight storage types of the first subgraph of a .tflite file."""
    try:
        import tflite
    except ImportError as err:  # pragma: no cover - part of the [host] extra
        raise EvaluationError("reading a .tflite needs the `tflite` package (pip install tflite)") from err
    try:
        model = tflite.Model.GetRootAsModel(data, 0)
        op_names = {v: k for k, v in vars(tflite.BuiltinOperator).items() if not k.startswith("_")}
        type_names = {v: k for k, v in vars(tflite.TensorType).items() if not k.startswith("_")}
        codes = []
        for i in range(model.OperatorCodesLength()):
            oc = model.OperatorCodes(i)
            codes.append(op_names.get(max(oc.BuiltinCode(), oc.DeprecatedBuiltinCode()), "?"))
        graph = model.Subgraphs(0)
        shapes = [
            tuple(int(d) for d in graph.Tensors(t).ShapeAsNumpy()) if graph.Tensors(t).ShapeLength() else ()
            for t in range(graph.TensorsLength())
        ]
        types = [type_names.get(graph.Tensors(t).Type(), "?") for t in range(graph.TensorsLength())]

        def constant(t: int) -> bool:
            buf = graph.Tensors(t).Buffer()
            if buf <= 0:
                return False
            b = model.Buffers(buf)
            return bool(b.DataLength() > 0 or b.Size() > 0)  # inline data, or offset/size in the file

        producer: dict[int, int] = {}
        ops = []
        for o in range(graph.OperatorsLength()):
            op = graph.Operators(o)
            ins = [int(i) for i in op.InputsAsNumpy()] if op.InputsLength() else []
            outs = [int(i) for i in op.OutputsAsNumpy()] if op.OutputsLength() else []
            ops.append((codes[op.OpcodeIndex()], ins, outs))
            for t in outs:
                producer[t] = o

        def source(t: int) -> int | None:
            """The constant tensor behind ``t`` (itself, or the input of a DEQUANTIZE producing it)."""
            if t < 0:
                return None
            if constant(t):
                return t
            p = producer.get(t)
            if p is None or len(ops[p][1]) != 1:
                return None
            src = ops[p][1][0]
            # A DEQUANTIZE of a constant. Matched by shape rather than by opcode name: ai-edge-quantizer
            # 0.10 writes its DEQUANTIZE opcode with builtin code 0 in both code fields (the runtime
            # still runs it as DEQUANTIZE).
            if constant(src) and types[src] in _STORED and types[t] == "FLOAT32" and shapes[src] == shapes[t]:
                return src
            return None

        counted: set[int] = set()
        weight_types: set[str] = set()
        macs = 0
        for name, ins, outs in ops:
            if name not in _COUNTED or len(ins) < 2 or not outs:
                continue
            for pos, t in enumerate(ins[1:3], start=1):
                src = source(t)
                if src is not None:
                    counted.add(src)
                    if pos == 1:
                        weight_types.add(types[src])
            w, out = shapes[ins[1]], shapes[outs[0]]
            if name == "CONV_2D" and len(w) == 4 and len(out) == 4:
                macs += out[1] * out[2] * out[3] * w[1] * w[2] * w[3]
            elif name == "DEPTHWISE_CONV_2D" and len(w) == 4 and len(out) == 4:
                macs += out[1] * out[2] * out[3] * w[1] * w[2]
            elif name == "FULLY_CONNECTED" and len(w) == 2 and out:
                rows = math.prod(out) // max(1, w[0])
                macs += rows * w[0] * w[1]
        params = sum(math.prod(shapes[t]) if shapes[t] else 1 for t in counted)
        return GraphStats(
            params=int(params),
            macs=int(macs),
            weight_types=tuple(sorted(weight_types)),
            tensor_types=tuple(sorted(set(types))),
        )
    except EvaluationError:
        raise
    except Exception as err:  # the flatbuffer reader raises assorted errors on garbage input
        raise EvaluationError(f"not a readable .tflite flatbuffer: {err}") from err
