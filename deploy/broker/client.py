"""Host-side MQTT session: connect with a timeout, publish through a bounded QoS1 window, read retained state.

One :class:`MqttSession` wraps one paho client (built by :func:`agent.mqttclient.build_client`: TLS,
TCP_NODELAY, MQTT v5 or 3.1.1) running its network loop in a background thread.

* Several broker endpoints (``BrokerOptions.endpoints``, ``--broker a:1883,b:1883``): ``connect()`` tries
  them in order until one accepts (a refusal of the credentials stops at once: the nodes of one cluster
  share them); a connection lost later is re-made by paho to the next endpoint, with backoff.

* ``connect()`` waits for the CONNACK with a timeout. A refused connection (bad credentials, not
  authorised) is fatal and raised as :class:`BrokerError`; the client is never considered connected
  after a refused CONNACK. Failures name their cause (``agent.connectivity``: unknown host, refused,
  TLS expected, TLS handshake failed, not authorized, timeout, ...) and what to do; an unknown host or
  a refused port fails at once, a plain client at a TLS port within about 2 s.
* ``publish()`` keeps at most ``window`` QoS1 messages unacknowledged. Each slot is released in
  ``on_publish`` (paho's network thread), so memory stays flat however many chunks are sent; the
  caller blocks for a free slot, at most ``ack_timeout_s`` without any progress. A v5 PUBACK with a
  reason code >= 0x80 (0x87: refused by the ACL) is a :class:`PublishError` naming the topic; 0x10
  ("no matching subscribers") is a success.
* ``flush()`` waits for every outstanding acknowledgement and raises the first refusal.
* ``collect_retained()`` subscribes to a few filters and gathers what the broker holds retained, until
  no new message arrived for ``quiet_s``. Only topics matching those filters are kept (amqtt, the
  demo's fallback broker, may deliver retained messages matching other clients' subscriptions).
  Never use it with a wildcard over hundreds of chunks: mosquitto silently drops retained messages
  past its queue limit; subscribe per topic instead.
* ``watch()`` keeps a live subscription (re-issued in every ``on_connect``) and queues what matches
  its filters, for commands that wait for an answer (events) or follow a rollout (statuses). A
  watch is bounded (``max_queued``); past that the oldest messages are dropped and counted.

:class:`Bus` is the small interface the controllers (assign, rollout, cmd) use; ``MqttSession`` is the
real one, tests pass a fake.

Callbacks never block: they only record results under a lock and notify a condition.
"""

from __future__ import annotations

import collections
import ssl
import threading
import time
import uuid
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any, Literal
from typing import Protocol as _Interface

import paho.mqtt.client as paho
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

from agent import wire
from agent.connectivity import (
    PROBE_TIMEOUT_S,
    Cause,
    Diagnosis,
    classify_connack,
    classify_error,
    close_failed_socket,
    diagnose,
    resolve,
    tls_context,
)
from agent.mqttclient import ClientSpec, Endpoint, FleetClient, build_client, endpoints_or_default
from deploy.errors import BrokerError, PublishError

Protocol = Literal["v5", "v311"]

_REFUSALS = {
    0x84: "unsupported protocol version (try --mqtt v311)",
    0x85: "client identifier not valid",
    0x86: "bad user name or password",
    0x87: "not authorized",
    0x88: "server unavailable",
    0x8A: "banned",
}
# A plain client still waiting for its CONNACK after this long asks the port whether it speaks TLS.
_TLS_SUSPICION_S = 2.0


@dataclass(frozen=True)
class BrokerOptions:
    """Where and how to connect. ``password`` is the secret itself (the CLI reads it from a file)."""

    host: str = "127.0.0.1"
    port: int = 1883
    username: str | None = None
    password: str | None = field(default=None, repr=False)
    tls_ca: Path | None = None
    tls_cert: Path | None = None
    tls_key: Path | None = None
    protocol: Protocol = "v5"
    namespace: str = wire.DEFAULT_NAMESPACE
    client_id: str | None = None
    connect_timeout_s: float = 10.0
    keepalive_s: int = 60
    endpoints: tuple[Endpoint, ...] = ()  # several nodes (tried in turn); empty: host:port

    @property
    def topics(self) -> wire.Topics:
        return wire.Topics(self.namespace)

    @property
    def all_endpoints(self) -> tuple[Endpoint, ...]:
        return endpoints_or_default(self.endpoints, self.host, self.port)

    def client_spec(self, client_id: str, **extra: Any) -> ClientSpec:
        """The shared factory's spec for these options (``extra``: persistent_session, manual_ack)."""
        return ClientSpec(
            client_id=client_id,
            endpoints=self.all_endpoints,
            protocol=self.protocol,
            username=self.username,
            password=self.password,
            ca_file=self.tls_ca,
            cert_file=self.tls_cert,
            key_file=self.tls_key,
            connect_timeout_s=self.connect_timeout_s,
            **extra,
        )


