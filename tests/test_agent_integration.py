"""The agent end to end against a private mosquitto and real .tflite files (no TensorFlow in the agent).

One agent process (``python -m agent --config``) goes through the whole story: signed manifest + retained
chunks → report; signed assignment → active link and committed status; tampered manifest → BAD_SIGNATURE
while it keeps running (ping → pong); a corrupt chunk → BAD_HASH, then the right chunk → report v3;
SIGTERM → offline status, exit 0.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import shutil
import signal
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import paho.mqtt.client as paho
import pytest
from agent_helpers import PY, kill9, terminate
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat
from paho.mqtt.enums import CallbackAPIVersion

from agent.wire import (
    Assignment,
    BlobRef,
    Command,
    CommandAction,
    HostMetrics,
    Manifest,
    TensorSpec,
    Topics,
    Variant,
    blob_fields,
    iter_chunks,
    sha256_hex,
    sign,
)
from deploy.broker.spawn import MosquittoBroker, find_mosquitto

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(find_mosquitto() is None, reason="mosquitto is not installed"),
]

DEVICE = "pi-test"
MODEL = "digits"
CHUNK = 1024  # small chunks so one blob needs more than the 32-subscription window

_GEN = r"""
import os, sys
os.environ["TF_CPP_MIN_LOG_LEVEL"] = "3"
import numpy as np, tensorflow as tf
out = sys.argv[1]
rng = np.random.default_rng(0)
x = rng.standard_normal((64, 8)).astype("float32")
w = rng.standard_normal((8, 3)).astype("float32")
y = np.argmax(x @ w, axis=1).astype("int64")
inp = tf.keras.Input(shape=(8,), batch_size=1)
h = tf.keras.layers.Dense(16, activation="relu")(inp)
o = tf.keras.layers.Dense(3, activation="softmax")(h)
m = tf.keras.Model(inp, o)
m.compile(optimizer=tf.keras.optimizers.Adam(0.05), loss="sparse_categorical_crossentropy")
m.fit(x, y, epochs=30, batch_size=16, verbose=0)
open(os.path.join(out, "float32.tflite"), "wb").write(tf.lite.TFLiteConverter.from_keras_model(m).convert())
c = tf.lite.TFLiteConverter.from_keras_model(m)
c.optimizations = [tf.lite.Optimize.DEFAULT]
c.target_spec.supported_types = [tf.float16]
open(os.path.join(out, "float16.tflite"), "wb").write(c.convert())
np.savez(os.path.join(out, "sample.npz"), x=x, y=y)
"""


@pytest.fixture(scope="session")
def tiny_models() -> Path:
    """float32 + float16 .tflite of a 2-layer Dense model and a labelled sample, built once with TF."""
    key = hashlib.sha256(_GEN.encode()).hexdigest()[:12]
    out = Path(tempfile.gettempdir()) / f"edgefleet-agent-test-models-{key}"
    if not (out / "sample.npz").exists():
        tmp = Path(tempfile.mkdtemp(prefix="edgefleet-gen-"))
        subprocess.run([PY, "-c", _GEN, str(tmp)], check=True, capture_output=True, timeout=300)
        if not out.exists():
            tmp.rename(out)
    return out


# ------------------------------------------------------------------------------------------- helpers


class Bus:
    """A paho client that records every message under the device's topics."""

    def __init__(self, broker: MosquittoBroker, topics: Topics) -> None:
        self.topics = topics
        self.messages: list[tuple[str, bytes, bool]] = []
        self.proc: subprocess.Popen[bytes] | None = None
        self.cond = threading.Condition()
        self.client = paho.Client(
            callback_api_version=CallbackAPIVersion.VERSION2, client_id="test-bus", protocol=paho.MQTTv5
        )
        self.client.on_message = self._on_message
        self.client.connect(broker.host, broker.port)
        self.client.loop_start()
        info = self.client.subscribe(f"{topics.ns}/devices/#", 1)
        assert info[0] == 0

    def _on_message(self, _c: Any, _u: Any, msg: paho.MQTTMessage) -> None:
        with self.cond:
            self.messages.append((msg.topic, bytes(msg.payload), bool(msg.retain)))
            self.cond.notify_all()

    def publish(self, topic: str, payload: bytes, retain: bool = True) -> None:
        info = self.client.publish(topic, payload, qos=1, retain=retain)
        info.wait_for_publish(10)
        assert info.is_published()

    def wait_for(self, pred: Callable[[str, dict[str, Any]], bool], timeout: float = 60.0) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        seen = 0
        with self.cond:
            while True:
                for topic, payload, _ in self.messages[seen:]:
                    seen += 1
                    try:
                        obj = json.loads(payload)
                    except ValueError:
                        continue
                    if pred(topic, obj):
                        return obj
                left = deadline - time.monotonic()
                if self.proc is not None and self.proc.poll() is not None:
                    raise AssertionError(f"the agent exited with code {self.proc.returncode}")
                if left <= 0:
                    kinds = [(t.rsplit("/", 1)[-1], p[:160]) for t, p, _ in self.messages[-15:]]
                    raise AssertionError(f"timed out; last messages: {kinds}")
                self.cond.wait(min(left, 0.5))

    def events(self) -> list[dict[str, Any]]:
        with self.cond:
            return [json.loads(p) for t, p, _ in self.messages if t == self.topics.events(DEVICE)]

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def variant_for(vid: str, data: bytes, quant: str, sample: BlobRef | None = None) -> Variant:
    return Variant(
        id=vid,
        file=f"{vid}.tflite",
        quantization=quant,  # type: ignore[arg-type]
        inputs=[TensorSpec(name="x", shape=[1, 8], dtype="float32")],
        outputs=[TensorSpec(name="y", shape=[1, 3], dtype="float32")],
        metrics=HostMetrics(size_bytes=len(data), accuracy=1.0),
        sample=sample,
        **blob_fields(data, CHUNK),
    )


