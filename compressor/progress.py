"""The compressor's progress on stderr: every line as is in a log, and on a terminal one bar per trial.

The pipeline reports plain lines (stages, search trials, ``<label>: epoch i/n loss ...`` after each
training epoch). Anywhere but a terminal (a log file, CI, a pipe) they are printed one per line, so a
log stays greppable. On a terminal the epoch lines of one training run redraw a single line in place::

    search prune-search-int8: trial keep 0.25
      prune fine-tune [########------------] 4/10  loss 0.4123 val_accuracy 0.9722  ETA 12 s

and the bar stays on screen, complete, when the run ends; any other line first finishes the bar.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable
from typing import TextIO

_EPOCH = re.compile(r"^(?P<label>.+?): epoch (?P<done>\d+)/(?P<total>\d+)\s*(?P<rest>.*)$")


class TerminalProgress:
    """A callable taking one progress line (the pipeline's ``Progress``)."""

    def __init__(self, stream: TextIO, width: int = 20, clock: Callable[[], float] = time.monotonic) -> None:
        self.stream = stream
        self.width = width
        self.clock = clock
        self.enabled = bool(getattr(stream, "isatty", lambda: False)())
        self._bar: tuple[str, float] | None = None  # (label, start time) of the bar on screen

    def __call__(self, line: str) -> None:
        m = _EPOCH.match(line) if self.enabled else None
        if m is None:
            self._finish()
            self.stream.write(line + "\n")
            self.stream.flush()
            return
        label, done, total = m["label"], int(m["done"]), max(int(m["total"]), 1)
        if self._bar is None or self._bar[0] != label:
            self._finish()
            self._bar = (label, self.clock() - 1e-9)
        self.stream.write("\r\x1b[2K" + self.render(label, done, total, m["rest"]))
        self.stream.flush()
        if done >= total:
            self._finish()

    def render(self, label: str, done: int, total: int, rest: str) -> str:
        """One bar: label, filled blocks, i/n, the epoch's figures and the time left at this pace."""
        filled = round(min(done / total, 1.0) * self.width)
        eta = ""
        if self._bar is not None and 0 < done < total:
            per_epoch = (self.clock() - self._bar[1]) / done
            eta = f"  ETA {per_epoch * (total - done):.0f} s"
        return f"  {label} [{'#' * filled}{'-' * (self.width - filled)}] {done}/{total}  {rest}{eta}".rstrip()

    def _finish(self) -> None:
        if self._bar is not None:
            self.stream.write("\n")
            self.stream.flush()
            self._bar = None
