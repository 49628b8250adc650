"""Unit tests of the host side: keys, bundles, the pure selection policy, state parsing, CLI basics."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from agent import wire
from deploy import cli
from deploy.control.assign import make_assignment, plan
from deploy.control.publish import load_bundle, referenced_blobs
from deploy.control.select import Policy, Rule, decide, load_policy, select, unreachable_rules
from deploy.errors import BundleError, PolicyError, SigningKeyError, StateError
from deploy.keys import init_keys, load_signing_key, trusted_keys
from deploy.observe.fleet import decisions_table, fleet_rows, fleet_table
from deploy.observe.state import parse_state

ROOT = Path(__file__).resolve().parent.parent
SPEC = wire.TensorSpec(name="x", shape=[1, 8], dtype="float32")
OUT = wire.TensorSpec(name="y", shape=[1, 10], dtype="float32")

# --------------------------------------------------------------------------------------------------------
# Builders shared with the integration tests


def make_variant(
    vid: str,
    data: bytes,
    accuracy: float | None,
    quantization: wire.Quantization = "none",
    chunk_size: int = 1024,
    sample: bytes | None = None,
    **extra: Any,
) -> wire.Variant:
    return wire.Variant(
        id=vid,
        file=f"{vid}.tflite",
        quantization=quantization,
        inputs=[SPEC],
        outputs=[OUT],
        metrics=wire.HostMetrics(accuracy=accuracy, size_bytes=len(data)),
        sample=wire.BlobRef.of(sample, chunk_size) if sample is not None else None,
        **wire.blob_fields(data, chunk_size),
        **extra,
    )


def make_manifest(
    variants: list[wire.Variant], model: str = "digits", version: int = 1, baseline: str = "fp32"
) -> wire.Manifest:
    return wire.Manifest(
        model=model, version=version, created_at=1.0, baseline=baseline, labels=[], variants=variants
    )


def write_bundle(
    path: Path,
    sizes: Mapping[str, int],
    version: int = 1,
    chunk_size: int = 1024,
    model: str = "digits",
    samples: bool = False,
    seed: int = 0,
) -> wire.Manifest:
    """A bundle of random 'model files' (the deploy side never looks inside them)."""
    import random

    rng = random.Random(seed)
    path.mkdir(parents=True, exist_ok=True)
    variants = []
    for i, (vid, size) in enumerate(sizes.items()):
        data = rng.randbytes(size)
        (path / f"{vid}.tflite").write_bytes(data)
        sample = None
        if samples:
            sample = rng.randbytes(3000 + i)
            (path / f"{vid}.sample.npz").write_bytes(sample)
        variants.append(make_variant(vid, data, 0.97 - 0.01 * i, chunk_size=chunk_size, sample=sample))
    baseline = next(iter(sizes))
    manifest = make_manifest(variants, model=model, version=version, baseline=baseline)
    (path / "manifest.json").write_bytes(manifest.to_json())
    (path / "report.md").write_text("# report\n")
    return manifest


def ok_result(
    v: wire.Variant,
    p50: float,
    p95: float | None = None,
    p99: float | None = None,
    energy: float | None = None,
    rss_mb: float | None = None,
    threads: int = 1,
    throttled: bool | None = None,
    accuracy: float | None = None,
) -> wire.BenchResult:
    p95 = p50 * 1.2 if p95 is None else p95
    p99 = p95 * 1.1 if p99 is None else p99
    return wire.BenchResult(
        variant=v.id,
        sha256=v.sha256,
        ok=True,
        threads=threads,
        latency_ms=wire.LatencyStats(
            count=100, mean=p50, std=0.1, min=p50 * 0.9, p50=p50, p90=p95, p95=p95, p99=p99, max=p99
        ),
        energy=wire.Energy(method="model", measured=False, mj_per_inference=energy, avg_power_w=3.0)
        if energy is not None
        else None,
        peak_rss_bytes=int(rss_mb * 1024 * 1024) if rss_mb is not None else None,
        throttled=throttled,
        accuracy=accuracy,
        ts=100.0,
    )


def failed_result(v: wire.Variant, error: wire.BenchError) -> wire.BenchResult:
    return wire.BenchResult(variant=v.id, sha256=v.sha256, ok=False, error=error, ts=100.0)


def make_report(
    device: str, manifest: wire.Manifest, results: list[wire.BenchResult], ts: float = 100.0
) -> wire.Report:
    return wire.Report(
        device=device, model=manifest.model, manifest_version=manifest.version, ts=ts, results=results
    )


def make_status(
    device: str,
    device_class: str | None = None,
    active: wire.Variant | None = None,
    manifest: wire.Manifest | None = None,
    runtime: str = "2.3.0",
    runtime_name: str = "ai-edge-litert",
) -> wire.Status:
    models = {}
    if manifest is not None:
        act = (
            wire.ActiveVariant(
                variant=active.id, sha256=active.sha256, manifest_version=manifest.version, activated_at=5.0
            )
            if active
            else None
        )
        models[manifest.model] = wire.ModelStatus(
            state=wire.ModelState.COMMITTED if active else wire.ModelState.REPORTED,
            manifest_version=manifest.version,
            active=act,
        )
    return wire.Status(
        device=device,
        online=True,
        ts=100.0,
        board="Raspberry Pi 5",
        runtime=wire.RuntimeInfo(name=runtime_name, version=runtime),  # type: ignore[arg-type]
        device_class=device_class,
        models=models,
    )


# --------------------------------------------------------------------------------------------------------
# Fixtures


@pytest.fixture
def four() -> wire.Manifest:
    """fp32 0.97, fp16 0.97, int8 0.95, pruned 0.93 (host accuracy)."""
    return make_manifest(
        [
            make_variant("fp32", b"a" * 4000, 0.97),
            make_variant("fp16", b"b" * 2000, 0.97, "float16"),
            make_variant("int8", b"c" * 1000, 0.95, "int8"),
            make_variant("pruned", b"d" * 500, 0.93, "int8", techniques=["prune"]),
        ]
    )


def var(m: wire.Manifest, vid: str) -> wire.Variant:
    return m.variant(vid)


def one(
    m: wire.Manifest,
    results: list[wire.BenchResult],
    policy: Policy | None = None,
    status: wire.Status | None = None,
) -> Any:
    decisions = select(
        m, {"pi1": make_report("pi1", m, results)}, {"pi1": status} if status else {}, policy or Policy()
    )
    assert len(decisions) == 1
    return decisions[0]


def standard(m: wire.Manifest) -> list[wire.BenchResult]:
    return [
        ok_result(var(m, "fp32"), 10.0, energy=5.0, rss_mb=60),
        ok_result(var(m, "fp16"), 8.0, energy=4.0, rss_mb=50),
        ok_result(var(m, "int8"), 3.0, energy=1.5, rss_mb=40),
        ok_result(var(m, "pruned"), 1.0, energy=0.5, rss_mb=30),
    ]


# --------------------------------------------------------------------------------------------------------
# select: objectives and ties


def test_accuracy_objective_breaks_ties_by_p95(four: wire.Manifest) -> None:
    d = one(four, standard(four))
    assert d.variant == "fp16"  # fp32 and fp16 both 0.97; fp16 has the lower p95
    assert d.sha256 == var(four, "fp16").sha256
    assert "highest accuracy" in d.why
    assert d.lost["fp32"].startswith("tie on accuracy, agreement; higher p95 12 ms > 9.6 ms")
    assert d.lost["int8"] == "lower accuracy 0.95 < 0.97 (fp16)"
    assert set(d.lost) == {"fp32", "int8", "pruned"}


def test_accuracy_ties_go_to_the_variant_that_agrees_more_with_float32() -> None:
    m = make_manifest(
        [
            make_variant("fp32", b"a" * 4000, 0.97),
            make_variant("fp16", b"b" * 2000, 0.97, "float16"),
        ]
    )
    low_agreement = m.variant("fp16").model_copy(
        update={"metrics": m.variant("fp16").metrics.model_copy(update={"agreement": 0.99})}
    )
    m = m.model_copy(update={"variants": [m.variant("fp32"), low_agreement]})
    d = one(m, [ok_result(var(m, "fp32"), 10.0), ok_result(var(m, "fp16"), 8.0)])
    assert d.variant == "fp32"  # same accuracy, fp16 slower to lose but agrees less with the trained model
    assert d.lost["fp16"] == "tie on accuracy; lower agreement with float32 0.99 < 1 (fp32)"


def test_accuracy_tie_on_p95_falls_to_energy(four: wire.Manifest) -> None:
    res = [
        ok_result(var(four, "fp32"), 5.0, p95=6.0, energy=2.0),
        ok_result(var(four, "fp16"), 5.0, p95=6.0, energy=3.0),
        failed_result(var(four, "int8"), wire.BenchError.LOAD_ERROR),
    ]
    d = one(four, res)
    assert d.variant == "fp32"
    assert "higher energy 3 mJ (modelled) > 2 mJ (modelled)" in d.lost["fp16"]
    assert d.lost["int8"] == "failed: LOAD_ERROR"
    assert d.lost["pruned"] == "not benchmarked"


def test_full_tie_goes_to_smaller_file_deterministically(four: wire.Manifest) -> None:
    res = [ok_result(var(four, "fp32"), 5.0, p95=6.0), ok_result(var(four, "fp16"), 5.0, p95=6.0)]
    d = one(four, res)
    assert d.variant == "fp16"
    assert "larger file" in d.lost["fp32"]


def test_latency_objective(four: wire.Manifest) -> None:
    policy = Policy(default=Rule(objective="latency", min_accuracy=0.94))
    d = one(four, standard(four), policy)
    assert d.variant == "int8"
    assert d.lost["pruned"] == "accuracy 0.93 < min 0.94"
    assert d.lost["fp16"] == "higher p50 8 ms > 3 ms (int8)"
    assert "lowest latency" in d.why


def test_energy_objective(four: wire.Manifest) -> None:
    res = standard(four)
    res[3] = ok_result(var(four, "pruned"), 1.0, energy=2.5)
    d = one(four, res, Policy(default=Rule(objective="energy")))
    assert d.variant == "int8"
    assert d.lost["pruned"] == "higher energy 2.5 mJ (modelled) > 1.5 mJ (modelled) (int8)"


def test_best_latency_result_per_variant_counts(four: wire.Manifest) -> None:
    res = [
        ok_result(var(four, "fp32"), 20.0, threads=1),
        ok_result(var(four, "fp32"), 7.0, threads=2),
        ok_result(var(four, "fp16"), 9.0),
    ]
    d = one(four, res)
    assert d.variant == "fp32"
    assert d.chosen.threads == 2
    assert d.chosen.p50_ms == 7.0


def test_a_failed_thread_count_does_not_hide_a_good_one(four: wire.Manifest) -> None:
    res = [
        failed_result(var(four, "int8"), wire.BenchError.OOM),
        ok_result(var(four, "int8"), 3.0, threads=2),
    ]
    d = one(four, res, Policy(default=Rule(objective="latency")))
    assert d.variant == "int8"


# --------------------------------------------------------------------------------------------------------
# select: hard constraints


def test_max_p95(four: wire.Manifest) -> None:
    res = standard(four)
    res[1] = ok_result(var(four, "fp16"), 10.0, p95=12.1)
    res[0] = ok_result(var(four, "fp32"), 11.0, p95=13.0)
    d = one(four, res, Policy(default=Rule(max_p95_ms=10)))
    assert d.variant == "int8"
    assert d.lost["fp16"] == "p95 12.1 ms > max 10 ms"


def test_max_p99(four: wire.Manifest) -> None:
    d = one(four, standard(four), Policy(default=Rule(max_p99_ms=5)))
    assert d.variant == "int8"  # p99 = 3*1.2*1.1 = 3.96
    assert d.lost["fp16"].startswith("p99 10.6 ms > max 5 ms")


def test_max_accuracy_drop_in_points(four: wire.Manifest) -> None:
    m = make_manifest(
        [make_variant("fp32", b"a" * 400, 0.97), make_variant("int8", b"c" * 100, 0.939, "int8")]
    )
    res = [ok_result(var(m, "fp32"), 10.0), ok_result(var(m, "int8"), 1.0)]
    d = one(m, res, Policy(default=Rule(objective="latency", max_accuracy_drop=0.02)))
    assert d.variant == "fp32"
    assert d.lost["int8"] == "accuracy drop 3.1 pts > max 2"


def test_accuracy_drop_uses_manifest_figure_when_present() -> None:
    m = make_manifest(
        [
            make_variant("fp32", b"a" * 400, 0.97),
            wire.Variant(
                **{
                    **make_variant("int8", b"c" * 100, 0.96).model_dump(by_alias=True),
                    "metrics": wire.HostMetrics(accuracy=0.96, accuracy_drop=0.05, size_bytes=100),
                }
            ),
        ]
    )
    res = [ok_result(var(m, "fp32"), 10.0), ok_result(var(m, "int8"), 1.0)]
    d = one(m, res, Policy(default=Rule(objective="latency", max_accuracy_drop=0.02)))
    assert d.lost["int8"] == "accuracy drop 5 pts > max 2"


def test_energy_and_memory_limits(four: wire.Manifest) -> None:
    d = one(four, standard(four), Policy(default=Rule(max_energy_mj=4.5, max_peak_rss_mb=45)))
    assert d.variant == "int8"
    assert d.lost["fp32"] == "energy 5 mJ (modelled) > max 4.5 mJ"
    assert d.lost["fp16"] == "peak RSS 50 MiB > max 45 MiB"


def test_a_limit_on_a_missing_figure_fails_the_variant(four: wire.Manifest) -> None:
    res = [ok_result(var(four, "fp32"), 10.0), ok_result(var(four, "int8"), 3.0, energy=1.0)]
    d = one(four, res, Policy(default=Rule(max_energy_mj=10)))
    assert d.variant == "int8"
    assert d.lost["fp32"] == "no energy figure"


def test_throttled_runs_rejected_only_when_asked(four: wire.Manifest) -> None:
    res = [ok_result(var(four, "fp32"), 10.0, throttled=True), ok_result(var(four, "int8"), 3.0)]
    assert one(four, res).variant == "fp32"
    d = one(four, res, Policy(default=Rule(reject_throttled=True)))
    assert d.variant == "int8"
    assert d.lost["fp32"] == "CPU throttled during the benchmark"


def test_min_runtime(four: wire.Manifest) -> None:
    m = make_manifest(
        [
            make_variant("fp32", b"a" * 400, 0.97),
            make_variant("int8", b"c" * 100, 0.99, "int8", min_runtime="2.16.0"),
        ]
    )
    res = [ok_result(var(m, "fp32"), 10.0), ok_result(var(m, "int8"), 1.0)]
    d = one(m, res, status=make_status("pi1", runtime="2.14.0", runtime_name="tflite-runtime"))
    assert d.variant == "fp32"
    assert d.lost["int8"] == (
        "needs TFLite runtime >= 2.16.0, device has tflite-runtime 2.14.0 (TFLite 2.14.0)"
    )
    # ai-edge-litert numbers its releases anew; 2.x carries TFLite 2.20 kernels and runs it.
    assert one(m, res, status=make_status("pi1", runtime="2.3.0")).variant == "int8"


def test_result_for_another_file_does_not_count(four: wire.Manifest) -> None:
    bogus = ok_result(var(four, "fp16"), 1.0).model_copy(update={"sha256": "0" * 64})
    d = one(four, [ok_result(var(four, "fp32"), 10.0), bogus])
    assert d.variant == "fp32"
    assert d.lost["fp16"].startswith("benchmarked another file")


def test_all_fail_keeps_current_and_says_why(four: wire.Manifest) -> None:
    res = [failed_result(var(four, v.id), wire.BenchError.UNSUPPORTED_OP) for v in four.variants]
    status = make_status("pi1", active=var(four, "int8"), manifest=four)
    d = one(four, res, status=status)
    assert d.variant is None
    assert d.sha256 is None
    assert not d.changes
    assert "keeping the current variant int8" in d.why
    assert all(why == "failed: UNSUPPORTED_OP" for why in d.lost.values())
    assert len(d.lost) == 4


def test_all_fail_without_current(four: wire.Manifest) -> None:
    d = one(four, standard(four), Policy(default=Rule(max_p95_ms=0.5)))
    assert d.variant is None
    assert "keeping the current model" in d.why
    assert d.lost["pruned"] == "p95 1.2 ms > max 0.5 ms"


def test_classes_override_default_and_inherit_the_rest(four: wire.Manifest) -> None:
    policy = Policy.from_mapping(
        {
            "name": "lab",
            "default": {"objective": "accuracy", "max_accuracy_drop": 0.03},
            "classes": {"fast": {"objective": "latency", "max_p95_ms": 50}},
        }
    )
    rule = policy.rule_for("fast")
    assert rule.objective == "latency"
    assert rule.max_accuracy_drop == 0.03  # inherited
    assert rule.max_p95_ms == 50
    assert policy.rule_for("unknown") == policy.default
    assert policy.rule_for(None) == policy.default

    reports = {d: make_report(d, four, standard(four)) for d in ("pi-a", "pi-b", "pi-c")}
    statuses = {
        "pi-a": make_status("pi-a", "fast"),
        "pi-b": make_status("pi-b", "slow"),
        # pi-c has no status at all: default rule
    }
    decisions = {d.device: d for d in select(four, reports, statuses, policy)}
    assert decisions["pi-a"].variant == "int8"  # fastest within 3 points (pruned drops 4)
    assert decisions["pi-a"].lost["pruned"] == "accuracy drop 4 pts > max 3"
    assert "class fast" in decisions["pi-a"].why
    assert decisions["pi-b"].variant == "fp16"
    assert "default rule" in decisions["pi-b"].why
    assert decisions["pi-c"].variant == "fp16"
    assert decisions["pi-a"].policy == "lab"


def test_only_reports_for_this_model_and_version_count(four: wire.Manifest) -> None:
    old = make_manifest(list(four.variants), version=0 + 1)
    newer = four.model_copy(update={"version": 2})
    reports = {
        "pi-old": make_report("pi-old", old, standard(old)),
        "pi-new": make_report("pi-new", newer, standard(newer)),
        "pi-other": make_report("pi-other", make_manifest(list(four.variants), model="other"), []),
    }
    got = select(newer, reports, {}, Policy())
    assert [d.device for d in got] == ["pi-new"]
    assert got[0].manifest_version == 2


def test_current_is_reported(four: wire.Manifest) -> None:
    status = make_status("pi1", active=var(four, "fp16"), manifest=four)
    d = one(four, standard(four), status=status)
    assert d.current == "fp16"
    assert d.variant == "fp16"
    assert not d.changes


def test_select_is_pure(four: wire.Manifest) -> None:
    reports = {"pi1": make_report("pi1", four, standard(four))}
    before = json.dumps({k: r.model_dump(mode="json") for k, r in reports.items()})
    a = select(four, reports, {}, Policy())
    b = select(four, reports, {}, Policy())
    assert a == b
    assert json.dumps({k: r.model_dump(mode="json") for k, r in reports.items()}) == before


def test_the_first_broken_constraint_in_policy_order_is_named(four: wire.Manifest) -> None:
    """Run figures (latency) come before the manifest's accuracy, which comes before energy and memory."""
    res = [ok_result(var(four, v), 10.0, energy=9.0, rss_mb=90) for v in ("fp32", "pruned")]
    res.append(ok_result(var(four, "int8"), 1.0, energy=9.0, rss_mb=90))
    strict = Rule(max_p95_ms=5, max_accuracy_drop=0.03, max_energy_mj=1, max_peak_rss_mb=10)
    d = one(four, res, Policy(default=strict))
    assert d.lost["fp32"] == "p95 12 ms > max 5 ms"
    assert d.lost["pruned"] == "p95 12 ms > max 5 ms"
    assert d.lost["int8"] == "energy 9 mJ (modelled) > max 1 mJ"
    d = one(four, res, Policy(default=strict.model_copy(update={"max_p95_ms": None})))
    assert d.lost["pruned"] == "accuracy drop 4 pts > max 3"
    assert d.lost["fp32"] == "energy 9 mJ (modelled) > max 1 mJ"
    d = one(four, res, Policy(default=strict.model_copy(update={"max_p95_ms": None, "max_energy_mj": None})))
    assert d.lost["fp32"] == "peak RSS 90 MiB > max 10 MiB"
    assert d.variant is None


