"""The seed CNN, seeded training, loading a user .keras model, and MAC/parameter counts.

TensorFlow/Keras are imported inside the functions (``compressor._tf``), never at module import.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from compressor._tf import keras, tf
from compressor.data import Dataset
from compressor.errors import DataError


def seed_everything(seed: int) -> None:
    """Seed Python, numpy and the Keras/TF backend (weight initialisation, shuffling, dropout)."""
    keras().utils.set_random_seed(seed)


def build_seed_cnn(
    input_shape: tuple[int, ...] = (28, 28, 1), num_classes: int = 10, *, seed: int | None = 0
) -> Any:
    """Conv2D(32, 3×3, relu) → MaxPool(2×2) → Flatten → Dense(128, relu) → Dense(classes, softmax).

    With ``seed`` set the initial weights are the same on every call.
    """
    k = keras()
    if seed is not None:
        seed_everything(seed)
    return k.Sequential(
        [
            k.Input(shape=input_shape),
            k.layers.Conv2D(32, (3, 3), activation="relu", name="conv"),
            k.layers.MaxPooling2D((2, 2), name="pool"),
            k.layers.Flatten(name="flatten"),
            k.layers.Dense(128, activation="relu", name="fc"),
            k.layers.Dense(num_classes, activation="softmax", name="probs"),
        ],
        name="seed_cnn",
    )


def train(
    model: Any,
    data: Dataset,
    *,
    epochs: int = 8,
    seed: int = 0,
    batch_size: int = 32,
    learning_rate: float = 1e-3,
    deterministic: bool = False,
    progress: Callable[[str], None] | None = None,
) -> dict[str, list[float]]:
    """Compile and fit ``model`` on ``data.x_train`` with fixed seeds; return the Keras history dict."""
    k = keras()
    seed_everything(seed)
    if deterministic:
        # Same seed, same weights: without this, multi-threaded CPU reductions vary from run to run.
        tf().config.experimental.enable_op_determinism()
    model.compile(
        optimizer=k.optimizers.Adam(learning_rate),
        loss="sparse_categorical_crossentropy",
        metrics=["accuracy"],
    )
    callbacks = [progress_callback(progress, epochs)] if progress else []
    history = model.fit(
        data.x_train,
        data.y_train,
        validation_data=(data.x_val, data.y_val),
        epochs=epochs,
        batch_size=batch_size,
        shuffle=True,
        verbose=0,
        callbacks=callbacks,
    )
    return {key: [float(v) for v in values] for key, values in history.history.items()}


def progress_callback(progress: Callable[[str], None] | None, epochs: int, label: str = "train") -> Any:
    """A Keras callback that reports ``<label>: epoch i/n loss ... val_accuracy ...`` after each epoch."""
    k = keras()

    base: Any = k.callbacks.Callback

    class ProgressCallback(base):
        def on_epoch_end(self, epoch: int, logs: dict[str, float] | None = None) -> None:
            logs = logs or {}
            if progress is not None:
                val = "val_accuracy" if "val_accuracy" in logs or "val_loss" not in logs else "val_loss"
                progress(
                    f"{label}: epoch {epoch + 1}/{epochs} loss {logs.get('loss', float('nan')):.4f} "
                    f"{val} {logs.get(val, float('nan')):.4f}"
                )

    return ProgressCallback()


_HDF5_SIGNATURE = b"\x89HDF\r\n\x1a\n"


def load_keras_model(path: Path) -> Any:
    """Load a ``.keras`` file (or a legacy Keras ``.h5``); a missing or unreadable file is a DataError."""
    check_keras_file(path)
    k = keras()
    try:
        return k.saving.load_model(path, compile=False)
    except Exception as err:  # Keras raises a wide range of types for a bad archive
        raise DataError(f"cannot load Keras model {str(path)!r}: {err}") from err


def check_model_path(path: Path) -> None:
    """A DataError naming the problem unless ``path`` is an existing .keras, .h5 or .tflite file (what the
    file holds is checked when it is read)."""
    if path.is_dir():
        hint = (
            "convert it with tf.lite.TFLiteConverter.from_saved_model and pass the .tflite"
            if (path / "saved_model.pb").is_file()
            else "pass a .keras, .h5 or .tflite file"
        )
        raise DataError(f"{str(path)!r} is a directory, not a model file: {hint}")
    if not path.is_file():
        raise DataError(f"model file {str(path)!r} does not exist")
    if path.suffix not in (".keras", ".h5", ".hdf5", ".tflite"):
        raise DataError(f"model file {str(path)!r} must be a Keras .keras (or legacy .h5) file, or a .tflite")


def check_keras_file(path: Path) -> None:
    """A DataError naming the problem unless ``path`` is a readable .keras archive or .h5 file."""
    check_model_path(path)
    if path.suffix in (".h5", ".hdf5"):
        with path.open("rb") as f:
            if f.read(8) != _HDF5_SIGNATURE:
                raise DataError(f"{str(path)!r} is not an HDF5 file (a legacy Keras .h5 model)")
    elif path.suffix != ".keras":
        raise DataError(f"model file {str(path)!r} must be a Keras .keras (or legacy .h5) file")
    else:
        import zipfile

        if not zipfile.is_zipfile(path):
            raise DataError(
                f"{str(path)!r} is not a Keras archive (a .keras file is a zip written by model.save); "
                "re-save the model with model.save('model.keras')"
            )


def count_params(model: Any) -> int:
    return int(model.count_params())


def count_macs(model: Any) -> int | None:
    """Multiply-accumulates of one inference for Conv2D/DepthwiseConv2D/Dense layers (others ignored).

    Returns None when a layer's shapes are not known statically.
    """
    k = keras()
    total = 0
    try:
        for layer in _leaf_layers(model):
            if isinstance(layer, k.layers.DepthwiseConv2D):
                _, oh, ow, oc = layer.output.shape
                kh, kw = layer.kernel_size
                total += int(oh * ow * oc * kh * kw)
            elif isinstance(layer, k.layers.Conv2D):
                _, oh, ow, oc = layer.output.shape
                kh, kw = layer.kernel_size
                ic = layer.input.shape[-1]
                total += int(oh * ow * oc * kh * kw * ic // max(1, layer.groups))
            elif isinstance(layer, k.layers.Dense):
                ic = layer.input.shape[-1]
                positions = int(np.prod(layer.output.shape[1:-1])) if len(layer.output.shape) > 2 else 1
                total += int(ic * layer.units * positions)
    except (TypeError, ValueError, AttributeError):
        return None
    return total


def _leaf_layers(model: Any) -> list[Any]:
    out: list[Any] = []
    for layer in getattr(model, "layers", []):
        if hasattr(layer, "layers") and layer.layers:
            out.extend(_leaf_layers(layer))
        else:
            out.append(layer)
    return out
