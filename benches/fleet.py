"""Fleet side: the collector's report ingest rate, and selection time for a large fleet.

Prints one JSON object on stdout (progress on stderr):

* ``ingest``: ``--devices`` fake devices x ``--reports`` reports each (8 BenchResults per report, as an
  agent sends for 8 variants) published QoS1 on each device's report topic by a separate publisher
  process (one fast paho client, so the publisher is not what is measured) to a private mosquitto,
  while a :class:`deploy.observe.collect.Collector` stores them in SQLite. Measured: reports/s from the first
  report received to the last one committed (target >= 2,000/s); lost = published - rows in
  ``report_history`` (must be 0).
* ``select``: :func:`deploy.control.select.select` over ``--select-devices`` devices x 8 variants, with a
policy
  with constraints and class overrides (one judging on-device accuracy), manifest, reports and statuses
  built in memory (target < 1 s);
  three calls, after a full garbage collection counted with the build.

    python benches/fleet.py [--devices 2000] [--reports 5] [--select-devices 10000]

Bounded: one broker on a free loopback port, one publisher process, one collector thread; every wait has
a timeout and everything started is stopped.
"""

from __future__ import annotations

import gc
import json
import multiprocessing as mp
import os
import platform
import sqlite3
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

# benches/agent.py would shadow the `agent` package: drop this directory from sys.path.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

import paho.mqtt.client as paho  # noqa: E402
import psutil  # noqa: E402
from paho.mqtt.enums import CallbackAPIVersion  # noqa: E402

from agent import wire  # noqa: E402
from deploy.broker.client import BrokerOptions  # noqa: E402
from deploy.broker.spawn import MosquittoBroker  # noqa: E402
from deploy.control.select import Policy, select  # noqa: E402
from deploy.observe.collect import Collector, CollectorOptions  # noqa: E402

MODEL = "kws"
N_VARIANTS = 8


def say(msg: str) -> None:
    print(f"[fleet] {msg}", file=sys.stderr, flush=True)


def make_manifest() -> wire.Manifest:
    variants = []
    for i in range(N_VARIANTS):
        data = f"variant-{i}".encode() * 100
        variants.append(
            wire.Variant(
                id=f"v{i}",
                file=f"v{i}.tflite",
                quantization="none" if i == 0 else "int8",
                inputs=[wire.TensorSpec(name="x", shape=[1, 49, 10], dtype="float32")],
                outputs=[wire.TensorSpec(name="y", shape=[1, 12], dtype="float32")],
                metrics=wire.HostMetrics(
                    size_bytes=len(data), accuracy=0.95 - 0.01 * i, agreement=1.0 - 0.005 * i
                ),
                min_runtime=("2.16", None, "2.19.0", None)[i % 4],  # 2.19 excludes litert 1.x
                **wire.blob_fields(data),
            )
        )
    return wire.Manifest(model=MODEL, version=3, created_at=1.0, baseline="v0", variants=variants)


def make_report(device: str, manifest: wire.Manifest, n: int, ts: float) -> wire.Report:
    results = []
    for j, v in enumerate(manifest.variants):
        p50 = 5.0 + ((n * 7 + j * 13) % 40) / 2
        p95, p99 = p50 * 1.3, p50 * 1.6
        results.append(
            wire.BenchResult(
                variant=v.id,
                sha256=v.sha256,
                ok=True,
                runtime=wire.RuntimeInfo(name="ai-edge-litert", version="1.2.0"),
                threads=1 + j % 2,
                warmup_runs=10,
                duration_s=5.0,
                latency_ms=wire.LatencyStats(
                    count=200,
                    mean=p50 * 1.05,
                    std=0.4,
                    min=p50 * 0.9,
                    p50=p50,
                    p90=p95 * 0.95,
                    p95=p95,
                    p99=p99,
                    max=p99 * 1.2,
                ),
                init_ms=12.5,
                first_inference_ms=p50 * 2,
                peak_rss_bytes=(40 + j * 3) * 1024 * 1024,
                cpu_util=0.98,
                temperature_c_before=48.0,
                temperature_c_after=52.5,
                throttled=False,
                energy=wire.Energy(
                    method=wire.EnergyMethod.MODEL,
                    measured=False,
                    mj_per_inference=p50 * 0.4,
                    avg_power_w=3.1,
                ),
                accuracy=0.94 - 0.01 * j,
                agreement=0.99,
                ts=ts,
            )
        )
    return wire.Report(device=device, model=MODEL, manifest_version=manifest.version, ts=ts, results=results)