def test_exact_tie_goes_to_the_variant_id() -> None:
    m = make_manifest(
        [make_variant("b-fp32", b"a" * 400, 0.97), make_variant("a-fp32", b"b" * 400, 0.97)],
        baseline="b-fp32",
    )
    res = [ok_result(var(m, "b-fp32"), 5.0), ok_result(var(m, "a-fp32"), 5.0)]
    d = one(m, res)
    assert d.variant == "a-fp32"
    assert d.lost == {"b-fp32": "tie with a-fp32; chosen by id order"}


def test_decision_is_immutable_and_json_ready(four: wire.Manifest) -> None:
    d = one(four, standard(four), status=make_status("pi1", "fast"))
    with pytest.raises(AttributeError):
        d.variant = "int8"  # type: ignore[misc]
    doc = json.loads(json.dumps(d.to_json()))
    assert doc["device"] == "pi1" and doc["variant"] == "fp16" and doc["device_class"] == "fast"
    assert doc["chosen"]["variant"] == "fp16" and doc["chosen"]["p50_ms"] == 8.0
    assert doc["chosen"]["energy_measured"] is False
    assert list(doc["lost"]) == ["fp32", "int8", "pruned"]  # manifest order
    kept = one(four, standard(four), Policy(default=Rule(max_p95_ms=0.1))).to_json()
    assert kept["chosen"] is None and kept["variant"] is None


