"""The simulated fleet (benches/fleet_sim.py), small and bounded: the same verdicts as the 2,000-device run.

The integration test runs the bench itself as a process — 100 simulated devices over two worker
processes and one real agent, against its own mosquitto (generated configuration) and its own
``edgefleet collect`` — and checks its JSON: every device connected, every report the broker
acknowledged stored, every device decided, select and assign under 10 s, the canary rollout completed
with every device committed or rolled back exactly as its simulated health decided. The unit tests
drive one :class:`SimDevice` with a recording ``send`` to check that it answers as the agent does.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from agent import wire
from deploy.broker.spawn import find_mosquitto

BENCHES = Path(__file__).resolve().parent.parent / "benches"
sys.path.append(str(BENCHES))  # after the `agent` package is imported: benches/agent.py must not shadow it

from _sim_device import Counters, SimDevice, SimSettings, fails_health  # noqa: E402
from _sim_models import write_bundle  # noqa: E402

TOPICS = wire.Topics()


# ------------------------------------------------------------------------------------------ unit


class Harness:
    """One SimDevice with a recording ``send`` and a manual clock for ``later``."""

    def __init__(self, tmp: Path, fail_fraction: float = 0.0, device: str = "sim-00001") -> None:
        self.key = Ed25519PrivateKey.generate()
        trusted = {wire.key_id_for(self.key.public_key()): self.key.public_key()}
        self.sent: list[tuple[str, dict[str, Any], bool]] = []
        self.timers: list[Callable[[], None]] = []
        settings = SimSettings("edgefleet", 7, fail_fraction, 0.1, 0.1, 0.1)
        self.dev = SimDevice(device, settings, trusted, self._send, self._later, Counters())
        self.manifest = wire.sign(write_bundle(tmp / "bundle", "kws", 1, time.time()), self.key)

    def _send(self, topic: str, payload: bytes, retain: bool) -> None:
        self.sent.append((topic, json.loads(payload), retain))

    def _later(self, _delay: float, fn: Callable[[], None]) -> None:
        self.timers.append(fn)

    def run_timers(self) -> None:
        for _ in range(10):  # bounded: each timer may schedule the next stage
            todo, self.timers = self.timers, []
            if not todo:
                return
            for fn in todo:
                fn()

    def states(self) -> list[str]:
        return [o["models"]["kws"]["state"] for t, o, _ in self.sent if t.endswith("/status") and o["models"]]

    def events(self) -> list[dict[str, Any]]:
        return [o for t, o, _ in self.sent if t.endswith("/events")]

    def assignment(self, variant: str, version: int = 1, key: Ed25519PrivateKey | None = None) -> bytes:
        v = self.manifest.variant(variant)
        a = wire.Assignment(
            device=self.dev.device,
            model="kws",
            variant=variant,
            sha256=v.sha256,
            manifest_version=version,
            issued_at=time.time(),
            policy="test",
        )
        return wire.sign(a, key or self.key).to_json()


def test_manifest_gives_the_agents_states_events_and_a_report(tmp_path: Path) -> None:
    h = Harness(tmp_path)
    h.dev.handle(TOPICS.manifest("kws"), h.manifest.to_json())
    h.run_timers()
    assert h.states() == ["fetching", "verifying", "benchmarking", "reported"]
    reports = [wire.Report.model_validate(o) for t, o, r in h.sent if t == TOPICS.report(h.dev.device, "kws")]
    assert len(reports) == 1 and [r.variant for r in reports[0].results] == ["float32", "slim", "tiny"]
    lat = [r.latency_ms.p50 for r in reports[0].results if r.latency_ms]
    assert lat[0] > lat[1] > lat[2] > 0  # the smaller variants are faster on the same board
    kinds = [e["kind"] for e in h.events()]
    assert kinds.count("downloaded") == kinds.count("verified") == kinds.count("benchmarked") == 3


def test_bad_signature_and_replay_are_refused_with_events(tmp_path: Path) -> None:
    h = Harness(tmp_path)
    forged = wire.sign(h.manifest, Ed25519PrivateKey.generate()).to_json()
    h.dev.handle(TOPICS.manifest("kws"), forged)
    assert [e["reason"] for e in h.events()] == ["UNKNOWN_KEY"] and not h.states()
    h.dev.handle(TOPICS.manifest("kws"), h.manifest.to_json())
    h.run_timers()
    newer = wire.sign(h.manifest.model_copy(update={"version": 3, "signature": None}), h.key)
    h.dev.handle(TOPICS.manifest("kws"), newer.to_json())
    h.run_timers()
    assert h.states()[-1] == "reported" and h.dev.models["kws"].manifest_version == 3
    h.dev.handle(TOPICS.manifest("kws"), h.manifest.to_json())  # v1 again: older than v3 held
    assert h.events()[-1]["kind"] == "rejected" and h.events()[-1]["reason"] == "REPLAY"


def test_assignment_commits_or_rolls_back_as_health_decides(tmp_path: Path) -> None:
    for fraction, final in ((0.0, "committed"), (0.999, "rolled_back")):
        h = Harness(tmp_path / final, fail_fraction=fraction)
        h.dev.handle(TOPICS.manifest("kws"), h.manifest.to_json())
        h.run_timers()
        h.dev.handle(TOPICS.assign(h.dev.device, "kws"), h.assignment("slim"))
        h.run_timers()
        assert h.states()[-3:] == ["activating", "probation", final]
        sha = h.manifest.variant("slim").sha256
        assert fails_health(7, fraction, h.dev.device, sha) == (final == "rolled_back")
        last = h.events()[-1]
        assert last["kind"] == final and last["sha256"] == sha
        if final == "rolled_back":
            assert last["reason"] == "HEALTH_CHECK_FAILED"
            # the same assignment again is not re-applied (the agent remembers what it rolled back)
            n = len(h.sent)
            h.dev.handle(TOPICS.assign(h.dev.device, "kws"), h.assignment("slim"))
            h.run_timers()
            assert len(h.sent) == n


def test_assignment_checks_and_commands(tmp_path: Path) -> None:
    h = Harness(tmp_path)
    h.dev.handle(TOPICS.manifest("kws"), h.manifest.to_json())
    h.run_timers()
    h.dev.handle(TOPICS.assign(h.dev.device, "kws"), h.assignment("slim", key=Ed25519PrivateKey.generate()))
    tampered = json.loads(h.assignment("slim"))
    tampered["policy"] = "forged"
    h.dev.handle(TOPICS.assign(h.dev.device, "kws"), json.dumps(tampered).encode())
    h.dev.handle(TOPICS.assign("sim-00002", "kws"), h.assignment("slim"))  # not its topic: ignored
    assert [e["reason"] for e in h.events()[-2:]] == ["UNKNOWN_KEY", "BAD_SIGNATURE"]
    assert h.states()[-1] == "reported"
    for variant in ("float32", "tiny"):
        h.dev.handle(TOPICS.assign(h.dev.device, "kws"), h.assignment(variant))
        h.run_timers()
    ping = wire.Command(id="c1", device=h.dev.device, action=wire.CommandAction.PING, issued_at=time.time())
    h.dev.handle(TOPICS.cmd(h.dev.device), wire.sign(ping, h.key).to_json())
    assert h.events()[-1]["kind"] == "pong" and h.events()[-1]["correlation_id"] == "c1"
    rb = wire.Command(
        id="c2", device=h.dev.device, action=wire.CommandAction.ROLLBACK, model="kws", issued_at=time.time()
    )
    h.dev.handle(TOPICS.cmd(h.dev.device), wire.sign(rb, h.key).to_json())
    ev = h.events()[-1]
    assert ev["kind"] == "rolled_back" and ev["reason"] == "COMMAND" and ev["variant"] == "tiny"
    status = [o for t, o, _ in h.sent if t.endswith("/status")][-1]
    assert status["models"]["kws"]["active"]["variant"] == "float32"  # back on the previous variant
    h.dev.handle(TOPICS.cmd(h.dev.device), wire.sign(rb.model_copy(update={"id": "c3"}), h.key).to_json())
    assert h.events()[-1]["reason"] == "NO_PREVIOUS"


# ------------------------------------------------------------------------------------------ integration


@pytest.mark.integration
@pytest.mark.skipif(find_mosquitto() is None, reason="mosquitto is not installed")
def test_small_simulated_fleet_end_to_end() -> None:
    cmd = [
        sys.executable, str(BENCHES / "fleet_sim.py"),
        "--devices", "100", "--agents", "1", "--workers", "2", "--fail-fraction", "0.1",
        "--fetch-s", "0.3", "--bench-s", "0.5", "--probation-s", "0.3", "--timeout", "40",
    ]  # fmt: skip
    t0 = time.monotonic()
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=170, check=False)
    print(proc.stderr[-3000:])
    out = json.loads(proc.stdout)
    print(f"fleet_sim with 101 devices: {time.monotonic() - t0:.1f} s, stages {out.get('stage_seconds')}")
    assert "error" not in out, out["error"]
    floors = out["floors"]
    assert floors.pop("devices_at_least_2000") is False  # a small run; everything else must hold
    assert all(floors.values()), floors
    assert proc.returncode == 1  # not ok only because of the fleet size
    sim = out["simulator"]
    assert sim["connacks"] == 100 and sim["refused"] == 0 and sim["publish_errors"] == 0
    assert out["reports"]["lost"] == 0 and out["reports"]["stored_sim"] == sim["reports_acked"] == 200
    assert out["reports"]["stored_real_agents"] >= 2  # the real agent reported both versions
    for v in (1, 2):
        assert out[f"decisions_v{v}"]["decisions"] == 101 and out[f"decisions_v{v}"]["missing"] == 0
    roll = out["rollout_v2"]
    assert roll["state"] == "completed" and roll["devices"] == 101 and roll["unexpected"] == 0
    assert roll["outcomes"].get("rolled_back", 0) > 0  # some devices failed their health check, as drawn
    assert out["after_rollout_v2"]["states"]["committed"] == roll["outcomes"]["committed"]
    assert "agent_tracebacks" not in out
    assert out["db"]["bytes"] > 0 and out["collector_cpu_seconds"] > 0


@pytest.mark.integration
@pytest.mark.skipif(find_mosquitto() is None, reason="mosquitto is not installed")
def test_small_simulated_fleet_over_tls(tmp_path: Path) -> None:
    """``--tls``: the broker on the generated TLS listener only; simulated devices, the collector and every
    command verify it with the generated CA, and the run holds the same floors. No real agent here, to keep
    it to seconds (``--agents`` adds them with ``[mqtt.tls] ca_file``; the 200- and 2,000-device runs in
    docs/operator.md had two)."""
    keep = tmp_path / "run"
    cmd = [
        sys.executable, str(BENCHES / "fleet_sim.py"), "--tls", "--keep", str(keep),
        "--devices", "20", "--agents", "0", "--workers", "1", "--fail-fraction", "0.1",
        "--fetch-s", "0.2", "--bench-s", "0.2", "--probation-s", "0.2", "--timeout", "40",
    ]  # fmt: skip
    t0 = time.monotonic()
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120, check=False)
    print(proc.stderr[-3000:])
    out = json.loads(proc.stdout)
    print(f"fleet_sim --tls with 20 devices: {time.monotonic() - t0:.1f} s, connect {out.get('connect')}")
    assert "error" not in out, out["error"]
    floors = out["floors"]
    assert floors.pop("devices_at_least_2000") is False
    assert all(floors.values()), floors
    sim = out["simulator"]
    assert sim["connacks"] == 20 and sim["refused"] == 0 and sim["publish_errors"] == 0
    assert out["reports"]["lost"] == 0 and out["reports"]["stored_sim"] == 40
    assert out["rollout_v2"]["state"] == "completed" and out["rollout_v2"]["unexpected"] == 0
    connect = out["connect"]  # the handshakes' cost, apart from the rest (CPU: 10 ms resolution)
    assert connect["seconds"] > 0 and connect["devices_per_second"] > 0
    assert {"broker_cpu_ms_per_device", "simulator_cpu_ms_per_device"} <= set(connect)
    # it really ran over TLS: the broker's only listener has the server certificate, the host the CA
    conf = (keep / "state" / "mosquitto.conf").read_text()
    assert conf.count("listener ") == 1 and "certfile" in conf and "require_certificate" not in conf
    assert "[broker.tls]" in (keep / "broker" / "controller" / "host.toml").read_text()
