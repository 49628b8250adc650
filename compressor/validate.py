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

from compressor.data import Dataset, InputSpec, Rows
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
    """Model-independent checks; returns ``data`` with float inputs as float32 and labels as int64.

    Classification (labels in every split): at least :data:`MIN_SPLIT_SAMPLES` rows per split and
    :data:`MIN_TRAIN_CLASSES` classes in train. Generic: at least one row per split.
    """
    classification = data.task == "classification"
    splits: dict[str, Rows] = {}
    for split in SPLITS:
        rows: Rows = getattr(data, split)
        if not rows.inputs:
            raise DataError(f"x_{split} holds no input arrays")
        inputs = tuple(
            _x(a, f"x_{split}" if len(rows.inputs) == 1 else f"x_{split}_{i}")
            for i, a in enumerate(rows.inputs)
        )
        n_x = len(inputs[0])
        if any(len(a) != n_x for a in inputs):
            raise DataError(f"the inputs of x_{split} have different row counts: {[len(a) for a in inputs]}")
        y = None if rows.y is None else _y(rows.y, f"y_{split}")
        if y is not None and len(y) != n_x:
            raise DataError(f"x_{split} has {n_x} samples but y_{split} has {len(y)}")
        least = MIN_SPLIT_SAMPLES if classification else 1
        if n_x < least:
            also = " (the validation split doubles as the test split)" if data.test_is_val else ""
            raise DataError(
                f"x_{split} has {n_x} sample{'s' if n_x != 1 else ''}; each split needs at least "
                f"{least}{also if split == 'test' else ''}"
            )
        splits[split] = Rows(inputs, y, rows.targets)
    shapes = {split: tuple(a.shape[1:] for a in r.inputs) for split, r in splits.items()}
    if len(set(shapes.values())) != 1:
        got = ", ".join(f"x_{s} {shape if len(shape) > 1 else shape[0]}" for s, shape in shapes.items())
        raise DataError(f"splits disagree on the sample shape: {got}")
    if classification:
        classes = np.unique(splits["train"].y if splits["train"].y is not None else [])
        if len(classes) < MIN_TRAIN_CLASSES:
            raise DataError(
                f"y_train holds {len(classes)} class ({', '.join(str(int(c)) for c in classes)}); training "
                f"a classifier needs at least {MIN_TRAIN_CLASSES}"
            )
    return dataclasses.replace(data, train=splits["train"], val=splits["val"], test=splits["test"])


def _x(arr: Any, key: str) -> np.ndarray:
    arr = np.asarray(arr)
    if arr.dtype.kind not in "fiub":
        raise DataError(f"{key} must be numeric (convertible to float32), got dtype {arr.dtype}")
    if arr.ndim < 2:
        raise DataError(f"{key} must be (N, ...) samples, got shape {arr.shape}")
    if arr.dtype.kind in "iub":
        return np.ascontiguousarray(arr)  # integer inputs (token ids, ...) keep their values
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
            "Dense(K) (logits) nor a Softmax layer; without class labels (y) in --data, or with "
            "--task generic, it is compressed as a generic model"
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
    """Class count of a .tflite classifier: output 0 must be (1, K) class scores with K >= 2."""
    io = tflite_io(data, source)
    out = io.outputs[0]
    desc = f"output {out.name!r} of shape {list(out.shape)}"
    if len(out.shape) != 2 or out.shape[-1] < 2:
        raise NotAClassifierError(
            f"{source} is not a classifier: {desc}; expected (1, K) class scores with K >= 2 "
            "(without labels it is compressed as a generic model)"
        )
    return Signature(tuple(io.inputs[0].shape[1:]), int(out.shape[-1]), "probabilities", desc)


@dataclass(frozen=True, slots=True)
class ModelIO:
    """The model's inputs and outputs (shapes with the batch axis; -1 = free), in the order the data and
    a user evaluator see them."""

    inputs: tuple[InputSpec, ...]
    outputs: tuple[InputSpec, ...]

    def describe(self) -> str:
        def one(specs: tuple[InputSpec, ...]) -> str:
            return ", ".join(f"{s.name} {list(s.shape)} {s.dtype}" for s in specs)

        return f"inputs: {one(self.inputs)}; outputs: {one(self.outputs)}"

    def free_dims(self) -> bool:
        """True when an input has a free dimension besides the batch axis."""
        return any(d == -1 for s in self.inputs for d in s.shape[1:])


def keras_io(model: Any) -> ModelIO:
    inputs = getattr(model, "inputs", None)
    outputs = getattr(model, "outputs", None)
    name = getattr(model, "name", type(model).__name__)
    if not inputs or not outputs:
        raise DataError(
            f"model {name!r} has no defined inputs/outputs (build it with keras.Input or call it once)"
        )

    def spec(t: Any, i: int, kind: str) -> InputSpec:
        shape = tuple(-1 if d is None else int(d) for d in t.shape)
        dtype = str(getattr(t, "dtype", "float32"))
        return InputSpec(str(getattr(t, "name", f"{kind}_{i}")), shape, dtype)

    return ModelIO(
        tuple(spec(t, i, "input") for i, t in enumerate(inputs)),
        tuple(spec(t, i, "output") for i, t in enumerate(outputs)),
    )


