"""Bad input: a clear error naming the problem, before any training starts.

Tiny models, no training: every check runs before the first transform, which is proven by timing the
refusal and by the progress lines (no ``epoch`` line, no ``transform`` line, nothing written).
"""

from __future__ import annotations

import dataclasses
import os
import re
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from compressor import cli
from compressor.data import Dataset, load_npz
from compressor.errors import DataError, DataMismatchError, NotAClassifierError
from compressor.validate import (
    MIN_SPLIT_SAMPLES,
    check_dataset,
    check_fit,
    keras_signature,
    tflite_signature,
    validate,
)

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
FAST_S = 3.0  # a refusal must come well before any epoch could finish


def _data(n: int = 20, shape: tuple[int, ...] = (12, 12, 1), classes: int = 3, **over: Any) -> Dataset:
    rng = np.random.default_rng(0)

    def x(m: int) -> np.ndarray:
        return rng.random((m, *shape), dtype=np.float32)

    def y(m: int) -> np.ndarray:
        return np.arange(m, dtype=np.int64) % classes

    fields: dict[str, Any] = {
        "name": "t",
        "x_train": x(n),
        "y_train": y(n),
        "x_val": x(n),
        "y_val": y(n),
        "x_test": x(n),
        "y_test": y(n),
        "labels": tuple(str(i) for i in range(classes)),
    }
    fields.update(over)
    return Dataset.from_arrays(**fields)


def _model(last: Callable[[Any], Any] | None = None, shape: tuple[int, ...] = (12, 12, 1)) -> Any:
    from compressor._tf import keras

    k = keras()
    k.utils.set_random_seed(0)
    inp = k.Input(shape=shape)
    h = k.layers.Flatten(name="flatten")(inp)
    out = (last or (k.layers.Dense(3, activation="softmax", name="probs")))(h)
    return k.Model(inp, out, name="tiny")


@pytest.fixture(scope="module")
def keras_mod() -> Any:
    from compressor._tf import keras

    return keras()


# ---------------------------------------------------------------------------------- the data alone


@pytest.mark.parametrize(
    ("override", "needle"),
    [
        ({"x_train": np.zeros((5, 12, 12, 1), np.float32), "y_train": np.arange(5) % 3}, "x_train has 5"),
        ({"x_val": np.zeros((0, 12, 12, 1), np.float32), "y_val": np.zeros(0, np.int64)}, "x_val has 0"),
        ({"y_train": np.zeros(20, np.int64)}, "y_train holds 1 class"),
        ({"y_test": np.arange(19)}, "x_test has 20 samples but y_test has 19"),
        ({"y_val": np.full(20, 0.5)}, "whole class"),
        ({"y_val": -np.ones(20, np.int64)}, "negative class"),
        ({"y_train": np.eye(3)[np.arange(20) % 3]}, r"y_train must be \(N,\)"),
        ({"x_val": np.zeros((20, 10, 10, 1), np.float32)}, "disagree on the sample shape"),
        ({"x_test": np.zeros((20, 12, 12, 1), np.complex64)}, "x_test must be numeric"),
        ({"x_train": np.array([["a"]] * 20)}, "x_train must be numeric"),
    ],
)
def test_unusable_data_is_refused(override: dict[str, Any], needle: str) -> None:
    with pytest.raises(DataError, match=needle):
        check_dataset(_data(**override))


def test_nan_inf_and_float32_overflow_are_named() -> None:
    x = np.zeros((20, 12, 12, 1), np.float32)
    x[7, 3, 3, 0] = np.nan
    with pytest.raises(DataError, match=r"x_val contains NaN or infinity \(1 values; first in sample 7\)"):
        check_dataset(_data(x_val=x))
    big = np.zeros((20, 12, 12, 1), np.float64)
    big[2] = 1e300
    with pytest.raises(DataError, match="x_train contains values beyond the float32 range"):
        check_dataset(_data(x_train=big))


def test_data_is_normalised_to_float32_and_int64() -> None:
    d = check_dataset(_data(x_train=np.ones((20, 12, 12, 1), np.uint8), y_train=np.arange(20.0) % 3))
    assert d.x_train.dtype == np.uint8 and d.y_train.dtype == np.int64  # integer inputs keep their values
    d, _, _ = validate(_model(), d)  # ... until fitted to a float input
    assert d.x_train.dtype == np.float32


