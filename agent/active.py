"""For applications on the device: follow ``models/<model>/active.tflite`` and reload when it changes.

The agent changes the active model and its metadata together, in one atomic step: both live in a
generation directory named by the ``current`` symlink, which is replaced by rename
(:mod:`agent.generations`). ``active.tflite`` (→ ``current/model.tflite``) and ``active.json``
(→ ``current/active.json``) are fixed links through it, so a reader sees the old or the new model, never
a partial file. This helper compares what the link resolves to; it imports no runtime unless
:meth:`ActiveModel.interpreter` is called::

    model = ActiveModel(Path("/var/lib/edgefleet"), "digits")
    interp = model.interpreter(num_threads=2)
    while True:
        if model.changed():
            interp = model.interpreter(num_threads=2)
        ...  # set_tensor / invoke / get_tensor
        model.count()          # optional: feeds "inferences" in the agent's telemetry

:meth:`ActiveModel.snapshot` gives the model file and its metadata as one pair (both read through one
``readlink`` of ``current``): reading ``active.tflite`` and then ``active.json`` could straddle a swap.

:meth:`ActiveModel.count` adds to ``counters/<model>.count`` under the store (a decimal number, updated
under ``flock``, flushed at most once per ``flush_interval_s``). The agent creates ``counters/`` group-
writable (mode 0770; no setgid bit, which ``RestrictSUIDSGID=`` forbids): run the application with
``edgefleet`` as a supplementary group; the helper gives the counter file that group and mode 0660.
If the file cannot be written the count is dropped silently (an application must never fail because of
telemetry).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import time
from pathlib import Path
from typing import Any

from agent.wire import check_id

COUNTERS_DIR = "counters"


def add_to_counter(path: Path, n: int) -> None:
    """Add ``n`` to the decimal counter in ``path`` under an exclusive ``flock`` (creates it)."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o660)
    try:
        with contextlib.suppress(OSError):  # let the agent (the directory's group) read it
            os.fchown(fd, -1, os.stat(path.parent).st_gid)
            os.fchmod(fd, 0o660)
        fcntl.flock(fd, fcntl.LOCK_EX)
        raw = os.pread(fd, 64, 0)
        try:
            value = int(raw.decode("ascii").strip() or "0")
        except ValueError:
            value = 0
        data = f"{value + n}\n".encode("ascii")
        os.pwrite(fd, data, 0)
        os.ftruncate(fd, len(data))
    finally:
        os.close(fd)  # releases the lock


def read_counters(store_root: Path) -> int:
    """Total inferences every application has counted, over all models (0 when none)."""
    total = 0
    for path in (store_root / COUNTERS_DIR).glob("*.count"):
        with contextlib.suppress(OSError, ValueError):
            total += int(path.read_text(encoding="ascii").strip() or "0")
    return total


class ActiveModel:
    def __init__(self, store_root: Path, model: str, flush_interval_s: float = 1.0) -> None:
        name = check_id(model, "model")
        self.link = store_root / "models" / name / "active.tflite"
        self.counter = store_root / COUNTERS_DIR / f"{name}.count"
        self._seen: str | None = self.target()
        self._pending = 0
        self._flush_interval = flush_interval_s
        self._last_flush = time.monotonic()
        self._counting = True

    def target(self) -> str | None:
        """The blob the link resolves to now (``.../blobs/<sha>.tflite``), or None when nothing is active."""
        path = os.path.realpath(self.link)
        return path if os.path.isfile(path) else None

    def changed(self) -> bool:
        """True once after each change of the active model."""
        now = self.target()
        if now != self._seen:
            self._seen = now
            return True
        return False

    def path(self) -> Path:
        """The current model file, resolved (a later swap does not affect a load in progress)."""
        target = self.target()
        if target is None:
            raise FileNotFoundError(f"no active model at {self.link}")
        return Path(target)

    def snapshot(self) -> tuple[Path, dict[str, Any] | None]:
        """The active model file and its metadata (``active.json`` as a dict, None if it has none), both
        from the same generation. Raises FileNotFoundError when nothing is active."""
        try:
            gen = self.link.parent / os.readlink(self.link.parent / "current")
        except OSError as err:
            raise FileNotFoundError(f"no active model at {self.link}") from err
        model = Path(os.path.realpath(gen / "model.tflite"))
        if not model.is_file():
            raise FileNotFoundError(f"no active model at {self.link}")
        try:
            info = json.loads((gen / "active.json").read_bytes())
        except (OSError, ValueError):
            info = None
        return model, info if isinstance(info, dict) else None

    def interpreter(self, num_threads: int = 1) -> Any:
        """A ready (allocated) TFLite interpreter for the current model."""
        from agent.runtime import load_runtime

        interpreter_cls, _info = load_runtime()
        self._seen = self.target()
        interp = interpreter_cls(model_path=str(self.path()), num_threads=num_threads)
        interp.allocate_tensors()
        return interp

    def count(self, n: int = 1) -> None:
        """Record ``n`` inferences served; written to the shared counter at most every flush interval."""
        self._pending += n
        if time.monotonic() - self._last_flush >= self._flush_interval:
            self.flush()

    def flush(self) -> None:
        """Write pending counts now (call it before the application exits)."""
        self._last_flush = time.monotonic()
        if not self._pending or not self._counting:
            return
        try:
            add_to_counter(self.counter, self._pending)
        except OSError:
            self._counting = False  # no write access to the store: counting is best effort
        self._pending = 0
