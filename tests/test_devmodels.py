"""Development models (compressor.devmodels) and calibration images (compressor.images).

The slow tests train each dev model once (module cache), check that it learned with a real margin, and
that its float32 and float16-weight .tflite files run on ai-edge-litert and agree with Keras. The image
tests need only numpy, Pillow and scikit-learn.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from compressor import devmodels as dm
from compressor.errors import DataError
from compressor.images import (
    load_image_folder,
    parse_input_range,
    sample_images,
    write_sample_image_folder,
)

NAMES = list(dm.DEV_MODELS)

# --------------------------------------------------------------------------------------------------------
# dev models: fast checks (numpy only)


def test_registry_shape() -> None:
    assert set(NAMES) == {"detector", "segmenter", "keypoints", "audio", "tabular", "multi_input"}
    for name, spec in dm.DEV_MODELS.items():
        assert spec.name == name
        assert spec.task in ("classification", "generic")
        assert spec.epochs > 0
    assert dm.DEV_MODELS["multi_input"].num_inputs == 2
    assert dm.DEV_MODELS["detector"].num_outputs == 2


@pytest.mark.parametrize("name", NAMES)
def test_data_is_deterministic_and_keyed(name: str) -> None:
    spec = dm.DEV_MODELS[name]
    a, b, other = spec.data(0), spec.data(0), spec.data(1)
    assert a.keys() == b.keys()
    for key in a:
        np.testing.assert_array_equal(a[key], b[key])
    if name != "tabular":  # the table is fixed; seed 1 only reshuffles it
        assert not np.array_equal(a[next(iter(a))], other[next(iter(a))])
    else:
        assert not np.array_equal(a["y_train"], other["y_train"])
    for split in ("train", "val", "test"):
        xs = dm.split_arrays(a, split, "x")
        assert len(xs) == spec.num_inputs
        assert all(x.dtype == np.float32 and len(x) == len(xs[0]) > 0 for x in xs)
        if spec.task == "classification":
            y = a[f"y_{split}"]
            assert y.dtype == np.int64 and len(y) == len(xs[0])
            assert not any(k.startswith("t_") for k in a)
        else:
            ts = dm.split_arrays(a, split, "t")
            assert len(ts) == spec.num_outputs
            assert all(t.dtype == np.float32 and len(t) == len(xs[0]) for t in ts)
            assert not any(k.startswith("y_") for k in a)
    if spec.task == "classification":  # every class is present in training
        y = a["y_train"]
        assert len(np.unique(y)) == int(y.max()) + 1 >= 2


def test_detector_targets_decode_to_the_drawn_rectangle() -> None:
    data = dm.DEV_MODELS["detector"].data(0)
    x, boxes, scores = data["x_test"][:50], data["t_test_0"][:50], data["t_test_1"][:50]
    assert np.all(scores.sum(axis=1) == 1.0)
    decoded, best = dm.detector_decode(boxes, scores)
    assert np.all(best == 1.0)
    for img, (y0, x0, y1, x1) in zip(x, decoded * 32, strict=True):
        inside = img[round(y0) : round(y1), round(x0) : round(x1)]
        assert inside.size and inside.mean() > 0.6  # the bright rectangle, background is ≤ 0.3 + noise
    np.testing.assert_allclose(dm.box_iou(decoded, decoded), 1.0)
    shifted = decoded + np.array([0.0, 1.0, 0.0, 1.0], dtype=np.float32)  # moved a whole image away
    np.testing.assert_allclose(dm.box_iou(decoded, shifted), 0.0)


def test_mask_iou() -> None:
    t = np.zeros((1, 4, 4, 1), dtype=np.float32)
    t[0, :2] = 1.0
    assert dm.mask_iou(t, t) == 1.0
    p = np.zeros_like(t)
    p[0, :1] = 0.9
    assert dm.mask_iou(p, t) == pytest.approx(0.5)
    assert dm.mask_iou(np.zeros_like(t), np.zeros_like(t)) == 1.0


def test_unknown_name() -> None:
    with pytest.raises(KeyError, match="unknown dev model 'nope'"):
        dm.make("nope")


# --------------------------------------------------------------------------------------------------------
# dev models: training and conversion (slow)

_TRAINED: dict[str, tuple[Any, dict[str, np.ndarray], float]] = {}


def _trained(name: str) -> tuple[Any, dict[str, np.ndarray], float]:
    if name not in _TRAINED:
        start = time.perf_counter()
        model, data = dm.make(name, seed=0)
        _TRAINED[name] = (model, data, time.perf_counter() - start)
    return _TRAINED[name]


def _predict(model: Any, xs: list[np.ndarray]) -> list[np.ndarray]:
    out = model.predict(xs if len(xs) > 1 else xs[0], verbose=0, batch_size=256)
    return [np.asarray(o) for o in out] if isinstance(out, list | tuple) else [np.asarray(out)]


def quality(name: str, model: Any, data: dict[str, np.ndarray]) -> dict[str, float]:
    """Test-split quality of a trained dev model, with the trivial baseline for regressors."""
    outs = _predict(model, dm.split_arrays(data, "test", "x"))
    if dm.DEV_MODELS[name].task == "classification":
        y = data["y_test"]
        majority = float(np.mean(y == np.bincount(data["y_train"]).argmax()))
        return {"accuracy": float(np.mean(outs[0].argmax(axis=1) == y)), "majority": majority}
    if name == "detector":
        boxes, scores = outs
        truth, _ = dm.detector_decode(data["t_test_0"], data["t_test_1"])
        found, _ = dm.detector_decode(boxes, scores)
        return {
            "anchor_accuracy": float(np.mean(scores.argmax(axis=1) == data["t_test_1"].argmax(axis=1))),
            "box_iou": float(dm.box_iou(found, truth).mean()),
        }
    if name == "segmenter":
        return {"iou": dm.mask_iou(outs[0], data["t_test"])}
    if name == "keypoints":
        t = data["t_test"]
        return {
            "mse": float(np.mean((outs[0] - t) ** 2)),
            "trivial_mse": float(np.mean((data["t_train"].mean(axis=0) - t) ** 2)),
        }
    raise AssertionError(name)


@pytest.mark.slow
@pytest.mark.parametrize("name", NAMES)
def test_dev_model_learns(name: str) -> None:
    model, data, seconds = _trained(name)
    params = int(model.count_params())
    q = quality(name, model, data)
    print(f"{name}: {params} params, make {seconds:.1f} s, {q}")
    assert params < 100_000
    assert len(model.inputs) == dm.DEV_MODELS[name].num_inputs
    assert len(model.outputs) == dm.DEV_MODELS[name].num_outputs
    if name == "detector":
        assert q["anchor_accuracy"] >= 0.9  # chance 1/16
        assert q["box_iou"] >= 0.5
    elif name == "segmenter":
        assert q["iou"] >= 0.75
    elif name == "keypoints":
        assert q["mse"] <= q["trivial_mse"] / 4
    elif name == "audio":
        assert q["accuracy"] >= 0.8  # chance 0.25
    elif name == "tabular":
        assert q["accuracy"] >= 0.9 and q["accuracy"] >= q["majority"] + 0.2
    elif name == "multi_input":
        assert q["accuracy"] >= 0.85  # chance 0.25


def _cosine(a: np.ndarray, b: np.ndarray) -> float:
    a64, b64 = a.reshape(-1).astype(np.float64), b.reshape(-1).astype(np.float64)
    return float(a64 @ b64 / (np.linalg.norm(a64) * np.linalg.norm(b64)))


@pytest.mark.slow
@pytest.mark.parametrize("name", NAMES)
def test_dev_model_tflite_agrees_with_keras(name: str) -> None:
    from ai_edge_litert.interpreter import Interpreter

    model, data, _ = _trained(name)
    xs = [x[:100] for x in dm.split_arrays(data, "test", "x")]
    reference = _predict(model, xs)
    f32, f16 = dm.to_tflite_float32(model), dm.to_tflite_float16(model)
    assert len(f16) < len(f32)  # float16 weights
    for blob, min_cos in ((f32, 0.999), (f16, 0.99)):
        interpreter = Interpreter(model_content=blob)
        details = interpreter.get_input_details()
        assert sorted(tuple(d["shape"]) for d in details) == sorted((1, *x.shape[1:]) for x in xs)
        outs = dm.predict_tflite(blob, xs)
        assert len(outs) == len(reference)
        for got, want in zip(outs, reference, strict=True):
            assert got.shape == want.shape
            assert _cosine(got, want) >= min_cos
            assert np.isfinite(got).all()


@pytest.mark.slow
def test_multi_input_uses_both_inputs_and_tflite_by_name() -> None:
    model, data, _ = _trained("multi_input")
    image, vector, y = data["x_test_0"], data["x_test_1"], data["y_test"]

    def accuracy(img: np.ndarray, vec: np.ndarray) -> float:
        return float(np.mean(model.predict([img, vec], verbose=0).argmax(axis=1) == y))

    full = accuracy(image, vector)
    assert accuracy(image, np.zeros_like(vector)) < full - 0.25
    assert accuracy(np.zeros_like(image), vector) < full - 0.25
    blob = dm.to_tflite_float32(model)
    by_name = dm.predict_tflite(blob, {"vector": vector[:50], "image": image[:50]})[0]
    by_order = dm.predict_tflite(blob, [image[:50], vector[:50]])[0]
    np.testing.assert_array_equal(by_name, by_order)
    np.testing.assert_allclose(by_order, model.predict([image[:50], vector[:50]], verbose=0), atol=1e-5)


# --------------------------------------------------------------------------------------------------------
# calibration images


def _save(path: Path, arr: np.ndarray, **kw: Any) -> None:
    Image.fromarray(arr).save(path, **kw)


@pytest.fixture
def mixed_folder(tmp_path: Path) -> Path:
    """PNGs and JPEGs of odd sizes and modes, plus files that must be ignored."""
    rng = np.random.default_rng(0)
    d = tmp_path / "calib"
    d.mkdir()
    _save(d / "a_rgb.png", rng.integers(0, 256, (50, 70, 3), dtype=np.uint8))
    _save(d / "b_grey.png", rng.integers(0, 256, (20, 90), dtype=np.uint8))
    _save(d / "c_rgba.png", rng.integers(0, 256, (64, 64, 4), dtype=np.uint8))
    _save(d / "d_upper.JPG", rng.integers(0, 256, (100, 40, 3), dtype=np.uint8), quality=90)
    _save(d / "e_photo.jpeg", rng.integers(0, 256, (32, 32, 3), dtype=np.uint8))
    palette = Image.fromarray(rng.integers(0, 256, (30, 30, 3), dtype=np.uint8)).convert("P")
    palette.info["transparency"] = 0
    palette.save(d / "f_palette.png", transparency=0)
    _save(d / "g_grey16.png", (rng.integers(0, 65536, (40, 40))).astype(np.uint16))
    (d / "notes.txt").write_text("not an image")
    (d / "sub").mkdir()
    _save(d / "sub" / "ignored.png", np.zeros((8, 8, 3), dtype=np.uint8))
    return d


def test_folder_loads_every_image_to_shape_and_range(mixed_folder: Path) -> None:
    x = load_image_folder(mixed_folder, 32, 24, 3, (0.0, 1.0))
    assert x.shape == (7, 32, 24, 3) and x.dtype == np.float32
    assert x.min() >= 0.0 and x.max() <= 1.0 and x.std() > 0.1
    grey = load_image_folder(mixed_folder, 16, 16, 1, (-1.0, 1.0))
    assert grey.shape == (7, 16, 16, 1) and grey.min() >= -1.0 and grey.max() <= 1.0
    nchw = load_image_folder(mixed_folder, 16, 20, 3, (0.0, 255.0), layout="NCHW", limit=3)
    assert nchw.shape == (3, 3, 16, 20) and nchw.max() <= 255.0 and nchw.max() > 1.0
    nhwc = load_image_folder(mixed_folder, 16, 20, 3, (0.0, 255.0), limit=3)
    np.testing.assert_array_equal(nchw, nhwc.transpose(0, 3, 1, 2))


def test_folder_order_range_and_centre_crop(tmp_path: Path) -> None:
    white = np.full((10, 10, 3), 255, dtype=np.uint8)
    black = np.zeros((10, 10, 3), dtype=np.uint8)
    _save(tmp_path / "b.png", black)
    _save(tmp_path / "a.PNG", white)
    stripes = np.zeros((20, 60, 3), dtype=np.uint8)  # wide image: red 0-15 | green 15-45 | blue 45-60
    stripes[:, :15, 0] = 255
    stripes[:, 15:45, 1] = 255
    stripes[:, 45:, 2] = 255
    _save(tmp_path / "c.png", stripes)
    x = load_image_folder(tmp_path, 8, 8, 3, (-1.0, 1.0))
    np.testing.assert_allclose(x[0], 1.0)  # a.PNG first (sorted by name), white → high end
    np.testing.assert_allclose(x[1], -1.0)  # black → low end
    # aspect kept and centre-cropped: the 8x8 result comes from columns 20-40, all green (a squash
    # to 8x8 would show red and blue)
    np.testing.assert_allclose(x[2, ..., 1], 1.0)
    assert x[2, ..., 0].max() < -0.9 and x[2, ..., 2].max() < -0.9


def test_corrupt_and_truncated_images_name_the_file(tmp_path: Path) -> None:
    _save(tmp_path / "good.png", np.zeros((8, 8, 3), dtype=np.uint8))
    (tmp_path / "junk.jpg").write_bytes(b"definitely not a jpeg" * 10)
    with pytest.raises(DataError, match=r"junk\.jpg"):
        load_image_folder(tmp_path, 8, 8, 3, (0.0, 1.0))
    (tmp_path / "junk.jpg").unlink()
    _save(tmp_path / "photo.jpg", np.random.default_rng(1).integers(0, 256, (64, 64, 3), dtype=np.uint8))
    whole = (tmp_path / "photo.jpg").read_bytes()
    (tmp_path / "photo.jpg").write_bytes(whole[: len(whole) // 2])
    with pytest.raises(DataError, match=r"photo\.jpg"):
        load_image_folder(tmp_path, 8, 8, 3, (0.0, 1.0))


def test_empty_or_missing_folder(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"\*\.png, \*\.jpg, \*\.jpeg"):
        load_image_folder(tmp_path, 8, 8, 3, (0.0, 1.0))
    (tmp_path / "readme.txt").write_text("x")
    with pytest.raises(DataError, match="no images"):
        load_image_folder(tmp_path, 8, 8, 3, (0.0, 1.0))
    with pytest.raises(DataError, match="does not exist"):
        load_image_folder(tmp_path / "nope", 8, 8, 3, (0.0, 1.0))


def test_unconvertible_channels_and_bad_arguments(tmp_path: Path) -> None:
    _save(tmp_path / "x.png", np.zeros((8, 8, 3), dtype=np.uint8))
    with pytest.raises(DataError, match=r"4-channel input from image .*x\.png.*\.npz"):
        load_image_folder(tmp_path, 8, 8, 4, (0.0, 1.0))
    with pytest.raises(DataError, match="layout"):
        load_image_folder(tmp_path, 8, 8, 3, (0.0, 1.0), layout="HWC")
    with pytest.raises(DataError, match="low < high"):
        load_image_folder(tmp_path, 8, 8, 3, (1.0, 0.0))


@pytest.mark.parametrize(
    ("text", "expected"),
    [("0,1", (0.0, 1.0)), ("-1,1", (-1.0, 1.0)), ("0,255", (0.0, 255.0)), (" -0.5 , 2.5 ", (-0.5, 2.5))],
)
def test_parse_input_range(text: str, expected: tuple[float, float]) -> None:
    assert parse_input_range(text) == expected


@pytest.mark.parametrize("text", ["", "1", "1,0", "0,0", "0,1,2", "a,b", "0;1", "nan,1", "0,inf"])
def test_parse_input_range_rejects(text: str) -> None:
    with pytest.raises(DataError, match=r"0,1 or -1,1 or 0,255"):
        parse_input_range(text)


def test_sample_images_are_deterministic_and_realistic() -> None:
    a = sample_images(12, 24, 40, 3, (-1.0, 1.0), seed=5)
    b = sample_images(12, 24, 40, 3, (-1.0, 1.0), seed=5)
    c = sample_images(12, 24, 40, 3, (-1.0, 1.0), seed=6)
    assert a.shape == (12, 24, 40, 3) and a.dtype == np.float32
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)
    assert a.min() >= -1.0 and a.max() <= 1.0
    assert a.std() > 0.2  # photos, not flat fills
    assert len({round(float(im.mean()), 4) for im in a}) == 12  # every crop differs
    grey = sample_images(3, 16, 16, 1, (0.0, 255.0), layout="NCHW")
    assert grey.shape == (3, 1, 16, 16) and grey.max() > 1.0
    assert sample_images(0, 8, 8, 3, (0.0, 1.0)).shape == (0, 8, 8, 3)


def test_written_sample_folder_loads_back(tmp_path: Path) -> None:
    paths = write_sample_image_folder(tmp_path / "out", 5, (30, 50), seed=2)
    assert [p.suffix for p in paths] == [".png", ".jpg", ".png", ".jpg", ".png"]
    assert all(p.is_file() for p in paths)
    with Image.open(paths[1]) as im:
        assert im.size == (50, 30) and im.mode == "RGB"
    x = load_image_folder(tmp_path / "out", 30, 50, 3, (0.0, 255.0))
    ref = sample_images(5, 30, 50, 3, (0.0, 255.0), seed=2)
    assert x.shape == ref.shape
    np.testing.assert_allclose(x[0], ref[0], atol=0.5)  # PNG is lossless (up to rounding)
    assert np.abs(x[1] - ref[1]).mean() < 8.0  # JPEG is close