def make_status(device: str, n: int, manifest: wire.Manifest) -> wire.Status:
    active = wire.ActiveVariant(
        variant="v0", sha256=manifest.variants[0].sha256, manifest_version=2, activated_at=1.0
    )
    return wire.Status(
        device=device,
        online=True,
        ts=1.0,
        runtime=wire.RuntimeInfo(name="ai-edge-litert", version="1.2.0"),
        device_class=("fast", "small", "plain")[n % 3],
        models={MODEL: wire.ModelStatus(state=wire.ModelState.REPORTED, manifest_version=3, active=active)},
    )


POLICY = {
    "name": "bench",
    "default": {"objective": "accuracy", "max_accuracy_drop": 0.05, "max_p95_ms": 25.0},
    "classes": {
        "fast": {"objective": "latency", "max_p95_ms": 20.0},
        "small": {"objective": "energy", "max_peak_rss_mb": 55, "accuracy_source": "device"},
    },
}


# ------------------------------------------------------------------------------------------ ingest


def _publisher(port: int, topics_ns: str, devices: int, reports: int, ready: Any, go: Any, done: Any) -> None:
    """A separate process: build every payload first, then publish them QoS1 as fast as the broker acks."""
    manifest = make_manifest()
    topics = wire.Topics(topics_ns)
    msgs = []
    for r in range(reports):
        for d in range(devices):
            dev = f"dev-{d:05d}"
            msgs.append((topics.report(dev, MODEL), make_report(dev, manifest, d + r, 1000.0 + r).to_json()))
    client = paho.Client(CallbackAPIVersion.VERSION2, client_id="bench-fleet-publisher", protocol=paho.MQTTv5)
    client.max_inflight_messages_set(200)
    window = threading.Semaphore(400)  # bounded memory in paho's queue
    acked = [0]
    all_acked = threading.Event()

    def on_publish(*_a: Any) -> None:
        acked[0] += 1
        window.release()
        if acked[0] >= len(msgs):
            all_acked.set()

    client.on_publish = on_publish
    client.connect("127.0.0.1", port)
    client.loop_start()
    try:
        size = statistics.mean(len(p) for _, p in msgs[:100])
        ready.put(("ready", len(msgs), size))
        if not go.wait(60):
            return
        t0 = time.monotonic()
        for topic, payload in msgs:
            if not window.acquire(timeout=30):
                done.put(("error", "no acknowledgement for 30 s"))
                return
            info = client.publish(topic, payload, qos=1)
            if info.rc != paho.MQTT_ERR_SUCCESS:
                done.put(("error", f"publish rc {info.rc}"))
                return
        if not all_acked.wait(60):
            done.put(("error", f"{acked[0]} of {len(msgs)} acknowledged"))
            return
        done.put(("done", len(msgs), time.monotonic() - t0))
    finally:
        client.disconnect()
        client.loop_stop()


