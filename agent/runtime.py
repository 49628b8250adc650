"""The one module of the agent that imports a TFLite runtime.

Preference order: ``ai_edge_litert`` (device and host), ``tflite_runtime`` (frozen, armv7l), then
``tensorflow.lite`` (host only; never installed on a device). The import is lazy: ``import agent`` and
the daemon process never load a runtime; the benchmark/health child calls :func:`load_interpreter`, the
daemon only asks :func:`detect_runtime` (package metadata, no import) for its status message.
"""

from __future__ import annotations

import importlib
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


def _problem(dist: str, err: BaseException) -> str:
    if isinstance(err, ModuleNotFoundError):
        return f"{dist}: not installed"
    return f"{dist}: {type(err).__name__}: {err}"


def load_interpreter() -> tuple[Any, str, str]:
    """Import the best available runtime: ``(Interpreter class, runtime name, version)``.

    ai-edge-litert, then tflite-runtime, then tensorflow.lite, each a literal import in its own
    try/except (the import-rule test reads them), so a broken wheel — tflite-runtime 2.14 under numpy 2,
    a wheel for the wrong glibc — falls through to the next one. Used by the benchmark child, which skips
    pydantic (``agent.wire``) to start faster. Raises RuntimeMissing naming what to install when none
    imports.
    """
    problems: list[str] = []
    try:
        from ai_edge_litert.interpreter import Interpreter as LiteRtInterpreter
    except Exception as err:  # noqa: BLE001 - a broken runtime wheel raises anything; try the next one
        problems.append(_problem("ai-edge-litert", err))
    else:
        return LiteRtInterpreter, "ai-edge-litert", _version("ai-edge-litert")
    try:
        from tflite_runtime.interpreter import Interpreter as TfliteRuntimeInterpreter
    except Exception as err:  # noqa: BLE001
        problems.append(_problem("tflite-runtime", err))
    else:
        return TfliteRuntimeInterpreter, "tflite-runtime", _version("tflite-runtime")
    try:
        # Host-only last resort (a development machine with TensorFlow and no LiteRT). Looked up by name,
        # not imported statically: nothing in agent/ depends on TensorFlow, and a device never has it.
        tf = importlib.import_module("tensorflow")
        interpreter = tf.lite.Interpreter  # the public API alias, not the tensorflow.lite source package
    except Exception as err:  # noqa: BLE001
        problems.append(_problem("tensorflow", err))
    else:
        return interpreter, "tensorflow", _version("tensorflow")
    raise RuntimeMissing(
        "no TFLite runtime could be imported; install `ai-edge-litert` (x86_64/aarch64) or "
        "`tflite-runtime==2.14.0` with numpy<2 (armv7l). Tried: " + "; ".join(problems)
    )


def load_runtime() -> tuple[Any, RuntimeInfo]:
    """Import the best available runtime; return its ``Interpreter`` class and what it is."""
    from agent.wire import RuntimeInfo

    interpreter, name, version = load_interpreter()
    return interpreter, RuntimeInfo(name=name, version=version)
