"""The one place TensorFlow and Keras are imported (lazily, on first use), with logging quietened.

TensorFlow's C++ side writes straight to file descriptors 1 and 2: absl log lines (the oneDNN notice,
``E0000 ... NodeDef mentions attribute``), the converter's and the interpreter's chatter. Users read
them as errors, and ``contextlib.redirect_*`` cannot catch them. :func:`quiet_tensorflow` moves both
descriptors to a log file (or discards them) while Python's own ``sys.stdout`` / ``sys.stderr`` keep
writing to the terminal, so progress, the summary and the CLI's one-line errors still show.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import sys
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any, TextIO

# Python loggers TensorFlow and its dependencies write to.
_TF_LOGGERS = ("tensorflow", "absl", "keras", "h5py")

# The logs of the quiet_tensorflow blocks running with one, innermost last: quiet_stdout keeps what it
# captured in the innermost (else it is dropped).
_logs: list[TextIO] = []


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

    ``edgefleet demo --json`` must print only JSON on stdout, and the converter prints there. Inside
    :func:`quiet_tensorflow` with a log file, the captured text is kept there.
    """
    buf = io.StringIO()
    try:
        with contextlib.redirect_stdout(buf):
            yield buf
    finally:
        if _logs and buf.getvalue():
            _logs[-1].write(buf.getvalue())
            _logs[-1].flush()


@contextlib.contextmanager
def quiet_tensorflow(log: Path | None = None) -> Iterator[None]:
    """Keep TensorFlow's output off the terminal for the block; with ``log``, append it to that file.

    Covers the C++ output on fds 1 and 2 (also of child processes), Python warnings and the
    tensorflow/absl/keras loggers. Exceptions are untouched: they reach the caller as always.
    Without a log, C++ logging is also cut at the source (TF_CPP_MIN_LOG_LEVEL=3 unless set).
    """
    if log is None:
        os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    with contextlib.ExitStack() as stack:
        sink = stack.enter_context(open(log or os.devnull, "a", encoding="utf-8", errors="replace"))
        stack.enter_context(_python_logs_to(sink))
        stack.enter_context(_fds_to(sink))
        if log is not None:
            _logs.append(sink)
            stack.callback(_logs.remove, sink)
        yield


@contextlib.contextmanager
def _python_logs_to(sink: TextIO) -> Iterator[None]:
    """Warnings and TensorFlow's Python loggers go to ``sink`` instead of sys.stderr."""
    handler = logging.StreamHandler(sink)
    handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    saved = []
    for name in _TF_LOGGERS:
        logger = logging.getLogger(name)
        saved.append((logger, logger.handlers[:], logger.propagate))
        logger.handlers = [handler]
        logger.propagate = False

    def show(message: Any, category: Any, filename: str, lineno: int, *_: Any, **__: Any) -> None:
        sink.write(warnings.formatwarning(message, category, filename, lineno))

    try:
        with warnings.catch_warnings():
            warnings.showwarning = show
            yield
    finally:
        for logger, handlers, propagate in saved:
            logger.handlers = handlers
            logger.propagate = propagate


@contextlib.contextmanager
def _fds_to(sink: TextIO) -> Iterator[None]:
    """Point fds 1 and 2 at ``sink``; sys.stdout / sys.stderr, if they wrote there, keep the terminal."""
    streams = (sys.stdout, sys.stderr)
    for s in streams:
        _flush(s)
    sink.flush()
    saved = {fd: os.dup(fd) for fd in (1, 2)}
    replacements = [_terminal(s, fd, saved[fd]) for s, fd in zip(streams, (1, 2), strict=True)]
    try:
        for fd in saved:
            os.dup2(sink.fileno(), fd)
        if replacements[0] is not None:
            sys.stdout = replacements[0]
        if replacements[1] is not None:
            sys.stderr = replacements[1]
        yield
    finally:
        for r in replacements:
            if r is not None:
                _flush(r)
        sys.stdout, sys.stderr = streams
        for fd, copy in saved.items():
            os.dup2(copy, fd)
            os.close(copy)
        for r in replacements:
            if r is not None:
                r.close()


def _terminal(stream: TextIO, fd: int, saved: int) -> TextIO | None:
    """A stream like ``stream`` on a copy of the original ``fd``, if ``stream`` writes to ``fd``.

    Other streams (a pytest capture, a StringIO) are left as they are: they never wrote to the fd.
    """
    try:
        if stream.fileno() != fd:
            return None
    except (AttributeError, OSError, ValueError):  # io.UnsupportedOperation: not backed by a file
        return None
    return open(os.dup(saved), "w", encoding=stream.encoding, errors=stream.errors, buffering=1)


def _flush(stream: TextIO) -> None:
    with contextlib.suppress(AttributeError, OSError, ValueError):
        stream.flush()