def on_device(m: wire.Manifest, accuracies: dict[str, float | None]) -> list[wire.BenchResult]:
    """Results for ``m``'s variants with these on-device accuracies (p50 1, 2, 3... ms in that order)."""
    return [ok_result(var(m, v), 1.0 + i, accuracy=a) for i, (v, a) in enumerate(accuracies.items())]


def test_on_device_accuracy_drop_is_against_the_devices_own_baseline(four: wire.Manifest) -> None:
    # Host accuracies: fp32 0.97, fp16 0.97, int8 0.95, pruned 0.93. On this device's sample the int8
    # file scores the same as float32 and pruned collapses.
    res = on_device(four, {"fp32": 0.90, "fp16": 0.90, "int8": 0.90, "pruned": 0.70})
    rule = Rule(objective="latency", max_accuracy_drop=0.03)
    host = one(four, res, Policy(default=rule))
    assert host.lost["pruned"] == "accuracy drop 4 pts > max 3"
    assert host.variant == "fp32"  # int8 drops 2 points on the host: allowed, but fp32 is fastest here

    device = one(four, res, Policy(default=rule.model_copy(update={"accuracy_source": "device"})))
    assert device.variant == "fp32"
    assert device.lost["pruned"] == "on-device accuracy drop 20 pts > max 3"
    assert device.chosen.accuracy == 0.90 and device.chosen.accuracy_drop == 0.0
    assert device.chosen.accuracy_source == "device"
    assert device.to_json()["chosen"]["accuracy_source"] == "device"


