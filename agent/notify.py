"""systemd notification protocol (``sd_notify``) over the ``NOTIFY_SOCKET`` datagram socket, no extra package.

Outside systemd (no ``NOTIFY_SOCKET``) every call is a no-op.
"""

from __future__ import annotations

import logging
import os
import socket
import time

log = logging.getLogger(__name__)


class Notifier:
    def __init__(self, address: str | None = None, min_interval_s: float = 1.0) -> None:
        self.address = address if address is not None else os.environ.get("NOTIFY_SOCKET")
        if self.address and self.address.startswith("@"):
            self.address = "\0" + self.address[1:]  # abstract namespace
        self._min_interval = min_interval_s
        self._last_watchdog = 0.0
        usec = os.environ.get("WATCHDOG_USEC")
        self.watchdog_s = int(usec) / 1e6 if usec and usec.isdigit() else None

    @property
    def enabled(self) -> bool:
        return bool(self.address)

    def send(self, state: str) -> bool:
        if not self.address:
            return False
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
                sock.connect(self.address)
                sock.sendall(state.encode())
        except OSError as err:
            log.debug("sd_notify(%s) failed: %s", state, err)
            return False
        return True

    def ready(self, status: str = "") -> None:
        self.send("READY=1" + (f"\nSTATUS={status}" if status else ""))

    def stopping(self) -> None:
        self.send("STOPPING=1")

    def watchdog(self) -> None:
        """Send WATCHDOG=1, at most once per ``min_interval_s`` (call it from every loop iteration)."""
        t = time.monotonic()
        if t - self._last_watchdog >= self._min_interval:
            self._last_watchdog = t
            self.send("WATCHDOG=1")
