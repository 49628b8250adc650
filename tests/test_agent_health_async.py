"""The activation health check runs off the agent's main loop (issue 14).

A real agent (``python -m agent``) against a private mosquitto, real TFLite models: one-op
FULLY_CONNECTED models of 1024×1024 weights (4 MiB, built without TensorFlow) and ``health.inferences``
high enough that each check runs for seconds (about 3 s on a 2-core x86 host, far more on a Pi). While a
check's child runs, pings are answered in under a second and the activation still ends right: committed
after a passing check, rolled back (HEALTH_CHECK_FAILED) after a slow failing one (its labelled sample
disagrees with the host's accuracy: the first child passes, the accuracy child fails), rolled back by a
``rollback`` command that cancels the check, and checked again after a SIGTERM during the check. A newer
manifest during a check waits until the activation settles. The unit test drives
:class:`agent.health.HealthChecks` directly: a cancelled check's child is killed and its outcome dropped.
"""

from __future__ import annotations

import io
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import psutil
import pytest
from agent_helpers import (
    bench_children,
    build_fc_model,
    kill9,
    link_sha,
    model_record,
    publish_many,
    signed_assignment,
    signed_ping,
    start_agent,
    terminate,
)
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from test_agent_integration import DEVICE, MODEL, Bus, is_event, new_key, write_config

from agent.config import HealthConfig
from agent.errors import IntegrityError
from agent.fetch import FetchNote
from agent.health import HealthChecks
from agent.wire import (
    BlobRef,
    Command,
    CommandAction,
    HostMetrics,
    IdentifierError,
    Manifest,
    PayloadError,
    ReasonCode,
    TensorSpec,
    Topics,
    Variant,
    blob_fields,
    check_id,
    iter_chunks,
    parse_json,
    sign,
)
from deploy.broker.spawn import MosquittoBroker, find_mosquitto

TOPICS = Topics()
N = 1024  # FC width: 4 MiB of weights, ~50 µs per inference on x86 (child overhead included)
INFERENCES = 60_000  # ~3 s of health check on x86
CHUNK = 256 * 1024


def _fc(seed: int) -> bytes:
    rng = np.random.default_rng(seed)
    return build_fc_model(rng.standard_normal((N, N)).astype(np.float32) * 0.01, np.zeros(N, np.float32))


def _sample(seed: int) -> bytes:
    """16 input rows with labels no model agrees with reliably (random classes among 1024)."""
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    np.savez(buf, x=rng.standard_normal((16, N)).astype(np.float32), y=rng.integers(0, N, 16))
    return buf.getvalue()


def _variant(vid: str, data: bytes, sample: bytes | None = None) -> Variant:
    spec_in = TensorSpec(name="x", shape=[1, N], dtype="float32")
    spec_out = TensorSpec(name="y", shape=[1, N], dtype="float32")
    return Variant(
        id=vid,
        file=f"{vid}.tflite",
        quantization="none",
        inputs=[spec_in],
        outputs=[spec_out],
        # sample_accuracy 1.0 against random labels: the on-device accuracy check must fail
        metrics=HostMetrics(size_bytes=len(data), accuracy=1.0, sample_accuracy=1.0 if sample else None),
        sample=BlobRef(**blob_fields(sample, CHUNK)) if sample is not None else None,
        **blob_fields(data, CHUNK),
    )


def _blobs(*datas: bytes) -> list[tuple[str, bytes]]:
    out = []
    for data in datas:
        sha = blob_fields(data, CHUNK)["sha256"]
        out += [(TOPICS.blob(sha, i), c) for i, c in enumerate(iter_chunks(data, CHUNK))]
    return out


def _wait_child(pid: int, timeout: float = 15) -> psutil.Process:
    deadline = time.monotonic() + timeout
    while True:
        found = bench_children(pid)
        if found:
            return found[0]
        assert time.monotonic() < deadline, "no health-check child appeared"
        time.sleep(0.05)


def _wait_no_child(pid: int, timeout: float) -> float:
    t0 = time.monotonic()
    while bench_children(pid):
        assert time.monotonic() - t0 < timeout, f"a health-check child outlived {timeout} s"
        time.sleep(0.05)
    return time.monotonic() - t0


def _ping_rtt(bus: Bus, key: Ed25519PrivateKey, cid: str) -> float:
    t0 = time.monotonic()
    bus.publish(TOPICS.cmd(DEVICE), signed_ping(key, DEVICE, cid), retain=False)
    bus.wait_for(is_event("pong", correlation_id=cid), timeout=10)
    return time.monotonic() - t0


def _status_state(bus: Bus, state: str, timeout: float = 30) -> dict[str, Any]:
    def pred(topic: str, obj: dict[str, Any]) -> bool:
        return (
            topic == TOPICS.status(DEVICE)
            and ((obj.get("models") or {}).get(MODEL) or {}).get("state") == state
        )

    return bus.wait_for(pred, timeout=timeout)


