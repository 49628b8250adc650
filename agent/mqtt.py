"""A small broker interface (the seam) and its paho-mqtt 2.x implementation.

The daemon talks to :class:`BrokerClient` only; tests may pass a fake. :class:`PahoBroker`:

* MQTT v5 with ``clean_start=False`` and a session expiry interval (offline queues survive restarts), or
  3.1.1 with ``clean_session=False``; username/password; TLS with CA / client certificate;
* a retained Last Will (``Status(online=False)``) and a retained birth message re-published on every connect;
* re-subscribes everything in every ``on_connect``; reconnects with paho's exponential backoff;
* bad credentials / not authorised in a CONNACK are fatal (:class:`ConnectionFatal`), the rest transient;
* never blocks in a callback: incoming messages go to a ``queue.Queue`` the daemon's main thread consumes.
"""

from __future__ import annotations

import contextlib
import logging
import math
import queue
import socket
import ssl
import threading
from dataclasses import dataclass
from typing import Any, Protocol

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion, MQTTErrorCode
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from agent.config import AgentConfig
from agent.errors import ConnectionFatal

log = logging.getLogger(__name__)

_FATAL_CONNACK = frozenset({"Bad user name or password", "Not authorized", "Bad authentication method"})


@dataclass(frozen=True, slots=True)
class Inbound:
    """A message received from the broker (``fatal`` set instead when the broker refused us for good)."""

    topic: str
    payload: bytes
    retain: bool = False
    fatal: str | None = None
    connected: bool = False


class BrokerClient(Protocol):
    """What the daemon needs from a broker connection."""

    inbox: queue.Queue[Inbound]

    def start(self) -> None: ...
    def wait_connected(self, timeout: float) -> bool: ...
    def is_connected(self) -> bool: ...
    def subscribe(self, topic: str, qos: int = 1) -> None: ...
    def unsubscribe(self, topic: str) -> None: ...
    def publish(
        self, topic: str, payload: bytes, qos: int = 1, retain: bool = False, timeout: float = 10.0
    ) -> bool: ...
    def set_birth(self, topic: str, payload: bytes) -> None: ...
    def stop(self, final: tuple[str, bytes] | None = None, timeout: float = 5.0) -> None: ...


def _no_delay(client: paho.Client, userdata: Any, sock: Any) -> None:
    """Disable Nagle on the client socket: small QoS1 acks and (un)subscribes otherwise wait on
    delayed ACKs (~40 ms each), which throttles the sliding chunk window (the broker side has
    ``set_tcp_nodelay``)."""
    with contextlib.suppress(OSError, AttributeError):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


