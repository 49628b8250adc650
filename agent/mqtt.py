"""A small broker interface (the seam) and its paho-mqtt 2.x implementation.

The daemon talks to :class:`BrokerClient` only; tests may pass a fake. :class:`PahoBroker`:

* built by :func:`agent.mqttclient.build_client`: MQTT v5 with ``clean_start=False`` and a session expiry
  interval (offline queues survive restarts), or 3.1.1 with ``clean_session=False``; username/password;
  TLS with CA / client certificate; TCP_NODELAY; several broker endpoints (``mqtt.endpoints``): every
  reconnect attempt goes to the next one, with paho's backoff between attempts;
* a retained Last Will (``Status(online=False)``) and a retained birth message re-published on every connect;
* re-subscribes everything in every ``on_connect``: on the process's first connection with retained
  messages sent (a restarted agent rebuilds its state from them: what its predecessor received but did
  not handle is gone), on every later one, MQTT v5, with retain handling 1 ("only if the subscription
  is new"): a session the broker kept already holds the subscriptions and queues what was published
  meanwhile, and resending every retained chunk of a fetch in progress doubled the bytes of a fetch
  across a broker restart (measured: 3.6 MB received for a 2 MiB variant over the chaos bench's bad
  link); a broker that lost the session sees new subscriptions and sends them all; reconnects with
  paho's exponential backoff; a
  subscription the broker refuses (SUBACK >= 0x80: NATS while JetStream re-elects after a node loss) is
  retried after ``SUB_RETRY_S``, at most ``SUB_RETRIES`` times per connection;
* bad credentials / not authorised in a CONNACK are fatal (:class:`ConnectionFatal`), the rest transient;
* while offline, logs one line per failed attempt naming the cause (:mod:`agent.connectivity`), host:port
  and the next retry delay, rate-limited by :class:`~agent.connectivity.OfflineLog`; one line when back;
* never blocks in a callback while connected: incoming messages go to a ``queue.Queue`` the daemon's main
  thread consumes. Only when an attempt ended ambiguously (closed before any CONNACK) does the network
  thread probe the port (at most ``PROBE_TIMEOUT_S`` per step), and only when that symptom is new.
"""

from __future__ import annotations

import contextlib
import logging
import math
import queue
import threading
from dataclasses import dataclass
from typing import Any, Protocol

import paho.mqtt.client as paho
from paho.mqtt.enums import MQTTErrorCode
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.subscribeoptions import SubscribeOptions

from agent.config import AgentConfig
from agent.connectivity import (
    Cause,
    Diagnosis,
    OfflineLog,
    classify_connack,
    classify_error,
    resolve,
    tls_context,
)
from agent.errors import ConnectionFatal
from agent.mqttclient import ClientSpec, FleetClient, build_client, reason_value

log = logging.getLogger(__name__)

_FATAL_CONNACK = frozenset({"Bad user name or password", "Not authorized", "Bad authentication method"})
SUB_RETRY_S = 1.0
SUB_RETRIES = 30


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