def publish_blob(bus: Bus, topics: Topics, data: bytes, skip: set[int] | None = None) -> None:
    sha = hashlib.sha256(data).hexdigest()
    for i, chunk in enumerate(iter_chunks(data, CHUNK)):
        if skip and i in skip:
            continue
        bus.publish(topics.blob(sha, i), chunk)


def write_config(tmp_path: Path, broker: MosquittoBroker, pub: str, store: Path, extra: str = "") -> Path:
    cfg = tmp_path / "agent.toml"
    cfg.write_text(
        f"""
[device]
id = "{DEVICE}"
class = "lab"
[mqtt]
host = "{broker.host}"
port = {broker.port}
{extra}
[trust]
public_keys = ["{pub}"]
[store]
path = "{store}"
min_free_mb = 1
[bench]
threads = [1]
warmup_runs = 2
min_runs = 20
min_seconds = 0.05
max_runs = 2000
timeout_s = 60
[health]
probation_s = 0.5
inferences = 4
[telemetry]
interval_s = 1
[fetch]
timeout_s = 60
""",
        encoding="utf-8",
    )
    return cfg


def new_key() -> tuple[Ed25519PrivateKey, str]:
    key = Ed25519PrivateKey.generate()
    return key, base64.b64encode(key.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)).decode()


def start_agent(cfg: Path, log_path: Path) -> subprocess.Popen[bytes]:
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    with log_path.open("ab") as log_fh:
        return subprocess.Popen([PY, "-m", "agent", "--config", str(cfg)], stderr=log_fh, env=env)


@pytest.fixture(scope="module")
def broker() -> Iterator[MosquittoBroker]:
    with MosquittoBroker() as b:
        yield b


def is_event(kind: str, **fields: Any) -> Callable[[str, dict[str, Any]], bool]:
    def pred(topic: str, obj: dict[str, Any]) -> bool:
        return (
            topic.endswith("/events")
            and obj.get("kind") == kind
            and all(obj.get(k) == v for k, v in fields.items())
        )

    return pred


# ------------------------------------------------------------------------------------------- the story


