"""The whole loop on one machine — real mosquitto, real TensorFlow conversion, real agents, real TFLite.

Runs the same orchestration as ``edgefleet demo`` (deploy.demo.run_demo) with a small budget, then
checks what each stage left behind: the signed manifest and chunks on the broker, each device's store,
its report and the atomically swapped active link.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from agent import wire
from deploy.demo import DEMO_DEVICES, DemoSettings, format_table, run_demo

pytestmark = [pytest.mark.integration, pytest.mark.slow]
ROOT = Path(__file__).resolve().parent.parent


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie still answers kill(0); it is dead for our purpose.
    try:
        return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
    except OSError:
        return False


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> tuple[object, list[str]]:
    lines: list[str] = []
    settings = DemoSettings(
        workdir=tmp_path_factory.mktemp("demo"),
        epochs=2,
        variants=("float32", "dynint8", "int8"),
        bench_min_runs=50,
        bench_min_seconds=0.2,
        probation_s=0.5,
        timeout_s=280,
    )
    return run_demo(settings, lines.append), lines


def test_every_device_runs_a_variant_chosen_by_its_policy(demo: tuple[object, list[str]]) -> None:
    result, _ = demo
    assert len(result.devices) == 2  # type: ignore[attr-defined]
    for row in result.devices:  # type: ignore[attr-defined]
        assert row["state"] == "committed"
        assert row["variant"] in {"float32", "dynint8", "int8"}
        assert 0 < row["p50_ms"] <= row["p99_ms"]
        assert row["runtime"].startswith("ai-edge-litert")
        assert row["accuracy"] > 0.5
    by_class = {row["class"]: row for row in result.devices}  # type: ignore[attr-defined]
    assert by_class["fast"]["threads"] == 2 and by_class["accurate"]["threads"] == 1
    assert "highest accuracy" in by_class["accurate"]["why"]
    assert "lowest latency" in by_class["fast"]["why"]
    table = format_table(result)  # type: ignore[arg-type]
    assert "demo-pi4" in table and "p99 ms" in table
    json.dumps(result.as_json())  # type: ignore[attr-defined]


def test_stores_hold_verified_blobs_and_an_atomic_active_link(demo: tuple[object, list[str]]) -> None:
    result, _ = demo
    manifest = wire.Manifest.model_validate_json((result.bundle / "manifest.json").read_bytes())  # type: ignore[attr-defined]
    for row in result.devices:  # type: ignore[attr-defined]
        store = result.workdir / "devices" / row["device"] / "store"  # type: ignore[attr-defined]
        link = store / "models" / manifest.model / "active.tflite"
        assert link.is_symlink()
        target = link.resolve()
        assert target.parent == (store / "blobs").resolve()
        chosen = manifest.variant(row["variant"])
        assert wire.sha256_hex(target.read_bytes()) == chosen.sha256 == target.name.split(".")[0]
        # every variant was fetched and verified; nothing is left half-fetched
        for v in manifest.variants:
            assert (store / "blobs" / f"{v.sha256}.tflite").is_file()
        assert not any((store / "partial").glob("*/*")) if (store / "partial").exists() else True
        active = json.loads((store / "models" / manifest.model / "active.json").read_text())
        assert active["variant"] == row["variant"]


def test_progress_names_every_stage(demo: tuple[object, list[str]]) -> None:
    _, lines = demo
    for stage in (
        "[1/7] broker",
        "[3/7] compress",
        "[4/7] publish",
        "[5/7] agents",
        "[6/7] select",
        "[7/7] activate",
    ):
        assert any(line.startswith(stage) for line in lines), stage
    assert sum("report stored" in line for line in lines) == len(DEMO_DEVICES)


def test_the_demo_decides_from_the_collectors_store(demo: tuple[object, list[str]]) -> None:
    """The demo runs the operator's loop: a collector stores what the fleet says, select reads that
    store; the store also holds the manifest and the assignments the demo published."""
    from deploy.observe.state import state_from_store

    result, lines = demo
    db = result.workdir / "fleet.db"  # type: ignore[attr-defined]
    model = result.model  # type: ignore[attr-defined]
    state = state_from_store(db, model)
    assert model in state.manifests
    assert set(state.reports_for(model)) == {d.id for d in DEMO_DEVICES}
    for row in result.devices:  # type: ignore[attr-defined]
        assert state.assignments[(row["device"], model)].variant == row["variant"]
    assert any(line.startswith("[6/7]") and "fleet.db" in line for line in lines)


def test_demo_json_and_ctrl_c_leave_no_process_behind(tmp_path: Path) -> None:
    """SIGINT to the demo (only to it, not its process group) must still stop the broker and agents."""
    with subprocess.Popen(
        [sys.executable, "-m", "deploy", "demo", "--json", "--workdir", str(tmp_path), "--epochs", "1"],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,  # our SIGINT goes to the demo process alone
    ) as proc:
        code, out, pids = interrupt_after_agents_start(proc)
    assert code == 130
    assert out == ""  # --json prints nothing but the result, and there is none
    end = time.monotonic() + 15
    while any(alive(p) for p in pids) and time.monotonic() < end:
        time.sleep(0.2)
    assert not [p for p in pids if alive(p)], "processes left behind after Ctrl-C"


def interrupt_after_agents_start(proc: subprocess.Popen[str]) -> tuple[int, str, list[int]]:
    assert proc.stderr is not None and proc.stdout is not None
    pids: list[int] = []
    deadline = time.monotonic() + 240
    agents_seen = 0
    try:
        for line in proc.stderr:
            pids += [int(p) for p in re.findall(r"\bpid (\d+)", line)]
            if re.search(r"class \w+, \d thread\(s\), pid \d+", line):
                agents_seen += 1
            if agents_seen == len(DEMO_DEVICES) or time.monotonic() > deadline:
                break
        assert agents_seen == len(DEMO_DEVICES), "the demo never started its agents"
        assert len(pids) == 1 + len(DEMO_DEVICES)  # broker + agents
        assert all(alive(p) for p in pids)
        proc.send_signal(signal.SIGINT)
        code = proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    return code, proc.stdout.read(), pids
