"""Datasets for compression and evaluation: the built-in ``digits`` set and user ``.npz`` files.

Only numpy is imported at module level; scikit-learn is imported when ``digits`` is loaded.
Images are float32 NHWC; labels are int64 class indices.
"""

from __future__ import annotations

import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np

from compressor.errors import DataError

BUILTIN_DATASETS = ("digits",)
DIGITS_SIZE = 28


@dataclass(frozen=True, slots=True)
class Rows:
    """One split: one array per model input (the same N rows each), optional class labels ``y`` (int64
    (N,)) and optional ``targets`` of any shape (ground truth a user evaluator scores, e.g. masks)."""

    inputs: tuple[np.ndarray, ...]
    y: np.ndarray | None = None
    targets: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.inputs[0]) if self.inputs else 0

    def take(self, index: np.ndarray | slice) -> Rows:
        """The rows at ``index`` (a slice or an index array), inputs, labels and targets alike."""
        return Rows(
            tuple(a[index] for a in self.inputs),
            None if self.y is None else self.y[index],
            None if self.targets is None else self.targets[index],
        )

    def head(self, count: int) -> Rows:
        return self.take(slice(0, count))


@dataclass(frozen=True, slots=True)
class Dataset:
    """Train/validation/test splits for a model with any number of inputs.

    ``train`` rows calibrate full-integer quantization (and train the transforms when labelled); the
    test rows are the held-out rows every variant is evaluated on. With class labels the task is
    classification; without, generic (outputs compared with the float reference). When a user .npz has
    no test split, the validation split doubles as the test split and ``test_is_val`` is true (the
    report says so). ``synthetic``: no user data at all; the rows are random, made from the model's input
    specs, so fidelity figures are labelled as measured on synthetic inputs.
    """

    name: str
    train: Rows
    val: Rows
    test: Rows
    labels: tuple[str, ...] = ()
    test_is_val: bool = False
    notes: tuple[str, ...] = field(default_factory=tuple)
    label_width: int | None = None  # K when the .npz held one-hot (N, K) labels: must match the model
    synthetic: bool = False
    calibration: Rows | None = None  # unlabelled rows for int8 calibration (--calibration), else train

    @classmethod
    def from_arrays(
        cls,
        name: str,
        x_train: np.ndarray,
        y_train: np.ndarray | None,
        x_val: np.ndarray,
        y_val: np.ndarray | None,
        x_test: np.ndarray,
        y_test: np.ndarray | None,
        labels: tuple[str, ...] = (),
        **kwargs: Any,
    ) -> Dataset:
        """A single-input dataset from plain arrays (the classification layout of earlier versions)."""
        return cls(
            name=name,
            train=Rows((x_train,), y_train),
            val=Rows((x_val,), y_val),
            test=Rows((x_test,), y_test),
            labels=labels,
            **kwargs,
        )

    @property
    def task(self) -> Literal["classification", "generic"]:
        """``classification`` when every split has class labels, else ``generic``."""
        labelled = all(r.y is not None for r in (self.train, self.val, self.test))
        return "classification" if labelled else "generic"

    @property
    def num_inputs(self) -> int:
        return len(self.test.inputs)

    @property
    def calibration_rows(self) -> Rows:
        return self.calibration if self.calibration is not None else self.train

    # The single-input classification view the Keras transforms (prune, distill, ...) train on.
    @property
    def x_train(self) -> np.ndarray:
        return self.train.inputs[0]

    @property
    def x_val(self) -> np.ndarray:
        return self.val.inputs[0]

    @property
    def x_test(self) -> np.ndarray:
        return self.test.inputs[0]

    @property
    def y_train(self) -> np.ndarray:
        return _labels_of(self.train, "train")

    @property
    def y_val(self) -> np.ndarray:
        return _labels_of(self.val, "val")

    @property
    def y_test(self) -> np.ndarray:
        return _labels_of(self.test, "test")

    @property
    def input_shape(self) -> tuple[int, ...]:
        """Shape of one sample of the first input, without the batch axis."""
        return tuple(int(d) for d in self.test.inputs[0].shape[1:])

    @property
    def input_shapes(self) -> tuple[tuple[int, ...], ...]:
        return tuple(tuple(int(d) for d in a.shape[1:]) for a in self.test.inputs)

    @property
    def num_classes(self) -> int:
        return len(self.labels)


