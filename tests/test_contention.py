"""Measurements that say when they are disturbed: the threshold on recorded /proc samples, the wire
fields (old reports still decode), select's ``contended`` constraint, and one real benchmark run against
a CPU hog pinned to the same core (bounded in time), which must come back flagged after its retries."""

from __future__ import annotations

import os
import subprocess
import sys
import time
import tomllib
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from agent_helpers import build_fc_model
from test_deploy import four, make_status, ok_result, one, var  # noqa: F401 - `four` is a fixture

import agent.bench as bench
from agent import contention
from agent.config import BenchConfig, parse_config
from agent.errors import ConfigError
from agent.wire import BenchResult, Contention, Report
from deploy.control.select import Policy, Rule

# Two recorded /proc/stat snapshots 2 s apart on a 4-core board (USER_HZ 100): cpu2 went from 1000 to
# 1190 busy jiffies (1.9 s), cpu3 stayed idle. The benchmark child ran on {2} and used 1.0 s itself.
STAT_BEFORE = """cpu  4000 10 900 90000 50 0 40 0 0 0
cpu0 1000 5 200 22000 10 0 10 0 0 0
cpu1 1000 5 200 22000 10 0 10 0 0 0
cpu2 800 0 150 23000 20 0 50 0 0 0
cpu3 1200 0 350 23000 10 0 10 0 0 0
intr 12345
ctxt 999
"""
STAT_AFTER = """cpu  4300 10 950 90200 50 0 45 0 0 0
cpu0 1010 5 200 22190 10 0 10 0 0 0
cpu1 1010 5 200 22190 10 0 10 0 0 0
cpu2 970 0 165 23010 20 0 55 0 0 0
cpu3 1200 0 350 23200 10 0 10 0 0 0
"""


def _sample(text: str, cores: list[int], wall: float, own: float, inv: int) -> contention.Sample:
    return contention.Sample(
        wall_s=wall,
        busy_ticks=contention.parse_proc_stat(text, cores),
        own_cpu_s=own,
        involuntary=inv,
        freq_khz={c: 1_500_000 for c in cores},
        throttled_raw=None,
    )


def test_proc_stat_busy_time_excludes_idle_and_iowait() -> None:
    busy = contention.parse_proc_stat(STAT_BEFORE, [2, 3, 7])
    assert busy == {2: 800 + 150 + 50, 3: 1200 + 350 + 10}  # user+nice+system+irq+softirq+steal
    assert contention.parse_proc_stat("cpu0 garbage\nnonsense\n", [0]) == {}


def test_a_window_shared_with_another_process_is_disturbed() -> None:
    before = _sample(STAT_BEFORE, [2], wall=10.0, own=5.0, inv=3)
    after = _sample(STAT_AFTER, [2], wall=12.0, own=6.0, inv=503)
    a = contention.assess(before, after, contention.Thresholds(), clock_ticks=100)
    # cpu2 busy 1.9 s, the child 1.0 s: others took 0.9 s of a 2 s window on one core
    assert a.cores == [2] and a.other_cpu_s == pytest.approx(0.9) and a.other_share == pytest.approx(0.45)
    assert a.involuntary_per_s == pytest.approx(250.0) and a.freq_mhz_min == 1500.0
    assert a.disturbed and len(a.why) == 2 and "45%" in a.why[0]


def test_a_quiet_window_passes_and_thresholds_are_what_decide() -> None:
    before = _sample(STAT_BEFORE, [3], wall=10.0, own=5.0, inv=3)
    after = _sample(STAT_AFTER, [3], wall=12.0, own=5.0, inv=13)  # cpu3 stayed idle
    quiet = contention.assess(before, after, contention.Thresholds(), clock_ticks=100)
    assert not quiet.disturbed and quiet.other_share == 0.0 and quiet.why == []
    # the 0.45 share on cpu2 is below a 0.5 threshold and the switch rate below 300/s
    busy_before = _sample(STAT_BEFORE, [2], wall=10.0, own=5.0, inv=3)
    busy_after = _sample(STAT_AFTER, [2], wall=12.0, own=6.0, inv=503)
    lax = contention.Thresholds(max_other_share=0.5, max_involuntary_per_s=300)
    assert not contention.assess(busy_before, busy_after, lax, clock_ticks=100).disturbed
    # jiffies are coarse: the child's own time above the busy time is clamped, not negative
    over = _sample(STAT_AFTER, [3], wall=12.0, own=9.0, inv=3)
    assert contention.assess(before, over, lax, clock_ticks=100).other_cpu_s == 0.0


def test_throttling_reported_by_the_firmware_disturbs_the_window() -> None:
    before = _sample(STAT_BEFORE, [3], wall=10.0, own=5.0, inv=3)
    after = contention.Sample(12.0, before.busy_ticks, 5.0, 3, {}, throttled_raw=0x50005)
    a = contention.assess(before, after, contention.Thresholds(), clock_ticks=100)
    assert a.throttled and a.disturbed and a.freq_mhz_min == 1500.0