def test_on_device_accuracy_objective_and_sentences(four: wire.Manifest) -> None:
    res = on_device(four, {"fp32": 0.90, "fp16": 0.92, "int8": 0.95, "pruned": None})
    d = one(four, res, Policy(default=Rule(accuracy_source="device")))
    assert d.variant == "int8"  # the host would pick fp16 (0.97)
    assert d.why.startswith("highest on-device accuracy of 4 variant(s)")
    assert "on-device accuracy 0.95" in d.why
    assert d.lost["fp16"] == "lower on-device accuracy 0.92 < 0.95 (int8)"
    assert d.lost["pruned"] == "lower on-device accuracy n/a < 0.95 (int8)"  # no figure ranks last
    limited = Policy(default=Rule(accuracy_source="device", min_accuracy=0.91, max_accuracy_drop=0.5))
    d = one(four, res, limited)
    assert d.lost["fp32"] == "on-device accuracy 0.9 < min 0.91"
    assert d.lost["pruned"] == "no on-device accuracy to compare with the baseline"


def test_on_device_drop_falls_back_to_the_hosts_baseline_on_the_same_rows() -> None:
    m = make_manifest(
        [
            wire.Variant(
                **{
                    **make_variant("fp32", b"a" * 400, 0.97).model_dump(by_alias=True),
                    "metrics": wire.HostMetrics(accuracy=0.97, sample_accuracy=0.94, size_bytes=400),
                }
            ),
            make_variant("int8", b"c" * 100, 0.96, "int8"),
        ]
    )
    res = [failed_result(var(m, "fp32"), wire.BenchError.OOM), ok_result(var(m, "int8"), 1.0, accuracy=0.9)]
    d = one(m, res, Policy(default=Rule(accuracy_source="device", max_accuracy_drop=0.03)))
    assert d.variant is None
    assert d.lost["int8"] == "on-device accuracy drop 4 pts > max 3"  # 0.94 (host, sample rows) - 0.90


