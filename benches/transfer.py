"""Model transfer: the agent's chunk fetcher versus mosquitto_pub/mosquitto_sub, and 50 devices at once.

Prints one JSON object on stdout (progress on stderr):

* ``single``: a ``--mib`` MiB random "model" in a valid bundle, signed and published as retained
  256 KiB chunks with :func:`deploy.publish.publish_bundle` to a private mosquitto, then fetched by the
  agent's :class:`agent.fetch.Fetcher` with a real :class:`agent.store.Store` (temp dir) and the real
  paho seam :class:`agent.mqtt.PahoBroker`. The fetcher is driven exactly as ``agent.daemon.Daemon``
  drives it (verify the signed manifest, ``add`` + ``pump``, then per inbox message ``Topics.parse`` →
  ``on_chunk``, ``check_timeouts`` as ``tick`` does, and ``Store.assemble`` once complete), in this
  process, so the figure is the fetcher's and not the daemon's benchmarking/status work. Timed: from
  the manifest in hand to the verified blob renamed into ``blobs/`` (fsynced).
* ``mosquitto``: the same bytes as one retained QoS1 message, ``mosquitto_pub -f FILE -r -q 1`` then
  ``mosquitto_sub -C 1 -q 1`` (to a file). ``fetch_ratio`` = agent fetch MiB/s / mosquitto_sub MiB/s
  (both read a retained payload already on the broker; target >= 1.0); ``end_to_end_ratio`` compares
  publish_bundle + fetch with mosquitto_pub + mosquitto_sub.
* ``concurrent``: ``--devices`` processes (each its own paho client, store and fetcher, as on real
  devices) fetch one ``--concurrent-mib`` MiB variant at the same moment; total and per-fetcher p50/max.

    python benches/transfer.py [--mib 50] [--devices 50] [--concurrent-mib 10]

Bounded: one private broker on a free loopback port, one fetch, one mosquitto_pub/sub pair, one round of
``--devices`` fetchers; every wait has a timeout, every process started is stopped.
"""

from __future__ import annotations

import base64
import json
import multiprocessing as mp
import os
import platform
import queue
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

# benches/agent.py would shadow the `agent` package: drop this directory from sys.path.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey  # noqa: E402
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat  # noqa: E402

from agent import wire  # noqa: E402
from agent.config import parse_config  # noqa: E402
from agent.fetch import Fetcher  # noqa: E402
from agent.mqtt import PahoBroker  # noqa: E402
from agent.store import Store  # noqa: E402
from deploy.broker import MosquittoBroker  # noqa: E402
from deploy.mqtt import BrokerOptions, MqttSession  # noqa: E402
from deploy.publish import publish_bundle  # noqa: E402

MIB = 1024 * 1024
MOSQUITTO_PUB = "/usr/bin/mosquitto_pub"
MOSQUITTO_SUB = "/usr/bin/mosquitto_sub"
_MAX_PACKET = 268435455  # the MQTT maximum


def say(msg: str) -> None:
    print(f"[transfer] {msg}", file=sys.stderr, flush=True)


def make_bundle(path: Path, model: str, size: int, seed: int) -> bytes:
    """A one-variant bundle whose "model" is random bytes; returns the bytes."""
    path.mkdir(parents=True, exist_ok=True)
    data = random.Random(seed).randbytes(size)
    (path / "m.tflite").write_bytes(data)
    variant = wire.Variant(
        id="m",
        file="m.tflite",
        quantization="none",
        inputs=[wire.TensorSpec(name="x", shape=[1, 4], dtype="float32")],
        outputs=[wire.TensorSpec(name="y", shape=[1, 2], dtype="float32")],
        metrics=wire.HostMetrics(size_bytes=len(data)),
        **wire.blob_fields(data),
    )
    manifest = wire.Manifest(model=model, version=1, created_at=time.time(), baseline="m", variants=[variant])
    (path / "manifest.json").write_bytes(manifest.to_json())
    return data


def pub_b64(key: Ed25519PrivateKey) -> str:
    return base64.b64encode(key.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)).decode()