class PahoBroker:
    """paho-mqtt 2.x client configured from ``AgentConfig.mqtt``."""

    def __init__(
        self, config: AgentConfig, will: tuple[str, bytes], inbox: queue.Queue[Inbound] | None = None
    ) -> None:
        m = config.mqtt
        self.config = config
        self.inbox: queue.Queue[Inbound] = inbox if inbox is not None else queue.Queue()
        self._v5 = m.protocol == "v5"
        self._connected_once = False  # a later connect re-subscribes without the retained resend
        m_tls = m.tls
        password = config.mqtt_password()
        spec = ClientSpec(
            client_id=m.client_id or f"edgefleet-agent-{config.device.id}",
            endpoints=m.broker_endpoints(),
            protocol=m.protocol,
            username=m.username,
            password=password if m.username is not None else None,
            tls=m_tls is not None,
            ca_file=m_tls.ca_file if m_tls else None,
            cert_file=m_tls.cert_file if m_tls else None,
            key_file=m_tls.key_file if m_tls else None,
            insecure=m_tls.insecure if m_tls else False,
            persistent_session=True,
            connect_timeout_s=m.connect_timeout_s,
        )
        self._client: FleetClient = build_client(spec)
        self.chunk_qos = m.chunk_qos
        c = self._client
        will_topic, will_payload = will
        c.will_set(will_topic, will_payload, qos=1, retain=True)
        self._delay_min, self._delay_max = (
            max(1, math.floor(m.reconnect_min_s)),
            max(1, math.ceil(m.reconnect_max_s)),
        )
        c.reconnect_delay_set(min_delay=self._delay_min, max_delay=self._delay_max)
        c.max_inflight_messages_set(64)
        c.on_pre_connect = self._on_pre_connect
        c.on_connect_fail = self._on_connect_fail
        c.on_connect = self._on_connect
        c.on_disconnect = self._on_disconnect
        c.on_message = self._on_message
        c.on_publish = self._on_publish
        c.on_subscribe = self._on_subscribe
        self._lock = threading.Lock()
        self._subs: dict[str, int] = {}
        self._birth: tuple[str, bytes] | None = None
        self._connected = threading.Event()
        self._fatal: str | None = None
        self._refused: dict[int, str] = {}
        self._stopping = False
        # offline reporting; touched only by paho's network thread (last_failure is read by others)
        first = spec.endpoints[0]
        self._offline = OfflineLog(first.host, first.port)
        self._sub_mids: dict[int, list[str]] = {}  # SUBSCRIBE mid -> its topics, until the SUBACK
        self._sub_retries: dict[str, int] = {}  # refused topic -> retries this connection
        self._timers: set[threading.Timer] = set()
        self._delay: int | None = None  # mirrors paho's backoff: None, then min, doubling up to max
        self._attempt_reported = True
        self._attempts = 0  # since start(): paho waits twice after a first attempt that raised
        self._probed: tuple[Diagnosis, Diagnosis] | None = None  # (ambiguous symptom, what the probe found)
        self.last_failure: Diagnosis | None = None

    # ------------------------------------------------------------------ lifecycle

    def start(self) -> None:
        """Begin connecting in paho's network thread (retries with backoff until connected)."""
        m = self.config.mqtt
        props: Properties | None = None
        if self._v5:
            props = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
            props.SessionExpiryInterval = m.session_expiry_s
            self._client.start_async(keepalive=m.keepalive_s, clean_start=False, properties=props)
        else:
            self._client.start_async(keepalive=m.keepalive_s)
        names = ", ".join(str(e) for e in self._client.rotation.endpoints)
        log.info("connecting to mqtt%s://%s (MQTT %s)", "s" if m.tls else "", names, m.protocol)
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
        with self._lock:
            timers = list(self._timers)
            self._timers.clear()
        for timer in timers:
            timer.cancel()
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
            self._subscribe_now(topic, qos)

    def _subscribe_now(self, topic: str, qos: int, resubscribe: bool = False) -> None:
        if resubscribe and self._v5:
            options = SubscribeOptions(qos=qos, retainHandling=SubscribeOptions.RETAIN_SEND_IF_NEW_SUB)
            result, mid = self._client.subscribe(topic, options=options)
        else:
            result, mid = self._client.subscribe(topic, qos)
        if result == MQTTErrorCode.MQTT_ERR_SUCCESS and mid is not None:
            with self._lock:
                self._sub_mids[mid] = [topic]

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

    # ------------------------------------------------------------------ paho callbacks (never block here,
    # but for the bounded probe of an ambiguous failure while offline)

    def _on_pre_connect(self, _client: paho.Client, _ud: Any) -> None:
        self._attempt_reported = False
        self._attempts += 1

    def _on_connect_fail(self, _client: paho.Client, _ud: Any) -> None:
        m = self.config.mqtt
        ep = self._client.endpoint
        err = self._client.last_error
        if err is None:
            found = Diagnosis(Cause.OTHER, ep.host, ep.port, "connect failed")
        else:
            found = classify_error(err, ep.host, ep.port, tls=m.tls is not None)
        # paho 2.x: when connect_async's first attempt raises, loop_forever waits once in its "first
        # connection" loop and again in its main loop before the next attempt
        self._failed(found, waits=2 if self._attempts == 1 else 1)

    def _failed(self, found: Diagnosis, waits: int = 1) -> None:
        """One failed attempt (reported once per attempt): log it unless rate-limited."""
        if self._attempt_reported or self._stopping or self._fatal is not None:
            return
        self._attempt_reported = True
        rotation = self._client.rotation
        rotation.failed()
        if len(rotation.endpoints) > 1:
            every = "; every endpoint failed since the last connection" if rotation.cycle_failed else ""
            log.info(
                "broker %s failed (%s); next attempt: %s%s",
                found.address,
                found.cause.value,
                rotation.peek(),
                every,
            )
        if found.ambiguous:
            found = self._probe(found)
        self.last_failure = found
        # what paho's _reconnect_wait is about to sleep: min, then doubling up to max
        retry_in = 0
        for _ in range(waits):
            self._delay = self._delay_min if self._delay is None else min(self._delay * 2, self._delay_max)
            retry_in += self._delay
        line = self._offline.failed(found, retry_in)
        if line is not None:
            log.warning("%s", line)

    def _probe(self, found: Diagnosis) -> Diagnosis:
        """Why the broker closed on us; probed once per new symptom (a probe is a few round trips)."""
        if self._probed is not None and self._probed[0] == found:
            return self._probed[1]
        m = self.config.mqtt
        try:
            ctx = (
                None
                if m.tls is None
                else tls_context(m.tls.ca_file, m.tls.cert_file, m.tls.key_file, insecure=m.tls.insecure)
            )
        except (OSError, ValueError):
            return found  # paho loaded the same files; nothing better to say
        result = resolve(found, ctx)
        self._probed = (found, result)
        return result

    def _on_connect(self, client: paho.Client, _ud: Any, _flags: Any, reason_code: Any, _props: Any) -> None:
        if reason_code.is_failure:
            name = reason_code.getName()
            ep = self._client.endpoint
            self.last_failure = classify_connack(int(reason_code.value), ep.host, ep.port, name)
            if name in _FATAL_CONNACK:
                self._fatal = (
                    f"broker {ep.address} refused the connection: {name}. Check mqtt.username and "
                    f"mqtt.password/password_file (or the client certificate) and the broker's ACL for "
                    f"device {self.config.device.id!r}"
                )
                log.error("%s", self._fatal)
                client.disconnect()  # stops paho's retry loop
                self.inbox.put(Inbound("", b"", fatal=self._fatal))
                self._connected.set()  # wake wait_connected, which raises
                self._connected.clear()
            elif self.last_failure is not None:
                self._failed(self.last_failure)
            return
        self._client.rotation.connected()
        self._offline.address = self._client.endpoint.address
        back = self._offline.connected()
        if back is not None:
            log.info("%s", back)
        self._delay, self._probed, self.last_failure = None, None, None
        with self._lock:
            subs = list(self._subs.items())
            birth = self._birth
        log.info("connected to %s; subscribing to %d topic(s)", self._client.endpoint, len(subs))
        with self._lock:
            self._sub_mids.clear()
            self._sub_retries.clear()
        if birth is not None:
            client.publish(birth[0], birth[1], qos=1, retain=True)
        for topic, qos in subs:
            self._subscribe_now(topic, qos, resubscribe=self._connected_once)
        self._connected_once = True
        self._connected.set()
        self.inbox.put(Inbound("", b"", connected=True))

    def _on_disconnect(
        self, _client: paho.Client, _ud: Any, _flags: Any, reason_code: Any, _props: Any
    ) -> None:
        was = self._connected.is_set()
        self._connected.clear()
        if self._stopping:
            return
        if was:
            log.warning("disconnected from the broker (%s); reconnecting with backoff", reason_code)
            self._offline.disconnected()
        else:  # the attempt ended before a CONNACK: e.g. a TLS listener resetting a plain client
            ep = self._client.endpoint
            self._failed(Diagnosis(Cause.CLOSED, ep.host, ep.port, f"before any CONNACK ({reason_code})"))

    def _on_message(self, _client: paho.Client, _ud: Any, msg: paho.MQTTMessage) -> None:
        self.inbox.put(Inbound(msg.topic, bytes(msg.payload), bool(msg.retain)))

    def _on_publish(self, _client: paho.Client, _ud: Any, mid: int, reason_code: Any, _props: Any) -> None:
        # mosquitto's 0x10 "No matching subscribers" is success for us.
        if reason_code.is_failure:
            with self._lock:
                self._refused[mid] = reason_code.getName()

    def _on_subscribe(self, _client: paho.Client, _ud: Any, mid: int, reason_codes: Any, _props: Any) -> None:
        with self._lock:
            topics = self._sub_mids.pop(mid, [])
        for topic, code in zip(topics, reason_codes or [], strict=False):
            if reason_value(code) >= 0x80:
                self._refused_subscription(topic, reason_value(code))

    def _refused_subscription(self, topic: str, code: int) -> None:
        """Retry later (never block the network thread): NATS refuses while JetStream re-elects."""
        with self._lock:
            wanted = topic in self._subs
            tries = self._sub_retries.get(topic, 0) + 1
            self._sub_retries[topic] = tries
        if not wanted or self._stopping:
            return
        if tries > SUB_RETRIES:
            log.error(
                "broker refused subscription %s %d times (0x%02x); giving up until reconnect",
                topic,
                tries - 1,
                code,
            )
            return
        log.warning("broker refused subscription %s (0x%02x); retrying in %g s", topic, code, SUB_RETRY_S)
        timer = threading.Timer(SUB_RETRY_S, self._retry_subscription, [topic])
        timer.daemon = True
        with self._lock:
            self._timers.add(timer)
        timer.start()

    def _retry_subscription(self, topic: str) -> None:
        with self._lock:
            self._timers = {t for t in self._timers if t.is_alive() and t is not threading.current_thread()}
            qos = self._subs.get(topic)
        if qos is not None and self._connected.is_set() and not self._stopping:
            self._subscribe_now(topic, qos)
