"""ai-edge-quantizer (optional, ``pip install ai-edge-quantizer==0.10.0``) on an existing float .tflite.

It needs no TensorFlow. On its own it silently changes nothing on many existing models (old op-code
tables, float16 weights behind DEQUANTIZE: see :mod:`compressor.tflite_quant`, which repairs the input,
runs the quantizer and refuses a result that quantized nothing). Its int8 models can still be slower
than the float one; the pipeline checks accuracy and latency against float32 and says so in the notes.
"""

from __future__ import annotations

import importlib.util
from typing import Literal

import numpy as np

AEQ_PIN = "ai-edge-quantizer==0.10.0"


def available() -> bool:
    return importlib.util.find_spec("ai_edge_quantizer") is not None


def aeq_quantize(
    float_tflite: bytes,
    mode: Literal["weight_only_int8", "dynamic_int8", "int8"] | str,
    calibration: list[dict[str, np.ndarray]] | None = None,
) -> bytes:
    """Weight-only int8, dynamic-range int8 (per-channel int8 weights) or static int8 (with calibration
    rows) of a float .tflite. Raises ConversionError when the mode cannot be done or changed nothing."""
    from compressor.tflite_quant import quantize_tflite

    data, _notes = quantize_tflite(float_tflite, mode, calibration)
    return data
