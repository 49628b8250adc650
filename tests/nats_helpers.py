"""A three-node NATS JetStream cluster with MQTT, of our own, on free loopback ports (Debian's nats-server).

Each node gets its own config file and JetStream store directory under ``tmp``, listens on 127.0.0.1 only
(client, route, MQTT and monitoring ports), and is stopped by its PID. What the MQTT side needs (nats-server
2.9.10, measured here):

* ``server_name`` and JetStream on every node, and a ``cluster`` block naming the same routes;
* ``mqtt { stream_replicas: 3 }``: the streams behind MQTT (``$MQTT_rmsgs`` retained messages,
  ``$MQTT_msgs`` QoS1 messages, ``$MQTT_sess`` sessions) are replicated on all three nodes, so retained
  manifests and chunks survive the loss of any one node;
* MQTT 3.1.1 only (a v5 CONNECT is refused), QoS 0/1; a topic with ``.`` or a space is refused and the
  connection closed (``characters ' ' and '.' not supported for MQTT topics``);
* users and passwords come from the NATS ``accounts`` block (an MQTT username/password is a NATS user);
  permissions are NATS subjects (``edgefleet.devices.pi-1.>``: MQTT ``/`` maps to ``.``), not mosquitto
  ACL lines; JetStream must be enabled on that account.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from deploy.broker.spawn import free_port


def find_nats_server() -> str | None:
    return shutil.which("nats-server") or next(
        (p for p in ("/usr/sbin/nats-server", "/usr/bin/nats-server") if os.access(p, os.X_OK)), None
    )


@dataclass(frozen=True, slots=True)
class NatsUser:
    """A NATS user an MQTT client logs in as; ``publish``/``subscribe``: NATS subject permissions
    (None: everything)."""

    name: str
    password: str
    publish: tuple[str, ...] | None = None
    subscribe: tuple[str, ...] | None = None


@dataclass(slots=True)
class NatsNode:
    name: str
    client_port: int
    route_port: int
    mqtt_port: int
    http_port: int
    directory: Path
    process: subprocess.Popen[bytes] | None = None

    @property
    def config_path(self) -> Path:
        return self.directory / "nats.conf"

    @property
    def log_path(self) -> Path:
        return self.directory / "nats.log"

    @property
    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""


@dataclass
class NatsCluster:
    """``with NatsCluster(tmp) as cluster:`` three nodes up, a JetStream meta leader elected."""

    tmp: Path
    nodes_count: int = 3
    users: tuple[NatsUser, ...] = ()
    stream_replicas: int = 3
    binary: str | None = None
    nodes: list[NatsNode] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.binary = self.binary or find_nats_server()
        ports = _free_ports(4 * self.nodes_count)
        for i in range(self.nodes_count):
            c, r, m, h = ports[4 * i : 4 * i + 4]
            self.nodes.append(NatsNode(f"n{i}", c, r, m, h, self.tmp / f"n{i}"))

    @property
    def endpoints(self) -> list[tuple[str, int]]:
        return [("127.0.0.1", n.mqtt_port) for n in self.nodes]

    def config_text(self, node: NatsNode) -> str:
        routes = ", ".join(f"nats-route://127.0.0.1:{n.route_port}" for n in self.nodes)
        auth = ""
        if self.users:
            auth = "accounts {\n  FLEET {\n    jetstream: enabled\n    users: [\n"
            for u in self.users:
                perms = ""
                if u.publish is not None or u.subscribe is not None:
                    pub = _subjects(u.publish)
                    sub = _subjects(u.subscribe)
                    perms = f", permissions: {{ publish: {pub}, subscribe: {sub} }}"
                auth += f'      {{ user: "{u.name}", password: "{u.password}"{perms} }}\n'
            auth += "    ]\n  }\n}\n"
        return (
            f"server_name: {node.name}\n"
            f"listen: 127.0.0.1:{node.client_port}\n"
            f"http: 127.0.0.1:{node.http_port}\n"
            "max_payload: 8MB\n"
            f'jetstream {{ store_dir: "{node.directory / "store"}", max_memory_store: 64MB, '
            "max_file_store: 512MB }\n"
            + (
                f"cluster {{ name: edgefleet, listen: 127.0.0.1:{node.route_port}, routes: [{routes}] }}\n"
                if len(self.nodes) > 1
                else ""
            )
            +
            # retained messages, QoS1 messages and sessions replicated on every node
            f"mqtt {{ listen: 127.0.0.1:{node.mqtt_port}, stream_replicas: {self.stream_replicas} }}\n"
            f"{auth}"
        )

    def start(self, timeout_s: float = 30.0) -> NatsCluster:
        if self.binary is None:
            raise RuntimeError("nats-server is not installed (apt-get install -y nats-server)")
        for node in self.nodes:
            node.directory.mkdir(parents=True, exist_ok=True)
            node.config_path.write_text(self.config_text(node))
            self.start_node(node)
        deadline = time.monotonic() + timeout_s
        for node in self.nodes:
            _wait_port(node.mqtt_port, deadline, node)
        while time.monotonic() < deadline:  # JetStream needs a meta leader before MQTT clients work
            if len(self.nodes) == 1 or any("metadata leader" in n.log_text() for n in self.nodes):
                return self
            time.sleep(0.1)
        self.stop()
        raise RuntimeError("nats cluster elected no JetStream leader within the timeout")

    def start_node(self, node: NatsNode) -> None:
        assert self.binary is not None
        with node.log_path.open("ab") as log:
            node.process = subprocess.Popen(
                [self.binary, "-c", str(node.config_path)], stdout=log, stderr=subprocess.STDOUT
            )

    def kill(self, node: NatsNode) -> None:
        """SIGKILL by PID: a node crashing, not a clean shutdown."""
        if node.process is not None and node.process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(node.process.pid, signal.SIGKILL)
            node.process.wait(timeout=10)

    def node_on(self, port: int) -> NatsNode:
        return next(n for n in self.nodes if n.mqtt_port == port)

    def stop(self) -> None:
        for node in self.nodes:
            proc = node.process
            if proc is None or proc.poll() is not None:
                continue
            with contextlib.suppress(ProcessLookupError):
                os.kill(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.kill(node)

    def logs(self) -> Mapping[str, str]:
        return {n.name: n.log_text()[-4000:] for n in self.nodes}

    def __enter__(self) -> NatsCluster:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


@contextlib.contextmanager
def nats_cluster(tmp: Path, **kwargs: object) -> Iterator[NatsCluster]:
    cluster = NatsCluster(tmp, **kwargs)  # type: ignore[arg-type]
    with cluster:
        yield cluster


def _subjects(subjects: tuple[str, ...] | None) -> str:
    if subjects is None:
        return '[">"]'
    return "[" + ", ".join(f'"{s}"' for s in subjects) + "]"


def _free_ports(count: int) -> list[int]:
    ports: set[int] = set()
    for _ in range(count * 20):  # bounded: free_port may repeat a port it just handed out
        ports.add(free_port())
        if len(ports) == count:
            return sorted(ports)
    raise RuntimeError("could not find enough free loopback ports")


def _wait_port(port: int, deadline: float, node: NatsNode) -> None:
    while time.monotonic() < deadline:
        if not node.alive:
            raise RuntimeError(f"nats-server {node.name} exited: {node.log_text()[-2000:]}")
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return
        time.sleep(0.05)
    raise RuntimeError(f"nats-server {node.name} did not listen on {port} in time")