def test_accuracy_source_is_a_validated_policy_key(tmp_path: Path) -> None:
    path = tmp_path / "p.toml"
    path.write_text('[default]\naccuracy_source = "device"\n[classes.lab]\naccuracy_source = "host"\n')
    policy = load_policy(path)
    assert policy.rule_for(None).accuracy_source == "device"
    assert policy.rule_for("lab").accuracy_source == "host"
    path.write_text('[default]\naccuracy_source = "sensor"\n')
    with pytest.raises(PolicyError, match="accuracy_source"):
        load_policy(path)


def test_decide_and_select_agree(four: wire.Manifest) -> None:
    policy = Policy(default=Rule(objective="latency", max_accuracy_drop=0.03))
    report = make_report("pi1", four, standard(four))
    status = make_status("pi1", "fast")
    assert decide(four, report, status, policy) == select(four, {"pi1": report}, {"pi1": status}, policy)[0]


# --------------------------------------------------------------------------------------------------------
# Policy files


def test_policy_from_toml(tmp_path: Path) -> None:
    path = tmp_path / "lab.toml"
    path.write_text(
        '[default]\nobjective = "accuracy"\nmax_accuracy_drop = 0.05\n'
        '[classes.fast]\nobjective = "latency"\nmin_accuracy = 0.90\nmax_p95_ms = 50\n'
    )
    policy = load_policy(path)
    assert policy.name == "lab"
    assert policy.default.max_accuracy_drop == 0.05
    assert policy.rule_for("fast").max_p95_ms == 50
    assert load_policy(None) == Policy()


