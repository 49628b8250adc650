"""A recipe with prune and distill variants built end to end on digits at reduced size; the .tflite input
path (ai-edge-quantizer); determinism; sample consistency; plots. Kept to tiny epochs for 2 cores."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from agent.wire import Manifest
from compressor.data import Dataset, load_digits
from compressor.recipe import RecipeFile, parse_recipe

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
pytestmark = pytest.mark.slow

SMALL = """
name = "small"
[[variants]]
id = "float32"
steps = [{ kind = "quantize", mode = "float32" }]
[[variants]]
id = "int8"
steps = [{ kind = "quantize", mode = "int8", representative_samples = 100 },
]
[[variants]]
id = "prune50-int8"
steps = [
  { kind = "prune", keep = 0.5, fine_tune_epochs = 1 },
  { kind = "quantize", mode = "int8", representative_samples = 100 },
]
[[variants]]
id = "prune50-float32"
steps = [
  { kind = "prune", keep = 0.5, fine_tune_epochs = 1 },
  { kind = "quantize", mode = "float32" }]
[[variants]]
id = "distill50-int8"
steps = [
  { kind = "distill", width = 0.5, epochs = 1 },
  { kind = "quantize", mode = "int8", representative_samples = 100 },
]
[[variants]]
id = "prune50-distill-int8"
steps = [
  { kind = "prune", keep = 0.5, fine_tune_epochs = 1 },
  { kind = "distill", epochs = 1 },
  { kind = "quantize", mode = "int8", representative_samples = 100 },
]
[[variants]]
id = "cluster8-int8"
steps = [
  { kind = "cluster", clusters = 8, epochs = 0 },
  { kind = "quantize", mode = "int8", representative_samples = 100 },
]
"""


def _small_digits() -> Dataset:
    d = load_digits()
    return Dataset.from_arrays(
        name="digits-small",
        x_train=d.x_train[:600],
        y_train=d.y_train[:600],
        x_val=d.x_val[:100],
        y_val=d.y_val[:100],
        x_test=d.x_test[:200],
        y_test=d.y_test[:200],
        labels=d.labels,
    )


def _trained(data: Dataset) -> Any:
    from compressor.models import build_seed_cnn, train

    model = build_seed_cnn(data.input_shape, data.num_classes, seed=0)
    train(model, data, epochs=3, seed=0, deterministic=True)
    return model


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    import compressor.convert as convert
    from compressor.pipeline import build_bundle
    from compressor.prune import UnsupportedLayerError

    data = _small_digits()
    model = _trained(data)
    recipe = parse_recipe(SMALL)
    lines: list[str] = []
    real_cluster = convert.MODEL_TRANSFORMS["cluster"]

    def unsupported(step: Any, m: Any, ctx: Any) -> Any:
        raise UnsupportedLayerError("odd", "OddLayer", "simulated")

    convert.MODEL_TRANSFORMS["cluster"] = unsupported
    try:
        out = tmp_path_factory.mktemp("b") / "small"
        result = build_bundle(
            model, data, out, recipe=recipe, progress=lines.append, latency_budget_s=0.05, created_at=1.0
        )
    finally:
        convert.MODEL_TRANSFORMS["cluster"] = real_cluster
    return {"data": data, "model": model, "recipe": recipe, "result": result, "lines": lines, "out": out}


def test_small_recipe_builds_smaller_plausible_variants(built: dict[str, Any]) -> None:
    result, out = built["result"], built["out"]
    manifest = Manifest.from_json((out / "manifest.json").read_bytes())
    assert manifest == result.manifest
    m = {v.id: v for v in manifest.variants}
    assert list(m) == [
        "float32",
        "int8",
        "prune50-int8",
        "prune50-float32",
        "distill50-int8",
        "prune50-distill-int8",
    ]
    base = m["float32"].metrics
    assert base.accuracy is not None and base.accuracy > 0.8
    for vid in ("prune50-int8", "distill50-int8", "prune50-distill-int8"):
        v = m[vid]
        assert v.metrics.size_bytes < 0.4 * m["int8"].metrics.size_bytes, vid
        assert v.metrics.accuracy is not None and v.metrics.accuracy > 0.6, vid
        assert v.quantization == "int8" and v.inputs[0].dtype == "int8"
        assert v.metrics.params is not None and v.metrics.params < base.params  # type: ignore[operator]
        assert v.metrics.macs is not None and v.metrics.macs < base.macs  # type: ignore[operator]
    assert m["prune50-distill-int8"].techniques == ["prune", "distill", "quantize"]
    assert m["prune50-float32"].quantization == "none" and m["prune50-float32"].techniques == ["prune"]
    # params from the .tflite match Keras' count of the same pruned model
    assert m["prune50-float32"].metrics.params == m["prune50-int8"].metrics.params


def test_prune_prefix_is_built_once_and_reused(built: dict[str, Any]) -> None:
    lines = built["lines"]
    assert sum(1 for line in lines if line.startswith("transform prune: keep=0.5")) == 1
    assert sum(1 for line in lines if line.startswith("transform prune: reusing")) == 2
    assert any(line.startswith("prune keep 0.5 fine-tune: epoch 1/1") for line in lines)
    assert any(line.startswith("distill: epoch 1/1") for line in lines)


def test_unsupported_layer_in_one_variant_is_recorded(built: dict[str, Any]) -> None:
    result, out = built["result"], built["out"]
    assert [(f.variant, f.stage) for f in result.failures] == [("cluster8-int8", "transform")]
    assert "OddLayer" in result.failures[0].message
    report = (out / "report.md").read_text()
    assert "## Variants not shipped" in report and "cluster8-int8" in report and "OddLayer" in report


def test_samples_are_the_same_inputs_in_the_same_order(built: dict[str, Any]) -> None:
    out, manifest = built["out"], built["result"].manifest
    with np.load(out / "float32.sample.npz", allow_pickle=False) as npz:
        ref_x, ref_y = npz["x"], npz["y"]
    assert ref_x.dtype == np.float32 and 64 <= len(ref_x) <= 256
    assert np.array_equal(ref_y, built["data"].y_test[: len(ref_y)])
    for v in manifest.variants:
        with np.load(out / f"{v.id}.sample.npz", allow_pickle=False) as npz:
            x, y = npz["x"], npz["y"]
        assert np.array_equal(y, ref_y), v.id
        assert x.dtype == np.dtype(v.inputs[0].dtype), v.id
        q = v.inputs[0].quantization
        if q is not None and q.scale:  # int8 inputs: dequantized, they are the float32 inputs
            back = (x.astype(np.float32) - q.zero_point[0]) * q.scale[0]
            assert np.abs(back - ref_x).max() <= q.scale[0] / 2 + 1e-6, v.id
        else:
            assert np.array_equal(x, ref_x), v.id


def test_report_and_both_plots(built: dict[str, Any]) -> None:
    out = built["out"]
    for png in ("accuracy_vs_size.png", "accuracy_vs_latency.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    report = (out / "report.md").read_text()
    assert "| `prune50-distill-int8` |" in report and "agreement" in report


def test_same_seed_same_figures_and_same_files(built: dict[str, Any], tmp_path: Path) -> None:
    from compressor.pipeline import build_bundle

    recipe: RecipeFile = built["recipe"]
    again = build_bundle(
        built["model"],
        built["data"],
        tmp_path / "again",
        recipe=recipe,
        variants=["prune50-int8", "distill50-int8"],
        latency_budget_s=0.05,
    )
    first = {v.id: v for v in built["result"].manifest.variants}
    for v in again.manifest.variants:
        ref = first[v.id]
        assert v.metrics.accuracy == ref.metrics.accuracy, v.id
        assert v.metrics.agreement == ref.metrics.agreement, v.id
        assert v.sha256 == ref.sha256, v.id  # conversion of the same weights is byte-deterministic


def test_int4_target_follows_the_users_cosine_budget() -> None:
    from types import SimpleNamespace

    from compressor.builders import DEFAULT_MIN_COSINE, int4_target

    step = SimpleNamespace(min_cosine=0.995)
    assert int4_target(step, None) == (0.995, "the recipe's min_cosine")
    assert int4_target(SimpleNamespace(min_cosine=None), None)[0] == DEFAULT_MIN_COSINE
    target, why = int4_target(step, 0.99)  # the budget wins, a fifth of its allowed error kept as headroom
    assert target == pytest.approx(0.992) and "budget cosine >= 0.99" in why
    assert int4_target(step, 0.999)[0] == pytest.approx(0.9992)  # stricter than the recipe: stricter search
    assert int4_target(step, 1.0)[0] == 1.0


def test_mixed4_searches_against_the_users_cosine_budget(built: dict[str, Any], tmp_path: Path) -> None:
    """``--min-metric cosine=X`` steers the int4 search: a loose budget never gives a larger file than a
    strict one, the notes say which target was searched, and the shipped variant meets the budget."""
    pytest.importorskip("ai_edge_quantizer")
    from compressor.pipeline import build_bundle

    src = tmp_path / "m.tflite"
    src.write_bytes((built["out"] / "float32.tflite").read_bytes())
    sizes = {}
    for budget in (0.9, 0.9999):
        result = build_bundle(
            src,
            built["data"],
            tmp_path / f"b{budget}",
            variants=["original", "mixed4"],
            min_metric=f"cosine={budget}",
            keep_all=True,
            latency_budget_s=0.05,
        )
        m = {v.id: v for v in result.manifest.variants}
        if "mixed4" not in m:  # the strict budget may leave no layer int4: then it is refused, not shipped
            assert budget > 0.99 and [f.variant for f in result.failures] == ["mixed4"]
            continue
        notes = " ".join(m["mixed4"].notes)
        assert f"the budget cosine >= {budget:g} less 20% headroom" in notes, notes
        sizes[budget] = m["mixed4"].metrics.size_bytes
        if budget < 0.99:
            assert m["mixed4"].metrics.named["cosine"] >= budget
    assert 0.9 in sizes and sizes[0.9] <= sizes.get(0.9999, sizes[0.9])


def test_tflite_input_really_quantized(built: dict[str, Any], tmp_path: Path) -> None:
    pytest.importorskip("ai_edge_quantizer")
    from compressor.graph import graph_stats
    from compressor.pipeline import build_bundle

    src = tmp_path / "m.tflite"
    src.write_bytes((built["out"] / "float32.tflite").read_bytes())
    result = build_bundle(src, built["data"], tmp_path / "b", latency_budget_s=0.05)
    m = {v.id: v for v in result.manifest.variants}
    assert list(m) == ["original", "woint8", "dynint8", "int8", "mixed4"] and result.failures == ()
    # int4 weights where the outputs tolerate them: smaller than int8, and kept off tflite-runtime 2.14
    assert m["mixed4"].quantization == "weight_only_int4"
    assert m["mixed4"].metrics.size_bytes < m["woint8"].metrics.size_bytes
    assert m["mixed4"].min_runtime is not None and m["mixed4"].min_runtime > "2.14.0"
    assert m["mixed4"].metrics.named["cosine"] > 0.99
    assert m["original"].sha256 == hashlib.sha256(src.read_bytes()).hexdigest()
    for vid in ("woint8", "dynint8", "int8"):
        data = (tmp_path / "b" / f"{vid}.tflite").read_bytes()
        assert graph_stats(data).int8_weights, vid
        assert m[vid].metrics.size_bytes < 0.4 * m["original"].metrics.size_bytes
        assert m[vid].metrics.agreement is not None and m[vid].metrics.agreement > 0.95
        assert m[vid].metrics.named["cosine"] > 0.99, vid
        assert m[vid].metrics.params == m["original"].metrics.params
    assert m["woint8"].quantization == "weight_only_int8"
    # a Keras-only recipe on a .tflite: the transforms are skipped and said so, the rest is built
    res2 = build_bundle(
        src, built["data"], tmp_path / "c", recipe="default", variants=["prune50-int8"], latency_budget_s=0.05
    )
    assert [(f.variant, f.stage) for f in res2.failures] == [("prune50-int8", "skipped")]


def test_quantization_that_changes_nothing_is_not_shipped(tmp_path: Path) -> None:
    pytest.importorskip("ai_edge_quantizer")
    from compressor._tf import keras
    from compressor.convert import to_tflite
    from compressor.pipeline import build_bundle
    from compressor.recipe import QuantizeStep

    k = keras()
    weightless = k.Sequential([k.Input((28, 28, 1)), k.layers.Flatten(), k.layers.Softmax()])
    src = tmp_path / "w.tflite"
    src.write_bytes(to_tflite(weightless, QuantizeStep(mode="float32")))
    d = _small_digits()
    result = build_bundle(src, d, tmp_path / "b", latency_budget_s=0.05)
    assert [v.id for v in result.manifest.variants] == ["original"]
    assert {f.variant for f in result.failures} == {"woint8", "dynint8", "int8", "mixed4"}
    assert all("changed nothing" in f.message for f in result.failures), result.failures
    report = (tmp_path / "b" / "report.md").read_text()
    assert "changed nothing" in report
