"""The benchmark runner against real .tflite files, and every failure code from a real failure.

The models are built here with ``flatbuffers`` (a FULLY_CONNECTED layer with known weights, or the same graph
with a CUSTOM op), so the expected predictions are plain numpy and no TensorFlow is needed.
"""

from __future__ import annotations

import base64
import io
import json
import signal
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from agent_helpers import RecordingClient, build_fc_model
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

import agent.bench as bench
from agent.board import PROFILES
from agent.config import BenchConfig, parse_config
from agent.energy import EnergyConfig, EnergyMeter
from agent.thermal import ThermalConfig, ThrottleState, throttled_during
from agent.wire import (
    BenchError,
    BlobRef,
    EnergyMethod,
    HostMetrics,
    Manifest,
    RuntimeInfo,
    TensorSpec,
    Variant,
    blob_fields,
)

FAST = BenchConfig(warmup_runs=2, min_runs=20, min_seconds=0.05, max_runs=100_000, timeout_s=30)
N_IN, N_OUT, ROWS = 8, 3, 40

# ------------------------------------------------------------------------------------ model builder


class Models:
    def __init__(self, root: Path) -> None:
        rng = np.random.default_rng(7)
        self.w1 = rng.standard_normal((N_OUT, N_IN)).astype(np.float32)
        self.b1 = rng.standard_normal(N_OUT).astype(np.float32)
        self.w2 = self.w1 + 0.8 * rng.standard_normal((N_OUT, N_IN)).astype(np.float32)
        self.x = rng.standard_normal((ROWS, N_IN)).astype(np.float32)
        self.pred1 = np.argmax(self.x @ self.w1.T + self.b1, axis=1)
        self.pred2 = np.argmax(self.x @ self.w2.T + self.b1, axis=1)
        self.y = self.pred1.astype(np.int64)  # labels the baseline gets all right
        self.fc = root / "fc.tflite"
        self.fc.write_bytes(build_fc_model(self.w1, self.b1))
        self.fc2 = root / "fc2.tflite"
        self.fc2.write_bytes(build_fc_model(self.w2, self.b1))
        self.custom = root / "custom.tflite"
        self.custom.write_bytes(build_fc_model(self.w1, self.b1, custom_op="EdgefleetSecretOp"))
        self.garbage = root / "garbage.tflite"
        self.garbage.write_bytes(np.random.default_rng(1).bytes(3000))
        buf = io.BytesIO()
        np.savez(buf, x=self.x, y=self.y)
        self.sample_bytes = buf.getvalue()
        self.sample = root / "sample.npz"
        self.sample.write_bytes(self.sample_bytes)


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> Models:
    return Models(tmp_path_factory.mktemp("bench-models"))


def variant(
    path: Path, vid: str = "float32", *, accuracy: float | None = None, min_runtime: str | None = None
) -> Variant:
    data = path.read_bytes()
    return Variant(
        id=vid,
        file=f"{vid}.tflite",
        quantization="none",
        inputs=[TensorSpec(name="x", shape=[1, N_IN], dtype="float32")],
        outputs=[TensorSpec(name="y", shape=[1, N_OUT], dtype="float32")],
        metrics=HostMetrics(size_bytes=len(data), accuracy=accuracy),
        min_runtime=min_runtime,
        **blob_fields(data, 1024),
    )


# ------------------------------------------------------------------------------------ the happy path