def test_agent_end_to_end(broker: MosquittoBroker, tiny_models: Path, tmp_path: Path) -> None:
    topics = Topics()
    key, pub = new_key()
    store = tmp_path / "store"
    cfg = write_config(tmp_path, broker, pub, store)
    f32 = (tiny_models / "float32.tflite").read_bytes()
    f16 = (tiny_models / "float16.tflite").read_bytes()
    sample = (tiny_models / "sample.npz").read_bytes()
    garbage = os.urandom(40 * CHUNK + 17)  # 41 chunks: more than the 32-subscription window
    sample_ref = BlobRef.of(sample, CHUNK)
    variants = [
        variant_for("float32", f32, "none", sample_ref),
        variant_for("float16", f16, "float16", sample_ref),
        variant_for("garbage", garbage, "none"),
    ]
    manifest = Manifest(model=MODEL, version=1, created_at=time.time(), baseline="float32", variants=variants)
    signed = sign(manifest, key)

    bus = Bus(broker, topics)
    for data in (f32, f16, sample, garbage):
        publish_blob(bus, topics, data)
    bus.publish(topics.manifest(MODEL), signed.to_json())

    log_path = tmp_path / "agent.log"
    proc = start_agent(cfg, log_path)
    try:
        t0 = time.monotonic()
        report = bus.wait_for(
            lambda t, o: t == topics.report(DEVICE, MODEL) and o.get("manifest_version") == 1
        )
        manifest_to_report = time.monotonic() - t0
        print(f"manifest → report (3 variants, agent start included): {manifest_to_report:.2f} s")
        by_id = {r["variant"]: r for r in report["results"]}
        assert set(by_id) == {"float32", "float16", "garbage"}
        for vid in ("float32", "float16"):
            r = by_id[vid]
            assert r["ok"], r
            lat = r["latency_ms"]
            assert lat["count"] >= 20 and lat["min"] <= lat["p50"] <= lat["p95"] <= lat["p99"] <= lat["max"]
            assert r["runtime"]["name"] == "ai-edge-litert"
            assert r["accuracy"] is not None and r["peak_rss_bytes"] > 0 and r["init_ms"] >= 0
            assert r["energy"]["method"] == "model" and r["energy"]["measured"] is False
        assert by_id["garbage"]["ok"] is False and by_id["garbage"]["error"] == "LOAD_ERROR"
        for data in (f32, f16, garbage):
            sha = hashlib.sha256(data).hexdigest()
            path = store / "blobs" / f"{sha}.tflite"
            assert hashlib.sha256(path.read_bytes()).hexdigest() == sha
            assert (path.stat().st_mode & 0o777) == 0o444
        assert (store / "blobs" / f"{sample_ref.sha256}.npz").exists()
        assert not any((store / "partial").iterdir())
        assert any(e["kind"] == "downloaded" for e in bus.events())

        # ---- assignment → active link + committed status
        assignment = sign(
            Assignment(
                device=DEVICE,
                model=MODEL,
                variant="float16",
                sha256=variants[1].sha256,
                manifest_version=1,
                issued_at=time.time(),
                policy="test",
            ),
            key,
        )
        bus.publish(topics.assign(DEVICE, MODEL), assignment.to_json())
        status = bus.wait_for(
            lambda t, o: (
                t == topics.status(DEVICE) and o.get("models", {}).get(MODEL, {}).get("state") == "committed"
            ),
            timeout=30,
        )
        active = status["models"][MODEL]["active"]
        assert active["variant"] == "float16" and active["sha256"] == variants[1].sha256
        # the active file's own figures from the report, for dashboards reading the status
        runs = [r for r in report["results"] if r["sha256"] == variants[1].sha256 and r["ok"]]
        best = min(runs, key=lambda r: (bool(r.get("contended")), r["latency_ms"]["p50"]))
        assert active["latency_ms_p50"] == best["latency_ms"]["p50"]
        link = store / "models" / MODEL / "active.tflite"
        assert (
            link.is_symlink()
            and link.resolve() == (store / "blobs" / f"{variants[1].sha256}.tflite").resolve()
        )
        info = json.loads((store / "models" / MODEL / "active.json").read_text())
        assert info["variant"] == "float16"

        # ---- tampered manifest → BAD_SIGNATURE, agent keeps running
        tampered = json.loads(sign(manifest.model_copy(update={"version": 2}), key).to_json())
        tampered["labels"] = ["evil"]
        bus.publish(topics.manifest(MODEL), json.dumps(tampered).encode())
        bus.wait_for(is_event("rejected", reason="BAD_SIGNATURE"), timeout=20)
        ping = sign(Command(id="c1", device=DEVICE, action=CommandAction.PING, issued_at=time.time()), key)
        bus.publish(topics.cmd(DEVICE), ping.to_json(), retain=False)
        bus.wait_for(is_event("pong", correlation_id="c1"), timeout=20)
        assert proc.poll() is None

        # ---- corrupt chunk → BAD_HASH, the right chunk afterwards completes the fetch
        fresh = os.urandom(3 * CHUNK)
        v3 = [*variants[:2], variant_for("fresh", fresh, "none")]
        m3 = sign(
            Manifest(model=MODEL, version=3, created_at=time.time(), baseline="float32", variants=v3), key
        )
        sha3 = hashlib.sha256(fresh).hexdigest()
        bus.publish(topics.blob(sha3, 0), b"x" * CHUNK)  # right size, wrong bytes
        publish_blob(bus, topics, fresh, skip={0})
        bus.publish(topics.manifest(MODEL), m3.to_json())
        bus.wait_for(is_event("rejected", reason="BAD_HASH", variant="fresh"), timeout=20)
        bus.publish(topics.blob(sha3, 0), fresh[:CHUNK])
        report3 = bus.wait_for(
            lambda t, o: t == topics.report(DEVICE, MODEL) and o.get("manifest_version") == 3, timeout=60
        )
        assert {r["variant"] for r in report3["results"]} == {"float32", "float16", "fresh"}
        assert (store / "blobs" / f"{sha3}.tflite").exists()
        # the previously committed model stays active through a new manifest's pipeline
        assert link.resolve().name == f"{variants[1].sha256}.tflite"
        bus.wait_for(lambda t, o: t == topics.telemetry(DEVICE), timeout=10)

        # ---- assignments the agent must refuse
        def assign(variant: str, sha: str, version: int, device: str = DEVICE) -> None:
            a = Assignment(
                device=device,
                model=MODEL,
                variant=variant,
                sha256=sha,
                manifest_version=version,
                issued_at=time.time(),
                policy="test",
            )
            bus.publish(topics.assign(DEVICE, MODEL), sign(a, key).to_json())

        assign("float32", variants[0].sha256, 3, device="someone-else")
        bus.wait_for(is_event("rejected", reason="WRONG_DEVICE"), timeout=20)
        assign("nope", variants[0].sha256, 3)
        bus.wait_for(is_event("rejected", reason="UNKNOWN_VARIANT"), timeout=20)
        assign("float32", variants[1].sha256, 3)
        bus.wait_for(is_event("rejected", reason="BAD_HASH", variant="float32"), timeout=20)
        assign("float32", variants[0].sha256, 1)
        bus.wait_for(is_event("rejected", reason="REPLAY", variant="float32"), timeout=20)

        # ---- a model that fails its health check is rolled back to the previous one
        assign("fresh", sha3, 3)  # random bytes: fetched and verified, but not a model
        rolled = bus.wait_for(is_event("rolled_back", reason="HEALTH_CHECK_FAILED"), timeout=30)
        assert rolled["variant"] == "fresh"
        status = bus.wait_for(
            lambda t, o: (
                t == topics.status(DEVICE)
                and o.get("models", {}).get(MODEL, {}).get("state") == "rolled_back"
            ),
            timeout=10,
        )
        assert status["models"][MODEL]["active"]["variant"] == "float16"
        assert link.resolve().name == f"{variants[1].sha256}.tflite"
        rb = sign(
            Command(
                id="c2", device=DEVICE, action=CommandAction.ROLLBACK, model=MODEL, issued_at=time.time()
            ),
            key,
        )
        bus.publish(topics.cmd(DEVICE), rb.to_json(), retain=False)
        bus.wait_for(is_event("rejected", reason="NO_PREVIOUS", correlation_id="c2"), timeout=20)

        # ---- SIGTERM → offline status, exit 0
        assert terminate(proc) == 0
        bus.wait_for(lambda t, o: t == topics.status(DEVICE) and o.get("online") is False, timeout=10)
    finally:
        kill9(proc)
        bus.close()
        print(log_path.read_text(errors="replace")[-6000:])


