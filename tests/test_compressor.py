"""Compressor: data loading, recipes, quantization maths, the CLI, and a real bundle (slow)."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from agent.wire import Manifest, TensorSpec
from compressor import cli
from compressor.convert import DEFAULT_VARIANTS, RECIPES, resolve_recipes
from compressor.data import InputSpec, load_dataset, load_digits, load_npz, upsample
from compressor.errors import BundleWriteError, ConversionError, DataError
from compressor.evaluate import dequantize_output, quantize_input
from compressor.recipe import QuantizeStep, Recipe, RecipeError

ROOT = Path(__file__).resolve().parent.parent
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


# ------------------------------------------------------------------------------------------ imports


def test_importing_the_compressor_loads_no_tensorflow() -> None:
    code = (
        "import sys, compressor, compressor.cli, compressor.pipeline, compressor.convert, "
        "compressor.models, compressor.evaluate, compressor.bundle, compressor.data\n"
        "print(' '.join(sorted(m for m in sys.modules if m.split('.')[0] in ('tensorflow', 'keras'))))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=ROOT,
        check=True,
    )
    assert out.stdout.strip() == ""


# ------------------------------------------------------------------------------------------- data


def test_digits_shapes_range_and_stratified_split() -> None:
    d = load_digits()
    assert d.x_train.shape[1:] == (28, 28, 1)
    assert d.x_train.dtype == np.float32 and d.y_train.dtype == np.int64
    assert len(d.y_train) + len(d.y_val) + len(d.y_test) == 1797
    assert len(d.y_test) == 360
    for x in (d.x_train, d.x_val, d.x_test):
        assert float(x.min()) >= 0.0 and float(x.max()) <= 1.0
    assert set(np.unique(d.y_test)) == set(range(10))
    assert d.labels == tuple(str(i) for i in range(10))
    assert d.input_shape == (28, 28, 1) and d.num_classes == 10


def test_digits_split_is_deterministic() -> None:
    a, b, c = load_digits(seed=0), load_digits(seed=0), load_digits(seed=1)
    assert np.array_equal(a.x_test, b.x_test) and np.array_equal(a.y_train, b.y_train)
    assert not np.array_equal(a.y_train, c.y_train)


def test_upsample_keeps_constant_images_constant() -> None:
    img = np.full((2, 8, 8), 0.25)
    out = upsample(img, 28)
    assert out.shape == (2, 28, 28)
    np.testing.assert_allclose(out, 0.25, atol=1e-6)


def _write_npz(path: Path, with_test: bool = True, **override: Any) -> Path:
    rng = np.random.default_rng(0)
    arrays: dict[str, Any] = {
        "x_train": rng.random((40, 12, 12), dtype=np.float32),
        "y_train": rng.integers(0, 3, 40),
        "x_val": rng.random((10, 12, 12), dtype=np.float32),
        "y_val": rng.integers(0, 3, 10),
    }
    if with_test:
        arrays["x_test"] = rng.random((10, 12, 12), dtype=np.float32)
        arrays["y_test"] = np.eye(3)[rng.integers(0, 3, 10)]  # one-hot is accepted
    arrays.update(override)
    arrays = {k: v for k, v in arrays.items() if v is not None}
    np.savez(path, **arrays)
    return path


def test_npz_loads_and_the_model_adds_the_channel_axis(tmp_path: Path) -> None:
    from compressor.validate import ModelIO, fit_inputs

    d = load_npz(_write_npz(tmp_path / "d.npz"))
    assert d.x_train.shape == (40, 12, 12) and d.x_test.shape == (10, 12, 12)  # any shape loads as it is
    io = ModelIO((InputSpec("x", (-1, 12, 12, 1), "float32"),), ())
    fitted = fit_inputs(d, io)  # ... and fits a (1, H, W, 1) input
    assert fitted.x_train.shape == (40, 12, 12, 1) and fitted.x_test.shape == (10, 12, 12, 1)
    assert d.y_test.shape == (10,) and d.y_test.dtype == np.int64
    assert not d.test_is_val
    assert d.labels == ("0", "1", "2")


def test_npz_without_test_split_uses_val(tmp_path: Path) -> None:
    d = load_dataset(_write_npz(tmp_path / "d.npz", with_test=False))
    assert d.test_is_val and np.array_equal(d.x_test, d.x_val) and d.notes


@pytest.mark.parametrize("names", [("x_train", "y_train"), ("x", "y"), ("x_0", "y")])
def test_unsplit_rows_are_split_with_the_seed(tmp_path: Path, names: tuple[str, str]) -> None:
    rng = np.random.default_rng(1)
    x = rng.normal(size=(100, 6)).astype(np.float32)
    y = np.arange(100) % 3
    path = tmp_path / "rows.npz"
    np.savez(path, **{names[0]: x, names[1]: y})
    d = load_dataset(path, seed=4)
    assert (len(d.x_train), len(d.x_val), len(d.x_test)) == (70, 15, 15) and not d.test_is_val
    assert d.notes == ("100 unsplit rows shuffled with seed 4 into 70 train, 15 validation and 15 test rows",)
    every = np.concatenate([d.x_train, d.x_val, d.x_test])
    assert sorted(map(tuple, every.tolist())) == sorted(map(tuple, x.tolist()))  # each row once
    for split_x, split_y in ((d.x_train, d.y_train), (d.x_val, d.y_val), (d.x_test, d.y_test)):
        for row, label in zip(split_x, split_y, strict=True):  # labels travel with their rows
            assert label == y[int(np.flatnonzero((x == row).all(axis=1))[0])]
    again = load_dataset(path, seed=4)
    assert np.array_equal(again.x_val, d.x_val)  # the same seed, the same split
    assert not np.array_equal(load_dataset(path, seed=5).x_val, d.x_val)
    np.savez(path, x_train=x[:10], y_train=y[:10])
    with pytest.raises(DataError, match="10 rows unsplit: at least 20"):
        load_dataset(path)


@pytest.mark.parametrize(
    ("override", "needle"),
    [
        ({"y_val": None}, "lacks y_val"),
        ({"y_train": np.zeros(39, dtype=np.int64)}, "40 samples"),
        ({"x_val": np.zeros((10, 5, 5), dtype=np.float32)}, "sample shape"),
        ({"y_train": np.full(40, 0.5)}, "whole class"),
        ({"x_train": np.array(["a"] * 40)}, "numeric"),
    ],
)
def test_bad_npz_is_a_data_error(tmp_path: Path, override: dict[str, Any], needle: str) -> None:
    with pytest.raises(DataError, match=needle):
        load_npz(_write_npz(tmp_path / "d.npz", **override))


def test_pickled_npz_and_missing_files_are_data_errors(tmp_path: Path) -> None:
    obj = np.empty(40, dtype=object)
    path = _write_npz(tmp_path / "p.npz", x_train=obj)
    with pytest.raises(DataError, match="pickle"):
        load_npz(path)
    with pytest.raises(DataError, match="does not exist"):
        load_npz(tmp_path / "nope.npz")
    with pytest.raises(DataError, match="neither a built-in"):
        load_dataset("mnist")
    (tmp_path / "junk.npz").write_bytes(b"not a zip")
    with pytest.raises(DataError):
        load_npz(tmp_path / "junk.npz")


# ---------------------------------------------------------------------------------------- recipes


def test_recipes_registry_and_resolution() -> None:
    assert DEFAULT_VARIANTS[:4] == ("float32", "float16", "dynint8", "int8")
    assert [r.id for r in resolve_recipes(None)] == list(DEFAULT_VARIANTS)
    assert [r.id for r in resolve_recipes(["int8"])] == ["float32", "int8"]  # baseline always first
    assert [r.id for r in resolve_recipes(["int8", "float32", "int8"])] == ["float32", "int8"]
    with pytest.raises(RecipeError, match="int4"):
        resolve_recipes(["int4"])
    assert RECIPES["int8"].quantization == "int8" and RECIPES["int8"].techniques == ["quantize"]
    assert RECIPES["float32"].techniques == [] and RECIPES["float32"].quantization == "none"
    assert RECIPES["prune50-distill-int8"].techniques == ["prune", "distill", "quantize"]
    with pytest.raises(ValueError, match=r"identifier|pattern"):
        Recipe(id="Bad Id", steps=[QuantizeStep(mode="float32")])
    with pytest.raises(ValueError, match="quantize"):
        Recipe(
            id="twice",
            steps=[QuantizeStep(mode="float32"), QuantizeStep(mode="int8", representative_samples=10)],
        )


def test_int8_quantize_and_dequantize() -> None:
    spec = TensorSpec.model_validate(
        {
            "name": "x",
            "shape": [1, 2],
            "dtype": "int8",
            "quantization": {"scale": [1 / 255], "zero_point": [-128]},
        }
    )
    q = quantize_input(np.array([[0.0, 1.0], [0.5, 2.0]], dtype=np.float32), spec)
    assert q.dtype == np.int8
    assert q.tolist() == [[-128, 127], [0, 127]]  # round(0.5*255)-128 = 0; 2.0 clips
    np.testing.assert_allclose(dequantize_output(np.array([-128, 127], dtype=np.int8), spec), [0.0, 1.0])
    f32 = TensorSpec(name="x", shape=[1, 2], dtype="float32")
    assert quantize_input(np.zeros((1, 2), dtype=np.float64), f32).dtype == np.float32


# -------------------------------------------------------------------------------------------- CLI


def _run_cli(argv: list[str]) -> int:
    return cli.main(argv)


def test_cli_errors_exit_2_with_one_message(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert (
        _run_cli(
            [
                "compress",
                "--model",
                str(tmp_path / "m.keras"),
                "--data",
                "digits",
                "--out",
                str(tmp_path / "b"),
            ]
        )
        == 2
    )
    err = capsys.readouterr().err
    assert "does not exist" in err and err.count("\n") == 1
    assert _run_cli(["compress", "--demo", "--variants", "float32,int4", "--out", str(tmp_path / "b")]) == 2
    assert "unknown variant" in capsys.readouterr().err
    bad_recipe = tmp_path / "r.toml"
    bad_recipe.write_text(
        '[[variants]]\nid = "float32"\nsteps = [{ kind = "quantize", mode = "float32", x = 1 }]\n'
    )
    assert _run_cli(["compress", "--demo", "--recipe", str(bad_recipe), "--out", str(tmp_path / "b")]) == 2
    assert "variants[0] (float32).steps[0].x: unknown key" in capsys.readouterr().err
    assert _run_cli(["compress", "--check-recipe", "--recipe", str(bad_recipe)]) == 1
    assert _run_cli(["compress", "--check-recipe", "--recipe", "default"]) == 0
    assert "prune50-distill-int8" in capsys.readouterr().out
    (tmp_path / "m.keras").write_bytes(b"x")
    bad = _write_npz(tmp_path / "d.npz", y_val=None)
    assert (
        _run_cli(
            [
                "compress",
                "--model",
                str(tmp_path / "m.keras"),
                "--data",
                str(bad),
                "--out",
                str(tmp_path / "b"),
            ]
        )
        == 2
    )
    assert "lacks y_val" in capsys.readouterr().err
    assert _run_cli(["compress", "--demo", "--model-id", "Digits!", "--out", str(tmp_path / "b")]) == 2
    assert not (tmp_path / "b").exists()


def test_cli_registers_on_a_host_parser() -> None:
    import argparse

    parser = argparse.ArgumentParser(prog="edgefleet")
    sub = parser.add_subparsers(dest="command")
    cli.register(sub)
    args = parser.parse_args(["compress", "--demo", "--out", "b", "--epochs", "2", "--variants", "int8"])
    assert args.func is cli.run and args.epochs == 2 and args.variants == "int8"
    with pytest.raises(SystemExit):
        parser.parse_args(["compress", "--demo", "--model", "m.keras", "--out", "b"])  # one source only
    assert cli.run(parser.parse_args(["compress", "--demo"])) == 2  # --out is required to build


# ------------------------------------------------------------------------------- real bundle (slow)

EPOCHS = 3
QUANT_VARIANTS = ("float32", "float16", "dynint8", "int8")


@pytest.fixture(scope="module")
def bundle(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Manifest, Any]:
    from compressor.pipeline import build_demo

    out = tmp_path_factory.mktemp("b") / "digits"
    lines: list[str] = []
    result = build_demo(
        out,
        epochs=EPOCHS,
        progress=lines.append,
        latency_budget_s=0.1,
        recipe="demo",
        variants=QUANT_VARIANTS,
    )
    assert result.failures == ()
    assert any(line.startswith("train: epoch") for line in lines)
    for vid in QUANT_VARIANTS:
        assert f"convert {vid}" in lines and f"evaluate {vid}" in lines
    return out, result.manifest, load_digits()


@pytest.mark.slow
def test_bundle_manifest_round_trips_and_files_match(bundle: tuple[Path, Manifest, Any]) -> None:
    out, manifest, _ = bundle
    text = (out / "manifest.json").read_bytes()
    assert Manifest.model_validate_json(text) == manifest
    assert Manifest.from_json(text) == manifest
    assert manifest.signature is None and manifest.baseline == "float32" and manifest.model == "digits"
    assert manifest.labels == [str(i) for i in range(10)]
    assert [v.id for v in manifest.variants] == list(QUANT_VARIANTS)
    assert manifest.version == int(manifest.created_at * 1000)
    for v in manifest.variants:
        data = (out / v.file).read_bytes()
        assert v.size == len(data) and v.sha256 == hashlib.sha256(data).hexdigest()
        assert v.chunks == [
            hashlib.sha256(data[i : i + v.chunk_size]).hexdigest() for i in range(0, len(data), v.chunk_size)
        ]
        assert v.sample is not None
        sample = (out / f"{v.id}.sample.npz").read_bytes()
        assert v.sample.sha256 == hashlib.sha256(sample).hexdigest() and v.sample.size == len(sample)
        assert v.min_runtime is not None
    assert (out / "report.md").read_text().count("| `") == 4
    assert (out / "accuracy_vs_size.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (out / "accuracy_vs_latency.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not [p for p in out.parent.iterdir() if p.name.startswith(".")]  # no temp dirs left over
    quant = {v.id: v.quantization for v in manifest.variants}
    assert quant == {"float32": "none", "float16": "float16", "dynint8": "dynamic_int8", "int8": "int8"}


@pytest.mark.slow
def test_bundle_accuracy_and_int8_io(bundle: tuple[Path, Manifest, Any]) -> None:
    _, manifest, _ = bundle
    m = {v.id: v for v in manifest.variants}
    base = m["float32"].metrics
    assert base.accuracy is not None and base.accuracy > 0.85
    assert base.eval_samples == 360 and base.params == 693_962 and base.macs == 888_192  # from the .tflite
    for v in manifest.variants:
        assert v.metrics.accuracy is not None and v.metrics.accuracy >= base.accuracy - 0.03, v.id
        assert v.metrics.agreement is not None and v.metrics.agreement >= 0.95, v.id
        assert v.metrics.latency_ms_p50 is not None and v.metrics.latency_ms_p50 > 0
        assert v.inputs[0].shape == [1, 28, 28, 1]
    int8 = m["int8"]
    assert int8.inputs[0].dtype == "int8" and int8.outputs[0].dtype == "int8"
    assert int8.inputs[0].quantization is not None and int8.inputs[0].quantization.scale
    assert m["dynint8"].inputs[0].dtype == "float32"
    assert m["float16"].metrics.size_bytes < 0.6 * base.size_bytes
    assert m["int8"].metrics.size_bytes < 0.3 * base.size_bytes


@pytest.mark.slow
def test_samples_load_without_pickle_and_reproduce_accuracy(bundle: tuple[Path, Manifest, Any]) -> None:
    from ai_edge_litert.interpreter import Interpreter

    out, manifest, data = bundle
    for v in manifest.variants:
        with np.load(out / f"{v.id}.sample.npz", allow_pickle=False) as npz:
            x, y = npz["x"], npz["y"]
        assert x.shape == (128, 28, 28, 1) and y.shape == (128,)
        assert x.dtype == np.dtype(v.inputs[0].dtype)
        assert np.array_equal(y, data.y_test[:128])
        interp = Interpreter(model_path=str(out / v.file), num_threads=1)
        interp.allocate_tensors()
        i_idx, o_idx = interp.get_input_details()[0]["index"], interp.get_output_details()[0]["index"]
        hits = 0
        for k in range(len(x)):
            interp.set_tensor(i_idx, x[k : k + 1])
            interp.invoke()
            hits += int(np.argmax(interp.get_tensor(o_idx)) == y[k])
        assert hits / len(y) > 0.85, v.id


@pytest.mark.slow
def test_a_failing_variant_is_reported_and_the_others_kept(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capfd: pytest.CaptureFixture[str]
) -> None:
    import compressor.convert as convert
    import compressor.pipeline as pipeline
    from compressor.models import build_seed_cnn

    real = convert.quantize_keras

    def flaky(model: Any, step: QuantizeStep, data: Any, *, seed: int = 0) -> bytes:
        if step.mode == "dynamic_int8":
            raise ConversionError("simulated converter crash")
        return real(model, step, data, seed=seed)

    monkeypatch.setattr(convert, "quantize_keras", flaky)
    data = load_digits()
    small = dataclasses.replace(data, test=data.test.head(64))
    result = pipeline.build_bundle(
        build_seed_cnn(), small, tmp_path / "b", variants=["dynint8", "float16"], latency_budget_s=0.05
    )
    assert result.recipe == "default"
    assert [v.id for v in result.manifest.variants] == ["float32", "float16"]
    assert [(f.variant, f.stage) for f in result.failures] == [("dynint8", "convert")]
    assert "simulated converter crash" in (tmp_path / "b" / "report.md").read_text()
    assert capfd.readouterr().out == ""  # `edgefleet demo --json` owns stdout
    # a second build replaces the bundle; a foreign directory is never clobbered
    (tmp_path / "foreign").mkdir()
    (tmp_path / "foreign" / "keep.txt").write_text("mine")
    with pytest.raises(BundleWriteError, match="not a bundle"):
        pipeline.build_bundle(build_seed_cnn(), small, tmp_path / "foreign", variants=[])
    assert (tmp_path / "foreign" / "keep.txt").read_text() == "mine"


@pytest.mark.slow
def test_cli_compresses_a_keras_file_with_an_npz(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from compressor.models import build_seed_cnn

    model = build_seed_cnn((12, 12, 1), 3)
    model.save(tmp_path / "m.keras")
    npz = _write_npz(tmp_path / "d.npz")
    code = _run_cli(
        [
            "compress",
            "--model",
            str(tmp_path / "m.keras"),
            "--data",
            str(npz),
            "--out",
            str(tmp_path / "b"),
            "--variants",
            "int8",
            "--model-id",
            "tiny",
        ]
    )
    assert code == 0, capsys.readouterr().err
    manifest = Manifest.from_json((tmp_path / "b" / "manifest.json").read_bytes())
    assert manifest.model == "tiny" and [v.id for v in manifest.variants] == ["float32", "int8"]
    assert manifest.labels == ["0", "1", "2"]
    assert manifest.variant("int8").inputs[0].shape == [1, 12, 12, 1]
    captured = capsys.readouterr()
    assert "bundle:" in captured.out and "convert int8" in captured.err
    assert "accuracy" in captured.out.splitlines()[0]  # the summary table's header
    assert json.loads((tmp_path / "b" / "manifest.json").read_text())["schema"] == "edgefleet.manifest/2"


@pytest.mark.slow
def test_seed_cnn_initialisation_is_seeded() -> None:
    from compressor.models import build_seed_cnn, count_macs, count_params

    a, b = build_seed_cnn(seed=3), build_seed_cnn(seed=3)
    assert all(np.array_equal(x, y) for x, y in zip(a.get_weights(), b.get_weights(), strict=True))
    assert count_params(a) == 693_962 and count_macs(a) == 888_192
