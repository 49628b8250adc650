"""The policy on named metrics (manifest schema 2): limits and ranking on cosine, sqnr_db, max_abs or a
user evaluator's metric, the generic task's fall-back to the primary metric, refusals, and schema 1 as
before. Pure logic: hand-made manifests and reports, no broker."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from test_deploy import make_manifest, make_report, make_status, make_variant, ok_result, raw_state

from agent import wire
from deploy.control.assign import plan
from deploy.control.select import (
    Decision,
    Policy,
    Rule,
    load_policy,
    metric_directions,
    select,
    unreachable_rules,
)
from deploy.errors import PolicyError
from deploy.observe.fleet import decisions_table
from deploy.observe.state import parse_state

# --------------------------------------------------------------------------------------------------------
# Builders

GENERIC_METRICS = {
    "cosine": wire.MetricInfo(direction="higher", source="fidelity"),
    "sqnr_db": wire.MetricInfo(direction="higher", source="fidelity"),
    "max_abs": wire.MetricInfo(direction="lower", source="fidelity"),
    "miou": wire.MetricInfo(direction="higher", source="evaluator", description="mean IoU"),
    "depth_rmse": wire.MetricInfo(direction="lower", source="evaluator", description="metres"),
}
# fp32 is the baseline: its fidelity to itself is perfect (SQNR capped at 300 dB).
GENERIC_FIGURES: dict[str, dict[str, float]] = {
    "fp32": {"cosine": 1.0, "sqnr_db": 300.0, "max_abs": 0.0, "miou": 0.72, "depth_rmse": 0.40},
    "fp16": {"cosine": 0.9999, "sqnr_db": 61.0, "max_abs": 0.001, "miou": 0.72, "depth_rmse": 0.40},
    "int8": {"cosine": 0.995, "sqnr_db": 28.0, "max_abs": 0.05, "miou": 0.70, "depth_rmse": 0.43},
    "pruned": {"cosine": 0.981, "sqnr_db": 17.0, "max_abs": 0.2, "miou": 0.689, "depth_rmse": 0.47},
}
SIZES = {"fp32": 4000, "fp16": 2000, "int8": 1000, "pruned": 500}
P50 = {"fp32": 10.0, "fp16": 8.0, "int8": 3.0, "pruned": 1.0}


def with_named(v: wire.Variant, named: dict[str, float], **metrics: Any) -> wire.Variant:
    return v.model_copy(update={"metrics": v.metrics.model_copy(update={"named": named, **metrics})})


def generic_manifest(
    figures: dict[str, dict[str, float]] | None = None,
    metrics: dict[str, wire.MetricInfo] | None = None,
    primary: str | None = "cosine",
) -> wire.Manifest:
    """A schema-2 generic manifest (no labels, so no accuracy), validated as a device would decode it."""
    figures = GENERIC_FIGURES if figures is None else figures
    variants = [
        with_named(make_variant(vid, bytes([97 + i]) * SIZES[vid], None), named)
        for i, (vid, named) in enumerate(figures.items())
    ]
    m = make_manifest(variants).model_copy(
        update={
            "task": "generic",
            "metrics": GENERIC_METRICS if metrics is None else metrics,
            "primary_metric": primary,
        }
    )
    return wire.Manifest.model_validate_json(m.to_json())


def results(m: wire.Manifest, **overrides: Any) -> list[wire.BenchResult]:
    return [ok_result(m.variant(v.id), P50[v.id], **overrides) for v in m.variants]


def one(
    m: wire.Manifest, policy: Policy, res: list[wire.BenchResult] | None = None, **status: Any
) -> Decision:
    st = {"pi1": make_status("pi1", **status)} if status else {}
    decisions = select(m, {"pi1": make_report("pi1", m, res or results(m))}, st, policy)
    assert len(decisions) == 1
    return decisions[0]


def policy_file(tmp_path: Path, text: str) -> Policy:
    path = tmp_path / "lab.toml"
    path.write_text(text)
    return load_policy(path)


@pytest.fixture
def generic() -> wire.Manifest:
    return generic_manifest()


# --------------------------------------------------------------------------------------------------------
# The generic task: no accuracy


def test_default_objective_on_a_generic_manifest_ranks_on_its_primary_metric_and_says_so(
    generic: wire.Manifest,
) -> None:
    d = one(generic, Policy())
    assert d.variant == "fp32" and d.objective == "accuracy"
    assert d.why.startswith(
        "highest cosine of 4 variant(s) meeting policy 'default' (default rule): cosine 1;"
    )
    assert d.why.endswith(
        "(this manifest has no accuracy: objective 'accuracy' ranked on its primary metric, cosine)"
    )
    assert d.lost == {
        "fp16": "lower cosine 0.9999 < 1 (fp32)",
        "int8": "lower cosine 0.995 < 1 (fp32)",
        "pruned": "lower cosine 0.981 < 1 (fp32)",
    }
    assert d.chosen is not None and d.chosen.metric == "cosine" and d.chosen.metric_value == 1.0
    assert d.chosen.accuracy is None
    assert d.to_json()["chosen"]["metric"] == "cosine"


def test_generic_manifest_selecting_on_min_cosine(tmp_path: Path, generic: wire.Manifest) -> None:
    policy = policy_file(tmp_path, '[default]\nobjective = "latency"\nmin_cosine = 0.99\n')
    assert policy.default.min_metric == {"cosine": 0.99}  # the shorthand is min_metric.cosine
    d = one(generic, policy)
    assert d.variant == "int8"
    assert d.lost["pruned"] == "cosine 0.981 < min 0.99"
    assert d.lost["fp16"] == "higher p50 8 ms > 3 ms (int8)"
    assert d.why.startswith("lowest latency of 3 variant(s)") and "cosine 0.995" in d.why
    same = policy_file(tmp_path, '[default]\nobjective = "latency"\nmin_metric = { cosine = 0.99 }\n')
    assert same == policy and one(generic, same) == d


def test_max_drop_on_a_higher_is_better_user_metric(tmp_path: Path, generic: wire.Manifest) -> None:
    policy = policy_file(tmp_path, '[default]\nobjective = "latency"\nmax_drop.miou = 0.02\n')
    assert policy.default.max_drop == {"miou": 0.02}  # a TOML dotted key fills the table
    d = one(generic, policy)
    assert d.variant == "int8"  # miou 0.70: 2 points below float32's 0.72, allowed
    assert d.lost["pruned"] == "miou drop 3.1 pts > max 2 pts"


def test_max_drop_on_a_lower_is_better_user_metric(tmp_path: Path, generic: wire.Manifest) -> None:
    policy = policy_file(tmp_path, '[default]\nobjective = "latency"\nmax_drop = { depth_rmse = 0.05 }\n')
    d = one(generic, policy)
    assert d.variant == "int8"  # rmse 0.43: 0.03 worse than float32's 0.40
    assert d.lost["pruned"] == "depth_rmse rise 0.07 > max 0.05"  # worse means higher here
    # A variant *better* than float32 on a lower-is-better metric never breaks a drop limit.
    better = {**GENERIC_FIGURES, "pruned": {**GENERIC_FIGURES["pruned"], "depth_rmse": 0.30}}
    assert one(generic_manifest(better), policy).variant == "pruned"


def test_max_drop_in_db_and_ceilings(tmp_path: Path) -> None:
    figures = {vid: {**f, "sqnr_db": 40.0 - 5 * i} for i, (vid, f) in enumerate(GENERIC_FIGURES.items())}
    m = generic_manifest(figures)  # sqnr_db 40, 35, 30, 25 (a user's own reference, not the cap)
    policy = policy_file(tmp_path, '[default]\nobjective = "latency"\nmax_drop.sqnr_db = 12\n')
    assert one(m, policy).lost["pruned"] == "sqnr_db drop 15 dB > max 12 dB"
    policy = policy_file(tmp_path, '[default]\nobjective = "latency"\nmax_metric = { max_abs = 0.1 }\n')
    assert one(m, policy).lost["pruned"] == "max_abs 0.2 > max 0.1"


def test_objective_metric_ranks_on_the_rank_metric_by_its_direction(tmp_path: Path) -> None:
    figures = {
        **GENERIC_FIGURES,
        "int8": {**GENERIC_FIGURES["int8"], "miou": 0.74},  # int8 beats float32 on the task metric
        "fp16": {**GENERIC_FIGURES["fp16"], "depth_rmse": 0.35},  # fp16 has the lowest error
    }
    m = generic_manifest(figures)
    d = one(m, policy_file(tmp_path, '[default]\nobjective = "metric"\nrank_metric = "miou"\n'))
    assert d.variant == "int8" and d.objective == "metric"
    assert d.why.startswith("highest miou of 4 variant(s)") and "miou 0.74" in d.why
    assert d.lost["fp32"] == "lower miou 0.72 < 0.74 (int8)"
    assert d.chosen is not None and d.chosen.metric == "miou"

    d = one(m, policy_file(tmp_path, '[default]\nobjective = "metric"\nrank_metric = "depth_rmse"\n'))
    assert d.variant == "fp16"
    assert d.why.startswith("lowest depth_rmse of 4 variant(s)")
    assert d.lost["int8"] == "higher depth_rmse 0.43 > 0.35 (fp16)"


def test_objective_metric_ties_go_to_lower_p95_and_default_to_the_primary_metric(
    generic: wire.Manifest,
) -> None:
    d = one(generic, Policy(default=Rule(objective="metric", rank_metric="miou")))
    assert d.variant == "fp16"  # fp32 and fp16 both 0.72; fp16 is faster
    assert d.lost["fp32"] == "tie on miou; higher p95 12 ms > 9.6 ms (fp16)"
    d = one(generic, Policy(default=Rule(objective="metric")))
    assert d.variant == "fp32" and d.why.startswith("highest cosine")
    assert "has no accuracy" not in d.why  # the operator asked for the primary metric


def test_close_fidelity_figures_are_printed_apart() -> None:
    figures = {
        "fp32": {"cosine": 0.99994},  # (a user's reference, not float32 itself)
        "fp16": {"cosine": 0.99991},
    }
    m = generic_manifest(figures, metrics={"cosine": GENERIC_METRICS["cosine"]})
    d = one(m, Policy())
    assert d.lost["fp16"] == "lower cosine 0.99991 < 0.99994 (fp32)"
    d = one(m, Policy(default=Rule(min_metric={"cosine": 0.99993})))
    assert d.lost["fp16"] == "cosine 0.9999 < min 0.99993"  # as the operator wrote the limit


def test_latency_ties_fall_to_the_quality_metric(generic: wire.Manifest) -> None:
    res = [ok_result(generic.variant(v), 3.0) for v in ("int8", "pruned")]
    d = one(generic, Policy(default=Rule(objective="latency")), res)
    assert d.variant == "int8"
    assert d.lost["pruned"] == "tie on p50, p95; lower cosine 0.981 < 0.995 (int8)"
    d = one(generic, Policy(default=Rule(objective="latency", rank_metric="max_abs")), res)
    assert d.lost["pruned"] == "tie on p50, p95; higher max_abs 0.2 > 0.05 (int8)"


def test_device_fidelity_is_a_sanity_check_not_the_metric(generic: wire.Manifest) -> None:
    """A device's outputs against the host's outputs of the *same file* say whether its runtime computes
    right (beyond the variant's output_tolerance the agent reports the variant failed); they do not stand
    in for the host's cosine of that file against float32, on which the policy judges."""
    close = wire.OutputFidelity(rows=32, cosine=0.9995, sqnr_db=40.0, max_abs=0.01)  # within tolerance
    exact = wire.OutputFidelity(rows=32, cosine=1.0, sqnr_db=300.0, max_abs=0.0)
    res = [
        r.model_copy(update={"fidelity": close if r.variant == "int8" else exact}) for r in results(generic)
    ]
    policy = Policy(default=Rule(objective="latency", min_metric={"cosine": 0.99}))
    d = one(generic, policy, res)
    assert d.variant == "int8" and d.chosen is not None and d.chosen.metric_value == 0.995
    assert d.lost["pruned"] == "cosine 0.981 < min 0.99"  # the host figure, though its device was exact
    # accuracy_source = "device" concerns accuracy only: named metrics stay host figures.
    device = one(
        generic,
        policy.model_copy(
            update={
                "default": Rule.model_validate(
                    {"objective": "latency", "accuracy_source": "device", "min_cosine": 0.99}
                )
            }
        ),
        res,
    )
    assert device.variant == "int8" and device.lost == d.lost


# --------------------------------------------------------------------------------------------------------
# Refusals


def test_a_metric_the_manifest_lacks_is_refused_with_the_list(generic: wire.Manifest) -> None:
    policy = Policy.from_mapping(
        {"default": {"min_metric": {"miou": 0.5}}, "classes": {"fast": {"max_drop": {"map": 0.01}}}},
        name="lab",
    )
    expected = (
        "policy 'lab' does not fit digits v1: classes.fast max_drop.map: no metric 'map' "
        "(the manifest's metrics: cosine (higher), depth_rmse (lower), max_abs (lower), "
        "miou (higher), sqnr_db (higher))"
    )
    with pytest.raises(PolicyError) as info:
        select(generic, {"pi1": make_report("pi1", generic, results(generic))}, {}, policy)
    assert str(info.value) == expected
    assert "\n" not in expected
    assert unreachable_rules(policy, generic) == [expected]
    topics = wire.Topics()
    state = parse_state(raw_state(topics, generic, Ed25519PrivateKey.generate()), topics)
    with pytest.raises(PolicyError, match="no metric 'map'"):
        plan(state, "digits", policy)  # select, assign and rollout stop before publishing


@pytest.mark.parametrize(
    ("rule", "expect"),
    [
        ({"objective": "metric", "rank_metric": "psnr"}, "default rank_metric: no metric 'psnr'"),
        (
            {"min_metric": {"cosin": 0.9}},
            "default min_metric.cosin: no metric 'cosin' (did you mean 'cosine'?)",
        ),
        (
            {"min_max_abs": 0.1},
            "min_metric.max_abs: max_abs is lower-is-better, so the limit belongs in max_metric",
        ),
        (
            {"max_metric": {"cosine": 1}},
            "max_metric.cosine: cosine is higher-is-better, so the limit belongs in min",
        ),
        ({"min_accuracy": 0.9}, "default min_accuracy: the manifest has no accuracy"),
        ({"max_accuracy_drop": 0.01}, "default max_accuracy_drop: the manifest has no accuracy"),
    ],
)
def test_misused_metrics_are_refused_in_one_line(
    generic: wire.Manifest, rule: dict[str, Any], expect: str
) -> None:
    problems = unreachable_rules(Policy.from_mapping({"default": rule}), generic)
    assert len(problems) == 1 and expect in problems[0]
    assert problems[0].endswith("sqnr_db (higher))")


def test_a_metric_without_a_direction_is_refused() -> None:
    figures = {vid: {**f, "psnr": 30.0} for vid, f in GENERIC_FIGURES.items()}
    m = generic_manifest(figures)  # psnr is carried but not declared in the metrics map
    assert metric_directions(m)["psnr"] is None
    problems = unreachable_rules(Policy(default=Rule(min_metric={"psnr": 20})), m)
    assert "min_metric.psnr: the manifest says nothing of which way 'psnr' is better" in problems[0]
    assert "psnr (direction unknown)" in problems[0]


def test_objective_metric_with_nothing_to_rank_on_is_refused(generic: wire.Manifest) -> None:
    m = generic_manifest(primary=None)
    problems = unreachable_rules(Policy(default=Rule(objective="metric")), m)
    assert "default objective 'metric': no rank_metric, and the manifest has no primary_metric" in problems[0]


def test_named_metric_limits_no_variant_meets_are_refused_before_publishing(generic: wire.Manifest) -> None:
    policy = Policy.from_mapping(
        {
            "default": {"min_cosine": 0.9},
            "classes": {
                "picky": {"min_metric": {"miou": 0.8}},
                # a device-accuracy rule is still judged on its (host) named metrics
                "lab": {"accuracy_source": "device", "max_metric": {"depth_rmse": 0.3}},
            },
        },
        name="lab",
    )
    assert unreachable_rules(policy, generic) == [
        "policy 'lab' classes.lab: no variant of digits v1 meets its metric limits (fp32: depth_rmse 0.4 > "
        "max 0.3; fp16: depth_rmse 0.4 > max 0.3; int8: depth_rmse 0.43 > max 0.3; pruned: depth_rmse 0.47 "
        "> max 0.3)",
        "policy 'lab' classes.picky: no variant of digits v1 meets its metric limits (fp32: miou 0.72 < min "
        "0.8; fp16: miou 0.72 < min 0.8; int8: miou 0.7 < min 0.8; pruned: miou 0.689 < min 0.8)",
    ]


def test_accuracy_and_metric_limits_together_on_a_classification_manifest() -> None:
    """Schema 2 with labels: accuracy, fidelity and a user metric side by side."""
    labels = wire.MetricInfo(direction="higher", source="labels")
    m = make_manifest(
        [
            with_named(
                make_variant("fp32", b"a" * 400, 0.97), {"accuracy": 0.97, "cosine": 1.0, "miou": 0.6}
            ),
            with_named(
                make_variant("int8", b"c" * 100, 0.90, "int8"),
                {"accuracy": 0.90, "cosine": 0.999, "miou": 0.7},
            ),
        ]
    ).model_copy(
        update={
            "metrics": {
                "accuracy": labels,
                "cosine": GENERIC_METRICS["cosine"],
                "miou": GENERIC_METRICS["miou"],
            },
            "primary_metric": "accuracy",
        }
    )
    policy = Policy(default=Rule(max_accuracy_drop=0.05, min_metric={"miou": 0.65}))
    assert unreachable_rules(policy, m) == [
        "policy 'default' default: no variant of digits v1 meets its accuracy and metric limits "
        "(fp32: miou 0.6 < min 0.65; int8: accuracy drop 7 pts > max 5)"
    ]
    d = one(m, Policy(default=Rule(objective="latency", min_metric={"cosine": 0.9999})))
    assert d.variant == "fp32" and d.lost["int8"] == "cosine 0.999 < min 0.9999"
    d = one(m, Policy())  # objective accuracy ranks on accuracy, as on schema 1
    assert d.variant == "fp32" and d.lost["int8"] == "lower accuracy 0.9 < 0.97 (fp32)"
    assert d.chosen is not None and d.chosen.metric == "accuracy"
    d = one(m, Policy(default=Rule(objective="metric", rank_metric="miou")))
    assert d.variant == "int8" and d.why.startswith("highest miou of 2 variant(s)")
    assert "miou 0.7; accuracy 0.9;" in d.why


# --------------------------------------------------------------------------------------------------------
# The policy file


def test_classes_merge_metric_limits_per_metric(tmp_path: Path, generic: wire.Manifest) -> None:
    policy = policy_file(
        tmp_path,
        "[default]\nmin_cosine = 0.99\nmax_drop.miou = 0.05\n"
        "[classes.strict]\nobjective = 'latency'\nmin_sqnr_db = 30\nmax_drop.miou = 0.01\n",
    )
    rule = policy.rule_for("strict")
    assert rule.min_metric == {"cosine": 0.99, "sqnr_db": 30}
    assert rule.max_drop == {"miou": 0.01}
    d = one(generic, policy, device_class="strict")
    assert d.variant == "fp16"
    assert d.lost["int8"] == "miou drop 2 pts > max 1 pts"
    assert one(generic, policy).variant == "fp32"  # the default rule: objective accuracy -> cosine


@pytest.mark.parametrize(
    ("text", "expect"),
    [
        (
            "[default]\nmin_acuracy = 0.9\n",
            "unknown key 'default.min_acuracy' (did you mean 'min_accuracy'?)",
        ),
        (
            "[default]\nmin_metrics = { cosine = 0.9 }\n",
            "unknown key 'default.min_metrics' (did you mean 'min_metric'?)",
        ),
        ("[default]\nmax_cosine = 0.9\n", "unknown key 'default.max_cosine'"),  # ceilings: max_metric only
        (
            "[default]\nmin_cosine = 0.9\nmin_metric = { cosine = 0.95 }\n",
            "default: min_cosine and min_metric.cosine are the same limit",
        ),
        (
            "[default]\nmin_metric = { accuracy = 0.9 }\n",
            "default: min_metric.accuracy: accuracy has its own keys",
        ),
        (
            "[classes.x]\nmax_drop.accuracy = 0.01\n",
            "classes.x: max_drop.accuracy: accuracy has its own keys",
        ),
        ("[default]\nmax_drop.miou = -0.01\n", "default.max_drop.miou"),
        ("[default]\nmin_cosine = inf\n", "default.min_metric.cosine"),
        ("[default]\nmin_metric = { MIoU = 0.5 }\n", "default.min_metric.MIoU"),
        (
            "[default]\nmin_sqnr_db = 30\nmax_metric.sqnr_db = 20\n",
            "min_metric.sqnr_db 30 is above max_metric.sqnr_db 20",
        ),
        (
            "[default]\nrank_metric = 'miou'\n",
            "default: rank_metric 'miou' is not used by objective 'accuracy'",
        ),
        (
            "[default]\nobjective = 'metric'\n[classes.x]\nobjective = 'accuracy'\nrank_metric = 'miou'\n",
            "classes.x: rank_metric",
        ),
        ("[default]\nobjective = 'miou'\n", "default.objective"),
    ],
)
def test_metric_policy_errors_name_the_key(tmp_path: Path, text: str, expect: str) -> None:
    path = tmp_path / "bad.toml"
    path.write_text(text)
    with pytest.raises(PolicyError) as info:
        load_policy(path)
    assert expect in str(info.value)
    assert str(path) in str(info.value)


def test_an_inherited_rank_metric_does_not_bind_a_class_that_ranks_on_accuracy(tmp_path: Path) -> None:
    policy = policy_file(
        tmp_path,
        "[default]\nobjective = 'metric'\nrank_metric = 'miou'\n[classes.x]\nobjective = 'latency'\n",
    )
    assert policy.rule_for("x").rank_metric == "miou"  # breaks the class's latency ties


# --------------------------------------------------------------------------------------------------------
# Schema 1 and old policies: unchanged


def test_a_schema_1_manifest_and_an_old_policy_decide_as_before(tmp_path: Path) -> None:
    old = make_manifest(
        [
            make_variant("fp32", b"a" * 4000, 0.97),
            make_variant("fp16", b"b" * 2000, 0.97, "float16"),
            make_variant("int8", b"c" * 1000, 0.95, "int8"),
            make_variant("pruned", b"d" * 500, 0.93, "int8"),
        ]
    )
    raw = old.model_dump(mode="json", by_alias=True, exclude={"metrics", "primary_metric"})
    raw["schema"] = "edgefleet.manifest/1"
    for v in raw["variants"]:
        for key in ("output_tolerance", "required_custom_ops"):
            v.pop(key, None)
        v["metrics"].pop("named")
    m = wire.Manifest.model_validate(raw)
    assert m.schema_ == "edgefleet.manifest/1" and metric_directions(m) == {"accuracy": "higher"}
    policy = policy_file(
        tmp_path,
        "[default]\nmax_accuracy_drop = 0.03\n[classes.fast]\nobjective = 'latency'\nmin_accuracy = 0.94\n",
    )
    assert unreachable_rules(policy, m) == []
    res = [ok_result(m.variant(v), p50) for v, p50 in P50.items()]
    d = one(m, policy, res)
    assert d.variant == "fp16"
    assert d.why == (
        "highest accuracy of 3 variant(s) meeting policy 'lab' (default rule): accuracy 0.97; "
        "p50 8 ms, p95 9.6 ms; 1 thread(s)"
    )
    assert d.lost == {
        "fp32": "tie on accuracy, agreement; higher p95 12 ms > 9.6 ms (fp16)",
        "int8": "lower accuracy 0.95 < 0.97 (fp16)",
        "pruned": "accuracy drop 4 pts > max 3",
    }
    fast = one(m, policy, res, device_class="fast")
    assert fast.variant == "int8" and fast.lost["pruned"] == "accuracy drop 4 pts > max 3"
    assert fast.lost["fp16"] == "higher p50 8 ms > 3 ms (int8)"
    assert fast.chosen is not None and fast.chosen.metric == "accuracy" and fast.chosen.metric_value == 0.95
    table = decisions_table([d, fast])
    assert "ACCURACY" in table.splitlines()[0] and "METRIC" not in table


def test_the_decisions_table_names_the_metric_on_a_generic_manifest(generic: wire.Manifest) -> None:
    table = decisions_table([one(generic, Policy())])
    header, _rule, row = table.splitlines()[:3]
    assert header.split()[-1] == "METRIC"
    assert row.split()[-2:] == ["cosine", "1"]


# --------------------------------------------------------------------------------------------------------
# The documented examples load and fit a manifest that carries their metrics


def documented_policies() -> list[str]:
    import deploy.control.select

    doc = deploy.control.select.__doc__ or ""
    block = doc.split("Policy (TOML, every key optional)::\n", 1)[1].split("\nHow a decision is made", 1)[0]
    texts = ["\n".join(line.removeprefix("    ") for line in block.splitlines())]
    operator = (Path(__file__).resolve().parent.parent / "docs" / "operator.md").read_text(encoding="utf-8")
    section = operator.split("## 2. The policy file", 1)[1].split("\n## ", 1)[0]
    texts += [part.split("```", 1)[0] for part in section.split("```toml\n")[1:]]
    return texts


@pytest.mark.parametrize("text", documented_policies())
def test_documented_policies_load_and_fit(tmp_path: Path, text: str) -> None:
    policy = policy_file(tmp_path, text)
    named = {
        "accuracy": 0.9,
        "cosine": 0.999,
        "sqnr_db": 40.0,
        "max_abs": 0.01,
        "miou": 0.7,
        "top1_agreement": 0.99,
    }
    m = make_manifest(
        [
            with_named(make_variant("fp32", b"a" * 400, 0.9), {**named, "cosine": 1.0, "max_abs": 0.0}),
            with_named(make_variant("int8", b"c" * 100, 0.9, "int8"), named),
        ]
    ).model_copy(update={"metrics": {**GENERIC_METRICS, "accuracy": wire.MetricInfo(direction="higher")}})
    assert unreachable_rules(policy, m) == []


def test_without_a_primary_metric_a_generic_manifest_ranks_on_cosine() -> None:
    d = one(generic_manifest(primary=None), Policy())
    assert d.variant == "fp32" and d.lost["int8"] == "lower cosine 0.995 < 1 (fp32)"
    assert d.why.endswith("(this manifest has no accuracy: objective 'accuracy' ranked on cosine)")
    d = one(generic_manifest(primary="miou"), Policy())
    assert d.why.endswith("ranked on its primary metric, miou)")