def tflite_io(data: bytes, source: str = "the .tflite") -> ModelIO:
    """Inputs and outputs of a .tflite as the interpreter orders them (the order a device feeds)."""
    from compressor.evaluate import load_interpreter

    try:
        interpreter = load_interpreter(data, threads=1)
    except EvaluationError as err:
        raise DataError(f"{source} is not a loadable .tflite: {err}") from err

    def spec(d: dict[str, Any]) -> InputSpec:
        sig = d.get("shape_signature")
        shape = [int(x) for x in (sig if sig is not None and len(sig) == len(d["shape"]) else d["shape"])]
        return InputSpec(str(d["name"]), tuple(shape), np.dtype(d["dtype"]).name)

    from compressor.evaluate import io_order

    in_order, out_order = io_order(interpreter)
    in_details, out_details = interpreter.get_input_details(), interpreter.get_output_details()
    ins = [spec(d) for d in in_details]
    for i in ins:
        if i.shape and i.shape[0] not in (1, -1):
            raise DataMismatchError(
                f"{source} input {i.name!r} shape {list(i.shape)}: expected a batch-1 input"
            )
    logical_in = [ins[in_order.index(k)] for k in range(len(ins))]
    logical_out = [spec(out_details[out_order[j]]) for j in range(len(out_details))]
    return ModelIO(tuple(logical_in), tuple(logical_out))


# --------------------------------------------------------------------------------------------------------
# the data against the model


def fit_inputs(data: Dataset, io: ModelIO) -> Dataset:
    """Every split's inputs against the model's: their number, and each row shape (a missing trailing
    channel axis of 1 is added: (N, H, W) images for a (1, H, W, 1) input). Returns ``data`` fitted."""
    want = io.inputs
    if data.num_inputs != len(want):
        raise DataMismatchError(
            f"the data has {data.num_inputs} input array(s) but the model takes {len(want)} "
            f"({', '.join(f'{w.name} {list(w.shape)}' for w in want)}); give x_<split>_0 .. "
            f"x_<split>_{len(want) - 1} in the model's input order"
        )
    fitted: dict[str, Rows] = {}
    for split in SPLITS:
        rows: Rows = getattr(data, split)
        fitted[split] = Rows(
            tuple(
                _fit_one(a, w, split, i, len(want))
                for i, (a, w) in enumerate(zip(rows.inputs, want, strict=True))
            ),
            rows.y,
            rows.targets,
        )
    calibration = None
    if data.calibration is not None:
        calibration = Rows(
            tuple(
                _fit_one(a, w, "calibration", i, len(want))
                for i, (a, w) in enumerate(zip(data.calibration.inputs, want, strict=True))
            )
        )
    return dataclasses.replace(
        data, train=fitted["train"], val=fitted["val"], test=fitted["test"], calibration=calibration
    )


def _fit_one(arr: np.ndarray, spec: InputSpec, split: str, index: int, count: int) -> np.ndarray:
    got, want = tuple(arr.shape[1:]), tuple(spec.shape[1:])

    def fits(shape: tuple[int, ...]) -> bool:
        return len(shape) == len(want) and all(w <= 0 or w == g for w, g in zip(want, shape, strict=True))

    if np.dtype(spec.dtype).kind == "f" and arr.dtype.kind != "f":
        arr = arr.astype(np.float32)  # integer pixels for a float model: the values, as floats
    if fits(got):
        return arr
    if fits((*got, 1)):
        return arr[..., np.newaxis]
    key = f"x_{split}" if count == 1 else f"x_{split}_{index}"
    shown = tuple("any" if d <= 0 else d for d in want)
    raise DataMismatchError(
        f"{key} samples have shape {got} but the model takes {shown} (input {spec.name!r}, without the "
        "batch axis)"
    )


def check_fit(data: Dataset, sig: Signature) -> Dataset:
    """Class indices and label names against a classifier; returns ``data`` (labels filled)."""
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


def validate(model: Any, data: Dataset) -> tuple[Dataset, ModelIO, Signature | None]:
    """Every check, cheapest first: the data alone, the model, then the data against the model.

    ``model`` is a Keras model or the bytes of a .tflite. Returns the fitted data, the model's inputs and
    outputs, and — when the data is labelled — the classifier signature (labels must fit output 0).
    """
    data = check_dataset(data)
    io = tflite_io(model) if isinstance(model, bytes) else keras_io(model)
    data = fit_inputs(data, io)
    if data.task != "classification":
        return data, io, None
    sig = tflite_signature(model) if isinstance(model, bytes) else keras_signature(model)
    return check_fit(data, sig), io, sig