@pytest.mark.parametrize(
    ("text", "expect"),
    [
        ("[default]\nmax_p95 = 3\n", "unknown key 'default.max_p95' (did you mean 'max_p95_ms'?)"),
        ("[classes.fast]\nobjective = 'speed'\n", "classes.fast.objective"),
        ("[default]\nmax_accuracy_drop = 5\n", "default.max_accuracy_drop"),
        ("[classes.Fast]\nobjective = 'latency'\n", "classes.Fast"),
        ("defaults = 1\n", "unknown key 'defaults' (did you mean 'default'?)"),
        ("[default\n", "not valid TOML"),
        ("[default]\nmax_p95_ms = 50\nmax_p99_ms = 20\n", "default: max_p99_ms 20 is below max_p95_ms 50"),
        (
            "[default]\nmax_p95_ms = 50\n[classes.fast]\nmax_p99_ms = 20\n",
            "classes.fast: max_p99_ms 20 is below max_p95_ms 50",
        ),
    ],
)
def test_policy_errors_name_the_key(tmp_path: Path, text: str, expect: str) -> None:
    path = tmp_path / "bad.toml"
    path.write_text(text)
    with pytest.raises(PolicyError) as info:
        load_policy(path)
    assert expect in str(info.value)
    assert str(path) in str(info.value)


def test_missing_policy_file(tmp_path: Path) -> None:
    with pytest.raises(PolicyError, match="does not exist"):
        load_policy(tmp_path / "nope.toml")


# --------------------------------------------------------------------------------------------------------
# Keys


def test_keys_init_and_load(tmp_path: Path) -> None:
    pair = init_keys(tmp_path / "k")
    assert stat.S_IMODE(os.stat(pair.private_path).st_mode) == 0o600
    pub = wire.public_key_from_text(pair.public_path.read_text())
    assert wire.key_id_for(pub) == pair.key_id
    key = load_signing_key(pair.private_path)
    assert wire.key_id_for(key.public_key()) == pair.key_id
    with pytest.raises(SigningKeyError, match="--force"):
        init_keys(tmp_path / "k")
    again = init_keys(tmp_path / "k", force=True)
    assert again.key_id != pair.key_id


def test_load_signing_key_errors(tmp_path: Path) -> None:
    with pytest.raises(SigningKeyError, match="keys init"):
        load_signing_key(tmp_path / "missing.key")
    junk = tmp_path / "junk.key"
    junk.write_text("not a key")
    with pytest.raises(SigningKeyError, match="not an unencrypted PEM"):
        load_signing_key(junk)


