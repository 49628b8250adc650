"""arm64 smoke test: the device agent and its runtime under qemu-aarch64, compared with x86.

Opt-in: set ``EDGEFLEET_ARM64_SMOKE=1``. The first run downloads a Debian arm64 sysroot and aarch64
wheels (~435 MiB on disk, cached under ``$EDGEFLEET_ARM64_CACHE`` or ``~/.cache/edgefleet/arm64``) and
trains the demo bundle; see docs/arm64.md for measured cold and warm times.
``EDGEFLEET_ARM64_RUNTIMES`` picks the runtimes (default ``litert,tflite-runtime``; ``litert`` alone
halves the time). The first runtime's run also passes ``--install-check``: README.md's install steps with
the arm64 Python (venv, ``pip install`` of the wheel built here with ``[agent]``, ``--check-config``).
"""

from __future__ import annotations

import functools
import json
import os
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
from install_steps import README, device_parts, install_blocks

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
# The install check rides along with one runtime's run (it does not depend on the runtime).
INSTALL_WITH = next((r for r in RUNTIMES if r in DIST), "litert")


@functools.cache
def _run(runtime: str) -> dict:
    extra = ["--install-check"] if runtime == INSTALL_WITH else []
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--suite", "bookworm", "--runtime", runtime, *extra],
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
    if "install_check" not in summary:
        assert summary["ok"] is True
    bench = run.get("agent_bench") or {}
    if "variants" in bench:  # agent.bench present: its child-process benchmark must work under qemu too
        for vid, b in bench["variants"].items():
            assert b.get("ok"), (vid, b)


@pytest.mark.timeout(1800)
def test_bookworm_readme_install_steps_under_qemu() -> None:
    """README.md's device block with the arm64 Python: venv, pip install of the wheel, --check-config."""
    summary = _run(INSTALL_WITH)
    checks = summary.get("install_check")
    assert checks and len(checks) == 1, summary.get("install_check")
    check = checks[0]
    print(json.dumps({k: v for k, v in check.items() if k != "host_steps"}, indent=1))
    assert check["suite"] == "bookworm"
    assert check["ok"], check.get("error")
    version = tomllib.loads((SCRIPT.parent.parent / "pyproject.toml").read_text())["project"]["version"]
    blocks = install_blocks(README.read_text())
    assert [s["line"] for s in check["host_steps"]][-len(blocks["host"]) :] == blocks["host"]
    steps = check["steps"]
    parts = [part for line in blocks["device"] for part in device_parts(line)]
    assert [s["line"] for s in steps] == parts, "every device command is run or skipped, in order"
    skipped = [s["line"] for s in steps if "skipped" in s]
    assert all(any(w in line for w in ("systemctl", "journalctl", "systemd-sysusers")) for line in skipped)
    ran = {s["line"]: s for s in steps if "skipped" not in s}
    assert all(s["exit"] == 0 for s in ran.values()), ran
    emulated = [line for line, s in ran.items() if s["emulated"]]
    assert any(" -m venv " in line for line in emulated), emulated
    assert any("/venv/bin/pip install " in line and "[agent]" in line for line in emulated), emulated
    config = [s for line, s in ran.items() if "--check-config" in line]
    assert len(config) == 1 and config[0]["emulated"], config
    assert ": OK (device pi-kitchen" in config[0]["output"], config[0]
    installed = check["installed"]
    assert installed["machine"] == "aarch64"
    assert installed["python"].startswith("3.11.")
    assert installed["prefix"].endswith("/opt/edgefleet/venv"), installed
    assert installed["agent_module"].startswith(installed["prefix"] + "/"), installed
    assert installed["versions"]["edgefleet"] == version
    assert "ai-edge-litert" in installed["versions"] and "tflite-runtime" not in installed["versions"]
    negative = check["negative"]
    assert negative["exit"] == 1 and negative["ok"], negative
    assert "password_file" in negative["stderr"], negative
    assert summary["ok"] is True
