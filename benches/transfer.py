"""Model transfer: the agent's chunk fetcher versus mosquitto_pub/mosquitto_sub, and 50 / 500 devices at once.

Prints one JSON object on stdout (progress on stderr):

* ``single`` (``--reps`` repetitions, default 5, the agent fetch and mosquitto_pub/sub alternating, each
  figure reported as median, min, max and spread = (max - min) / median, because one sample read 0.80x and
  1.20x of mosquitto_sub on two runs of the same code): a ``--mib`` MiB random "model" in a valid bundle,
  signed and published as retained 256 KiB chunks with :func:`deploy.control.publish.publish_bundle` to a
  private
  mosquitto, then fetched by the agent's :class:`agent.fetch.Fetcher` with a real
  :class:`agent.store.Store` (temp dir) and the real paho seam :class:`agent.mqtt.PahoBroker`. The fetcher
  is driven exactly as ``agent.daemon.Daemon`` drives it (verify the signed manifest, ``add`` + ``pump``,
  then per inbox message ``Topics.parse`` → ``on_chunk``, ``check_timeouts`` as ``tick`` does, and
  ``Store.assemble`` once complete), in this process, so the figure is the fetcher's and not the daemon's
  benchmarking/status work. Timed: from the manifest in hand to the verified blob renamed into ``blobs/``
  (fsynced).
  Against it, the same bytes as one retained QoS1 message, ``mosquitto_pub -f FILE -r -q 1`` then
  ``mosquitto_sub -C 1 -q 1`` (to a file). ``fetch_ratio`` = mosquitto_sub seconds / agent fetch seconds
  per repetition (both read a retained payload already on the broker; target: median >= 1.0);
  ``end_to_end_ratio`` compares publish_bundle + fetch with mosquitto_pub + mosquitto_sub.
* ``concurrent``: for each count in ``--devices`` (default 50 and 500), that many fetchers (each its own
  paho client, store and fetcher, as on real devices; threads spread over ``--procs`` processes) fetch
  one ``--concurrent-mib`` MiB variant at the same moment; total and per-fetcher p50/max, and the
  broker's CPU seconds (/proc utime + stime) per MiB delivered: the cost that grows with the fleet.

    python benches/transfer.py [--mib 50] [--reps 5] [--devices 50,500] [--procs 8] [--concurrent-mib 10]

Bounded: two private brokers on free loopback ports, ``--reps`` fetches and mosquitto_pub/sub pairs, one
round per ``--devices`` count; every wait has a timeout, every process started is stopped.
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
from deploy.broker.client import BrokerOptions, MqttSession  # noqa: E402
from deploy.broker.spawn import MosquittoBroker  # noqa: E402
from deploy.control.publish import publish_bundle  # noqa: E402

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


def _worker(jobs: list[tuple[Any, ...]], start: Any, results: Any) -> None:
    """One process running several fetchers, one thread each (500 processes would not fit 2 cores)."""

    def one(args: tuple[Any, ...]) -> None:
        try:
            results.put(fetch_blob(*args, start=start))
        except Exception as err:  # reported in the JSON, never hangs the parent
            results.put({"device": args[0], "error": f"{type(err).__name__}: {err}"})

    threads = [threading.Thread(target=one, args=(job,), daemon=True) for job in jobs]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=600)


def cpu_seconds(pid: int | None) -> float | None:
    """utime + stime of a process, from /proc (None when it cannot be read)."""
    if pid is None:
        return None
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def spread(values: list[float]) -> dict[str, Any]:
    """Median, min, max and (max - min) / median of repeated samples."""
    med = statistics.median(values)
    return {
        "median": round(med, 3),
        "min": round(min(values), 3),
        "max": round(max(values), 3),
        "spread": round((max(values) - min(values)) / med, 3) if med else None,
        "samples": [round(v, 3) for v in values],
    }


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


def run(
    mib: int, reps: int, devices: list[int], concurrent_mib: int, procs: int, timeout_s: float
) -> dict[str, Any]:
    key = Ed25519PrivateKey.generate()
    pubkey = pub_b64(key)
    out: dict[str, Any] = {
        "bench": "transfer",
        "machine": {"cpus": os.cpu_count(), "loadavg": os.getloadavg(), "python": platform.python_version()},
        "mib": mib,
        "repetitions": reps,
        "chunk_kib": wire.DEFAULT_CHUNK_SIZE // 1024,
        "fetch_window": 32,
        "method": "in-process Fetcher + Store + PahoBroker driven like agent.daemon (see docstring); the "
        "agent fetch and mosquitto_pub/sub alternate, one of each per repetition",
    }
    with tempfile.TemporaryDirectory(prefix="edgefleet-transfer-") as tmp, MosquittoBroker() as broker:
        tmpd = Path(tmp)
        options = BrokerOptions(host=broker.host, port=broker.port)
        say(f"publishing a {mib} MiB bundle to 127.0.0.1:{broker.port}")
        data = make_bundle(tmpd / "big", "big", mib * MIB, seed=1)
        with MqttSession(options) as session:
            published = publish_bundle(tmpd / "big", key, session)
        whole = tmpd / "big" / "m.tflite"
        fetch_s: list[float] = []
        sub_s: list[float] = []
        pair_s: list[float] = []
        errors: list[str] = []
        verified = True
        # the product broker config caps packets at 16 MiB; the whole-file message needs a second
        # private broker, identical but for max_packet_size
        with MosquittoBroker(extra_config=f"max_packet_size {_MAX_PACKET}\n") as whole_broker:
            for rep in range(reps):
                say(f"repetition {rep + 1}/{reps}: agent fetch, then mosquitto_pub/sub")
                store_dir = tmpd / f"store-single-{rep}"
                res = fetch_blob(
                    f"bench-single-{rep}",
                    broker.port,
                    store_dir,
                    published.manifest.to_json(),
                    pubkey,
                    timeout_s,
                )
                if "error" in res:
                    errors.append(f"fetch {rep}: {res['error']}")
                else:
                    fetch_s.append(res["seconds"])
                    blob = Store(store_dir).blob_path(published.manifest.variants[0].sha256)
                    verified = verified and bool(res["verified"]) and blob.read_bytes() == data
                shutil.rmtree(store_dir, ignore_errors=True)
                try:
                    m = mosquitto_pair(whole_broker.port, whole, tmpd / "sub.out", 60.0)
                except (subprocess.SubprocessError, OSError) as err:
                    m = {"error": str(err)}
                (tmpd / "sub.out").unlink(missing_ok=True)
                if "error" in m:
                    errors.append(f"mosquitto {rep}: {m['error']}")
                else:
                    sub_s.append(m["sub_seconds"])
                    pair_s.append(m["pub_seconds"] + m["sub_seconds"])
        del data
        single: dict[str, Any] = {"publish_seconds": round(published.seconds, 3), "verified": verified}
        if fetch_s:
            single["fetch_seconds"] = spread(fetch_s)
            single["fetch_mib_per_s_median"] = round(mib / statistics.median(fetch_s), 1)
        if sub_s:
            single["mosquitto_sub_seconds"] = spread(sub_s)
            single["mosquitto_sub_mib_per_s_median"] = round(mib / statistics.median(sub_s), 1)
        if fetch_s and sub_s:
            ratios = [s_ / f for f, s_ in zip(fetch_s, sub_s, strict=False)]  # >1: the agent is faster
            single["fetch_ratio"] = spread(ratios)
            single["fetch_ratio_rule"] = (
                "per repetition: mosquitto_sub seconds / agent fetch seconds (both read a retained payload "
                "already on the broker; >= 1.0: the agent is at least as fast); median over repetitions"
            )
            e2e = [(p_) / (f + published.seconds) for f, p_ in zip(fetch_s, pair_s, strict=False)]
            single["end_to_end_ratio"] = spread(e2e)
            single["target_met"] = statistics.median(ratios) >= 1.0
        single["errors"] = errors
        out["single"] = single

        # ---- concurrent: N devices fetching one variant at once; the broker's CPU per MiB delivered
        say(f"publishing a {concurrent_mib} MiB variant for the concurrent fetchers")
        make_bundle(tmpd / "small", "small", concurrent_mib * MIB, seed=2)
        with MqttSession(options) as session:
            small = publish_bundle(tmpd / "small", key, session)
        out["concurrent"] = [
            concurrent(n, broker, tmpd, small.manifest.to_json(), pubkey, concurrent_mib, procs, timeout_s)
            for n in devices
        ]
        out["broker_log_tail"] = _log_tail(broker.log_path)
    return out


def concurrent(
    n: int,
    broker: MosquittoBroker,
    tmpd: Path,
    manifest: bytes,
    pubkey: str,
    mib: int,
    procs: int,
    timeout_s: float,
) -> dict[str, Any]:
    """``n`` fetchers (threads spread over ``procs`` processes, each its own paho client and store, as
    on real devices) fetch one variant at the same moment."""
    ctx = mp.get_context("fork")  # no thread is alive in this process here (the publish session closed)
    start = ctx.Event()
    results: Any = ctx.Queue()
    jobs = [
        (f"bench-{n}-{i:04d}", broker.port, tmpd / f"store-{n}-{i:04d}", manifest, pubkey, timeout_s)
        for i in range(n)
    ]
    workers = []
    for k in range(min(procs, n)):
        p = ctx.Process(target=_worker, args=(jobs[k::procs], start, results), daemon=True)
        p.start()
        workers.append(p)
    got: list[dict[str, Any]] = []
    cpu0 = cpu1 = None
    try:
        time.sleep(2.0 + n / 100)  # let every client connect (each waits for CONNACK before waiting on start)
        say(f"{n} fetchers started in {len(workers)} processes; go")
        cpu0 = cpu_seconds(broker.pid)
        t0 = time.monotonic()
        start.set()
        deadline = t0 + timeout_s + 30
        while len(got) < n and time.monotonic() < deadline:
            try:
                got.append(results.get(timeout=1.0))
            except queue.Empty:
                if not any(p.is_alive() for p in workers):
                    break
        cpu1 = cpu_seconds(broker.pid)
    finally:
        for p in workers:
            p.join(timeout=10)
            if p.is_alive():
                p.kill()
                p.join(timeout=5)
        for i in range(n):
            shutil.rmtree(tmpd / f"store-{n}-{i:04d}", ignore_errors=True)
    ok = [r for r in got if "error" not in r and r.get("verified")]
    errors = [r for r in got if "error" in r][:5]
    out: dict[str, Any] = {"devices": n, "processes": len(workers), "mib": mib, "completed_verified": len(ok)}
    out["errors"] = errors
    if ok:
        secs = sorted(r["seconds"] for r in ok)
        total = max(r["end"] for r in ok) - min(r["start"] for r in ok)
        delivered = len(ok) * mib
        out.update(
            total_seconds=round(total, 2),
            per_fetcher_p50_s=round(statistics.median(secs), 2),
            per_fetcher_max_s=round(secs[-1], 2),
            per_fetcher_min_s=round(secs[0], 2),
            aggregate_mib_per_s=round(delivered / total, 1),
            mib_delivered=delivered,
        )
        if cpu0 is not None and cpu1 is not None:
            out["broker_cpu_seconds"] = round(cpu1 - cpu0, 2)
            out["broker_cpu_ms_per_mib"] = round(1000 * (cpu1 - cpu0) / delivered, 2)
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
    parser.add_argument("--reps", type=int, default=5, help="interleaved repetitions of the single fetch (5)")
    parser.add_argument(
        "--devices", default="50,500", help="concurrent fetcher counts, comma-separated (default 50,500)"
    )
    parser.add_argument("--procs", type=int, default=8, help="processes the concurrent fetchers share (8)")
    parser.add_argument(
        "--concurrent-mib", type=int, default=10, help="variant size for them, MiB (default 10)"
    )
    parser.add_argument("--timeout", type=float, default=180.0, help="per-fetch time limit, s (default 180)")
    args = parser.parse_args()
    if threading.active_count() != 1:
        say("warning: threads alive at start")
    devices = [int(d) for d in args.devices.split(",") if d.strip()]
    if args.reps < 1 or not devices or min(devices) < 1:
        parser.error("--reps and every --devices count must be at least 1")
    print(
        json.dumps(run(args.mib, args.reps, devices, args.concurrent_mib, args.procs, args.timeout), indent=2)
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