@dataclass
class Rig:
    bus: Bus
    key: Ed25519PrivateKey
    cfg: Path
    log: Path
    store: Path
    proc: Any
    variants: dict[str, Variant]

    def assign(self, vid: str, version: int = 1) -> None:
        v = self.variants[vid]
        payload = signed_assignment(self.key, DEVICE, MODEL, vid, v.sha256, version)
        self.bus.publish(TOPICS.assign(DEVICE, MODEL), payload)

    def manifest(self, version: int, ids: list[str]) -> bytes:
        m = Manifest(
            model=MODEL,
            version=version,
            created_at=time.time(),
            baseline=ids[0],
            variants=[self.variants[i] for i in ids],
        )
        return sign(m, self.key).to_json()

    def command(self, cid: str, action: CommandAction) -> None:
        cmd = Command(id=cid, device=DEVICE, action=action, model=MODEL, issued_at=time.time())
        self.bus.publish(TOPICS.cmd(DEVICE), sign(cmd, self.key).to_json(), retain=False)

    def restart(self) -> None:
        self.proc = start_agent(self.cfg, self.log)
        self.bus.proc = self.proc


@pytest.fixture
def rig(tmp_path: Path) -> Iterator[Rig]:
    """An agent that has measured manifest v1 (variants ok, ok2, bad) and is REPORTED."""
    if find_mosquitto() is None:
        pytest.skip("mosquitto is not installed")
    key, pub = new_key()
    ok, ok2, bad, sample = _fc(1), _fc(2), _fc(3), _sample(4)
    variants = {"ok": _variant("ok", ok), "ok2": _variant("ok2", ok2), "bad": _variant("bad", bad, sample)}
    with MosquittoBroker() as broker:
        cfg = write_config(tmp_path, broker, pub, tmp_path / "store")
        text = (
            cfg.read_text()
            .replace("min_runs = 20", "min_runs = 5")
            .replace("warmup_runs = 2", "warmup_runs = 1")
        )
        text = text.replace("inferences = 4", f"inferences = {INFERENCES}")
        cfg.write_text(text)
        bus = Bus(broker, TOPICS)
        log = tmp_path / "agent.log"
        r = Rig(bus, key, cfg, log, tmp_path / "store", None, variants)
        r.restart()
        try:
            bus.wait_for(lambda t, o: t == TOPICS.status(DEVICE) and o.get("online") is True, timeout=30)
            publish_many(bus.client, _blobs(ok, ok2, bad, sample))
            bus.publish(TOPICS.manifest(MODEL), r.manifest(1, ["ok", "ok2", "bad"]))
            bus.wait_for(lambda t, o: t == TOPICS.report(DEVICE, MODEL), timeout=60)
            _status_state(bus, "reported")
            yield r
        finally:
            kill9(r.proc)
            bus.close()
            print(log.read_text(errors="replace")[-4000:])


@pytest.mark.integration
def test_pings_answered_during_a_slow_health_check_then_commit_and_rollback(rig: Rig) -> None:
    bus, pid = rig.bus, rig.proc.pid

    # ---- a passing check of several seconds: pings answered meanwhile, then committed
    rig.assign("ok")
    activated = bus.wait_for(is_event("activated", variant="ok"), timeout=20)
    _status_state(bus, "probation", timeout=10)
    child = _wait_child(pid)
    rtts = [_ping_rtt(bus, rig.key, f"p{i}") for i in range(5)]
    assert max(rtts) < 1.0, rtts
    assert child.is_running(), "the check ended before the pings: they proved nothing"
    committed = bus.wait_for(is_event("committed", variant="ok"), timeout=60)
    assert committed["ts"] - activated["ts"] > 1.0, "the check was not slow: the pings proved nothing"
    assert link_sha(rig.store, MODEL) == rig.variants["ok"].sha256

    # ---- a check that fails after seconds (its accuracy child): rolled back, pings answered meanwhile
    rig.assign("bad")
    bus.wait_for(is_event("activated", variant="bad"), timeout=20)
    child = _wait_child(pid)
    rtt = _ping_rtt(bus, rig.key, "q1")
    assert child.is_running() and rtt < 1.0, rtt
    rolled = bus.wait_for(is_event("rolled_back", variant="bad"), timeout=60)
    assert rolled["reason"] == "HEALTH_CHECK_FAILED" and "ACCURACY_MISMATCH" in rolled["detail"]
    status = _status_state(bus, "rolled_back", timeout=10)
    assert status["models"][MODEL]["active"]["variant"] == "ok"
    assert link_sha(rig.store, MODEL) == rig.variants["ok"].sha256
    _wait_no_child(pid, 5)


