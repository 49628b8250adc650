"""A byte-count progress bar for long host operations (publishing a bundle), drawn on a terminal only.

On a TTY it redraws one line in place, at most every ``interval_s``::

    publishing [##########----------]  52% 52.0/100.0 MiB  160.3 MiB/s  ETA 0.3 s

Anywhere else (a log file, a pipe, systemd's journal) it draws nothing: the caller's own per-step lines
are what a log wants, and a carriage-return animation would only be noise there.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TextIO

_MIB = 1024 * 1024


class ByteProgress:
    """Call :meth:`update` with the bytes done so far; :meth:`clear` before printing any other line."""

    def __init__(
        self,
        label: str,
        total: int,
        stream: TextIO,
        width: int = 20,
        interval_s: float = 0.1,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.label = label
        self.total = max(total, 1)
        self.stream = stream
        self.width = width
        self.interval_s = interval_s
        self.clock = clock
        self.enabled = bool(getattr(stream, "isatty", lambda: False)())
        self.done = 0
        self._start = clock()
        self._last_draw: float | None = None
        self._drawn = False

    def render(self) -> str:
        """The bar's text for the bytes done so far."""
        fraction = min(self.done / self.total, 1.0)
        filled = round(fraction * self.width)
        elapsed = self.clock() - self._start
        rate = self.done / elapsed if elapsed > 0 else 0.0
        eta = f"ETA {(self.total - self.done) / rate:.1f} s" if rate > 0 and self.done < self.total else ""
        return (
            f"{self.label} [{'#' * filled}{'-' * (self.width - filled)}] {fraction:4.0%} "
            f"{self.done / _MIB:.1f}/{self.total / _MIB:.1f} MiB  {rate / _MIB:.1f} MiB/s  {eta}"
        ).rstrip()

    def update(self, done: int) -> None:
        self.done = done
        if not self.enabled:
            return
        now = self.clock()
        if self._last_draw is not None and now - self._last_draw < self.interval_s and done < self.total:
            return
        self._last_draw = now
        self.stream.write("\r\x1b[2K" + self.render())  # carriage return, clear the line
        self.stream.flush()
        self._drawn = True

    def clear(self) -> None:
        """Erase the bar (before another line is printed); the next update draws it again."""
        if self._drawn:
            self.stream.write("\r\x1b[2K")
            self.stream.flush()
            self._drawn = False
            self._last_draw = None
