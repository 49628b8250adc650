"""Recipes (compressor.recipe): TOML validation with errors that name the key path, the built-in recipes,
and the .tflite graph reader on bad input. No TensorFlow."""

from __future__ import annotations

from pathlib import Path

import pytest

from compressor.errors import EvaluationError
from compressor.graph import graph_stats
from compressor.recipe import (
    BUILTIN_RECIPES,
    DistillStep,
    QuantizeStep,
    RecipeError,
    builtin_path,
    load_recipe,
    parse_recipe,
)

Q32 = '{ kind = "quantize", mode = "float32" }'
BASE = '[[variants]]\nid = "float32"\nsteps = [{ kind = "quantize", mode = "float32" }]\n'


def _variant(vid: str, steps: str) -> str:
    return f'\n[[variants]]\nid = "{vid}"\nsteps = [{steps}]\n'


def _error(text: str) -> str:
    with pytest.raises(RecipeError) as info:
        parse_recipe(text, source="r.toml")
    return str(info.value)


def test_builtin_recipes_parse_and_default_has_every_technique() -> None:
    for name in BUILTIN_RECIPES:
        assert builtin_path(name).is_file()
        # the recipe for an existing .tflite calls its reference what it is: the original file
        assert load_recipe(name).variants[0].id == ("original" if name == "tflite" else "float32")
    default = load_recipe("default")
    ids = [v.id for v in default.variants]
    for vid in (
        "float32",
        "float16",
        "dynint8",
        "int8",
        "prune50-int8",
        "prune25-int8",
        "distill50-int8",
        "prune50-distill-int8",
        "mag75-int8",
        "cluster16-int8",
    ):
        assert vid in ids
    kinds = {s.kind for v in default.variants for s in v.steps}
    assert kinds == {"quantize", "prune", "magnitude_prune", "cluster", "distill"}
    int8 = default.variant("int8").quantize
    assert int8.mode == "int8" and int8.representative_samples == 300
    # prune50 variants share their first step exactly, so the pipeline builds it once
    first = {default.variant(v).steps[0] for v in ("prune50-int8", "prune50-dynint8", "prune50-distill-int8")}
    assert len(first) == 1
    assert [v.id for v in load_recipe("tflite").variants] == [
        "original",
        "woint8",
        "dynint8",
        "int8",
        "mixed4",
    ]


def test_unknown_key_is_named_with_path_and_suggestion() -> None:
    msg = _error(BASE + _variant("p", '{ kind = "prune", kep = 0.5 }, ' + Q32))
    assert "variants[1] (p).steps[0].kep: unknown key; did you mean 'keep'?" in msg
    msg = _error(BASE + _variant("q", '{ kind = "quantize", mode = "float32" }') + "colour = 1\n")
    assert "variants[1] (q).colour: unknown key" in msg
    assert "r.toml is invalid" in _error("nmae = 'x'\n" + BASE)
    assert "did you mean 'name'" in _error("nmae = 'x'\n" + BASE)


def test_bad_kind_bad_value_and_int8_without_samples() -> None:
    msg = _error(BASE + _variant("x", '{ kind = "quantise", mode = "int8" }'))
    assert "variants[1] (x).steps[0].kind: unknown step kind 'quantise'; did you mean 'quantize'?" in msg
    msg = _error(BASE + _variant("x", '{ kind = "quantize", mode = "int8" }'))
    assert "variants[1] (x).steps[0]: mode 'int8' needs representative_samples" in msg
    msg = _error(BASE + _variant("x", '{ kind = "prune", keep = 1.5 }, ' + Q32))
    assert "steps[0].keep: Input should be less than or equal to 1 (got 1.5)" in msg
    msg = _error(BASE + _variant("x", '{ kind = "quantize", mode = "int4" }'))
    assert "steps[0].mode" in msg and "'int4'" in msg


def test_chain_rules() -> None:
    msg = _error(BASE + _variant("x", '{ kind = "prune", keep = 0.5 }'))
    assert "exactly one quantize step" in msg
    msg = _error(BASE + _variant("x", Q32 + ', { kind = "prune", keep = 0.5 }'))
    assert "exactly one quantize step" in msg
    assert "must be a single quantize step with mode float32" in _error(
        '[[variants]]\nid = "float32"\nsteps = [{ kind = "quantize", mode = "float16" }]\n'
    )
    assert "unique" in _error(BASE + BASE)
    assert "baseline 'f32'" in _error('baseline = "f32"\n' + BASE)
    with pytest.raises(ValueError, match="width or student"):
        DistillStep(kind="distill", width=0.5, student="s.keras")
    with pytest.raises(ValueError, match="only applies"):
        QuantizeStep(mode="float16", representative_samples=10)
    assert "not valid TOML" in _error("variants = [")


def test_select_variants_and_load_errors(tmp_path: Path) -> None:
    rf = load_recipe("default")
    assert [r.id for r in rf.select(["int8", "float32"])] == ["float32", "int8"]
    with pytest.raises(RecipeError, match=r"prune5-int8 \(did you mean 'prune50-int8'\?\)"):
        rf.select(["prune5-int8"])
    with pytest.raises(RecipeError, match="cannot read recipe"):
        load_recipe(tmp_path / "missing.toml")
    (tmp_path / "r.toml").write_text(BASE)
    assert load_recipe(tmp_path / "r.toml").name == "custom"


def test_graph_stats_refuses_garbage() -> None:
    with pytest.raises(EvaluationError, match="not a readable"):
        graph_stats(b"definitely not a flatbuffer")