def test_benchmark_reports_method_figures(models: Models) -> None:
    run = bench.measure_variant(
        variant(models.fc, accuracy=1.0), models.fc, models.sample, FAST, board="test", is_baseline=True
    )
    r = run.result
    assert r.ok, r.error_detail
    lat = r.latency_ms
    assert lat is not None and lat.count >= FAST.min_runs
    assert lat.min <= lat.p50 <= lat.p90 <= lat.p95 <= lat.p99 <= lat.max and lat.std >= 0
    assert r.duration_s is not None and r.duration_s >= FAST.min_seconds
    assert r.warmup_runs == 2 and r.threads == 1
    assert r.init_ms is not None and r.first_inference_ms is not None and r.init_ms > 0
    assert r.peak_rss_bytes is not None and r.peak_rss_bytes > 10 * 2**20
    assert r.cpu_util is not None and 0 < r.cpu_util <= 1.5
    assert r.runtime is not None and r.runtime.name == "ai-edge-litert"
    assert r.accuracy == 1.0 and r.agreement == 1.0
    assert run.predictions == models.pred1.tolist()
    assert r.energy is not None and r.energy.method is EnergyMethod.MODEL and r.energy.measured is False
    assert r.energy.mj_per_inference == pytest.approx(
        r.energy.avg_power_w * r.duration_s / lat.count * 1000, rel=1e-6
    )


def test_agreement_is_against_the_baseline_on_this_device(models: Models) -> None:
    expected = float(np.mean(models.pred1 == models.pred2))
    assert 0 < expected < 1  # the fixture's second model really disagrees sometimes
    run = bench.measure_variant(
        variant(models.fc2, "perturbed", accuracy=expected),
        models.fc2,
        models.sample,
        FAST,
        board="test",
        baseline_predictions=models.pred1.tolist(),
    )
    assert run.result.ok, run.result.error_detail
    assert run.result.agreement == pytest.approx(expected)
    assert run.result.accuracy == pytest.approx(expected)  # y = the baseline's predictions
    no_baseline = bench.measure_variant(variant(models.fc2, "p"), models.fc2, models.sample, FAST, board="t")
    assert no_baseline.result.agreement is None and no_baseline.result.accuracy is not None


def test_thread_sweep_resolves_all() -> None:
    cfg = BenchConfig(threads=[1, "all", 0, 4])
    assert cfg.thread_counts(4) == [1, 4]
    assert cfg.thread_counts(2) == [1, 2, 4]
    with pytest.raises(ValueError, match="threads"):
        BenchConfig(threads=[-1])


def test_two_threads_are_reported(models: Models) -> None:
    r = bench.benchmark_variant(variant(models.fc), models.fc, None, FAST, board="test", threads=2)
    assert r.ok and r.threads == 2 and r.accuracy is None and r.agreement is None


# ------------------------------------------------------------------------------------ failure codes


def test_garbage_is_load_error(models: Models) -> None:
    r = bench.benchmark_variant(variant(models.garbage), models.garbage, None, FAST, board="test")
    assert not r.ok and r.error is BenchError.LOAD_ERROR and r.latency_ms is None


def test_custom_op_is_unsupported_op(models: Models) -> None:
    r = bench.benchmark_variant(variant(models.custom), models.custom, None, FAST, board="test")
    assert not r.ok and r.error is BenchError.UNSUPPORTED_OP
    assert r.error_detail is not None and "EdgefleetSecretOp" in r.error_detail


def test_endless_run_is_killed_as_run_timeout(models: Models) -> None:
    cfg = FAST.model_copy(update={"min_seconds": 60.0, "max_runs": 10**9, "timeout_s": 1.5})
    t0 = time.monotonic()
    r = bench.benchmark_variant(variant(models.fc), models.fc, None, cfg, board="test")
    assert not r.ok and r.error is BenchError.RUN_TIMEOUT
    assert time.monotonic() - t0 < 10


def test_tiny_memory_limit_is_oom(models: Models) -> None:
    cfg = FAST.model_copy(update={"memory_limit_mb": 64})
    r = bench.benchmark_variant(variant(models.fc), models.fc, models.sample, cfg, board="test")
    assert not r.ok and r.error is BenchError.OOM, r.error_detail