# ------------------------------------------------------------------------------------------ one fetch


def fetch_blob(
    device: str,
    port: int,
    root: Path,
    signed_manifest: bytes,
    pubkey: str,
    timeout_s: float,
    start: Any = None,
) -> dict[str, Any]:
    """Connect an agent-side client, then (after ``start`` if given) fetch the manifest's first variant.

    Driven as agent.daemon does: verify the manifest, Fetcher.add + pump, inbox → Topics.parse →
    Fetcher.on_chunk, check_timeouts, Store.assemble when complete.
    """
    config = parse_config(
        {
            "device": {"id": device},
            "trust": {"public_keys": [pubkey]},
            "mqtt": {"host": "127.0.0.1", "port": port},
            "store": {"path": str(root)},
        }
    )
    topics = wire.Topics(config.mqtt.namespace)
    store = Store(root)
    store.ensure()
    client = PahoBroker(config, will=(topics.status(device), b""))
    fetcher = Fetcher(store, client, topics, window=config.fetch.window, timeout_s=config.fetch.timeout_s)
    client.start()
    try:
        if not client.wait_connected(10.0):
            return {"device": device, "error": "no connection"}
        if start is not None and not start.wait(120.0):
            return {"device": device, "error": "never started"}
        t0 = time.monotonic()
        manifest = wire.verify_signed(wire.Manifest, signed_manifest, config.trusted_keys())
        ref = manifest.variants[0]
        fetcher.add(manifest.model, ref.id, ref, "tflite")
        fetcher.pump()
        deadline = t0 + timeout_s
        complete = False
        chunks = 0
        while not complete:
            if time.monotonic() > deadline:
                return {"device": device, "error": f"timed out after {timeout_s:g} s, {chunks} chunk(s)"}
            try:
                msg = client.inbox.get(timeout=0.5)
            except queue.Empty:
                msg = None
            if msg is not None and not msg.connected:
                parsed = topics.parse(msg.topic)
                if (
                    parsed.kind is wire.TopicKind.BLOB
                    and parsed.sha256 is not None
                    and parsed.index is not None
                ):
                    chunks += 1
                    for note in fetcher.on_chunk(parsed.sha256, parsed.index, msg.payload):
                        if note.kind != "complete":
                            return {"device": device, "error": f"{note.kind}: {note.detail}"}
                        complete = True
            for note in fetcher.check_timeouts():
                return {"device": device, "error": f"{note.kind}: {note.detail}"}
        t_downloaded = time.monotonic()
        path = store.assemble(ref, "tflite")
        t1 = time.monotonic()
        ok = path.stat().st_size == ref.size
        return {
            "device": device,
            "start": t0,
            "end": t1,
            "seconds": t1 - t0,
            "assemble_seconds": t1 - t_downloaded,
            "chunks_received": chunks,
            "verified": ok,
        }
    finally:
        try:
            client.stop()
        except AttributeError as err:
            # paho 2.2 race: loop_stop() reads Client._thread twice and the network thread, ending
            # on its own after disconnect(), may set it to None in between (agent.mqtt.PahoBroker.stop)
            say(f"{device}: PahoBroker.stop raised {err!r} (paho loop_stop race); fetch result kept")


def _worker(args: tuple[Any, ...], start: Any, results: Any) -> None:
    try:
        results.put(fetch_blob(*args, start=start))
    except Exception as err:  # reported in the JSON, never hangs the parent
        results.put({"device": args[0], "error": f"{type(err).__name__}: {err}"})


# ------------------------------------------------------------------------------------------ mosquitto