def test_keys_cli_uses_edgefleet_home(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("EDGEFLEET_HOME", str(tmp_path / "home"))
    assert cli.main(["keys", "init"]) == 0
    out = capsys.readouterr().out
    assert (tmp_path / "home" / "signing.key").exists()
    key_id = wire.key_id_for(load_signing_key(tmp_path / "home" / "signing.key").public_key())
    assert key_id in out
    assert cli.main(["keys", "init"]) == 2
    assert "--force" in capsys.readouterr().err
    assert cli.main(["keys", "show"]) == 0
    assert key_id in capsys.readouterr().out


# --------------------------------------------------------------------------------------------------------
# Bundles


def test_load_bundle_checks_every_file(tmp_path: Path) -> None:
    m = write_bundle(tmp_path / "b", {"fp32": 5000, "int8": 1500}, samples=True)
    bundle = load_bundle(tmp_path / "b")
    assert bundle.manifest == m
    assert len(bundle.files) == 4  # two variants, two samples
    assert bundle.total_bytes == sum(r.size for r in referenced_blobs(m).values())


@pytest.mark.parametrize(
    ("damage", "expect"),
    [
        (lambda p: (p / "int8.tflite").write_bytes(b"x" * 1500), "int8.tflite: chunk 0"),
        (lambda p: (p / "int8.tflite").write_bytes(b"x" * 10), "int8.tflite has 10 bytes"),
        (lambda p: (p / "int8.tflite").unlink(), "int8.tflite is missing"),
        (lambda p: (p / "fp32.sample.npz").unlink(), "fp32.sample.npz is missing"),
        (lambda p: (p / "manifest.json").write_text("{nope"), "not valid JSON"),
        (lambda p: (p / "manifest.json").write_text('{"schema": "edgefleet.manifest/1"}'), "schema"),
        (lambda p: (p / "manifest.json").unlink(), "has no manifest.json"),
    ],
)
def test_load_bundle_refuses_damage(tmp_path: Path, damage: Any, expect: str) -> None:
    write_bundle(tmp_path / "b", {"fp32": 5000, "int8": 1500}, samples=True)
    damage(tmp_path / "b")
    with pytest.raises(BundleError) as info:
        load_bundle(tmp_path / "b")
    assert expect in str(info.value)


def test_tampered_last_chunk_is_named(tmp_path: Path) -> None:
    write_bundle(tmp_path / "b", {"fp32": 5000})
    data = bytearray((tmp_path / "b" / "fp32.tflite").read_bytes())
    data[-1] ^= 0xFF
    (tmp_path / "b" / "fp32.tflite").write_bytes(bytes(data))
    with pytest.raises(BundleError, match=r"fp32\.tflite: chunk 4"):
        load_bundle(tmp_path / "b")


def test_not_a_directory(tmp_path: Path) -> None:
    with pytest.raises(BundleError, match="not a directory"):
        load_bundle(tmp_path / "nothing")


# --------------------------------------------------------------------------------------------------------
# State, assignments, fleet view


def raw_state(topics: wire.Topics, four: wire.Manifest, key: Ed25519PrivateKey) -> dict[str, bytes]:
    return {
        topics.manifest("digits"): wire.sign(four, key).to_json(),
        topics.status("pi1"): make_status("pi1", "fast", var(four, "fp32"), four).to_json(),
        topics.status("pi2"): make_status("pi2").to_json(),
        topics.report("pi1", "digits"): make_report("pi1", four, standard(four)).to_json(),
        topics.report("pi2", "digits"): b"{broken",
        topics.status("pi3"): make_status("pi-other").to_json(),  # device does not match its topic
        "edgefleet/unrelated/topic": b"x",
    }


def test_parse_state_skips_broken_payloads(four: wire.Manifest) -> None:
    key = Ed25519PrivateKey.generate()
    topics = wire.Topics()
    state = parse_state(raw_state(topics, four, key), topics, trusted_keys(key))
    assert set(state.manifests) == {"digits"}
    assert set(state.statuses) == {"pi1", "pi2"}
    assert set(state.reports) == {("pi1", "digits")}
    assert len(state.skipped) == 2
    assert any("pi2" in s for s in state.skipped)
    # an untrusted key: the manifest is skipped, not fatal
    other = parse_state(raw_state(topics, four, key), topics, trusted_keys(Ed25519PrivateKey.generate()))
    assert other.manifests == {}


def test_plan_and_signed_assignment(four: wire.Manifest) -> None:
    key = Ed25519PrivateKey.generate()
    topics = wire.Topics()
    state = parse_state(raw_state(topics, four, key), topics)
    policy = Policy.from_mapping({"classes": {"fast": {"objective": "latency"}}}, name="lab")
    p = plan(state, "digits", policy)
    assert [d.device for d in p.decisions] == ["pi1"]
    assert p.devices_without_report == ["pi2"]
    d = p.decisions[0]
    assert d.variant == "pruned" and d.current == "fp32" and d.changes
    signed = make_assignment(d, key, issued_at=123.0)
    got = wire.verify_signed(wire.Assignment, signed.to_json(), trusted_keys(key))
    assert (got.device, got.model, got.variant, got.sha256) == ("pi1", "digits", "pruned", d.sha256)
    assert got.policy == "lab" and got.reason == d.why and got.manifest_version == 1
    with pytest.raises(StateError, match="no manifest"):
        plan(state, "nomodel", policy)
    table = decisions_table(p.decisions)
    assert "pi1" in table and "pruned" in table and "    fp32: " in table


def test_a_rule_no_variant_can_meet_is_refused_before_planning(four: wire.Manifest) -> None:
    """Host accuracies 0.97, 0.97, 0.95, 0.93: a class asking for 0.98 would keep its devices unchanged."""
    policy = Policy.from_mapping(
        {
            "default": {"max_accuracy_drop": 0.03},
            "classes": {
                "picky": {"min_accuracy": 0.98},
                "lab": {"min_accuracy": 0.98, "accuracy_source": "device"},  # unknown until devices report
            },
        },
        name="lab",
    )
    problems = unreachable_rules(policy, four)
    assert problems == [
        "policy 'lab' classes.picky: no variant of digits v1 meets its accuracy limits (fp32: accuracy 0.97 "
        "< min 0.98; fp16: accuracy 0.97 < min 0.98; int8: accuracy 0.95 < min 0.98; pruned: accuracy drop "
        "4 pts > max 3)"
    ]
    assert unreachable_rules(Policy(), four) == []
    topics = wire.Topics()
    state = parse_state(raw_state(topics, four, Ed25519PrivateKey.generate()), topics)
    with pytest.raises(PolicyError, match=r"classes\.picky"):
        plan(state, "digits", policy)


def test_fleet_rows(four: wire.Manifest) -> None:
    key = Ed25519PrivateKey.generate()
    topics = wire.Topics()
    state = parse_state(raw_state(topics, four, key), topics)
    rows = fleet_rows(state, now=160.0)
    by = {r.device: r for r in rows}
    assert by["pi1"].active == "fp32" and by["pi1"].state == "committed"
    assert by["pi1"].p50_ms == 10.0 and by["pi1"].p99_ms == pytest.approx(13.2)
    assert by["pi1"].report_age_s == 60.0 and by["pi1"].device_class == "fast"
    assert by["pi2"].model is None and by["pi2"].online is True
    text = fleet_table(rows)
    assert "pi1" in text and "60s" in text


# --------------------------------------------------------------------------------------------------------
# CLI basics


def test_schema_writes_seven_files(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["schema", "--out", str(tmp_path / "s")]) == 0
    files = sorted(p.name for p in (tmp_path / "s").iterdir())
    assert len(files) == 7
    assert "manifest.schema.json" in files
    text = (tmp_path / "s" / "assignment.schema.json").read_text()
    assert text.endswith("}\n")
    assert json.loads(text) == wire.json_schemas()["assignment.schema.json"]
    assert text == json.dumps(json.loads(text), indent=2, sort_keys=True, ensure_ascii=False) + "\n"


def test_committed_schemas_are_current(tmp_path: Path) -> None:
    committed = ROOT / "docs" / "schemas"
    if not committed.is_dir():
        pytest.skip("no committed schemas")
    cli.write_schemas(tmp_path)
    for path in tmp_path.iterdir():
        assert json.loads(path.read_text()) == json.loads((committed / path.name).read_text()), path.name


def test_usage_errors_exit_1(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main([]) == 1
    assert cli.main(["select"]) == 1  # --model is required
    assert cli.main(["--help"]) == 0
    capsys.readouterr()


def test_bad_model_id_is_an_expected_error(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["select", "--model", "Bad/Model", "--port", "1"]) == 2
    assert "Traceback" not in capsys.readouterr().err


def test_deploy_modules_never_load_tensorflow() -> None:
    code = (
        "import importlib, pkgutil, sys, deploy\n"
        "for m in pkgutil.iter_modules(deploy.__path__):\n"
        "    if m.name not in ('demo', '__main__'):\n"
        "        importlib.import_module('deploy.' + m.name)\n"
        "from deploy import cli\n"
        "cli.build_parser()\n"
        "bad = sorted(n for n in sys.modules if n.split('.')[0] in ('tensorflow', 'keras', 'tf_keras'))\n"
        "print(' '.join(bad))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=ROOT, check=True
    )
    assert out.stdout.strip() == "", f"deploy loaded {out.stdout.strip()}"


def test_an_error_while_stopping_after_ctrl_c_still_exits_130(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """A signal landing inside a Condition.wait can make the cleanup fail (a lock released twice): the
    user still pressed Ctrl-C, so the exit is 130 with one line, not a traceback and exit 1."""
    import argparse

    def interrupted_then_broken(_args: argparse.Namespace) -> int:
        try:
            raise KeyboardInterrupt
        except KeyboardInterrupt:
            raise RuntimeError("cannot release un-acquired lock") from None

    def broken(_args: argparse.Namespace) -> int:
        raise RuntimeError("a bug")

    parser = argparse.ArgumentParser()
    monkeypatch.setattr(cli, "build_parser", lambda: parser)
    parser.set_defaults(func=interrupted_then_broken)
    assert cli.main([]) == 130
    assert (
        "interrupted (RuntimeError while stopping: cannot release un-acquired lock)"
        in capsys.readouterr().err
    )
    parser.set_defaults(func=broken)
    with pytest.raises(RuntimeError, match="a bug"):  # an error unrelated to Ctrl-C is not hidden
        cli.main([])
