"""Recipes: which variants to build and how, as a TOML file validated with pydantic v2 (no TensorFlow here).

A recipe file names variants; each variant is an ordered chain of steps, a tagged union chosen by
``kind``. Model transforms (``prune``, ``magnitude_prune``, ``cluster``, ``distill``) run on the Keras
model in order; the chain ends with exactly one ``quantize`` step, which converts to .tflite::

    name = "default"
    baseline = "float32"

    [[variants]]
    id = "prune50-int8"
    steps = [
      { kind = "prune", keep = 0.5, criterion = "l1", fine_tune_epochs = 4 },
      { kind = "quantize", mode = "int8", representative_samples = 300 },
    ]

A budget (``compress --max-drop POINTS`` or ``--min-metric NAME=VALUE``, :mod:`compressor.budget`)
can search one setting of a chain instead of fixing it: ``keep = "search"`` on a ``prune`` step,
``width = "search"`` on a ``distill`` step (at most one per chain). The pipeline bisects over the grid
``compressor.budget.KEEP_GRID`` / ``WIDTH_GRID`` (at most ``--search-trials`` trials, 5 by default),
each trial fine-tuned, converted by the chain's quantize step and evaluated on the validation rows; the
strongest setting within the budget becomes the variant (its id unchanged). Without a budget, searched
chains are not built (there is nothing to search for) and the report says so::

    [[variants]]
    id = "prune-search-int8"
    steps = [
      { kind = "prune", keep = "search", fine_tune_epochs = 4 },
      { kind = "quantize", mode = "int8", representative_samples = 300 },
    ]

Built-in recipes live in ``compressor/recipes/*.toml`` (package data): ``default`` (every technique),
``demo`` (the fast subset ``compress --demo`` uses) and ``tflite`` (for an existing float .tflite with
no Keras source: ai-edge-quantizer only). Errors name the key path, the value and, for a typo, the
closest valid key (``variants[4] (prune50-int8).steps[0].kep: unknown key; did you mean 'keep'?``).
"""

from __future__ import annotations

import difflib
import tomllib
from importlib import resources
from pathlib import Path
from typing import Annotated, Any, Literal, Self

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from agent.wire import Identifier
from compressor.errors import CompressorError

QuantMode = Literal["float32", "float16", "dynamic_int8", "int8", "weight_only_int8", "weight_only_int4"]
# Modes whose .tflite must hold INT8 tensors (checked on the file: a variant is never labelled int8
# when it is not).
INT8_MODES = ("dynamic_int8", "int8", "weight_only_int8", "weight_only_int4")
BUILTIN_RECIPES = ("default", "demo", "tflite", "generic")
REPRESENTATIVE_SAMPLES = 300


class RecipeError(CompressorError):
    """A recipe file is missing, not TOML, or does not validate; the message names key path and value."""


