"""Chaos against the real agent process: kill -9 at seeded random and aimed moments, a broker restart
mid-fetch, forged assignments, thousands of hostile messages on every topic the agent subscribes to, a
slow lossy link, a disk filling up during a fetch, and benchmark children orphaned by a kill.

All of it drives ``python -m agent`` subprocesses against private mosquittos (never the system broker).
Each scenario is a function with its size as a parameter: the tests run a small bounded version (CI),
``benches/chaos.py`` the full one (100 kills, 10,000 messages, a 2 MiB fetch over the bad link). Every
test asserts its own verdict and needs no other test to have run.
"""

from __future__ import annotations

import collections
import contextlib
import hashlib
import json
import math
import os
import random
import re
import select
import socket
import subprocess
import threading
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
from netns_helpers import ADDR_A, LinkShape, NetnsLink, Side, netns_unavailable, ours
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

from agent.active import ActiveModel
from agent.store import Store
from agent.wire import ActiveVariant, BlobRef, Manifest, Topics, Variant, blob_fields, iter_chunks, sign
from deploy.broker.spawn import MosquittoBroker, find_mosquitto, free_port

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


def _consistent(store: Path, allowed: set[str | None]) -> str | None:
    """Right after a kill: no torn blob, state.json parses, the active link absent or a complete blob
    in ``allowed``; returns its sha. A temp file of a write the kill cut is allowed here (the next start
    sweeps it, which :func:`kill_chaos` checks)."""
    for blob in (store / "blobs").glob("*.tflite"):
        assert hashlib.sha256(blob.read_bytes()).hexdigest() == blob.stem, f"torn blob {blob}"
    for path in (store / "blobs").glob(".*"):
        assert re.fullmatch(r"\.[0-9a-f]{64}\.(tflite|npz)\.tmp-\d+", path.name), f"stray file {path}"
    json.loads((store / "state.json").read_text())
    if link_sha(store, MODEL) is None:
        assert None in allowed, "no model active, but one should be"
        return None
    sha = link_sha(store, MODEL)
    assert sha in allowed, f"active {str(sha)[:12]} not in {allowed}"
    return sha


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
        assert rec["active"] is not None, rec
        previous = (rec.get("previous") or {}).get("sha256")
        # the one allowed gap: a rollback swaps back to the previous generation first and records
        # ROLLED_BACK after; the next start finishes it (test_restart_during_a_rollback_finishes_it)
        assert active in (rec["active"]["sha256"], previous), (
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


def _no_traceback(log: Path) -> None:
    text = log.read_text(errors="replace")
    at = text.find("Traceback")
    assert at < 0, f"traceback in the agent's log: {text[max(0, at - 600) : at + 2500]}"


def _check_store(store: Path, known: dict[str, Variant], committed_before: bool) -> str | None:
    """The invariant after a kill: the store check above, plus the metadata of the active generation
    names the active model (the generation layout makes the two change together)."""
    state = _check_after_kill(store, known, committed_before)
    model_dir = store / "models" / MODEL
    if link_sha(store, MODEL) is not None:
        info = json.loads((model_dir / "active.json").read_text())
        assert info["sha256"] == link_sha(store, MODEL), "active.json names another model than active.tflite"
    return state


def _check_restarted(store: Path) -> None:
    """After a clean start: no temp file, no generation nothing names, no child record left."""
    assert not list(store.rglob(".*.tmp-*")), sorted(store.rglob(".*.tmp-*"))
    model_dir = store / "models" / MODEL
    gens = model_dir / "gen"
    if gens.is_dir():
        named = {
            Path(os.readlink(link)).parts[1]
            for link in (model_dir / "current", model_dir / "previous.tflite")
            if link.is_symlink()
        }
        assert {g.name for g in gens.iterdir()} <= named, (sorted(gens.iterdir()), named)


def _writer_alive(path: Path) -> bool:
    """Whether the process named by a temp file's ``.tmp-<pid>`` suffix still runs (a live writer's
    temp file is not the kill's leftover)."""
    return _alive(int(path.name.rsplit("-", 1)[1]))


def _recorded_children(store: Path) -> list[int]:
    d = store / "children"
    return [int(p.stem) for p in d.glob("*.json")] if d.is_dir() else []


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().split(")")[-1].split()[0] != "Z"
    except OSError:
        return False


# Where each kill aims, in turn: (states to wait for, longest extra seeded-random delay); None: a
# seeded-random delay after the start, wherever that lands. Aiming (rather than only random delays)
# makes the kills cover every stage of the cycle on any machine speed.
_KILL_AIMS: tuple[tuple[frozenset[str], float] | None, ...] = (
    (frozenset({"fetching", "verifying", "benchmarking"}), 0.05),
    (frozenset({"benchmarking"}), 0.4),
    (frozenset({"reported", "activating"}), 0.02),
    (frozenset({"probation"}), 0.6),
    None,
    (frozenset({"probation", "rolled_back"}), 0.3),  # in a junk round: the failing check, the rollback
)
_EARLY = frozenset({None, "idle", "fetching", "verifying", "benchmarking"})


def kill_chaos(models_dir: Path, tmp_path: Path, kills: int, seed: int = 20240604) -> dict[str, Any]:
    """``kills`` SIGKILLs across fetch → verify → bench → report → activate → probation → commit, aimed
    in turn (see ``_KILL_AIMS``) and at seeded-random moments; a final restart must converge.

    Each round publishes manifest vN (float32, float16, and a fresh 48-chunk junk variant so there is a
    fetch to interrupt) with a retained assignment to the other real variant; a round starts when the
    previous one is committed, or when a kill aims at the fetch and the current round is past it (a new
    manifest arriving mid-cycle is part of the chaos). After every kill the store is consistent (the
    active model complete and verified or none, its metadata naming it, no torn chunk); after every
    restart the children a killed agent left are ended. Returns the figures; raises on any violation.
    """
    rng = random.Random(seed)
    key, pub = new_key()
    store = tmp_path / "store"
    m = Models.load(models_dir)
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
            # every third round assigns the junk variant: its health check fails, so probation ends in a
            # rollback, and the kills land in that path too
            chosen = jv if n % 3 == 0 else base[n % 2]
            target.update(version=n, variant=chosen.id, sha=chosen.sha256, junk=chosen is jv)
            bus.publish(TOPICS.manifest(MODEL), sign(manifest, key).to_json())
            bus.publish(
                TOPICS.assign(DEVICE, MODEL),
                signed_assignment(key, DEVICE, MODEL, chosen.id, chosen.sha256, n),
            )

        def round_done() -> bool:
            rec = model_record(store, MODEL)
            if not rec or rec["manifest_version"] != target["version"]:
                return False
            if target["junk"]:
                return bool(rec["state"] == "rolled_back")
            return bool(rec["state"] == "committed" and rec["active"]["sha256"] == target["sha"])

        n_round = 1
        publish_round(n_round)
        states: list[str | None] = []
        left_temp: list[Path] = []
        online_s: list[float] = []  # per aimed restart: start → online status published
        started = time.monotonic()
        orphans_ended = 0
        committed_before = False
        proc: subprocess.Popen[bytes] | None = None

        def online_since(mark: int) -> bool:
            """The agent started after ``mark`` published its online status (it is past its start)."""
            with bus.cond:
                return any(
                    t == TOPICS.status(DEVICE) and b'"online":true' in p for t, p, _ in bus.messages[mark:]
                )

        def wait_for_state(agent: subprocess.Popen[bytes], wanted: frozenset[str], mark: int) -> str | None:
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline and agent.poll() is None:
                if not online_since(mark):  # state.json still says what the killed agent left
                    time.sleep(0.005)
                    continue
                if len(online_s) <= len(states):
                    online_s.append(time.monotonic() - started)
                rec = model_record(store, MODEL)
                if rec and rec["state"] in wanted and rec["manifest_version"] == target["version"]:
                    return str(rec["state"])
                time.sleep(0.005)
            return None

        try:
            for i in range(kills):
                aim = _KILL_AIMS[i % len(_KILL_AIMS)]
                rec = model_record(store, MODEL)
                past_fetch = aim is not None and "fetching" in aim[0] and rec and rec["state"] not in _EARLY
                if round_done() or past_fetch:
                    n_round += 1
                    publish_round(n_round)
                left_running = [pid for pid in _recorded_children(store) if _alive(pid)]
                with bus.cond:
                    mark = len(bus.messages)
                started = time.monotonic()
                proc = start_agent(cfg, log)
                if aim is None:
                    time.sleep(rng.uniform(0.8, 3.5))  # the agent needs ~1 s to import and start
                    seen = "random"
                else:
                    seen = f"aimed, saw {wait_for_state(proc, aim[0], mark)}"
                    time.sleep(rng.uniform(0, aim[1]))
                assert proc.poll() is None, f"the agent exited ({proc.returncode}) before the kill"
                if online_since(mark):  # it got past its start, where it ends what its predecessor left
                    swept = [p for p in left_temp if os.path.lexists(p)]
                    assert not swept, f"temp files a kill left survived the restart: {swept}"
                    # it moved the state, so it started: it has ended the benchmark children its
                    # predecessor left (they run in sessions of their own; the kill did not reach them)
                    survivors = [pid for pid in left_running if _alive(pid)]
                    assert not survivors, f"orphaned benchmark children survived a restart: {survivors}"
                    orphans_ended += len(left_running)
                kill9(proc)
                left_temp = [p for p in store.rglob(".*.tmp-*") if not _writer_alive(p)]
                state = _check_store(store, known, committed_before)
                states.append(state)
                committed_before = (
                    committed_before or state == "committed" or link_sha(store, MODEL) is not None
                )
                took = time.monotonic() - started
                print(f"round {n_round}: killed after {took:.2f} s ({seen}) in state {state}")
            # finally: a restart converges on the last round's assignment, committed
            while round_done() or target["junk"]:
                n_round += 1
                publish_round(n_round)
            with bus.cond:
                bus.messages.clear()
            t0 = time.monotonic()
            proc = start_agent(cfg, log)
            bus.proc = proc
            bus.wait_for(lambda t, o: t == TOPICS.status(DEVICE), timeout=30)  # up: signal handlers set
            up_s = time.monotonic() - t0
            # a SIGKILLed child of the predecessor dies when its current system call ends (on a loaded
            # machine, some milliseconds after the new agent is up): wait at most 2 s, far less than one
            # timed benchmark window, so an orphan left running still fails this check
            until = time.monotonic() + 2.0
            while True:
                survivors = [
                    pid
                    for pid in _recorded_children(store)
                    if _alive(pid) and pid != proc.pid and not _is_child_of(pid, proc.pid)
                ]
                if not survivors or time.monotonic() > until:
                    break
                time.sleep(0.05)
            assert not survivors, survivors
            deadline = time.monotonic() + 60
            while not round_done():
                assert time.monotonic() < deadline, f"never committed {target}: {model_record(store, MODEL)}"
                assert proc.poll() is None, f"the agent exited ({proc.returncode})"
                time.sleep(0.05)
            converged_s = time.monotonic() - t0
            assert link_sha(store, MODEL) == target["sha"]
            _check_store(store, known, committed_before=True)
            _check_restarted(store)
            assert terminate(proc) == 0
            _no_traceback(log)
        finally:
            if proc is not None:
                kill9(proc)
            bus.close()
            print(log.read_text(errors="replace")[-3000:])
    by_state: dict[str, int] = {}
    for st_ in states:
        by_state[str(st_)] = by_state.get(str(st_), 0) + 1
    return {
        "kills": kills,
        "consistent_after_kill": len(states),
        "killed_in_state": by_state,
        "rounds": n_round,
        "orphaned_children_ended": orphans_ended,
        "restart_online_s_max": round(max(online_s), 2) if online_s else None,
        "restart_online_s_median": round(sorted(online_s)[len(online_s) // 2], 2) if online_s else None,
        "final_restart_online_s": round(up_s, 2),
        "final_restart_converged_s": round(converged_s, 2),
    }


def _is_child_of(pid: int, parent: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return int(fh.read().split(")")[-1].split()[1]) == parent
    except (OSError, ValueError, IndexError):
        return False


def test_kill_9_at_random_moments_converges(tiny_models: Path, tmp_path: Path) -> None:
    """10 SIGKILLs aimed in turn at the fetch, the benchmark, report/activation, probation and a
    seeded-random moment; consistent after each, converged after the last restart."""
    figures = kill_chaos(tiny_models, tmp_path, kills=10)
    states = figures["killed_in_state"]
    assert figures["consistent_after_kill"] == 10
    # the kills landed in several stages of the cycle, not just in the idle committed state
    assert "probation" in states and set(states) & {"fetching", "verifying", "benchmarking"}, states


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
    max_payload: int = 64 * 1024
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
    with live_agent(tiny_models, tmp_path_factory.mktemp("live")) as agent:
        yield agent


@contextlib.contextmanager
def live_agent(models_dir: Path, tmp: Path) -> Iterator[Live]:
    """A private broker and a real agent with float32 committed; stopped (SIGTERM, exit 0) after."""
    key, pub = new_key()
    m = Models.load(models_dir)
    variants = m.variants()
    manifest = sign(
        Manifest(model=MODEL, version=1, created_at=time.time(), baseline="float32", variants=variants), key
    )
    with MosquittoBroker() as broker:
        cfg = write_config(tmp, broker, pub, tmp / "store", extra="max_payload_kb = 64")
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


# ------------------------------------------------------------------------ hostile messages on every topic


def _valid_shaped(rng: random.Random, live: Live, kind: str) -> dict[str, Any]:
    """A message of ``kind`` shaped like the real thing (then made hostile by the caller)."""
    f32 = live.variants[0]
    if kind == "assignment":
        return json.loads(signed_assignment(live.key, DEVICE, MODEL, "float32", f32.sha256, 1))
    if kind == "command":
        return json.loads(signed_ping(live.key, DEVICE, f"c{rng.getrandbits(40)}"))
    m = Manifest(model=MODEL, version=50, created_at=time.time(), baseline="float32", variants=live.variants)
    return json.loads(sign(m, live.key).to_json())


_HOSTILE_VALUES: tuple[Any, ...] = (
    "../../../etc/passwd",
    "a" * 5000,
    -1,
    2**70,
    1e308,
    None,
    [],
    {"$ref": "#"},
    "\u0000\ud7ff",
    "f" * 64 + "/../x",
    True,
)


def hostile_messages(
    rng: random.Random, live: Live, topics: list[str], n: int, max_payload: int
) -> list[tuple[str, bytes, str]]:
    """``n`` seeded hostile messages as (topic, payload, category). A replayed command is the only one
    the agent drops silently (a QoS1 redelivery of an answered command); a replayed assignment for an
    older manifest than it holds is refused like the rest."""
    stranger = Ed25519PrivateKey.generate()
    chunk_topics = [t for t in topics if "/blobs/" in t]
    json_topics = [t for t in topics if "/blobs/" not in t]
    kinds = {"manifest": "manifest", "assign": "assignment", "cmd": "command"}
    old_assignment = signed_assignment(live.key, DEVICE, MODEL, "float32", live.variants[0].sha256, 1)
    old_ping = signed_ping(live.key, DEVICE, "replayed-ping")
    out: list[tuple[str, bytes, str]] = []
    for _ in range(n):
        category = rng.choice(
            ["bytes", "truncated", "oversized", "schema", "hostile", "unknown_key", "replay", "chunk"]
        )
        topic = rng.choice(json_topics)
        kind = next(v for k, v in kinds.items() if f"/{k}" in topic)
        if category == "chunk" and chunk_topics:
            topic = rng.choice(chunk_topics)
            payload = rng.randbytes(rng.randint(1, CHUNK + 8))
        elif category == "bytes":
            payload = rng.randbytes(rng.randint(1, 600))
        elif category == "truncated":
            text = json.dumps(_valid_shaped(rng, live, kind)).encode()
            payload = text[: rng.randint(1, len(text) - 1)]
        elif category == "oversized":
            obj = _valid_shaped(rng, live, kind)
            obj["padding"] = "x" * (max_payload + rng.randint(1, 4096))
            payload = json.dumps(obj).encode()
        elif category == "schema":
            obj = _valid_shaped(rng, live, kind)
            wrong = [f"edgefleet.{kind}/{rng.randint(2, 99)}", "edgefleet.nope/1", f"{kind}/1", 7, None]
            obj["schema"] = rng.choice([w for w in wrong if w != obj["schema"]])  # never the signed one
            payload = json.dumps(obj).encode()
        elif category == "hostile":
            obj = _valid_shaped(rng, live, kind)
            field = rng.choice([k for k in obj if k != "schema"])
            obj[field] = rng.choice([v for v in _HOSTILE_VALUES if v != obj[field]])  # always a change
            payload = json.dumps(obj).encode()
        elif category == "unknown_key":
            obj = _valid_shaped(rng, live, kind)
            if kind == "assignment":
                payload = signed_assignment(stranger, DEVICE, MODEL, "float16", live.variants[1].sha256, 9)
            elif kind == "command":
                payload = signed_ping(stranger, DEVICE, f"s{rng.getrandbits(40)}")
            else:
                m = Manifest.model_validate({k: v for k, v in obj.items() if k != "signature"})
                payload = sign(m, stranger).to_json()
        elif rng.random() < 0.5:  # replay of an old, genuinely signed assignment (for manifest v1)
            topic, payload, category = TOPICS.assign(DEVICE, MODEL), old_assignment, "replay_assignment"
        else:  # replay of a command already answered: a redelivery, ignored without a refusal
            topic, payload, category = TOPICS.cmd(DEVICE), old_ping, "replay_command"
        out.append((topic, payload, category))
    return out


def hostile_barrage(live: Live, topics: list[str], n: int, seed: int = 7) -> dict[str, Any]:
    """Publish ``n`` hostile messages (see :func:`hostile_messages`) at the live agent, then check: it
    is alive, answers a signed ping, changed nothing, logged no traceback, and every refused message
    became exactly one ``rejected`` event. Returns the figures; raises on any violation."""
    rng = random.Random(seed)
    messages = hostile_messages(rng, live, topics, n, live.max_payload)
    with live.bus.cond:
        live.bus.messages.clear()
    live.ping()  # the replayed ping's id is now known, so its replays are redeliveries to ignore
    live.bus.publish(TOPICS.cmd(DEVICE), signed_ping(live.key, DEVICE, "replayed-ping"), retain=False)
    live.bus.wait_for(is_event("pong", correlation_id="replayed-ping"), timeout=30)
    with live.bus.cond:
        live.bus.messages.clear()
    t0 = time.monotonic()
    publish_many(live.bus.client, [(t, p) for t, p, _ in messages], retain=False)
    must_refuse = sum(1 for _, _, c in messages if c != "replay_command")
    deadline = time.monotonic() + max(60.0, n / 20)
    rejected: list[dict[str, Any]] = []
    while time.monotonic() < deadline:
        rejected = [e for e in live.bus.events() if e["kind"] == "rejected"]
        if len(rejected) >= must_refuse:
            break
        assert live.proc.poll() is None, f"the agent exited ({live.proc.returncode})"
        time.sleep(0.2)
    handled_s = time.monotonic() - t0
    t1 = time.monotonic()
    pong = live.ping(timeout=60)
    ping_s = time.monotonic() - t1
    assert pong["device"] == DEVICE
    live.assert_unchanged()
    rejected = [e for e in live.bus.events() if e["kind"] == "rejected"]
    errors = [e for e in live.bus.events() if e["kind"] == "error"]
    assert not errors, errors[:3]
    assert len(rejected) == must_refuse, (len(rejected), must_refuse)
    by_category: dict[str, int] = {}
    for _, _, c in messages:
        by_category[c] = by_category.get(c, 0) + 1
    reasons: dict[str, int] = {}
    for e in rejected:
        reasons[str(e.get("reason"))] = reasons.get(str(e.get("reason")), 0) + 1
    return {
        "messages": n,
        "by_category": by_category,
        "refused_events": len(rejected),
        "must_refuse": must_refuse,
        "reasons": reasons,
        "crashes": 0,
        "handled_s": round(handled_s, 2),
        "ping_after_s": round(ping_s, 3),
    }


@pytest.fixture(scope="module")
def fetching(live: Live) -> list[str]:
    """The live agent in the middle of a fetch (see :func:`start_ghost_fetch`)."""
    return start_ghost_fetch(live)


def start_ghost_fetch(live: Live) -> list[str]:
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


def test_hostile_messages_on_every_topic_are_refused_as_events(live: Live, fetching: list[str]) -> None:
    """1,000 seeded hostile messages (random bytes, truncated and oversized JSON, wrong schema
    versions, hostile values, signatures from unknown keys, replays) on every subscribed topic while a
    fetch is in progress: no crash, one rejected event per refused message, ping answered, nothing
    changed, the fetch still waiting for its chunks."""
    figures = hostile_barrage(live, fetching, n=1000)
    assert figures["refused_events"] == figures["must_refuse"] > 500
    rec = model_record(live.store, MODEL)
    assert rec is not None and rec["manifest_version"] == 2 and rec["state"] == "fetching"


# -------------------------------------------------------------------------------------- (e) a bad link


class SlowLink:
    """A TCP proxy on loopback between the agent and the broker that behaves like a bad link.

    Two uses. Where no network namespace can be made (not root), it is the whole bad link, on the root
    namespace's loopback. Inside the agent's namespace of a kernel link (:mod:`netns_helpers`) on a
    kernel without ``sch_netem``, it adds only the delay (``rate_bps=math.inf``, and ``loss=0`` unless
    neither nftables nor iptables can drop packets), in front of the veth that tbf throttles.
    Each direction delays every segment by ``delay_s`` (one way), throttles to ``rate_bps`` and, since
    TCP never loses bytes, models loss as what TCP makes of it: a segment is held back an extra
    retransmission timeout (``rto_s``) with probability ``loss``. When the broker goes away the client
    side is closed too, so the agent sees the disconnect and reconnects through the proxy.
    """

    def __init__(
        self,
        upstream: int,
        delay_s: float,
        rate_bps: float,
        loss: float,
        rto_s: float,
        seed: int,
        upstream_host: str = "127.0.0.1",
    ) -> None:
        self.upstream, self.upstream_host = upstream, upstream_host
        self.delay_s, self.rate = delay_s, rate_bps / 8.0
        self.loss, self.rto_s = loss, rto_s
        self.rng = random.Random(seed)
        self.stop = threading.Event()
        self.server = socket.create_server(("127.0.0.1", 0))
        self.server.settimeout(0.2)
        self.port = self.server.getsockname()[1]
        self.threads: list[threading.Thread] = []
        self.held_back = 0
        self.delivered = 0  # bytes sent from the broker to the agent
        self.acceptor = threading.Thread(target=self._accept, daemon=True)
        self.acceptor.start()

    def _accept(self) -> None:
        while not self.stop.is_set():
            try:
                client, _ = self.server.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            try:
                broker = socket.create_connection((self.upstream_host, self.upstream), timeout=2)
            except OSError:
                client.close()
                continue
            for src, dst, down in ((client, broker, False), (broker, client, True)):
                t = threading.Thread(target=self._pump, args=(src, dst, down), daemon=True)
                t.start()
                self.threads.append(t)

    def _pump(self, src: socket.socket, dst: socket.socket, down: bool) -> None:
        pending: collections.deque[tuple[float, bytes]] = collections.deque()
        free_at = time.monotonic()
        try:
            while not self.stop.is_set():
                wait = 0.2 if not pending else max(0.0, pending[0][0] - time.monotonic())
                readable, _, _ = select.select([src], [], [], wait)
                if readable:
                    data = src.recv(16384)
                    if not data:
                        break
                    # per 1400-byte segment a loss, which TCP turns into a retransmission stall
                    segments = -(-len(data) // 1400)
                    lost = self.rng.random() < 1 - (1 - self.loss) ** segments
                    self.held_back += lost
                    pending.append((time.monotonic() + self.delay_s + (self.rto_s if lost else 0.0), data))
                while pending and pending[0][0] <= time.monotonic():
                    _, chunk = pending.popleft()
                    free_at = max(free_at, time.monotonic()) + len(chunk) / self.rate
                    dst.sendall(chunk)
                    if down:
                        self.delivered += len(chunk)
                    if self.stop.wait(max(0.0, free_at - time.monotonic())):  # the throttle
                        return
        except (OSError, ValueError):  # the other direction closed both sockets (fd -1)
            pass
        finally:
            for s in (src, dst):
                with contextlib.suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)
                s.close()

    def close(self) -> None:
        self.stop.set()
        self.server.close()
        self.acceptor.join(timeout=5)
        for t in self.threads:
            t.join(timeout=5)


_PROXY_LINK = "loopback TCP proxy: 200 ms one way, {:g} Mbit/s, 2 % of segments held back 1 s"


def bad_link_fetch(
    models_dir: Path,
    tmp_path: Path,
    size: int,
    chunk: int,
    seed: int = 5,
    rate_bps: float = 1e6,
    link: str = "auto",
) -> dict[str, Any]:
    """Fetch a ``size``-byte variant over a bad link (200 ms one way, ``rate_bps``, 2 % loss): a third
    of its chunks is on the broker; once the agent stored them the broker (persistence on) is stopped
    and restarted on its port, then the rest is published. The variant must complete and verify;
    returns the figures, ``link_mode`` naming what shaped the link. The blob is random bytes: it is
    fetched and verified, not run (the report marks it failed to load, beside the point here).

    ``link="netns"``: a real kernel link (:mod:`netns_helpers`): the broker in namespace A, the agent in
    namespace B, the veth between them throttled by tbf on both ends, delay and loss by netem when the
    kernel has it, else loss by nftables/iptables drops and delay by a :class:`SlowLink` in B; skips
    when the machine cannot (not root, no usable ``ip netns``). ``link="proxy"``: :class:`SlowLink`
    alone on the root namespace's loopback. ``link="auto"``: netns when possible, else the proxy.
    """
    if link not in ("auto", "netns", "proxy"):
        raise ValueError(f"link must be auto, netns or proxy, not {link!r}")
    why_not = "the loopback proxy was asked for" if link == "proxy" else netns_unavailable()
    if link == "netns" and why_not:
        pytest.skip(f"no kernel link here: {why_not}")
    key, pub = new_key()
    store = tmp_path / "store"
    m = Models.load(models_dir)
    big = random.Random(seed).randbytes(size)
    variants = [variant_for("float32", m.f32, "none"), _variant_chunked("big", big, chunk)]
    manifest = sign(
        Manifest(model=MODEL, version=1, created_at=time.time(), baseline="float32", variants=variants), key
    )
    state_dir = tmp_path / "broker"
    port = free_port()
    log = tmp_path / "agent.log"
    # what the link needs at least (the throttle), with room for loss and the broker's downtime
    budget = max(120.0, 10 * 8 * size / rate_bps)
    net: NetnsLink | None = None
    proxy: SlowLink | None = None
    broker: MosquittoBroker | None = None
    bus: Bus | None = None
    proc: subprocess.Popen[bytes] | None = None

    def side(name: Side) -> contextlib.AbstractContextManager[None]:
        return net.inside(name) if net is not None else contextlib.nullcontext()

    def start_broker() -> tuple[MosquittoBroker, Bus]:
        # in namespace A: the test's client on A's own loopback (the base listener), the agent over the
        # veth on a second listener, same port
        extra = f"listener {port} {ADDR_A}\n" if net is not None else ""
        with side("a"):
            started = MosquittoBroker(port=port, persistence=True, state_dir=state_dir, extra_config=extra)
            started.start()
            try:
                return started, Bus(started, TOPICS)
            except BaseException:
                started.stop()
                raise

    try:
        if why_not is None:
            net = NetnsLink(LinkShape(delay_s=0.2, rate_bps=rate_bps, loss=0.02)).open()
        broker, bus = start_broker()
        if net is None:
            proxy = SlowLink(port, delay_s=0.2, rate_bps=rate_bps, loss=0.02, rto_s=1.0, seed=seed)
            target = ("127.0.0.1", proxy.port)
        elif net.delay_by == "proxy":  # no netem: the delay (and the loss if no packet filter) in B
            with side("b"):
                loss = 0.02 if net.loss_by == "proxy" else 0.0
                proxy = SlowLink(port, 0.2, math.inf, loss, rto_s=1.0, seed=seed, upstream_host=ADDR_A)
            target = ("127.0.0.1", proxy.port)
        else:
            target = (ADDR_A, port)

        class _Via:  # write_config reads host and port only
            host, port = target

        via: Any = _Via()
        cfg = write_config(tmp_path, via, pub, store, extra="reconnect_max_s = 1\nreconnect_min_s = 0.2")
        first = len(variants[1].chunks) // 3  # the rest is published after the broker restart
        publish_many(bus.client, [*chunk_items(m.f32), *_chunks_of(big, chunk)[:first]])
        bus.publish(TOPICS.manifest(MODEL), manifest.to_json())
        partial = store / "partial" / variants[1].sha256
        n_chunks = len(variants[1].chunks)
        with side("b"):
            proc = start_agent(cfg, log)
        t0 = time.monotonic()
        deadline = time.monotonic() + budget
        while time.monotonic() < deadline and len(list(partial.glob("[0-9]*"))) < first:
            assert proc.poll() is None, f"the agent exited ({proc.returncode})"
            time.sleep(0.02)
        bus.close()
        broker.stop()  # SIGTERM: a clean shutdown writes mosquitto.db with the retained chunks
        time.sleep(0.5)  # what was already through the link is written
        at_stop = len(list(partial.glob("[0-9]*")))
        blob = store / "blobs" / f"{variants[1].sha256}.tflite"
        assert 0 < at_stop < n_chunks and not blob.exists(), f"{at_stop}/{n_chunks} chunks: not mid-fetch"
        time.sleep(1.0)
        broker, bus = start_broker()
        restarted_at = time.monotonic() - t0
        bus.proc = proc
        publish_many(bus.client, _chunks_of(big, chunk)[first:])  # the host publishes the rest
        republished = time.monotonic()
        downloaded = bus.wait_for(is_event("downloaded", variant="big", sha256=variants[1].sha256), budget)
        until = time.monotonic() + 30
        while not blob.is_file() and time.monotonic() < until:  # assembled and verified after the chunks
            time.sleep(0.02)
        done = time.monotonic()
        fetch_s = done - t0
        assert hashlib.sha256(blob.read_bytes()).hexdigest() == variants[1].sha256
        pong_cid = "after-bad-link"
        bus.publish(TOPICS.cmd(DEVICE), signed_ping(key, DEVICE, pong_cid), retain=False)
        bus.wait_for(is_event("pong", correlation_id=pong_cid), timeout=60)
        text = log.read_text(errors="replace")
        assert "Traceback" not in text
        assert downloaded["kind"] == "downloaded"
        figures: dict[str, Any] = {
            "link_mode": net.mode if net is not None else "loopback-proxy",
            "link": net.describe() if net is not None else _PROXY_LINK.format(rate_bps / 1e6),
            "link_notes": net.notes if net is not None else [f"no kernel link: {why_not}"],
            "variant_bytes": size,
            "chunk_bytes": chunk,
            "chunks": n_chunks,
            "chunks_stored_when_broker_stopped": at_stop,
            "broker_restarted_at_s": round(restarted_at, 2),
            "fetched_and_verified_s": round(fetch_s, 2),
            # the whole fetch, the broker's downtime included; then the part after the restart alone
            "payload_rate_bps": round(size * 8 / fetch_s),
            "payload_rate_after_restart_bps": round((size - at_stop * chunk) * 8 / (done - republished)),
            "verified": True,
        }
        if proxy is not None:
            figures["proxy_bytes_to_agent"] = proxy.delivered  # beside wire bytes: MQTT vs TCP overhead
            if proxy.loss > 0:
                figures["segments_held_back"] = proxy.held_back
        if net is not None:
            figures.update(net.counters())
        return figures
    finally:
        with contextlib.ExitStack() as teardown:  # every step runs even if one fails; the agent first
            if net is not None:
                teardown.callback(net.close)  # last: the namespaces, once nothing runs in them
            if broker is not None:
                teardown.callback(broker.stop)
            if bus is not None:
                teardown.callback(bus.close)
            if proxy is not None:
                teardown.callback(proxy.close)
            if proc is not None:
                teardown.callback(terminate, proc)


def _variant_chunked(vid: str, data: bytes, chunk: int) -> Variant:
    return variant_for(vid, data, "none").model_copy(update=blob_fields(data, chunk))


def _chunks_of(data: bytes, chunk: int) -> list[tuple[str, bytes]]:
    sha = hashlib.sha256(data).hexdigest()
    return [(TOPICS.blob(sha, i), c) for i, c in enumerate(iter_chunks(data, chunk))]


@pytest.mark.parametrize("link", ["netns", "proxy"])
def test_fetch_over_a_slow_lossy_link_with_a_broker_restart(
    tiny_models: Path, tmp_path: Path, link: str
) -> None:
    """128 KiB in 16 KiB chunks over the bad link (200 ms, 1 Mbit/s, 2 % loss), the broker restarted a
    third of the way: fetched, verified, the agent still answers. ``netns``: over a real veth between
    two namespaces, shaped by the kernel (skipped when not root); ``proxy``: the loopback proxy."""
    figures = bad_link_fetch(tiny_models, tmp_path, size=128 * 1024, chunk=16 * 1024, link=link)
    print(json.dumps(figures, indent=1))
    assert figures["verified"] and figures["chunks_stored_when_broker_stopped"] < figures["chunks"]
    assert figures["fetched_and_verified_s"] > 128 * 1024 * 8 / 1e6  # the throttle really applied
    if link == "netns":
        assert figures["link_mode"].startswith("netns+tbf+"), figures["link_mode"]
        # the variant really crossed the veth (not some other path between the namespaces)
        assert figures["wire_bytes_broker_to_agent"] > 128 * 1024, figures
        assert not ours(), f"namespaces left behind: {ours()}"
    else:
        assert figures["link_mode"] == "loopback-proxy"


# -------------------------------------------------------------------------------- (f) the disk fills up


@contextlib.contextmanager
def small_filesystem(path: Path, size_mb: int) -> Iterator[None]:
    """A tmpfs of ``size_mb`` at ``path`` (needs root; skips the test otherwise), unmounted after."""
    path.mkdir(parents=True, exist_ok=True)
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size_mb}m", "tmpfs", str(path)],
        capture_output=True,
        timeout=10,
        check=False,
    )
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.decode(errors='replace').strip()}")
    try:
        yield
    finally:
        subprocess.run(["umount", "-l", str(path)], capture_output=True, timeout=30, check=False)


def disk_full_fetch(
    models_dir: Path, tmp_path: Path, size: int, chunk: int, seed: int = 11
) -> dict[str, Any]:
    """The store on a small tmpfs: float32 committed, then a manifest with a ``size``-byte variant
    whose chunks arrive only after a filler file has taken the free space. The agent must publish
    DISK_FULL, keep the active model untouched, and finish the fetch once the filler is gone."""
    key, pub = new_key()
    store = tmp_path / "store"
    m = Models.load(models_dir)
    big = random.Random(seed).randbytes(size)
    base = m.variants()
    bigv = _variant_chunked("big", big, chunk)
    with small_filesystem(store, size_mb=max(8, 4 * size // 2**20 + 4)), MosquittoBroker() as broker:
        cfg = write_config(tmp_path, broker, pub, store)
        bus = Bus(broker, TOPICS)
        publish_many(bus.client, [*chunk_items(m.f32), *chunk_items(m.f16), *chunk_items(m.sample)])
        v1 = Manifest(model=MODEL, version=1, created_at=time.time(), baseline="float32", variants=base)
        bus.publish(TOPICS.manifest(MODEL), sign(v1, key).to_json())
        bus.publish(
            TOPICS.assign(DEVICE, MODEL), signed_assignment(key, DEVICE, MODEL, "float32", base[0].sha256, 1)
        )
        log = tmp_path / "agent.log"
        proc = start_agent(cfg, log)
        bus.proc = proc
        filler = store / "filler"
        try:
            bus.wait_for(is_event("committed", variant="float32"), timeout=60)
            active_before = link_sha(store, MODEL)
            v2 = Manifest(
                model=MODEL, version=2, created_at=time.time(), baseline="float32", variants=[*base, bigv]
            )
            bus.publish(TOPICS.manifest(MODEL), sign(v2, key).to_json())
            bus.wait_for(
                lambda t, o: (
                    t == TOPICS.status(DEVICE)
                    and o.get("models", {}).get(MODEL, {}).get("state") == "fetching"
                ),
                timeout=30,
            )
            # take the free space (leave 64 KiB), then let the chunks come
            free = os.statvfs(store).f_bavail * os.statvfs(store).f_frsize
            with filler.open("wb") as fh:
                fh.write(b"\0" * max(0, free - 64 * 1024))
            t0 = time.monotonic()
            publish_many(bus.client, _chunks_of(big, chunk))
            full = bus.wait_for(is_event("rejected", reason="DISK_FULL"), timeout=60)
            full_s = time.monotonic() - t0
            assert link_sha(store, MODEL) == active_before, "the active model changed while the disk was full"
            assert proc.poll() is None
            filler.unlink()  # space is back
            t1 = time.monotonic()
            until = time.monotonic() + 120
            blob = store / "blobs" / f"{bigv.sha256}.tflite"
            while not blob.is_file():
                assert time.monotonic() < until, f"the fetch did not resume: {model_record(store, MODEL)}"
                assert proc.poll() is None, f"the agent exited ({proc.returncode})"
                time.sleep(0.05)
            resumed_s = time.monotonic() - t1
            assert hashlib.sha256(blob.read_bytes()).hexdigest() == bigv.sha256
            assert link_sha(store, MODEL) == active_before
            _no_traceback(log)
            assert terminate(proc) == 0
            return {
                "filesystem": "tmpfs",
                "variant_bytes": size,
                "disk_full_event_s": round(full_s, 2),
                "disk_full_detail": str(full.get("detail"))[:200],
                "active_untouched": True,
                "fetch_completed_after_space_back_s": round(resumed_s, 2),
            }
        finally:
            kill9(proc)
            bus.close()
            with contextlib.suppress(FileNotFoundError):
                filler.unlink()
            print(log.read_text(errors="replace")[-3000:])


def test_disk_filling_up_during_a_fetch(tiny_models: Path, tmp_path: Path) -> None:
    """A 512 KiB variant fetched into a full tmpfs: DISK_FULL, active model untouched, the fetch
    completed once space is back."""
    figures = disk_full_fetch(tiny_models, tmp_path, size=512 * 1024, chunk=16 * 1024)
    assert figures["active_untouched"] and figures["fetch_completed_after_space_back_s"] < 120


# ------------------------------------------------------------- (g) children a killed agent left behind


def test_a_restarted_agent_ends_the_benchmark_child_its_predecessor_left(
    tiny_models: Path, tmp_path: Path
) -> None:
    """kill -9 of the agent mid-benchmark leaves its child running (own session); the next start ends it
    (pid + start time recorded in the store, checked before the kill)."""
    key, pub = new_key()
    store = tmp_path / "store"
    m = Models.load(tiny_models)
    manifest = sign(
        Manifest(model=MODEL, version=1, created_at=time.time(), baseline="float32", variants=m.variants()),
        key,
    )
    with MosquittoBroker() as broker:
        cfg = write_config(tmp_path, broker, pub, store)
        cfg.write_text(
            cfg.read_text().replace("min_seconds = 0.05", "min_seconds = 40\nmax_runs = 100000000")
        )
        cfg.write_text(cfg.read_text().replace("max_runs = 2000\n", ""))
        bus = Bus(broker, TOPICS)
        publish_many(bus.client, [*chunk_items(m.f32), *chunk_items(m.f16), *chunk_items(m.sample)])
        bus.publish(TOPICS.manifest(MODEL), manifest.to_json())
        log = tmp_path / "agent.log"
        proc = start_agent(cfg, log)
        second: subprocess.Popen[bytes] | None = None
        try:
            deadline = time.monotonic() + 60
            while not _recorded_children(store):
                assert time.monotonic() < deadline, "no benchmark child was recorded"
                assert proc.poll() is None
                time.sleep(0.02)
            (child,) = _recorded_children(store)
            time.sleep(1.5)  # past reading its request and loading: in its 40 s timed loop
            kill9(proc)
            time.sleep(0.3)
            assert _alive(child), "the child died with the agent: nothing to prove"
            second = start_agent(cfg, log)
            bus.proc = second
            deadline = time.monotonic() + 30
            while _alive(child):
                assert time.monotonic() < deadline, f"child {child} survived the restart"
                assert second.poll() is None
                time.sleep(0.05)
            assert "ended 1 benchmark/health child(ren)" in log.read_text(errors="replace")
        finally:
            for p in (proc, second):
                if p is not None:
                    kill9(p)
            for pid in _recorded_children(store):
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(pid, 9)
            bus.close()


# ---------------------------------------------------------------- the generation layout (no processes)


def _blob(store: Store, data: bytes) -> str:
    ref = BlobRef.of(data, CHUNK * 8)
    store.write_chunk(ref, 0, data)
    store.assemble(ref)
    return ref.sha256


def test_model_and_metadata_change_in_one_step_and_old_stores_convert(tmp_path: Path) -> None:
    store = Store(tmp_path)
    store.ensure()
    a, b = _blob(store, b"a" * 900), _blob(store, b"b" * 900)
    ia = ActiveVariant(variant="a", sha256=a, manifest_version=1, activated_at=1.0)
    ib = ActiveVariant(variant="b", sha256=b, manifest_version=2, activated_at=2.0)
    model_dir = store.model_dir("m")
    assert store.activate("m", a, ia) is None
    follower = ActiveModel(tmp_path, "m")
    assert follower.snapshot() == (store.blob_path(a), json.loads(ia.model_dump_json()))
    assert store.activate("m", b, ib) == a
    path, info = follower.snapshot()
    assert path == store.blob_path(b) and info is not None and info["sha256"] == b
    assert store.read_active_info("m") == ib and store.link_sha(store.previous_link("m")) == a
    assert len(list((model_dir / "gen").iterdir())) == 2  # current and previous only
    store.write_active_info("m", ib)  # the same pair: no new generation
    assert len(list((model_dir / "gen").iterdir())) == 2
    assert store.restore_previous("m") == a and store.read_active_info("m") == ia
    assert [p.name for p in (model_dir / "gen").iterdir()] == [os.readlink(model_dir / "current")[4:]]
    store.deactivate("m")
    assert not os.path.lexists(model_dir / "active.tflite") and not os.path.lexists(model_dir / "active.json")
    with pytest.raises(FileNotFoundError):
        follower.snapshot()
    # a store written by an older agent: active.tflite → the blob, active.json a plain file
    old = tmp_path / "models" / "old"
    old.mkdir()
    os.symlink(f"../../blobs/{b}.tflite", old / "active.tflite")
    os.symlink(f"../../blobs/{a}.tflite", old / "previous.tflite")
    (old / "active.json").write_text(ib.model_dump_json())
    # and a kill between making the fixed links and naming the first generation
    cut = store.model_dir("cut")
    os.symlink("current/model.tflite", cut / "active.tflite")
    os.symlink("current/active.json", cut / "active.json")
    (cut / "gen" / "000001").mkdir(parents=True)  # incomplete, named by nothing
    Store(tmp_path).ensure()
    assert store.link_sha(old / "active.tflite") == b and store.read_active_info("old") == ib
    assert os.readlink(old / "active.tflite") == "current/model.tflite"
    assert store.link_sha(old / "previous.tflite") == a
    assert store.restore_previous("old") == a and store.read_active_info("old") is None  # none was kept
    assert not os.path.lexists(cut / "active.tflite") and not list((cut / "gen").iterdir())


def test_only_a_recorded_child_with_the_same_start_time_is_ended(tmp_path: Path) -> None:
    """A pid reused by an unrelated process since the record was written is left alone."""
    from agent.children import ChildRegistry, start_ticks

    registry = ChildRegistry(tmp_path / "children")
    ours = subprocess.Popen(["sleep", "30"], start_new_session=True)
    other = subprocess.Popen(["sleep", "30"], start_new_session=True)
    try:
        registry.record(ours.pid)
        ticks = start_ticks(other.pid)
        assert ticks is not None
        (tmp_path / "children" / f"{other.pid}.json").write_text(
            json.dumps({"pid": other.pid, "start_ticks": ticks - 1})  # as if the pid had been reused
        )
        (tmp_path / "children" / ".9.json.tmp-1").write_text("{")  # a record torn by a kill
        assert registry.reap() == [ours.pid]
        assert ours.wait(timeout=10) == -9 and other.poll() is None
        assert not list((tmp_path / "children").iterdir())
    finally:
        for p in (ours, other):
            p.kill()
            p.wait(timeout=10)
