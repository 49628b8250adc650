"""The agent keeps answering while it measures (issue 14): pings during a benchmark, a benchmark ended
by a newer manifest and by a ``cancel`` command, an assignment that waits for the measurement, and a
rebenchmark that goes through BENCHMARKING and back.

The integration test drives ``python -m agent`` against a private mosquitto; the long benchmark is the
tiny model with ``min_seconds = 300`` (the test cancels it long before). ``benches/agent_responsive.py``
measures the ping latency over a whole ~60 s benchmark.
"""

from __future__ import annotations

import base64
import json
import time
from pathlib import Path
from typing import Any

import pytest
from agent_helpers import bench_children, kill9, signed_assignment, signed_ping, start_agent, terminate
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat
from test_agent_integration import (  # the shared helpers and the TF-built tiny models fixture
    CHUNK,
    DEVICE,
    MODEL,
    Bus,
    is_event,
    new_key,
    publish_blob,
    tiny_models,
    variant_for,
    write_config,
)

from agent.config import parse_config
from agent.mqtt import Inbound
from agent.state import StateBook
from agent.store import Store
from agent.wire import (
    ActiveVariant,
    BlobRef,
    Command,
    CommandAction,
    Manifest,
    ModelState,
    Topics,
    iter_chunks,
    sign,
)
from deploy.broker.spawn import MosquittoBroker, find_mosquitto

__all__ = ["tiny_models"]  # re-exported fixture

TOPICS = Topics()
S = ModelState


def _command(key: Ed25519PrivateKey, cid: str, action: CommandAction, model: str | None = None) -> bytes:
    cmd = Command(id=cid, device=DEVICE, action=action, model=model, issued_at=time.time())
    return sign(cmd, key).to_json()


def _state(bus: Bus, timeout: float, state: str, version: int) -> dict[str, Any]:
    def pred(topic: str, obj: dict[str, Any]) -> bool:
        rec = (obj.get("models") or {}).get(MODEL) or {}
        return (
            topic == TOPICS.status(DEVICE)
            and rec.get("state") == state
            and rec.get("manifest_version") == version
        )

    return bus.wait_for(pred, timeout=timeout)


def _ping_rtt(bus: Bus, key: Ed25519PrivateKey, cid: str) -> float:
    t0 = time.monotonic()
    bus.publish(TOPICS.cmd(DEVICE), signed_ping(key, DEVICE, cid), retain=False)
    bus.wait_for(is_event("pong", correlation_id=cid), timeout=10)
    return time.monotonic() - t0