def mosquitto_pair(port: int, data_file: Path, out_file: Path, timeout_s: float) -> dict[str, Any]:
    missing = [b for b in (MOSQUITTO_PUB, MOSQUITTO_SUB) if not os.access(b, os.X_OK)]
    if missing:
        return {"error": f"missing: {', '.join(missing)}"}
    size = data_file.stat().st_size
    topic = "bench/whole"
    base = ["-h", "127.0.0.1", "-p", str(port), "-t", topic, "-q", "1", "-V", "mqttv5"]
    t0 = time.monotonic()
    subprocess.run([MOSQUITTO_PUB, *base, "-f", str(data_file), "-r"], check=True, timeout=timeout_s)
    t1 = time.monotonic()
    with out_file.open("wb") as out:
        subprocess.run([MOSQUITTO_SUB, *base, "-C", "1", "-N"], stdout=out, check=True, timeout=timeout_s)
    t2 = time.monotonic()
    got = out_file.stat().st_size
    # clear the retained copy (broker RAM)
    subprocess.run([MOSQUITTO_PUB, *base, "-r", "-n"], check=True, timeout=timeout_s)
    return {
        "pub_seconds": round(t1 - t0, 3),
        "sub_seconds": round(t2 - t1, 3),
        "sub_mib_per_s": round(size / MIB / (t2 - t1), 1),
        "pub_plus_sub_mib_per_s": round(size / MIB / (t2 - t0), 1),
        "bytes_ok": got == size,
        "note": "mosquitto_sub writes to a file without fsync; the agent fsyncs the assembled blob",
    }


# ------------------------------------------------------------------------------------------ run


def run(mib: int, devices: int, concurrent_mib: int, timeout_s: float) -> dict[str, Any]:
    key = Ed25519PrivateKey.generate()
    pubkey = pub_b64(key)
    out: dict[str, Any] = {
        "bench": "transfer",
        "machine": {"cpus": os.cpu_count(), "loadavg": os.getloadavg(), "python": platform.python_version()},
        "mib": mib,
        "chunk_kib": wire.DEFAULT_CHUNK_SIZE // 1024,
        "fetch_window": 32,
        "method": "in-process Fetcher + Store + PahoBroker driven like agent.daemon (see docstring)",
    }
    with tempfile.TemporaryDirectory(prefix="edgefleet-transfer-") as tmp, MosquittoBroker() as broker:
        tmpd = Path(tmp)
        options = BrokerOptions(host=broker.host, port=broker.port)

        # ---- single: publish_bundle then the agent's fetcher
        say(f"publishing a {mib} MiB bundle to 127.0.0.1:{broker.port}")
        data = make_bundle(tmpd / "big", "big", mib * MIB, seed=1)
        with MqttSession(options) as session:
            published = publish_bundle(tmpd / "big", key, session)
        say(f"published in {published.seconds:.2f} s; fetching with the agent's fetcher")
        res = fetch_blob(
            "bench-single",
            broker.port,
            tmpd / "store-single",
            published.manifest.to_json(),
            pubkey,
            timeout_s,
        )
        single: dict[str, Any] = {"publish_seconds": round(published.seconds, 3)}
        if "error" in res:
            single["error"] = res["error"]
        else:
            blob = Store(tmpd / "store-single").blob_path(published.manifest.variants[0].sha256)
            single.update(
                fetch_seconds=round(res["seconds"], 3),
                assemble_seconds=round(res["assemble_seconds"], 3),
                fetch_mib_per_s=round(mib / res["seconds"], 1),
                publish_plus_fetch_mib_per_s=round(mib / (res["seconds"] + published.seconds), 1),
                chunks_received=res["chunks_received"],
                verified=bool(res["verified"]) and blob.read_bytes() == data,
            )
        out["single"] = single
        shutil.rmtree(tmpd / "store-single", ignore_errors=True)

        # ---- mosquitto_pub / mosquitto_sub of the same bytes
        say("mosquitto_pub -f → mosquitto_sub of the same bytes")
        whole = tmpd / "big" / "m.tflite"
        try:
            # the product broker config caps packets at 16 MiB; the whole-file message needs a second
            # private broker, identical but for max_packet_size
            with MosquittoBroker(extra_config=f"max_packet_size {_MAX_PACKET}\n") as whole_broker:
                out["mosquitto"] = mosquitto_pair(whole_broker.port, whole, tmpd / "sub.out", 60.0)
        except (subprocess.SubprocessError, OSError) as err:
            out["mosquitto"] = {"error": str(err)}
        (tmpd / "sub.out").unlink(missing_ok=True)
        m = out["mosquitto"]
        if "fetch_mib_per_s" in single and "sub_mib_per_s" in m:
            out["fetch_ratio"] = round(single["fetch_mib_per_s"] / m["sub_mib_per_s"], 2)
            out["end_to_end_ratio"] = round(
                single["publish_plus_fetch_mib_per_s"] / m["pub_plus_sub_mib_per_s"], 2
            )
            out["target_met"] = out["fetch_ratio"] >= 1.0
        del data

        # ---- concurrent: N device processes fetching one variant
        say(f"publishing a {concurrent_mib} MiB variant for {devices} concurrent fetchers")
        make_bundle(tmpd / "small", "small", concurrent_mib * MIB, seed=2)
        with MqttSession(options) as session:
            small = publish_bundle(tmpd / "small", key, session)
        out["concurrent"] = concurrent(
            devices, broker.port, tmpd, small.manifest.to_json(), pubkey, concurrent_mib, timeout_s
        )
        out["broker_log_tail"] = _log_tail(broker.log_path)
    return out