class _Unreachable(BrokerError):
    """One endpoint did not answer (the next one may); a refused login is a plain BrokerError."""


def _code(reason: ReasonCode | int | None) -> int:
    if reason is None:
        return 0
    if isinstance(reason, int):
        return reason
    return int(reason.value)


class Watch:
    """Messages matching some filters, queued as they arrive (thread-safe; filled by the network thread)."""

    def __init__(self, filters: Iterable[str], max_queued: int = 10_000) -> None:
        self.filters = list(dict.fromkeys(filters))
        self._cond = threading.Condition()
        self._queue: collections.deque[tuple[str, bytes]] = collections.deque()
        self._max = max_queued
        self.dropped = 0
        self.closed = False
        self._on_close: list[Any] = []

    def matches(self, topic: str) -> bool:
        return any(paho.topic_matches_sub(f, topic) for f in self.filters)

    def put(self, topic: str, payload: bytes) -> None:
        with self._cond:
            if len(self._queue) >= self._max:
                self._queue.popleft()
                self.dropped += 1
            self._queue.append((topic, payload))
            self._cond.notify_all()

    def drain(self) -> list[tuple[str, bytes]]:
        """Everything queued so far (never blocks)."""
        with self._cond:
            out = list(self._queue)
            self._queue.clear()
        return out

    def wait(self, timeout_s: float) -> bool:
        """Block until a message is queued or ``timeout_s`` passed; True if one is queued."""
        deadline = time.monotonic() + max(0.0, timeout_s)
        with self._cond:
            while not self._queue and not self.closed:
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                self._cond.wait(left)
            return bool(self._queue)

    def close(self) -> None:
        with self._cond:
            if self.closed:
                return
            self.closed = True
            self._cond.notify_all()
        for callback in self._on_close:
            callback(self)

    def __enter__(self) -> Watch:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class Bus(_Interface):
    """What the host controllers need from a broker connection (MqttSession, or a fake in tests)."""

    @property
    def topics(self) -> wire.Topics: ...

    def publish(self, topic: str, payload: bytes, retain: bool = False, qos: int = 1) -> None: ...

    def flush(self, timeout_s: float | None = None) -> None: ...

    def collect_retained(
        self, filters: Iterable[str], quiet_s: float = 0.3, timeout_s: float = 10.0
    ) -> dict[str, bytes]: ...

    def watch(self, filters: Iterable[str], timeout_s: float = 10.0) -> Watch: ...


