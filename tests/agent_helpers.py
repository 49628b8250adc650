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

import flatbuffers  # type: ignore[import-untyped]
import numpy as np
import paho.mqtt.client as paho
import psutil
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


def bench_children(pid: int) -> list[psutil.Process]:
    """The agent's benchmark and health-check children (agent.bench_child runs both), recursively."""
    out = []
    for child in psutil.Process(pid).children(recursive=True):
        try:
            if "agent.bench_child" in " ".join(child.cmdline()):
                out.append(child)
        except psutil.Error:
            continue
    return out


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


def build_fc_model(weights: np.ndarray, bias: np.ndarray, *, custom_op: str | None = None) -> bytes:
    """A one-op TFLite model ``y = x·Wᵀ + b`` (FULLY_CONNECTED), or that op renamed to a CUSTOM op."""
    w = np.ascontiguousarray(weights, dtype=np.float32)
    bv = np.ascontiguousarray(bias, dtype=np.float32)
    n_out, n_in = w.shape
    b = flatbuffers.Builder(4096)

    def ints(values: list[int]) -> int:
        b.StartVector(4, len(values), 4)
        for v in reversed(values):
            b.PrependInt32(v)
        return int(b.EndVector())

    def offsets(values: list[int]) -> int:
        b.StartVector(4, len(values), 4)
        for v in reversed(values):
            b.PrependUOffsetTRelative(v)
        return int(b.EndVector())

    def buffer(data: bytes | None) -> int:
        vec = None
        if data:
            b.StartVector(1, len(data), 16)
            b.head = b.head - len(data)
            b.Bytes[b.head : b.head + len(data)] = data
            vec = b.EndVector()
        b.StartObject(1)  # Buffer { data }
        if vec is not None:
            b.PrependUOffsetTRelativeSlot(0, vec, 0)
        return int(b.EndObject())

    buffers = [buffer(None), buffer(w.tobytes()), buffer(bv.tobytes()), buffer(None), buffer(None)]

    def tensor(shape: list[int], buf: int, name: str) -> int:
        nm, sh = b.CreateString(name), ints(shape)
        b.StartObject(4)  # Tensor { shape, type, buffer, name }
        b.PrependUOffsetTRelativeSlot(0, sh, 0)
        b.PrependInt8Slot(1, 0, 0)  # FLOAT32
        b.PrependUint32Slot(2, buf, 0)
        b.PrependUOffsetTRelativeSlot(3, nm, 0)
        return int(b.EndObject())

    tensors = [
        tensor([1, n_in], 3, "x"),
        tensor([n_out, n_in], 1, "w"),
        tensor([n_out], 2, "b"),
        tensor([1, n_out], 4, "y"),
    ]
    code = 32 if custom_op else 9  # CUSTOM / FULLY_CONNECTED
    custom = b.CreateString(custom_op) if custom_op else None
    b.StartObject(4)  # OperatorCode { deprecated_builtin_code, custom_code, version, builtin_code }
    b.PrependInt8Slot(0, code, 0)
    if custom is not None:
        b.PrependUOffsetTRelativeSlot(1, custom, 0)
    b.PrependInt32Slot(2, 1, 1)
    b.PrependInt32Slot(3, code, 0)
    opcode = b.EndObject()
    op_in, op_out = ints([0, 1, 2]), ints([3])
    b.StartObject(3)  # Operator { opcode_index, inputs, outputs }
    b.PrependUint32Slot(0, 0, 0)
    b.PrependUOffsetTRelativeSlot(1, op_in, 0)
    b.PrependUOffsetTRelativeSlot(2, op_out, 0)
    op = b.EndObject()
    tv, si, so, ov = offsets(tensors), ints([0]), ints([3]), offsets([op])
    b.StartObject(4)  # SubGraph { tensors, inputs, outputs, operators }
    for slot, value in enumerate((tv, si, so, ov)):
        b.PrependUOffsetTRelativeSlot(slot, value, 0)
    subgraph = b.EndObject()
    codes, subgraphs, bufs = offsets([opcode]), offsets([subgraph]), offsets(buffers)
    b.StartObject(5)  # Model { version, operator_codes, subgraphs, description, buffers }
    b.PrependUint32Slot(0, 3, 0)
    b.PrependUOffsetTRelativeSlot(1, codes, 0)
    b.PrependUOffsetTRelativeSlot(2, subgraphs, 0)
    b.PrependUOffsetTRelativeSlot(4, bufs, 0)
    b.Finish(b.EndObject(), file_identifier=b"TFL3")
    return bytes(b.Output())
