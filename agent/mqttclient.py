"""One paho client factory for the agent, the host session, the collector and the connect check.

:func:`build_client` turns a :class:`ClientSpec` (a typed endpoint list, protocol, credentials, TLS) into a
:class:`FleetClient`, a paho 2.x client (``CallbackAPIVersion.VERSION2``) that:

* speaks MQTT v5 by default and 3.1.1 when the spec says so (NATS speaks only 3.1.1); a persistent 3.1.1
  session is ``clean_session=False`` (v5 sessions are chosen per CONNECT: ``clean_start=False``);
* disables Nagle on every socket it opens (small QoS1 acks otherwise wait ~40 ms on delayed ACKs);
* verifies the broker's certificate against the endpoint's ``server_name`` when one is given (a cluster
  reached by IP address, or one certificate for every node), else against the host;
* keeps the exception of the last failed connect (paho swallows it before ``on_connect_fail``);
* fails over: every connection attempt after the first goes to the next endpoint of the list
  (:class:`Rotation`), with paho's own exponential backoff between attempts, so a lost node is replaced
  by the next one on the first retry and a fully dead list is retried at the backoff's pace.

:func:`classify_connack` / :func:`connack_is_fatal` (re-exported from :mod:`agent.connectivity`) are the
CONNACK classification every user shares: bad credentials are fatal, everything else transient.
This module imports no config model, so both ``agent.config`` and ``deploy`` import it freely.
"""

from __future__ import annotations

import contextlib
import socket
import ssl
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion, MQTTErrorCode
from pydantic import BaseModel, ConfigDict, Field, model_validator

from agent.connectivity import address, classify_connack, close_failed_socket, connack_is_fatal

__all__ = [
    "ClientSpec",
    "Endpoint",
    "FleetClient",
    "Rotation",
    "build_client",
    "classify_connack",
    "connack_is_fatal",
    "no_delay",
    "parse_endpoints",
]

Protocol = Literal["v5", "v311"]


