"""Fault injection: refusals that must not stop the daemon, full disks, and kill -9 at the worst moments.

The kill -9 test drives a real agent subprocess against a private mosquitto and SIGKILLs it while it
fetches, while it benchmarks, right after the active symlink is swapped (crash point ``after-swap``) and
during probation. After every kill: ``models/<model>/active.tflite`` is absent or resolves to a complete
blob whose sha256 matches its name, no blob is torn, and state.json loads; after the restart the agent
ends in a settled state.
"""

from __future__ import annotations

import base64
import hashlib
import json
import logging
import os
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat
from test_agent_integration import (  # the shared helpers and the TF-built tiny models fixture
    CHUNK,
    DEVICE,
    MODEL,
    PY,
    Bus,
    is_event,
    new_key,
    publish_blob,
    tiny_models,
    variant_for,
    write_config,
)

from agent.config import HealthConfig, parse_config
from agent.daemon import Agent
from agent.health import check_health
from agent.mqtt import Inbound
from agent.state import StateBook
from agent.store import Store, atomic_symlink
from agent.wire import (
    ActiveVariant,
    Assignment,
    BlobRef,
    Command,
    CommandAction,
    HostMetrics,
    Manifest,
    ModelState,
    TensorSpec,
    Topics,
    Variant,
    blob_fields,
    sign,
)
from deploy.broker.spawn import MosquittoBroker, find_mosquitto

__all__ = ["tiny_models"]  # re-exported fixture

S = ModelState
TOPICS = Topics()


def _b64(key: Ed25519PrivateKey) -> str:
    return base64.b64encode(key.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)).decode()


class FakeBroker:
    """Records publishes and subscriptions; never connects."""

    def __init__(self) -> None:
        import queue

        self.inbox: queue.Queue[Inbound] = queue.Queue()
        self.published: list[tuple[str, bytes, bool]] = []
        self.subs: set[str] = set()

    def start(self) -> None: ...
    def wait_connected(self, timeout: float) -> bool:
        return True

    def is_connected(self) -> bool:
        return True

    def subscribe(self, topic: str, qos: int = 1) -> None:
        self.subs.add(topic)

    def unsubscribe(self, topic: str) -> None:
        self.subs.discard(topic)

    def publish(
        self, topic: str, payload: bytes, qos: int = 1, retain: bool = False, timeout: float = 10.0
    ) -> bool:
        self.published.append((topic, payload, retain))
        return True

    def set_birth(self, topic: str, payload: bytes) -> None: ...
    def stop(self, final: tuple[str, bytes] | None = None, timeout: float = 5.0) -> None: ...

    def events(self) -> list[dict[str, Any]]:
        return [json.loads(p) for t, p, _ in self.published if t.endswith("/events")]


def make_agent(tmp_path: Path, keys: list[Ed25519PrivateKey], **sections: Any) -> tuple[Agent, FakeBroker]:
    raw: dict[str, Any] = {
        "device": {"id": DEVICE},
        "trust": {"public_keys": [_b64(k) for k in keys]},
        "store": {"path": str(tmp_path / "store"), "min_free_mb": 0},
    }
    for name, values in sections.items():
        raw.setdefault(name, {}).update(values)
    fake = FakeBroker()
    return Agent(parse_config(raw), client=fake), fake  # type: ignore[arg-type]


def _variant(vid: str, data: bytes) -> Variant:
    return Variant(
        id=vid,
        file=f"{vid}.tflite",
        quantization="none",
        inputs=[TensorSpec(name="x", shape=[1, 8], dtype="float32")],
        outputs=[TensorSpec(name="y", shape=[1, 3], dtype="float32")],
        metrics=HostMetrics(size_bytes=len(data), accuracy=0.9),
        **blob_fields(data, CHUNK),
    )


def _manifest(version: int, key: Ed25519PrivateKey, data: bytes = b"m" * 3000) -> bytes:
    m = Manifest(
        model=MODEL, version=version, created_at=time.time(), baseline="a", variants=[_variant("a", data)]
    )
    return sign(m, key).to_json()


# ------------------------------------------------------------------------------------ refusals (unit)


def test_second_trusted_key_is_accepted(tmp_path: Path) -> None:
    old, new = Ed25519PrivateKey.generate(), Ed25519PrivateKey.generate()
    agent_obj, fake = make_agent(tmp_path, [old, new])
    agent_obj.handle(Inbound(TOPICS.manifest(MODEL), _manifest(1, new)))
    assert fake.events() == []
    assert agent_obj.book.get(MODEL).state is S.FETCHING and agent_obj.book.get(MODEL).manifest_version == 1
    assert any(t.startswith(f"{TOPICS.ns}/blobs/") for t in fake.subs)


