"""Agent benchmark: idle cost, manifest → report latency, and benchmark fidelity. Prints ONE JSON object.

    python benches/agent.py [--idle-seconds 60] [--timeout 300]

Everything runs against a private mosquitto on a free loopback port (never the system broker) and a real
agent subprocess (``python -m agent``); both are stopped by PID at the end.

* idle: RSS and CPU of the agent process, measured with psutil over ``--idle-seconds`` while it is
  connected with nothing to do (targets: <= 40 MB RSS, <= 1 % of one core);
* manifest → report: publish blobs + a signed 3-variant manifest of small real .tflite files (made once with
  TensorFlow in a subprocess, cached under the temp dir), time until the agent's Report arrives;
* fidelity: for two variants, the agent's reported p50 over a plain in-process timing loop of the same
  interpreter (ai_edge_litert) on the same inputs, measured in this run (target ratio within 1 +- 0.10).
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import json
import os
import platform
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

# this file is benches/agent.py: drop its directory from sys.path so `import agent` finds the package
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

import paho.mqtt.client as paho  # noqa: E402
import psutil  # noqa: E402
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey  # noqa: E402
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat  # noqa: E402
from paho.mqtt.enums import CallbackAPIVersion  # noqa: E402

from agent.wire import (  # noqa: E402
    BlobRef,
    HostMetrics,
    Manifest,
    TensorSpec,
    Topics,
    Variant,
    blob_fields,
    iter_chunks,
    sign,
)
from deploy.broker import MosquittoBroker  # noqa: E402

DEVICE, MODEL, CHUNK = "bench-pi", "bench", 64 * 1024

_GEN = r"""
import os, sys
os.environ["TF_CPP_MIN_LOG_LEVEL"] = "3"
import numpy as np, tensorflow as tf
out = sys.argv[1]
rng = np.random.default_rng(0)
x = rng.standard_normal((256, 16, 16, 1)).astype("float32")
y = (x.mean(axis=(1, 2, 3)) > 0).astype("int64")
inp = tf.keras.Input(shape=(16, 16, 1), batch_size=1)
h = tf.keras.layers.Conv2D(16, 3, activation="relu")(inp)
h = tf.keras.layers.Conv2D(16, 3, activation="relu")(h)
h = tf.keras.layers.Flatten()(h)
o = tf.keras.layers.Dense(2, activation="softmax")(h)
m = tf.keras.Model(inp, o)
m.compile(optimizer="adam", loss="sparse_categorical_crossentropy")
m.fit(x, y, epochs=3, batch_size=32, verbose=0)
open(os.path.join(out, "float32.tflite"), "wb").write(tf.lite.TFLiteConverter.from_keras_model(m).convert())
c = tf.lite.TFLiteConverter.from_keras_model(m); c.optimizations = [tf.lite.Optimize.DEFAULT]
open(os.path.join(out, "dynint8.tflite"), "wb").write(c.convert())
c = tf.lite.TFLiteConverter.from_keras_model(m); c.optimizations = [tf.lite.Optimize.DEFAULT]
c.target_spec.supported_types = [tf.float16]
open(os.path.join(out, "float16.tflite"), "wb").write(c.convert())
np.savez(os.path.join(out, "sample.npz"), x=x[:64], y=y[:64])
"""
QUANT = {"float32": "none", "dynint8": "dynamic_int8", "float16": "float16"}


def models() -> Path:
    out = (
        Path(tempfile.gettempdir())
        / f"edgefleet-bench-models-{hashlib.sha256(_GEN.encode()).hexdigest()[:12]}"
    )
    if not (out / "sample.npz").exists():
        tmp = Path(tempfile.mkdtemp(prefix="edgefleet-bench-gen-"))
        subprocess.run([sys.executable, "-c", _GEN, str(tmp)], check=True, capture_output=True, timeout=600)
        tmp.rename(out)
    return out


def variant(vid: str, data: bytes, sample: BlobRef) -> Variant:
    return Variant(
        id=vid,
        file=f"{vid}.tflite",
        quantization=QUANT[vid],  # type: ignore[arg-type]
        inputs=[TensorSpec(name="x", shape=[1, 16, 16, 1], dtype="float32")],
        outputs=[TensorSpec(name="y", shape=[1, 2], dtype="float32")],
        metrics=HostMetrics(size_bytes=len(data)),  # no host accuracy: latency only
        sample=sample,
        **blob_fields(data, CHUNK),
    )


def local_p50(path: Path, sample: Path, runs: int) -> float:
    """p50 (ms) of a plain timing loop of the same runtime in this process, on the sample's rows."""
    import numpy as np
    from ai_edge_litert.interpreter import Interpreter

    x = np.load(sample)["x"]
    interp = Interpreter(model_path=str(path), num_threads=1)
    interp.allocate_tensors()
    idx = interp.get_input_details()[0]["index"]
    for i in range(5):
        interp.set_tensor(idx, x[i : i + 1])
        interp.invoke()
    times = []
    for i in range(runs):
        interp.set_tensor(idx, x[i % len(x) : i % len(x) + 1])
        t0 = time.perf_counter()
        interp.invoke()
        times.append((time.perf_counter() - t0) * 1000.0)
    return statistics.median(times)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--idle-seconds", type=float, default=60.0)
    ap.add_argument("--timeout", type=float, default=300.0, help="bound for each wait")
    args = ap.parse_args()
    mdir = models()
    key = Ed25519PrivateKey.generate()
    pub = base64.b64encode(key.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)).decode()
    topics = Topics()
    work = Path(tempfile.mkdtemp(prefix="edgefleet-bench-agent-"))
    result: dict[str, Any] = {
        "machine": {
            "platform": platform.platform(),
            "machine": platform.machine(),
            "python": platform.python_version(),
            "cpu_count": os.cpu_count(),
            "loadavg_before": [round(v, 2) for v in os.getloadavg()],
        }
    }
    got: dict[str, bytes] = {}
    cond = threading.Condition()

    def on_message(_c: Any, _u: Any, msg: paho.MQTTMessage) -> None:
        with cond:
            got[msg.topic] = bytes(msg.payload)
            cond.notify_all()

    def wait(pred: Any, timeout: float) -> bytes:
        deadline = time.monotonic() + timeout
        with cond:
            while True:
                for t, p in got.items():
                    if pred(t, p):
                        return p
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError("timed out waiting for the agent")
                cond.wait(min(left, 0.5))

    with MosquittoBroker() as broker:
        cfg = work / "agent.toml"
        cfg.write_text(
            f'[device]\nid = "{DEVICE}"\n[mqtt]\nhost = "{broker.host}"\nport = {broker.port}\n'
            f'[trust]\npublic_keys = ["{pub}"]\n[store]\npath = "{work / "store"}"\nmin_free_mb = 1\n'
            "[bench]\nthreads = [1]\nwarmup_runs = 5\nmin_runs = 200\nmin_seconds = 1.0\n"
            "[telemetry]\ninterval_s = 60\n",
            encoding="utf-8",
        )
        bus = paho.Client(callback_api_version=CallbackAPIVersion.VERSION2, client_id="bench-bus")
        bus.on_message = on_message
        bus.connect(broker.host, broker.port)
        bus.subscribe(f"{topics.ns}/devices/#", 1)
        bus.loop_start()
        proc = subprocess.Popen(
            [sys.executable, "-m", "agent", "--config", str(cfg), "--log-level", "warning"],
            stderr=subprocess.DEVNULL,
        )
        try:
            wait(lambda t, p: t == topics.status(DEVICE) and b'"online":true' in p, args.timeout)
            ps = psutil.Process(proc.pid)
            time.sleep(2.0)  # let start-up settle
            cpu0, t0 = ps.cpu_times(), time.monotonic()
            rss_max = 0
            while time.monotonic() - t0 < args.idle_seconds:
                rss_max = max(rss_max, ps.memory_info().rss)
                time.sleep(min(1.0, args.idle_seconds / 10))
            cpu1, wall = ps.cpu_times(), time.monotonic() - t0
            cpu_s = (cpu1.user - cpu0.user) + (cpu1.system - cpu0.system)
            result["idle"] = {
                "seconds": round(wall, 1),
                "rss_mb": round(rss_max / 2**20, 1),
                "cpu_percent_of_one_core": round(100 * cpu_s / wall, 3),
                "target_rss_mb": 40,
                "target_cpu_percent": 1.0,
            }

            sample = (mdir / "sample.npz").read_bytes()
            sref = BlobRef.of(sample, CHUNK)
            blobs = {vid: (mdir / f"{vid}.tflite").read_bytes() for vid in QUANT}
            variants = [variant(vid, data, sref) for vid, data in blobs.items()]
            for data in [*blobs.values(), sample]:
                sha = hashlib.sha256(data).hexdigest()
                for i, chunk in enumerate(iter_chunks(data, CHUNK)):
                    bus.publish(topics.blob(sha, i), chunk, qos=1, retain=True).wait_for_publish(10)
            manifest = sign(
                Manifest(
                    model=MODEL, version=1, created_at=time.time(), baseline="float32", variants=variants
                ),
                key,
            )
            t_pub = time.monotonic()
            bus.publish(topics.manifest(MODEL), manifest.to_json(), qos=1, retain=True).wait_for_publish(10)
            report = json.loads(wait(lambda t, p: t == topics.report(DEVICE, MODEL), args.timeout))
            result["manifest_to_report_s"] = round(time.monotonic() - t_pub, 2)
            result["manifest"] = {
                "variants": len(variants),
                "bytes": sum(len(b) for b in blobs.values()) + len(sample),
                "chunk_bytes": CHUNK,
            }
            fidelity = {}
            for r in report["results"]:
                if r["variant"] in ("float32", "dynint8") and r.get("latency_ms"):
                    agent_p50 = r["latency_ms"]["p50"]
                    plain = local_p50(
                        mdir / f"{r['variant']}.tflite", mdir / "sample.npz", r["latency_ms"]["count"]
                    )
                    fidelity[r["variant"]] = {
                        "agent_p50_ms": round(agent_p50, 4),
                        "plain_loop_p50_ms": round(plain, 4),
                        "ratio": round(agent_p50 / plain, 3),
                        "runs": r["latency_ms"]["count"],
                    }
            result["fidelity"] = {"target_ratio": [0.9, 1.1], **fidelity}
        finally:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=10)
            bus.disconnect()
            bus.loop_stop()
    result["machine"]["loadavg_after"] = [round(v, 2) for v in os.getloadavg()]
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
