"""Checks on (model, dataset) that run before any training, so bad input fails in seconds, not minutes.

:func:`check_dataset` needs only numpy; :func:`keras_signature` and :func:`tflite_signature` read the
model (TensorFlow is imported inside). :func:`validate` runs all of them and returns the dataset,
normalised, which the pipeline then uses. Every refusal is a :class:`~compressor.errors.DataError`
subclass whose message names the array or layer, what was expected and what was found:

* :class:`~compressor.errors.NotAClassifierError` — the model does not end in a class-score vector:
  one output of shape (batch, K) with K ≥ 2, made by ``Dense(K, activation="softmax")`` (probabilities),
  ``Dense(K)`` with no activation (logits), or a ``Softmax`` / ``Activation("softmax")`` layer;
* :class:`~compressor.errors.DataMismatchError` — the data does not fit the model: a sample shape other
  than the model's input shape (without the batch axis), a class index outside ``[0, K)``, one-hot
  labels with a column count other than K, more label names than K;
* :class:`~compressor.errors.DataError` — the data alone is unusable: not numeric, NaN/infinity, splits
  that disagree on the sample shape, fewer than :data:`MIN_SPLIT_SAMPLES` samples in a split, fewer than
  :data:`MIN_TRAIN_CLASSES` classes in the training split.

Labels: ``y`` arrays are integer class indices; a .npz may also hold one-hot (N, K) rows (exactly one 1
per row, zeros elsewhere: soft labels are refused, see :func:`compressor.data.load_npz`), whose width K
must equal the model's. Label names default to ``"0" .. "K-1"`` for the model's K outputs.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np

from compressor.data import Dataset
from compressor.errors import DataError, DataMismatchError, EvaluationError, NotAClassifierError

MIN_SPLIT_SAMPLES = 10
MIN_TRAIN_CLASSES = 2
SPLITS = ("train", "val", "test")

OutputKind = Literal["probabilities", "logits"]


@dataclass(frozen=True, slots=True)
class Signature:
    """What the model expects and produces, as far as the checks need it."""

    input_shape: tuple[int | None, ...]  # one sample, without the batch axis; None = any size
    num_classes: int
    output: OutputKind
    last_layer: str  # for messages: "'probs' (Dense, 10 units, softmax)"


# --------------------------------------------------------------------------------------------------------
# the data alone


def check_dataset(data: Dataset) -> Dataset:
    """Model-independent checks; returns ``data`` with x as float32 and y as int64."""
    xs: dict[str, np.ndarray] = {}
    ys: dict[str, np.ndarray] = {}
    for split in SPLITS:
        xs[split] = _x(getattr(data, f"x_{split}"), f"x_{split}")
        ys[split] = _y(getattr(data, f"y_{split}"), f"y_{split}")
        n_x, n_y = len(xs[split]), len(ys[split])
        if n_x != n_y:
            raise DataError(f"x_{split} has {n_x} samples but y_{split} has {n_y}")
        if n_x < MIN_SPLIT_SAMPLES:
            also = " (the validation split doubles as the test split)" if data.test_is_val else ""
            raise DataError(
                f"x_{split} has {n_x} sample{'s' if n_x != 1 else ''}; each split needs at least "
                f"{MIN_SPLIT_SAMPLES}{also if split == 'test' else ''}"
            )
    shapes = {split: xs[split].shape[1:] for split in SPLITS}
    if len(set(shapes.values())) != 1:
        got = ", ".join(f"x_{s} {shape}" for s, shape in shapes.items())
        raise DataError(f"splits disagree on the sample shape: {got}")
    classes = np.unique(ys["train"])
    if len(classes) < MIN_TRAIN_CLASSES:
        raise DataError(
            f"y_train holds {len(classes)} class ({', '.join(str(int(c)) for c in classes)}); training a "
            f"classifier needs at least {MIN_TRAIN_CLASSES}"
        )
    return dataclasses.replace(
        data,
        x_train=xs["train"],
        y_train=ys["train"],
        x_val=xs["val"],
        y_val=ys["val"],
        x_test=xs["test"],
        y_test=ys["test"],
    )


def _x(arr: Any, key: str) -> np.ndarray:
    arr = np.asarray(arr)
    if arr.dtype.kind not in "fiub":
        raise DataError(f"{key} must be numeric (convertible to float32), got dtype {arr.dtype}")
    if arr.ndim < 2:
        raise DataError(f"{key} must be (N, ...) samples, got shape {arr.shape}")
    with np.errstate(over="ignore"):
        out = np.ascontiguousarray(arr, dtype=np.float32)
    bad = ~np.isfinite(out)
    if bad.any():
        first = int(np.argwhere(bad.reshape(len(out), -1).any(axis=1))[0][0])
        what = "NaN or infinity" if not np.isfinite(arr).all() else "values beyond the float32 range"
        raise DataError(f"{key} contains {what} ({int(bad.sum())} values; first in sample {first})")
    return out


def _y(arr: Any, key: str) -> np.ndarray:
    arr = np.asarray(arr)
    if arr.ndim != 1:
        raise DataError(f"{key} must be (N,) class indices, got shape {arr.shape}")
    if arr.dtype.kind == "f":
        if not np.isfinite(arr).all() or not np.all(np.mod(arr, 1) == 0):
            raise DataError(f"{key} must hold whole class indices, got non-integer values")
    elif arr.dtype.kind not in "iub":
        raise DataError(f"{key} must be integer class indices, got dtype {arr.dtype}")
    out = arr.astype(np.int64)
    if len(out) and int(out.min()) < 0:
        raise DataError(f"{key} has a negative class index ({int(out.min())})")
    return out


# --------------------------------------------------------------------------------------------------------
# the model


def keras_signature(model: Any) -> Signature:
    """Input shape and class count of a Keras classifier; NotAClassifierError if it is not one."""
    from compressor._tf import keras

    k = keras()
    inputs = getattr(model, "inputs", None)
    outputs = getattr(model, "outputs", None)
    name = getattr(model, "name", type(model).__name__)
    if not inputs or not outputs:
        raise NotAClassifierError(
            f"model {name!r} has no defined inputs/outputs (build it with keras.Input or call it once)"
        )
    if len(inputs) != 1:
        raise NotAClassifierError(f"model {name!r} has {len(inputs)} inputs; the compressor needs exactly 1")
    if len(outputs) != 1:
        raise NotAClassifierError(f"model {name!r} has {len(outputs)} outputs; a classifier has exactly 1")
    last = _last_layer(outputs[0], k)
    act = getattr(last, "activation", None)
    act_name = getattr(act, "__name__", None) or (str(act) if act is not None else "none")
    out_shape = tuple(outputs[0].shape)
    units = out_shape[-1] if out_shape else None
    desc = f"{last.name!r} ({type(last).__name__}, activation {act_name}, output shape {out_shape})"
    kind: OutputKind
    if isinstance(last, k.layers.Dense) and act_name == "softmax":
        kind = "probabilities"
    elif isinstance(last, k.layers.Dense) and act_name == "linear":
        kind = "logits"
    elif isinstance(last, k.layers.Softmax) or (
        isinstance(last, k.layers.Activation) and act_name == "softmax"
    ):
        kind = "probabilities"
    else:
        raise NotAClassifierError(
            f"model {name!r} is not a classifier: its last layer {desc} is not Dense(K, softmax), "
            "Dense(K) (logits) nor a Softmax layer"
        )
    if len(out_shape) != 2 or units is None or units < 2:
        raise NotAClassifierError(
            f"model {name!r} is not a classifier: its last layer {desc} must output (batch, K) class "
            "scores with K >= 2 (a binary classifier needs 2 softmax units)"
        )
    in_shape = tuple(None if d is None else int(d) for d in inputs[0].shape[1:])
    return Signature(in_shape, int(units), kind, desc)


def _last_layer(tensor: Any, k: Any) -> Any:
    """The layer that produced ``tensor``, looking inside nested models."""
    layer = tensor._keras_history[0]
    while isinstance(layer, k.Model) and getattr(layer, "outputs", None) and len(layer.outputs) == 1:
        layer = layer.outputs[0]._keras_history[0]
    return layer


def tflite_signature(data: bytes, source: str = "the .tflite") -> Signature:
    """Input shape and class count of a float .tflite classifier, read by the interpreter."""
    from compressor.evaluate import load_interpreter

    try:
        interpreter = load_interpreter(data, threads=1)
    except EvaluationError as err:
        raise DataError(f"{source} is not a loadable .tflite: {err}") from err
    ins, outs = interpreter.get_input_details(), interpreter.get_output_details()
    if len(ins) != 1 or len(outs) != 1:
        raise NotAClassifierError(
            f"{source} has {len(ins)} inputs and {len(outs)} outputs; a classifier has 1 and 1"
        )
    in_shape = [int(d) for d in ins[0]["shape"]]
    out_shape = [int(d) for d in outs[0]["shape"]]
    desc = f"output {outs[0]['name']!r} of shape {out_shape}"
    if len(out_shape) != 2 or out_shape[-1] < 2:
        raise NotAClassifierError(
            f"{source} is not a classifier: {desc}; expected (1, K) class scores with K >= 2"
        )
    if not in_shape or in_shape[0] != 1:
        raise DataMismatchError(f"{source} input shape {in_shape}: expected a batch-1 input (1, ...)")
    return Signature(tuple(in_shape[1:]), out_shape[-1], "probabilities", desc)


# --------------------------------------------------------------------------------------------------------
# the data against the model


def check_fit(data: Dataset, sig: Signature) -> Dataset:
    """Sample shape, class indices and label names against the model; returns ``data`` (labels filled)."""
    got = data.input_shape
    want = sig.input_shape
    if len(got) != len(want) or any(w is not None and w != g for w, g in zip(want, got, strict=False)):
        shown = tuple("any" if d is None else d for d in want)
        raise DataMismatchError(
            f"x_train samples have shape {got} but the model takes {shown} (without the batch axis)"
        )
    k = sig.num_classes
    if data.label_width is not None and data.label_width != k:
        raise DataMismatchError(
            f"y arrays are one-hot with {data.label_width} columns but the model outputs {k} classes "
            f"(last layer {sig.last_layer})"
        )
    for split in SPLITS:
        y = getattr(data, f"y_{split}")
        if len(y) and int(y.max()) >= k:
            bad = int(np.sum(y >= k))
            raise DataMismatchError(
                f"y_{split} holds class {int(y.max())} ({bad} label{'s' if bad != 1 else ''} >= {k}) but "
                f"the model outputs {k} classes, so labels must be in [0, {k}) (last layer {sig.last_layer})"
            )
    labels = data.labels
    if len(labels) > k:
        raise DataMismatchError(
            f"labels has {len(labels)} names but the model outputs {k} classes (last layer {sig.last_layer})"
        )
    if len(labels) < k:
        if labels != tuple(str(i) for i in range(len(labels))):
            raise DataMismatchError(f"labels has {len(labels)} names but the model outputs {k} classes")
        labels = tuple(str(i) for i in range(k))  # default names for classes the data never shows
    return dataclasses.replace(data, labels=labels) if labels != data.labels else data


def validate(model: Any, data: Dataset) -> tuple[Dataset, Signature]:
    """Every check, cheapest first: the data alone, the model, then the data against the model."""
    data = check_dataset(data)
    sig = tflite_signature(model) if isinstance(model, bytes) else keras_signature(model)
    return check_fit(data, sig), sig