def _npz(path: Path, **over: Any) -> Path:
    rng = np.random.default_rng(0)
    arrays: dict[str, Any] = {
        "x_train": rng.random((30, 12, 12), dtype=np.float32),
        "y_train": np.arange(30) % 3,
        "x_val": rng.random((12, 12, 12), dtype=np.float32),
        "y_val": np.arange(12) % 3,
    }
    arrays.update(over)
    np.savez(path, **{k: v for k, v in arrays.items() if v is not None})
    return path


def test_npz_tiny_split_soft_labels_and_one_hot_width(tmp_path: Path) -> None:
    with pytest.raises(
        DataError, match=f"x_val has 4 samples; each split needs at least {MIN_SPLIT_SAMPLES}"
    ):
        load_npz(_npz(tmp_path / "a.npz", x_val=np.zeros((4, 12, 12)), y_val=np.arange(4) % 3))
    soft = np.full((12, 3), 1 / 3)
    with pytest.raises(DataError, match=r"y_val holds neither whole class indices nor one-hot rows .*row 0"):
        load_npz(_npz(tmp_path / "b.npz", y_val=soft))
    with pytest.raises(DataError, match="one-hot label arrays disagree"):
        load_npz(
            _npz(tmp_path / "c.npz", y_train=np.eye(3)[np.arange(30) % 3], y_val=np.eye(4)[np.arange(12) % 3])
        )
    d = load_npz(_npz(tmp_path / "d.npz", y_val=np.eye(4)[np.arange(12) % 3]))
    assert d.label_width == 4 and d.labels == ("0", "1", "2", "3") and d.y_val.dtype == np.int64


# ------------------------------------------------------------------------------------------ the model


def test_classifier_heads_are_recognised(keras_mod: Any) -> None:
    k = keras_mod
    sig = keras_signature(_model())
    assert (sig.input_shape, sig.num_classes, sig.output) == ((12, 12, 1), 3, "probabilities")
    assert keras_signature(_model(k.layers.Dense(4, name="logits"))).output == "logits"
    soft = keras_signature(_model(lambda t: k.layers.Softmax(name="sm")(k.layers.Dense(5)(t))))
    assert (soft.num_classes, soft.output) == (5, "probabilities")


@pytest.mark.parametrize(
    ("head", "needle"),
    [
        (
            lambda k: k.layers.Dense(1, activation="sigmoid", name="p"),
            "'p' \\(Dense, activation sigmoid",
        ),
        (lambda k: k.layers.Dense(1, activation="softmax", name="one"), "'one'.*K >= 2"),
        (
            lambda k: k.layers.Dense(3, activation="relu", name="feat"),
            "'feat' \\(Dense, activation relu",
        ),
        (lambda k: k.layers.Reshape((3, 48), name="rs"), "'rs' \\(Reshape"),
    ],
)
def test_not_a_classifier_names_the_layer(keras_mod: Any, head: Any, needle: str) -> None:
    with pytest.raises(
        NotAClassifierError, match=f"model 'tiny' is not a classifier: its last layer {needle}"
    ):
        keras_signature(_model(head(keras_mod)))


def test_with_two_outputs_labels_score_output_0(keras_mod: Any) -> None:
    k = keras_mod
    inp = k.Input(shape=(4,))
    model = k.Model(inp, [k.layers.Dense(2, activation="softmax")(inp), k.layers.Dense(2)(inp)], name="two")
    assert keras_signature(model).num_classes == 2
    model = k.Model(inp, [k.layers.Dense(3, activation="relu")(inp), k.layers.Dense(2)(inp)], name="two")
    with pytest.raises(NotAClassifierError, match="'two' is not a classifier"):
        keras_signature(model)


# ------------------------------------------------------------------------------- data against model


def test_wrong_sample_shape_names_both_shapes() -> None:
    with pytest.raises(DataMismatchError, match=r"shape \(10, 10, 1\) but the model takes \(12, 12, 1\)"):
        validate(_model(), _data(shape=(10, 10, 1)))
    with pytest.raises(DataMismatchError, match=r"shape \(12, 12, 1\) but the model takes \(12, 12\)"):
        validate(_model(shape=(12, 12)), _data())