def ingest(
    devices: int, reports: int, timeout_s: float, options: dict[str, Any] | None = None
) -> dict[str, Any]:
    out: dict[str, Any] = {
        "devices": devices,
        "reports_per_device": reports,
        "results_per_report": N_VARIANTS,
    }
    ctx = mp.get_context("fork")  # forked before any thread of ours starts
    with tempfile.TemporaryDirectory(prefix="edgefleet-fleet-") as tmp, MosquittoBroker() as broker:
        opts = BrokerOptions(host=broker.host, port=broker.port)
        ready_q: Any = ctx.Queue()
        done_q: Any = ctx.Queue()
        go = ctx.Event()
        pub = ctx.Process(
            target=_publisher,
            args=(broker.port, opts.namespace, devices, reports, ready_q, go, done_q),
            daemon=True,
        )
        pub.start()
        db = Path(tmp) / "fleet.db"
        collector = Collector(opts, db, CollectorOptions(**{"name": "bench", **(options or {})}))
        ready = threading.Event()
        thread = threading.Thread(target=collector.run, kwargs={"duration_s": timeout_s + 60, "ready": ready})
        thread.start()
        try:
            if not ready.wait(15):
                out["error"] = "collector did not subscribe"
                return out
            _ready, total, size = ready_q.get(timeout=120)
            out["reports"] = total
            out["payload_bytes_mean"] = round(size)
            say(f"publishing {total} reports (~{size / 1024:.1f} KiB each)")
            procs = {
                "collector": psutil.Process(),
                "publisher": psutil.Process(pub.pid),
                "broker": psutil.Process(broker.pid),
            }
            cpu0 = {k: sum(p.cpu_times()[:2]) for k, p in procs.items()}
            go.set()
            t_go = time.monotonic()
            first = last = None
            deadline = t_go + timeout_s
            while time.monotonic() < deadline:
                with collector._lock:
                    received, stored = collector.stats.received, collector.stats.stored
                now = time.monotonic()
                if first is None and received > 0:
                    first = now
                if stored + collector.stats.duplicates >= total:
                    last = now
                    out["cpu_seconds"] = {
                        k: round(sum(p.cpu_times()[:2]) - cpu0[k], 2) for k, p in procs.items()
                    }
                    break
                time.sleep(0.005)
            pub_result = done_q.get(timeout=60)
        finally:
            collector.stop()
            thread.join(30)
            pub.join(10)
            if pub.is_alive():
                pub.kill()
                pub.join(5)
        s = collector.stats
        with sqlite3.connect(db) as conn:
            history = conn.execute("SELECT count(*) FROM report_history").fetchone()[0]
            latest = conn.execute("SELECT count(*) FROM reports").fetchone()[0]
        out.update(
            stored=s.stored,
            duplicates=s.duplicates,
            malformed=s.malformed,
            overflow=s.overflow,
            connects=s.connects,
            store_errors=s.store_errors,
            history_rows=history,
            latest_rows=latest,
            lost=out["reports"] - history,
        )
        try:
            log_lines = broker.log_path.read_text(errors="replace").splitlines()
        except OSError:
            log_lines = []
        out["broker_log"] = [ln for ln in log_lines if "bench" in ln or "rror" in ln or "arning" in ln][-8:]
        if pub_result[0] == "done":
            out["publisher_reports_per_s"] = round(pub_result[1] / pub_result[2])
        else:
            out["publisher_error"] = pub_result[1]
        if last is None:
            out["error"] = f"not all stored within {timeout_s:g} s"
        else:
            out["seconds_go_to_all_stored"] = round(last - t_go, 3)
            out["reports_per_s"] = round(out["reports"] / (last - t_go))
            out["target_met"] = out["reports_per_s"] >= 2000 and out["lost"] == 0
    return out


# ------------------------------------------------------------------------------------------ select


def selection(n: int, repeats: int = 3) -> dict[str, Any]:
    manifest = make_manifest()
    t0 = time.monotonic()
    reports = {f"dev-{d:05d}": make_report(f"dev-{d:05d}", manifest, d, 1000.0) for d in range(n)}
    statuses = {f"dev-{d:05d}": make_status(f"dev-{d:05d}", d, manifest) for d in range(n)}
    policy = Policy.from_mapping(POLICY)
    build = time.monotonic() - t0
    # Building ~1M tracked objects leaves the garbage collector a full collection to do (0.3-0.8 s here):
    # pay it now, with the build, so that it does not land inside whichever select call comes first.
    t0 = time.monotonic()
    gc.collect()
    gc_after_build = time.monotonic() - t0
    times = []
    decisions: list[Any] = []
    for _ in range(repeats):
        t = time.monotonic()
        decisions = select(manifest, reports, statuses, policy)
        times.append(time.monotonic() - t)
    chosen: dict[str, int] = {}
    for dec in decisions:
        chosen[str(dec.variant)] = chosen.get(str(dec.variant), 0) + 1
    return {
        "devices": n,
        "variants": N_VARIANTS,
        "build_seconds": round(build, 2),
        "gc_after_build_seconds": round(gc_after_build, 2),
        "select_seconds": [round(x, 3) for x in times],
        "select_seconds_best": round(min(times), 3),
        "decisions": len(decisions),
        "chosen": dict(sorted(chosen.items())),
        "target_met": min(times) < 1.0,
    }


def main() -> int:
    from agent.argparsing import StrictParser  # exact flags, a suggestion for a typo

    parser = StrictParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--devices", type=int, default=2000, help="fake devices publishing (default 2000)")
    parser.add_argument("--reports", type=int, default=5, help="reports per device (default 5)")
    parser.add_argument(
        "--select-devices", type=int, default=10000, help="devices for select (default 10000)"
    )
    parser.add_argument("--timeout", type=float, default=120.0, help="ingest time limit, s (default 120)")
    args = parser.parse_args()
    out: dict[str, Any] = {
        "bench": "fleet",
        "machine": {"cpus": os.cpu_count(), "loadavg": os.getloadavg(), "python": platform.python_version()},
    }
    out["ingest"] = ingest(args.devices, args.reports, args.timeout)
    say("selection")
    out["select"] = selection(args.select_devices)
    print(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