def concurrent(
    n: int, port: int, tmpd: Path, manifest: bytes, pubkey: str, mib: int, timeout_s: float
) -> dict[str, Any]:
    ctx = mp.get_context("fork")  # no thread is alive in this process here (the publish session closed)
    start = ctx.Event()
    results: Any = ctx.Queue()
    procs = []
    for i in range(n):
        args = (f"bench-dev-{i:03d}", port, tmpd / f"store-{i:03d}", manifest, pubkey, timeout_s)
        p = ctx.Process(target=_worker, args=(args, start, results), daemon=True)
        p.start()
        procs.append(p)
    got: list[dict[str, Any]] = []
    try:
        time.sleep(1.0)  # let every client connect (each waits for CONNACK before waiting on start)
        say(f"{n} fetchers started; go")
        t0 = time.monotonic()
        start.set()
        deadline = t0 + timeout_s + 30
        while len(got) < n and time.monotonic() < deadline:
            try:
                got.append(results.get(timeout=1.0))
            except queue.Empty:
                if not any(p.is_alive() for p in procs):
                    break
    finally:
        for p in procs:
            p.join(timeout=5)
            if p.is_alive():
                p.kill()
                p.join(timeout=5)
    ok = [r for r in got if "error" not in r and r.get("verified")]
    errors = [r for r in got if "error" in r][:5]
    out: dict[str, Any] = {"devices": n, "mib": mib, "completed_verified": len(ok), "errors": errors}
    if ok:
        secs = sorted(r["seconds"] for r in ok)
        total = max(r["end"] for r in ok) - min(r["start"] for r in ok)
        out.update(
            total_seconds=round(total, 2),
            per_fetcher_p50_s=round(statistics.median(secs), 2),
            per_fetcher_max_s=round(secs[-1], 2),
            per_fetcher_min_s=round(secs[0], 2),
            aggregate_mib_per_s=round(len(ok) * mib / total, 1),
        )
    return out


def _log_tail(path: Path) -> list[str]:
    try:
        lines = path.read_text(errors="replace").splitlines()
    except OSError:
        return []
    return [ln for ln in lines if "rror" in ln or "arning" in ln][-5:]


def main() -> int:
    from agent.argparsing import StrictParser  # exact flags, a suggestion for a typo

    parser = StrictParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--mib", type=int, default=50, help="single-fetch model size, MiB (default 50)")
    parser.add_argument("--devices", type=int, default=50, help="concurrent fetchers (default 50)")
    parser.add_argument(
        "--concurrent-mib", type=int, default=10, help="variant size for them, MiB (default 10)"
    )
    parser.add_argument("--timeout", type=float, default=180.0, help="per-fetch time limit, s (default 180)")
    args = parser.parse_args()
    if threading.active_count() != 1:
        say("warning: threads alive at start")
    print(json.dumps(run(args.mib, args.devices, args.concurrent_mib, args.timeout), indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
