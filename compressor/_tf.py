"""The one place TensorFlow and Keras are imported (lazily, on first use), with logging quietened."""

from __future__ import annotations

import contextlib
import io
import os
from collections.abc import Iterator
from typing import Any


def tf() -> Any:
    """Import TensorFlow with C++ logging at warnings-and-above (TF_CPP_MIN_LOG_LEVEL=2 unless set)."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import tensorflow

    return tensorflow


def keras() -> Any:
    tf()
    import keras as keras_module

    return keras_module


@contextlib.contextmanager
def quiet_stdout() -> Iterator[io.StringIO]:
    """Capture what Keras/TF print on Python's stdout (e.g. "Saved artifact at ...").

    ``edgefleet demo --json`` must print only JSON on stdout, and the converter prints there.
    """
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        yield buf
