"""Unit tests of the agent: state table, store, chunk checks, fetch window, bench stats, config, CLI."""

from __future__ import annotations

import base64
import json
import os
import pwd
import queue
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat
from test_agent_integration import tiny_models  # the TF-built tiny models (session fixture, cached)

from agent import cli
from agent.bench import benchmark_variant, latency_stats, run_child
from agent.board import power_profile, profile_key_for
from agent.config import BenchConfig, parse_config
from agent.energy import modelled_energy
from agent.errors import ConfigError, DiskFullError, IllegalTransition, IntegrityError
from agent.fetch import Fetcher
from agent.mqtt import Inbound
from agent.notify import Notifier
from agent.state import TRANSITIONS, StateBook, check_transition
from agent.store import Store, verify_chunk
from agent.thermal import zone_temperature
from agent.wire import (
    ActiveVariant,
    BenchError,
    BlobRef,
    EnergyMethod,
    HostMetrics,
    ModelState,
    TensorSpec,
    Topics,
    Variant,
    blob_fields,
    iter_chunks,
)

S = ModelState
ROOT = Path(__file__).resolve().parent.parent


def _pub_b64() -> str:
    key = Ed25519PrivateKey.generate().public_key()
    return base64.b64encode(key.public_bytes(Encoding.Raw, PublicFormat.Raw)).decode()


# ------------------------------------------------------------------------------------------- state


def test_happy_path_is_legal_and_persisted(tmp_path: Path) -> None:
    store = Store(tmp_path)
    store.ensure()
    book = StateBook(store)
    path = [S.FETCHING, S.VERIFYING, S.BENCHMARKING, S.REPORTED, S.ACTIVATING, S.PROBATION, S.COMMITTED]
    for new in path:
        book.move("m", new)
        # persisted at once: a fresh book reads the same state
        again = StateBook(store)
        again.load()
        assert again.get("m").state is new
    book.move("m", S.FETCHING, manifest_version=2)
    book.move("m", S.VERIFYING)


@pytest.mark.parametrize(
    ("current", "new"),
    [
        (S.IDLE, S.BENCHMARKING),
        (S.FETCHING, S.REPORTED),
        (S.PROBATION, S.FETCHING),
        (S.IDLE, S.ACTIVATING),
        (S.ACTIVATING, S.COMMITTED),
        (S.ROLLED_BACK, S.PROBATION),
    ],
)
def test_illegal_transitions_raise(current: ModelState, new: ModelState) -> None:
    with pytest.raises(IllegalTransition, match=f"{current.value} to {new.value}"):
        check_transition(current, new)


def test_transition_table_covers_every_state() -> None:
    assert set(TRANSITIONS) == set(ModelState)
    for settled in (S.REPORTED, S.COMMITTED, S.ROLLED_BACK):
        assert S.FETCHING in TRANSITIONS[settled] and S.ACTIVATING in TRANSITIONS[settled]


def test_illegal_move_is_not_persisted(tmp_path: Path) -> None:
    store = Store(tmp_path)
    store.ensure()
    book = StateBook(store)
    book.move("m", S.FETCHING)
    with pytest.raises(IllegalTransition):
        book.move("m", S.COMMITTED)
    again = StateBook(store)
    again.load()
    assert again.get("m").state is S.FETCHING


# ------------------------------------------------------------------------------------------- store