def test_labels_outside_the_models_classes() -> None:
    with pytest.raises(
        DataMismatchError, match=r"y_train holds class 4 .* model outputs 3 classes.*\[0, 3\)"
    ):
        validate(_model(), _data(classes=5, labels=tuple("abcde")))
    one_hot = dataclasses.replace(_data(), label_width=4)
    with pytest.raises(DataMismatchError, match="one-hot with 4 columns but the model outputs 3"):
        validate(_model(), one_hot)
    with pytest.raises(DataMismatchError, match="labels has 4 names but the model outputs 3"):
        validate(_model(), _data(labels=("a", "b", "c", "d")))


def test_labels_the_data_never_shows_get_default_names(keras_mod: Any) -> None:
    k = keras_mod
    sig = keras_signature(_model(k.layers.Dense(5, activation="softmax")))
    assert check_fit(check_dataset(_data()), sig).labels == ("0", "1", "2", "3", "4")


def test_tflite_input_is_checked_too(tmp_path: Path) -> None:
    from compressor.convert import to_tflite
    from compressor.recipe import QuantizeStep

    blob = to_tflite(_model(), QuantizeStep(mode="float32"))
    sig = tflite_signature(blob)
    assert sig.input_shape == (12, 12, 1) and sig.num_classes == 3
    with pytest.raises(DataMismatchError, match="model takes"):
        validate(blob, _data(shape=(8, 8, 1)))
    with pytest.raises(DataError, match=r"not a loadable \.tflite"):
        tflite_signature(b"garbage", "m.tflite")


# ------------------------------------------------------------------------- before any training starts


def test_build_bundle_refuses_before_any_transform(tmp_path: Path) -> None:
    from compressor.pipeline import build_bundle

    model = _model()
    lines: list[str] = []
    cases = [
        (_data(shape=(10, 10, 1)), DataMismatchError),
        (_data(classes=4, labels=tuple("abcd")), DataMismatchError),
        (_data(n=5), DataError),
    ]
    for data, err in cases:
        start = time.perf_counter()
        with pytest.raises(err):
            build_bundle(model, data, tmp_path / "b", progress=lines.append)
        assert time.perf_counter() - start < FAST_S
    assert not (tmp_path / "b").exists()
    assert not [line for line in lines if "epoch" in line or line.startswith(("transform", "convert"))]


def _run_cli(argv: list[str]) -> int:
    import argparse

    parser = argparse.ArgumentParser(prog="edgefleet")
    cli.register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return int(args.func(args))


@pytest.mark.parametrize(
    ("model_kind", "data_over", "needle"),
    [
        ("ok", {"x_train": np.zeros((30, 9, 9))}, "sample shape"),
        ("ok", {"y_val": np.arange(12) % 7}, "y_val holds class 6 .* model outputs 3 classes"),
        ("sigmoid", {}, "not a classifier: its last layer 'p'"),
        ("ok", {"x_val": np.zeros((3, 12, 12)), "y_val": np.arange(3)}, "x_val has 3 samples"),
        ("ok", {"x_train": np.full((30, 12, 12), np.inf)}, "x_train contains NaN or infinity"),
    ],
)
def test_cli_bad_input_exits_2_before_training(
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    keras_mod: Any,
    model_kind: str,
    data_over: dict[str, Any],
    needle: str,
) -> None:
    k = keras_mod
    head = None if model_kind == "ok" else (k.layers.Dense(1, activation="sigmoid", name="p"))
    _model(head).save(tmp_path / "m.keras")
    npz = _npz(tmp_path / "d.npz", **data_over)
    start = time.perf_counter()
    code = _run_cli(
        ["compress", "--model", str(tmp_path / "m.keras"), "--data", str(npz), "--out", str(tmp_path / "b")]
    )
    elapsed = time.perf_counter() - start
    err = capsys.readouterr().err
    assert code == 2, err
    assert elapsed < FAST_S, elapsed
    error_lines = [line for line in err.splitlines() if line.startswith("edgefleet compress: error:")]
    assert len(error_lines) == 1 and re.search(needle, error_lines[0]), err
    assert "epoch" not in err and "transform" not in err
    assert not (tmp_path / "b").exists()


