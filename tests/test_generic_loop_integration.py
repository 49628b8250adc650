"""The whole loop with a non-classifier: a keypoint regressor given as a float16-weight .tflite.

compress (calibration rows from an .npz, held-out rows split off) → publish (signed) → two real agents
fetch, verify and benchmark every variant, comparing their outputs with the host's on each sample →
select on a generic metric (cosine) → assign → each device activates its variant and passes the health
check by output agreement → committed. Real mosquitto, real TensorFlow conversion, real ai-edge-litert.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest

from agent import wire
from deploy.broker.spawn import find_mosquitto
from deploy.demo import DemoSettings, run_demo

pytestmark = [
    pytest.mark.integration,
    pytest.mark.slow,
    pytest.mark.skipif(find_mosquitto() is None, reason="mosquitto is not installed"),
]

GENERIC_POLICY = """\
[default]
objective = "latency"
reject_contended = false   # the simulated devices share this machine: their runs disturb each other
min_cosine = 0.99          # the variant's outputs on held-out rows against float

[classes.accurate]
objective = "metric"
rank_metric = "sqnr_db"    # the most faithful variant

[classes.fast]
objective = "latency"
min_cosine = 0.995
"""


@pytest.fixture(scope="module")
def loop(tmp_path_factory: pytest.TempPathFactory) -> tuple[object, list[str], Path]:
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    from compressor.devmodels import make, to_tflite_float16

    work = tmp_path_factory.mktemp("generic")
    model, data = make("keypoints", seed=0, epochs=4)
    (work / "kp.tflite").write_bytes(to_tflite_float16(model))
    np.savez(work / "calib.npz", x=data["x_train"][:240])
    lines: list[str] = []
    settings = DemoSettings(
        workdir=work / "run",
        compress_args=(
            "--model",
            str(work / "kp.tflite"),
            "--calibration",
            str(work / "calib.npz"),
            "--model-id",
            "keypoints",
        ),
        policy=GENERIC_POLICY,
        bench_min_runs=30,
        bench_min_seconds=0.2,
        probation_s=0.5,
        timeout_s=280,
    )
    return run_demo(settings, lines.append), lines, work


def test_devices_commit_a_variant_chosen_on_output_fidelity(loop: tuple[object, list[str], Path]) -> None:
    result, lines, _ = loop
    manifest = wire.Manifest.model_validate_json(
        (result.bundle / "manifest.json").read_text()  # type: ignore[attr-defined]
    )
    assert manifest.task == "generic" and manifest.primary_metric == "cosine"
    assert manifest.baseline == "original"
    ids = {v.id for v in manifest.variants}
    assert {"original", "int8"} <= ids, "\n".join(lines)
    for row in result.devices:  # type: ignore[attr-defined]
        assert row["state"] == "committed", row
        variant = manifest.variant(row["variant"])
        assert variant.metrics.named["cosine"] >= 0.99
        # the device reproduced the host's outputs of the file it runs
        fid = row["device_fidelity"]
        assert fid is not None and fid["cosine"] > 0.999 and fid["sqnr_db"] > 30, row
    by_class = {row["class"]: row for row in result.devices}  # type: ignore[attr-defined]
    assert "sqnr_db" in by_class["accurate"]["why"]
    assert "lowest latency" in by_class["fast"]["why"]


def test_every_variant_ships_reference_outputs(loop: tuple[object, list[str], Path]) -> None:
    result, _, _ = loop
    bundle = result.bundle  # type: ignore[attr-defined]
    manifest = json.loads((bundle / "manifest.json").read_text())
    for v in manifest["variants"]:
        integer = v["quantization"] in ("dynamic_int8", "int8")
        assert v["output_tolerance"]["min_cosine"] == (0.98 if integer else 0.999)
        with np.load(bundle / f"{v['id']}.sample.npz") as npz:
            assert {"x", "ref_0"} <= set(npz.files) and "y" not in npz.files
            assert npz["ref_0"].shape[1:] == tuple(v["outputs"][0]["shape"][1:])
