"""Recipe variant → .tflite bytes: the Keras builder (transforms cached by step prefix, TensorFlow
conversion) and the .tflite builder (an existing file: the compatibility gate, then
:mod:`compressor.tflite_quant` and the mixed int4 search of :mod:`compressor.mixed`).

Both return the file and notes; the pipeline (:mod:`compressor.pipeline`) measures and checks it.
"""

from __future__ import annotations

import warnings
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from compressor.compat import CompatReport, custom_ops, inspect_tflite
from compressor.data import Dataset, Rows
from compressor.errors import CustomOpsError, DataError, EvaluationError
from compressor.evaluate import evaluate_tflite
from compressor.graph import graph_stats
from compressor.metrics import fidelity_metrics
from compressor.recipe import REPRESENTATIVE_SAMPLES, Recipe

GPTQ_ROWS = 64  # calibration rows whose layer inputs GPTQ rounds int4 weights against
# With a user cosine budget, the int4 search aims this share of the allowed error (1 - budget) inside it:
# it judges on the validation rows, and the variant ships only if the test rows pass the budget too.
SEARCH_HEADROOM = 0.2
DEFAULT_MIN_COSINE = 0.995  # the int4 search's target when neither the recipe nor a budget sets one

Progress = Callable[[str], None]


class Builder:
    notes: list[str]
    # The user's budget as a minimum output cosine (``--min-metric cosine=X``), set by the pipeline once
    # the baseline is measured: the int4 search then aims at it (:func:`int4_target`), not the recipe's.
    cosine_budget: float | None = None

    def build(self, recipe: Recipe, stage: Callable[[str], None]) -> tuple[bytes, list[str]]:
        raise NotImplementedError


class KerasBuilder(Builder):
    """Runs the transforms (cached by step prefix) and converts with TensorFlow."""

    def __init__(self, model: Any, data: Dataset, seed: int, report: Progress, deterministic: bool) -> None:
        from compressor.convert import TransformContext

        self.ctx = TransformContext(data=data, seed=seed, teacher=model, progress=report)
        self.report = report
        self.cache: dict[tuple[str, ...], tuple[Any, list[str]] | BaseException] = {(): (model, [])}
        self.notes = []
        self.deterministic = deterministic

    def transformed(self, steps: list[Any]) -> tuple[Any, list[str]]:
        from compressor.convert import LABEL_FREE_TRANSFORMS, MODEL_TRANSFORMS, NeedsLabelsError

        labelled_only = [s.kind for s in steps if s.kind not in LABEL_FREE_TRANSFORMS]
        if labelled_only and self.ctx.data.task != "classification":
            raise NeedsLabelsError(
                f"{', '.join(labelled_only)} fine-tunes on class labels; this model has none (generic task): "
                f"{' and '.join(sorted(LABEL_FREE_TRANSFORMS))} fine-tune toward the float model's outputs"
            )
        keys = tuple(s.model_dump_json() for s in steps)
        for i in range(1, len(keys) + 1):
            key = keys[:i]
            entry = self.cache.get(key)
            if isinstance(entry, BaseException):
                raise entry
            if entry is not None:
                self.report(f"transform {steps[i - 1].kind}: reusing the model already built for this prefix")
                continue
            parent = self.cache[key[:-1]]
            assert not isinstance(parent, BaseException)
            step = steps[i - 1]
            self.report(f"transform {step.kind}: {step_text(step)}")
            if self.deterministic:
                from compressor._tf import tf

                tf().config.experimental.enable_op_determinism()
            try:
                new_model, notes = MODEL_TRANSFORMS[step.kind](step, parent[0], self.ctx)
            except Exception as err:
                self.cache[key] = err  # the variants sharing this prefix fail the same way, without retrying
                raise
            self.cache[key] = (new_model, [*parent[1], *notes])
        entry = self.cache[keys]
        assert not isinstance(entry, BaseException)
        return entry

    def build(self, recipe: Recipe, stage: Callable[[str], None]) -> tuple[bytes, list[str]]:
        from compressor.convert import quantize_keras

        stage("transform")
        model, notes = self.transformed(recipe.transforms)
        stage("convert")
        self.report(f"convert {recipe.id}")
        if recipe.quantize.mode == "weight_only_int4":
            from compressor.convert import to_tflite
            from compressor.recipe import QuantizeStep

            float_file = to_tflite(model, QuantizeStep(mode="float32"))
            tflite, search_notes = mixed_int4(
                float_file, int4_target(recipe.quantize, self.cosine_budget), self.ctx.data, self.report
            )
            return tflite, [*notes, *search_notes]
        with warnings.catch_warnings():
            # The int8 converter warns that it has no input statistics; it takes them from the
            # representative set.
            warnings.filterwarnings("ignore", message="Statistics for quantized inputs were expected")
            tflite = quantize_keras(model, recipe.quantize, self.ctx.data, seed=self.ctx.seed)
        if recipe.quantize.mode == "weight_only_int8":
            notes = [*notes, "weight-only int8 rewritten from the float32 .tflite"]
        return tflite, list(notes)


