"""The architecture's import rules, proven on the code and on a running interpreter (ARCHITECTURE §2)."""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
HEAVY = ("tensorflow", "keras", "tf_keras")
RUNTIMES = ("ai_edge_litert", "tflite_runtime", "tensorflow")


def imported_modules(path: Path) -> set[str]:
    """Every module an ``import``/``from`` statement in ``path`` names (lazy imports included)."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
    return names


def top(name: str) -> str:
    return name.split(".", 1)[0]


def python_files(package: str) -> list[Path]:
    files = sorted((ROOT / package).rglob("*.py"))
    assert files, f"no sources under {package}/"
    return files


def test_agent_never_imports_the_host_side() -> None:
    for path in python_files("agent"):
        bad = {m for m in imported_modules(path) if top(m) in {"compressor", "deploy", "keras", "tf_keras"}}
        assert not bad, f"{path.relative_to(ROOT)} imports {sorted(bad)}"


def test_tflite_runtime_is_imported_in_exactly_one_agent_module() -> None:
    importers = [
        path.relative_to(ROOT).as_posix()
        for path in python_files("agent")
        if any(top(m) in RUNTIMES for m in imported_modules(path))
    ]
    assert importers == ["agent/runtime.py"]


def test_deploy_never_imports_tensorflow_or_compressor_internals() -> None:
    for path in python_files("deploy"):
        mods = imported_modules(path)
        heavy = {m for m in mods if top(m) in HEAVY}
        internals = {m for m in mods if top(m) == "compressor" and m not in {"compressor", "compressor.cli"}}
        assert not heavy, f"{path.relative_to(ROOT)} imports {sorted(heavy)}"
        assert not internals, f"{path.relative_to(ROOT)} reaches into {sorted(internals)}; use compressor.cli"


def test_compressor_package_init_does_not_import_tensorflow() -> None:
    assert not {m for m in imported_modules(ROOT / "compressor" / "__init__.py") if top(m) in HEAVY}


def loaded_after(code: str) -> set[str]:
    """Top-level module names loaded in a fresh interpreter after running ``code``."""
    probe = code + "\nimport sys\nprint(' '.join(sorted({m.split('.')[0] for m in sys.modules})))"
    out = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, timeout=120, cwd=ROOT, check=True
    )
    return set(out.stdout.split())


def test_importing_every_agent_module_loads_no_tensorflow() -> None:
    code = (
        "import pkgutil, importlib, agent\n"
        "for m in pkgutil.walk_packages(agent.__path__, 'agent.'):\n"
        "    importlib.import_module(m.name)\n"
    )
    loaded = loaded_after(code)
    assert "agent" in loaded
    assert not loaded & {"tensorflow", "keras", "tf_keras", "compressor", "deploy"}


def test_agent_help_loads_no_tensorflow() -> None:
    # -X importtime lists every module the process imported, including ones imported and dropped.
    proc = subprocess.run(
        [sys.executable, "-X", "importtime", "-m", "agent", "--help"],
        check=False,
        capture_output=True,
        text=True,
        timeout=120,
        cwd=ROOT,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "--config" in proc.stdout
    imported = {
        line.rsplit("|", 1)[-1].strip().split(".")[0] for line in proc.stderr.splitlines() if "|" in line
    }
    assert "agent" in imported
    assert not imported & {"tensorflow", "keras", "compressor", "deploy"}


@pytest.mark.parametrize("module", ["deploy.cli", "compressor", "compressor.cli"])
def test_host_cli_modules_do_not_load_tensorflow_at_import(module: str) -> None:
    loaded = loaded_after(f"import {module}")
    assert not loaded & set(HEAVY), f"importing {module} loaded TensorFlow/Keras"


@pytest.mark.slow
def test_runtime_falls_back_to_tensorflow_lite_on_a_host_without_litert() -> None:
    code = (
        "import sys\n"
        "for m in ('ai_edge_litert', 'ai_edge_litert.interpreter', 'tflite_runtime',"
        " 'tflite_runtime.interpreter'):\n"
        "    sys.modules[m] = None  # as if not installed\n"
        "from agent.runtime import load_runtime\n"
        "cls, info = load_runtime()\n"
        "print(info.name, cls.__name__)\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=180,
        cwd=ROOT,
        check=True,
        env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"},
    )
    assert proc.stdout.split() == ["tensorflow", "Interpreter"]
