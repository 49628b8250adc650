"""Tiny bundles for the fleet simulator, built without TensorFlow.

Each variant is a one-op TFLite model ``y = x·Wᵀ + b`` (FULLY_CONNECTED, float32) written directly with
``flatbuffers`` (tests/agent_helpers.py ``build_fc_model``), so a real agent can fetch, load,
benchmark and health-check it in milliseconds, and building a bundle costs no TensorFlow import. The
variants of one bundle differ only by their weights; the host metrics in the manifest (accuracy, size)
are set here, plausibly ordered, because no compressor ran. A new ``version`` gets new weights, hence
new sha256s: a rollout of version 2 changes every device.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np

sys.path.append(str(Path(__file__).resolve().parent.parent / "tests"))  # the tests' model builder
from agent_helpers import build_fc_model

from agent import wire

N_IN, N_OUT = 8, 3
# (variant id, host accuracy, techniques): the baseline first. All files are float32 FULLY_CONNECTED
# models, hence quantization "none"; the figures that tell them apart are the simulated ones.
VARIANTS: tuple[tuple[str, float, list[str]], ...] = (
    ("float32", 0.952, []),
    ("slim", 0.947, ["prune"]),
    ("tiny", 0.921, ["prune", "distill"]),
)


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
