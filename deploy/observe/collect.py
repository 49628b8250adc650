"""``edgefleet collect``: a long-running collector of statuses, reports, events (and sampled telemetry),
and of the manifests and assignments the controller published, so that ``select``/``assign``/``fleet``
``--db`` read the whole fleet from the store (a broker's retained burst is cut past its queue limit).

::

    edgefleet collect --db /var/lib/edgefleet-collector/fleet.db [--name host1] [--share collectors]
                      [--telemetry] [--duration S]
    edgefleet collect --db postgresql://edgefleet@db.lan:5432/fleet --name host1 --share collectors

How it loses nothing:

* MQTT v5 persistent session: a fixed client id ``edgefleet-collector-<name>``, ``clean_start=False``
  on every connect (not paho's default ``MQTT_CLEAN_START_FIRST_ONLY``, which wipes the session when the
  process restarts) and a session expiry interval, so the broker queues QoS1 events while we are down.
  Reports and statuses are retained too, so even an expired session catches up on the latest ones.
* Manual acknowledgement: paho's callback only puts the message on a bounded queue; the single writer
  thread commits a batch to the store (SQLite or PostgreSQL) and only then sends the PUBACKs, and only
  for messages of the connection still up (an earlier connection's are redelivered on this one).
  While the database is unreachable (PostgreSQL restarting) the batch is retried with backoff over a
  new connection, never dropped; meanwhile the full queue holds paho back. A crash between receive and
  commit means the broker redelivers; the store is idempotent (see :mod:`deploy.observe.store`), so a
  redelivery never creates a second row. The client's Receive Maximum is kept below the queue size;
  mosquitto 2.0.11 does not always honour it under load, so a full queue makes paho's callback wait
  for the writer (backpressure) rather than drop the message (which, unacknowledged, would only come
  back in the next session). Only when stopping is a message left unacknowledged (``overflow``).
* Keep it running while the devices publish: it then receives every message live. When it subscribes,
  the retained copies it catches up on come in one burst, which mosquitto cuts past
  ``max_queued_messages`` like any other subscriber's (the rest arrives as devices publish again).
* ``--share GROUP`` subscribes through ``$share/GROUP/...`` so several collectors split the load
  (MQTT v5 / mosquitto ≥ 2.0). Shared subscriptions receive no retained messages (MQTT v5 §4.8.2),
  so at least one collector of a fleet should run without ``--share`` or rely on its session.
* A subscription the broker refuses (SUBACK >= 0x80) is asked for again every second, at most 30 times
  per connection: NATS refuses new QoS1 subscriptions for a while after one of its nodes died.
* Malformed payloads (bad JSON, failing the schema, topic and payload naming different devices) are
  counted, logged (rate limited) and recorded in the ``malformed`` table, and acknowledged: a
  redelivery would not make them valid.

Stopping: SIGTERM/SIGINT set a stop event; the collector stops enqueuing, lets the writer commit and
acknowledge what it holds, disconnects (the session stays on the broker) and exits 0. Every wait has
a timeout. Bad credentials are fatal (exit 2); any other connection loss is retried with backoff.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import queue
import signal
import ssl
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any

import paho.mqtt.client as paho
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

from agent import wire
from agent.mqttclient import FleetClient, build_client
from deploy.broker.client import BrokerOptions
from deploy.errors import BrokerError, DeployError
from deploy.observe.store import FleetStore, ReportRow, StoreError, StoreUnavailable, parse_db_url

log = logging.getLogger("edgefleet.collect")

_FATAL_CONNACK = {0x04, 0x05, 0x86, 0x87, 0x8A, 0x8C}  # bad credentials / not authorised / banned
_MALFORMED_LOG_FIRST = 10
_MALFORMED_LOG_EVERY = 100
_TOPIC_CACHE_MAX = 100_000  # parsed topics kept by the writer (cleared when full)
# A refused subscription is retried (as the agent does): NATS refuses new QoS1 subscriptions (SUBACK 0x80)
# for a while after a node died, and a collector that gave up would store nothing on those topics.
_SUB_RETRY_S = 1.0
_SUB_RETRIES = 30  # per connection


@dataclass(frozen=True)
class CollectorOptions:
    name: str = "main"
    share: str | None = None
    telemetry: bool = False
    telemetry_every_s: float = 60.0
    telemetry_retention_s: float = 7 * 24 * 3600
    session_expiry_s: int = 7 * 24 * 3600
    queue_size: int = 2000
    receive_maximum: int = 500
    batch_size: int = 500
    prune_every_s: float = 300.0
    checkpoint_every_s: float = 1.0  # SQLite WAL checkpoint (fsync) at most this long after a commit
    # paho's backoff doubles over consecutive failures, across a cluster's nodes too: after a NATS node
    # died, attempts at nodes still recovering failed and the delays added up (one failover took 43 s
    # with a 30 s cap, tests/test_nats_collector.py). One client: a short cap costs the broker nothing.
    reconnect_max_s: int = 5

    def __post_init__(self) -> None:
        wire.check_id(self.name, "collector name")
        if self.share is not None:
            wire.check_id(self.share, "shared subscription group")
        if not 1 <= self.receive_maximum < self.queue_size:
            raise ValueError("receive_maximum must be >= 1 and below queue_size (no queue overflow)")

    @property
    def client_id(self) -> str:
        return f"edgefleet-collector-{self.name}"


@dataclass
class CollectorStats:
    received: int = 0
    stored: int = 0
    duplicates: int = 0
    malformed: int = 0
    cleared: int = 0
    overflow: int = 0
    store_errors: int = 0
    connects: int = 0
    by_kind: dict[str, int] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in self.__dataclass_fields__}


@dataclass(frozen=True, slots=True)
class _Inbound:
    topic: str
    payload: bytes
    mid: int
    qos: int
    received_at: float
    connection: int  # which broker connection delivered it: a PUBACK is valid on that one only


def subscriptions(topics: wire.Topics, options: CollectorOptions) -> list[tuple[str, int]]:
    """The (filter, QoS) list the collector subscribes to, shared if ``options.share`` is set."""
    filters = [(topics.all_statuses(), 1), (topics.all_reports(), 1), (topics.all_events(), 1)]
    # What the controller published, so that select/assign/fleet --db decide from the store alone.
    filters += [(topics.all_manifests(), 1), (f"{topics.ns}/devices/+/assign/+", 1)]
    if options.telemetry:
        filters.append((topics.all_telemetry(), 0))
    if options.share:
        filters = [(f"$share/{options.share}/{f}", q) for f, q in filters]
    return filters


class Collector:
    """One paho client (network thread) + one SQLite writer thread. ``run()`` blocks until stopped."""

    def __init__(
        self,
        broker: BrokerOptions,
        db_path: Path | str,  # a path, sqlite:///PATH or postgresql://... (deploy.observe.store_sql)
        options: CollectorOptions | None = None,
        stop: threading.Event | None = None,
    ) -> None:
        self.broker = broker
        self.options = options or CollectorOptions()
        self.db_path = db_path
        self.topics = broker.topics
        self.stop_event = stop or threading.Event()
        self.stats = CollectorStats()
        self.fatal: str | None = None
        self._malformed_seen = 0  # writer thread only
        self._topic_cache: dict[str, wire.ParsedTopic] = {}  # writer thread only
        self._queue: queue.Queue[_Inbound] = queue.Queue(maxsize=self.options.queue_size)
        self._accepting = threading.Event()
        self._accepting.set()
        self._subscribed = threading.Event()
        self._lock = threading.Lock()  # guards stats written from the network thread
        self._connection = 0  # incremented by every CONNACK (network thread; read by the writer)
        self._sub_lock = threading.Lock()  # held from SUBSCRIBE sent to its mid recorded
        self._sub_mids: dict[int, list[tuple[str, int]]] = {}  # SUBACK awaited: mid -> its filters
        self._sub_refused: list[tuple[str, int]] = []  # to subscribe again at _sub_retry_at
        self._sub_retry_at = 0.0
        self._sub_retries = 0  # this connection
        self._writer: threading.Thread | None = None
        self._writer_done = threading.Event()
        self._client = self._make_client()

    # ---------------------------------------------------------------- paho client

    def _make_client(self) -> FleetClient:
        # the shared factory: TLS, TCP_NODELAY, persistent session, endpoint rotation on reconnect
        spec = self.broker.client_spec(self.options.client_id, persistent_session=True, manual_ack=True)
        try:
            client = build_client(spec)
        except (OSError, ssl.SSLError, ValueError) as err:
            raise BrokerError(f"cannot load TLS files: {err}") from err
        client.reconnect_delay_set(1, self.options.reconnect_max_s)
        client.on_connect = self._on_connect
        client.on_disconnect = self._on_disconnect
        client.on_message = self._on_message
        client.on_subscribe = self._on_subscribe
        return client

    def _connect(self) -> None:
        opts = self.broker
        props: Properties | None = None
        kwargs: dict[str, Any] = {}
        if opts.protocol == "v5":
            props = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
            props.SessionExpiryInterval = self.options.session_expiry_s
            props.ReceiveMaximum = self.options.receive_maximum
            kwargs = {"clean_start": False, "properties": props}
        else:
            self._client.max_inflight_messages_set(self.options.receive_maximum)
        failures: list[str] = []
        for _ in self._client.rotation.endpoints:  # the first that answers; later losses: paho retries
            try:
                self._client.connect_next(keepalive=opts.keepalive_s, **kwargs)
            except (OSError, ssl.SSLError, ValueError) as err:
                failures.append(f"cannot connect to {self._client.endpoint}: {err}")
            else:
                return
        raise BrokerError("; ".join(failures))

    def _on_connect(
        self, client: paho.Client, userdata: Any, flags: Any, reason: ReasonCode, props: Properties | None
    ) -> None:
        code = int(reason.value) if isinstance(reason, ReasonCode) else int(reason)
        if code != 0:
            if code in _FATAL_CONNACK:
                self.fatal = f"broker refused the collector: {reason} (check user name, password, ACL)"
                self.stop_event.set()
                client.disconnect()
            else:
                log.warning("broker refused the connection (%s); retrying", reason)
            return
        with self._lock:
            self.stats.connects += 1
            self._connection += 1
        present = bool(getattr(flags, "session_present", False))
        # the endpoint is named: with several (a cluster) the operator sees which node took the session
        log.info(
            "connected as %s to %s (session present: %s)",
            self.options.client_id,
            self._client.endpoint.address,
            present,
        )
        # Resubscribe on every connect: harmless when the session kept them, required when it expired.
        with self._sub_lock:  # an earlier connection's SUBACKs will not come
            self._sub_mids.clear()
            self._sub_refused, self._sub_retries = [], 0
        self._subscribe(subscriptions(self.topics, self.options))

    def _subscribe(self, filters: list[tuple[str, int]]) -> None:
        with self._sub_lock:  # the SUBACK handler waits for the mid to be recorded
            result, mid = self._client.subscribe(filters)
            if result == paho.MQTT_ERR_SUCCESS and mid is not None:
                self._sub_mids[mid] = filters

    def _retry_subscriptions(self) -> None:
        """Main loop: subscribe again to what the broker refused, once its retry time has come."""
        with self._sub_lock:
            if not self._sub_refused or time.monotonic() < self._sub_retry_at:
                return
            filters, self._sub_refused = self._sub_refused, []
            self._sub_retries += 1
        self._subscribe(filters)

    def _on_subscribe(
        self,
        client: paho.Client,
        userdata: Any,
        mid: int,
        reasons: list[ReasonCode],
        props: Properties | None,
    ) -> None:
        with self._sub_lock:
            filters = self._sub_mids.pop(mid, [])
            refused = [(f, r) for f, r in zip(filters, reasons, strict=False) if int(r.value) >= 0x80]
            retry = bool(refused) and self._sub_retries < _SUB_RETRIES
            if retry:
                self._sub_refused += [f for f, _ in refused]
                self._sub_retry_at = time.monotonic() + _SUB_RETRY_S
        if refused:
            what = ", ".join(f"{f} ({r})" for (f, _), r in refused)
            if retry:
                log.warning("broker refused subscriptions %s; retrying in %g s", what, _SUB_RETRY_S)
            else:
                log.error(
                    "broker refused subscriptions %s %d times; giving up until reconnect (check the "
                    "collector's ACL)",
                    what,
                    _SUB_RETRIES,
                )
        self._subscribed.set()

    def _on_disconnect(
        self, client: paho.Client, userdata: Any, flags: Any, reason: ReasonCode, props: Properties | None
    ) -> None:
        if not self.stop_event.is_set():
            log.warning("disconnected from the broker (%s); paho reconnects with backoff", reason)

    def _on_message(self, client: paho.Client, userdata: Any, msg: paho.MQTTMessage) -> None:
        # Network thread: never block, never touch SQLite. Unacknowledged = redelivered later.
        if not self._accepting.is_set():
            return
        item = _Inbound(msg.topic, bytes(msg.payload), msg.mid, msg.qos, time.time(), self._connection)
        # Receive Maximum should keep the queue from filling, but mosquitto 2.0.11 was measured sending
        # more than that many unacknowledged messages (benches/fleet.py: 2,000 queued with a Receive
        # Maximum of 500). Dropping one here left it unacknowledged, i.e. lost until the next session,
        # so wait for the writer instead (backpressure through TCP); give up only when stopping.
        while True:
            try:
                self._queue.put(item, timeout=0.5)
            except queue.Full:
                if not self._accepting.is_set():
                    break
            else:
                return
        with self._lock:
            self.stats.overflow += 1
        log.warning(
            "stopping with a full queue; %s left unacknowledged (redelivered next session)", msg.topic
        )

    # ---------------------------------------------------------------- writer thread

    def _batches(self) -> Iterator[list[_Inbound]]:
        while True:
            try:
                first = self._queue.get(timeout=0.2)
            except queue.Empty:
                if self._writer_done.is_set():
                    return
                yield []
                continue
            batch = [first]
            while len(batch) < self.options.batch_size:
                try:
                    batch.append(self._queue.get_nowait())
                except queue.Empty:
                    break
            yield batch

    def _write_loop(self, store: FleetStore) -> None:
        next_prune = time.monotonic() + self.options.prune_every_s
        dirty_since: float | None = None  # first commit since the last WAL checkpoint
        for batch in self._batches():
            if dirty_since is not None and time.monotonic() - dirty_since >= self.options.checkpoint_every_s:
                with contextlib.suppress(StoreError):
                    store.checkpoint()
                dirty_since = None
            if time.monotonic() >= next_prune:
                with contextlib.suppress(StoreError), store.transaction():
                    store.prune()
                next_prune = time.monotonic() + self.options.prune_every_s
            if not batch:
                continue
            outcomes = self._commit(store, batch)
            if outcomes is None:
                return  # stopping: left unacknowledged, the broker redelivers them next session
            if dirty_since is None:
                dirty_since = time.monotonic()
            with self._lock:
                self.stats.received += len(batch)
                for outcome, kind, n in outcomes:
                    setattr(self.stats, outcome, getattr(self.stats, outcome) + n)
                    if kind is not None:
                        self.stats.by_kind[kind] = self.stats.by_kind.get(kind, 0) + n
            with self._lock:
                current = self._connection
            for item in batch:
                # A message from an earlier connection is redelivered on this one with its packet id,
                # and that copy is acknowledged; a PUBACK for the old copy could acknowledge whatever
                # the broker reuses that packet id for next.
                if item.qos > 0 and item.connection == current:
                    self._client.ack(item.mid, item.qos)

    def _commit(self, store: FleetStore, batch: list[_Inbound]) -> list[tuple[str, str | None, int]] | None:
        """Store ``batch`` in one transaction; its outcomes, or None when stopped before it committed.

        The batch is acknowledged only once committed: while the database is away (locked SQLite,
        PostgreSQL restarting) it is retried with backoff over a new connection, and never dropped. An
        error that is not the connection's (a value the database refuses) would fail the batch on every
        retry and stall the collector: the batch is then stored one message per transaction, and the
        message that fails alone is recorded as malformed (and acknowledged: it would never store).
        """
        delay = 0.1
        while True:
            try:
                with store.transaction():
                    return self._ingest_batch(store, batch)
            except StoreUnavailable as err:
                with self._lock:
                    self.stats.store_errors += 1
                log.warning("cannot write %d message(s): %s; retrying", len(batch), err)
            except StoreError as err:
                with self._lock:
                    self.stats.store_errors += 1
                log.warning("cannot write %d message(s): %s; storing them one by one", len(batch), err)
                try:
                    return self._commit_one_by_one(store, batch)
                except StoreUnavailable as lost:  # the connection went meanwhile: the whole batch again
                    log.warning("cannot write %d message(s): %s; retrying", len(batch), lost)
            if self.stop_event.wait(delay):
                return None
            delay = min(delay * 2, 5.0)

    def _commit_one_by_one(
        self, store: FleetStore, batch: list[_Inbound]
    ) -> list[tuple[str, str | None, int]]:
        outcomes: list[tuple[str, str | None, int]] = []
        for item in batch:
            try:
                with store.transaction():
                    outcomes += self._ingest_batch(store, [item])
            except StoreUnavailable:
                raise
            except StoreError as err:
                log.warning("cannot store the message on %s: %s; recorded as malformed", item.topic, err)
                try:
                    with store.transaction():
                        store.record_malformed(
                            item.topic, f"refused by the database: {err}", len(item.payload)
                        )
                except StoreUnavailable:
                    raise
                except StoreError as also:
                    log.warning("cannot record it either (%s); acknowledged", also)
                outcomes.append(("malformed", None, 1))
        return outcomes

    def _ingest_batch(self, store: FleetStore, batch: list[_Inbound]) -> list[tuple[str, str | None, int]]:
        """Store a batch in order; returns (stats field, topic kind, how many) triples.

        The hot path, valid reports, is parsed once (the raw payload is stored as received) and written
        in a few ``executemany`` statements per run of consecutive reports. Anything else first flushes
        the run, then goes through :meth:`_ingest` one by one, so every table sees the writes in the
        order of the batch, as if each message had been stored on its own.
        """
        outcomes: list[tuple[str, str | None, int]] = []
        run: list[ReportRow] = []  # plain values: no parsed model outlives its message

        def flush() -> None:
            if run:
                replaced = store.ingest_reports(run)
                kind = wire.TopicKind.REPORT.value
                outcomes.append(("stored", kind, replaced))
                outcomes.append(("duplicates", kind, len(run) - replaced))
                run.clear()

        for item in batch:
            report = self._valid_report(item)
            if report is not None:
                run.append(ReportRow.of(report, item.received_at, item.payload))
                continue
            flush()
            outcome, kind = self._ingest(store, item)
            outcomes.append((outcome, kind, 1))
        flush()
        return outcomes

    def _topic(self, topic: str) -> wire.ParsedTopic:
        """``self.topics.parse`` with a cache of the topics seen (a fleet has a bounded set of them)."""
        parsed = self._topic_cache.get(topic)
        if parsed is None:
            parsed = self.topics.parse(topic)  # raises for a bad topic: never cached
            if len(self._topic_cache) >= _TOPIC_CACHE_MAX:
                self._topic_cache.clear()
            self._topic_cache[topic] = parsed
        return parsed

    def _valid_report(self, item: _Inbound) -> wire.Report | None:
        """The report ``item`` carries if it is a valid one for its topic, else None (no side effect)."""
        if not item.payload:
            return None
        try:
            parsed = self._topic(item.topic)
            if parsed.kind is not wire.TopicKind.REPORT:
                return None
            return wire.decode_inbound(self.topics, item.topic, item.payload, parsed=parsed).as_(wire.Report)
        except wire.WireError:
            return None

    def _ingest(self, store: FleetStore, item: _Inbound) -> tuple[str, str | None]:
        """Store one message; returns (the stats field it counts under, its topic kind)."""
        if not item.payload:
            with contextlib.suppress(wire.WireError):  # a deleted retained message
                store.clear_retained(self._topic(item.topic))
            return "cleared", None
        kind: wire.TopicKind | None = None
        try:
            parsed = self._topic(item.topic)
            kind = parsed.kind
            # wire's one decoder: the typed message of the topic, its device/model checked against it
            msg = wire.decode_inbound(self.topics, item.topic, item.payload, parsed=parsed).message
            if isinstance(msg, wire.Manifest):
                new = store.ingest_manifest(msg, item.received_at, raw=item.payload)
            elif isinstance(msg, wire.Assignment):
                new = store.ingest_assignment(msg, item.received_at, raw=item.payload)
            elif isinstance(msg, wire.Status):
                new = store.ingest_status(msg, item.received_at)
            elif isinstance(msg, wire.Report):
                new = store.ingest_report(msg, item.received_at, raw=item.payload)
            elif isinstance(msg, wire.Event):
                new = store.ingest_event(msg, item.received_at, raw=item.payload)
            elif isinstance(msg, wire.Telemetry):
                new = store.ingest_telemetry(msg, item.received_at)
            else:
                raise wire.PayloadError(f"the collector does not store {kind.value} topics")
        except wire.WireError as err:
            self._malformed_seen += 1
            n = self._malformed_seen
            if n <= _MALFORMED_LOG_FIRST or n % _MALFORMED_LOG_EVERY == 0:
                log.warning("malformed message #%d on %s: %s", n, item.topic, str(err)[:300])
            store.record_malformed(item.topic, str(err), len(item.payload), item.received_at)
            return "malformed", kind.value if kind else None
        return ("stored" if new else "duplicates"), kind.value

    # ---------------------------------------------------------------- lifecycle

    def run(self, duration_s: float | None = None, ready: threading.Event | None = None) -> int:
        """Collect until the stop event (or ``duration_s``); returns an exit code (0, or 2 if fatal)."""
        try:
            store = FleetStore(
                self.db_path,
                telemetry_every_s=self.options.telemetry_every_s,
                telemetry_retention_s=self.options.telemetry_retention_s,
                namespace=self.topics.ns,  # a store of another namespace is refused
            )
        except StoreError as err:
            self.fatal = str(err)
            return 2
        self._writer = threading.Thread(
            target=self._write_loop, args=(store,), name="edgefleet-collector-writer", daemon=True
        )
        self._writer.start()
        started = time.monotonic()
        try:
            self._connect()
            self._client.loop_start()
            if ready is not None:
                self._subscribed.wait(self.broker.connect_timeout_s)
                ready.set()
            deadline = None if duration_s is None else started + duration_s
            while not self.stop_event.is_set():
                self._retry_subscriptions()
                left = 1.0 if deadline is None else min(1.0, deadline - time.monotonic())
                if left <= 0 or self.stop_event.wait(min(left, _SUB_RETRY_S / 2)):
                    break
        except BrokerError as err:
            self.fatal = str(err)
        finally:
            self._shutdown(store)
        elapsed = time.monotonic() - started
        s = self.stats
        log.info(
            "collector stopped after %.1f s: received %d, stored %d, duplicates %d, malformed %d",
            elapsed,
            s.received,
            s.stored,
            s.duplicates,
            s.malformed,
        )
        return 2 if self.fatal else 0

    def stop(self) -> None:
        self.stop_event.set()

    def _shutdown(self, store: FleetStore, timeout_s: float = 10.0) -> None:
        self.stop_event.set()
        self._accepting.clear()  # what arrives now stays unacknowledged and is redelivered next time
        deadline = time.monotonic() + timeout_s
        while not self._queue.empty() and time.monotonic() < deadline:
            time.sleep(0.02)
        self._writer_done.set()
        if self._writer is not None:
            self._writer.join(max(0.1, deadline - time.monotonic()))
        with contextlib.suppress(Exception):
            self._client.disconnect()  # PUBACKs queued by the writer go out before the DISCONNECT
        self._client.loop_stop()
        if self._writer is None or not self._writer.is_alive():
            store.close()


# ---------------------------------------------------------------- CLI


def broker_options_from_args(
    args: argparse.Namespace,
    client_id: str | None = None,
    announce: Callable[[str], None] | None = None,
) -> BrokerOptions:
    """BrokerOptions from the host config file (deploy.hostconfig) and the broker flags that were given."""
    from deploy.hostconfig import resolve_broker

    resolved = resolve_broker(args, client_id=client_id)
    if announce is not None:
        announce(resolved.describe())
    return resolved.options


@contextlib.contextmanager
def _signals_set(stop: threading.Event) -> Iterator[None]:
    """SIGTERM/SIGINT set ``stop`` while inside (main thread only; elsewhere a no-op)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum: int, frame: FrameType | None) -> None:
        stop.set()

    previous: dict[signal.Signals, Callable[[int, FrameType | None], Any] | int | None] = {}
    for sig in (signal.SIGTERM, signal.SIGINT):
        previous[sig] = signal.signal(sig, handler)
    try:
        yield
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