@pytest.mark.integration
@pytest.mark.skipif(find_mosquitto() is None, reason="mosquitto is not installed")
def test_pings_answered_while_benchmarking_and_cancel_ends_it(tiny_models: Path, tmp_path: Path) -> None:
    key, pub = new_key()
    f32 = (tiny_models / "float32.tflite").read_bytes()
    f16 = (tiny_models / "float16.tflite").read_bytes()

    def manifest(version: int, data: bytes, vid: str, quant: str) -> bytes:
        m = Manifest(
            model=MODEL,
            version=version,
            created_at=time.time(),
            baseline=vid,
            variants=[variant_for(vid, data, quant)],
        )
        return sign(m, key).to_json()

    with MosquittoBroker() as broker:
        cfg = write_config(tmp_path, broker, pub, tmp_path / "store")
        # a benchmark that would last five minutes: only cancelling ends it within the test
        text = (
            cfg.read_text()
            .replace("min_seconds = 0.05", "min_seconds = 300")
            .replace("max_runs = 2000", "max_runs = 100000000")
        )
        cfg.write_text(text.replace("timeout_s = 60\n[health]", "timeout_s = 900\n[health]"))
        bus = Bus(broker, TOPICS)
        proc = start_agent(cfg, tmp_path / "agent.log")
        bus.proc = proc
        try:
            bus.wait_for(lambda t, o: t == TOPICS.status(DEVICE) and o.get("online") is True, timeout=30)
            publish_blob(bus, TOPICS, f32)
            publish_blob(bus, TOPICS, f16)
            bus.publish(TOPICS.manifest(MODEL), manifest(1, f32, "float32", "none"))
            _state(bus, 30, "benchmarking", 1)
            deadline = time.monotonic() + 10
            while not bench_children(proc.pid):
                assert time.monotonic() < deadline, "no benchmark child appeared"
                time.sleep(0.1)
            first_child = bench_children(proc.pid)[0].pid

            # answered while the child measures (the floor of 1 s is the bench's; here: not minutes)
            rtts = [_ping_rtt(bus, key, f"p{i}") for i in range(3)]
            assert max(rtts) < 5.0, rtts
            assert bench_children(proc.pid), "the benchmark ended on its own: the pings proved nothing"

            # an assignment waits for the measurement (v1's float32 is stored and verified by now)
            v1 = variant_for("float32", f32, "none")
            bus.publish(
                TOPICS.assign(DEVICE, MODEL), signed_assignment(key, DEVICE, MODEL, "float32", v1.sha256, 1)
            )
            time.sleep(1.0)
            assert not [e for e in bus.events() if e["kind"] in ("activated", "rejected")]

            # a newer manifest ends v1's child and starts over with v2
            bus.publish(TOPICS.manifest(MODEL), manifest(2, f16, "float16", "float16"))
            _state(bus, 30, "benchmarking", 2)
            deadline = time.monotonic() + 10
            while first_child in [c.pid for c in bench_children(proc.pid)] or not bench_children(proc.pid):
                assert time.monotonic() < deadline, "v1's child was not replaced by v2's"
                time.sleep(0.1)

            # a cancel command ends v2's child: back to idle, an ack, no report
            t0 = time.monotonic()
            bus.publish(TOPICS.cmd(DEVICE), _command(key, "c1", CommandAction.CANCEL, MODEL), retain=False)
            ack = bus.wait_for(is_event("ack", correlation_id="c1"), timeout=10)
            assert "cancelled" in ack["detail"]
            _state(bus, 10, "idle", 2)
            while bench_children(proc.pid):
                assert time.monotonic() - t0 < 5, "the benchmark child outlived the cancel"
                time.sleep(0.1)
            assert not [t for t, _, _ in bus.messages if t == TOPICS.report(DEVICE, MODEL)]
            assert not [e for e in bus.events() if e["kind"] == "benchmarked"]
            # the waiting v1 assignment is applied when the measurement ends: older than the held v2 now,
            # it is refused as a replay, never activated
            bus.wait_for(is_event("rejected", reason="REPLAY", variant="float32"), timeout=10)
            assert not [e for e in bus.events() if e["kind"] == "activated"]

            # a second cancel has nothing to end
            bus.publish(TOPICS.cmd(DEVICE), _command(key, "c2", CommandAction.CANCEL, MODEL), retain=False)
            refused = bus.wait_for(is_event("rejected", correlation_id="c2"), timeout=10)
            assert refused["reason"] == "NOT_RUNNING"
            assert _ping_rtt(bus, key, "p9") < 5.0
            assert terminate(proc) == 0
            state = json.loads((tmp_path / "store" / "state.json").read_text())["models"][MODEL]
            assert state["state"] == "idle" and state["manifest_version"] == 2
        finally:
            kill9(proc)
            bus.close()


# ------------------------------------------------------------------------------------ unit (no broker)


class _Recorder:
    """Records what the agent publishes (a fake broker for a unit test of the dispatch logic)."""

    def __init__(self) -> None:
        import queue

        self.inbox: queue.Queue[Inbound] = queue.Queue()
        self.published: list[tuple[str, bytes]] = []

    def publish(self, topic: str, payload: bytes, qos: int = 1, retain: bool = False, **_k: Any) -> bool:
        self.published.append((topic, payload))
        return True

    def subscribe(self, topic: str, qos: int = 1) -> None: ...
    def unsubscribe(self, topic: str) -> None: ...
    def set_birth(self, topic: str, payload: bytes) -> None: ...

    def events(self) -> list[dict[str, Any]]:
        return [json.loads(p) for t, p in self.published if t.endswith("/events")]


