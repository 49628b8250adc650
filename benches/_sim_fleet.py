"""Thousands of simulated devices as real MQTT clients, multiplexed over a few processes.

Each worker process drives its share of :class:`_sim_device.SimDevice` s, one paho client each (its own
client id, user name and password, Last Will), from ONE selector loop: paho's external-loop hooks
(``on_socket_open`` / ``on_socket_close`` register the socket, ``on_socket_register_write`` /
``on_socket_unregister_write`` ask for writability), then ``loop_read`` / ``loop_write`` when the
selector says so and ``loop_misc`` once a second for keep-alives. No thread per client.

:class:`SimFleet` starts the workers, waits until every client has its CONNACK, gathers the counters
each worker sends once a second, and stops them (each device publishes its offline status and
disconnects cleanly, as the agent does on SIGTERM). It knows nothing of the host side: whatever drives
the fleet (benches/fleet_sim.py, or later a controller in another process) talks to it through the
broker only.
"""

from __future__ import annotations

import contextlib
import heapq
import itertools
import multiprocessing as mp
import os
import queue
import selectors
import socket
import ssl
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import paho.mqtt.client as paho
from _sim_device import Counters, SimDevice, SimSettings
from paho.mqtt.enums import CallbackAPIVersion

from agent import wire

CONNECT_WINDOW = 64  # CONNECTs awaiting their CONNACK, per worker (a burst of 2,000 is refused by backlog)
STATS_EVERY_S = 1.0


@dataclass(frozen=True, slots=True)
class WorkerSpec:
    index: int
    host: str
    port: int
    devices: tuple[str, ...]
    passwords: Mapping[str, str]
    settings: SimSettings
    public_keys: tuple[str, ...]
    keepalive_s: int = 60
    ca_file: str | None = None  # TLS: verify the broker against this CA (its certificate names the host)


@dataclass
class _Conn:
    device: SimDevice
    client: paho.Client
    connected: bool = False
    ever_connected: bool = False
    reports: set[int] | None = None  # mids of report publishes awaiting their PUBACK