def test_corrupt_state_json_is_moved_aside(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    store = Store(tmp_path)
    store.ensure()
    store.state_path.write_text('{"models": {"m": {"state": "fetch', encoding="utf-8")
    book = StateBook(store)
    book.load()
    assert book.models == {}
    assert list(tmp_path.glob("state.json.corrupt-*"))
    assert "corrupt" in caplog.text
    book.move("m", S.FETCHING)
    assert json.loads(store.state_path.read_text())["models"]["m"]["state"] == "fetching"


def test_state_json_not_an_object_is_survivable(tmp_path: Path) -> None:
    store = Store(tmp_path)
    store.ensure()
    store.state_path.write_text("[1, 2]", encoding="utf-8")
    assert store.read_state() == {}


def _put_blob(store: Store, data: bytes) -> str:
    ref = BlobRef.of(data, 1024)
    for i, chunk in enumerate(iter_chunks(data, 1024)):
        store.write_chunk(ref, i, chunk)
    store.assemble(ref)
    return ref.sha256


def test_temp_files_of_dead_writers_are_swept_at_start(tmp_path: Path) -> None:
    """A kill -9 between a temp write and its rename leaves `.{name}.tmp-{pid}`: the next start removes
    those whose writer is gone, and never a live process's (ours, or another's)."""
    store = Store(tmp_path / "store")
    store.ensure()
    dead = subprocess.Popen(["true"])
    dead.wait()
    sha = "a" * 64
    (store.partial / sha).mkdir()
    (store.models / "digits").mkdir()
    stale = [
        store.partial / sha / f".3.tmp-{dead.pid}",
        store.blobs / f".{sha}.tflite.tmp-{dead.pid}",
        store.root / f".state.json.tmp-{dead.pid}",
    ]
    kept = [
        store.partial / sha / f".4.tmp-{os.getpid()}",
        store.models / "digits" / f".active.json.tmp-{os.getppid()}",
        store.partial / sha / "3",  # a finished chunk
        store.blobs / f"{sha}.tflite",
    ]
    for path in stale + kept:
        path.write_bytes(b"x")
    os.symlink(store.blobs / f"{sha}.tflite", store.models / "digits" / f".active.tflite.tmp-{dead.pid}")
    stale.append(store.models / "digits" / f".active.tflite.tmp-{dead.pid}")
    assert sorted(store.sweep_stale_temp_files()) == sorted(stale)
    assert not any(os.path.lexists(p) for p in stale)
    assert all(p.exists() for p in kept)
    assert store.sweep_stale_temp_files() == []


def test_activate_swaps_atomically_and_restores_previous(tmp_path: Path) -> None:
    store = Store(tmp_path)
    store.ensure()
    a, b = _put_blob(store, b"a" * 3000), _put_blob(store, b"b" * 2000)
    assert (store.blob_path(a).stat().st_mode & 0o777) == 0o444
    assert not (store.partial / a).exists()
    assert store.activate("m", a) is None
    link = store.active_link("m")
    assert os.readlink(link) == "current/model.tflite" and link.resolve() == store.blob_path(a)
    assert link.read_bytes() == b"a" * 3000
    assert store.activate("m", b) == a
    assert link.read_bytes() == b"b" * 2000
    assert store.link_sha(store.previous_link("m")) == a
    assert not list(link.parent.glob(".*tmp*"))  # no temp links left behind
    assert store.restore_previous("m") == a
    assert link.read_bytes() == b"a" * 3000
    assert not store.previous_link("m").exists()
    assert store.restore_previous("m") is None
    store.write_active_info("m", ActiveVariant(variant="v", sha256=a, manifest_version=1, activated_at=1.0))
    assert store.read_active_info("m") is not None


def test_chunk_verification_refuses_bad_hash_and_size(tmp_path: Path) -> None:
    data = os.urandom(2500)
    ref = BlobRef.of(data, 1024)
    verify_chunk(ref, 2, data[2048:])
    with pytest.raises(IntegrityError) as size_err:
        verify_chunk(ref, 0, data[:1000])
    assert size_err.value.reason == "BAD_SIZE"
    with pytest.raises(IntegrityError) as hash_err:
        verify_chunk(ref, 1, bytes(1024))
    assert hash_err.value.reason == "BAD_HASH"
    store = Store(tmp_path)
    store.ensure()
    with pytest.raises(IntegrityError):
        store.write_chunk(ref, 1, bytes(1024))
    assert not store.chunk_path(ref.sha256, 1).exists()
    assert store.missing_chunks(ref) == [0, 1, 2]


def test_assemble_refuses_a_blob_whose_chunks_lie(tmp_path: Path) -> None:
    data = os.urandom(2048)
    good = BlobRef.of(data, 1024)
    # a manifest whose chunk hashes are consistent with each other but not with the whole sha
    liar = BlobRef(sha256="0" * 64, size=2048, chunk_size=1024, chunks=good.chunks)
    store = Store(tmp_path)
    store.ensure()
    for i, chunk in enumerate(iter_chunks(data, 1024)):
        store.write_chunk(liar, i, chunk)
    with pytest.raises(IntegrityError):
        store.assemble(liar)
    assert not store.has_blob(liar.sha256)
    assert not list(store.blobs.iterdir())


def test_free_space_check(tmp_path: Path) -> None:
    store = Store(tmp_path)
    store.ensure()
    store.check_free(1024, min_free_mb=0, budget_mb=1)
    with pytest.raises(DiskFullError, match="disk_budget_mb"):
        store.check_free(2 * 1024 * 1024, min_free_mb=0, budget_mb=1)
    with pytest.raises(DiskFullError, match="min_free_mb"):
        store.check_free(1024, min_free_mb=1e12, budget_mb=1e12)


# ------------------------------------------------------------------------------------------- fetch window


class FakeClient:
    """The broker seam, recording (un)subscriptions."""

    def __init__(self) -> None:
        self.inbox: queue.Queue[Inbound] = queue.Queue()
        self.subs: set[str] = set()
        self.max_subs = 0
        self.published: list[tuple[str, bytes, bool]] = []

    def subscribe(self, topic: str, qos: int = 1) -> None:
        assert "+" not in topic and "#" not in topic
        self.subs.add(topic)
        self.max_subs = max(self.max_subs, len([t for t in self.subs if "/blobs/" in t]))

    def unsubscribe(self, topic: str) -> None:
        self.subs.discard(topic)

    def publish(
        self, topic: str, payload: bytes, qos: int = 1, retain: bool = False, timeout: float = 10.0
    ) -> bool:
        self.published.append((topic, payload, retain))
        return True


def test_fetch_sliding_window_and_resume(tmp_path: Path) -> None:
    store = Store(tmp_path)
    store.ensure()
    topics = Topics()
    data = os.urandom(100 * 1024 + 5)
    ref = BlobRef.of(data, 1024)
    chunks = list(iter_chunks(data, 1024))
    client = FakeClient()
    fetcher = Fetcher(store, client, topics, window=32, timeout_s=60)  # type: ignore[arg-type]
    assert fetcher.add("m", "v", ref)
    fetcher.pump()
    assert len(client.subs) == 32
    # deliver 40 chunks (in window order), then "restart"
    for _ in range(40):
        topic = sorted(client.subs, key=lambda t: int(t.rsplit("/", 1)[1]))[0]
        index = int(topic.rsplit("/", 1)[1])
        assert fetcher.on_chunk(ref.sha256, index, chunks[index]) == []
        assert topic not in client.subs
    assert client.max_subs == 32

    client2 = FakeClient()
    fetcher2 = Fetcher(store, client2, topics, window=32, timeout_s=60)  # type: ignore[arg-type]
    fetcher2.add("m", "v", ref)
    fetcher2.pump()
    assert min(int(t.rsplit("/", 1)[1]) for t in client2.subs) == 40  # only the missing ones
    # a bad chunk is refused and the topic stays subscribed (the publisher may republish)
    notes = fetcher2.on_chunk(ref.sha256, 40, b"\0" * 1024)
    assert notes[0].kind == "rejected" and notes[0].reason == "BAD_HASH"
    assert topics.blob(ref.sha256, 40) in client2.subs
    notes = fetcher2.on_chunk(ref.sha256, 41, b"\0" * 10)
    assert notes[0].reason == "BAD_SIZE"
    done = []
    while client2.subs:
        topic = next(iter(client2.subs))
        index = int(topic.rsplit("/", 1)[1])
        done += fetcher2.on_chunk(ref.sha256, index, chunks[index])
        assert client2.max_subs <= 32
    assert [n.kind for n in done] == ["complete"]
    assert store.assemble(ref).read_bytes() == data


def test_fetch_times_out_per_blob(tmp_path: Path) -> None:
    store = Store(tmp_path)
    store.ensure()
    clock = [0.0]
    client = FakeClient()
    fetcher = Fetcher(store, client, Topics(), window=4, timeout_s=10, clock=lambda: clock[0])  # type: ignore[arg-type]
    ref = BlobRef.of(os.urandom(5000), 1024)
    fetcher.add("m", "v", ref)
    fetcher.pump()
    clock[0] = 11
    notes = fetcher.check_timeouts()
    assert [n.kind for n in notes] == ["timeout"] and notes[0].reason == "NOT_FETCHED"
    assert not client.subs and not fetcher.busy("m")


# ------------------------------------------------------------------------------------------- bench


def test_latency_stats_match_numpy() -> None:
    rng = np.random.default_rng(1)
    samples = rng.gamma(2.0, 1.5, size=517).tolist()
    stats = latency_stats(samples)
    arr = np.asarray(samples)
    assert stats.count == 517
    assert stats.mean == pytest.approx(arr.mean())
    assert stats.std == pytest.approx(arr.std())
    for q, got in ((50, stats.p50), (90, stats.p90), (95, stats.p95), (99, stats.p99)):
        assert got == pytest.approx(np.percentile(arr, q))
    assert stats.min == arr.min() and stats.max == arr.max()
    one = latency_stats([2.5])
    assert one.p99 == 2.5 and one.std == 0.0
    with pytest.raises(ValueError):
        latency_stats([])


def test_energy_is_modelled_never_measured() -> None:
    pi5 = power_profile(profile_key_for("Raspberry Pi 5 Model B Rev 1.0"))
    e = modelled_energy(pi5, 1.0, 4, 1, 0.01)
    assert e.method is EnergyMethod.MODEL and e.measured is False
    assert e.avg_power_w == pytest.approx(2.8 + (9.7 - 2.8) * 0.25)
    assert e.mj_per_inference == pytest.approx(e.avg_power_w * 10)
    assert power_profile(profile_key_for("Some PC")).name == "generic"


def test_cpu_temperature_from_recorded_tree(tmp_path: Path) -> None:
    for i, (kind, milli) in enumerate((("acpitz", "30000"), ("cpu-thermal", "51540"))):
        zone = tmp_path / f"thermal_zone{i}"
        zone.mkdir()
        (zone / "type").write_text(kind + "\n")
        (zone / "temp").write_text(milli + "\n")
    assert zone_temperature(tmp_path) == pytest.approx(51.54)
    assert zone_temperature(tmp_path / "missing") is None


def _variant(data: bytes) -> Variant:
    return Variant(
        id="v",
        file="v.tflite",
        quantization="none",
        inputs=[TensorSpec(name="x", shape=[1, 4], dtype="float32")],
        outputs=[TensorSpec(name="y", shape=[1, 2], dtype="float32")],
        metrics=HostMetrics(size_bytes=len(data)),
        **blob_fields(data, 1024),
    )


def test_garbage_model_is_a_load_error_not_a_crash(tmp_path: Path) -> None:
    data = os.urandom(3000)
    path = tmp_path / "g.tflite"
    path.write_bytes(data)
    result = benchmark_variant(_variant(data), path, None, BenchConfig(), board="test")
    assert result.ok is False and result.error is BenchError.LOAD_ERROR
    assert result.runtime is not None and result.runtime.name == "ai-edge-litert"


# ------------------------------------------------------------------------------------------- config and CLI


def test_config_errors_name_the_key(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="trust"):
        parse_config({"device": {"id": "pi"}})
    with pytest.raises(ConfigError, match=r"mqtt\.hots: unknown key; did you mean 'host'"):
        parse_config({"device": {"id": "pi"}, "trust": {"public_keys": [_pub_b64()]}, "mqtt": {"hots": "x"}})
    with pytest.raises(ConfigError, match=r"device\.id"):
        parse_config({"device": {"id": "Bad Id"}, "trust": {"public_keys": [_pub_b64()]}})
    with pytest.raises(ConfigError, match="window"):
        parse_config(
            {"device": {"id": "pi"}, "trust": {"public_keys": [_pub_b64()]}, "fetch": {"window": 64}}
        )
    with pytest.raises(ConfigError, match="not an Ed25519 public key"):
        parse_config({"device": {"id": "pi"}, "trust": {"public_keys": ["nope"]}})
    cfg = parse_config({"device": {"id": "pi"}, "trust": {"public_keys": [_pub_b64()]}})
    assert cfg.fetch.window == 32


def test_check_config_exit_codes(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    good = tmp_path / "good.toml"
    good.write_text(
        f'[device]\nid = "pi"\n[trust]\npublic_keys = ["{_pub_b64()}"]\n[store]\npath = "{tmp_path}/s"\n',
        encoding="utf-8",
    )
    bad = tmp_path / "bad.toml"
    bad.write_text('[device]\nid = "pi"\n[trust]\npublic_keys = []\n', encoding="utf-8")
    me = ["--service-user", pwd.getpwuid(os.getuid()).pw_name]  # the store lies in this user's temp dir
    assert cli.main(["--config", str(good), "--check-config", *me]) == 0
    assert cli.main(["--config", str(bad), "--check-config"]) == 1
    assert "at least one trusted public key" in capsys.readouterr().err
    assert cli.main(["--config", str(tmp_path / "missing.toml"), "--check-config"]) == 1


def test_import_agent_loads_no_heavy_modules() -> None:
    code = (
        "import sys, agent, agent.cli, agent.daemon, agent.bench, agent.fetch, agent.mqtt, agent.store\n"
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in "
        "{'tensorflow', 'keras', 'tf_keras', 'compressor', 'deploy', 'ai_edge_litert', 'tflite_runtime'})\n"
        "print(','.join(bad))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    assert out.stdout.strip() == ""


@pytest.mark.parametrize("preset", [None, "logfire"])
def test_the_agent_skips_pydantic_plugins_unless_told(preset: str | None) -> None:
    """The agent's entry point disables pydantic's plugin scan (every installed distribution's entry
    points, read at the first model class: 3.4 MB of idle PSS) before pydantic loads; an operator's own
    PYDANTIC_DISABLE_PLUGINS wins. Host code importing agent.wire is left alone."""
    env = {k: v for k, v in os.environ.items() if k != "PYDANTIC_DISABLE_PLUGINS"}
    if preset is not None:
        env["PYDANTIC_DISABLE_PLUGINS"] = preset
    code = (
        "import os, sys\nimport agent.wire\nhost = os.environ.get('PYDANTIC_DISABLE_PLUGINS')\n"
        "import agent.cli\nprint(host, os.environ.get('PYDANTIC_DISABLE_PLUGINS'))\n"
    )

    def run(code: str) -> subprocess.CompletedProcess[str]:
        argv = [sys.executable, "-c", code]
        return subprocess.run(argv, capture_output=True, text=True, timeout=60, env=env, check=False)

    out = run(code)
    assert out.stdout.split() == ([str(preset), preset] if preset else ["None", "__all__"]), out.stderr
    code = "import agent.cli, pydantic.plugin._loader as l; print(len(l.get_plugins()), l._plugins)"
    out = run(code)
    if preset is None:
        assert out.stdout.split() == ["0", "None"], out.stdout + out.stderr  # never scanned


def test_cli_help_is_fast_and_light() -> None:
    t0 = time.monotonic()
    exe = Path(sys.executable).with_name("edgefleet-agent")
    argv = [str(exe), "--help"] if exe.exists() else [sys.executable, "-m", "agent", "--help"]
    out = subprocess.run(argv, capture_output=True, text=True, timeout=30, check=False)
    assert out.returncode == 0 and "--check-config" in out.stdout
    assert time.monotonic() - t0 < 10


def test_sd_notify_datagrams(tmp_path: Path) -> None:
    import socket

    path = str(tmp_path / "notify.sock")
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as server:
        server.bind(path)
        server.settimeout(2)
        n = Notifier(path, min_interval_s=0)
        n.ready("hi")
        n.watchdog()
        got = [server.recv(100).decode(), server.recv(100).decode()]
    assert got == ["READY=1\nSTATUS=hi", "WATCHDOG=1"]
    assert Notifier("").send("READY=1") is False


def test_active_model_helper_follows_the_link(tmp_path: Path) -> None:
    from agent.active import ActiveModel

    store = Store(tmp_path)
    store.ensure()
    a, b = _put_blob(store, b"a" * 1500), _put_blob(store, b"b" * 1500)
    follower = ActiveModel(tmp_path, "m")
    with pytest.raises(FileNotFoundError):
        follower.path()
    store.activate("m", a)
    assert follower.changed() and not follower.changed()
    assert follower.path().name == f"{a}.tflite"
    store.activate("m", b)
    assert follower.changed() and follower.path().read_bytes() == b"b" * 1500


# --------------------------------------------------------------------------------------- daemon via the seam


class FakeBroker(FakeClient):
    def start(self) -> None: ...
    def wait_connected(self, timeout: float) -> bool:
        return True

    def is_connected(self) -> bool:
        return True

    def set_birth(self, topic: str, payload: bytes) -> None: ...
    def stop(self, final: tuple[str, bytes] | None = None, timeout: float = 5.0) -> None: ...

    def events(self) -> list[dict[str, object]]:
        return [json.loads(p) for t, p, _ in self.published if t.endswith("/events")]


def _agent(tmp_path: Path) -> tuple[object, FakeBroker]:
    from agent.daemon import Agent

    cfg = parse_config(
        {
            "device": {"id": "pi"},
            "trust": {"public_keys": [_pub_b64()]},
            "store": {"path": str(tmp_path / "s")},
        }
    )
    fake = FakeBroker()
    return Agent(cfg, client=fake), fake  # type: ignore[arg-type]


def test_restart_during_activation_restores_the_old_model(tmp_path: Path) -> None:
    store = Store(tmp_path / "s")
    store.ensure()
    old, new = _put_blob(store, b"o" * 1500), _put_blob(store, b"n" * 1500)
    book = StateBook(store)
    old_info = ActiveVariant(variant="old", sha256=old, manifest_version=1, activated_at=1.0)
    for s in (S.FETCHING, S.VERIFYING, S.BENCHMARKING, S.REPORTED, S.ACTIVATING, S.PROBATION, S.COMMITTED):
        book.move("m", s, active=old_info)
    store.activate("m", old)
    target = ActiveVariant(variant="new", sha256=new, manifest_version=1, activated_at=2.0)
    book.move("m", S.ACTIVATING, target=target)
    store.activate("m", new)  # the swap happened, then: power cut
    agent_obj, fake = _agent(tmp_path)
    agent_obj.recover()  # type: ignore[attr-defined]
    assert store.link_sha(store.active_link("m")) == old
    again = StateBook(store)
    again.load()
    assert again.get("m").state is S.ROLLED_BACK and again.get("m").active == old_info
    assert fake.events()[-1]["kind"] == "rolled_back"


def test_unsigned_and_garbage_messages_are_refused_not_fatal(tmp_path: Path) -> None:
    agent_obj, fake = _agent(tmp_path)
    topics = Topics()
    handle = agent_obj.handle  # type: ignore[attr-defined]
    handle(Inbound(topics.manifest("m"), b'{"schema": "edgefleet.manifest/1"}'))
    handle(Inbound(topics.manifest("m"), b"\xff\xfe not json"))
    handle(Inbound(topics.assign("pi", "m"), b"{}"))
    handle(Inbound(topics.cmd("pi"), b"[]"))
    handle(Inbound("elsewhere/topic", b"x"))
    handle(Inbound(topics.blob("0" * 64, 3), b"stray chunk"))
    reasons = [e.get("reason") for e in fake.events()]
    assert reasons == ["UNSIGNED", "MALFORMED", "UNSIGNED", "MALFORMED"]


def test_gc_keeps_referenced_blobs(tmp_path: Path) -> None:
    store = Store(tmp_path)
    store.ensure()
    a, b, c = (_put_blob(store, bytes([i]) * 1200) for i in range(3))
    store.activate("m", a)
    store.activate("m", b)  # a becomes previous
    (store.partial / ("f" * 64)).mkdir()
    removed = store.gc(keep=set())
    assert sorted(removed) == sorted([c, "f" * 64])
    assert store.has_blob(a) and store.has_blob(b) and not store.has_blob(c)


def test_memory_limit_gives_oom(tmp_path: Path) -> None:
    path = tmp_path / "m.tflite"
    path.write_bytes(os.urandom(4096))
    outcome = run_child({"mode": "bench", "model": str(path), "memory_limit_mb": 64}, timeout_s=60)
    assert outcome.error is BenchError.OOM


def test_accuracy_far_below_host_is_a_mismatch(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    import agent.bench as bench

    data = b"m" * 2000
    variant = _variant(data).model_copy(update={"metrics": HostMetrics(size_bytes=2000, accuracy=0.97)})
    fake = bench.ChildOutcome(
        {"ok": True, "latencies_ms": [1.0, 2.0, 3.0], "duration_s": 0.006, "cpu_util": 1.0, "accuracy": 0.5},
        None,
        None,
        0.5,
    )
    monkeypatch.setattr(bench, "run_child", lambda *a, **k: fake)
    result = bench.benchmark_variant(variant, tmp_path / "m.tflite", None, BenchConfig(), board="x")
    assert result.ok is False and result.error is BenchError.ACCURACY_MISMATCH
    assert result.latency_ms is not None and result.latency_ms.count == 3
    fake.data["accuracy"] = 0.95
    assert bench.benchmark_variant(variant, tmp_path / "m.tflite", None, BenchConfig(), board="x").ok


def test_command_redelivery_runs_once(tmp_path: Path) -> None:
    from agent.wire import Command, CommandAction, sign

    key = Ed25519PrivateKey.generate()
    pub = base64.b64encode(key.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)).decode()
    from agent.daemon import Agent

    cfg = parse_config(
        {"device": {"id": "pi"}, "trust": {"public_keys": [pub]}, "store": {"path": str(tmp_path / "s")}}
    )
    fake = FakeBroker()
    agent_obj = Agent(cfg, client=fake)  # type: ignore[arg-type]
    ping = sign(
        Command(id="c9", device="pi", action=CommandAction.PING, issued_at=time.time()), key
    ).to_json()
    for _ in range(2):
        agent_obj.handle(Inbound(Topics().cmd("pi"), ping))
    assert [e["kind"] for e in fake.events()] == ["pong"]


# --------------------------------------------------------------------------------------- local applications


def test_active_model_reloads_a_real_interpreter_and_counts_inferences(
    tiny_models: Path, tmp_path: Path
) -> None:
    from agent.active import ActiveModel, read_counters

    models = tiny_models
    store = Store(tmp_path)
    store.ensure()
    a = _put_blob(store, (models / "float32.tflite").read_bytes())
    b = _put_blob(store, (models / "float16.tflite").read_bytes())
    store.activate("digits", a)
    app = ActiveModel(tmp_path, "digits", flush_interval_s=0)
    interp = app.interpreter()
    x = np.ones((1, 8), dtype=np.float32)

    def infer() -> np.ndarray:
        interp.set_tensor(interp.get_input_details()[0]["index"], x)
        interp.invoke()
        app.count()
        return np.asarray(interp.get_tensor(interp.get_output_details()[0]["index"]))

    first = infer()
    assert not app.changed()
    store.activate("digits", b)  # the agent swaps the link under the running application
    assert app.changed()
    interp = app.interpreter()
    assert app.path().name == f"{b}.tflite"
    second = infer()
    assert np.allclose(first, second, atol=1e-2)  # float16 variant of the same model
    assert read_counters(tmp_path) == 2
    ActiveModel(tmp_path, "other", flush_interval_s=0).count(5)
    assert read_counters(tmp_path) == 7


# --------------------------------------------------------------------------------------- systemd unit


def test_systemd_unit_has_the_required_keys() -> None:
    import configparser

    unit = Path(__file__).resolve().parent.parent / "systemd" / "edgefleet-agent.service"
    parser = configparser.ConfigParser(strict=False, interpolation=None, delimiters=("=",))
    parser.optionxform = str  # type: ignore[assignment,method-assign]
    parser.read_string(unit.read_text())
    svc, u = parser["Service"], parser["Unit"]
    required = {
        "Type": "notify",
        "Restart": "on-failure",
        "User": "edgefleet",
        "StateDirectory": "edgefleet",
        "ConfigurationDirectory": "edgefleet",
        "NoNewPrivileges": "yes",
        "ProtectSystem": "strict",
        "ProtectHome": "yes",
        "PrivateTmp": "yes",
        "CapabilityBoundingSet": "",
    }
    for k, v in required.items():
        assert svc.get(k) == v, f"[Service] {k}={svc.get(k)!r}, expected {v!r}"
    for k in ("WatchdogSec", "MemoryMax", "RestrictAddressFamilies", "SystemCallFilter", "DeviceAllow"):
        assert svc.get(k), f"[Service] {k} missing"
    assert "@system-service" in unit.read_text()
    assert u.get("StartLimitIntervalSec") and u.get("StartLimitBurst")
    sysusers = unit.with_name("edgefleet.sysusers.conf").read_text()
    assert "u edgefleet" in sysusers


__all__ = ["tiny_models"]