def _cmd_collect(args: argparse.Namespace) -> int:
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        options = CollectorOptions(
            name=args.name,
            share=args.share,
            telemetry=args.telemetry,
            telemetry_every_s=args.telemetry_every,
            telemetry_retention_s=args.telemetry_retention_days * 86400,
            session_expiry_s=args.session_expiry,
        )
        where = parse_db_url(args.db).display  # an unsupported URL is refused before connecting
        broker = broker_options_from_args(args, client_id=options.client_id, announce=log.info)
    except (ValueError, DeployError) as err:
        print(f"edgefleet collect: {err}", flush=True)
        return 2
    stop = threading.Event()
    collector = Collector(broker, args.db, options, stop=stop)
    with _signals_set(stop):
        code = collector.run(duration_s=args.duration)
    if collector.fatal:
        print(f"edgefleet collect: {collector.fatal}", flush=True)
    s = collector.stats
    print(
        f"collected: received {s.received}, stored {s.stored}, duplicates {s.duplicates}, "
        f"malformed {s.malformed}, into {where}",
        flush=True,
    )
    return code


def register(subparsers: Any, parents: Sequence[argparse.ArgumentParser] = ()) -> None:
    """Add ``collect`` to the ``edgefleet`` command line (broker flags come from the parent parser)."""
    p = subparsers.add_parser(
        "collect",
        parents=list(parents),
        help="store statuses, reports and events from the fleet in SQLite or PostgreSQL (long-running)",
        description=__doc__.split("\n\n", 1)[0] if __doc__ else None,
    )
    p.add_argument(
        "--db",
        required=True,
        metavar="URL",
        help="the store: an SQLite file (created if missing), sqlite:///PATH, or "
        "postgresql://USER@HOST:PORT/DATABASE (several collectors may share one; see "
        "deploy/observe/store_sql.py)",
    )
    p.add_argument(
        "--name",
        default="main",
        help="collector name; the MQTT client id is edgefleet-collector-NAME and must stay fixed "
        "across restarts (default: %(default)s)",
    )
    p.add_argument("--share", metavar="GROUP", help="subscribe via $share/GROUP/... to split load")
    p.add_argument("--telemetry", action="store_true", help="also store sampled telemetry")
    p.add_argument(
        "--telemetry-every", type=float, default=60.0, help="seconds between stored samples per device"
    )
    p.add_argument("--telemetry-retention-days", type=float, default=7.0, help="telemetry kept this long")
    p.add_argument(
        "--session-expiry",
        type=int,
        default=7 * 24 * 3600,
        help="seconds the broker keeps our queue while we are down (default: one week)",
    )
    p.add_argument("--duration", type=float, help="stop after this many seconds (default: run until signal)")
    p.set_defaults(func=_cmd_collect)
