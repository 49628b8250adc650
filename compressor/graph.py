"""Figures read from the .tflite file itself (``tflite`` flatbuffer parser, no TensorFlow): parameters,
MACs, and what the weights really are (to never label a variant int8 that is not).

Every subgraph is read (a Keras LSTM/GRU converts to a WHILE whose body holds the recurrent weights; a
loop body is counted once, as one step).

* **params**: elements of the constant weight tensors of CONV_2D, DEPTHWISE_CONV_2D, FULLY_CONNECTED
  (filter and bias), TRANSPOSE_CONV (filter and bias), BATCH_MATMUL (a constant operand), GATHER and
  EMBEDDING_LOOKUP (the table), followed through a DEQUANTIZE of a constant (float16 and weight-only
  int8 files store the weights that way). Counted once per buffer, even when subgraphs share it; a
  bias added by a separate ADD (as in a converted LSTM's loop body) is not counted.
* **MACs** for one inference: CONV_2D ``oh·ow·oc·kh·kw·ic``, DEPTHWISE_CONV_2D ``oh·ow·oc·kh·kw``,
  FULLY_CONNECTED ``rows·out·in`` (rows = output elements / out), TRANSPOSE_CONV ``ih·iw·ic·kh·kw·oc``,
  BATCH_MATMUL with a constant operand ``output elements · k``; other ops are not counted (the same
  rule as the Keras count in :func:`compressor.models.count_macs` for the layers both know).
* **weight types**: the storage types of those weight tensors (e.g. ``INT8``, ``FLOAT16``, ``FLOAT32``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from compressor.errors import EvaluationError

# op → (input positions of its weights, input positions of its biases)
_WEIGHTS: dict[str, tuple[tuple[int, ...], tuple[int, ...]]] = {
    "CONV_2D": ((1,), (2,)),
    "DEPTHWISE_CONV_2D": ((1,), (2,)),
    "FULLY_CONNECTED": ((1,), (2,)),
    "TRANSPOSE_CONV": ((1,), (3,)),
    "BATCH_MATMUL": ((0, 1), ()),
    "GATHER": ((0,), ()),
    "EMBEDDING_LOOKUP": ((1,), ()),
}
_STORED = ("INT8", "INT4", "FLOAT16", "UINT8", "INT16")
_WEIGHT_TYPES = ("FLOAT32", *_STORED)


@dataclass(frozen=True, slots=True)
class GraphStats:
    params: int
    macs: int
    weight_types: tuple[str, ...]  # storage types of the counted weight tensors (filters only)
    tensor_types: tuple[str, ...]  # every tensor type in the file
    # storage types of what the weighted ops (conv, fully connected...) compute: INT8 in a full-integer file
    activation_types: tuple[str, ...] = ()

    @property
    def int8_weights(self) -> bool:
        return "INT8" in self.weight_types

    @property
    def float16_weights(self) -> bool:
        return "FLOAT16" in self.weight_types

    @property
    def integer_activations(self) -> bool:
        """The weighted ops compute in int8/int16: a full-integer quantized file."""
        return bool({"INT8", "INT16"} & set(self.activation_types))


def graph_stats(data: bytes) -> GraphStats:
    """Parameters, MACs and weight storage types of a .tflite file (every subgraph, module docstring)."""
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
        counted: dict[int, int] = {}  # buffer → elements of the weight tensor stored there
        weight_types: set[str] = set()
        all_types: set[str] = set()
        activation_types: set[str] = set()
        macs = 0
        if model.SubgraphsLength() == 0:
            raise EvaluationError("not a readable .tflite flatbuffer: it has no subgraph")  # noqa: TRY301
        for g in range(model.SubgraphsLength()):
            graph = model.Subgraphs(g)
            m, types = _subgraph(model, graph, codes, type_names, counted, weight_types, activation_types)
            macs += m
            all_types |= types
        return GraphStats(
            params=int(sum(counted.values())),
            macs=int(macs),
            weight_types=tuple(sorted(weight_types)),
            tensor_types=tuple(sorted(all_types)),
            activation_types=tuple(sorted(activation_types)),
        )
    except EvaluationError:
        raise
    except Exception as err:  # the flatbuffer reader raises assorted errors on garbage input
        raise EvaluationError(f"not a readable .tflite flatbuffer: {err}") from err


def _subgraph(
    mdl: Any,
    g: Any,
    codes: list[str],
    type_names: dict[int, str],
    counted: dict[int, int],
    weight_types: set[str],
    activation_types: set[str],
) -> tuple[int, set[str]]:
    """One subgraph's MACs and tensor types; its weights are added to ``counted`` and ``weight_types``."""
    shapes = [
        tuple(int(d) for d in g.Tensors(t).ShapeAsNumpy()) if g.Tensors(t).ShapeLength() else ()
        for t in range(g.TensorsLength())
    ]
    types = [type_names.get(g.Tensors(t).Type(), "?") for t in range(g.TensorsLength())]

    def constant(t: int) -> bool:
        buf = g.Tensors(t).Buffer()
        if buf <= 0:
            return False
        b = mdl.Buffers(buf)
        return bool(b.DataLength() > 0 or b.Size() > 0)  # inline data, or offset/size in the file

    producer: dict[int, int] = {}
    ops = []
    for o in range(g.OperatorsLength()):
        op = g.Operators(o)
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

    macs = 0
    for name, ins, outs in ops:
        positions = _WEIGHTS.get(name)
        if positions is None or not outs:
            continue
        weights, biases = positions
        activation_types.add(types[outs[0]])
        found = None
        for pos in (*weights, *biases):
            src = source(ins[pos]) if pos < len(ins) else None
            if src is None or (pos in weights and types[src] not in _WEIGHT_TYPES):
                continue  # not a constant, or a weight slot holding e.g. an int32 index table
            counted[g.Tensors(src).Buffer()] = math.prod(shapes[src]) if shapes[src] else 1
            if pos in weights:
                weight_types.add(types[src])
                found = pos
        out = shapes[outs[0]]
        w = shapes[ins[1]] if len(ins) > 1 else ()
        if name == "CONV_2D" and len(w) == 4 and len(out) == 4:
            macs += out[1] * out[2] * out[3] * w[1] * w[2] * w[3]
        elif name == "DEPTHWISE_CONV_2D" and len(w) == 4 and len(out) == 4:
            macs += out[1] * out[2] * out[3] * w[1] * w[2]
        elif name == "FULLY_CONNECTED" and len(w) == 2 and out:
            rows = math.prod(out) // max(1, w[0])
            macs += rows * w[0] * w[1]
        elif name == "TRANSPOSE_CONV" and len(w) == 4 and len(ins) > 2 and len(shapes[ins[2]]) == 4:
            x = shapes[ins[2]]
            macs += x[1] * x[2] * x[3] * w[1] * w[2] * w[0]
        elif name == "BATCH_MATMUL" and found is not None and len(shapes[ins[0]]) >= 2 and out:
            macs += math.prod(out) * shapes[ins[0]][-1]  # adj_x is false in converted Keras models
    return macs, set(types)