class _Worker:
    def __init__(self, spec: WorkerSpec, stop: Any, out: Any) -> None:
        self.spec = spec
        self.stop = stop
        self.out = out
        self.sel = selectors.DefaultSelector()
        self.timers: list[tuple[float, int, Callable[[], None]]] = []
        self.seq = itertools.count()
        self.counters = Counters()
        self.pub = {"published": 0, "acked": 0, "reports_acked": 0, "publish_errors": 0}
        self.net = {"connected": 0, "connacks": 0, "refused": 0, "disconnects": 0, "reconnects": 0}
        keys = [wire.public_key_from_text(k) for k in spec.public_keys]
        self.trusted = {wire.key_id_for(k): k for k in keys}
        self.conns: dict[str, _Conn] = {}
        self.waiting: list[str] = list(spec.devices)  # not yet connected, in order
        self.pending = 0  # CONNECTs sent, CONNACK not yet received
        # one TLS context for the worker's clients (loading the CA once, not per device); paho's
        # connect() does the handshake blocking, so a worker handshakes one device at a time
        self.tls: ssl.SSLContext | None = None
        if spec.ca_file is not None:
            self.tls = ssl.create_default_context(cafile=spec.ca_file)

    # ------------------------------------------------------------------ clients

    def _later(self, delay: float, fn: Callable[[], None]) -> None:
        heapq.heappush(self.timers, (time.monotonic() + max(0.0, delay), next(self.seq), fn))

    def _make(self, dev: str) -> _Conn:
        s = self.spec
        client = paho.Client(
            CallbackAPIVersion.VERSION2, client_id=f"edgefleet-sim-{dev}", protocol=paho.MQTTv5, userdata=dev
        )
        client.username_pw_set(dev, s.passwords[dev])
        client.max_inflight_messages_set(64)
        if self.tls is not None:
            client.tls_set_context(self.tls)

        def send(topic: str, payload: bytes, retain: bool) -> None:
            info = client.publish(topic, payload, qos=1, retain=retain)
            self.pub["published"] += 1
            if info.rc != paho.MQTT_ERR_SUCCESS and info.rc != paho.MQTT_ERR_NO_CONN:
                self.pub["publish_errors"] += 1  # NO_CONN: queued, sent after the reconnect
            elif "/reports/" in topic and conn.reports is not None:
                conn.reports.add(info.mid)

        device = SimDevice(dev, s.settings, self.trusted, send, self._later, self.counters)
        conn = _Conn(device, client, reports=set())
        client.will_set(device.topics.status(dev), device.status(online=False).to_json(), qos=1, retain=True)
        client.on_connect = self._on_connect
        client.on_disconnect = self._on_disconnect
        client.on_message = self._on_message
        client.on_publish = self._on_publish
        client.on_socket_open = self._on_socket_open
        client.on_socket_close = self._on_socket_close
        client.on_socket_register_write = self._on_register_write
        client.on_socket_unregister_write = self._on_unregister_write
        return conn

    def _on_socket_open(self, client: paho.Client, _u: Any, sock: Any) -> None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # QoS1 windows stall on Nagle
        self.sel.register(sock, selectors.EVENT_READ, client)

    def _on_socket_close(self, _c: paho.Client, _u: Any, sock: Any) -> None:
        with contextlib.suppress(KeyError, ValueError):
            self.sel.unregister(sock)

    def _on_register_write(self, client: paho.Client, _u: Any, sock: Any) -> None:
        with contextlib.suppress(KeyError, ValueError):
            self.sel.modify(sock, selectors.EVENT_READ | selectors.EVENT_WRITE, client)

    def _on_unregister_write(self, client: paho.Client, _u: Any, sock: Any) -> None:
        with contextlib.suppress(KeyError, ValueError):
            self.sel.modify(sock, selectors.EVENT_READ, client)

    def _on_connect(self, client: paho.Client, dev: str, _f: Any, rc: Any, _p: Any = None) -> None:
        conn = self.conns[dev]
        if not conn.ever_connected:
            self.pending -= 1
        if rc.is_failure:
            self.net["refused"] += 1  # bad credentials: fatal for this device, as for the agent
            return
        self.net["connacks"] += 1
        conn.connected = True
        conn.ever_connected = True
        client.subscribe([(t, 1) for t in conn.device.subscriptions()])
        conn.device.publish_status()  # birth

    def _on_disconnect(self, _c: paho.Client, dev: str, _f: Any, rc: Any, _p: Any = None) -> None:
        conn = self.conns[dev]
        if conn.connected:
            conn.connected = False
            self.net["disconnects"] += 1
        if not self.stop.is_set() and conn.ever_connected:
            self._later(1.0, lambda: self._reconnect(conn))

    def _reconnect(self, conn: _Conn) -> None:
        if self.stop.is_set() or conn.connected:
            return
        self.net["reconnects"] += 1
        try:
            conn.client.reconnect()
        except OSError:
            self._later(2.0, lambda: self._reconnect(conn))

    def _on_message(self, _c: paho.Client, dev: str, msg: paho.MQTTMessage) -> None:
        self.conns[dev].device.handle(msg.topic, bytes(msg.payload))

    def _on_publish(self, _c: paho.Client, dev: str, mid: int, _rc: Any, _p: Any) -> None:
        self.pub["acked"] += 1
        reports = self.conns[dev].reports
        if reports is not None and mid in reports:
            reports.discard(mid)
            self.pub["reports_acked"] += 1

    def _connect_more(self) -> None:
        while self.waiting and self.pending < CONNECT_WINDOW:
            dev = self.waiting.pop(0)
            conn = self.conns[dev] = self._make(dev)
            self.pending += 1
            try:
                conn.client.connect(self.spec.host, self.spec.port, keepalive=self.spec.keepalive_s)
            except OSError:
                self.pending -= 1
                self.waiting.append(dev)  # the listen backlog was full: try again shortly
                del self.conns[dev]
                return

    # ------------------------------------------------------------------ loop

    def stats(self, final: bool = False) -> dict[str, Any]:
        self.net["connected"] = sum(1 for c in self.conns.values() if c.connected)
        return {
            "worker": self.spec.index,
            "pid": os.getpid(),
            "devices": len(self.spec.devices),
            "final": final,
            **self.net,
            **self.pub,
            **self.counters.as_dict(),
        }

    def _io(self, timeout: float) -> None:
        for key, mask in self.sel.select(timeout):
            client: paho.Client = key.data
            if mask & selectors.EVENT_READ:
                client.loop_read()
                # TLS: a record already decrypted into the SSL buffer wakes no select(); read it now
                sock = client.socket()
                for _ in range(1000):
                    if not isinstance(sock, ssl.SSLSocket) or sock.fileno() < 0 or not sock.pending():
                        break
                    client.loop_read()
            if mask & selectors.EVENT_WRITE:
                client.loop_write()

    def _run_timers(self) -> None:
        now = time.monotonic()
        while self.timers and self.timers[0][0] <= now:
            _, _, fn = heapq.heappop(self.timers)
            fn()

    def run(self) -> None:
        next_misc = time.monotonic() + STATS_EVERY_S
        while not self.stop.is_set():
            self._connect_more()
            self._run_timers()
            wait = 0.05 if not self.timers else min(0.05, max(0.0, self.timers[0][0] - time.monotonic()))
            self._io(wait)
            if time.monotonic() >= next_misc:
                next_misc = time.monotonic() + STATS_EVERY_S
                for conn in list(self.conns.values()):
                    conn.client.loop_misc()  # keep-alive pings, timeouts
                self.out.put(self.stats())
        self._shutdown()

    def _shutdown(self, timeout_s: float = 10.0) -> None:
        """Offline status and a clean DISCONNECT for every device (the agent does both on SIGTERM)."""
        for conn in self.conns.values():
            if conn.connected:
                conn.device.send(
                    conn.device.topics.status(conn.device.device), conn.device.status(False).to_json(), True
                )
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline and self.pub["acked"] < self.pub["published"]:
            self._io(0.05)
        for conn in self.conns.values():
            if conn.connected:
                conn.connected = False
                conn.client.disconnect()
        end = time.monotonic() + 2.0
        while time.monotonic() < end and len(self.sel.get_map()):
            self._io(0.05)
        self.out.put(self.stats(final=True))


