"""The demo's fallback broker: amqtt (pure Python) in a child process, when mosquitto is not installed.

``edgefleet demo`` prefers a private mosquitto (deploy.broker.spawn). Without the binary it runs
``python -m deploy.broker.embedded --port N --config FILE --log FILE``, a child process it stops by
PID exactly like mosquitto, so the demo's own Ctrl-C handling stays the same. amqtt is a host-only
extra (``pip install 'edgefleet[host]'``); devices never need it.

amqtt 0.12.1's limits (FACTS.md) and how the demo lives with them:

* MQTT 3.1.1 only (a v5 CONNECT is refused): every host session and agent config uses ``v311``
  (:attr:`AmqttBroker.protocol`), so there are no v5 session features such as offline queues with an
  expiry; the demo does not need them (agents are connected for the whole run).
* A new client can receive retained messages matching *other* clients' subscriptions: the host
  (``MqttSession.collect_retained`` and ``watch``) and the agent (topic / device checks in
  ``agent.daemon``, unrequested chunks dropped by ``agent.fetch``) ignore topics they did not ask for.
* An unacknowledged QoS1 message is dropped after 5 s: publish windows are kept small
  (:attr:`AmqttBroker.publish_window`) and the demo's payloads are a few KiB to a few hundred KiB.
* No persistence and ≈ 4× slower ingest than mosquitto: fine for a one-machine demo, nothing else.
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
import logging
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal, Protocol

from agent.argparsing import StrictParser
from deploy.broker.spawn import BrokerProcess, MosquittoBroker, find_mosquitto, free_port
from deploy.errors import BrokerError

_LOOPBACK = "127.0.0.1"
_READY = "amqtt listening on"

BrokerChoice = Literal["auto", "mosquitto", "amqtt"]
BROKER_CHOICES: tuple[BrokerChoice, ...] = ("auto", "mosquitto", "amqtt")

AMQTT_LIMITATIONS = (
    "MQTT 3.1.1 only (no v5 session features)",
    "QoS1 messages unacknowledged for 5 s are dropped (small publish windows)",
    "retained messages may reach clients that did not subscribe (they are ignored)",
    "no persistence, ≈4× slower than mosquitto",
)

NEITHER_INSTALLED = (
    "no MQTT broker available: install mosquitto (`sudo apt-get install -y mosquitto` on "
    "Debian/Ubuntu/Raspberry Pi OS, `brew install mosquitto` on macOS) or the embedded fallback "
    "(`pip install 'amqtt==0.12.1'`, part of `pip install 'edgefleet[host]'`)"
)


class DemoBroker(Protocol):
    """What ``edgefleet demo`` needs from a broker it started (MosquittoBroker or AmqttBroker)."""

    host: str
    port: int

    @property
    def pid(self) -> int | None: ...

    @property
    def log_path(self) -> Path: ...

    def stop(self, timeout_s: float = 5.0) -> None: ...


def amqtt_available() -> bool:
    """True if ``import amqtt`` would work (checked without importing it)."""
    import importlib.util

    return importlib.util.find_spec("amqtt") is not None


def amqtt_config(host: str, port: int) -> dict[str, Any]:
    """The amqtt broker config: one TCP listener on loopback, anonymous clients, no $SYS, no packet log."""
    return {
        "listeners": {"default": {"type": "tcp", "bind": f"{host}:{port}", "max_connections": 0}},
        "timeout_disconnect_delay": 0,
        "plugins": {"amqtt.plugins.authentication.AnonymousAuthPlugin": {"allow_anonymous": True}},
    }


class AmqttBroker(BrokerProcess):
    """An amqtt broker in a child process of our own; same interface as :class:`MosquittoBroker`."""

    name = "amqtt"
    protocol: Literal["v311"] = "v311"  # amqtt refuses MQTT v5 CONNECTs
    publish_window = 8  # QoS1 publishes in flight per host session (unacked ones are dropped after 5 s)
    limitations = AMQTT_LIMITATIONS

    def __init__(self, port: int | None = None, state_dir: Path | None = None, python: str | None = None):
        self.host = _LOOPBACK
        self.port = port or free_port()
        self._own_dir = state_dir is None
        self.state_dir = state_dir or Path(tempfile.mkdtemp(prefix="edgefleet-amqtt-"))
        self.python = python or sys.executable
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def config_path(self) -> Path:
        return self.state_dir / "amqtt.json"

    @property
    def log_path(self) -> Path:
        return self.state_dir / "amqtt.log"

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process else None

    def start(self, timeout_s: float = 15.0) -> AmqttBroker:
        if not amqtt_available():
            raise BrokerError(
                "amqtt is not installed: `pip install 'amqtt==0.12.1'` (or `pip install 'edgefleet[host]'`)"
            )
        self.state_dir.mkdir(parents=True, exist_ok=True)
        config = json.dumps(amqtt_config(self.host, self.port), indent=2)
        self.config_path.write_text(config, encoding="utf-8")
        cmd = [
            self.python,
            "-m",
            "deploy.broker.embedded",
            "--port",
            str(self.port),
            "--config",
            str(self.config_path),
            "--log",
            str(self.log_path),
        ]
        # The child imports ``deploy`` from wherever we were imported (a checkout or site-packages).
        root = str(Path(__file__).resolve().parents[2])
        path = os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH", "")) if p)
        # A fresh log (readiness is read from it); the child's stderr (a crash) goes there too.
        with self.log_path.open("wb") as log:
            self.process = subprocess.Popen(
                cmd,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=log,
                env={**os.environ, "PYTHONPATH": path},
                start_new_session=True,  # a Ctrl-C in the terminal reaches the demo only; it stops us by PID
            )
        try:
            return self._wait_ready(self.process, timeout_s)
        except BaseException:  # not ready, failed, or Ctrl-C while waiting: leave nothing running
            self.stop()
            raise

    def _wait_ready(self, proc: subprocess.Popen[bytes], timeout_s: float) -> AmqttBroker:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                tail = self.log_path.read_text(errors="replace")[-2000:] if self.log_path.exists() else ""
                raise BrokerError(f"amqtt exited with code {proc.returncode}: {tail}".strip())
            if self._ready():
                return self
            time.sleep(0.05)
        raise BrokerError(f"amqtt did not open {self.host}:{self.port} within {timeout_s:.0f} s")

    def _ready(self) -> bool:
        # The child logs _READY once amqtt listens (a bare TCP probe would log a bogus client error).
        try:
            with self.log_path.open("rb") as fh:
                return _READY.encode() in fh.read()
        except FileNotFoundError:
            return False


def choose_broker(
    prefer: BrokerChoice = "auto",
    *,
    state_dir: Path | None = None,
    finder: Callable[[], str | None] = find_mosquitto,
    amqtt_finder: Callable[[], bool] = amqtt_available,
) -> MosquittoBroker | AmqttBroker:
    """The broker ``prefer`` asks for, not started: mosquitto when ``finder`` finds it, else amqtt.

    ``auto`` falls back to amqtt only when mosquitto is missing; an explicit choice that is not
    installed is a :class:`BrokerError` saying what to install.
    """
    if prefer not in BROKER_CHOICES:
        raise ValueError(f"unknown broker {prefer!r}; choose one of {', '.join(BROKER_CHOICES)}")
    if prefer in ("auto", "mosquitto"):
        binary = finder()
        if binary is not None:
            return MosquittoBroker(state_dir=state_dir, binary=binary)
        if prefer == "mosquitto":
            raise BrokerError(
                "mosquitto is not installed: install it with `sudo apt-get install -y mosquitto` "
                "(Debian/Ubuntu/Raspberry Pi OS) or `brew install mosquitto`, or use --broker amqtt"
            )
    if amqtt_finder():
        return AmqttBroker(state_dir=state_dir)
    if prefer == "amqtt":
        raise BrokerError(
            "amqtt is not installed: `pip install 'amqtt==0.12.1'` (or `pip install 'edgefleet[host]'`)"
        )
    raise BrokerError(NEITHER_INSTALLED)


def start_broker(
    prefer: BrokerChoice = "auto",
    *,
    state_dir: Path | None = None,
    finder: Callable[[], str | None] = find_mosquitto,
    amqtt_finder: Callable[[], bool] = amqtt_available,
    timeout_s: float = 15.0,
) -> MosquittoBroker | AmqttBroker:
    """:func:`choose_broker`, started. The caller stops it (``stop()``), also on errors."""
    broker = choose_broker(prefer, state_dir=state_dir, finder=finder, amqtt_finder=amqtt_finder)
    return broker.start(timeout_s=timeout_s)


# ------------------------------------------------------------------------------------------- child


async def _serve(config: dict[str, Any]) -> None:
    import importlib

    # amqtt has no type information; imported by name so mypy does not need it (a host-only extra)
    broker_class: Any = importlib.import_module("amqtt.broker").Broker

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    broker = broker_class(config)
    await broker.start()
    bind = config["listeners"]["default"]["bind"]
    logging.getLogger("deploy.broker.embedded").warning("%s %s (pid %d)", _READY, bind, os.getpid())
    await stop.wait()
    await broker.shutdown()


def main(argv: list[str] | None = None) -> int:
    parser = StrictParser(prog="python -m deploy.broker.embedded", description=__doc__)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--config", type=Path, required=True, help="JSON written by AmqttBroker")
    parser.add_argument("--log", type=Path, required=True, help="log file (readiness is announced there)")
    args = parser.parse_args(argv)
    config = json.loads(args.config.read_text(encoding="utf-8"))
    listeners = config.get("listeners", {})
    for name, listener in listeners.items():
        host, _, port = str(listener.get("bind", "")).rpartition(":")
        try:
            loopback = ipaddress.ip_address(host).is_loopback
        except ValueError:
            loopback = False
        if not loopback:
            parser.error(f"listener {name!r} must bind to loopback, not {listener.get('bind')!r}")
        if name == "default" and int(port) != args.port:
            parser.error(f"listener {name!r} binds port {port}, not --port {args.port}")
    logging.basicConfig(
        filename=args.log,
        level=logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    asyncio.run(_serve(config))
    return 0


if __name__ == "__main__":
    sys.exit(main())