def test_cli_unknown_recipe_key_exits_2_before_training(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    recipe = tmp_path / "r.toml"
    recipe.write_text('[[variants]]\nid = "float32"\nsteps = [{ kind = "quantize", mod = "float32" }]\n')
    start = time.perf_counter()
    code = _run_cli(["compress", "--demo", "--recipe", str(recipe), "--out", str(tmp_path / "b")])
    err = capsys.readouterr().err
    assert code == 2 and time.perf_counter() - start < FAST_S
    assert "steps[0].mod: unknown key; did you mean 'mode'?" in err and "epoch" not in err
    assert not (tmp_path / "b").exists()


# ---------------------------------------------------------------------------------- free input dimensions


def _free_dims_segmenter(k: Any) -> Any:
    inp = k.Input((None, None, 3), name="image")
    h = k.layers.Conv2D(4, 3, padding="same", activation="relu")(inp)
    return k.Model(inp, k.layers.Conv2D(2, 1, activation="softmax")(h), name="fcn")


def test_free_input_dims_stay_free_and_are_measured_on_the_rows(keras_mod: Any, tmp_path: Path) -> None:
    """A fully convolutional model with (None, None, 3) input keeps its free dimensions (-1 in the
    manifest: a device resizes to what it feeds); every variant, the GPTQ int4 one included, is built and
    measured on the rows' own shape."""
    from compressor.data import Rows
    from compressor.pipeline import build_bundle

    model = _free_dims_segmenter(keras_mod)
    rng = np.random.default_rng(0)
    rows = [Rows((rng.random((24, 20, 28, 3), dtype=np.float32),)) for _ in range(3)]
    result = build_bundle(
        model,
        Dataset("fcn", *rows),
        tmp_path / "b",
        recipe="generic",
        variants=["float32", "int8", "mixed4"],
        latency_budget_s=0.05,
    )
    by_id = {v.id: v for v in result.manifest.variants}
    assert {"float32", "int8", "mixed4"} <= set(by_id), result.failures
    for v in by_id.values():
        assert v.inputs[0].shape == [1, -1, -1, 3] and v.outputs[0].shape == [1, -1, -1, 2]
        assert v.metrics.named["cosine"] > 0.99
    with np.load(tmp_path / "b" / "int8.sample.npz") as sample:
        assert sample["x"].shape[1:] == (20, 28, 3)


def test_free_input_dims_without_rows_are_refused(keras_mod: Any, tmp_path: Path) -> None:
    from compressor.pipeline import build_bundle

    with pytest.raises(DataError, match=r"free dimensions.*--calibration FILE\.npz"):
        build_bundle(_free_dims_segmenter(keras_mod), None, tmp_path / "b", latency_budget_s=0.05)
    images = tmp_path / "images"
    images.mkdir()
    with pytest.raises(DataError, match="images cannot be sized"):
        build_bundle(
            _free_dims_segmenter(keras_mod), None, tmp_path / "b", calibration=images, latency_budget_s=0.05
        )
    assert not (tmp_path / "b").exists()


def test_legacy_h5_loads_and_other_model_paths_are_named(
    keras_mod: Any, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from compressor.models import load_keras_model

    model = _model()
    model.save(tmp_path / "m.h5")
    loaded = load_keras_model(tmp_path / "m.h5")
    assert loaded.count_params() == model.count_params()
    saved = tmp_path / "saved"
    saved.mkdir()
    (saved / "saved_model.pb").write_bytes(b"")
    (tmp_path / "fake.h5").write_bytes(b"not hdf5")
    (tmp_path / "model.onnx").write_bytes(b"\x08\x07")
    npz = _npz(tmp_path / "d.npz")
    for path, needle in [
        (saved, "is a directory, not a model file: convert it with tf.lite.TFLiteConverter.from_saved_model"),
        (tmp_path / "fake.h5", "is not an HDF5 file"),
        (tmp_path / "model.onnx", r"must be a Keras \.keras \(or legacy \.h5\) file, or a \.tflite"),
        (tmp_path / "gone.tflite", "does not exist"),
    ]:
        code = _run_cli(["compress", "--model", str(path), "--data", str(npz), "--out", str(tmp_path / "b")])
        err = capsys.readouterr().err
        assert code == 2 and re.search(needle, err), err
        assert not (tmp_path / "b").exists()