class MqttSession:
    """A connected paho client with a bounded publish window. Use as a context manager."""

    def __init__(self, options: BrokerOptions, window: int = 32, ack_timeout_s: float = 30.0) -> None:
        if window < 1:
            raise ValueError("window must be >= 1")
        self.options = options
        self._topics = options.topics
        self.window = window
        self.ack_timeout_s = ack_timeout_s
        self._cond = threading.Condition()
        self._pending: dict[int, str] = {}  # mid -> topic, awaiting PUBACK
        self._early: dict[int, int] = {}  # mid -> reason code, acked before we registered it
        self._failures: list[PublishError] = []
        self._connack: int | None = None
        self._connected = False
        self._disconnect_reason: str | None = None
        self._collector: dict[str, bytes] | None = None
        self._collect_filters: list[str] = []
        self._last_message = 0.0
        self._subacked: set[int] = set()
        self._watches: list[Watch] = []
        self.published = 0
        self.published_bytes = 0
        client_id = options.client_id or f"edgefleet-host-{uuid.uuid4().hex[:12]}"
        try:
            self._client: FleetClient = build_client(options.client_spec(client_id))
        except (OSError, ssl.SSLError, ValueError) as err:
            raise BrokerError(f"cannot load TLS files: {err}") from err
        self._client.max_inflight_messages_set(window)
        self._client.on_connect = self._on_connect
        self._client.on_disconnect = self._on_disconnect
        self._client.on_publish = self._on_publish
        self._client.on_message = self._on_message
        self._client.on_subscribe = self._on_subscribe

    @property
    def topics(self) -> wire.Topics:
        return self._topics

    @property
    def address(self) -> str:
        return self._client.endpoint.address

    # ---------------------------------------------------------------- connection

    def connect(self) -> MqttSession:
        """Connect to the first endpoint that accepts; BrokerError naming each one's failure otherwise."""
        failures: list[str] = []
        for _ in self._client.rotation.endpoints:
            try:
                self._connect_next()
            except _Unreachable as err:
                failures.append(str(err))
            else:
                return self
        if len(failures) == 1:
            raise BrokerError(failures[0])
        raise BrokerError("no broker endpoint accepted the connection:\n  " + "\n  ".join(failures))

    def _connect_next(self) -> None:
        opts = self.options
        with self._cond:
            self._connack, self._disconnect_reason = None, None
        try:
            ep = self._client.connect_next(keepalive=opts.keepalive_s)  # resolve, TCP, TLS
        except OSError as err:  # ssl.SSLError and socket.gaierror included
            close_failed_socket(err)
            ep = self._client.endpoint
            found = resolve(classify_error(err, ep.host, ep.port, tls=self._tls), self._probe_context())
            raise _Unreachable(found.describe("host")) from err
        except ValueError as err:
            raise _Unreachable(f"cannot connect to {self.address}: {err}") from err
        self._client.loop_start()
        start = time.monotonic()
        deadline = start + opts.connect_timeout_s
        suspicious_at = start + _TLS_SUSPICION_S if not self._tls else float("inf")
        probed: Diagnosis | None = None
        while True:
            with self._cond:  # until a CONNACK, a close, the deadline, or time to suspect TLS
                while self._connack is None and self._disconnect_reason is None:
                    left = min(deadline, suspicious_at) - time.monotonic()
                    if left <= 0:
                        break
                    self._cond.wait(left)
                connack, closed = self._connack, self._disconnect_reason
            now = time.monotonic()
            if connack is not None or closed is not None or now >= deadline:
                break
            # A TLS listener usually resets a plain client at once; this catches one that does not.
            suspicious_at = float("inf")
            probed = diagnose(ep.host, ep.port, timeout=min(PROBE_TIMEOUT_S, deadline - now))
            if probed is not None and probed.cause is Cause.TLS_EXPECTED:
                break
            probed = None
        if connack is None:
            self._shutdown()
            if probed is not None:
                found = probed
            elif closed is not None:
                found = Diagnosis(Cause.CLOSED, ep.host, ep.port, f"before any CONNACK ({closed})")
                found = resolve(found, self._probe_context())
            else:
                found = Diagnosis(
                    Cause.TIMEOUT,
                    ep.host,
                    ep.port,
                    f"no answer (CONNACK) within {opts.connect_timeout_s:g} s",
                )
            raise _Unreachable(found.describe("host"))
        if connack != 0:
            self._shutdown()
            text = _REFUSALS.get(connack, f"reason code 0x{connack:02x}")
            if connack in (0x04, 0x05):  # MQTT 3.1.1 codes
                text = "bad user name or password" if connack == 0x04 else "not authorized"
            refused = classify_connack(connack, ep.host, ep.port)
            advice = f"; {refused.advice('host')}" if refused is not None else ""
            if refused is not None and refused.cause is Cause.NOT_AUTHORIZED:
                raise BrokerError(f"broker refused: {text} ({self.address}){advice}")
            raise _Unreachable(f"broker refused: {text} ({self.address}){advice}")

    @property
    def _tls(self) -> bool:
        return bool(self.options.tls_ca or self.options.tls_cert)

    def _probe_context(self) -> ssl.SSLContext | None:
        """The TLS settings of this session, for a diagnosis probe (None: plain MQTT)."""
        if not self._tls:
            return None
        o = self.options
        return tls_context(o.tls_ca, o.tls_cert, o.tls_key)

    def close(self) -> None:
        self._shutdown()

    def _shutdown(self) -> None:
        try:
            self._client.disconnect()
        finally:
            self._client.loop_stop()

    def __enter__(self) -> MqttSession:
        return self.connect()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    # ---------------------------------------------------------------- callbacks (network thread; never block)

    def _on_connect(
        self, client: paho.Client, userdata: Any, flags: Any, reason: ReasonCode, props: Properties | None
    ) -> None:
        code = _code(reason)
        with self._cond:
            self._connack = code
            self._connected = code == 0
            self._cond.notify_all()
        if code != 0:
            # A refusal is fatal: stop paho from retrying with the same credentials.
            client.disconnect()
            return
        with self._cond:
            filters = sorted({f for w in self._watches for f in w.filters})
        if filters:  # subscriptions do not survive a reconnect with a clean session: re-issue them
            client.subscribe([(f, 1) for f in filters])

    def _on_disconnect(
        self, client: paho.Client, userdata: Any, flags: Any, reason: ReasonCode, props: Properties | None
    ) -> None:
        with self._cond:
            self._connected = False
            self._disconnect_reason = str(reason)
            self._cond.notify_all()

    def _on_publish(
        self, client: paho.Client, userdata: Any, mid: int, reason: ReasonCode, props: Properties | None
    ) -> None:
        code = _code(reason)
        with self._cond:
            topic = self._pending.pop(mid, None)
            if topic is None:
                self._early[mid] = code
            elif code >= 0x80:
                self._failures.append(_refusal(topic, reason))
            self._cond.notify_all()

    def _on_subscribe(
        self,
        client: paho.Client,
        userdata: Any,
        mid: int,
        reasons: list[ReasonCode],
        props: Properties | None,
    ) -> None:
        with self._cond:
            self._subacked.add(mid)
            self._cond.notify_all()

    def _on_message(self, client: paho.Client, userdata: Any, msg: paho.MQTTMessage) -> None:
        with self._cond:
            if self._collector is not None and any(
                paho.topic_matches_sub(f, msg.topic) for f in self._collect_filters
            ):
                # only topics we asked for: amqtt can deliver other clients' retained messages
                self._collector[msg.topic] = bytes(msg.payload)
                self._last_message = time.monotonic()
                self._cond.notify_all()
            watches = [w for w in self._watches if w.matches(msg.topic)]
        for w in watches:
            w.put(msg.topic, bytes(msg.payload))

    # ---------------------------------------------------------------- publishing

    def publish(self, topic: str, payload: bytes, retain: bool = False, qos: int = 1) -> None:
        """Publish once a window slot is free; refusals surface here or in :meth:`flush`."""
        self._wait_for_slot(self.window - 1)
        info = self._client.publish(topic, payload, qos=qos, retain=retain)
        if info.rc not in (paho.MQTT_ERR_SUCCESS, paho.MQTT_ERR_NO_CONN):
            # NO_CONN: paho queues QoS>0 and resends after reconnecting; the ack timeout still applies.
            raise PublishError(f"cannot publish to {topic}: {paho.error_string(info.rc)}")
        self.published += 1
        self.published_bytes += len(payload)
        if qos == 0:
            return
        with self._cond:
            code = self._early.pop(info.mid, None)
            if code is None:
                self._pending[info.mid] = topic
            elif code >= 0x80:
                self._failures.append(_refusal(topic, code))
        self._raise_failures()

    def flush(self, timeout_s: float | None = None) -> None:
        """Wait until every publish is acknowledged; raise PublishError on refusal or timeout."""
        self._wait_for_slot(0, timeout_s)

    def _wait_for_slot(self, max_pending: int, timeout_s: float | None = None) -> None:
        """Block until at most ``max_pending`` publishes await an ack; timeout counts from the last ack."""
        timeout_s = self.ack_timeout_s if timeout_s is None else timeout_s
        with self._cond:
            deadline = time.monotonic() + timeout_s
            seen = len(self._pending)
            while len(self._pending) > max_pending and not self._failures:
                if len(self._pending) < seen:  # progress: restart the clock
                    seen = len(self._pending)
                    deadline = time.monotonic() + timeout_s
                left = deadline - time.monotonic()
                if left <= 0:
                    topics = sorted(self._pending.values())
                    state = "connected" if self._connected else f"disconnected ({self._disconnect_reason})"
                    raise PublishError(
                        f"broker {self.address} did not acknowledge {len(topics)} publish(es) within "
                        f"{timeout_s:g} s ({state}); first: {topics[0]}"
                    )
                self._cond.wait(min(left, 0.5))
        self._raise_failures()

    def _raise_failures(self) -> None:
        with self._cond:
            if not self._failures:
                return
            first = self._failures[0]
            self._failures.clear()
        raise first

    # ---------------------------------------------------------------- reading retained state

    def collect_retained(
        self, filters: Iterable[str], quiet_s: float = 0.3, timeout_s: float = 10.0
    ) -> dict[str, bytes]:
        """Subscribe to ``filters`` (QoS1) and return {topic: payload} of what arrives until quiet.

        Empty payloads (a deleted retained message) are dropped. Unsubscribes before returning.
        """
        filters = list(dict.fromkeys(filters))
        if not filters:
            return {}
        collected: dict[str, bytes] = {}
        with self._cond:
            if self._collector is not None:
                raise RuntimeError("collect_retained is not re-entrant")
            self._collector = collected
            self._collect_filters = filters
            self._last_message = time.monotonic()
        try:
            deadline = time.monotonic() + timeout_s
            self._subscribe_and_wait(filters, timeout_s)
            with self._cond:
                self._last_message = time.monotonic()
                while True:
                    now = time.monotonic()
                    quiet_until = self._last_message + quiet_s
                    if now >= quiet_until or now >= deadline:
                        break
                    self._cond.wait(min(quiet_until, deadline) - now)
        finally:
            with self._cond:
                self._collector = None
                self._collect_filters = []
                watched = {f for w in self._watches for f in w.filters}
            gone = [f for f in filters if f not in watched]  # a live watch keeps its subscription
            if gone:
                self._client.unsubscribe(gone)
        return {t: p for t, p in collected.items() if p}

    # ---------------------------------------------------------------- live subscriptions

    def watch(self, filters: Iterable[str], timeout_s: float = 10.0) -> Watch:
        """Subscribe (QoS1) to ``filters`` and queue what matches until the watch is closed.

        Returns once the broker acknowledged the subscription, so nothing published after this call
        returns is missed. Retained messages matching the filters arrive first.
        """
        w = Watch(filters)
        if not w.filters:
            return w
        with self._cond:
            self._watches.append(w)
        w._on_close.append(self._unwatch)
        try:
            self._subscribe_and_wait(w.filters, timeout_s)
        except BaseException:
            w.close()
            raise
        return w

    def _subscribe_and_wait(self, filters: list[str], timeout_s: float) -> None:
        result, mid = self._client.subscribe([(f, 1) for f in filters])
        if result != paho.MQTT_ERR_SUCCESS or mid is None:
            raise BrokerError(f"cannot subscribe on {self.address}: {paho.error_string(result)}")
        deadline = time.monotonic() + timeout_s
        with self._cond:
            while mid not in self._subacked:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise BrokerError(f"broker {self.address} did not acknowledge a subscription in time")
                self._cond.wait(left)
            self._subacked.discard(mid)

    def _unwatch(self, w: Watch) -> None:
        with self._cond:
            if w in self._watches:
                self._watches.remove(w)
            still = {f for other in self._watches for f in other.filters}
        gone = [f for f in w.filters if f not in still]
        if gone and self._connected:
            self._client.unsubscribe(gone)


def _refusal(topic: str, reason: ReasonCode | int) -> PublishError:
    code = _code(reason)
    text = str(reason) if isinstance(reason, ReasonCode) else f"reason code 0x{code:02x}"
    hint = " (check the broker ACL for this user)" if code == 0x87 else ""
    return PublishError(f"broker refused publish to {topic}: {text} (0x{code:02x}){hint}")


def session_for(options: BrokerOptions, **kwargs: Any) -> MqttSession:
    """A connected session (convenience for callers that do not use ``with``)."""
    return MqttSession(options, **kwargs).connect()