def test_resume_after_kill_fetches_only_missing_chunks(tiny_models: Path, tmp_path: Path) -> None:
    topics = Topics()
    key, pub = new_key()
    store = tmp_path / "store"
    f32 = (tiny_models / "float32.tflite").read_bytes()
    big = os.urandom(40 * CHUNK + 17)
    variants = [variant_for("float32", f32, "none"), variant_for("big", big, "none")]
    manifest = sign(
        Manifest(model=MODEL, version=1, created_at=time.time(), baseline="float32", variants=variants), key
    )
    big_sha = variants[1].sha256
    with MosquittoBroker() as broker:
        cfg = write_config(tmp_path, broker, pub, store)
        bus = Bus(broker, topics)
        publish_blob(bus, topics, f32)
        publish_blob(bus, topics, big, skip=set(range(20, 41)))
        bus.publish(topics.manifest(MODEL), manifest.to_json())
        log_path = tmp_path / "agent.log"
        proc = start_agent(cfg, log_path)
        try:
            partial = store / "partial" / big_sha
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline and len(list(partial.glob("[0-9]*"))) < 20:
                time.sleep(0.1)
            assert len(list(partial.glob("[0-9]*"))) == 20
            proc.kill()  # SIGKILL: no clean shutdown
            proc.wait(timeout=10)
            state = json.loads((store / "state.json").read_text())
            assert state["models"][MODEL]["state"] == "fetching"
            # the Last Will says offline
            bus.wait_for(lambda t, o: t == topics.status(DEVICE) and o.get("online") is False, timeout=90)

            publish_blob(bus, topics, big, skip=set(range(20)))
            proc = start_agent(cfg, log_path)
            bus.proc = proc
            report = bus.wait_for(lambda t, o: t == topics.report(DEVICE, MODEL), timeout=60)
            assert {r["variant"] for r in report["results"]} == {"float32", "big"}
            log_text = log_path.read_text()
            assert "21 of 41 chunk(s) missing, 20 kept from before" in log_text
            assert hashlib.sha256((store / "blobs" / f"{big_sha}.tflite").read_bytes()).hexdigest() == big_sha
            proc.send_signal(signal.SIGINT)
            assert proc.wait(timeout=20) == 0
        finally:
            kill9(proc)
            bus.close()


