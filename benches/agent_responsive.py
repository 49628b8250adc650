"""Ping round-trip while the agent benchmarks or health-checks: the main loop must not wait for either.
Prints ONE JSON object.

    python benches/agent_responsive.py [--bench-seconds 60] [--health-inferences 8000] [--ping-every 0.5]
                                       [--timeout 600]

A private mosquitto on a free loopback port and a real agent subprocess (``python -m agent``), both
stopped by PID at the end. The model is a ~58 M-MAC CNN (1-4 ms per inference; made once with
TensorFlow in a subprocess and cached, see ``benches/agent.py``), benchmarked with a timed window of
``--bench-seconds`` (one window: contention retries off, so the benchmark lasts about that long).

* idle: ping round-trips before any work and again at the end (``idle_after``): the floor of the
  method (broker, signing, JSON);
* during: from the moment the status says ``benchmarking`` and a benchmark child runs until the report
  arrives, a signed ping every ``--ping-every`` seconds, each waited for (10 s bound); the round-trip of
  each, and whether a benchmark child was alive when its pong came back;
* cancel: a rebenchmark, then a ``cancel`` command once its child runs: time to the ack and until the
  child is gone;
* during_health_check: an assignment of the measured variant, then from the moment its health-check
  child runs (``health.inferences = --health-inferences`` inferences of the same CNN: seconds) until the
  model is committed, a signed ping every ``--ping-every`` seconds; ``health_check_s`` is how long the
  check's child ran.

Floor: the max ping round-trip during the benchmark and during the health check under 1 s (``max_ok``).
Before the daemon split the loop answered nothing until the report (the whole benchmark); before the
health check moved to its own thread, nothing until the check ended.
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import importlib.util
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

# this file is in benches/: drop its directory from sys.path so `import agent` finds the package
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

import paho.mqtt.client as paho  # noqa: E402
import psutil  # noqa: E402
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey  # noqa: E402
from paho.mqtt.enums import CallbackAPIVersion  # noqa: E402

from agent.bench import percentile  # noqa: E402
from agent.wire import (  # noqa: E402
    Assignment,
    Command,
    CommandAction,
    HostMetrics,
    Manifest,
    TensorSpec,
    Topics,
    Variant,
    blob_fields,
    iter_chunks,
    sign,
)
from deploy.broker.spawn import MosquittoBroker  # noqa: E402

DEVICE, MODEL, CHUNK = "bench-pi", "busy", 64 * 1024


def _bench_agent_module() -> Any:
    """benches/agent.py (its cached TensorFlow model generator), loaded by path: `agent` is the package."""
    spec = importlib.util.spec_from_file_location("bench_agent", Path(__file__).with_name("agent.py"))
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class Watch:
    """Every message on the device's topics, latest per topic, and a condition to wait on."""

    def __init__(self, host: str, port: int) -> None:
        self.cond = threading.Condition()
        self.latest: dict[str, bytes] = {}
        self.events: list[dict[str, Any]] = []
        self.client = paho.Client(callback_api_version=CallbackAPIVersion.VERSION2, client_id="bench-watch")
        self.client.on_message = self._on_message
        self.client.connect(host, port)
        self.client.subscribe(f"{Topics().ns}/devices/#", 1)
        self.client.loop_start()

    def _on_message(self, _c: Any, _u: Any, msg: paho.MQTTMessage) -> None:
        with self.cond:
            payload = bytes(msg.payload)
            self.latest[msg.topic] = payload
            if msg.topic.endswith("/events"):
                self.events.append(json.loads(payload))
            self.cond.notify_all()

    def wait(self, pred: Any, timeout: float) -> Any:
        deadline = time.monotonic() + timeout
        with self.cond:
            while True:
                got = pred()
                if got:
                    return got
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError("timed out waiting for the agent")
                self.cond.wait(min(left, 0.5))

    def publish(self, topic: str, payload: bytes, retain: bool = True) -> None:
        self.client.publish(topic, payload, qos=1, retain=retain).wait_for_publish(10)

    def model_state(self) -> str | None:
        raw = self.latest.get(Topics().status(DEVICE))
        if raw is None:
            return None
        rec = json.loads(raw).get("models", {}).get(MODEL) or {}
        state = rec.get("state")
        return str(state) if state is not None else None

    def event(self, cid: str) -> dict[str, Any] | None:
        return next((e for e in self.events if e.get("correlation_id") == cid), None)

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def bench_children(pid: int) -> int:
    n = 0
    for child in psutil.Process(pid).children(recursive=True):
        try:
            n += "agent.bench_child" in " ".join(child.cmdline())
        except psutil.Error:
            continue
    return n