def worker_main(spec: WorkerSpec, stop: Any, out: Any) -> None:
    """A worker process's entry point (runs until ``stop`` is set)."""
    _Worker(spec, stop, out).run()


class SimFleet:
    """``workers`` processes sharing ``devices``; use as a context manager (stopped on exit)."""

    def __init__(
        self,
        host: str,
        port: int,
        devices: Sequence[str],
        passwords: Mapping[str, str],
        settings: SimSettings,
        public_keys: Sequence[str],
        workers: int = 4,
        ca_file: str | None = None,
    ) -> None:
        workers = max(1, min(workers, len(devices) or 1))
        self.ctx = mp.get_context("fork")  # forked before the caller starts any thread
        self.stop_event = self.ctx.Event()
        self.queue: Any = self.ctx.Queue()
        self.specs = [
            WorkerSpec(
                i,
                host,
                port,
                tuple(devices[i::workers]),
                {d: passwords[d] for d in devices[i::workers]},
                settings,
                tuple(public_keys),
                ca_file=ca_file,
            )
            for i in range(workers)
        ]
        self.procs: list[Any] = []
        self.latest: dict[int, dict[str, Any]] = {}
        self.n_devices = len(devices)

    def start(self) -> SimFleet:
        for spec in self.specs:
            proc = self.ctx.Process(target=worker_main, args=(spec, self.stop_event, self.queue), daemon=True)
            proc.start()
            self.procs.append(proc)
        return self

    def __enter__(self) -> SimFleet:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def pids(self) -> list[int]:
        return [p.pid for p in self.procs if p.pid is not None]

    def poll(self, timeout_s: float = 0.0) -> dict[str, Any]:
        """Take in the workers' latest counters (waiting up to ``timeout_s`` for one) and sum them."""
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                item = self.queue.get(timeout=max(0.0, deadline - time.monotonic()) or 0.001)
            except queue.Empty:
                break
            self.latest[item["worker"]] = item
            timeout_s = 0.0
            deadline = time.monotonic()
        total: dict[str, Any] = {}
        for item in self.latest.values():
            for k, v in item.items():
                if k not in ("worker", "pid", "final") and isinstance(v, int):
                    total[k] = total.get(k, 0) + v
        dead = [p.pid for p in self.procs if p.exitcode not in (None, 0)]
        if dead:
            total["dead_workers"] = dead
        return total

    def wait_connected(self, timeout_s: float) -> dict[str, Any]:
        deadline = time.monotonic() + timeout_s
        stats = self.poll()
        while time.monotonic() < deadline:
            stats = self.poll(0.5)
            if stats.get("connacks", 0) >= self.n_devices or stats.get("dead_workers"):
                break
        return stats

    def stop(self, timeout_s: float = 20.0) -> dict[str, Any]:
        self.stop_event.set()
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline and any(p.is_alive() for p in self.procs):
            self.poll(0.2)
        for p in self.procs:
            if p.is_alive():
                p.kill()
            p.join(5)
        stats = self.poll(0.5)
        self.procs = []
        return stats