def test_child_killed_by_a_signal_is_crash(models: Models, monkeypatch: pytest.MonkeyPatch) -> None:
    real = bench.run_child

    def crashing(request: dict[str, Any], *args: Any, **kwargs: Any) -> bench.ChildOutcome:
        return real({**request, "test_crash_signal": int(signal.SIGSEGV)}, *args, **kwargs)

    monkeypatch.setattr(bench, "run_child", crashing)
    r = bench.benchmark_variant(variant(models.fc), models.fc, None, FAST, board="test")
    assert not r.ok and r.error is BenchError.CRASH
    assert r.error_detail is not None and "SIGSEGV" in r.error_detail


def test_accuracy_far_from_the_host_is_a_mismatch(models: Models) -> None:
    # The device scores 1.0 on the sample; a host figure of 0.6 means the two disagree about the model.
    r = bench.benchmark_variant(variant(models.fc, accuracy=0.6), models.fc, models.sample, FAST, board="t")
    assert not r.ok and r.error is BenchError.ACCURACY_MISMATCH
    assert r.latency_ms is not None and r.accuracy == 1.0  # the figures are still reported
    close = FAST.model_copy(update={"accuracy_tolerance": 0.5})
    assert bench.benchmark_variant(variant(models.fc, accuracy=0.6), models.fc, models.sample, close).ok


def test_runtime_too_old_is_not_run(models: Models, monkeypatch: pytest.MonkeyPatch) -> None:
    def no_child(*_a: Any, **_k: Any) -> bench.ChildOutcome:
        raise AssertionError("a variant the runtime cannot run must not reach the child")

    monkeypatch.setattr(bench, "run_child", no_child)
    old = RuntimeInfo(name="tflite-runtime", version="2.14.0")
    r = bench.benchmark_variant(
        variant(models.fc, min_runtime="2.20.0"), models.fc, None, FAST, board="t", runtime=old
    )
    assert not r.ok and r.error is BenchError.RUNTIME_TOO_OLD
    assert r.error_detail is not None and "2.20.0" in r.error_detail and "2.14.0" in r.error_detail


# ------------------------------------------------------------------------------------ energy and heat


class ConstantPower:
    method = EnergyMethod.HWMON
    sensor = "test ina219 power1_input"
    measured = True
    counter = False

    def __init__(self, watts: float) -> None:
        self.watts = watts
        self.reads = 0

    def read_power_w(self) -> float:
        self.reads += 1
        return self.watts

    def read_energy_j(self) -> float:
        raise NotImplementedError


def test_measured_energy_uses_the_child_loop_window(models: Models) -> None:
    backend = ConstantPower(4.0)
    cfg = EnergyConfig(kind="hwmon", interval_s=0.01, idle_seconds=0.05)
    meter = EnergyMeter(backend, PROFILES["pi5"], 4, cfg)
    r = bench.benchmark_variant(
        variant(models.fc), models.fc, None, FAST.model_copy(update={"min_seconds": 0.2}), meter=meter
    )
    assert r.ok and r.energy is not None and r.latency_ms is not None and r.duration_s is not None
    e = r.energy
    assert e.method is EnergyMethod.HWMON and e.measured is True and e.sensor == backend.sensor
    assert e.avg_power_w == pytest.approx(4.0) and e.idle_power_w == pytest.approx(4.0)
    assert e.samples >= 5  # 0.2 s at 10 ms, on a loaded 2-core machine
    assert e.mj_per_inference == pytest.approx(4.0 * r.duration_s / r.latency_ms.count * 1000)


def test_throttling_during_a_run() -> None:
    clean, now_bits, sticky = (ThrottleState.decode(v) for v in (0x0, 0x4, 0x40000))
    assert throttled_during(None, None) is None
    assert throttled_during(clean, clean) is False
    assert throttled_during(clean, now_bits) is True
    assert throttled_during(now_bits, clean) is True
    assert throttled_during(clean, sticky) is True  # came and went during the run
    assert throttled_during(sticky, sticky) is False  # happened before the run


