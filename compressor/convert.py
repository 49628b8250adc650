"""Keras model → TFLite variants, driven by named recipes.

A :class:`Recipe` is an id plus an ordered list of steps. Steps are a tagged union chosen by ``kind``;
today there is one kind, ``quantize`` (the last step, it configures the TFLite converter). Model
transforms such as structured pruning or distillation slot in as further kinds that run before it::

    class PruneStep(Step):  kind: Literal["prune"]; keep: float          # (future)
    AnyStep = Annotated[QuantizeStep | PruneStep, Field(discriminator="kind")]
    MODEL_TRANSFORMS["prune"] = prune_channels   # (step, model, data, seed) -> new Keras model

Every variant is converted from a batch-1 copy of the model (FACTS.md: a fixed batch-1 signature gives
a smaller graph) with ``TFLiteConverter.from_keras_model`` — never ``from_concrete_functions``, which
silently drops the weights of Keras 3 models.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from typing import Any, Literal, Self

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, model_validator

from agent.wire import Identifier
from compressor._tf import keras, quiet_stdout, tf
from compressor.data import Dataset
from compressor.errors import ConversionError

QuantMode = Literal["none", "float16", "dynamic_int8", "int8"]
REPRESENTATIVE_SAMPLES = 300


class Step(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class QuantizeStep(Step):
    """Post-training quantization; always the last step of a recipe."""

    kind: Literal["quantize"] = "quantize"
    mode: QuantMode = Field(description="none = float32; dynamic_int8 = int8 weights, float activations")
    representative_samples: int = Field(
        default=REPRESENTATIVE_SAMPLES, ge=1, description="training samples used to calibrate int8"
    )
    per_channel_dense: bool = Field(
        default=False,
        description="dynamic_int8 only: per-channel FULLY_CONNECTED needs runtime > 2.14 (FACTS.md)",
    )


# The union grows as kinds are added; the discriminator then becomes Field(discriminator="kind").
AnyStep = QuantizeStep


class Recipe(BaseModel):
    """A named way of producing one variant. ``id`` becomes the variant id and the file name."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    id: Identifier
    description: str = ""
    steps: list[AnyStep] = Field(min_length=1)

    @model_validator(mode="after")
    def _quantize_last(self) -> Self:
        kinds = [s.kind for s in self.steps]
        if kinds.count("quantize") != 1 or kinds[-1] != "quantize":
            raise ValueError(f"recipe {self.id!r} needs exactly one quantize step, last; got {kinds}")
        return self

    @property
    def quantize(self) -> QuantizeStep:
        step = self.steps[-1]
        assert isinstance(step, QuantizeStep)
        return step

    @property
    def quantization(self) -> QuantMode:
        return self.quantize.mode

    @property
    def techniques(self) -> list[str]:
        """Wire ``Variant.techniques``: the model-transform kinds plus ``quantize`` when it quantizes."""
        out: list[str] = [s.kind for s in self.steps[:-1]]
        if self.quantization != "none":
            out.append("quantize")
        return out


RECIPES: dict[str, Recipe] = {
    r.id: r
    for r in (
        Recipe(id="float32", description="float32 baseline", steps=[QuantizeStep(mode="none")]),
        Recipe(id="float16", description="float16 weights", steps=[QuantizeStep(mode="float16")]),
        Recipe(
            id="dynint8",
            description="dynamic-range int8 (int8 weights, float I/O)",
            steps=[QuantizeStep(mode="dynamic_int8")],
        ),
        Recipe(
            id="int8",
            description="full-integer int8 with int8 input and output",
            steps=[QuantizeStep(mode="int8")],
        ),
    )
}
DEFAULT_VARIANTS: tuple[str, ...] = tuple(RECIPES)
BASELINE = "float32"

# kind → (step, model, data, seed) -> transformed Keras model. Empty until pruning/distillation land.
MODEL_TRANSFORMS: dict[str, Callable[[Any, Any, Dataset, int], Any]] = {}


def resolve_recipes(names: Sequence[str] | None) -> list[Recipe]:
    """Recipes for ``names`` (default: all), with the float32 baseline always first."""
    wanted = list(DEFAULT_VARIANTS) if names is None else list(dict.fromkeys(n.strip() for n in names))
    unknown = [n for n in wanted if n not in RECIPES]
    if unknown:
        raise ConversionError(f"unknown variant(s) {', '.join(unknown)}; known recipes: {', '.join(RECIPES)}")
    if BASELINE in wanted:
        wanted.remove(BASELINE)
    return [RECIPES[BASELINE]] + [RECIPES[n] for n in wanted]


def representative_subset(x: np.ndarray, count: int, seed: int) -> np.ndarray:
    """A fixed, seeded subset of training inputs used to calibrate full-integer quantization."""
    rng = np.random.default_rng(seed)
    idx = rng.permutation(len(x))[: min(count, len(x))]
    return np.ascontiguousarray(x[np.sort(idx)], dtype=np.float32)


def batch1_model(model: Any) -> Any:
    """A model sharing ``model``'s weights whose input has a fixed batch size of 1."""
    k = keras()
    inputs = model.inputs if hasattr(model, "inputs") else None
    if not inputs or len(inputs) != 1:
        raise ConversionError("only single-input models are supported")
    spec = inputs[0]
    inp = k.Input(shape=tuple(spec.shape[1:]), batch_size=1, dtype=spec.dtype, name="input")
    return k.Model(inp, model(inp), name=f"{model.name}_b1")


def convert(model: Any, recipe: Recipe, data: Dataset, *, seed: int = 0) -> bytes:
    """Run ``recipe``'s model transforms, then convert to .tflite bytes with its quantize step."""
    for step in recipe.steps[:-1]:
        transform = MODEL_TRANSFORMS.get(step.kind)
        if transform is None:
            raise ConversionError(f"recipe {recipe.id!r}: no transform registered for step {step.kind!r}")
        model = transform(step, model, data, seed)
    rep = None
    if recipe.quantization == "int8":
        rep = representative_subset(data.x_train, recipe.quantize.representative_samples, seed)
    return to_tflite(model, recipe.quantize, rep)


def to_tflite(model: Any, step: QuantizeStep, representative: np.ndarray | None = None) -> bytes:
    """Convert a Keras model to TFLite bytes as ``step`` says; TF errors become ConversionError."""
    t = tf()
    if step.mode == "int8" and (representative is None or len(representative) == 0):
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


def _configure(t: Any, converter: Any, step: QuantizeStep, representative: np.ndarray | None) -> None:
    if step.mode == "none":
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

        def gen() -> Iterator[list[np.ndarray]]:
            for i in range(len(samples)):
                yield [samples[i : i + 1]]

        converter.representative_dataset = gen
        converter.target_spec.supported_ops = [t.lite.OpsSet.TFLITE_BUILTINS_INT8]
        converter.inference_input_type = t.int8
        converter.inference_output_type = t.int8