def stats(rtts: list[float]) -> dict[str, Any]:
    s = sorted(rtts)
    return {
        "count": len(s),
        "p50_ms": round(percentile(s, 50) * 1000, 1),
        "p95_ms": round(percentile(s, 95) * 1000, 1),
        "max_ms": round(s[-1] * 1000, 1),
    }


def main() -> int:
    from agent.argparsing import StrictParser  # exact flags, a suggestion for a typo

    ap = StrictParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bench-seconds", type=float, default=60.0, help="the benchmark's timed window")
    ap.add_argument("--health-inferences", type=int, default=8000, help="health.inferences of the agent")
    ap.add_argument("--ping-every", type=float, default=0.5)
    ap.add_argument("--timeout", type=float, default=600.0, help="bound for each wait")
    args = ap.parse_args()

    fdir = _bench_agent_module().fidelity_models()
    data = (fdir / "float32.tflite").read_bytes()
    var = Variant(
        id="float32",
        file="float32.tflite",
        quantization="none",
        inputs=[TensorSpec(name="x", shape=[1, 64, 64, 3], dtype="float32")],
        outputs=[TensorSpec(name="y", shape=[1, 2], dtype="float32")],
        metrics=HostMetrics(size_bytes=len(data)),
        **blob_fields(data, CHUNK),
    )
    key = Ed25519PrivateKey.generate()
    pub = base64.b64encode(key.public_key().public_bytes_raw()).decode()
    topics = Topics()
    work = Path(tempfile.mkdtemp(prefix="edgefleet-bench-responsive-"))
    seq = iter(range(1_000_000))

    def command(action: CommandAction, model: str | None = None) -> tuple[str, bytes]:
        cid = f"{action.value}{next(seq)}"
        cmd = Command(id=cid, device=DEVICE, action=action, model=model, issued_at=time.time())
        return cid, sign(cmd, key).to_json()

    result: dict[str, Any] = {
        "machine": {
            "platform": platform.platform(),
            "python": platform.python_version(),
            "cpu_count": os.cpu_count(),
            "loadavg_before": [round(v, 2) for v in os.getloadavg()],
        },
        "bench_seconds": args.bench_seconds,
        "floor_max_ms": 1000,
    }
    with MosquittoBroker() as broker:
        cfg = work / "agent.toml"
        cfg.write_text(
            f'[device]\nid = "{DEVICE}"\n[mqtt]\nhost = "{broker.host}"\nport = {broker.port}\n'
            f'[trust]\npublic_keys = ["{pub}"]\n[store]\npath = "{work / "store"}"\nmin_free_mb = 1\n'
            f"[bench]\nthreads = [1]\nwarmup_runs = 5\nmin_runs = 100\nmin_seconds = {args.bench_seconds}\n"
            f"max_runs = 100000000\ntimeout_s = {4 * args.bench_seconds + 120}\nmax_retries = 0\n"
            f"[health]\ninferences = {args.health_inferences}\ntimeout_s = {args.timeout}\n"
            "probation_s = 0.5\n"
            "[telemetry]\ninterval_s = 60\n",
            encoding="utf-8",
        )
        watch = Watch(broker.host, broker.port)
        proc = subprocess.Popen(
            [sys.executable, "-m", "agent", "--config", str(cfg), "--log-level", "warning"],
            stderr=subprocess.DEVNULL,
        )

        def ping() -> float:
            cid, payload = command(CommandAction.PING)
            t0 = time.monotonic()
            watch.publish(topics.cmd(DEVICE), payload, retain=False)
            watch.wait(lambda: watch.event(cid), 10.0)
            return time.monotonic() - t0

        def spaced_pings(n: int) -> list[float]:
            # spaced like the pings during the benchmark: back-to-back pings measure this client's
            # Nagle/delayed-ACK interplay (~45 ms here), not the agent
            out = []
            for _ in range(n):
                out.append(ping())
                time.sleep(args.ping_every)
            return out

        try:
            status = topics.status(DEVICE)
            watch.wait(lambda: b'"online":true' in watch.latest.get(status, b""), args.timeout)
            result["idle"] = stats(spaced_pings(10))

            sha = hashlib.sha256(data).hexdigest()
            for i, chunk in enumerate(iter_chunks(data, CHUNK)):
                watch.publish(topics.blob(sha, i), chunk)
            manifest = Manifest(
                model=MODEL, version=1, created_at=time.time(), baseline="float32", variants=[var]
            )
            watch.publish(topics.manifest(MODEL), sign(manifest, key).to_json())
            watch.wait(lambda: watch.model_state() == "benchmarking", args.timeout)
            deadline = time.monotonic() + args.timeout
            while not bench_children(proc.pid):
                if time.monotonic() > deadline:
                    raise TimeoutError("no benchmark child")
                time.sleep(0.05)
            t_bench = time.monotonic()
            report_topic = topics.report(DEVICE, MODEL)
            during: list[float] = []
            child_alive = 0
            while report_topic not in watch.latest:
                if time.monotonic() - t_bench > args.timeout:
                    raise TimeoutError("no report")
                t0 = time.monotonic()
                during.append(ping())
                child_alive += bench_children(proc.pid) > 0
                time.sleep(max(0.0, args.ping_every - (time.monotonic() - t0)))
            result["benchmark_s"] = round(time.monotonic() - t_bench, 1)
            result["during_benchmark"] = {
                **stats(during),
                "pongs_with_child_alive": child_alive,
                "max_ok": max(during) < 1.0,
            }

            # cancel: a rebenchmark, then a cancel command once its child runs
            watch.wait(lambda: watch.model_state() == "reported", args.timeout)
            _, payload = command(CommandAction.REBENCHMARK, MODEL)
            watch.publish(topics.cmd(DEVICE), payload, retain=False)
            watch.wait(lambda: watch.model_state() == "benchmarking", args.timeout)
            while not bench_children(proc.pid):
                time.sleep(0.05)
            time.sleep(2.0)  # inside the timed window
            cid, payload = command(CommandAction.CANCEL, MODEL)
            t0 = time.monotonic()
            watch.publish(topics.cmd(DEVICE), payload, retain=False)
            ack = watch.wait(lambda: watch.event(cid), 10.0)
            t_ack = time.monotonic() - t0
            while bench_children(proc.pid) and time.monotonic() - t0 < 30:
                time.sleep(0.02)
            result["cancel"] = {
                "answer": ack.get("kind"),
                "ack_ms": round(t_ack * 1000, 1),
                "child_gone_ms": round((time.monotonic() - t0) * 1000, 1),
                "state_after": watch.wait(lambda: watch.model_state() == "reported" and "reported", 10.0),
            }

            # during a health check: assign the measured variant, ping until it is committed
            assignment = Assignment(
                device=DEVICE,
                model=MODEL,
                variant=var.id,
                sha256=var.sha256,
                manifest_version=1,
                issued_at=time.time(),
                policy="bench",
            )
            watch.publish(topics.assign(DEVICE, MODEL), sign(assignment, key).to_json())
            deadline = time.monotonic() + args.timeout
            while not bench_children(proc.pid):
                if time.monotonic() > deadline:
                    raise TimeoutError("no health-check child")
                time.sleep(0.02)
            t_check = time.monotonic()
            check_s: float | None = None
            during_check: list[float] = []
            check_alive = 0
            while watch.model_state() != "committed":
                if time.monotonic() - t_check > args.timeout:
                    raise TimeoutError("not committed")
                t0 = time.monotonic()
                during_check.append(ping())
                alive = bench_children(proc.pid) > 0
                check_alive += alive
                if not alive and check_s is None:
                    check_s = time.monotonic() - t_check
                time.sleep(max(0.0, args.ping_every - (time.monotonic() - t0)))
            result["health_check_s"] = round(check_s or time.monotonic() - t_check, 1)
            result["during_health_check"] = {
                **stats(during_check),
                "pongs_with_child_alive": check_alive,
                "max_ok": max(during_check) < 1.0,
            }
            result["idle_after"] = stats(spaced_pings(10))
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=10)
            watch.close()
            shutil.rmtree(work, ignore_errors=True)
    result["machine"]["loadavg_after"] = [round(v, 2) for v in os.getloadavg()]
    print(json.dumps(result))
    ok = result["during_benchmark"]["max_ok"] and result["during_health_check"]["max_ok"]
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
