"""The one module of the agent that imports a TFLite runtime.

Preference order: ``ai_edge_litert`` (device and host), ``tflite_runtime`` (frozen, armv7l), then
``tensorflow.lite`` (host only; never installed on a device). The import is lazy: ``import agent`` and the
daemon process never load a runtime; the benchmark/health child calls :func:`load_runtime`, the daemon only
asks :func:`detect_runtime` (package metadata, no import) for its status message.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
from typing import TYPE_CHECKING, Any

from agent.errors import RuntimeMissing

if TYPE_CHECKING:
    from agent.wire import RuntimeInfo

# (module holding Interpreter, distribution name, RuntimeInfo.name)
_CANDIDATES: tuple[tuple[str, str, str], ...] = (
    ("ai_edge_litert.interpreter", "ai-edge-litert", "ai-edge-litert"),
    ("tflite_runtime.interpreter", "tflite-runtime", "tflite-runtime"),
    ("tensorflow.lite", "tensorflow", "tensorflow"),
)
_TF_DISTS = ("tensorflow", "tensorflow-cpu", "tensorflow-aarch64")


def _version(dist: str) -> str:
    names = _TF_DISTS if dist == "tensorflow" else (dist,)
    for name in names:
        try:
            return importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    return "unknown"


def _present(module: str) -> bool:
    top = module.split(".", 1)[0]
    try:
        return importlib.util.find_spec(top) is not None
    except (ImportError, ValueError):
        return False


def detect_runtime() -> RuntimeInfo | None:
    """Which runtime :func:`load_runtime` would pick, from package metadata only (imports nothing)."""
    from agent.wire import RuntimeInfo

    for module, dist, name in _CANDIDATES:
        if _present(module):
            return RuntimeInfo(name=name, version=_version(dist))
    return None


def _import_interpreter(module: str) -> Any:
    """Import one candidate with a plain import statement (the import-rule test reads them)."""
    if module == "ai_edge_litert.interpreter":
        from ai_edge_litert.interpreter import Interpreter

        return Interpreter
    if module == "tflite_runtime.interpreter":
        from tflite_runtime.interpreter import Interpreter as TfliteRuntimeInterpreter

        return TfliteRuntimeInterpreter
    import tensorflow as tf  # host only: never installed on a device

    return tf.lite.Interpreter


def load_interpreter() -> tuple[Any, str, str]:
    """Import the best available runtime: ``(Interpreter class, runtime name, version)``.

    Used by the benchmark child, which skips pydantic (``agent.wire``) to start faster.
    Raises RuntimeMissing naming what to install when none imports.
    """
    problems: list[str] = []
    for module, dist, name in _CANDIDATES:
        if not _present(module):
            problems.append(f"{dist}: not installed")
            continue
        try:
            interpreter = _import_interpreter(module)
        except Exception as err:  # noqa: BLE001 - a broken runtime wheel raises anything; try the next one
            problems.append(f"{dist}: {type(err).__name__}: {err}")
            continue
        return interpreter, name, _version(dist)
    raise RuntimeMissing(
        "no TFLite runtime could be imported; install `ai-edge-litert` (x86_64/aarch64) or "
        "`tflite-runtime==2.14.0` with numpy<2 (armv7l). Tried: " + "; ".join(problems)
    )


def load_runtime() -> tuple[Any, RuntimeInfo]:
    """Import the best available runtime; return its ``Interpreter`` class and what it is."""
    from agent.wire import RuntimeInfo

    interpreter, name, version = load_interpreter()
    return interpreter, RuntimeInfo(name=name, version=version)