@pytest.mark.skipif(shutil.which("mosquitto_passwd") is None, reason="mosquitto_passwd is not installed")
def test_bad_credentials_exit_2(tmp_path: Path) -> None:
    pwfile = tmp_path / "passwd"
    subprocess.run(
        ["mosquitto_passwd", "-c", "-b", str(pwfile), DEVICE, "right"], check=True, capture_output=True
    )
    pwfile.chmod(0o644)
    _key, pub = new_key()
    with MosquittoBroker(extra_config=f"allow_anonymous false\npassword_file {pwfile}\n") as broker:
        cfg = write_config(
            tmp_path, broker, pub, tmp_path / "store", extra=f'username = "{DEVICE}"\npassword = "wrong"'
        )
        t0 = time.monotonic()
        out = subprocess.run(
            [PY, "-m", "agent", "--config", str(cfg)], check=False, capture_output=True, text=True, timeout=60
        )
    assert out.returncode == 2, out.stderr[-2000:]
    assert "refused the connection" in out.stderr and "mqtt.username" in out.stderr
    assert time.monotonic() - t0 < 30


def test_mqtt_311_disk_full_and_ping(tiny_models: Path, tmp_path: Path) -> None:
    """MQTT 3.1.1 works; a manifest that does not fit is refused with DISK_FULL and the agent goes on."""
    topics = Topics()
    key, pub = new_key()
    f32 = (tiny_models / "float32.tflite").read_bytes()
    manifest = sign(
        Manifest(
            model=MODEL,
            version=1,
            created_at=time.time(),
            baseline="float32",
            variants=[variant_for("float32", f32, "none")],
        ),
        key,
    )
    with MosquittoBroker() as broker:
        cfg = write_config(tmp_path, broker, pub, tmp_path / "store", extra='protocol = "v311"')
        cfg.write_text(cfg.read_text().replace("min_free_mb = 1", "min_free_mb = 1e12"))
        bus = Bus(broker, topics)
        proc = start_agent(cfg, tmp_path / "agent.log")
        bus.proc = proc
        try:
            bus.wait_for(lambda t, o: t == topics.status(DEVICE) and o.get("online") is True, timeout=30)
            bus.publish(topics.manifest(MODEL), manifest.to_json())
            bus.wait_for(is_event("rejected", reason="DISK_FULL"), timeout=20)
            ping = sign(
                Command(id="p1", device=DEVICE, action=CommandAction.PING, issued_at=time.time()), key
            )
            bus.publish(topics.cmd(DEVICE), ping.to_json(), retain=False)
            bus.wait_for(is_event("pong", correlation_id="p1"), timeout=20)
            assert not (tmp_path / "store" / "blobs" / f"{sha256_hex(f32)}.tflite").exists()
            assert terminate(proc) == 0
        finally:
            kill9(proc)
            bus.close()