def _labels_of(rows: Rows, split: str) -> np.ndarray:
    if rows.y is None:
        raise DataError(f"the {split} split has no class labels (y_{split}); this step needs a classifier")
    return rows.y


def load_dataset(spec: str | Path, *, seed: int = 0, task: str | None = None) -> Dataset:
    """Load a built-in dataset by name (``digits``) or a user ``.npz`` file by path."""
    if isinstance(spec, str) and spec in BUILTIN_DATASETS:
        return load_digits(seed=seed)
    path = Path(spec)
    if path.suffix != ".npz":
        raise DataError(
            f"data {str(spec)!r} is neither a built-in dataset ({', '.join(BUILTIN_DATASETS)}) "
            "nor a .npz file"
        )
    return load_npz(path, task=task, seed=seed)


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
    return Dataset.from_arrays(
        "digits", x_train, y_train, x_val, y_val, x_test, y_test, labels=tuple(str(i) for i in range(10))
    )


# --------------------------------------------------------------------------------------------------------
# .npz

SPLITS = ("train", "val", "test")
TASKS = ("classification", "generic")


AUTO_SPLIT = (0.7, 0.15, 0.15)  # train / val / test shares when a .npz gives its rows unsplit
MIN_SPLIT_ROWS = 20  # fewer unsplit rows leave too few to validate and test on