class TfliteBuilder(Builder):
    """An existing float .tflite: the file is the reference; compressor.tflite_quant makes the rest."""

    def __init__(self, path: Path, report: Progress) -> None:
        if not path.is_file():
            raise DataError(f"model file {str(path)!r} does not exist")
        self.path = path
        self.data = path.read_bytes()
        self.report = report
        self.data_rows: Dataset | None = None
        report(f"load: {path} ({len(self.data)} B, no Keras source)")
        try:
            self.stats = graph_stats(self.data)
            self.compat = inspect_tflite(self.data)
        except EvaluationError as err:
            raise DataError(
                f"{str(path)!r} is not a TFLite flatbuffer ({err}); give a .tflite file written by a "
                "TFLite converter"
            ) from err
        self.notes = [f"input: an existing .tflite ({path.name}, {len(self.data)} B) without a Keras source"]
        if self.stats.weight_types and set(self.stats.weight_types) != {"FLOAT32"}:
            self.notes.append(f"the input .tflite stores its weights as {', '.join(self.stats.weight_types)}")

    def gate(self, allow_custom_ops: bool) -> CompatReport | None:
        """The compatibility verdict, printed first. Custom ops: a CompressorError unless allowed, and
        then the report (the pipeline bundles the original as is)."""
        c = self.compat
        ops = Counter(op.custom_code or op.name for op in c.ops)
        needs = custom_ops(c)
        self.report(
            f"compat: {len(c.ops)} op kinds ({', '.join(sorted(ops))}); oldest safe runtime "
            f"{c.min_runtime}; custom ops: {', '.join(needs) or 'none'}"
        )
        for finding in c.findings:
            self.report(f"compat: {finding}")
        if not needs:
            return None
        if not allow_custom_ops:
            raise CustomOpsError(
                f"{self.path.name} needs a runtime built with custom op(s) {', '.join(needs)}; stock "
                "ai-edge-litert and tflite-runtime cannot load it, so it cannot be evaluated or quantized "
                "here. Pass --allow-custom-ops to bundle the float original as is (devices without the op "
                "report UNSUPPORTED_OP)"
            )
        return c

    def build(self, recipe: Recipe, stage: Callable[[str], None]) -> tuple[bytes, list[str]]:
        from compressor.convert import NeedsCalibrationError, NeedsKerasError
        from compressor.tflite_quant import quantize_tflite

        if recipe.transforms:
            kinds = ", ".join(s.kind for s in recipe.transforms)
            raise NeedsKerasError(f"{kinds} needs the Keras model (a .tflite input has no Keras source)")
        step = recipe.quantize
        if step.mode == "float32":
            return self.data, ["the input file, unchanged"]
        if step.mode == "float16":
            raise NeedsKerasError(
                "float16 of an existing .tflite is not built (the Keras converter makes it)"
            )
        stage("convert")
        self.report(f"convert {recipe.id}")
        if step.mode == "weight_only_int4":
            assert self.data_rows is not None
            return mixed_int4(self.data, int4_target(step, self.cosine_budget), self.data_rows, self.report)
        calibration = None
        if step.mode == "int8":
            assert self.data_rows is not None
            if self.data_rows.synthetic:
                raise NeedsCalibrationError(
                    "full-integer int8 needs calibration data: pass --calibration DIR|FILE.npz (or --data)"
                )
            calibration = _signature_rows(
                self.data, self.data_rows.calibration_rows, step.representative_samples
            )
        int8_io = step.mode == "int8" and step.int8_io
        return quantize_tflite(self.data, step.mode, calibration, int8_io=int8_io)


