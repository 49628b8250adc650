"""Chaos against the real agent process: random kill -9, a broker restart mid-fetch, forged
assignments, and a hypothesis barrage of garbage on every topic the agent subscribes to.

All of it drives ``python -m agent`` subprocesses against private mosquittos (never the system broker).
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from agent_helpers import (
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
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_agent_faults import _consistent
from test_agent_integration import (  # the shared helpers and the TF-built tiny models fixture
    CHUNK,
    DEVICE,
    MODEL,
    Bus,
    is_event,
    new_key,
    tiny_models,
    variant_for,
    write_config,
)

from agent.wire import BlobRef, Manifest, Topics, Variant, iter_chunks, sign
from deploy.broker import MosquittoBroker, find_mosquitto

__all__ = ["tiny_models"]  # re-exported fixture

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(find_mosquitto() is None, reason="mosquitto is not installed"),
]

TOPICS = Topics()
SETTLED = {"committed", "rolled_back", "reported", "idle"}
ALL_STATES = {
    "idle",
    "fetching",
    "verifying",
    "benchmarking",
    "reported",
    "activating",
    "probation",
    "committed",
    "rolled_back",
}


def chunk_items(data: bytes, skip: set[int] | None = None) -> list[tuple[str, bytes]]:
    sha = hashlib.sha256(data).hexdigest()
    return [
        (TOPICS.blob(sha, i), c) for i, c in enumerate(iter_chunks(data, CHUNK)) if not skip or i not in skip
    ]


@dataclass
class Models:
    f32: bytes
    f16: bytes
    sample: bytes

    @classmethod
    def load(cls, root: Path) -> Models:
        return cls(*((root / n).read_bytes() for n in ("float32.tflite", "float16.tflite", "sample.npz")))

    def variants(self) -> list[Variant]:
        sref = BlobRef.of(self.sample, CHUNK)
        return [
            variant_for("float32", self.f32, "none", sref),
            variant_for("float16", self.f16, "float16", sref),
        ]


# ------------------------------------------------------------------------------ (a) random kill -9


def _check_after_kill(store: Path, known: dict[str, Variant], committed_before: bool) -> str | None:
    """The store invariant after a SIGKILL at an arbitrary moment; returns the state it was in."""
    shas = {v.sha256 for v in known.values()}
    active = _consistent(store, {None, *shas})  # absent, or a complete blob that hashes to its name
    if committed_before:
        assert active is not None, "a model was committed before; a crash must not leave none active"
    rec = model_record(store, MODEL)
    state = rec["state"] if rec else None
    assert state is None or state in ALL_STATES, state
    if rec is not None and state in ("probation", "committed"):
        assert rec["active"] is not None and rec["active"]["sha256"] == active, (
            f"state.json says {state} with {rec['active']} but the active link names {active}"
        )
        info = json.loads((store / "models" / MODEL / "active.json").read_text())
        assert info["sha256"] == active, "active.json disagrees with the active link"
    # every stored partial chunk is whole and verified (written atomically): no torn chunk
    by_sha = {v.sha256: v for v in known.values()}
    partial = store / "partial"
    if partial.is_dir():
        for d in partial.iterdir():
            v = by_sha.get(d.name)
            for f in d.iterdir():
                if re.fullmatch(r"\.\d+\.tmp-\d+", f.name):
                    continue  # killed between writing a chunk and renaming it: swept at the next start
                assert f.name.isdigit(), f"unexpected file in {d}: {f.name}"
                if v is not None:
                    assert hashlib.sha256(f.read_bytes()).hexdigest() == v.chunks[int(f.name)], f
    return state


# Where each kill of the chaos test aims, in turn: (states to wait for, longest extra seeded-random delay);
# None: a seeded-random delay after the start, wherever that lands. Aiming (rather than only random
# delays) makes the kills cover the early stages and probation on any machine speed.
_KILL_AIMS: tuple[tuple[frozenset[str], float] | None, ...] = (
    (frozenset({"fetching", "verifying", "benchmarking"}), 0.05),
    (frozenset({"benchmarking"}), 0.4),
    (frozenset({"probation"}), 0.6),
    None,
)
_EARLY = frozenset({None, "idle", "fetching", "verifying", "benchmarking"})


def test_kill_9_at_random_moments_converges(tiny_models: Path, tmp_path: Path) -> None:
    """8 SIGKILLs across fetch → bench → report → activate → probation → commit, aimed in turn at the
    fetch, the benchmark, probation and a seeded-random moment.

    Each round publishes manifest vN (float32, float16, and a fresh 48-chunk junk variant so there is a
    fetch to interrupt) with a retained assignment to the other real variant; a round starts when the
    previous one is committed, or when a kill aims at the fetch and the current round is past it (a new
    manifest arriving mid-cycle is part of the chaos). After every kill the store is consistent; at the
    end the last assignment is committed.
    """
    rng = random.Random(20240604)
    key, pub = new_key()
    store = tmp_path / "store"
    m = Models.load(tiny_models)
    base = m.variants()
    known = {v.id: v for v in base}
    log = tmp_path / "agent.log"
    with MosquittoBroker() as broker:
        cfg = write_config(tmp_path, broker, pub, store)
        cfg.write_text(cfg.read_text().replace("probation_s = 0.5", "probation_s = 1.0"))
        bus = Bus(broker, TOPICS)
        publish_many(bus.client, [*chunk_items(m.f32), *chunk_items(m.f16), *chunk_items(m.sample)])
        target: dict[str, Any] = {}

        def publish_round(n: int) -> None:
            junk = os.urandom(48 * CHUNK - 5)
            jv = variant_for(f"junk{n}", junk, "none")
            known[jv.id] = jv
            publish_many(bus.client, chunk_items(junk))
            manifest = Manifest(
                model=MODEL, version=n, created_at=time.time(), baseline="float32", variants=[*base, jv]
            )
            chosen = base[n % 2]
            target.update(version=n, variant=chosen.id, sha=chosen.sha256)
            bus.publish(TOPICS.manifest(MODEL), sign(manifest, key).to_json())
            bus.publish(
                TOPICS.assign(DEVICE, MODEL),
                signed_assignment(key, DEVICE, MODEL, chosen.id, chosen.sha256, n),
            )

        def round_done() -> bool:
            rec = model_record(store, MODEL)
            return bool(
                rec
                and rec["state"] == "committed"
                and rec["manifest_version"] == target["version"]
                and rec["active"]["sha256"] == target["sha"]
            )

        n_round = 1
        publish_round(n_round)
        states: list[str | None] = []
        committed_before = False
        proc: subprocess.Popen[bytes] | None = None

        def wait_for_state(agent: subprocess.Popen[bytes], wanted: frozenset[str]) -> str | None:
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline and agent.poll() is None:
                rec = model_record(store, MODEL)
                if rec and rec["state"] in wanted and rec["manifest_version"] == target["version"]:
                    return str(rec["state"])
                time.sleep(0.005)
            return None

        try:
            for i in range(8):
                aim = _KILL_AIMS[i % len(_KILL_AIMS)]
                rec = model_record(store, MODEL)
                past_fetch = aim is not None and "fetching" in aim[0] and rec and rec["state"] not in _EARLY
                if round_done() or past_fetch:
                    n_round += 1
                    publish_round(n_round)
                started = time.monotonic()
                proc = start_agent(cfg, log)
                if aim is None:
                    time.sleep(rng.uniform(0.8, 3.5))  # the agent needs ~1 s to import and start
                    seen = "random"
                else:
                    seen = f"aimed, saw {wait_for_state(proc, aim[0])}"
                    time.sleep(rng.uniform(0, aim[1]))
                assert proc.poll() is None, f"the agent exited ({proc.returncode}) before the kill"
                kill9(proc)
                state = _check_after_kill(store, known, committed_before)
                states.append(state)
                committed_before = (
                    committed_before or state == "committed" or link_sha(store, MODEL) is not None
                )
                took = time.monotonic() - started
                print(f"round {n_round}: killed after {took:.2f} s ({seen}) in state {state}")
            # finally: a restart converges on the last round's assignment, committed
            if round_done():
                n_round += 1
                publish_round(n_round)
            with bus.cond:
                bus.messages.clear()
            proc = start_agent(cfg, log)
            bus.proc = proc
            bus.wait_for(lambda t, o: t == TOPICS.status(DEVICE), timeout=30)  # up: signal handlers set
            deadline = time.monotonic() + 60
            while not round_done():
                assert time.monotonic() < deadline, f"never committed {target}: {model_record(store, MODEL)}"
                assert proc.poll() is None, f"the agent exited ({proc.returncode})"
                time.sleep(0.05)
            assert link_sha(store, MODEL) == target["sha"]
            _check_after_kill(store, known, committed_before=True)
            assert terminate(proc) == 0
            # the restart swept what the kills left between a temp write and its rename
            assert not list(store.rglob(".*.tmp-*")), sorted(store.rglob(".*.tmp-*"))
            # the kills landed in several stages of the cycle, not just in the idle committed state
            assert "probation" in states and set(states) & {"fetching", "verifying", "benchmarking"}, states
            assert "Traceback" not in log.read_text(errors="replace")
        finally:
            if proc is not None:
                kill9(proc)
            bus.close()
            print(log.read_text(errors="replace")[-3000:])


# ------------------------------------------------------------------------------ (b) broker restart mid-fetch


def test_broker_restart_mid_fetch_resumes_from_persisted_chunks(tiny_models: Path, tmp_path: Path) -> None:
    """mosquitto (persistence on) is stopped mid-fetch and restarted on the same port; the retained chunks
    come back from its database (the test never republishes them) and the agent finishes the fetch."""
    key, pub = new_key()
    store = tmp_path / "store"
    m = Models.load(tiny_models)
    big = os.urandom(1200 * CHUNK + 3)
    variants = [variant_for("float32", m.f32, "none"), variant_for("big", big, "none")]
    big_ref = variants[1]
    manifest = sign(
        Manifest(model=MODEL, version=1, created_at=time.time(), baseline="float32", variants=variants), key
    )
    state_dir = tmp_path / "broker"
    broker = MosquittoBroker(persistence=True, state_dir=state_dir).start()
    port = broker.port
    log = tmp_path / "agent.log"
    cfg = write_config(tmp_path, broker, pub, store, extra="reconnect_max_s = 1\nreconnect_min_s = 0.2")
    cfg.write_text(cfg.read_text().replace("[fetch]", "[fetch]\nwindow = 8"))  # slow enough to interrupt
    bus = Bus(broker, TOPICS)
    publish_many(bus.client, [*chunk_items(m.f32), *chunk_items(big)])
    bus.publish(TOPICS.manifest(MODEL), manifest.to_json())
    partial = store / "partial" / big_ref.sha256
    proc = start_agent(cfg, log)
    try:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and len(list(partial.glob("[0-9]*"))) < 200:
            time.sleep(0.01)
        bus.close()
        broker.stop()  # SIGTERM: a clean shutdown writes mosquitto.db
        at_stop = len(list(partial.glob("[0-9]*")))
        assert 200 <= at_stop < len(big_ref.chunks), f"{at_stop} chunks stored: not mid-fetch"
        assert (state_dir / "mosquitto.db").is_file(), "mosquitto saved no database on shutdown"
        time.sleep(1.0)
        assert proc.poll() is None
        assert model_record(store, MODEL)["state"] == "fetching"  # type: ignore[index]
        broker = MosquittoBroker(port=port, persistence=True, state_dir=state_dir).start()
        bus = Bus(broker, TOPICS)
        bus.proc = proc
        report = bus.wait_for(lambda t, o: t == TOPICS.report(DEVICE, MODEL), timeout=60)
        assert {r["variant"] for r in report["results"]} == {"float32", "big"}
        blob = store / "blobs" / f"{big_ref.sha256}.tflite"
        assert hashlib.sha256(blob.read_bytes()).hexdigest() == big_ref.sha256
        text = log.read_text(errors="replace")
        assert "disconnected from the broker" in text and "Traceback" not in text
        assert terminate(proc) == 0
    finally:
        kill9(proc)
        bus.close()
        broker.stop()


# -------------------------------------------------------------------------- (c) + (d) one long-lived agent


@dataclass
class Live:
    broker: MosquittoBroker
    bus: Bus
    proc: subprocess.Popen[bytes]
    key: Ed25519PrivateKey
    store: Path
    log: Path
    variants: list[Variant]
    pings: int = 0

    def ping(self, timeout: float = 20) -> dict[str, Any]:
        self.pings += 1
        cid = f"live-ping-{self.pings}"
        self.bus.publish(TOPICS.cmd(DEVICE), signed_ping(self.key, DEVICE, cid), retain=False)
        return self.bus.wait_for(is_event("pong", correlation_id=cid), timeout=timeout)

    def assert_unchanged(self) -> None:
        """float32 committed and active, the process alive, no traceback in its log."""
        assert self.proc.poll() is None, f"the agent exited ({self.proc.returncode})"
        rec = model_record(self.store, MODEL)
        assert rec is not None and rec["active"]["variant"] == "float32", rec
        assert link_sha(self.store, MODEL) == self.variants[0].sha256
        assert "Traceback" not in self.log.read_text(errors="replace")


@pytest.fixture(scope="module")
def live(tiny_models: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Live]:
    """One broker + one agent with float32 committed, shared by the forgery and fuzz tests."""
    tmp = tmp_path_factory.mktemp("live")
    key, pub = new_key()
    m = Models.load(tiny_models)
    variants = m.variants()
    manifest = sign(
        Manifest(model=MODEL, version=1, created_at=time.time(), baseline="float32", variants=variants), key
    )
    with MosquittoBroker() as broker:
        cfg = write_config(tmp, broker, pub, tmp / "store")
        bus = Bus(broker, TOPICS)
        publish_many(bus.client, [*chunk_items(m.f32), *chunk_items(m.f16), *chunk_items(m.sample)])
        bus.publish(TOPICS.manifest(MODEL), manifest.to_json())
        legit = signed_assignment(key, DEVICE, MODEL, "float32", variants[0].sha256, 1)
        bus.publish(TOPICS.assign(DEVICE, MODEL), legit)
        log = tmp / "agent.log"
        proc = start_agent(cfg, log)
        bus.proc = proc
        try:
            bus.wait_for(is_event("committed", variant="float32"), timeout=60)
            yield Live(broker, bus, proc, key, tmp / "store", log, variants)
            assert terminate(proc) == 0
        finally:
            kill9(proc)
            bus.close()
            print(log.read_text(errors="replace")[-3000:])


def test_forged_assignments_are_rejected_and_change_nothing(live: Live) -> None:
    f16 = live.variants[1]
    with live.bus.cond:
        live.bus.messages.clear()  # only what the forgeries cause counts
    stranger = Ed25519PrivateKey.generate()
    forged_key = signed_assignment(stranger, DEVICE, MODEL, "float16", f16.sha256, 1)
    live.bus.publish(TOPICS.assign(DEVICE, MODEL), forged_key)
    live.bus.wait_for(is_event("rejected", reason="UNKNOWN_KEY", model=MODEL), timeout=20)
    # a genuine signature over another payload: the edited assignment no longer verifies
    genuine = json.loads(signed_assignment(live.key, DEVICE, MODEL, "float32", live.variants[0].sha256, 1))
    genuine.update(variant="float16", sha256=f16.sha256)
    live.bus.publish(TOPICS.assign(DEVICE, MODEL), json.dumps(genuine).encode())
    live.bus.wait_for(is_event("rejected", reason="BAD_SIGNATURE", model=MODEL), timeout=20)
    # unsigned, with the signature stripped
    del genuine["signature"]
    live.bus.publish(TOPICS.assign(DEVICE, MODEL), json.dumps(genuine).encode())
    live.bus.wait_for(is_event("rejected", reason="UNSIGNED", model=MODEL), timeout=20)
    live.ping()  # handled after the forgeries: they are all processed
    assert not [e for e in live.bus.events() if e["kind"] in ("activated", "rolled_back")]
    live.assert_unchanged()
    # put the legitimate assignment back (already active: a no-op for the agent)
    legit = signed_assignment(live.key, DEVICE, MODEL, "float32", live.variants[0].sha256, 1)
    live.bus.publish(TOPICS.assign(DEVICE, MODEL), legit)
    live.ping()
    live.assert_unchanged()


_json = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner, max_size=4),
    max_leaves=12,
)
_schemas = st.sampled_from(
    ["edgefleet.manifest/1", "edgefleet.assignment/1", "edgefleet.command/1", "edgefleet.nope/9", 7]
)


@st.composite
def _payloads(draw: st.DrawFn) -> bytes:
    kind = draw(st.sampled_from(["bytes", "json", "schema", "truncated"]))
    if kind == "bytes":
        return draw(st.binary(max_size=CHUNK + 8))
    if kind == "json":
        return json.dumps(draw(_json)).encode()
    obj = draw(st.dictionaries(st.text(max_size=10), _json, max_size=5))
    obj["schema"] = draw(_schemas)
    if draw(st.booleans()):
        obj["signature"] = draw(
            st.fixed_dictionaries({"alg": st.sampled_from(["ed25519", "rsa"]), "key_id": st.text(max_size=8)})
            | _json
        )
    text = json.dumps(obj).encode()
    if kind == "truncated":
        return text[: draw(st.integers(0, max(0, len(text) - 1)))]
    return text


@pytest.fixture(scope="module")
def fetching(live: Live) -> list[str]:
    """Put the live agent in the middle of a fetch (a v2 variant whose chunks are not on the broker);
    returns every topic the agent is subscribed to at that point (the chunk topics included)."""
    ghost = os.urandom(3 * CHUNK - 7)
    gv = variant_for("ghost", ghost, "none")
    m2 = Manifest(
        model=MODEL, version=2, created_at=time.time(), baseline="float32", variants=[*live.variants, gv]
    )
    live.bus.publish(TOPICS.manifest(MODEL), sign(m2, live.key).to_json())
    live.bus.wait_for(
        lambda t, o: (
            t == TOPICS.status(DEVICE)
            and o.get("models", {}).get(MODEL, {}).get("state") == "fetching"
            and o["models"][MODEL].get("manifest_version") == 2
        ),
        timeout=20,
    )
    return [
        TOPICS.manifest(MODEL),
        TOPICS.manifest("other-model"),
        *(TOPICS.blob(gv.sha256, i) for i in range(len(gv.chunks))),
        TOPICS.assign(DEVICE, MODEL),
        TOPICS.assign(DEVICE, "other-model"),
        TOPICS.cmd(DEVICE),
    ]


@settings(
    max_examples=40,
    deadline=None,
    database=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(data=st.data())
def test_garbage_on_every_subscribed_topic(live: Live, fetching: list[str], data: st.DataObject) -> None:
    topic = data.draw(st.sampled_from(fetching), label="topic")
    payload = data.draw(_payloads(), label="payload")
    live.bus.publish(topic, payload, retain=False)


def test_agent_survives_the_barrage(live: Live, fetching: list[str]) -> None:
    """Runs after the barrage (file order): alive, answers a signed ping, no traceback, nothing changed."""
    pong = live.ping()
    assert pong["device"] == DEVICE
    live.assert_unchanged()
    rejected = [e for e in live.bus.events() if e["kind"] == "rejected"]
    assert any(e.get("reason") == "MALFORMED" for e in rejected), "the garbage never reached the agent"
    rec = model_record(live.store, MODEL)
    assert rec is not None and rec["manifest_version"] == 2 and rec["state"] == "fetching"