class Base(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class QuantizeStep(Base):
    """Post-training conversion to .tflite; always the last step of a chain."""

    kind: Literal["quantize"] = "quantize"
    mode: QuantMode = Field(
        description="float32 = no quantization; dynamic_int8 = int8 weights, float activations; "
        "int8 = full integer with int8 input/output; weight_only_int8 = int8 weights dequantized "
        "at run time (ai-edge-quantizer); weight_only_int4 = int4 weights on the layers the outputs "
        "tolerate them on (searched against min_cosine), int8 elsewhere"
    )
    representative_samples: int | None = Field(
        default=None, ge=1, description="training samples used to calibrate int8 (required for int8)"
    )
    per_channel_dense: bool = Field(
        default=False,
        description="dynamic_int8 only: per-channel FULLY_CONNECTED needs runtime > 2.14 (FACTS.md)",
    )
    int8_io: bool = Field(
        default=True,
        description="int8 only: int8 input and output tensors (false: float I/O, quantized inside)",
    )
    min_cosine: float | None = Field(
        default=None,
        gt=0,
        le=1,
        description="weight_only_int4 only: int4 weights on the least sensitive layers while the outputs "
        "keep this cosine with float on the validation rows (default 0.995; a user budget --min-metric "
        "cosine=X replaces it, less 20 % of the error it allows as headroom)",
    )

    @model_validator(mode="after")
    def _samples(self) -> Self:
        if self.mode == "int8" and self.representative_samples is None:
            raise ValueError("mode 'int8' needs representative_samples (e.g. 300)")
        if self.mode != "int8" and self.representative_samples is not None:
            raise ValueError(f"representative_samples only applies to mode 'int8', not {self.mode!r}")
        if self.per_channel_dense and self.mode != "dynamic_int8":
            raise ValueError("per_channel_dense only applies to mode 'dynamic_int8'")
        if not self.int8_io and self.mode != "int8":
            raise ValueError("int8_io only applies to mode 'int8'")
        if self.min_cosine is not None and self.mode != "weight_only_int4":
            raise ValueError("min_cosine only applies to mode 'weight_only_int4'")
        return self

    @property
    def wire_quantization(self) -> str:
        """The wire ``Variant.quantization`` value for this mode."""
        return "none" if self.mode == "float32" else self.mode


class PruneStep(Base):
    """Structured channel pruning (really narrower layers), then fine-tuning."""

    kind: Literal["prune"]
    keep: float = Field(gt=0, le=1, description="fraction of the output channels (filters, units) kept")
    search: bool = Field(
        default=False,
        description='keep = "search": the smallest keep of compressor.budget.KEEP_GRID within the budget',
    )
    criterion: Literal["l1", "taylor"] = "l1"
    fine_tune_epochs: int = Field(default=4, ge=0)
    # Peak of the warm-up + cosine schedule; unset: the task's default (classification:
    # compressor.finetune.DEFAULT_LEARNING_RATE, 1e-2, as the old fixed 5e-4 did not recover a pruned
    # BN/depthwise network in 4 epochs; no labels: compressor.output_distill.DEFAULT_OUTPUT_LEARNING_RATE).
    learning_rate: float | None = Field(default=None, gt=0)

    @model_validator(mode="before")
    @classmethod
    def _search(cls, raw: Any) -> Any:
        return _searched(raw, "keep")


class MagnitudePruneStep(Base):
    """Unstructured magnitude pruning with a polynomial sparsity schedule: the gain is gzip size only.

    Kept in the default recipe: with the shared fine-tuning loop (BN statistics re-estimated, depthwise
    and tiny kernels left dense) mag75 recovered on a MobileNet-style model in 2 epochs (see
    compressor.finetune); it collapsed to chance before.
    """

    kind: Literal["magnitude_prune"]
    final_sparsity: float = Field(ge=0, lt=1)
    epochs: int = Field(default=2, ge=0)


class ClusterStep(Base):
    """Weight clustering (k-means per kernel): the gain is gzip size only."""

    kind: Literal["cluster"]
    clusters: int = Field(ge=2, le=256)
    epochs: int = Field(default=1, ge=0)


class DistillStep(Base):
    """Hinton distillation from the input model (the teacher).

    ``width``: a fresh student with the current model's architecture, layers × width. ``student``: a
    ``.keras`` file. Neither: the current model itself is the student (e.g. after ``prune``: the
    pruned model keeps its weights and is trained by distillation instead of plain fine-tuning).
    """

    kind: Literal["distill"]
    width: float | None = Field(default=None, gt=0, le=1)
    student: str | None = Field(default=None, min_length=1, description="path to a .keras student")
    temperature: float = Field(default=4.0, gt=0)
    alpha: float = Field(default=0.3, ge=0, le=1, description="weight of the hard CE term")
    epochs: int = Field(default=10, ge=1)
    search: bool = Field(
        default=False,
        description='width = "search": the narrowest width of compressor.budget.WIDTH_GRID within the budget',
    )

    @model_validator(mode="before")
    @classmethod
    def _search(cls, raw: Any) -> Any:
        return _searched(raw, "width")

    @model_validator(mode="after")
    def _one_student(self) -> Self:
        if self.width is not None and self.student is not None:
            raise ValueError("give width or student, not both")
        return self


def _searched(raw: Any, key: str) -> Any:
    """``key = "search"`` → ``search = true`` with a placeholder setting (1.0, never built: the pipeline
    builds each trial with a concrete setting)."""
    if isinstance(raw, dict) and raw.get(key) == "search":
        return {**raw, key: 1.0, "search": True}
    return raw


AnyStep = Annotated[
    QuantizeStep | PruneStep | MagnitudePruneStep | ClusterStep | DistillStep, Field(discriminator="kind")
]
STEP_TYPES: dict[str, type[Base]] = {
    "quantize": QuantizeStep,
    "prune": PruneStep,
    "magnitude_prune": MagnitudePruneStep,
    "cluster": ClusterStep,
    "distill": DistillStep,
}
# Kinds that leave every weight tensor at full size: the report says their gain is gzip size only.
UNSTRUCTURED_KINDS = ("magnitude_prune", "cluster")


class Recipe(Base):
    """One variant: ``id`` becomes the variant id and the file name."""

    id: Identifier
    description: str = ""
    steps: list[AnyStep] = Field(min_length=1)

    @model_validator(mode="after")
    def _quantize_last(self) -> Self:
        kinds = [s.kind for s in self.steps]
        if kinds.count("quantize") != 1 or kinds[-1] != "quantize":
            raise ValueError(f"the chain must end with exactly one quantize step; got {kinds}")
        return self

    @model_validator(mode="after")
    def _one_search(self) -> Self:
        if len(self.search_steps) > 1:
            raise ValueError("at most one step of a chain can be searched")
        return self

    @property
    def search_steps(self) -> list[int]:
        """Indices of the steps whose setting is searched (``keep``/``width = "search"``)."""
        return [i for i, s in enumerate(self.steps) if getattr(s, "search", False)]

    def with_setting(self, value: float) -> Recipe:
        """This chain with its searched step set to ``value`` (a trial), the id suffixed by it."""
        (index,) = self.search_steps
        step = self.steps[index]
        key = "keep" if step.kind == "prune" else "width"
        steps = list(self.steps)
        steps[index] = step.model_copy(update={key: value, "search": False})
        return self.model_copy(update={"id": f"{self.id}-{round(value * 1000):04d}", "steps": steps})

    @property
    def quantize(self) -> QuantizeStep:
        step = self.steps[-1]
        assert isinstance(step, QuantizeStep)
        return step

    @property
    def transforms(self) -> list[Any]:
        """The model-transform steps (everything before the quantize step)."""
        return list(self.steps[:-1])

    @property
    def quantization(self) -> str:
        return self.quantize.wire_quantization

    @property
    def techniques(self) -> list[str]:
        """Wire ``Variant.techniques``: the transform kinds plus ``quantize`` when it quantizes."""
        out: list[str] = list(dict.fromkeys(s.kind for s in self.transforms))
        if self.quantize.mode != "float32":
            out.append("quantize")
        return out


class RecipeFile(Base):
    """A whole recipe: the variants to build, the float32 baseline first."""

    name: str = Field(default="custom", min_length=1)
    description: str = ""
    baseline: Identifier = "float32"
    variants: list[Recipe] = Field(min_length=1)

    @model_validator(mode="after")
    def _consistent(self) -> Self:
        ids = [v.id for v in self.variants]
        dup = sorted({i for i in ids if ids.count(i) > 1})
        if dup:
            raise ValueError(f"variant ids must be unique; repeated: {', '.join(dup)}")
        if self.baseline not in ids:
            raise ValueError(f"baseline {self.baseline!r} is not one of the variants {ids}")
        base = self.variant(self.baseline)
        if base.transforms or base.quantize.mode != "float32":
            raise ValueError(f"baseline {self.baseline!r} must be a single quantize step with mode float32")
        return self

    def variant(self, variant_id: str) -> Recipe:
        for v in self.variants:
            if v.id == variant_id:
                return v
        raise KeyError(variant_id)

    def select(self, names: list[str] | None) -> list[Recipe]:
        """The variants named (default: all), the baseline always first; unknown names are an error."""
        known = [v.id for v in self.variants]
        wanted = known if names is None else list(dict.fromkeys(n.strip() for n in names if n.strip()))
        unknown = [n for n in wanted if n not in known]
        if unknown:
            hints = []
            for n in unknown:
                close = difflib.get_close_matches(n, known, n=1)
                hints.append(f"{n} (did you mean {close[0]!r}?)" if close else n)
            raise RecipeError(
                f"unknown variant(s) {', '.join(hints)} in recipe {self.name!r}; known: {', '.join(known)}"
            )
        rest = [n for n in wanted if n != self.baseline]
        return [self.variant(self.baseline)] + [self.variant(n) for n in rest]


# --------------------------------------------------------------------------------------------------------
# loading, with errors a person can act on


def builtin_path(name: str) -> Path:
    """Path of a built-in recipe (package data ``compressor/recipes/<name>.toml``)."""
    if name not in BUILTIN_RECIPES:
        raise RecipeError(f"no built-in recipe {name!r}; built-in: {', '.join(BUILTIN_RECIPES)}")
    return Path(str(resources.files("compressor") / "recipes" / f"{name}.toml"))


def load_recipe(spec: str | Path) -> RecipeFile:
    """A built-in recipe by name (``default``, ``demo``, ``tflite``) or a TOML file by path."""
    path = builtin_path(spec) if isinstance(spec, str) and spec in BUILTIN_RECIPES else Path(spec)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as err:
        raise RecipeError(f"cannot read recipe {str(path)!r}: {err.strerror or err}") from err
    return parse_recipe(text, source=str(path))


def parse_recipe(text: str, source: str = "<recipe>") -> RecipeFile:
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as err:
        raise RecipeError(f"{source} is not valid TOML: {err}") from err
    return validate_recipe(raw, source)


def validate_recipe(raw: dict[str, Any], source: str = "<recipe>") -> RecipeFile:
    try:
        return RecipeFile.model_validate(raw)
    except ValidationError as err:
        lines = [describe_error(e, raw) for e in err.errors()]
        raise RecipeError(f"{source} is invalid:\n" + "\n".join(lines)) from err


def describe_error(error: Any, raw: dict[str, Any]) -> str:
    """One line: readable key path, what is wrong, the value given, and a hint for typos."""
    loc, model, node = _walk(tuple(error["loc"]), raw)
    path = _path_text(loc, raw)
    kind = error["type"]
    if kind == "extra_forbidden":
        names = sorted(model.model_fields) if model is not None else []
        close = difflib.get_close_matches(str(loc[-1]), names, n=1)
        hint = f"; did you mean {close[0]!r}?" if close else f"; expected one of {', '.join(names)}"
        return f"  {path}: unknown key{hint}"
    if kind in ("union_tag_invalid", "union_tag_not_found"):
        given = node.get("kind") if isinstance(node, dict) else None
        close = difflib.get_close_matches(str(given), list(STEP_TYPES), n=1) if given else []
        hint = f"; did you mean {close[0]!r}?" if close else ""
        what = f"unknown step kind {given!r}" if given is not None else "a step needs a 'kind'"
        return f"  {path}.kind: {what}{hint}; expected one of {', '.join(STEP_TYPES)}"
    value = error.get("input")
    shown = "" if isinstance(value, dict | list) else f" (got {value!r})"
    msg = str(error["msg"]).removeprefix("Value error, ")
    return f"  {path}: {msg}{shown}"


def _walk(loc: tuple[Any, ...], raw: Any) -> tuple[tuple[Any, ...], type[BaseModel] | None, Any]:
    """Drop the discriminator segments pydantic inserts; return the clean path, the model class that
    owns its last key, and the raw node holding that key."""
    clean: list[Any] = []
    model: type[BaseModel] | None = RecipeFile
    node: Any = raw
    parent: Any = raw
    in_steps = False
    for part in loc:
        if in_steps and isinstance(node, dict) and part == node.get("kind") and part in STEP_TYPES:
            model = STEP_TYPES[part]
            in_steps = False
            continue
        clean.append(part)
        parent = node
        if isinstance(node, dict):
            node = node.get(part)
        elif isinstance(node, list) and isinstance(part, int) and 0 <= part < len(node):
            node = node[part]
            if clean[-2:-1] == ["variants"]:
                model = Recipe
            elif clean[-2:-1] == ["steps"]:
                in_steps = True
                kind = node.get("kind") if isinstance(node, dict) else None
                model = STEP_TYPES.get(str(kind)) if kind is not None else None
        else:
            node = None
    return tuple(clean), model, node if isinstance(node, dict) else parent


def _path_text(loc: tuple[Any, ...], raw: dict[str, Any]) -> str:
    out = ""
    node: Any = raw
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
            node = node[part] if isinstance(node, list) and 0 <= part < len(node) else None
            if isinstance(node, dict) and isinstance(node.get("id"), str) and "steps" in node:
                out += f" ({node['id']})"
        else:
            out += f".{part}" if out else str(part)
            node = node.get(part) if isinstance(node, dict) else None
    return out or "<top level>"
