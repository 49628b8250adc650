"""Datasets for compression and evaluation: the built-in ``digits`` set and user ``.npz`` files.

Only numpy is imported at module level; scikit-learn is imported when ``digits`` is loaded.
Images are float32 NHWC; labels are int64 class indices.
"""

from __future__ import annotations

import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from compressor.errors import DataError

BUILTIN_DATASETS = ("digits",)
DIGITS_SIZE = 28


@dataclass(frozen=True, slots=True)
class Dataset:
    """Train/validation/test splits. ``x_*`` are float32 (N, H, W, C); ``y_*`` int64 (N,).

    When a user .npz has no test split, the validation split doubles as the test split and
    ``test_is_val`` is true (the report says so).
    """

    name: str
    x_train: np.ndarray
    y_train: np.ndarray
    x_val: np.ndarray
    y_val: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    labels: tuple[str, ...]
    test_is_val: bool = False
    notes: tuple[str, ...] = field(default_factory=tuple)
    label_width: int | None = None  # K when the .npz held one-hot (N, K) labels: must match the model

    @property
    def input_shape(self) -> tuple[int, ...]:
        """Shape of one sample, without the batch axis."""
        return tuple(int(d) for d in self.x_train.shape[1:])

    @property
    def num_classes(self) -> int:
        return len(self.labels)


def load_dataset(spec: str | Path, *, seed: int = 0) -> Dataset:
    """Load a built-in dataset by name (``digits``) or a user ``.npz`` file by path."""
    if isinstance(spec, str) and spec in BUILTIN_DATASETS:
        return load_digits(seed=seed)
    path = Path(spec)
    if path.suffix != ".npz":
        raise DataError(
            f"data {str(spec)!r} is neither a built-in dataset ({', '.join(BUILTIN_DATASETS)}) "
            "nor a .npz file"
        )
    return load_npz(path)


# --------------------------------------------------------------------------------------------------------
# digits


def _bilinear_matrix(src: int, dst: int) -> np.ndarray:
    """(dst, src) matrix resampling a 1-D signal with bilinear weights, half-pixel centres."""
    weights = np.zeros((dst, src), dtype=np.float64)
    centres = (np.arange(dst) + 0.5) * (src / dst) - 0.5
    centres = np.clip(centres, 0.0, src - 1.0)
    lo = np.floor(centres).astype(int)
    hi = np.minimum(lo + 1, src - 1)
    frac = centres - lo
    rows = np.arange(dst)
    np.add.at(weights, (rows, lo), 1.0 - frac)
    np.add.at(weights, (rows, hi), frac)
    return weights


def upsample(images: np.ndarray, size: int) -> np.ndarray:
    """Bilinear resize of (N, h, w) images to (N, size, size); convex weights keep the value range."""
    _, h, w = images.shape
    rows = _bilinear_matrix(h, size)
    cols = _bilinear_matrix(w, size)
    out = np.einsum("ih,nhw,jw->nij", rows, images.astype(np.float64), cols)
    return out.astype(np.float32)


def load_digits(*, seed: int = 0, test_fraction: float = 0.2, val_fraction: float = 0.1) -> Dataset:
    """scikit-learn's bundled 8×8 digits (no network), upsampled to 28×28×1 in [0, 1].

    Stratified split with a fixed seed: the same seed always gives the same train/val/test arrays.
    """
    from sklearn.datasets import load_digits as sk_load_digits
    from sklearn.model_selection import train_test_split

    bunch = sk_load_digits()
    images = np.asarray(bunch.images, dtype=np.float64) / 16.0
    x = np.clip(upsample(images, DIGITS_SIZE), 0.0, 1.0)[..., np.newaxis]
    y = np.asarray(bunch.target, dtype=np.int64)
    x_rest, x_test, y_rest, y_test = train_test_split(
        x, y, test_size=test_fraction, random_state=seed, stratify=y
    )
    x_train, x_val, y_train, y_val = train_test_split(
        x_rest, y_rest, test_size=val_fraction / (1.0 - test_fraction), random_state=seed, stratify=y_rest
    )
    return Dataset(
        name="digits",
        x_train=x_train,
        y_train=y_train,
        x_val=x_val,
        y_val=y_val,
        x_test=x_test,
        y_test=y_test,
        labels=tuple(str(i) for i in range(10)),
    )


# --------------------------------------------------------------------------------------------------------
# .npz

_REQUIRED = ("x_train", "y_train", "x_val", "y_val")