def test_every_refusal_is_an_event_and_the_daemon_goes_on(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    key, stranger = Ed25519PrivateKey.generate(), Ed25519PrivateKey.generate()
    agent_obj, fake = make_agent(tmp_path, [key], mqtt={"max_payload_kb": 16}, commands={"max_age_s": 60})
    handle = agent_obj.handle
    mt = TOPICS.manifest(MODEL)

    handle(Inbound(mt, _manifest(5, key)))  # accepted: v5 held
    unsigned = json.loads(_manifest(6, key))
    del unsigned["signature"]
    handle(Inbound(mt, json.dumps(unsigned).encode()))
    tampered = json.loads(_manifest(6, key))
    tampered["version"] = 7
    handle(Inbound(mt, json.dumps(tampered).encode()))
    handle(Inbound(mt, _manifest(6, stranger)))
    handle(Inbound(mt, _manifest(3, key)))  # replay of an older version
    handle(Inbound(mt, b'{"pad": "' + b"x" * 20_000 + b'"}'))  # over mqtt.max_payload_kb
    handle(Inbound(f"{TOPICS.ns}/models/Bad!Model/manifest", _manifest(6, key)))
    stale = Command(id="old1", device=DEVICE, action=CommandAction.PING, issued_at=time.time() - 3600)
    handle(Inbound(TOPICS.cmd(DEVICE), sign(stale, key).to_json()))
    ping = Command(id="p1", device=DEVICE, action=CommandAction.PING, issued_at=time.time())
    handle(Inbound(TOPICS.cmd(DEVICE), sign(ping, stranger).to_json()))
    with caplog.at_level(logging.DEBUG, logger="agent.daemon"):
        handle(Inbound(TOPICS.assign("other-device", MODEL), b"{}"))  # not subscribed: ignored
        handle(Inbound("someone/else/topic", b"x"))
    handle(Inbound(TOPICS.cmd(DEVICE), sign(ping, key).to_json()))  # still alive and answering

    got = [(e["kind"], e.get("reason"), e.get("correlation_id")) for e in fake.events()]
    assert got == [
        ("rejected", "UNSIGNED", None),
        ("rejected", "BAD_SIGNATURE", None),
        ("rejected", "UNKNOWN_KEY", None),
        ("rejected", "REPLAY", None),
        ("rejected", "TOO_LARGE", None),
        ("rejected", "BAD_IDENTIFIER", None),
        ("rejected", "REPLAY", "old1"),
        ("rejected", "UNKNOWN_KEY", None),
        ("pong", None, "p1"),
    ]
    assert "stale command" in fake.events()[6]["detail"]
    ignored = [r for r in caplog.records if "ignoring message" in r.getMessage()]
    assert len(ignored) == 2 and all(r.levelno == logging.DEBUG for r in ignored)
    assert agent_obj.book.get(MODEL).manifest_version == 5


def test_bad_chunks_are_refused_with_their_reason(tmp_path: Path) -> None:
    key = Ed25519PrivateKey.generate()
    agent_obj, fake = make_agent(tmp_path, [key])
    data = os.urandom(2 * CHUNK + 10)
    agent_obj.handle(Inbound(TOPICS.manifest(MODEL), _manifest(1, key, data)))
    sha = hashlib.sha256(data).hexdigest()
    agent_obj.handle(Inbound(TOPICS.blob(sha, 0), b"x" * CHUNK))  # right size, wrong bytes
    agent_obj.handle(Inbound(TOPICS.blob(sha, 1), data[CHUNK : 2 * CHUNK - 1]))  # one byte short
    assert [e.get("reason") for e in fake.events()] == ["BAD_HASH", "BAD_SIZE"]
    assert not (tmp_path / "store" / "partial" / sha / "0").exists()


def test_disk_budget_refuses_the_fetch_and_keeps_the_current_model(tmp_path: Path) -> None:
    key = Ed25519PrivateKey.generate()
    agent_obj, fake = make_agent(tmp_path, [key], store={"disk_budget_mb": 0.01})  # ~10 KiB
    store = agent_obj.store
    current = b"c" * 4000
    sha = hashlib.sha256(current).hexdigest()
    store.write_chunk(BlobRef.of(current, CHUNK * 8), 0, current)
    store.assemble(BlobRef.of(current, CHUNK * 8))
    store.activate(MODEL, sha)
    orphan = os.urandom(3000)  # referenced by nothing: GC may take it to make room
    store.write_chunk(BlobRef.of(orphan, CHUNK * 8), 0, orphan)
    store.assemble(BlobRef.of(orphan, CHUNK * 8))
    agent_obj.handle(Inbound(TOPICS.manifest(MODEL), _manifest(1, key, os.urandom(20_000))))
    ev = fake.events()[-1]
    assert ev["kind"] == "rejected" and ev["reason"] == "DISK_FULL" and "disk_budget_mb" in ev["detail"]
    assert store.link_sha(store.active_link(MODEL)) == sha and store.has_blob(sha)
    assert not store.has_blob(hashlib.sha256(orphan).hexdigest())  # GC ran before giving up
    assert agent_obj.book.get(MODEL).state is S.IDLE
    assert not list(store.partial.iterdir())


def test_restart_during_a_first_activation_leaves_no_model_active(tmp_path: Path) -> None:
    store = Store(tmp_path / "store")
    store.ensure()
    data = b"n" * 1500
    ref = BlobRef.of(data, CHUNK * 8)
    store.write_chunk(ref, 0, data)
    store.assemble(ref)
    book = StateBook(store)
    for s in (S.FETCHING, S.VERIFYING, S.BENCHMARKING, S.REPORTED):
        book.move(MODEL, s)
    target = ActiveVariant(variant="a", sha256=ref.sha256, manifest_version=1, activated_at=2.0)
    book.move(MODEL, S.ACTIVATING, target=target)
    store.activate(MODEL, ref.sha256)  # swapped, then the power went
    agent_obj, fake = make_agent(tmp_path, [Ed25519PrivateKey.generate()])
    agent_obj.recover()
    assert not store.active_link(MODEL).is_symlink()
    assert agent_obj.book.get(MODEL).state is S.ROLLED_BACK and agent_obj.book.get(MODEL).active is None
    assert fake.events()[-1]["kind"] == "rolled_back"


@pytest.mark.parametrize("cut", ["after_restore", "inside_restore"])
def test_restart_during_a_rollback_finishes_it(tmp_path: Path, cut: str) -> None:
    """rollback() swaps the link back, then records ROLLED_BACK: a kill in between must not leave the
    state naming the failed variant while the old one runs (and a later probation 'commit' it)."""
    store = Store(tmp_path / "store")
    store.ensure()
    refs = {}
    for name, fill in (("old", b"o"), ("new", b"n")):
        data = fill * 1500
        refs[name] = BlobRef.of(data, CHUNK * 8)
        store.write_chunk(refs[name], 0, data)
        store.assemble(refs[name])
    old = ActiveVariant(variant="old", sha256=refs["old"].sha256, manifest_version=1, activated_at=1.0)
    new = ActiveVariant(variant="new", sha256=refs["new"].sha256, manifest_version=2, activated_at=2.0)
    book = StateBook(store)
    for s in (S.FETCHING, S.VERIFYING, S.BENCHMARKING, S.REPORTED, S.ACTIVATING):
        book.move(MODEL, s)
    store.activate(MODEL, old.sha256)
    book.move(MODEL, S.PROBATION, active=old)
    book.move(MODEL, S.COMMITTED)
    book.move(MODEL, S.ACTIVATING, target=new)
    store.activate(MODEL, new.sha256)
    book.move(MODEL, S.PROBATION, active=new, previous=old, manifest_version=2)
    if cut == "after_restore":
        store.restore_previous(MODEL)  # link back at old, previous dropped; then the power went
    else:
        atomic_symlink(f"../../blobs/{old.sha256}.tflite", store.active_link(MODEL))  # previous still there
    agent_obj, fake = make_agent(tmp_path, [Ed25519PrivateKey.generate()])
    agent_obj.recover()
    rec = agent_obj.book.get(MODEL)
    assert rec.state is S.ROLLED_BACK
    assert rec.active is not None and rec.active.sha256 == old.sha256 == store.link_sha(
        store.active_link(MODEL)
    )
    assert not store.previous_link(MODEL).is_symlink()
    assert store.read_active_info(MODEL) == rec.active
    assert rec.rejected_assignment == ("new", new.sha256, 2)  # the retained assignment is not re-applied
    assert fake.events()[-1]["kind"] == "rolled_back"


def test_health_check_compares_sample_accuracy_with_the_host(tiny_models: Path, tmp_path: Path) -> None:
    model = tiny_models / "float32.tflite"
    with np.load(tiny_models / "sample.npz") as npz:
        x, y = npz["x"], npz["y"]
    wrong = tmp_path / "wrong.npz"
    np.savez(wrong, x=x, y=(y + 1) % 3)  # every label shifted: a model that "works" but is wrong
    cfg = HealthConfig(inferences=4, accuracy_tolerance=0.05)
    from ai_edge_litert.interpreter import Interpreter

    it = Interpreter(model_path=str(model))
    it.allocate_tensors()
    predicted = []
    for row in x:
        it.set_tensor(it.get_input_details()[0]["index"], row[None].astype(np.float32))
        it.invoke()
        predicted.append(int(np.argmax(it.get_tensor(it.get_output_details()[0]["index"]))))
    host = float(np.mean(np.array(predicted) == y))  # what the compressor records as sample_accuracy

    def variant(sample_accuracy: float) -> Variant:
        data = model.read_bytes()
        spec = TensorSpec(name="x", shape=[1, *x.shape[1:]], dtype="float32")
        return Variant(
            id="a",
            file="a.tflite",
            quantization="none",
            inputs=[spec],
            outputs=[spec],
            metrics=HostMetrics(accuracy=0.5, sample_accuracy=sample_accuracy, size_bytes=len(data)),
            **blob_fields(data),
        )

    assert check_health(model, tiny_models / "sample.npz", variant(host), cfg, memory_limit_mb=1024) is None
    problem = check_health(model, wrong, variant(host), cfg, memory_limit_mb=1024)
    assert problem is not None and problem.startswith("ACCURACY_MISMATCH")
    assert "on the same sample" in problem
    # the device reproducing a different figure than the host recorded is refused too
    problem = check_health(
        model, tiny_models / "sample.npz", variant(abs(host - 0.5)), cfg, memory_limit_mb=1024
    )
    assert problem is not None and problem.startswith("ACCURACY_MISMATCH")
    garbage = tmp_path / "garbage.tflite"
    garbage.write_bytes(os.urandom(2048))
    assert check_health(garbage, None, None, cfg, memory_limit_mb=1024) is not None


# ------------------------------------------------------------------------------------ kill -9 (integration)


def _consistent(store: Path, allowed: set[str | None]) -> str | None:
    """Assert the store invariant after a crash; return the active sha (None = nothing active)."""
    for blob in (store / "blobs").glob("*.tflite"):
        assert hashlib.sha256(blob.read_bytes()).hexdigest() == blob.stem, f"torn blob {blob}"
    assert not list((store / "blobs").glob(".*")), "temp files left in blobs/"
    json.loads((store / "state.json").read_text())
    link = store / "models" / MODEL / "active.tflite"
    if not link.is_symlink() or not (link.parent / "current").is_symlink():  # none (or fixed links ahead)
        assert None in allowed, "no model active, but one should be"
        return None
    target = link.resolve(strict=True)
    sha = hashlib.sha256(target.read_bytes()).hexdigest()
    assert sha == target.stem and sha in allowed, f"active {sha[:12]} not in {allowed}"
    return sha


def _state(store: Path) -> str | None:
    try:
        return str(json.loads((store / "state.json").read_text())["models"][MODEL]["state"])
    except (OSError, ValueError, KeyError):
        return None


def _wait_state(store: Path, states: set[str], proc: subprocess.Popen[bytes], timeout: float = 30) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        s = _state(store)
        if s in states:
            return s
        assert proc.poll() is None or states & {"activating"}, f"agent exited ({proc.returncode})"
        time.sleep(0.01)
    raise AssertionError(f"state {_state(store)} never reached {states}")


def _start(cfg: Path, log: Path, crash_at: str | None = None) -> subprocess.Popen[bytes]:
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    env.pop("EDGEFLEET_CRASH_AT", None)
    if crash_at:
        env["EDGEFLEET_CRASH_AT"] = crash_at
    with log.open("ab") as fh:
        return subprocess.Popen([PY, "-m", "agent", "--config", str(cfg)], stderr=fh, env=env)


def _kill(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=10)


@pytest.mark.integration
@pytest.mark.skipif(find_mosquitto() is None, reason="mosquitto is not installed")
def test_kill_9_anywhere_leaves_old_or_new_model_active(tiny_models: Path, tmp_path: Path) -> None:
    key, pub = new_key()
    store = tmp_path / "store"
    f32 = (tiny_models / "float32.tflite").read_bytes()
    f16 = (tiny_models / "float16.tflite").read_bytes()
    sample = (tiny_models / "sample.npz").read_bytes()
    sref = BlobRef.of(sample, CHUNK)
    v = [variant_for("float32", f32, "none", sref), variant_for("float16", f16, "float16", sref)]
    s32, s16 = v[0].sha256, v[1].sha256
    manifest = sign(
        Manifest(model=MODEL, version=1, created_at=time.time(), baseline="float32", variants=v), key
    )
    log = tmp_path / "agent.log"
    with MosquittoBroker() as broker:
        cfg = write_config(tmp_path, broker, pub, store)
        cfg.write_text(cfg.read_text().replace("min_seconds = 0.05", "min_seconds = 1.0"))
        bus = Bus(broker, TOPICS)

        def assign(variant: str, sha: str) -> None:
            a = Assignment(
                device=DEVICE, model=MODEL, variant=variant, sha256=sha, manifest_version=1,
                issued_at=time.time(), policy="test",
            )  # fmt: skip
            bus.publish(TOPICS.assign(DEVICE, MODEL), sign(a, key).to_json())

        def forget() -> None:
            with bus.cond:
                bus.messages.clear()  # wait_for scans from the start: only what comes next counts

        def committed(variant: str) -> None:
            bus.wait_for(
                lambda t, o: (
                    t == TOPICS.status(DEVICE)
                    and o.get("models", {}).get(MODEL, {}).get("state") == "committed"
                    and o["models"][MODEL]["active"]["variant"] == variant
                ),
                timeout=40,
            )

        proc = None
        try:
            # 1. during the fetch: half of float16's chunks are on the broker
            publish_blob(bus, TOPICS, f32)
            publish_blob(bus, TOPICS, sample)
            n16 = len(v[1].chunks)
            publish_blob(bus, TOPICS, f16, skip=set(range(n16 // 2, n16)))
            bus.publish(TOPICS.manifest(MODEL), manifest.to_json())
            proc = _start(cfg, log)
            partial = store / "partial" / s16
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline and len(list(partial.glob("[0-9]*"))) < n16 // 2:
                time.sleep(0.02)
            _kill(proc)
            assert _state(store) == "fetching"
            assert _consistent(store, {None}) is None
            assert len(list(partial.glob("[0-9]*"))) == n16 // 2  # kept for the resume

            # 2. during benchmarking
            publish_blob(bus, TOPICS, f16, skip=set(range(n16 // 2)))
            proc = _start(cfg, log)
            _wait_state(store, {"benchmarking"}, proc)
            time.sleep(0.3)
            _kill(proc)
            assert _state(store) == "benchmarking"
            _consistent(store, {None})
            proc = _start(cfg, log)
            bus.proc = proc
            bus.wait_for(lambda t, o: t == TOPICS.report(DEVICE, MODEL), timeout=40)
            assign("float32", s32)
            committed("float32")
            assert _consistent(store, {s32}) == s32
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(timeout=20) == 0

            # 3. right after the symlink swap (activating, before probation is persisted)
            bus.proc = None
            proc = _start(cfg, log, crash_at="after-swap")
            time.sleep(1.0)
            forget()
            assign("float16", s16)
            assert proc.wait(timeout=30) == -signal.SIGKILL
            assert _state(store) == "activating"
            assert _consistent(store, {s32, s16}) == s16  # swapped: the new model, complete and verified
            proc = _start(cfg, log)  # undoes the activation, then the retained assignment redoes it
            bus.proc = proc
            bus.wait_for(is_event("rolled_back", reason="INTERNAL"), timeout=30)
            committed("float16")
            assert _consistent(store, {s16}) == s16

            # 4. during probation
            cfg.write_text(cfg.read_text().replace("probation_s = 0.5", "probation_s = 30"))
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(timeout=20) == 0
            proc = _start(cfg, log)
            bus.proc = proc
            forget()
            assign("float32", s32)
            _wait_state(store, {"probation"}, proc)
            _kill(proc)
            assert _consistent(store, {s32, s16}) == s32
            cfg.write_text(cfg.read_text().replace("probation_s = 30", "probation_s = 0.5"))
            forget()
            proc = _start(cfg, log)
            bus.proc = proc
            committed("float32")
            assert _consistent(store, {s32}) == s32
            assert _state(store) == "committed"
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(timeout=20) == 0
        finally:
            if proc is not None:
                _kill(proc)
            bus.close()
            print(log.read_text(errors="replace")[-5000:])
