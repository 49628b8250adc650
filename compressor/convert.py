"""Keras model → TFLite variants, driven by recipes (:mod:`compressor.recipe`).

A recipe variant is an ordered chain of steps. The model transforms run first, each registered by its
``kind`` in :data:`MODEL_TRANSFORMS` (``(step, model, ctx) -> (new model, notes)``); the last step,
``quantize``, converts to .tflite bytes (:func:`quantize_keras`, or :func:`quantize_tflite` for an input
that is already a .tflite). :data:`RECIPES` is the built-in default recipe's variants by id.

Every variant is converted from a batch-1 copy of the model (FACTS.md: a fixed batch-1 signature gives
a smaller graph) with ``TFLiteConverter.from_keras_model`` — never ``from_concrete_functions``, which
silently drops the weights of Keras 3 models. Weight-only int8 (and dynamic int8 of an existing
.tflite) uses ai-edge-quantizer on the float32 file.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from compressor._tf import keras, quiet_stdout, tf
from compressor.data import Dataset
from compressor.errors import ConversionError
from compressor.recipe import (
    ClusterStep,
    DistillStep,
    MagnitudePruneStep,
    PruneStep,
    QuantizeStep,
    Recipe,
    load_recipe,
)

BASELINE = "float32"
RECIPES: dict[str, Recipe] = {r.id: r for r in load_recipe("default").variants}
DEFAULT_VARIANTS: tuple[str, ...] = tuple(RECIPES)


def resolve_recipes(names: Sequence[str] | None) -> list[Recipe]:
    """Variants of the built-in default recipe for ``names`` (default: all), the float32 baseline first."""
    return load_recipe("default").select(None if names is None else list(names))


# --------------------------------------------------------------------------------------------------------
# model transforms


@dataclass(slots=True)
class TransformContext:
    """What a transform may use besides the model: the data, the seed, the original model (the teacher
    for distillation) and a progress callback."""

    data: Dataset
    seed: int
    teacher: Any
    progress: Callable[[str], None] = field(default=lambda _line: None)


Transform = Callable[[Any, Any, TransformContext], tuple[Any, list[str]]]


def _epoch_logger(ctx: TransformContext, label: str, epochs: int) -> list[Any]:
    from compressor.models import progress_callback

    return [progress_callback(ctx.progress, epochs, label)] if epochs else []


def _prune(step: PruneStep, model: Any, ctx: TransformContext) -> tuple[Any, list[str]]:
    from compressor.prune import fine_tune, prune_structured

    generic = ctx.data.task != "classification"
    if generic and step.criterion == "taylor":
        raise NeedsLabelsError("the taylor criterion weighs channels by the label loss; use criterion = 'l1'")
    pruned, report = prune_structured(model, step.keep, step.criterion, data=None if generic else ctx.data)
    notes = [line.strip() for line in report.summary().splitlines()[:1]]
    if step.fine_tune_epochs:
        epochs = step.fine_tune_epochs
        common: dict[str, Any] = {
            "learning_rate": step.learning_rate,
            "seed": ctx.seed,
            "callbacks": _epoch_logger(ctx, f"prune keep {step.keep:g} fine-tune", epochs),
        }
        if generic:  # no labels: toward the unpruned model's outputs
            from compressor.output_distill import describe, fit_to_teacher

            notes.append(describe(fit_to_teacher(pruned, model, ctx.data, epochs, **common), ctx.data))
        else:
            fine_tune(pruned, ctx.data, epochs, **common)
            notes.append(f"fine-tuned {epochs} epochs after pruning")
    return pruned, notes


def _magnitude_prune(step: MagnitudePruneStep, model: Any, ctx: TransformContext) -> tuple[Any, list[str]]:
    from compressor.sparsity import magnitude_prune

    out, report = magnitude_prune(model, ctx.data, step.final_sparsity, step.epochs, seed=ctx.seed)
    return out, [report.summary().splitlines()[0]]


def _cluster(step: ClusterStep, model: Any, ctx: TransformContext) -> tuple[Any, list[str]]:
    from compressor.sparsity import cluster_weights

    out, report = cluster_weights(model, step.clusters, data=ctx.data, epochs=step.epochs, seed=ctx.seed)
    return out, [report.summary().splitlines()[0]]


def _distill(step: DistillStep, model: Any, ctx: TransformContext) -> tuple[Any, list[str]]:
    from compressor.distill import distill, make_student

    if step.student is not None:
        from pathlib import Path

        from compressor.models import load_keras_model

        student, origin = load_keras_model(Path(step.student)), f"student {step.student}"
    elif step.width is not None:
        student, origin = (
            make_student(model, step.width, seed=ctx.seed),
            f"fresh student width {step.width:g}",
        )
    else:
        from compressor.sparsity import _copy

        student, origin = _copy(model), "the current model as student"
    if ctx.data.task != "classification":
        from compressor.output_distill import describe, fit_to_teacher

        ctx.progress(f"distill: {origin}, {step.epochs} epochs toward the teacher's outputs (no labels)")
        done = fit_to_teacher(
            student,
            ctx.teacher,
            ctx.data,
            step.epochs,
            seed=ctx.seed,
            patience=None,
            callbacks=_epoch_logger(ctx, "distill", step.epochs),
        )
        return student, [f"{origin}: {describe(done, ctx.data)}"]
    ctx.progress(f"distill: {origin}, {step.epochs} epochs, T={step.temperature:g} alpha={step.alpha:g}")
    out, report = distill(
        ctx.teacher,
        student,
        ctx.data,
        step.epochs,
        temperature=step.temperature,
        alpha=step.alpha,
        seed=ctx.seed,
    )
    for i, loss in enumerate(report.loss_history):
        ctx.progress(f"distill: epoch {i + 1}/{step.epochs} loss {loss:.4f}")
    return out, [f"{origin}: {report.summary()}"]


# transforms that also work without labels (fine-tuned toward the float model's outputs)
LABEL_FREE_TRANSFORMS = frozenset({"prune", "distill"})

MODEL_TRANSFORMS: dict[str, Transform] = {
    "prune": _prune,
    "magnitude_prune": _magnitude_prune,
    "cluster": _cluster,
    "distill": _distill,
}


# --------------------------------------------------------------------------------------------------------
# conversion


def representative_subset(x: np.ndarray | tuple[np.ndarray, ...], count: int, seed: int) -> list[np.ndarray]:
    """A fixed, seeded subset of calibration rows (one array per input) for full-integer quantization."""
    arrays = (x,) if isinstance(x, np.ndarray) else x
    rng = np.random.default_rng(seed)
    idx = np.sort(rng.permutation(len(arrays[0]))[: min(count, len(arrays[0]))])
    return [
        np.ascontiguousarray(a[idx], dtype=np.float32 if a.dtype.kind == "f" else a.dtype) for a in arrays
    ]


def batch1_model(model: Any) -> Any:
    """A model sharing ``model``'s weights whose inputs have a fixed batch size of 1.

    Inputs are named ``ef_in_<i>`` so that :func:`compressor.evaluate.io_order` can map the converted
    file's inputs (which the converter may reorder) back to the Keras order.
    """
    k = keras()
    inputs = getattr(model, "inputs", None)
    if not inputs:
        raise ConversionError("the model has no defined inputs (build it with keras.Input)")
    new_inputs = [
        k.Input(shape=tuple(spec.shape[1:]), batch_size=1, dtype=spec.dtype, name=f"ef_in_{i}")
        for i, spec in enumerate(inputs)
    ]
    outputs = model(new_inputs[0] if len(new_inputs) == 1 else new_inputs)
    if isinstance(outputs, dict):  # dict outputs: in the model's output order, as the data sees them
        outputs = [outputs[name] for name in model.output_names]
    return k.Model(new_inputs[0] if len(new_inputs) == 1 else new_inputs, outputs, name=f"{model.name}_b1")


def quantize_keras(model: Any, step: QuantizeStep, data: Dataset, *, seed: int = 0) -> bytes:
    """Convert a Keras model to .tflite bytes as ``step`` says."""
    if step.mode == "weight_only_int8":
        from compressor.tflite_quant import quantize_tflite as quantize_file

        return quantize_file(to_tflite(model, QuantizeStep(mode="float32")), step.mode)[0]
    if step.mode == "weight_only_int4":
        raise ConversionError("weight_only_int4 is searched on the float32 .tflite by the pipeline")
    rep = None
    if step.mode == "int8":
        if data.synthetic:
            raise NeedsCalibrationError(
                "full-integer int8 needs calibration data: pass --calibration DIR|FILE.npz (or --data)"
            )
        recurrent = recurrent_layers(model)
        if recurrent:
            # Measured: TF 2.21's calibrator dies with SIGSEGV (calibrator._feed_tensors) on the WHILE
            # loop a Keras 3 LSTM/GRU converts to, taking the whole compressor with it.
            raise ConversionError(
                f"full-integer int8 is not built for recurrent layers ({', '.join(recurrent[:3])}): "
                "TensorFlow 2.21's int8 calibrator crashes the process on their WHILE loop (float16, "
                "dynamic-range and weight-only int8 still apply)"
            )
        rep = representative_subset(data.calibration_rows.inputs, step.representative_samples or 0, seed)
    return to_tflite(model, step, rep)


def recurrent_layers(model: Any) -> list[str]:
    """Names of the recurrent layers (keras.layers.RNN: LSTM, GRU, SimpleRNN, ConvLSTM) in ``model``,
    nested models and wrappers (Bidirectional, TimeDistributed) included."""
    from compressor._tf import keras

    rnn = keras().layers.RNN
    found: list[str] = []
    stack, seen = [model], set()
    while stack:
        layer = stack.pop()
        if id(layer) in seen:
            continue
        seen.add(id(layer))
        if isinstance(layer, rnn):
            found.append(f"{type(layer).__name__} {layer.name!r}")
            continue
        stack.extend(getattr(layer, "layers", None) or [])
        stack.extend(
            c for a in ("layer", "forward_layer", "backward_layer") if (c := getattr(layer, a, None))
        )
    return sorted(found)


class NeedsKerasError(ConversionError):
    """The step cannot be applied to an existing .tflite (it needs the Keras model)."""


class NeedsCalibrationError(ConversionError):
    """Full-integer int8 asked for with no calibration rows (no --data, no --calibration)."""


class NeedsLabelsError(ConversionError):
    """A transform that trains on class labels (prune, distill, ...) asked for without labels."""


def to_tflite(model: Any, step: QuantizeStep, representative: list[np.ndarray] | None = None) -> bytes:
    """Convert a Keras model to TFLite bytes as ``step`` says; TF errors become ConversionError."""
    if step.mode == "weight_only_int8":
        raise ConversionError("weight_only_int8 is produced by ai-edge-quantizer, not the TF converter")
    t = tf()
    if step.mode == "int8" and (not representative or len(representative[0]) == 0):
        raise ConversionError("full-integer int8 needs a representative dataset")
    try:
        converter = t.lite.TFLiteConverter.from_keras_model(batch1_model(model))
        _configure(t, converter, step, representative)
        with quiet_stdout():
            return bytes(converter.convert())
    except ConversionError:
        raise
    except Exception as err:  # TF raises ConverterError, ValueError, RuntimeError, ...
        raise ConversionError(f"TFLite conversion ({step.mode}) failed: {err}") from err


def _configure(t: Any, converter: Any, step: QuantizeStep, representative: list[np.ndarray] | None) -> None:
    if step.mode == "float32":
        return
    converter.optimizations = [t.lite.Optimize.DEFAULT]
    if step.mode == "float16":
        converter.target_spec.supported_types = [t.float16]
    elif step.mode == "dynamic_int8":
        if not step.per_channel_dense:
            # FACTS.md: per-channel hybrid FULLY_CONNECTED (v12) does not load on tflite-runtime 2.14.
            converter._experimental_disable_per_channel_quantization_for_dense_layers = True
    elif step.mode == "int8":
        assert representative is not None
        samples = representative

        def gen() -> Iterator[dict[str, np.ndarray]]:
            # By input name: the converter may order a multi-input model's inputs differently.
            for i in range(len(samples[0])):
                yield {f"ef_in_{k}": a[i : i + 1] for k, a in enumerate(samples)}

        converter.representative_dataset = gen
        converter.target_spec.supported_ops = [t.lite.OpsSet.TFLITE_BUILTINS_INT8]
        if step.int8_io:
            converter.inference_input_type = t.int8
            converter.inference_output_type = t.int8