# ------------------------------------------------------------------------------------------- connection


def _signed_assignment(key: Ed25519PrivateKey, variant: Variant) -> bytes:
    a = Assignment(
        device=DEVICE,
        model=MODEL,
        variant=variant.id,
        sha256=variant.sha256,
        manifest_version=1,
        issued_at=time.time(),
        policy="test",
    )
    return sign(a, key).to_json()


def _ping(key: Ed25519PrivateKey, cid: str) -> bytes:
    return sign(
        Command(id=cid, device=DEVICE, action=CommandAction.PING, issued_at=time.time()), key
    ).to_json()


def _online(bus: Bus, timeout: float = 30) -> None:
    bus.wait_for(lambda t, o: t == Topics().status(DEVICE) and o.get("online") is True, timeout=timeout)


def test_mqtt_311_full_loop(tiny_models: Path, tmp_path: Path) -> None:
    """manifest → fetch → verify → benchmark → report → assignment → committed, over MQTT 3.1.1."""
    topics = Topics()
    key, pub = new_key()
    f32 = (tiny_models / "float32.tflite").read_bytes()
    v = variant_for("float32", f32, "none")
    manifest = sign(
        Manifest(model=MODEL, version=1, created_at=time.time(), baseline="float32", variants=[v]), key
    )
    with MosquittoBroker() as broker:
        cfg = write_config(tmp_path, broker, pub, tmp_path / "store", extra='protocol = "v311"')
        bus = Bus(broker, topics)
        publish_blob(bus, topics, f32)
        bus.publish(topics.manifest(MODEL), manifest.to_json())
        proc = start_agent(cfg, tmp_path / "agent.log")
        bus.proc = proc
        try:
            report = bus.wait_for(lambda t, o: t == topics.report(DEVICE, MODEL), timeout=40)
            assert report["results"][0]["ok"]
            bus.publish(topics.assign(DEVICE, MODEL), _signed_assignment(key, v))
            bus.wait_for(is_event("committed", variant="float32"), timeout=30)
            assert terminate(proc) == 0
        finally:
            kill9(proc)
            bus.close()