def load_npz(path: Path, *, task: str | None = None, seed: int = 0) -> Dataset:
    """Load labelled or unlabelled splits from a .npz, for a model with any number of inputs.

    Inputs: ``x_train`` and ``x_val`` (and optionally ``x_test``) for a single-input model; for several
    inputs ``x_train_0, x_train_1, ...`` (one array per model input, in the model's input order), the
    same for val and test. Any shape: images (N, H, W[, C]), tabular (N, F), sequences (N, T) or
    (N, T, F); numeric, converted to float32 only when they are floats (integer inputs such as token ids
    keep their values). Labels ``y_<split>`` are optional:

    * (N,) whole-number class indices, or (N, K) one-hot rows (exactly one 1), make the task
      classification (accuracy against the labels);
    * anything else — masks, boxes, regression targets — is kept as ``targets`` for a user evaluator
      (``--evaluator``), and the task is generic (outputs compared with the float reference).

    ``task`` forces the reading ("classification" refuses labels that are not class indices; "generic"
    keeps even class indices as targets). Pickled (object) arrays are refused. Without ``x_test`` the
    validation split is the test split. Rows given unsplit — ``x_train`` alone, or ``x`` / ``x_0, x_1,
    ...`` with ``y`` — are shuffled with ``seed`` and split :data:`AUTO_SPLIT` (train / val / test); the
    dataset's notes say how many rows went where.
    """
    if not path.is_file():
        raise DataError(f"data file {str(path)!r} does not exist")
    arrays = _read_npz(path)
    inputs: dict[str, tuple[np.ndarray, ...]] = {}
    for split in SPLITS:
        found = _split_inputs(arrays, f"x_{split}", path)
        if found is not None:
            inputs[split] = found
    split_note = ""
    unsplit = inputs.get("train") if set(inputs) <= {"train"} else None
    label_key = "y_train"
    if not inputs:
        unsplit, label_key = _split_inputs(arrays, "x", path), "y"
    if unsplit is not None:
        inputs, arrays, split_note = _auto_split(unsplit, arrays, label_key, seed, path)
    missing = [f"x_{s}" for s in ("train", "val") if s not in inputs]
    if missing:
        raise DataError(
            f"{str(path)!r} lacks {' and '.join(missing)}: it needs x_train and x_val (optionally x_test), "
            "or x_train_0, x_train_1, ... for several inputs, with optional labels y_train, y_val, y_test "
            "(or the rows unsplit: x_train alone, or x with y, split with --seed); "
            f"found {', '.join(sorted(arrays)) or 'no arrays'}"
        )
    splits = [s for s in SPLITS if s in inputs]
    counts = {len(inputs[s]) for s in splits}
    if len(counts) != 1:
        got = ", ".join(f"{s}: {len(inputs[s])}" for s in splits)
        raise DataError(f"the splits disagree on the number of inputs ({got})")
    for s in splits:
        if "y_" + s not in arrays and any(f"y_{o}" in arrays for o in splits):
            raise DataError(
                f"{str(path)!r} lacks y_{s}: it has labels for some splits but not this one; give y for "
                "every split, or for none"
            )
    for s in splits:
        shapes = [a.shape[1:] for a in inputs[s]]
        ref = [a.shape[1:] for a in inputs["train"]]
        if shapes != ref:
            shown: object = shapes[0] if len(shapes) == 1 else shapes
            wanted: object = ref[0] if len(ref) == 1 else ref
            raise DataError(f"splits disagree on the sample shape: x_{s} {shown}, x_train {wanted}")
    ys: dict[str, np.ndarray | None] = {}
    targets: dict[str, np.ndarray | None] = {}
    widths: dict[str, int] = {}
    for s in splits:
        raw = arrays.get(f"y_{s}")
        ys[s], targets[s] = None, None
        if raw is None:
            continue
        n = len(inputs[s][0])
        if len(raw) != n:
            raise DataError(f"x_{s} has {n} samples but y_{s} has {len(raw)}")
        as_class = _class_labels(raw) if task != "generic" else None
        if as_class is None:
            if task == "classification":
                raise DataError(
                    f"y_{s} {raw.shape} {raw.dtype} is not class indices nor one-hot rows; "
                    "--task classification needs them (drop --task to use them as evaluator targets)"
                )
            targets[s] = _numeric(raw, f"y_{s}")
        else:
            ys[s] = as_class
            if raw.ndim == 2:
                widths[s] = int(raw.shape[1])
    kinds = {ys[s] is not None for s in splits if f"y_{s}" in arrays}
    if len(kinds) > 1:
        odd = next(s for s in splits if ys[s] is None)
        cls = next(s for s in splits if ys[s] is not None)
        raw = arrays[f"y_{odd}"]
        raise DataError(
            f"y_{odd} holds neither whole class indices nor one-hot rows (shape {raw.shape}, row 0 is "
            f"{np.asarray(raw[0]).reshape(-1).tolist()[:12]}) while y_{cls} holds class indices: give every "
            "split the same kind of labels (soft labels / probabilities are not class labels)"
        )
    if len(set(widths.values())) > 1:
        got = ", ".join(f"y_{k} {w}" for k, w in widths.items())
        raise DataError(f"one-hot label arrays disagree on the number of classes: {got} columns")
    labelled = all(ys[s] is not None for s in splits)
    label_width = next(iter(widths.values()), None)
    labels: tuple[str, ...] = ()
    if labelled:
        num_classes = max(max(int(y.max()) for y in ys.values() if y is not None) + 1, label_width or 0)
        if "labels" in arrays:
            labels = tuple(str(v) for v in np.asarray(arrays["labels"]).reshape(-1))
            if len(labels) < num_classes:
                raise DataError(f"labels has {len(labels)} names but y uses {num_classes} classes")
        else:
            labels = tuple(str(i) for i in range(num_classes))
    rows = {s: Rows(inputs[s], ys[s], targets[s]) for s in splits}
    has_test = "test" in rows
    notes = () if has_test else ("no x_test in the .npz: the validation split is the test split",)
    if split_note:
        notes = (split_note,)
    from compressor.validate import check_dataset

    return check_dataset(
        Dataset(
            name=path.stem,
            train=rows["train"],
            val=rows["val"],
            test=rows["test" if has_test else "val"],
            labels=labels,
            test_is_val=not has_test,
            notes=notes,
            label_width=label_width,
        )
    )


def _read_npz(path: Path) -> dict[str, np.ndarray]:
    try:
        with np.load(path, allow_pickle=False) as npz:
            return {k: npz[k] for k in npz.files}
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as err:
        raise DataError(f"cannot read {str(path)!r} as a .npz without pickle: {err}") from err