class PahoBroker:
    """paho-mqtt 2.x client configured from ``AgentConfig.mqtt``."""

    def __init__(
        self, config: AgentConfig, will: tuple[str, bytes], inbox: queue.Queue[Inbound] | None = None
    ) -> None:
        m = config.mqtt
        self.config = config
        self.inbox: queue.Queue[Inbound] = inbox if inbox is not None else queue.Queue()
        self._v5 = m.protocol == "v5"
        client_id = m.client_id or f"edgefleet-agent-{config.device.id}"
        if self._v5:
            self._client = paho.Client(
                callback_api_version=CallbackAPIVersion.VERSION2, client_id=client_id, protocol=paho.MQTTv5
            )
        else:
            self._client = paho.Client(
                callback_api_version=CallbackAPIVersion.VERSION2,
                client_id=client_id,
                protocol=paho.MQTTv311,
                clean_session=False,
            )
        c = self._client
        c.on_socket_open = _no_delay
        password = config.mqtt_password()
        if m.username is not None:
            c.username_pw_set(m.username, password)
        if m.tls is not None:
            c.tls_set(
                ca_certs=str(m.tls.ca_file) if m.tls.ca_file else None,
                certfile=str(m.tls.cert_file) if m.tls.cert_file else None,
                keyfile=str(m.tls.key_file) if m.tls.key_file else None,
                cert_reqs=ssl.CERT_REQUIRED,
                tls_version=ssl.PROTOCOL_TLS_CLIENT,
            )
            if m.tls.insecure:
                c.tls_insecure_set(True)
        will_topic, will_payload = will
        c.will_set(will_topic, will_payload, qos=1, retain=True)
        c.reconnect_delay_set(
            min_delay=max(1, math.floor(m.reconnect_min_s)), max_delay=max(1, math.ceil(m.reconnect_max_s))
        )
        c.max_inflight_messages_set(64)
        c.on_connect = self._on_connect
        c.on_disconnect = self._on_disconnect
        c.on_message = self._on_message
        c.on_publish = self._on_publish
        self._lock = threading.Lock()
        self._subs: dict[str, int] = {}
        self._birth: tuple[str, bytes] | None = None
        self._connected = threading.Event()
        self._fatal: str | None = None
        self._refused: dict[int, str] = {}
        self._stopping = False

    # ------------------------------------------------------------------ lifecycle

    def start(self) -> None:
        """Begin connecting in paho's network thread (retries with backoff until connected)."""
        m = self.config.mqtt
        props: Properties | None = None
        if self._v5:
            props = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
            props.SessionExpiryInterval = m.session_expiry_s
            self._client.connect_async(
                m.host, m.port, keepalive=m.keepalive_s, clean_start=False, properties=props
            )
        else:
            self._client.connect_async(m.host, m.port, keepalive=m.keepalive_s)
        log.info("connecting to mqtt%s://%s:%d (MQTT %s)", "s" if m.tls else "", m.host, m.port, m.protocol)
        self._client.loop_start()

    def wait_connected(self, timeout: float) -> bool:
        """Wait for the first CONNACK; raise ConnectionFatal if the broker refused our credentials."""
        ok = self._connected.wait(timeout)
        if self._fatal is not None:
            raise ConnectionFatal(self._fatal)
        return ok

    def is_connected(self) -> bool:
        return self._connected.is_set()

    def stop(self, final: tuple[str, bytes] | None = None, timeout: float = 5.0) -> None:
        """Publish ``final`` (the offline status) if connected, then disconnect, stop the network loop."""
        if final is not None and self._connected.is_set():
            self.publish(final[0], final[1], qos=1, retain=True, timeout=timeout)
        self._stopping = True
        self._client.disconnect()
        # paho 2.2's loop_stop() reads its thread attribute twice; the network thread may clear it in
        # between once disconnect() lands, which raises AttributeError although the loop has stopped.
        with contextlib.suppress(AttributeError):
            self._client.loop_stop()
        self._connected.clear()

    # ------------------------------------------------------------------ operations

    def set_birth(self, topic: str, payload: bytes) -> None:
        """The retained message published on every (re)connect: the current online Status."""
        with self._lock:
            self._birth = (topic, payload)

    def subscribe(self, topic: str, qos: int = 1) -> None:
        with self._lock:
            self._subs[topic] = qos
        if self._connected.is_set():
            self._client.subscribe(topic, qos)

    def unsubscribe(self, topic: str) -> None:
        with self._lock:
            known = self._subs.pop(topic, None) is not None
        if known and self._connected.is_set():
            self._client.unsubscribe(topic)

    def subscriptions(self) -> list[str]:
        with self._lock:
            return list(self._subs)

    def publish(
        self, topic: str, payload: bytes, qos: int = 1, retain: bool = False, timeout: float = 10.0
    ) -> bool:
        """Publish and wait up to ``timeout`` for the acknowledgement. False if not acknowledged (yet).

        A QoS1 message published while disconnected stays queued in paho and goes out on reconnect.
        """
        info = self._client.publish(topic, payload, qos=qos, retain=retain)
        if info.rc == MQTTErrorCode.MQTT_ERR_NO_CONN:
            log.debug("not connected; %s queued for later", topic)
            return False
        if info.rc != MQTTErrorCode.MQTT_ERR_SUCCESS:
            log.warning("publish to %s failed: %s", topic, paho.error_string(info.rc))
            return False
        if qos == 0:
            return True
        try:
            info.wait_for_publish(timeout)
        except (RuntimeError, ValueError) as err:
            log.warning("publish to %s failed: %s", topic, err)
            return False
        if not info.is_published():
            log.warning("publish to %s not acknowledged within %.1f s", topic, timeout)
            return False
        with self._lock:
            refused = self._refused.pop(info.mid, None)
        if refused is not None:
            log.error("broker refused publish to %s: %s (check the ACL for this device)", topic, refused)
            return False
        return True

    # ------------------------------------------------------------------ paho callbacks (never block here)

    def _on_connect(self, client: paho.Client, _ud: Any, _flags: Any, reason_code: Any, _props: Any) -> None:
        if reason_code.is_failure:
            name = reason_code.getName()
            if name in _FATAL_CONNACK:
                m = self.config.mqtt
                self._fatal = (
                    f"broker {m.host}:{m.port} refused the connection: {name}. Check mqtt.username and "
                    f"mqtt.password/password_file (or the client certificate) and the broker's ACL for "
                    f"device {self.config.device.id!r}"
                )
                log.error("%s", self._fatal)
                client.disconnect()  # stops paho's retry loop
                self.inbox.put(Inbound("", b"", fatal=self._fatal))
                self._connected.set()  # wake wait_connected, which raises
                self._connected.clear()
            else:
                log.warning("broker refused the connection (%s); retrying with backoff", name)
            return
        with self._lock:
            subs = list(self._subs.items())
            birth = self._birth
        log.info("connected to the broker; subscribing to %d topic(s)", len(subs))
        if birth is not None:
            client.publish(birth[0], birth[1], qos=1, retain=True)
        for topic, qos in subs:
            client.subscribe(topic, qos)
        self._connected.set()
        self.inbox.put(Inbound("", b"", connected=True))

    def _on_disconnect(
        self, _client: paho.Client, _ud: Any, _flags: Any, reason_code: Any, _props: Any
    ) -> None:
        was = self._connected.is_set()
        self._connected.clear()
        if was and not self._stopping:
            log.warning("disconnected from the broker (%s); reconnecting with backoff", reason_code)

    def _on_message(self, _client: paho.Client, _ud: Any, msg: paho.MQTTMessage) -> None:
        self.inbox.put(Inbound(msg.topic, bytes(msg.payload), bool(msg.retain)))

    def _on_publish(self, _client: paho.Client, _ud: Any, mid: int, reason_code: Any, _props: Any) -> None:
        # mosquitto's 0x10 "No matching subscribers" is success for us.
        if reason_code.is_failure:
            with self._lock:
                self._refused[mid] = reason_code.getName()
