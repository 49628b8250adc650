"""arm64 smoke test: the device agent and its runtime under qemu-aarch64, compared with x86.

Opt-in: set ``EDGEFLEET_ARM64_SMOKE=1``. The first run downloads a Debian arm64 sysroot and aarch64
wheels (~380 MiB on disk, cached under ``$EDGEFLEET_ARM64_CACHE`` or ``~/.cache/edgefleet/arm64``) and
trains the demo bundle; see docs/arm64.md for measured cold and warm times.
``EDGEFLEET_ARM64_RUNTIMES`` picks the runtimes (default ``litert,tflite-runtime``; ``litert`` alone
halves the time).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
SCRIPT = REPO / "scripts" / "arm64-smoke"

pytestmark = [
    pytest.mark.slow,
    pytest.mark.arm64,
    pytest.mark.skipif(
        os.environ.get("EDGEFLEET_ARM64_SMOKE") != "1",
        reason="arm64 smoke test under qemu-user is opt-in: set EDGEFLEET_ARM64_SMOKE=1 "
        "(first run downloads the arm64 sysroot and wheels, ~2 min; see docs/arm64.md)",
    ),
]

RUNTIMES = [r.strip() for r in os.environ.get("EDGEFLEET_ARM64_RUNTIMES", "litert,tflite-runtime").split(",")]
DIST = {"litert": "ai-edge-litert", "tflite-runtime": "tflite-runtime"}


def _run(runtime: str) -> dict:
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--suite", "bookworm", "--runtime", runtime],
        capture_output=True,
        text=True,
        timeout=1800,
        check=False,
        cwd=str(REPO),
    )
    try:
        summary = json.loads(proc.stdout)
    except ValueError:
        pytest.fail(f"no JSON from arm64-smoke (exit {proc.returncode}); stderr:\n{proc.stderr[-3000:]}")
    if proc.returncode == 2:
        pytest.fail(f"arm64-smoke setup problem: {summary.get('error')}\n{proc.stderr[-2000:]}")
    assert proc.returncode == (0 if summary["ok"] else 1), proc.stderr[-2000:]
    return summary


@pytest.mark.timeout(1800)
@pytest.mark.parametrize("runtime", [r for r in RUNTIMES if r in DIST])
def test_bookworm_arm64_matches_host(runtime: str) -> None:
    summary = _run(runtime)
    assert summary["schema"] == "edgefleet.arm64-smoke/1"
    assert summary["host"]["machine"] == "x86_64"
    runs = [r for r in summary["runs"] if r.get("ok") is not None]
    assert len(runs) == 1, summary["runs"]
    run = runs[0]
    assert run["suite"] == "bookworm"
    assert run["runtime"] == DIST[runtime]
    assert run["machine"] == "aarch64"
    assert run["python"].startswith("3.11.")
    assert run["wire_import"] is True
    if runtime == "tflite-runtime":
        assert run["runtime_version"] == "2.14.0"
        assert run["numpy"].startswith("1.")
    variants = run["variants"]
    assert {"float32", "int8"} <= set(variants), variants
    for vid, v in variants.items():
        assert v["labels_equal"], (vid, v)
        assert v["n"] > 0
        if "float" in v["output_dtype"]:
            assert v["max_abs_diff"] <= 1e-5, (vid, v)
        else:
            assert v["max_abs_diff"] <= 1, (vid, v)
        assert v["accuracy_arm64"] == v["accuracy_host"]
        assert v["ok"], (vid, v)
    assert run["ok"], run
    assert summary["ok"] is True
    bench = run.get("agent_bench") or {}
    if "variants" in bench:  # agent.bench present: its child-process benchmark must work under qemu too
        for vid, b in bench["variants"].items():
            assert b.get("ok"), (vid, b)