class Endpoint(BaseModel):
    """One broker node: ``host:port`` and, for TLS, the name its certificate carries if not ``host``.

    Written as a table (``{host = "n1", port = 8883, server_name = "broker.lan"}``) or as a string
    ``host:port`` / ``host:port@server_name`` (``[v6addr]:port`` for IPv6).
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    host: str = Field(min_length=1, max_length=253)
    port: int = Field(default=1883, ge=1, le=65535)
    server_name: str | None = Field(
        default=None, min_length=1, max_length=253, description="TLS: verify this name instead of host"
    )

    @model_validator(mode="before")
    @classmethod
    def _from_text(cls, value: Any) -> Any:
        if isinstance(value, str):
            return _split_endpoint(value)
        return value

    @property
    def address(self) -> str:
        return address(self.host, self.port)

    def __str__(self) -> str:
        return self.address + (f"@{self.server_name}" if self.server_name else "")


def _split_endpoint(text: str) -> dict[str, Any]:
    """``host:port[@server_name]`` → fields; a clear ValueError (pydantic shows it) otherwise."""
    raw = text.strip()
    out: dict[str, Any] = {}
    if "@" in raw:
        raw, name = raw.rsplit("@", 1)
        out["server_name"] = name
    if raw.startswith("["):  # [IPv6]:port
        host, sep, rest = raw[1:].partition("]")
        port = rest[1:] if rest.startswith(":") else ""
        if not sep or not port:
            raise ValueError(f"broker endpoint {text!r} must look like [v6-address]:port")
    else:
        host, sep, port = raw.rpartition(":")
        if not sep or ":" in host:
            raise ValueError(f"broker endpoint {text!r} must look like host:port (e.g. broker.lan:8883)")
    if not port.isdigit():
        raise ValueError(f"broker endpoint {text!r}: port {port!r} is not a number")
    out.update(host=host, port=int(port))
    return out


def parse_endpoints(values: Iterable[str]) -> list[Endpoint]:
    """Command-line form: each value one endpoint or a comma list (``--broker a:1883,b:1883``)."""
    out: list[Endpoint] = []
    for value in values:
        for part in value.split(","):
            if part.strip():
                out.append(Endpoint.model_validate(part))
    return out


class Rotation:
    """Which endpoint the next connection attempt goes to.

    The first attempt goes to the first endpoint; every later attempt (after a failure, a refusal or a
    lost connection) to the next one, wrapping around. Nodes of a cluster are equivalent, so after a loss
    a client does not insist on the node that just went away. ``failed_in_row`` counts attempts since the
    last accepted connection (a full cycle of them means every node is down).
    """

    def __init__(self, endpoints: Sequence[Endpoint]) -> None:
        if not endpoints:
            raise ValueError("at least one broker endpoint is required")
        self.endpoints = tuple(endpoints)
        self._index = 0
        self._attempts = 0
        self.failed_in_row = 0

    @property
    def current(self) -> Endpoint:
        return self.endpoints[self._index]

    def next_attempt(self) -> Endpoint:
        """The endpoint for the attempt about to start (advances after the first attempt)."""
        if self._attempts > 0:
            self._index = (self._index + 1) % len(self.endpoints)
        self._attempts += 1
        return self.current

    def peek(self) -> Endpoint:
        """The endpoint :meth:`next_attempt` will return."""
        if self._attempts == 0:
            return self.current
        return self.endpoints[(self._index + 1) % len(self.endpoints)]

    def failed(self) -> None:
        self.failed_in_row += 1

    def connected(self) -> None:
        self.failed_in_row = 0

    @property
    def cycle_failed(self) -> bool:
        """True when each endpoint failed at least once since the last connection."""
        return self.failed_in_row >= len(self.endpoints)


@dataclass(frozen=True)
class ClientSpec:
    """Everything a client needs; ``password`` is the secret itself (callers read files)."""

    client_id: str
    endpoints: tuple[Endpoint, ...]
    protocol: Protocol = "v5"
    username: str | None = None
    password: str | None = field(default=None, repr=False)
    tls: bool = False
    ca_file: Path | None = None
    cert_file: Path | None = None
    key_file: Path | None = None
    insecure: bool = False
    persistent_session: bool = False  # 3.1.1 clean_session=False (v5: clean_start=False at connect)
    manual_ack: bool = False
    connect_timeout_s: float = 10.0

    @property
    def v5(self) -> bool:
        return self.protocol == "v5"

    @property
    def uses_tls(self) -> bool:
        return self.tls or self.ca_file is not None or self.cert_file is not None


class _NamedContext(ssl.SSLContext):
    """An SSLContext that verifies (and sends as SNI) ``server_name`` instead of the host dialled."""

    server_name: str | None = None

    def wrap_socket(self, sock: Any, *args: Any, **kwargs: Any) -> Any:
        if self.server_name is not None:
            kwargs["server_hostname"] = self.server_name
        return super().wrap_socket(sock, *args, **kwargs)


def tls_context(spec: ClientSpec) -> _NamedContext:
    """The client context (CA or the system store, optional client certificate); OSError/ssl.SSLError on
    unreadable or bad files."""
    ctx = _NamedContext(ssl.PROTOCOL_TLS_CLIENT)
    if spec.cert_file is not None:
        ctx.load_cert_chain(str(spec.cert_file), str(spec.key_file) if spec.key_file else None)
    if spec.ca_file is not None:
        ctx.load_verify_locations(str(spec.ca_file))
    else:
        ctx.load_default_certs()
    ctx.check_hostname = not spec.insecure
    ctx.verify_mode = ssl.CERT_REQUIRED
    return ctx


def no_delay(client: paho.Client, userdata: Any, sock: Any) -> None:
    """paho ``on_socket_open``: disable Nagle, so QoS1 acks in a window never wait on delayed ACKs."""
    with contextlib.suppress(OSError, AttributeError):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


class FleetClient(paho.Client):
    """paho's client with endpoint rotation and the exception of the last failed connect kept."""

    last_error: OSError | None = None

    def __init__(self, spec: ClientSpec) -> None:
        super().__init__(
            callback_api_version=CallbackAPIVersion.VERSION2,
            client_id=spec.client_id,
            protocol=paho.MQTTv5 if spec.v5 else paho.MQTTv311,
            clean_session=None if spec.v5 else not spec.persistent_session,
            manual_ack=spec.manual_ack,
        )
        self.spec = spec
        self.rotation = Rotation(spec.endpoints)
        self.endpoint = spec.endpoints[0]
        self._tls_ctx: _NamedContext | None = None
        self.on_socket_open = no_delay
        self.connect_timeout = spec.connect_timeout_s
        if spec.username is not None:
            self.username_pw_set(spec.username, spec.password)
        if spec.uses_tls:
            self._tls_ctx = tls_context(spec)
            self.tls_set_context(self._tls_ctx)
            if spec.insecure:
                self.tls_insecure_set(True)  # else paho checks the hostname itself

    def reconnect(self) -> MQTTErrorCode:
        """Every attempt, paho's automatic ones included, dials the rotation's next endpoint."""
        self._use(self.rotation.next_attempt())
        self.last_error = None
        try:
            return super().reconnect()
        except OSError as err:
            close_failed_socket(err)
            self.last_error = err
            raise

    def _use(self, endpoint: Endpoint) -> None:
        # paho's host/port setters refuse while its state is "connecting", which reconnect() has set by
        # the time a callback could run; before super().reconnect() we may set them directly.
        self.endpoint = endpoint
        self._host, self._port = endpoint.host, endpoint.port
        if self._tls_ctx is not None:
            self._tls_ctx.server_name = endpoint.server_name

    def connect_next(self, keepalive: int = 60, **kwargs: Any) -> Endpoint:
        """One synchronous attempt (resolve, TCP, TLS, CONNECT sent) at the rotation's next endpoint;
        raises OSError like paho's connect. Returns the endpoint dialled."""
        ahead = self.rotation.peek()
        self.connect(ahead.host, ahead.port, keepalive=keepalive, **kwargs)  # reconnect() dials `ahead`
        return self.endpoint

    def start_async(self, keepalive: int = 60, **kwargs: Any) -> None:
        """Begin connecting in loop_start's thread, to the first endpoint; failover handles the rest."""
        ahead = self.rotation.peek()
        self.connect_async(ahead.host, ahead.port, keepalive=keepalive, **kwargs)


def build_client(spec: ClientSpec) -> FleetClient:
    """A configured, not yet connected client. OSError/ssl.SSLError/ValueError for bad TLS files."""
    return FleetClient(spec)


def reason_value(reason: Any) -> int:
    """The numeric CONNACK/PUBACK/SUBACK reason (paho gives a ReasonCode, an int, or None)."""
    if reason is None:
        return 0
    if isinstance(reason, int):
        return reason
    return int(reason.value)


def endpoints_or_default(
    endpoints: Sequence[Endpoint], host: str, port: int, server_name: str | None = None
) -> tuple[Endpoint, ...]:
    """The configured endpoint list, or the single ``host:port`` of a classic one-broker config."""
    if endpoints:
        return tuple(endpoints)
    return (Endpoint(host=host, port=port, server_name=server_name),)