def test_offline_queue_and_reconnect_after_broker_restart(tmp_path: Path) -> None:
    """Persistent session: a non-retained command sent while the agent is down arrives when it is back;
    a broker restart on the same port is survived (backoff reconnect, birth status republished)."""
    topics = Topics()
    key, pub = new_key()
    broker = MosquittoBroker().start()
    port = broker.port
    cfg = write_config(tmp_path, broker, pub, tmp_path / "store", extra="reconnect_max_s = 2")
    log_path = tmp_path / "agent.log"
    bus = Bus(broker, topics)
    proc = start_agent(cfg, log_path)
    bus.proc = proc
    try:
        _online(bus)
        assert terminate(proc) == 0
        bus.publish(topics.cmd(DEVICE), _ping(key, "queued1"), retain=False)  # agent offline
        proc = start_agent(cfg, log_path)
        bus.proc = proc
        bus.wait_for(is_event("pong", correlation_id="queued1"), timeout=30)

        bus.close()
        broker.stop()
        time.sleep(1.0)
        broker = MosquittoBroker(port=port).start()
        bus = Bus(broker, topics)  # a fresh broker: no retained status unless the agent republishes it
        bus.proc = proc
        _online(bus, timeout=30)
        bus.publish(topics.cmd(DEVICE), _ping(key, "after1"), retain=False)
        bus.wait_for(is_event("pong", correlation_id="after1"), timeout=20)
        assert "disconnected from the broker" in log_path.read_text()
        assert terminate(proc) == 0
    finally:
        kill9(proc)
        bus.close()
        broker.stop()


@pytest.mark.skipif(shutil.which("mosquitto_passwd") is None, reason="mosquitto_passwd is not installed")
def test_tls_with_password_and_with_client_certificate(tmp_path: Path) -> None:
    from deploy.broker.conf import create_ca, issue_cert

    topics = Topics()
    key, pub = new_key()
    ca = create_ca("edgefleet test CA")
    server = issue_cert(ca, "broker", server_names=["127.0.0.1", "localhost"])
    client = issue_cert(ca, DEVICE, client=True)
    (tmp_path / "ca.crt").write_bytes(ca.cert_pem())
    server.write(tmp_path / "server.crt", tmp_path / "server.key")
    client.write(tmp_path / "client.crt", tmp_path / "client.key")
    (tmp_path / "server.key").chmod(0o644)
    pwfile = tmp_path / "passwd"
    subprocess.run(
        ["mosquitto_passwd", "-c", "-b", str(pwfile), DEVICE, "s3cret"], check=True, capture_output=True
    )
    pwfile.chmod(0o644)
    from deploy.broker.spawn import free_port

    cert_port = free_port()
    tls = f"cafile {tmp_path}/ca.crt\ncertfile {tmp_path}/server.crt\nkeyfile {tmp_path}/server.key\n"
    extra = (
        f"password_file {pwfile}\n"  # plain listener (for the test bus) stays anonymous-allowed
        f"listener {{tls_port}} 127.0.0.1\n{tls}"
        f"listener {cert_port} 127.0.0.1\n{tls}require_certificate true\nuse_identity_as_username true\n"
    )
    tls_port = free_port()
    with MosquittoBroker(extra_config=extra.replace("{tls_port}", str(tls_port))) as broker:
        bus = Bus(broker, topics)
        try:
            for n, (port, auth) in enumerate(
                [
                    (tls_port, f'username = "{DEVICE}"\npassword = "s3cret"'),
                    (cert_port, f'cert_file = "{tmp_path}/client.crt"\nkey_file = "{tmp_path}/client.key"'),
                ]
            ):
                cfg = write_config(tmp_path, broker, pub, tmp_path / "store")
                text = cfg.read_text().replace(f"port = {broker.port}", f"port = {port}")
                user = auth if "username" in auth else ""
                tls_cert = "" if user else auth
                text = text.replace(
                    "[trust]", f'{user}\n[mqtt.tls]\nca_file = "{tmp_path}/ca.crt"\n{tls_cert}\n[trust]'
                )
                cfg.write_text(text)
                proc = start_agent(cfg, tmp_path / f"agent{n}.log")
                bus.proc = proc
                try:
                    _online(bus)
                    bus.publish(topics.cmd(DEVICE), _ping(key, f"tls{n}"), retain=False)
                    bus.wait_for(is_event("pong", correlation_id=f"tls{n}"), timeout=20)
                    assert "connecting to mqtts://" in (tmp_path / f"agent{n}.log").read_text()
                    assert terminate(proc) == 0
                    with bus.cond:
                        bus.messages.clear()
                finally:
                    kill9(proc)
        finally:
            bus.close()
