"""For applications on the device: follow ``models/<model>/active.tflite`` and reload when it changes.

The agent swaps the link atomically (rename), so a reader sees the old or the new model, never a partial
file. This helper only compares link targets; it imports no runtime unless :meth:`ActiveModel.interpreter`
is called::

    model = ActiveModel(Path("/var/lib/edgefleet"), "digits")
    interp = model.interpreter(num_threads=2)
    while True:
        if model.changed():
            interp = model.interpreter(num_threads=2)
        ...
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from agent.wire import check_id


class ActiveModel:
    def __init__(self, store_root: Path, model: str) -> None:
        self.link = store_root / "models" / check_id(model, "model") / "active.tflite"
        self._seen: str | None = self.target()

    def target(self) -> str | None:
        """The link's current target (``../../blobs/<sha>.tflite``), or None when nothing is active."""
        try:
            return os.readlink(self.link)
        except OSError:
            return None

    def changed(self) -> bool:
        """True once after each swap of the active link."""
        now = self.target()
        if now != self._seen:
            self._seen = now
            return True
        return False

    def path(self) -> Path:
        """The current model file, resolved (a later swap does not affect a load in progress)."""
        if self.target() is None:
            raise FileNotFoundError(f"no active model at {self.link}")
        return self.link.resolve(strict=True)

    def interpreter(self, num_threads: int = 1) -> Any:
        """A ready (allocated) TFLite interpreter for the current model."""
        from agent.runtime import load_runtime

        interpreter_cls, _info = load_runtime()
        self._seen = self.target()
        interp = interpreter_cls(model_path=str(self.path()), num_threads=num_threads)
        interp.allocate_tensors()
        return interp
