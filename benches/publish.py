"""Publisher throughput and memory: sign and publish a large bundle to a private mosquitto.

Prints one JSON object on stdout: bundle size, seconds, MiB/s, the publisher's RSS before and at peak
(sampled in a thread while publishing), and the same for a re-publish of the same bundle (idempotent)
and for the publish of a second version (which clears the first version's retained chunks).

    python benches/publish.py [--mib 100] [--window 32]

Bounded: one broker on a free loopback port, three publishes, then everything stops.
"""

from __future__ import annotations

import json
import os
import platform
import sys
import tempfile
import threading
import time
from pathlib import Path

# benches/agent.py would shadow the `agent` package: drop this directory from sys.path.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

import psutil  # noqa: E402
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey  # noqa: E402

from agent import wire  # noqa: E402
from deploy.broker.client import BrokerOptions, MqttSession  # noqa: E402
from deploy.broker.spawn import MosquittoBroker  # noqa: E402
from deploy.control.publish import publish_bundle  # noqa: E402


def make_bundle(path: Path, mib: int, version: int, seed: int) -> None:
    """A bundle of two random 'model files' (the publisher never looks inside them)."""
    path.mkdir(parents=True, exist_ok=True)
    sizes = {"big": mib * 1024 * 1024 * 3 // 4, "small": mib * 1024 * 1024 // 4}
    variants = []
    for vid, size in sizes.items():
        data = _random_bytes(size, seed + len(vid))
        (path / f"{vid}.tflite").write_bytes(data)
        variants.append(
            wire.Variant(
                id=vid,
                file=f"{vid}.tflite",
                quantization="none",
                inputs=[wire.TensorSpec(name="x", shape=[1, 4], dtype="float32")],
                outputs=[wire.TensorSpec(name="y", shape=[1, 2], dtype="float32")],
                metrics=wire.HostMetrics(size_bytes=len(data)),
                **wire.blob_fields(data),
            )
        )
    manifest = wire.Manifest(
        model="bench", version=version, created_at=time.time(), baseline="big", variants=variants
    )
    (path / "manifest.json").write_bytes(manifest.to_json())


def _random_bytes(size: int, seed: int) -> bytes:
    import random

    return random.Random(seed).randbytes(size)


class PeakRss:
    """Samples this process's RSS every 20 ms until stopped."""

    def __init__(self) -> None:
        self.proc = psutil.Process()
        self.peak = self.proc.memory_info().rss
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self.stop.wait(0.02):
            self.peak = max(self.peak, self.proc.memory_info().rss)

    def __enter__(self) -> PeakRss:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.thread.join(timeout=2)


def run(mib: int, window: int) -> dict[str, object]:
    key = Ed25519PrivateKey.generate()
    out: dict[str, object] = {
        "bench": "publish",
        "machine": {"cpus": os.cpu_count(), "loadavg": os.getloadavg(), "python": platform.python_version()},
        "bundle_mib": mib,
        "window": window,
    }
    with tempfile.TemporaryDirectory() as tmp, MosquittoBroker() as broker:
        v1, v2 = Path(tmp) / "v1", Path(tmp) / "v2"
        make_bundle(v1, mib, version=1, seed=1)
        make_bundle(v2, mib, version=2, seed=2)
        options = BrokerOptions(host=broker.host, port=broker.port)
        with MqttSession(options, window=window) as session:
            for label, bundle in (("first", v1), ("republish", v1), ("new_version", v2)):
                rss_before = psutil.Process().memory_info().rss
                with PeakRss() as peak:
                    result = publish_bundle(bundle, key, session)
                out[label] = {
                    "seconds": round(result.seconds, 3),
                    "mib_per_s": round(result.mib_per_s, 1),
                    "chunks": result.chunks,
                    "cleared_chunks": result.cleared_chunks,
                    "rss_before_mib": round(rss_before / 2**20, 1),
                    "rss_peak_mib": round(peak.peak / 2**20, 1),
                    "rss_growth_mib": round((peak.peak - rss_before) / 2**20, 1),
                }
        out["broker_rss_mib"] = (
            round(psutil.Process(broker.pid).memory_info().rss / 2**20, 1) if broker.pid else None
        )
    return out


def main() -> int:
    from agent.argparsing import StrictParser  # exact flags, a suggestion for a typo

    parser = StrictParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mib", type=int, default=100, help="bundle size in MiB (default 100)")
    parser.add_argument("--window", type=int, default=32, help="in-flight QoS1 publishes (default 32)")
    args = parser.parse_args()
    print(json.dumps(run(args.mib, args.window), indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
