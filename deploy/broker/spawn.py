"""Spawn a private mosquitto on a free loopback port, with its own config, and stop it by PID.

Used by ``edgefleet demo`` and by the integration tests; never touches the system broker on 1883.
"""

from __future__ import annotations

import contextlib
import getpass
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from types import TracebackType
from typing import Self

from deploy.errors import BrokerError

_LOOPBACK = "127.0.0.1"

# Sized for the agent's sliding window of <= 32 chunk subscriptions of 256 KiB (FACTS.md).
_BASE_CONFIG = """\
listener {port} {host}
allow_anonymous {anonymous}
user {user}
persistence {persistence}
persistence_location {state_dir}/
log_dest file {state_dir}/mosquitto.log
log_type error
log_type warning
log_type notice
connection_messages true
set_tcp_nodelay true
max_inflight_messages 64
max_queued_messages 10000
max_packet_size 16777216
message_size_limit 0
"""


def find_mosquitto() -> str | None:
    """Path of the mosquitto binary, looking in PATH and the usual sbin directories."""
    found = shutil.which("mosquitto")
    if found:
        return found
    for candidate in ("/usr/sbin/mosquitto", "/usr/local/sbin/mosquitto", "/opt/homebrew/sbin/mosquitto"):
        if os.access(candidate, os.X_OK):
            return candidate
    return None


def free_port(host: str = _LOOPBACK) -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def terminate(proc: subprocess.Popen[bytes], timeout_s: float = 5.0) -> None:
    """Stop a child we started, by PID: SIGTERM, wait, then SIGKILL."""
    if proc.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        os.kill(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=timeout_s)


class BrokerProcess:
    """What every broker we spawn shares: stop by PID, crash on demand, context manager.

    Subclasses set ``process``, ``state_dir`` and ``_own_dir`` and implement ``start``.
    """

    process: subprocess.Popen[bytes] | None
    state_dir: Path
    _own_dir: bool

    def start(self, timeout_s: float = 10.0) -> Self:
        raise NotImplementedError

    def stop(self, timeout_s: float = 5.0) -> None:
        proc, self.process = self.process, None
        if proc is not None:
            terminate(proc, timeout_s)
            if proc.stderr is not None:
                proc.stderr.close()
        if self._own_dir:
            shutil.rmtree(self.state_dir, ignore_errors=True)

    def kill(self) -> None:
        """SIGKILL, as a crash would (for fault-injection tests); the state dir is kept."""
        if self.process is not None and self.process.poll() is None:
            os.kill(self.process.pid, signal.SIGKILL)
            self.process.wait(timeout=5)

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()


class MosquittoBroker(BrokerProcess):
    """A mosquitto process of our own. Use as a context manager or call start()/stop().

    ``extra_config`` is appended to the generated config (ACLs, password files, TLS listeners...).
    ``anonymous=False`` writes ``allow_anonymous false`` (give a ``password_file`` in ``extra_config``).
    ``config`` replaces the generated config entirely (e.g. the output of ``edgefleet broker-config``);
    it must contain a listener on ``self.port`` (pass ``port=``) bound to loopback, and should not log
    to stderr (it is only read when the broker fails to start).
    """

    def __init__(
        self,
        port: int | None = None,
        state_dir: Path | None = None,
        extra_config: str = "",
        persistence: bool = False,
        binary: str | None = None,
        *,
        anonymous: bool = True,
        config: str | None = None,
    ) -> None:
        self.host = _LOOPBACK
        self.port = port or free_port()
        self._own_dir = state_dir is None
        self.state_dir = state_dir or Path(tempfile.mkdtemp(prefix="edgefleet-broker-"))
        self.extra_config = extra_config
        self.persistence = persistence
        self.anonymous = anonymous
        self.config = config
        self.binary = binary or find_mosquitto()
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def config_path(self) -> Path:
        return self.state_dir / "mosquitto.conf"

    @property
    def log_path(self) -> Path:
        return self.state_dir / "mosquitto.log"

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process else None

    def start(self, timeout_s: float = 10.0) -> MosquittoBroker:
        if self.binary is None:
            raise BrokerError(
                "mosquitto is not installed: install it with `sudo apt-get install -y mosquitto` "
                "(Debian/Ubuntu/Raspberry Pi OS) or `brew install mosquitto`"
            )
        self.state_dir.mkdir(parents=True, exist_ok=True)
        if self.config is not None:
            text = self.config
        else:
            text = (
                _BASE_CONFIG.format(
                    port=self.port,
                    host=self.host,
                    state_dir=self.state_dir,
                    persistence="true" if self.persistence else "false",
                    anonymous="true" if self.anonymous else "false",
                    # Started as root, mosquitto drops to user "mosquitto", which cannot read our files.
                    user=getpass.getuser(),
                )
                + self.extra_config
            )
        self.config_path.write_text(text, encoding="utf-8")
        self.process = subprocess.Popen(
            [self.binary, "-c", str(self.config_path)],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            start_new_session=True,  # a Ctrl-C in the terminal reaches us, and we stop it by PID
        )
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                err = ""
                if self.process.stderr is not None:
                    err = self.process.stderr.read().decode(errors="replace")
                    self.process.stderr.close()
                log = self.log_path.read_text(errors="replace") if self.log_path.exists() else ""
                raise BrokerError(
                    f"mosquitto exited with code {self.process.returncode}: {err or log}".strip()
                )
            if _port_open(self.host, self.port):
                return self
            time.sleep(0.02)
        self.stop()
        raise BrokerError(f"mosquitto did not open {self.host}:{self.port} within {timeout_s:.0f} s")


def _port_open(host: str, port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.settimeout(0.2)
        return sock.connect_ex((host, port)) == 0
