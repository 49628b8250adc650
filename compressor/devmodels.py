"""Tiny Keras 3 models of every task the compressor serves, with seeded synthetic data, for dev and tests.

Every model trains in seconds on 2 CPU cores, has fewer than 100k parameters, and learns something real
from a deterministic numpy generator (``numpy.random.default_rng(seed)``; no network, scikit-learn's
bundled breast-cancer table for ``tabular``). :data:`DEV_MODELS` maps a name to a :class:`DevModelSpec`;
:func:`make` builds, trains and returns ``(model, data)``.

The models (``A`` anchors, ``K`` keypoints):

``detector`` (generic, 1 input, 2 outputs)
    (N, 32, 32, 3) noisy dark image with one bright coloured rectangle (4–12 px a side) →
    ``boxes`` (N, 16, 4) and ``scores`` (N, 16), one anchor per cell of a 4×4 grid (8×8 px cells), like
    the raw outputs of SSD/BlazeFace. ``scores`` (sigmoid) is 1 for the anchor whose cell holds the
    rectangle's centre. ``boxes`` holds per anchor ``(dy, dx, h, w)``: the centre's offset from the
    anchor's cell centre in cell units (−0.5..0.5) and the size as a fraction of the image; it is trained
    only at the positive anchor (masked MSE). :func:`detector_decode` turns outputs into one box per image.
    Backbone of three stride-2 Conv 3×3 (32 → 4) and a Conv 3×3 on the grid, two 1×1 conv heads;
    8.5k parameters.
``segmenter`` (generic, 1 input, 1 output)
    (N, 32, 32, 3) noisy background of a random dark colour with 1–3 bright filled circles/rectangles →
    (N, 32, 32, 1) sigmoid mask of the shapes. A small U-Net: a full-resolution Conv2D, two stride-2 Conv2D
    down (32 → 8), a bottleneck Conv2D, two stride-2 Conv2DTranspose up, each followed by a Concatenate with
    the encoder's feature map of that size, a 1×1 sigmoid head; 22.5k parameters.
``keypoints`` (generic, 1 input, 1 output)
    (N, 32, 32, 3) with a red, a green and a blue Gaussian blob → (N, 6) ``(x, y)`` of each blob centre,
    normalised to 0..1 (red, green, blue order). Three stride-2 Conv 3×3, Flatten, Dense 32, Dense 6
    (linear); 12.1k parameters.
``audio`` (classification, 1 input, 1 output)
    (N, 256) raw waveform: a sine of random phase and amplitude plus Gaussian noise; the class (4) is its
    frequency band (2–4, 6–9, 13–19 or 28–40 cycles per window). The model reshapes to (256, 1) itself,
    then Conv1D ×3 with MaxPooling1D, GlobalAveragePooling1D, Dense softmax; 2.9k parameters.
``tabular`` (classification, 1 input, 1 output)
    (N, 30) scikit-learn's breast-cancer table (569 rows, bundled), standardised with the training split's
    mean and std → 2-class softmax. MLP 30 → 32 → 16 → 2; 1.6k parameters.
``multi_input`` (classification, 2 inputs, 1 output)
    ``image`` (N, 16, 16, 1) with a horizontal or vertical bar and ``vector`` (N, 8) Gaussian features →
    4-class softmax, class = 2·(bar is vertical) + (w·vector > 0) for a fixed w, so both inputs are needed
    (dropping either input leaves at most 50 % accuracy). Conv branch + Dense branch, Concatenate,
    Dense; 1.3k parameters.

Data dictionaries (numpy only): a single input is ``x_train``, ``x_val``, ``x_test`` (float32, batch
first); several inputs are ``x_train_0``, ``x_train_1``, … in the model's input order. Classifiers add
``y_train``/``y_val``/``y_test`` (int64 class indices). The others add targets ``t_train``/``t_val``/
``t_test`` (float32), or ``t_train_0``, ``t_train_1``, … in the model's output order when it has several
outputs; targets are what the model was trained on, and ``t_val``/``t_test`` serve quality checks.

:func:`to_tflite_float32` and :func:`to_tflite_float16` convert with ``TFLiteConverter.from_keras_model``
on a batch-1 functional wrapper (FACTS.md: never ``from_concrete_functions``, which drops Keras 3
weights). The converted file does **not** keep the Keras order in ``get_input_details()`` /
``get_output_details()`` (measured: the detector lists ``scores`` before ``boxes``, multi_input ``vector``
before ``image``); its ``serving_default`` signature does: inputs by their Keras names (the dev models'
names sort in Keras order), outputs ``output_0``, ``output_1``, … in Keras order. :func:`predict_tflite`
runs a .tflite through that signature. TensorFlow is imported lazily (``compressor._tf``).

:func:`mobilenet_digits` (with :func:`mobilenet_digits_data` and :func:`train_mobilenet_digits`) is a
MobileNet-style digits classifier for pruning and distillation work (a width multiplier: 9.9k parameters
at 1.0, 119k at 4.0); it is not in :data:`DEV_MODELS`.

Splits (train/val/test): detector 1600/400/400, segmenter 800/200/200, keypoints 1400/300/300, audio
1000/300/300, tabular 341/114/114, multi_input 1400/300/300. Training uses the training split only.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from compressor._tf import keras, quiet_stdout, tf
from compressor.errors import ConversionError

Data = dict[str, np.ndarray]

DETECTOR_GRID = 4
DETECTOR_ANCHORS = DETECTOR_GRID * DETECTOR_GRID
KEYPOINTS = 3
AUDIO_SAMPLES = 256
AUDIO_BANDS: tuple[tuple[float, float], ...] = ((2.0, 4.0), (6.0, 9.0), (13.0, 19.0), (28.0, 40.0))
_MULTI_W = np.array([1.0, -1.0, 0.8, -0.6, 0.5, 0.3, -0.4, 0.7], dtype=np.float32)


@dataclass(frozen=True, slots=True)
class DevModelSpec:
    """One development model: how to build it, its data, how to train it and what it is."""

    name: str
    task: str  # "classification" | "generic"
    description: str
    build: Callable[[int, float], Any]  # (seed, width) -> keras.Model (not compiled)
    data: Callable[[int], Data]  # seed -> arrays (see the module docstring)
    train: Callable[[Any, Data, int, int], dict[str, list[float]]]  # (model, data, epochs, seed) -> history
    epochs: int  # default number of training epochs
    num_inputs: int = 1
    num_outputs: int = 1


# --------------------------------------------------------------------------------------------------------
# helpers


def _seed(seed: int) -> None:
    keras().utils.set_random_seed(seed)


def _n(units: int, width: float) -> int:
    """A layer's filters/units at ``width`` (1.0 = the tests' tiny size)."""
    return max(1, round(units * width))


def _split(arrays: dict[str, np.ndarray], n_train: int, n_val: int) -> Data:
    """``{"x": a, "t_0": b}`` → ``{"x_train": a[:n_train], "x_val": …, "x_test": …, "t_train_0": …}``."""
    out: Data = {}
    for key, arr in arrays.items():
        prefix, _, suffix = key.partition("_")
        tail = f"_{suffix}" if suffix else ""
        out[f"{prefix}_train{tail}"] = arr[:n_train]
        out[f"{prefix}_val{tail}"] = arr[n_train : n_train + n_val]
        out[f"{prefix}_test{tail}"] = arr[n_train + n_val :]
    return out


def split_arrays(data: Data, split: str, letter: str) -> list[np.ndarray]:
    """The arrays of one split in model order: ``split_arrays(d, "test", "x")`` → ``[x_test]`` or
    ``[x_test_0, x_test_1, ...]``; ``letter`` is ``x``, ``y`` or ``t``."""
    single = f"{letter}_{split}"
    if single in data:
        return [data[single]]
    out: list[np.ndarray] = []
    while f"{single}_{len(out)}" in data:
        out.append(data[f"{single}_{len(out)}"])
    return out


def _fit(
    model: Any,
    data: Data,
    epochs: int,
    seed: int,
    *,
    loss: Any,
    target: str,
    metrics: Any = None,
    learning_rate: float = 3e-3,
    batch_size: int = 64,
    train_targets: list[np.ndarray] | None = None,
) -> dict[str, list[float]]:
    """Compile and fit on the training split (no validation pass: the per-epoch overhead is what counts
    for models this small). Returns the Keras history dict."""
    k = keras()
    _seed(seed)
    model.compile(optimizer=k.optimizers.Adam(learning_rate), loss=loss, metrics=metrics)
    xs = split_arrays(data, "train", "x")
    ys = train_targets if train_targets is not None else split_arrays(data, "train", target)
    history = model.fit(
        xs if len(xs) > 1 else xs[0],
        ys if len(ys) > 1 else ys[0],
        epochs=epochs,
        batch_size=batch_size,
        shuffle=True,
        verbose=0,
    )
    return {key: [float(v) for v in values] for key, values in history.history.items()}


def _train_classifier(model: Any, data: Data, epochs: int, seed: int) -> dict[str, list[float]]:
    return _fit(
        model, data, epochs, seed, loss="sparse_categorical_crossentropy", target="y", metrics=["accuracy"]
    )


def _noise_background(rng: np.random.Generator, n: int, size: int, low: float, high: float) -> np.ndarray:
    base = rng.uniform(low, high, (n, 1, 1, 3))
    return base + rng.normal(0.0, 0.05, (n, size, size, 3))


# --------------------------------------------------------------------------------------------------------
# detector


def _detector_data(seed: int) -> Data:
    rng = np.random.default_rng(seed)
    n, size, g = 2400, 32, DETECTOR_GRID
    x = _noise_background(rng, n, size, 0.0, 0.3)
    boxes = np.zeros((n, DETECTOR_ANCHORS, 4), dtype=np.float32)
    scores = np.zeros((n, DETECTOR_ANCHORS), dtype=np.float32)
    for i in range(n):
        h, w = rng.integers(4, 13, size=2)
        y0, x0 = rng.integers(0, size - h + 1), rng.integers(0, size - w + 1)
        x[i, y0 : y0 + h, x0 : x0 + w] = rng.uniform(0.7, 1.0, 3)
        cy, cx = (y0 + h / 2) / size, (x0 + w / 2) / size
        r, c = min(int(cy * g), g - 1), min(int(cx * g), g - 1)
        a = r * g + c
        scores[i, a] = 1.0
        boxes[i, a] = ((cy - (r + 0.5) / g) * g, (cx - (c + 0.5) / g) * g, h / size, w / size)
    x = np.clip(x, 0.0, 1.0).astype(np.float32)
    return _split({"x": x, "t_0": boxes, "t_1": scores}, 1600, 400)


def _strided_backbone(lay: Any, h: Any, width: float) -> Any:
    """Three stride-2 3x3 convs (8, 16, 16 filters at width 1): 32 -> 16 -> 8 -> 4."""
    for i, filters in enumerate((8, 16, 16)):
        h = lay.Conv2D(
            _n(filters, width), 3, strides=2, padding="same", activation="relu", name=f"conv{i + 1}"
        )(h)
    return h


def _build_detector(seed: int, width: float = 1.0) -> Any:
    k = keras()
    _seed(seed)
    lay = k.layers
    inp = k.Input(shape=(32, 32, 3), name="image")
    h = _strided_backbone(lay, inp, width)
    h = lay.Conv2D(_n(32, width), 3, padding="same", activation="relu", name="conv4")(
        h
    )  # 4x4 grid, wider context
    boxes = lay.Conv2D(4, 1, name="box_head")(h)
    boxes = lay.Reshape((DETECTOR_ANCHORS, 4), name="boxes")(boxes)
    scores = lay.Conv2D(1, 1, activation="sigmoid", name="score_head")(h)
    scores = lay.Reshape((DETECTOR_ANCHORS,), name="scores")(scores)
    return k.Model(inp, [boxes, scores], name="detector")


def _masked_box_loss(y_true: Any, y_pred: Any) -> Any:
    """MSE over the positive anchors only: ``y_true`` is (N, A, 5) = box target + positive mask."""
    ops = keras().ops
    mask = y_true[..., 4:5]
    err = ops.square(y_true[..., :4] - y_pred) * mask
    return ops.sum(err, axis=(1, 2)) / ops.maximum(ops.sum(mask, axis=(1, 2)), 1.0)


def _train_detector(model: Any, data: Data, epochs: int, seed: int) -> dict[str, list[float]]:
    boxes, scores = data["t_train_0"], data["t_train_1"]
    return _fit(
        model,
        data,
        epochs,
        seed,
        loss=[_masked_box_loss, "binary_crossentropy"],
        target="t",
        train_targets=[np.concatenate([boxes, scores[..., None]], axis=-1), scores],
    )


def detector_decode(boxes: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The best-scoring anchor's box per image as ``(ymin, xmin, ymax, xmax)`` in 0..1, and its score."""
    boxes, scores = np.asarray(boxes, dtype=np.float64), np.asarray(scores, dtype=np.float64)
    g = DETECTOR_GRID
    best = np.argmax(scores, axis=1)
    rows = np.arange(len(best))
    dy, dx, h, w = (boxes[rows, best, j] for j in range(4))
    cy = (best // g + 0.5 + dy) / g
    cx = (best % g + 0.5 + dx) / g
    decoded = np.stack([cy - h / 2, cx - w / 2, cy + h / 2, cx + w / 2], axis=1)
    return decoded.astype(np.float32), scores[rows, best].astype(np.float32)


def box_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Row-wise IoU of two (N, 4) ``(ymin, xmin, ymax, xmax)`` box arrays."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    ih = np.clip(np.minimum(a[:, 2], b[:, 2]) - np.maximum(a[:, 0], b[:, 0]), 0.0, None)
    iw = np.clip(np.minimum(a[:, 3], b[:, 3]) - np.maximum(a[:, 1], b[:, 1]), 0.0, None)
    inter = ih * iw

    def area(z: np.ndarray) -> np.ndarray:
        return np.clip(z[:, 2] - z[:, 0], 0, None) * np.clip(z[:, 3] - z[:, 1], 0, None)

    return inter / np.maximum(area(a) + area(b) - inter, 1e-12)


# --------------------------------------------------------------------------------------------------------
# segmenter


def _segmenter_data(seed: int) -> Data:
    rng = np.random.default_rng(seed)
    n, size = 1200, 32
    x = _noise_background(rng, n, size, 0.0, 0.35)
    mask = np.zeros((n, size, size, 1), dtype=np.float32)
    yy, xx = np.mgrid[0:size, 0:size]
    for i in range(n):
        for _ in range(rng.integers(1, 4)):
            if rng.random() < 0.5:
                cy, cx, r = rng.uniform(4, 28), rng.uniform(4, 28), rng.uniform(3, 8)
                shape = (yy - cy) ** 2 + (xx - cx) ** 2 <= r * r
            else:
                h, w = rng.integers(4, 15, size=2)
                y0, x0 = rng.integers(0, size - h + 1), rng.integers(0, size - w + 1)
                shape = (yy >= y0) & (yy < y0 + h) & (xx >= x0) & (xx < x0 + w)
            colour = rng.uniform(0.0, 0.5, 3)
            colour[rng.integers(0, 3)] = rng.uniform(0.7, 1.0)
            x[i][shape] = colour + rng.normal(0.0, 0.05, (int(shape.sum()), 3))
            mask[i, ..., 0][shape] = 1.0
    x = np.clip(x, 0.0, 1.0).astype(np.float32)
    return _split({"x": x, "t": mask}, 800, 200)


def _build_segmenter(seed: int, width: float = 1.0) -> Any:
    k = keras()
    _seed(seed)
    lay = k.layers
    inp = k.Input(shape=(32, 32, 3), name="image")
    e1 = lay.Conv2D(_n(8, width), 3, padding="same", activation="relu", name="enc1")(inp)  # 32x32x8
    e2 = lay.Conv2D(_n(16, width), 3, strides=2, padding="same", activation="relu", name="down1")(
        e1
    )  # 16x16x16
    h = lay.Conv2D(_n(32, width), 3, strides=2, padding="same", activation="relu", name="down2")(e2)  # 8x8x32
    h = lay.Conv2D(_n(32, width), 3, padding="same", activation="relu", name="bottleneck")(h)
    h = lay.Conv2DTranspose(_n(16, width), 2, strides=2, activation="relu", name="up2")(h)  # 16x16x16
    h = lay.Concatenate(name="skip2")([h, e2])
    h = lay.Conv2D(_n(16, width), 3, padding="same", activation="relu", name="dec2")(h)
    h = lay.Conv2DTranspose(_n(8, width), 2, strides=2, activation="relu", name="up1")(h)  # 32x32x8
    h = lay.Concatenate(name="skip1")([h, e1])
    out = lay.Conv2D(1, 1, activation="sigmoid", name="mask")(h)
    return k.Model(inp, out, name="segmenter")


def _train_segmenter(model: Any, data: Data, epochs: int, seed: int) -> dict[str, list[float]]:
    return _fit(model, data, epochs, seed, loss="binary_crossentropy", target="t")


def mask_iou(pred: np.ndarray, target: np.ndarray, threshold: float = 0.5) -> float:
    """Intersection over union of ``pred > threshold`` and ``target > 0.5`` over the whole array."""
    p, t = np.asarray(pred) > threshold, np.asarray(target) > 0.5
    union = np.logical_or(p, t).sum()
    return float(np.logical_and(p, t).sum() / union) if union else 1.0


# --------------------------------------------------------------------------------------------------------
# keypoints


def _keypoints_data(seed: int) -> Data:
    rng = np.random.default_rng(seed)
    n, size = 2000, 32
    x = _noise_background(rng, n, size, 0.0, 0.2)
    coords = rng.uniform(0.1, 0.9, (n, KEYPOINTS, 2))  # (x, y) in 0..1
    sigma = rng.uniform(1.5, 2.5, (n, KEYPOINTS))
    pix = (np.arange(size) + 0.5) / size
    for j in range(KEYPOINTS):
        cx, cy = coords[:, j, 0, None, None], coords[:, j, 1, None, None]
        s = (sigma[:, j] / size)[:, None, None]
        blob = np.exp(-((pix[None, :, None] - cy) ** 2 + (pix[None, None, :] - cx) ** 2) / (2 * s * s))
        x[..., j] += 0.8 * blob
    x = np.clip(x, 0.0, 1.0).astype(np.float32)
    return _split({"x": x, "t": coords.reshape(n, KEYPOINTS * 2).astype(np.float32)}, 1400, 300)


def _build_keypoints(seed: int, width: float = 1.0) -> Any:
    k = keras()
    _seed(seed)
    lay = k.layers
    inp = k.Input(shape=(32, 32, 3), name="image")
    h = _strided_backbone(lay, inp, width)
    h = lay.Flatten(name="flatten")(h)  # 4*4*16 = 256 at width 1
    h = lay.Dense(_n(32, width), activation="relu", name="fc")(h)
    out = lay.Dense(KEYPOINTS * 2, name="keypoints")(h)
    return k.Model(inp, out, name="keypoints")


def _train_keypoints(model: Any, data: Data, epochs: int, seed: int) -> dict[str, list[float]]:
    return _fit(model, data, epochs, seed, loss="mse", target="t")


# --------------------------------------------------------------------------------------------------------
# audio


def _audio_data(seed: int) -> Data:
    rng = np.random.default_rng(seed)
    n, t = 1600, AUDIO_SAMPLES
    y = rng.integers(0, len(AUDIO_BANDS), n)
    bands = np.array(AUDIO_BANDS)
    freq = rng.uniform(bands[y, 0], bands[y, 1])
    phase = rng.uniform(0, 2 * np.pi, n)
    amp = rng.uniform(0.5, 1.0, n)
    steps = np.arange(t)
    x = amp[:, None] * np.sin(2 * np.pi * freq[:, None] * steps[None, :] / t + phase[:, None])
    x += rng.normal(0.0, 0.3, (n, t))
    return _split({"x": x.astype(np.float32), "y": y.astype(np.int64)}, 1000, 300)


def _build_audio(seed: int, width: float = 1.0) -> Any:
    k = keras()
    _seed(seed)
    lay = k.layers
    inp = k.Input(shape=(AUDIO_SAMPLES,), name="waveform")
    h = lay.Reshape((AUDIO_SAMPLES, 1), name="to_channels")(inp)
    h = lay.Conv1D(_n(8, width), 9, strides=2, padding="same", activation="relu", name="conv1")(h)  # 128
    h = lay.MaxPooling1D(2, name="pool1")(h)  # 64
    h = lay.Conv1D(_n(16, width), 7, padding="same", activation="relu", name="conv2")(h)
    h = lay.MaxPooling1D(2, name="pool2")(h)  # 32
    h = lay.Conv1D(_n(16, width), 7, padding="same", activation="relu", name="conv3")(h)
    h = lay.GlobalAveragePooling1D(name="gap")(h)
    out = lay.Dense(len(AUDIO_BANDS), activation="softmax", name="probs")(h)
    return k.Model(inp, out, name="audio")


# --------------------------------------------------------------------------------------------------------
# tabular


def _tabular_data(seed: int) -> Data:
    from sklearn.datasets import load_breast_cancer

    bunch = load_breast_cancer()
    x, y = np.asarray(bunch.data, dtype=np.float64), np.asarray(bunch.target, dtype=np.int64)
    order = np.random.default_rng(seed).permutation(len(x))
    x, y = x[order], y[order]
    n_train, n_val = 341, 114
    mean, std = x[:n_train].mean(axis=0), x[:n_train].std(axis=0)
    x = (x - mean) / np.where(std > 0, std, 1.0)
    return _split({"x": x.astype(np.float32), "y": y}, n_train, n_val)


def _build_tabular(seed: int, width: float = 1.0) -> Any:
    k = keras()
    _seed(seed)
    lay = k.layers
    inp = k.Input(shape=(30,), name="features")
    h = lay.Dense(_n(32, width), activation="relu", name="fc1")(inp)
    h = lay.Dense(_n(16, width), activation="relu", name="fc2")(h)
    out = lay.Dense(2, activation="softmax", name="probs")(h)
    return k.Model(inp, out, name="tabular")


# --------------------------------------------------------------------------------------------------------
# multi_input


def _multi_input_data(seed: int) -> Data:
    rng = np.random.default_rng(seed)
    n, size = 2000, 16
    img = rng.normal(0.0, 0.1, (n, size, size, 1)) + rng.uniform(0.0, 0.2, (n, 1, 1, 1))
    vertical = rng.integers(0, 2, n)
    for i in range(n):
        length = rng.integers(8, 15)
        pos = rng.integers(1, size - 1)
        start = rng.integers(0, size - length + 1)
        if vertical[i]:
            img[i, start : start + length, pos, 0] += 0.8
        else:
            img[i, pos, start : start + length, 0] += 0.8
    vec = rng.normal(0.0, 1.0, (n, 8)).astype(np.float32)
    y = 2 * vertical + (vec @ _MULTI_W > 0).astype(np.int64)
    img = np.clip(img, 0.0, 1.0).astype(np.float32)
    return _split({"x_0": img, "x_1": vec, "y": y.astype(np.int64)}, 1400, 300)


def _build_multi_input(seed: int, width: float = 1.0) -> Any:
    k = keras()
    _seed(seed)
    lay = k.layers
    image = k.Input(shape=(16, 16, 1), name="image")
    vector = k.Input(shape=(8,), name="vector")
    h = lay.Conv2D(_n(8, width), 3, padding="same", activation="relu", name="conv1")(image)
    h = lay.MaxPooling2D(2, name="pool1")(h)
    h = lay.Conv2D(_n(8, width), 3, padding="same", activation="relu", name="conv2")(h)
    h = lay.GlobalMaxPooling2D(name="gmp")(h)
    v = lay.Dense(_n(16, width), activation="relu", name="vec_fc")(vector)
    h = lay.Concatenate(name="join")([h, v])
    h = lay.Dense(_n(16, width), activation="relu", name="fc")(h)
    out = lay.Dense(4, activation="softmax", name="probs")(h)
    return k.Model([image, vector], out, name="multi_input")


# --------------------------------------------------------------------------------------------------------
# registry and conveniences


DEV_MODELS: dict[str, DevModelSpec] = {
    "detector": DevModelSpec(
        "detector",
        "generic",
        "32x32x3 image -> boxes (N,16,4) + scores (N,16) on a 4x4 anchor grid; one bright rectangle",
        _build_detector,
        _detector_data,
        _train_detector,
        epochs=12,
        num_outputs=2,
    ),
    "segmenter": DevModelSpec(
        "segmenter",
        "generic",
        "small U-Net: 32x32x3 image -> 32x32x1 sigmoid mask of bright circles/rectangles",
        _build_segmenter,
        _segmenter_data,
        _train_segmenter,
        epochs=8,
    ),
    "keypoints": DevModelSpec(
        "keypoints",
        "generic",
        "32x32x3 image -> (x, y) of a red, a green and a blue blob, 0..1 (N, 6)",
        _build_keypoints,
        _keypoints_data,
        _train_keypoints,
        epochs=15,
    ),
    "audio": DevModelSpec(
        "audio",
        "classification",
        "1-D conv on a raw (N, 256) waveform -> 4 frequency-band classes",
        _build_audio,
        _audio_data,
        _train_classifier,
        epochs=6,
    ),
    "tabular": DevModelSpec(
        "tabular",
        "classification",
        "MLP on sklearn's breast-cancer table (N, 30), standardised -> 2 classes",
        _build_tabular,
        _tabular_data,
        _train_classifier,
        epochs=20,
    ),
    "multi_input": DevModelSpec(
        "multi_input",
        "classification",
        "image (N,16,16,1) bar orientation + vector (N,8) linear sign -> 4 classes; needs both inputs",
        _build_multi_input,
        _multi_input_data,
        _train_classifier,
        epochs=10,
        num_inputs=2,
    ),
}


def make(name: str, seed: int = 0, epochs: int | None = None, width: float = 1.0) -> tuple[Any, Data]:
    """Build, train (``epochs`` or the model's default) and return ``(model, data)`` for a dev model.
    ``width`` multiplies every hidden layer's filters/units (1.0: the tests' tiny size, 1.5k-10k weights;
    benches/models.py uses 4.0, where the graph's own bytes no longer dominate the file)."""
    if not width > 0:
        raise ValueError(f"width {width} must be positive")
    try:
        spec = DEV_MODELS[name]
    except KeyError:
        raise KeyError(f"unknown dev model {name!r}; known: {', '.join(DEV_MODELS)}") from None
    data = spec.data(seed)
    model = spec.build(seed, width)
    spec.train(model, data, spec.epochs if epochs is None else epochs, seed)
    return model, data


def batch1_wrapper(model: Any) -> Any:
    """A functional model sharing ``model``'s weights with every input at a fixed batch size of 1.

    Inputs keep their names (and so their order in the .tflite signature); outputs keep their order.
    """
    k = keras()
    inputs = [
        k.Input(shape=tuple(spec.shape[1:]), batch_size=1, dtype=spec.dtype, name=_input_name(spec, i))
        for i, spec in enumerate(model.inputs)
    ]
    outputs = model(inputs if len(inputs) > 1 else inputs[0])
    if isinstance(outputs, dict):
        outputs = [outputs[key] for key in model.output_names]
    return k.Model(inputs if len(inputs) > 1 else inputs[0], outputs, name=f"{model.name}_b1")


def _input_name(spec: Any, index: int) -> str:
    name = getattr(spec, "name", None) or f"input_{index}"
    return str(name).split(":")[0]


def to_tflite_float32(model: Any) -> bytes:
    """Float32 .tflite bytes of ``model`` with a batch-1 input signature."""
    return _convert(model, float16=False)


def to_tflite_float16(model: Any) -> bytes:
    """.tflite bytes with float16 weights (Optimize.DEFAULT + supported_types float16), batch-1 inputs."""
    return _convert(model, float16=True)


def _convert(model: Any, *, float16: bool) -> bytes:
    t = tf()
    try:
        converter = t.lite.TFLiteConverter.from_keras_model(batch1_wrapper(model))
        if float16:
            converter.optimizations = [t.lite.Optimize.DEFAULT]
            converter.target_spec.supported_types = [t.float16]
        with quiet_stdout():
            return bytes(converter.convert())
    except Exception as err:  # TF raises ConverterError, ValueError, RuntimeError, ...
        kind = "float16" if float16 else "float32"
        raise ConversionError(f"TFLite conversion ({kind}) of {model.name!r} failed: {err}") from err


def predict_tflite(tflite: bytes, inputs: list[np.ndarray] | dict[str, np.ndarray]) -> list[np.ndarray]:
    """Run a batch-1 float .tflite sample by sample with ai-edge-litert; outputs in the Keras order.

    The converter does not keep the Keras order in ``get_input_details()``/``get_output_details()``
    (the detector's scores come before its boxes, multi_input's vector before its image), so inputs and
    outputs are matched through the ``serving_default`` signature: ``inputs`` is a dict by input name, or
    a list in the order of the signature's input names (the dev models' input names sort in their
    Keras order); outputs ``output_0``, ``output_1``, ... are the Keras outputs in order. A file without
    a signature is run in tensor order.
    """
    from ai_edge_litert.interpreter import Interpreter

    interpreter = Interpreter(model_content=tflite, num_threads=1)
    signatures = interpreter.get_signature_list()
    if not signatures:
        return _predict_by_tensor_order(
            interpreter, list(inputs.values()) if isinstance(inputs, dict) else inputs
        )
    key = "serving_default" if "serving_default" in signatures else next(iter(signatures))
    runner = interpreter.get_signature_runner(key)
    in_names = list(signatures[key]["inputs"])
    out_names = sorted(signatures[key]["outputs"], key=_natural_key)
    feed_all = inputs if isinstance(inputs, dict) else dict(zip(in_names, inputs, strict=True))
    count = len(next(iter(feed_all.values())))
    results: list[list[np.ndarray]] = [[] for _ in out_names]
    for i in range(count):
        out = runner(**{name: np.ascontiguousarray(x[i : i + 1]) for name, x in feed_all.items()})
        for j, name in enumerate(out_names):
            results[j].append(np.asarray(out[name]))
    return [np.concatenate(r, axis=0) for r in results]


def _predict_by_tensor_order(interpreter: Any, inputs: list[np.ndarray]) -> list[np.ndarray]:
    interpreter.allocate_tensors()
    in_det, out_det = interpreter.get_input_details(), interpreter.get_output_details()
    results: list[list[np.ndarray]] = [[] for _ in out_det]
    for i in range(len(inputs[0])):
        for det, x in zip(in_det, inputs, strict=True):
            interpreter.set_tensor(det["index"], np.ascontiguousarray(x[i : i + 1], dtype=det["dtype"]))
        interpreter.invoke()
        for j, det in enumerate(out_det):
            results[j].append(np.array(interpreter.get_tensor(det["index"])))
    return [np.concatenate(r, axis=0) for r in results]


def _natural_key(name: str) -> tuple[str, int]:
    """``output_10`` sorts after ``output_9``."""
    head = name.rstrip("0123456789")
    tail = name[len(head) :]
    return head, int(tail) if tail else -1


# --------------------------------------------------------------------------------------------------------
# MobileNet-style digits classifier (not in DEV_MODELS: a pruning/distillation benchmark, not a task)

MOBILENET_SIZE = 32
# (stride, pointwise filters, residual) of the depthwise-separable blocks after the stem; the residual
# block adds its (linear, BN-ed) projection to its input.
_MOBILENET_BLOCKS: tuple[tuple[int, int, bool], ...] = (
    (1, 24, False),
    (2, 48, False),
    (1, 48, True),
    (2, 58, False),
)
_MOBILENET_STEM = 16


def mobilenet_digits_data(seed: int = 0) -> Any:
    """scikit-learn's digits upsampled (bilinear) to 32×32×1 in [0, 1], as a :class:`compressor.data.Dataset`.

    Same stratified 70/10/20 split as :func:`compressor.data.load_digits` (1257/180/360 rows).
    """
    from sklearn.datasets import load_digits as sk_load_digits
    from sklearn.model_selection import train_test_split

    from compressor.data import Dataset, upsample

    bunch = sk_load_digits()
    images = np.asarray(bunch.images, dtype=np.float64) / 16.0
    x = np.clip(upsample(images, MOBILENET_SIZE), 0.0, 1.0)[..., np.newaxis]
    y = np.asarray(bunch.target, dtype=np.int64)
    x_rest, x_test, y_rest, y_test = train_test_split(x, y, test_size=0.2, random_state=seed, stratify=y)
    x_train, x_val, y_train, y_val = train_test_split(
        x_rest, y_rest, test_size=0.1 / 0.8, random_state=seed, stratify=y_rest
    )
    return Dataset.from_arrays(
        "digits32", x_train, y_train, x_val, y_val, x_test, y_test, labels=tuple(str(i) for i in range(10))
    )


def mobilenet_digits(width: float = 1.0, seed: int = 0) -> Any:
    """A MobileNet-style classifier for 32×32×1 digits (not compiled, seeded weights).

    Stem Conv 3×3 stride 2 (no bias) + BatchNormalization + ReLU6, then depthwise-separable blocks
    (DepthwiseConv 3×3 + BN + ReLU6, pointwise Conv 1×1 + BN [+ ReLU6]): 16→24, 24→48 stride 2, a residual
    48→48 block whose linear projection is added to its input (``Add``), 48→58 stride 2;
    GlobalAveragePooling2D and Dense(10, softmax). Channel counts are multiplied by ``width`` (at least
    4): width 1.0 has 9,902 parameters, 0.5 has 3,300, 4.0 has 119,066.
    """
    if width <= 0:
        raise ValueError(f"width must be > 0, got {width}")
    k = keras()
    _seed(seed)
    lay = k.layers

    def ch(c: int) -> int:
        return max(4, round(c * width))

    def bn_act(h: Any, name: str, act: bool = True) -> Any:
        h = lay.BatchNormalization(name=f"{name}_bn")(h)
        return lay.ReLU(max_value=6.0, name=f"{name}_relu6")(h) if act else h

    inp = k.Input(shape=(MOBILENET_SIZE, MOBILENET_SIZE, 1), name="image")
    h = lay.Conv2D(ch(_MOBILENET_STEM), 3, strides=2, padding="same", use_bias=False, name="stem")(inp)
    h = bn_act(h, "stem")
    for i, (stride, filters, residual) in enumerate(_MOBILENET_BLOCKS, start=1):
        x = h
        h = lay.DepthwiseConv2D(3, strides=stride, padding="same", use_bias=False, name=f"b{i}_dw")(h)
        h = bn_act(h, f"b{i}_dw")
        h = lay.Conv2D(ch(filters), 1, use_bias=False, name=f"b{i}_pw")(h)
        h = bn_act(h, f"b{i}_pw", act=not residual)
        if residual:
            h = lay.Add(name=f"b{i}_add")([x, h])
    h = lay.GlobalAveragePooling2D(name="gap")(h)
    out = lay.Dense(10, activation="softmax", name="probs")(h)
    return k.Model(inp, out, name=f"mobilenet_digits_w{width:g}")


def train_mobilenet_digits(
    model: Any, data: Any, epochs: int = 30, seed: int = 0, learning_rate: float = 3e-3
) -> dict[str, list[float]]:
    """Adam with cosine decay over ``epochs`` (batch 64) on the training split of ``data``, then the BN
    statistics re-estimated on it (:func:`compressor.finetune.recalibrate_batchnorm`).

    Why the last step: Keras updates the moving statistics with momentum 0.99 from an initial variance of
    1 while the real variances of the first layers are ≈ 0.01, so after 30 epochs of 20 steps they still
    lag (measured, seed 0: moving variance 1.3–1.8× the real one, median per BN layer) and the
    inference-mode test accuracy was 74.2 % against 97.5 % in training mode; re-estimated: 97.8 %.
    """
    from compressor.finetune import recalibrate_batchnorm

    k = keras()
    _seed(seed)
    steps = epochs * -(-len(data.x_train) // 64)
    schedule = k.optimizers.schedules.CosineDecay(learning_rate, max(1, steps))
    model.compile(
        optimizer=k.optimizers.Adam(schedule), loss="sparse_categorical_crossentropy", metrics=["accuracy"]
    )
    history = model.fit(data.x_train, data.y_train, epochs=epochs, batch_size=64, shuffle=True, verbose=0)
    recalibrate_batchnorm(model, data.x_train, seed=seed)
    return {key: [float(v) for v in values] for key, values in history.history.items()}