def test_report_fields_are_optional_and_round_trip() -> None:
    old = {
        "schema": "edgefleet.report/1",
        "device": "pi1",
        "model": "m",
        "manifest_version": 1,
        "ts": 1.0,
        "results": [
            {
                "variant": "a",
                "sha256": "a" * 64,
                "ok": True,
                "latency_ms": {
                    "count": 1,
                    "mean": 1,
                    "std": 0,
                    "min": 1,
                    "p50": 1,
                    "p90": 1,
                    "p95": 1,
                    "p99": 1,
                    "max": 1,
                },
                "ts": 1.0,
            }
        ],
    }
    report = Report.model_validate(old)  # a report from an agent that predates the fields
    assert report.results[0].contended is None and report.results[0].contention is None
    figures = Contention(
        cores=[0], other_cpu_s=0.5, other_share=0.25, involuntary_switches=9, involuntary_per_s=4.5, retries=2
    )
    r = report.results[0].model_copy(update={"contended": True, "contention": figures})
    assert BenchResult.model_validate_json(r.model_dump_json()) == r
    with pytest.raises(ValueError, match="extra"):
        Contention.model_validate({**figures.model_dump(), "bogus": 1})


def test_select_does_not_rank_on_contended_results(four: object) -> None:  # noqa: F811
    m = four
    res = [
        ok_result(var(m, "fp32"), 10.0).model_copy(update={"contended": True}),  # type: ignore[arg-type]
        ok_result(var(m, "int8"), 3.0),  # type: ignore[arg-type]
    ]
    d = one(m, res)  # type: ignore[arg-type]
    assert d.variant == "int8" and d.lost["fp32"] == "contended"
    assert one(m, res, Policy(default=Rule(reject_contended=False))).variant == "fp32"  # type: ignore[arg-type]
    everything = [r.model_copy(update={"contended": True}) for r in res]
    status = make_status("pi1", active=var(m, "fp16"), manifest=m)  # type: ignore[arg-type]
    kept = one(m, everything, status=status)  # type: ignore[arg-type]
    assert kept.variant is None and "keeping the current variant fp16" in kept.why
    assert "contended" in kept.why and kept.lost["int8"] == "contended"


def test_an_uncontended_run_of_a_thread_sweep_counts_before_a_faster_contended_one(
    four: object,  # noqa: F811
) -> None:
    m = four
    fp32 = var(m, "fp32")  # type: ignore[arg-type]
    res = [
        ok_result(fp32, 2.0, threads=2).model_copy(update={"contended": True}),
        ok_result(fp32, 9.0, threads=1),
    ]
    d = one(m, res, Policy(default=Rule(objective="latency")))  # type: ignore[arg-type]
    assert d.variant == "fp32" and d.chosen.p50_ms == 9.0 and d.chosen.threads == 1


def test_timed_windows_default_to_two_seconds_and_100_runs(tmp_path: Path) -> None:
    cfg = BenchConfig()
    assert cfg.min_seconds >= 2.0 and cfg.min_runs >= 100 and cfg.max_retries == 2
    bench_toml = tomllib.loads(
        "[bench]\nmin_seconds = 0.5\nmin_runs = 20\nmax_retries = 0\nmax_other_share = 0.3\n"
    )
    trust = {"public_keys": ["not checked here"]}
    raw = {"device": {"id": "pi1"}, "trust": trust, "store": {"path": str(tmp_path)}, **bench_toml}
    parsed = parse_config(raw, verify_keys=False).bench
    assert (parsed.min_seconds, parsed.min_runs, parsed.max_retries, parsed.max_other_share) == (
        0.5,
        20,
        0,
        0.3,
    )
    with pytest.raises(ConfigError, match="max_retries"):
        parse_config({**raw, "bench": {"max_retries": -1}}, verify_keys=False)


# ------------------------------------------------------------------------------ a real run against a hog


@pytest.fixture
def one_core() -> Iterator[int]:
    """Pin this process (so the benchmark child it spawns) to one core; restore the affinity after."""
    saved = os.sched_getaffinity(0)
    core = min(saved)
    os.sched_setaffinity(0, {core})
    try:
        yield core
    finally:
        os.sched_setaffinity(0, saved)


def test_a_benchmark_sharing_its_core_with_a_hog_is_flagged_contended(tmp_path: Path, one_core: int) -> None:
    rng = np.random.default_rng(3)
    model = tmp_path / "fc.tflite"
    model.write_bytes(build_fc_model(rng.standard_normal((256, 256)).astype(np.float32), np.zeros(256)))
    # The hog inherits the single-core affinity and ends by itself after 20 s whatever happens here.
    hog = subprocess.Popen([sys.executable, "-c", "import time\nt=time.time()+20\nwhile time.time()<t: pass"])
    try:
        time.sleep(0.2)
        cfg = BenchConfig(warmup_runs=2, min_runs=20, min_seconds=0.3, max_runs=100_000, timeout_s=30)
        variant = bench_variant(model)
        result = bench.benchmark_variant(variant, model, None, cfg, board="test")
    finally:
        hog.kill()
        hog.wait(timeout=10)
    assert result.ok and result.contended is True, result.contention
    figures = result.contention
    assert figures is not None and figures.cores == [one_core] and figures.retries == cfg.max_retries
    assert figures.other_share > cfg.max_other_share and figures.why


def bench_variant(model: Path) -> object:
    from test_agent_bench import variant

    return variant(model)
