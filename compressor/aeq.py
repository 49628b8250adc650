"""ai-edge-quantizer (optional, ``pip install ai-edge-quantizer==0.10.0``) on an existing float .tflite.

It needs no TensorFlow. FACTS.md: on some models it silently changes nothing, and its int8 models can be
slower than the float one; the pipeline checks what it produced (int8 weight tensors, same bytes,
accuracy and latency against float32) and says so in the variant's notes.
"""

from __future__ import annotations

import importlib
import importlib.util
from typing import Any, Literal

from compressor._tf import quiet_stdout
from compressor.errors import ConversionError

AEQ_PIN = "ai-edge-quantizer==0.10.0"


def available() -> bool:
    return importlib.util.find_spec("ai_edge_quantizer") is not None


def aeq_quantize(float_tflite: bytes, mode: Literal["weight_only_int8", "dynamic_int8"] | str) -> bytes:
    """Weight-only int8 or dynamic-range int8 (per-channel int8 weights) of a float .tflite."""
    try:
        # import_module: the package has no type information, and mypy's config is not ours to extend
        quantizer: Any = importlib.import_module("ai_edge_quantizer.quantizer")
        recipe: Any = importlib.import_module("ai_edge_quantizer.recipe")
    except ImportError as err:
        raise ConversionError(f"{mode} of a .tflite needs ai-edge-quantizer (pip install {AEQ_PIN})") from err
    if mode == "weight_only_int8":
        rc = recipe.weight_only_wi8_afp32()
    elif mode == "dynamic_int8":
        rc = recipe.dynamic_wi8_afp32()
    else:
        raise ConversionError(f"ai-edge-quantizer: no recipe for mode {mode!r}")
    try:
        with quiet_stdout():
            result = quantizer.Quantizer(float_tflite, rc).quantize(enable_progress_report=False)
    except Exception as err:  # the quantizer raises assorted errors on models it cannot handle
        raise ConversionError(f"ai-edge-quantizer ({mode}) failed: {err}") from err
    if result.quantized_model is None:
        raise ConversionError(f"ai-edge-quantizer ({mode}) returned no model")
    return bytes(result.quantized_model)
