"""Helpers shared by the real-agent chaos, rollout and ACL tests (on top of test_agent_integration's).

Everything here drives *real* processes: ``python -m agent`` subprocesses against private mosquittos
(``deploy.broker.spawn.MosquittoBroker``, never the system broker on 1883).
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import paho.mqtt.client as paho
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from agent.wire import Assignment, Command, CommandAction, sign


def start_agent(cfg: Path, log: Path, env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
    """``python -m agent --config cfg``, stderr appended to ``log``; never inherits a crash point."""
    full = dict(os.environ, PYTHONUNBUFFERED="1")
    full.pop("EDGEFLEET_CRASH_AT", None)
    full.update(env or {})
    with log.open("ab") as fh:
        return subprocess.Popen([PY, "-m", "agent", "--config", str(cfg)], stderr=fh, env=full)


PY = sys.executable  # the interpreter the agents run under: the tests' own


def kill9(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=10)


def terminate(proc: subprocess.Popen[bytes], timeout: float = 20) -> int:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
    try:
        return proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        kill9(proc)
        raise


def publish_many(client: paho.Client, items: Iterable[tuple[str, bytes]], retain: bool = True) -> None:
    """QoS1 publishes without a round trip each, then wait for every PUBACK (bounded)."""
    infos = [client.publish(t, p, qos=1, retain=retain) for t, p in items]
    deadline = time.monotonic() + 60
    for info in infos:
        info.wait_for_publish(max(0.1, deadline - time.monotonic()))
        assert info.is_published(), "publish not acknowledged within 60 s"


def signed_assignment(
    key: Ed25519PrivateKey,
    device: str,
    model: str,
    variant: str,
    sha: str,
    version: int,
    policy: str = "test",
) -> bytes:
    a = Assignment(
        device=device,
        model=model,
        variant=variant,
        sha256=sha,
        manifest_version=version,
        issued_at=time.time(),
        policy=policy,
    )
    return sign(a, key).to_json()


def signed_ping(key: Ed25519PrivateKey, device: str, cid: str) -> bytes:
    cmd = Command(id=cid, device=device, action=CommandAction.PING, issued_at=time.time())
    return sign(cmd, key).to_json()


def model_record(store: Path, model: str) -> dict[str, Any] | None:
    """The model's record in the agent's state.json (None: none yet / unreadable)."""
    try:
        rec = json.loads((store / "state.json").read_text())["models"][model]
    except (OSError, ValueError, KeyError):
        return None
    return rec if isinstance(rec, dict) else None


def link_sha(store: Path, model: str) -> str | None:
    """sha256 of the active link's target after checking it is a complete blob (None: no link)."""
    link = store / "models" / model / "active.tflite"
    if not link.is_symlink() or not (link.parent / "current").is_symlink():
        return None  # no link, or fixed links made ahead of a first activation that a kill cut
    target = link.resolve(strict=True)
    digest = hashlib.sha256(target.read_bytes()).hexdigest()
    assert digest == target.stem, f"active link → {target.name} whose bytes hash to {digest[:12]}"
    return digest


class RecordingClient:
    """A stand-in MQTT client for unit tests of the daemon: records what it would publish."""

    def __init__(self) -> None:
        self.published: list[tuple[str, bytes]] = []

    def publish(self, topic: str, payload: bytes, qos: int = 0, retain: bool = False, **_k: Any) -> None:
        self.published.append((topic, payload))

    def set_birth(self, topic: str, payload: bytes) -> None: ...