@pytest.mark.integration
def test_rollback_command_cancels_the_check_and_a_restart_checks_again(rig: Rig) -> None:
    bus, pid = rig.bus, rig.proc.pid
    rig.assign("ok")
    bus.wait_for(is_event("committed", variant="ok"), timeout=60)

    # ---- during ok2's check: a newer manifest waits, a rollback command cancels the check
    rig.assign("ok2")
    bus.wait_for(is_event("activated", variant="ok2"), timeout=20)
    _wait_child(pid)
    bus.publish(TOPICS.manifest(MODEL), rig.manifest(2, ["ok", "ok2"]))
    time.sleep(0.5)
    rec = model_record(rig.store, MODEL)
    assert rec is not None and rec["state"] == "probation" and rec["manifest_version"] == 1, rec
    t0 = time.monotonic()
    rig.command("rb1", CommandAction.ROLLBACK)
    rolled = bus.wait_for(is_event("rolled_back", correlation_id="rb1"), timeout=10)
    assert time.monotonic() - t0 < 2.0
    assert rolled["reason"] == "COMMAND" and rolled["variant"] == "ok2"
    assert _wait_no_child(pid, 3) < 3
    assert link_sha(rig.store, MODEL) == rig.variants["ok"].sha256
    assert not [e for e in bus.events() if e["kind"] == "committed" and e.get("variant") == "ok2"]
    # the waiting manifest is taken once the activation settled
    bus.wait_for(lambda t, o: t == TOPICS.report(DEVICE, MODEL) and o.get("manifest_version") == 2, 60)
    _status_state(bus, "reported")

    # ---- SIGTERM during a check: a prompt clean exit, PROBATION kept, the restart checks again
    rig.assign("ok", version=2)  # the same model as active, from v2: activated and checked again
    bus.wait_for(is_event("activated", variant="ok"), timeout=20)
    child = _wait_child(pid)
    t0 = time.monotonic()
    assert terminate(rig.proc) == 0
    assert time.monotonic() - t0 < 5.0
    assert not child.is_running(), "the health-check child outlived the agent"
    rec = model_record(rig.store, MODEL)
    assert rec is not None and rec["state"] == "probation", rec
    restarted = time.time()
    rig.restart()
    _wait_child(rig.proc.pid)  # the check runs again
    rtt = _ping_rtt(bus, rig.key, "r1")
    assert rtt < 1.0, rtt
    bus.wait_for(lambda t, o: is_event("committed", variant="ok")(t, o) and o["ts"] > restarted, timeout=60)
    rec = model_record(rig.store, MODEL)
    assert rec is not None and rec["state"] == "committed" and rec["manifest_version"] == 2, rec
    assert terminate(rig.proc) == 0


# ------------------------------------------------------------------------------------ unit (no broker)


def test_a_cancelled_check_is_killed_and_its_outcome_dropped(tmp_path: Path) -> None:
    model = tmp_path / "fc.tflite"
    model.write_bytes(_fc(5))
    stop = threading.Event()
    checks = HealthChecks(HealthConfig(inferences=10_000_000, timeout_s=60), memory_limit_mb=2048, stop=stop)
    check = checks.start("m", "0" * 64, model, None, None)
    assert checks.busy("m")
    time.sleep(1.0)  # the child is running its inferences
    assert check.thread is not None and check.thread.is_alive()
    assert checks.cancel("m") and not checks.busy("m")
    check.thread.join(timeout=3)
    assert not check.thread.is_alive(), "the cancelled check's child was not killed"
    assert checks.finished() == []  # dropped: the canceller owns the record

    # the agent's stop reaches a running check too; a finished check comes back once
    done = checks.start("m", "1" * 64, model, None, None)
    stop.set()
    assert done.thread is not None
    done.thread.join(timeout=3)
    assert not done.thread.is_alive()
    assert checks.finished() == []  # stopped by the agent: PROBATION stays for the restart

    quick = HealthChecks(HealthConfig(inferences=10), memory_limit_mb=2048, stop=threading.Event())
    ok = quick.start("m", "2" * 64, model, None, None)
    deadline = time.monotonic() + 30
    got: list[Any] = []
    while not got:
        assert time.monotonic() < deadline
        got = quick.finished()
        time.sleep(0.05)
    assert got == [ok] and ok.problem is None and not quick.busy("m")
    quick.shutdown()


def test_reason_codes_are_typed_at_the_seams() -> None:
    """FetchNote, IntegrityError and WireError carry a ReasonCode, not a string (mypy proves the rest)."""
    assert FetchNote("complete", "0" * 64, ()).reason is None
    assert IntegrityError("x").reason is ReasonCode.BAD_HASH
    with pytest.raises(PayloadError) as big:
        parse_json(b"{}" * 8, max_bytes=10)
    assert big.value.reason is ReasonCode.TOO_LARGE
    with pytest.raises(PayloadError) as bad:
        parse_json(b"\xff")
    assert bad.value.reason is ReasonCode.MALFORMED
    with pytest.raises(IdentifierError) as bad_id:
        check_id("Bad Id")
    assert bad_id.value.reason is ReasonCode.BAD_IDENTIFIER