def _committed_agent(tiny_models: Path, tmp_path: Path) -> tuple[Any, _Recorder, Ed25519PrivateKey, Any]:
    """An agent whose model is committed (float32 of the tiny models, manifest v1), not started."""
    from agent.daemon import Agent

    key = Ed25519PrivateKey.generate()
    pub = base64.b64encode(key.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)).decode()
    store = Store(tmp_path / "s")
    store.ensure()
    data = (tiny_models / "float32.tflite").read_bytes()
    ref = BlobRef.of(data, CHUNK)
    for i, chunk in enumerate(iter_chunks(data, CHUNK)):
        store.write_chunk(ref, i, chunk)
    store.assemble(ref)
    v = variant_for("float32", data, "none")
    m = sign(Manifest(model=MODEL, version=1, created_at=time.time(), baseline="float32", variants=[v]), key)
    store.write_manifest(MODEL, m.to_json())
    info = ActiveVariant(variant="float32", sha256=v.sha256, manifest_version=1, activated_at=1.0)
    store.activate(MODEL, v.sha256)
    store.write_active_info(MODEL, info)
    book = StateBook(store)
    for s in (S.FETCHING, S.VERIFYING, S.BENCHMARKING, S.REPORTED, S.ACTIVATING, S.PROBATION, S.COMMITTED):
        book.move(MODEL, s, manifest_version=1, active=info)
    cfg = parse_config(
        {
            "device": {"id": DEVICE},
            "trust": {"public_keys": [pub]},
            "store": {"path": str(tmp_path / "s"), "min_free_mb": 0},
            "bench": {"min_runs": 5, "min_seconds": 0.0, "warmup_runs": 1, "threads": [1]},
            "thermal": {"cool_below_c": None},
        }
    )
    fake = _Recorder()
    return Agent(cfg, client=fake), fake, key, info  # type: ignore[arg-type]


def _wait_idle(agent_obj: Any) -> None:
    deadline = time.monotonic() + 60
    while agent_obj.pipeline.job(MODEL) is not None:
        assert time.monotonic() < deadline, "the measurement did not end within 60 s"
        time.sleep(0.05)
    agent_obj.pipeline.shutdown()


def test_rebenchmark_goes_through_benchmarking_and_back(tiny_models: Path, tmp_path: Path) -> None:
    agent_obj, fake, key, info = _committed_agent(tiny_models, tmp_path)
    agent_obj.handle(Inbound(TOPICS.cmd(DEVICE), _command(key, "r1", CommandAction.REBENCHMARK, MODEL)))
    rec = agent_obj.book.get(MODEL)
    assert rec.state is S.BENCHMARKING and rec.return_to is S.COMMITTED and rec.active == info
    assert json.loads(agent_obj.store.state_path.read_text())["models"][MODEL]["state"] == "benchmarking"
    _wait_idle(agent_obj)  # the worker thread measures
    rec = agent_obj.book.get(MODEL)
    assert rec.state is S.COMMITTED and rec.return_to is None and rec.active == info
    acks = [e["detail"] for e in fake.events() if e["kind"] == "ack" and e.get("correlation_id") == "r1"]
    assert acks == ["rebenchmark started", "rebenchmark done; report republished"]
    assert any(t == TOPICS.report(DEVICE, MODEL) for t, _ in fake.published)
    # not benchmarking any more: a cancel is refused with its reason
    agent_obj.handle(Inbound(TOPICS.cmd(DEVICE), _command(key, "c1", CommandAction.CANCEL, MODEL)))
    assert fake.events()[-1]["reason"] == "NOT_RUNNING"


def test_a_rebenchmark_cut_by_a_restart_resumes_as_a_rebenchmark(tiny_models: Path, tmp_path: Path) -> None:
    """Killed mid-rebenchmark: the restarted agent measures again and returns to committed (no refetch,
    no REPORTED that would let a re-delivered assignment activate the running model a second time)."""
    first, _, _key, info = _committed_agent(tiny_models, tmp_path)
    first.book.move(MODEL, S.BENCHMARKING, return_to=S.COMMITTED)  # what the command persists first
    again = StateBook(first.store)
    again.load()
    assert again.get(MODEL).return_to is S.COMMITTED  # persisted
    from agent.daemon import Agent

    fake = _Recorder()
    agent_obj = Agent(first.config, client=fake)  # type: ignore[arg-type]
    agent_obj.recover()
    job = agent_obj.pipeline.job(MODEL)
    assert job is not None and job.kind.value == "rebenchmark"
    _wait_idle(agent_obj)
    rec = agent_obj.book.get(MODEL)
    assert rec.state is S.COMMITTED and rec.active == info and rec.return_to is None
    assert any(t == TOPICS.report(DEVICE, MODEL) for t, _ in fake.published)
    assert not [e for e in fake.events() if e["kind"] == "downloaded"]
