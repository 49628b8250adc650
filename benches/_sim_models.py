"""Tiny bundles for the fleet simulator, built without TensorFlow.

Each variant is a one-op TFLite model ``y = x·Wᵀ + b`` (FULLY_CONNECTED, float32) written directly with
``flatbuffers`` (the same construction as tests/test_agent_bench.py), so a real agent can fetch, load,
benchmark and health-check it in milliseconds, and building a bundle costs no TensorFlow import. The
variants of one bundle differ only by their weights; the host metrics in the manifest (accuracy, size)
are set here, plausibly ordered, because no compressor ran. A new ``version`` gets new weights, hence
new sha256s: a rollout of version 2 changes every device.
"""

from __future__ import annotations

import json
from pathlib import Path

import flatbuffers  # type: ignore[import-untyped]
import numpy as np

from agent import wire

N_IN, N_OUT = 8, 3
# (variant id, host accuracy, techniques): the baseline first. All files are float32 FULLY_CONNECTED
# models, hence quantization "none"; the figures that tell them apart are the simulated ones.
VARIANTS: tuple[tuple[str, float, list[str]], ...] = (
    ("float32", 0.952, []),
    ("slim", 0.947, ["prune"]),
    ("tiny", 0.921, ["prune", "distill"]),
)


def build_fc_model(weights: np.ndarray, bias: np.ndarray) -> bytes:
    """The flatbuffer of a one-op FULLY_CONNECTED model (schema: tensorflow/lite/schema/schema.fbs)."""
    w = np.ascontiguousarray(weights, dtype=np.float32)
    bv = np.ascontiguousarray(bias, dtype=np.float32)
    n_out, n_in = w.shape
    b = flatbuffers.Builder(4096)

    def ints(values: list[int]) -> int:
        b.StartVector(4, len(values), 4)
        for v in reversed(values):
            b.PrependInt32(v)
        return int(b.EndVector())

    def offsets(values: list[int]) -> int:
        b.StartVector(4, len(values), 4)
        for v in reversed(values):
            b.PrependUOffsetTRelative(v)
        return int(b.EndVector())

    def buffer(data: bytes | None) -> int:
        vec = None
        if data:
            b.StartVector(1, len(data), 16)
            b.head = b.head - len(data)
            b.Bytes[b.head : b.head + len(data)] = data
            vec = b.EndVector()
        b.StartObject(1)  # Buffer { data }
        if vec is not None:
            b.PrependUOffsetTRelativeSlot(0, vec, 0)
        return int(b.EndObject())

    buffers = [buffer(None), buffer(w.tobytes()), buffer(bv.tobytes()), buffer(None), buffer(None)]

    def tensor(shape: list[int], buf: int, name: str) -> int:
        nm, sh = b.CreateString(name), ints(shape)
        b.StartObject(4)  # Tensor { shape, type, buffer, name }
        b.PrependUOffsetTRelativeSlot(0, sh, 0)
        b.PrependInt8Slot(1, 0, 0)  # FLOAT32
        b.PrependUint32Slot(2, buf, 0)
        b.PrependUOffsetTRelativeSlot(3, nm, 0)
        return int(b.EndObject())

    tensors = [
        tensor([1, n_in], 3, "x"),
        tensor([n_out, n_in], 1, "w"),
        tensor([n_out], 2, "b"),
        tensor([1, n_out], 4, "y"),
    ]
    b.StartObject(4)  # OperatorCode { deprecated_builtin_code, custom_code, version, builtin_code }
    b.PrependInt8Slot(0, 9, 0)  # FULLY_CONNECTED
    b.PrependInt32Slot(2, 1, 1)
    b.PrependInt32Slot(3, 9, 0)
    opcode = b.EndObject()
    op_in, op_out = ints([0, 1, 2]), ints([3])
    b.StartObject(3)  # Operator { opcode_index, inputs, outputs }
    b.PrependUint32Slot(0, 0, 0)
    b.PrependUOffsetTRelativeSlot(1, op_in, 0)
    b.PrependUOffsetTRelativeSlot(2, op_out, 0)
    op = b.EndObject()
    tv, si, so, ov = offsets(tensors), ints([0]), ints([3]), offsets([op])
    b.StartObject(4)  # SubGraph { tensors, inputs, outputs, operators }
    for slot, value in enumerate((tv, si, so, ov)):
        b.PrependUOffsetTRelativeSlot(slot, value, 0)
    subgraph = b.EndObject()
    codes, subgraphs, bufs = offsets([opcode]), offsets([subgraph]), offsets(buffers)
    b.StartObject(5)  # Model { version, operator_codes, subgraphs, description, buffers }
    b.PrependUint32Slot(0, 3, 0)
    b.PrependUOffsetTRelativeSlot(1, codes, 0)
    b.PrependUOffsetTRelativeSlot(2, subgraphs, 0)
    b.PrependUOffsetTRelativeSlot(4, bufs, 0)
    b.Finish(b.EndObject(), file_identifier=b"TFL3")
    return bytes(b.Output())


def write_bundle(out: Path, model: str, version: int, created_at: float) -> wire.Manifest:
    """Write ``out/manifest.json`` (unsigned, as the compressor writes it) and one .tflite per variant."""
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(1000 + version)
    variants = []
    for vid, accuracy, techniques in VARIANTS:
        data = build_fc_model(
            rng.standard_normal((N_OUT, N_IN)).astype(np.float32),
            rng.standard_normal(N_OUT).astype(np.float32),
        )
        (out / f"{vid}.tflite").write_bytes(data)
        variants.append(
            wire.Variant(
                id=vid,
                file=f"{vid}.tflite",
                quantization="none",
                techniques=list(techniques),
                inputs=[wire.TensorSpec(name="x", shape=[1, N_IN], dtype="float32")],
                outputs=[wire.TensorSpec(name="y", shape=[1, N_OUT], dtype="float32")],
                metrics=wire.HostMetrics(
                    size_bytes=len(data), accuracy=accuracy, accuracy_drop=round(VARIANTS[0][1] - accuracy, 4)
                ),
                **wire.blob_fields(data),
            )
        )
    manifest = wire.Manifest(
        model=model, version=version, created_at=created_at, baseline=VARIANTS[0][0], variants=variants
    )
    body = manifest.model_dump(mode="json", by_alias=True, exclude_none=True)
    (out / "manifest.json").write_text(json.dumps(body, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    return manifest
