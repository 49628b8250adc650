"""Pruning and distillation without labels: fine-tuning toward the float model's outputs
(compressor.output_distill), on real Keras dev models with several outputs, and through the pipeline."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")


@pytest.fixture(scope="module")
def detector() -> tuple[Any, Any]:
    """The dev detector (two outputs: boxes and scores, BN and depthwise blocks), without its labels."""
    from compressor.data import Dataset, Rows
    from compressor.devmodels import make, split_arrays

    model, data = make("detector", seed=0, epochs=3)

    def rows(split: str) -> Rows:
        return Rows(tuple(split_arrays(data, split, "x")))

    return model, Dataset("detector", rows("train"), rows("val"), rows("test"))


def test_normalised_error_and_scales() -> None:
    from compressor.errors import CompressorError
    from compressor.output_distill import normalised_error, output_scales

    t = [np.array([[0.0], [2.0]], dtype=np.float32), np.full((2, 3), 5.0, dtype=np.float32)]
    scales = output_scales(t)
    assert scales == [1.0, 1.0]  # variance 1; a constant output falls back to 1
    assert normalised_error(t, t, scales) == 0.0
    off = [t[0] + 1.0, t[1]]
    assert normalised_error(off, t, scales) == pytest.approx(0.5)  # (1 + 0) / 2 outputs
    with pytest.raises(CompressorError, match="does not match"):
        normalised_error([t[0][:, :0], t[1]], t, scales)
    with pytest.raises(CompressorError, match="1 outputs, the teacher 2"):
        normalised_error([t[0]], t, scales)


def test_best_keeper_restores_the_best_epoch() -> None:
    from compressor._tf import keras
    from compressor.finetune import BestKeeper

    k = keras()
    model = k.Sequential([k.Input((2,)), k.layers.Dense(1)])
    keeper = BestKeeper(model, min_epoch=1, patience=2)
    keeper.offer(0, (9.0,))  # before min_epoch: never kept
    model.set_weights([np.ones((2, 1)), np.ones(1)])
    keeper.offer(1, (1.0,))
    model.set_weights([np.zeros((2, 1)), np.zeros(1)])
    keeper.offer(2, (0.5,))
    assert not keeper.exhausted
    keeper.offer(3, (0.7,))
    assert keeper.exhausted
    assert keeper.restore() == 1
    assert np.all(model.get_weights()[0] == 1.0)
    assert BestKeeper(model, min_epoch=1, patience=None).restore() is None


def test_pruned_detector_recovers_toward_the_float_outputs(detector: tuple[Any, Any]) -> None:
    from compressor.output_distill import fit_to_teacher
    from compressor.prune import prune_structured

    model, data = detector
    before = [np.asarray(w) for w in model.get_weights()]
    pruned, report = prune_structured(model, 0.5)
    assert report.params_after < report.params_before * 0.5
    done = fit_to_teacher(pruned, model, data, 6, seed=0)
    losses = done.history["val_loss"]
    assert len(losses) == done.epochs_run + 1  # epoch 0: right after pruning
    assert losses[done.best_epoch] < 0.5 * losses[0], losses
    assert done.best_epoch >= 1 and done.distilled and "best val loss" in done.summary()
    # the teacher is untouched, and the student still has the teacher's two outputs
    assert all(np.array_equal(a, np.asarray(b)) for a, b in zip(before, model.get_weights(), strict=True))
    x = data.test.inputs[0][:4]
    outs, ref = pruned(x, training=False), model(x, training=False)
    assert [tuple(o.shape) for o in outs] == [tuple(r.shape) for r in ref]


def test_generic_recipe_prunes_without_labels_within_a_cosine_budget(
    detector: tuple[Any, Any], tmp_path: Path
) -> None:
    """Through the pipeline: a detector with no labels gets a pruned, int8 variant evaluated as a .tflite
    file; a searched keep ratio ships only when its held-out cosine meets the budget."""
    from compressor.graph import graph_stats
    from compressor.pipeline import build_bundle

    model, data = detector
    lines: list[str] = []
    result = build_bundle(
        model,
        data,
        tmp_path / "b",
        model_id="det",
        recipe="generic",
        variants=["float32", "prune50-int8", "prune-search-int8"],
        min_metric="cosine=0.98",
        keep_all=True,
        latency_budget_s=0.05,
        progress=lines.append,
    )
    m = {v.id: v for v in result.manifest.variants}
    assert "prune50-int8" in m, result.failures
    base = graph_stats((tmp_path / "b" / m["float32"].file).read_bytes())
    pruned = graph_stats((tmp_path / "b" / m["prune50-int8"].file).read_bytes())
    assert pruned.params < 0.5 * base.params and pruned.int8_weights
    assert m["prune50-int8"].metrics.named["cosine"] > 0.9
    assert any("toward the float model's outputs (no labels)" in n for n in m["prune50-int8"].notes)
    assert any("val_loss" in line for line in lines)  # the epoch lines name the loss they track
    if "prune-search-int8" in m:
        assert m["prune-search-int8"].metrics.named["cosine"] >= 0.98


def _recipe(tmp_path: Path, variant: str, steps: str) -> str:
    """A recipe file: the float32 baseline and one variant with ``steps`` (TOML), float32 after them."""
    path = tmp_path / "r.toml"
    path.write_text(
        'name = "r"\nbaseline = "float32"\n'
        '[[variants]]\nid = "float32"\nsteps = [{ kind = "quantize", mode = "float32" }]\n'
        f'[[variants]]\nid = "{variant}"\nsteps = [{steps}, {{ kind = "quantize", mode = "float32" }}]\n',
        encoding="utf-8",
    )
    return str(path)


def test_labelled_only_transforms_still_refused_without_labels(
    detector: tuple[Any, Any], tmp_path: Path
) -> None:
    from compressor.pipeline import build_bundle

    model, data = detector
    recipe = _recipe(tmp_path, "mag", '{ kind = "magnitude_prune", final_sparsity = 0.5, epochs = 1 }')
    result = build_bundle(model, data, tmp_path / "b", recipe=recipe, latency_budget_s=0.05)
    (failure,) = result.failures
    assert "magnitude_prune fine-tunes on class labels" in str(failure)
    assert "distill and prune fine-tune toward the float model's outputs" in str(failure)


def test_generic_distillation_trains_a_narrower_student(detector: tuple[Any, Any], tmp_path: Path) -> None:
    """A distill step without labels: a half-width student trained toward the teacher's outputs."""
    from compressor.graph import graph_stats
    from compressor.pipeline import build_bundle

    model, data = detector
    recipe = _recipe(tmp_path, "student", '{ kind = "distill", width = 0.5, epochs = 4 }')
    result = build_bundle(model, data, tmp_path / "b", recipe=recipe, latency_budget_s=0.05)
    m = {v.id: v for v in result.manifest.variants}
    assert "student" in m, result.failures
    sizes = {vid: graph_stats((tmp_path / "b" / v.file).read_bytes()).params for vid, v in m.items()}
    assert sizes["student"] < 0.5 * sizes["float32"]
    assert (
        m["student"].metrics.named["cosine"] > 0.5
    )  # trained from scratch for 4 epochs: learning, not a copy
    assert any("toward the float model's outputs (no labels)" in n for n in m["student"].notes)


def test_teacher_outputs_are_capped_in_memory(monkeypatch: pytest.MonkeyPatch) -> None:
    """A wide output on many rows: the training rows are a seeded subset whose teacher outputs fit the
    cap (a segmenter's masks on every row could outgrow the host)."""
    from compressor import output_distill
    from compressor._tf import keras
    from compressor.data import Dataset, Rows

    k = keras()
    inp = k.Input((4,))
    teacher = k.Model(inp, k.layers.Dense(1000)(inp))
    student = k.Model(inp, k.layers.Dense(1000)(inp))
    rng = np.random.default_rng(0)
    rows = [Rows((rng.random((n, 4), dtype=np.float32),)) for n in (300, 20, 20)]
    monkeypatch.setattr(output_distill, "MAX_TARGET_BYTES", 4000 * 100)
    done = output_distill.fit_to_teacher(student, teacher, Dataset("wide", *rows), 1)
    assert done.history["rows"] == [100.0]
    monkeypatch.setattr(output_distill, "MAX_TARGET_BYTES", 4000 * 10)
    done = output_distill.fit_to_teacher(student, teacher, Dataset("wide", *rows), 1)
    assert done.history["rows"] == [float(output_distill.MIN_ROWS)]