def _file_order_rows(tflite: bytes, rows: Rows, count: int | None) -> list[list[np.ndarray]]:
    """``count`` rows (a fixed-seed subset) as the file takes them: per row one batch-1 array per input of
    the FILE, in its input order and dtype (the converter may not keep the data's input order)."""
    from compressor.convert import representative_subset
    from compressor.evaluate import io_order, load_interpreter

    interpreter = load_interpreter(tflite)
    details = interpreter.get_input_details()
    in_order, _ = io_order(interpreter)
    logical = representative_subset(rows.inputs, count or REPRESENTATIVE_SAMPLES, 0)
    arrays = [logical[in_order[k]] for k in range(len(details))]
    return [
        [
            np.ascontiguousarray(a[i : i + 1], dtype=np.dtype(d["dtype"]))
            for a, d in zip(arrays, details, strict=True)
        ]
        for i in range(len(arrays[0]))
    ]


def _signature_rows(tflite: bytes, rows: Rows, count: int | None) -> list[dict[str, np.ndarray]]:
    """Calibration rows as the quantizer takes them: one dict per row, signature input name → batch-1
    array, in the file's own input order (:func:`_file_order_rows`)."""
    from compressor.evaluate import load_interpreter, signature_map

    interpreter = load_interpreter(tflite)
    details = interpreter.get_input_details()
    sig: dict[str, Any] = next(iter(signature_map(interpreter).values()), {})
    by_tensor = {int(t): name for name, t in sig.get("inputs", {}).items()}
    names = [by_tensor.get(int(d["index"]), str(d["name"])) for d in details]
    return [dict(zip(names, row, strict=True)) for row in _file_order_rows(tflite, rows, count)]


def int4_target(step: Any, cosine_budget: float | None) -> tuple[float, str]:
    """(cosine the int4 search must keep on the validation rows, where that figure comes from).

    A user budget on cosine wins over the recipe's ``min_cosine``, which is the default for a user who
    set none: the budget is the user's own statement of the fidelity they accept (looser: smaller
    files; stricter: fewer int4 layers), less :data:`SEARCH_HEADROOM` of the error it allows, since
    the test rows must pass it too."""
    if cosine_budget is not None:
        target = min(1.0, 1.0 - (1.0 - cosine_budget) * (1.0 - SEARCH_HEADROOM))
        return target, f"the budget cosine >= {cosine_budget:g} less {SEARCH_HEADROOM:.0%} headroom"
    if step.min_cosine is not None:
        return float(step.min_cosine), "the recipe's min_cosine"
    return DEFAULT_MIN_COSINE, "the default"


def mixed_int4(
    float_file: bytes, aim: tuple[float, str], data: Dataset, report: Progress
) -> tuple[bytes, list[str]]:
    """int4 weights on the least sensitive layers of ``float_file`` while the worst output's cosine
    against the float file's outputs on the validation rows stays at ``aim`` (:func:`int4_target`);
    the test rows confirm later."""
    from compressor.mixed import search_mixed_int4

    reference = evaluate_tflite(
        float_file, data.val, classification=False, latency_budget_s=0.0, min_runs=1, warmup_runs=0
    )
    target, why = aim

    def cosine(candidate: bytes) -> float:
        ev = evaluate_tflite(
            candidate, data.val, classification=False, latency_budget_s=0.0, min_runs=1, warmup_runs=0
        )
        return fidelity_metrics(reference.output_values, ev.output_values)["cosine"]

    gptq_notes: list[str] = []
    int4_weights: dict[str, np.ndarray] = {}
    if not data.synthetic:  # random rows say nothing about the inputs a layer really sees
        from compressor.gptq import gptq_int4_weights

        rows = _file_order_rows(float_file, data.calibration_rows, GPTQ_ROWS)
        int4_weights, gptq_notes = gptq_int4_weights(float_file, rows)
    tflite, notes = search_mixed_int4(
        float_file, cosine, min_cosine=target, progress=report, int4_weights=int4_weights
    )
    note = (
        f"int4 search judged on {len(data.val)} validation rows (cosine >= {target:.4g} against float: {why})"
    )
    return tflite, [*gptq_notes, *notes, note]


def strip_names(tflite: bytes, notes: list[str]) -> bytes:
    from compressor.tflite_quant import strip_tensor_names

    out = strip_tensor_names(tflite)
    if len(out) < len(tflite):
        notes.append(f"intermediate tensor names stripped: {len(tflite)} → {len(out)} B")
        return out
    return tflite


def step_text(step: Any) -> str:
    return ", ".join(f"{k}={v}" for k, v in step.model_dump(exclude={"kind"}).items() if v is not None)