def _auto_split(
    x: tuple[np.ndarray, ...], arrays: dict[str, np.ndarray], label_key: str, seed: int, path: Path
) -> tuple[dict[str, tuple[np.ndarray, ...]], dict[str, np.ndarray], str]:
    """Unsplit rows (and their labels under ``label_key``, if any) shuffled with ``seed`` into the
    :data:`AUTO_SPLIT` train / val / test splits: (inputs per split, arrays with y_<split> labels, a note)."""
    n = len(x[0])
    if n < MIN_SPLIT_ROWS:
        raise DataError(
            f"{str(path)!r} gives {n} rows unsplit: at least {MIN_SPLIT_ROWS} are needed to split them into "
            "train, validation and test rows (or give x_train and x_val yourself)"
        )
    y = arrays.get(label_key)
    if y is not None and len(y) != n:
        raise DataError(f"{str(path)!r}: {n} input rows but {len(y)} rows in {label_key}")
    order = np.random.default_rng(seed).permutation(n)
    n_val = max(1, round(n * AUTO_SPLIT[1]))
    n_test = max(1, round(n * AUTO_SPLIT[2]))
    parts = {"val": order[:n_val], "test": order[n_val : n_val + n_test], "train": order[n_val + n_test :]}
    inputs = {s: tuple(a[idx] for a in x) for s, idx in parts.items()}
    out = {k: v for k, v in arrays.items() if not k.startswith(("x", "y"))}
    if y is not None:
        out.update({f"y_{s}": y[idx] for s, idx in parts.items()})
    note = (
        f"{n} unsplit rows shuffled with seed {seed} into {len(parts['train'])} train, {n_val} validation "
        f"and {n_test} test rows"
    )
    return inputs, out, note


def _split_inputs(arrays: dict[str, np.ndarray], key: str, path: Path) -> tuple[np.ndarray, ...] | None:
    """``key`` alone (one input) or ``key_0, key_1, ...`` (several); None when the split is absent."""
    indexed: list[np.ndarray] = []
    while f"{key}_{len(indexed)}" in arrays:
        indexed.append(arrays[f"{key}_{len(indexed)}"])
    if key in arrays and indexed:
        raise DataError(f"{str(path)!r} has both {key} and {key}_0: use one form")
    found = [arrays[key]] if key in arrays else indexed
    if not found:
        return None
    out = tuple(_numeric(a, key if len(found) == 1 else f"{key}_{i}") for i, a in enumerate(found))
    if len({len(a) for a in out}) != 1:
        raise DataError(f"the inputs of {key} have different row counts: {[len(a) for a in out]}")
    return out


def _numeric(arr: np.ndarray, key: str) -> np.ndarray:
    """A numeric (N, ...) array; floats become float32 and must be finite, integers keep their type."""
    if arr.dtype.kind not in "fiub":
        raise DataError(f"{key} must be numeric, got dtype {arr.dtype}")
    if arr.ndim < 1 or len(arr) == 0:
        raise DataError(f"{key} must hold at least one row, got shape {arr.shape}")
    if arr.dtype.kind == "f":
        from compressor.validate import _x

        return _x(arr, key) if arr.ndim >= 2 else np.ascontiguousarray(arr, dtype=np.float32)
    return np.ascontiguousarray(arr)


def _class_labels(arr: np.ndarray) -> np.ndarray | None:
    """(N,) whole non-negative numbers or (N, K) one-hot rows as int64 indices; None otherwise."""
    if arr.dtype.kind not in "fiub":
        return None
    if arr.ndim == 2 and arr.shape[1] >= 2:
        ones = arr == 1
        if np.all(ones | (arr == 0)) and np.all(ones.sum(axis=1) == 1):
            return np.ascontiguousarray(arr.argmax(axis=1), dtype=np.int64)
        return None
    if arr.ndim != 1:
        return None
    if arr.dtype.kind == "f" and not (np.isfinite(arr).all() and np.all(np.mod(arr, 1) == 0)):
        return None
    out = arr.astype(np.int64)
    if len(out) and out.min() < 0:
        return None
    return out


# --------------------------------------------------------------------------------------------------------
# calibration rows, held-out split, synthetic rows


@dataclass(frozen=True, slots=True)
class InputSpec:
    """What the data loaders need to know of one model input."""

    name: str
    shape: tuple[int, ...]  # with the batch axis; -1 or 0 for a free dimension
    dtype: str


EVAL_FRACTION = 0.25
MAX_EVAL_ROWS = 256
SYNTHETIC_ROWS = 64