def _fake_child(monkeypatch: pytest.MonkeyPatch) -> None:
    data = {"ok": True, "latencies_ms": [1.0, 2.0], "duration_s": 0.003, "cpu_util": 1.0, "threads": 1}
    monkeypatch.setattr(bench, "run_child", lambda *a, **k: bench.ChildOutcome(dict(data), None, None, 0.1))


def test_heat_is_read_around_the_run_and_cool_down_waits(
    models: Models, monkeypatch: pytest.MonkeyPatch
) -> None:
    _fake_child(monkeypatch)
    temps: Iterator[float] = iter([80.0, 75.0, 60.0, 61.0, 66.0])
    throttles = iter([ThrottleState.decode(0), ThrottleState.decode(0x20002)])
    read_temp: Callable[[], float | None] = lambda: next(temps)  # noqa: E731
    thermal = ThermalConfig(cool_below_c=70.0, cool_timeout_s=5.0, poll_s=0.01)
    r = bench.measure_variant(
        variant(models.fc),
        models.fc,
        None,
        FAST,
        board="t",
        thermal=thermal,
        read_temp=read_temp,
        read_throttle=lambda: next(throttles),
    ).result
    assert r.ok and r.temperature_c_before == 61.0 and r.temperature_c_after == 66.0 and r.throttled is True


# ------------------------------------------------------------------------------------ the daemon


def test_daemon_runs_the_baseline_first_and_skips_what_it_cannot_run(models: Models, tmp_path: Path) -> None:
    from agent.daemon import Agent

    key = Ed25519PrivateKey.generate().public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)
    cfg = parse_config(
        {
            "device": {"id": "pi"},
            "trust": {"public_keys": [base64.b64encode(key).decode()]},
            "store": {"path": str(tmp_path / "s")},
            "bench": FAST.model_dump(),
            "thermal": {"cool_below_c": None},
        }
    )
    client = RecordingClient()
    agent_obj = Agent(cfg, client=client)  # type: ignore[arg-type]
    assert agent_obj.meter.backend.method is EnergyMethod.MODEL  # no sensor on the test machine
    agreement = float(np.mean(models.pred1 == models.pred2))
    sample_ref = BlobRef(**blob_fields(models.sample_bytes, 1024))
    base = variant(models.fc, "float32", accuracy=1.0).model_copy(update={"sample": sample_ref})
    other = variant(models.fc2, "int8", accuracy=agreement).model_copy(update={"sample": sample_ref})
    future = variant(models.fc, "future", min_runtime="99.0")
    for v in (base, other, future):
        path = agent_obj.store.blob_path(v.sha256)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes((models.fc2 if v is other else models.fc).read_bytes())
    agent_obj.store.blob_path(sample_ref.sha256, "npz").write_bytes(models.sample_bytes)
    manifest = Manifest.model_construct(model="m", version=1, baseline="float32")
    report = agent_obj.benchmark_and_report("m", manifest, [other, future, base])
    by_id = {r.variant: r for r in report.results}
    assert [r.variant for r in report.results] == ["float32", "int8", "future"]  # baseline first
    assert by_id["float32"].agreement == 1.0
    assert by_id["int8"].ok and by_id["int8"].agreement == pytest.approx(agreement)
    assert by_id["future"].error is BenchError.RUNTIME_TOO_OLD
    events = [json.loads(p) for t, p in client.published if t.endswith("/events")]
    skipped = [e for e in events if e["kind"] == "skipped"]
    assert (
        len(skipped) == 1 and skipped[0]["variant"] == "future" and skipped[0]["reason"] == "RUNTIME_TOO_OLD"
    )
    assert any(t == agent_obj.topics.report("pi", "m") for t, _ in client.published)


def test_stop_interrupts_cool_down() -> None:
    stop = threading.Event()
    stop.set()
    from agent.thermal import CoolOutcome, wait_until_cool

    assert wait_until_cool(50.0, 60.0, stop, read_temp=lambda: 90.0, poll_s=10.0) is CoolOutcome.STOPPED