def load_npz(path: Path) -> Dataset:
    """Load ``x_train, y_train, x_val, y_val`` (+ optional ``x_test, y_test``, ``labels``) from a .npz.

    ``x`` arrays: (N, H, W) or (N, H, W, C), numeric; they are converted to float32 as they are (no
    rescaling). ``y`` arrays: (N,) integer class indices, or (N, K) one-hot — exactly one 1 per row and
    zeros elsewhere (soft labels / probabilities are refused rather than silently argmax-ed); every
    one-hot split must have the same K, which :mod:`compressor.validate` checks against the model's
    outputs. Pickled (object) arrays are refused. The model-independent checks of
    :func:`compressor.validate.check_dataset` (at least 10 samples per split, 2 classes in train,
    finite values) run here too.
    """
    from compressor.validate import check_dataset

    if not path.is_file():
        raise DataError(f"data file {str(path)!r} does not exist")
    try:
        with np.load(path, allow_pickle=False) as npz:
            arrays = {k: npz[k] for k in npz.files}
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as err:
        raise DataError(f"cannot read {str(path)!r} as a .npz without pickle: {err}") from err
    missing = [k for k in _REQUIRED if k not in arrays]
    if missing:
        raise DataError(
            f"{str(path)!r} lacks {', '.join(missing)}; it needs x_train, y_train, x_val, y_val "
            f"(optionally x_test, y_test, labels); found {', '.join(sorted(arrays)) or 'no arrays'}"
        )
    has_test = "x_test" in arrays and "y_test" in arrays
    if ("x_test" in arrays) != ("y_test" in arrays):
        raise DataError(f"{str(path)!r} has only one of x_test / y_test; give both or neither")
    splits = ("train", "val", "test") if has_test else ("train", "val")
    xs: dict[str, np.ndarray] = {}
    ys: dict[str, np.ndarray] = {}
    widths: dict[str, int] = {}
    for split in splits:
        xs[split] = _images(arrays[f"x_{split}"], f"x_{split}")
        ys[split] = _labels(arrays[f"y_{split}"], f"y_{split}")
        if arrays[f"y_{split}"].ndim == 2:
            widths[f"y_{split}"] = int(arrays[f"y_{split}"].shape[1])
        if len(xs[split]) != len(ys[split]):
            raise DataError(f"x_{split} has {len(xs[split])} samples but y_{split} has {len(ys[split])}")
        if len(xs[split]) == 0:
            raise DataError(f"x_{split} is empty")
    shapes = {xs[s].shape[1:] for s in splits}
    if len(shapes) != 1:
        raise DataError(f"splits disagree on the sample shape: {sorted(shapes)}")
    if len(set(widths.values())) > 1:
        got = ", ".join(f"{k} {w}" for k, w in widths.items())
        raise DataError(f"one-hot label arrays disagree on the number of classes: {got} columns")
    label_width = next(iter(widths.values()), None)
    num_classes = max(int(max(int(ys[s].max()) for s in splits)) + 1, label_width or 0)
    if "labels" in arrays:
        labels = tuple(str(v) for v in np.asarray(arrays["labels"]).reshape(-1))
        if len(labels) < num_classes:
            raise DataError(f"labels has {len(labels)} names but y uses {num_classes} classes")
    else:
        labels = tuple(str(i) for i in range(num_classes))
    test = "test" if has_test else "val"
    dataset = Dataset(
        name=path.stem,
        x_train=xs["train"],
        y_train=ys["train"],
        x_val=xs["val"],
        y_val=ys["val"],
        x_test=xs[test],
        y_test=ys[test],
        labels=labels,
        test_is_val=not has_test,
        notes=() if has_test else ("no x_test/y_test in the .npz: the validation split is the test split",),
        label_width=label_width,
    )
    return check_dataset(dataset)


def _images(arr: np.ndarray, key: str) -> np.ndarray:
    if arr.dtype.kind not in "fiub":
        raise DataError(f"{key} must be numeric, got dtype {arr.dtype}")
    if arr.ndim == 3:
        arr = arr[..., np.newaxis]
    if arr.ndim != 4:
        raise DataError(f"{key} must be (N, H, W) or (N, H, W, C), got shape {arr.shape}")
    out = arr.astype(np.float32)
    if not np.isfinite(out).all():
        raise DataError(f"{key} contains NaN or infinity")
    return out


def _labels(arr: np.ndarray, key: str) -> np.ndarray:
    if arr.ndim == 2:
        if arr.dtype.kind not in "fiub":
            raise DataError(f"{key} must be numeric one-hot rows, got dtype {arr.dtype}")
        ones = arr == 1
        if not (np.all(ones | (arr == 0)) and np.all(ones.sum(axis=1) == 1)):
            bad = int(np.argwhere(~(np.all(ones | (arr == 0), axis=1) & (ones.sum(axis=1) == 1)))[0][0])
            raise DataError(
                f"{key} is 2-D {arr.shape} but not one-hot: row {bad} is {arr[bad].tolist()[:12]}; give "
                "(N,) class indices or rows with exactly one 1 and zeros elsewhere"
            )
        arr = arr.argmax(axis=1)
    if arr.ndim != 1:
        raise DataError(f"{key} must be (N,) class indices or (N, K) one-hot, got shape {arr.shape}")
    if arr.dtype.kind == "f":
        if not np.all(np.equal(np.mod(arr, 1), 0)):
            raise DataError(f"{key} must hold whole class indices")
    elif arr.dtype.kind not in "iub":
        raise DataError(f"{key} must be integer class indices, got dtype {arr.dtype}")
    out = arr.astype(np.int64)
    if len(out) and out.min() < 0:
        raise DataError(f"{key} has negative class indices")
    return out