def split_rows(rows: Rows, *, seed: int = 0) -> tuple[Rows, Rows]:
    """Unlabelled rows → (calibration rows, held-out evaluation rows), by a seeded permutation: a quarter
    (at most 256 rows, at least 1) is held out; with fewer than 4 rows both parts are all the rows."""
    n = len(rows)
    if n < 4:
        return rows, rows
    held = max(1, min(MAX_EVAL_ROWS, round(n * EVAL_FRACTION)))
    order = np.random.default_rng(seed).permutation(n)
    return rows.take(np.sort(order[held:])), rows.take(np.sort(order[:held]))


def load_calibration(
    spec: Path,
    inputs: list[InputSpec],
    *,
    value_range: tuple[float, float] | None = None,
    layout: str | None = None,
    limit: int | None = 1000,
) -> Rows:
    """Unlabelled rows from a folder of images (a single image input) or a .npz with one array per input.

    .npz: ``x`` (one input), ``x_0, x_1, ...``, arrays named like the model's inputs, or — for a
    single-input model — its only array. Images: PNG/JPEG resized and centre-cropped to the input's
    height and width, converted to its channel count, scaled to ``value_range`` (default 0..1).
    """
    if spec.is_dir():
        image_inputs = [i for i in inputs if len(i.shape) == 4]
        if len(inputs) != 1 or not image_inputs:
            shapes = ", ".join(f"{i.name} {list(i.shape)}" for i in inputs)
            raise DataError(
                f"--calibration {str(spec)!r} is a folder of images, but the model's inputs are {shapes}: "
                "images calibrate a model with one (1, H, W, C) or (1, C, H, W) input; give a .npz with "
                "one array per input instead"
            )
        from compressor.images import load_image_folder

        shape = inputs[0].shape
        fmt = layout or ("NCHW" if shape[1] in (1, 3) and shape[3] not in (1, 3) else "NHWC")
        h, w, c = (shape[2], shape[3], shape[1]) if fmt == "NCHW" else (shape[1], shape[2], shape[3])
        images = load_image_folder(spec, h, w, c, value_range or (0.0, 1.0), layout=fmt, limit=limit)
        return Rows((images,))
    if spec.suffix != ".npz" or not spec.is_file():
        raise DataError(f"--calibration {str(spec)!r} is neither a folder of images nor a .npz file")
    arrays = _read_npz(spec)
    names = [i.name for i in inputs]
    found: list[np.ndarray]
    if len(inputs) == 1 and "x" in arrays:
        found = [arrays["x"]]
    elif all(f"x_{k}" in arrays for k in range(len(inputs))):
        found = [arrays[f"x_{k}"] for k in range(len(inputs))]
    elif all(n in arrays for n in names):
        found = [arrays[n] for n in names]
    elif len(inputs) == 1 and len(arrays) == 1:
        found = list(arrays.values())
    else:
        want = "x" if len(inputs) == 1 else ", ".join(f"x_{k}" for k in range(len(inputs)))
        raise DataError(
            f"--calibration {str(spec)!r} holds {', '.join(sorted(arrays)) or 'no arrays'}; the model has "
            f"{len(inputs)} input(s) ({', '.join(names)}): give {want}, or arrays named like the inputs"
        )
    out = tuple(_numeric(a, f"{spec.name}:{k}") for k, a in enumerate(found))
    if len({len(a) for a in out}) != 1:
        raise DataError(f"--calibration arrays have different row counts: {[len(a) for a in out]}")
    rows = Rows(out)
    return rows.head(limit) if limit else rows


def synthetic_rows(
    inputs: list[InputSpec], count: int, *, seed: int, value_range: tuple[float, float] | None
) -> Rows:
    """Random rows shaped like the model's inputs: uniform in ``value_range`` (default -1..1) for float
    inputs, small integers for integer inputs. Only for fidelity figures labelled synthetic."""
    rng = np.random.default_rng(seed)
    lo, hi = value_range or (-1.0, 1.0)
    arrays = []
    for spec in inputs:
        shape = (count, *(d if d > 0 else 1 for d in spec.shape[1:]))
        dtype = np.dtype(spec.dtype)
        if dtype.kind == "f":
            arrays.append(rng.uniform(lo, hi, shape).astype(np.float32))
        elif dtype == np.bool_:
            arrays.append(rng.integers(0, 2, shape).astype(np.bool_))
        else:
            arrays.append(rng.integers(0, 16, shape).astype(dtype))
    return Rows(tuple(arrays))
