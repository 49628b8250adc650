"""The collector's store (SQLite embedded, or PostgreSQL for several collectors): latest status per
device, latest report per device+model with history, an append-only, duplicate-free event log, and
sampled telemetry with bounded retention. Where it lives and how each database is spoken to (URLs, the
one schema and its migrations, dialects) is :mod:`deploy.observe.store_sql`; the queries here serve both.

Writers: one thread per FleetStore (:class:`deploy.observe.collect.Collector`'s writer); several collectors
may
write one PostgreSQL database (or one SQLite file, serialised by its lock). Readers open their own
FleetStore (SQLite's WAL lets them read while the writer commits; a PostgreSQL reader runs in autocommit,
read-only). Every ``ingest_*`` method is idempotent, so a QoS1 redelivery, or the retained copy a broker
sends again after a restart, never creates a second row, and concurrent writers need no
read-modify-write: each rule is one ``INSERT ... ON CONFLICT`` statement the database applies atomically
per row (PostgreSQL re-checks the ``WHERE`` against the row it locked):

* statuses / reports: the latest row is replaced only by a payload with a timestamp at least as new
  (``ON CONFLICT DO UPDATE ... WHERE excluded.ts >= ts``);
* report history and events: keyed by the sha256 of the payload bytes as received (``ON CONFLICT
  (digest) DO NOTHING``), and that payload is what is stored. A QoS1 redelivery or a retained copy is
  byte-identical, so it is recognised; hashing the bytes costs microseconds where re-serialising the
  parsed message cost ~0.25 ms a report. Agents publish canonical JSON (:meth:`agent.wire.Message.to_json`),
  so rows written by either this or the earlier digest (over the re-serialised canonical JSON)
  deduplicate against each other. Only a publisher sending the same message in two different byte
  forms (key order, whitespace) gets two history rows. Callers without the raw payload (tests, tools)
  get the canonical JSON as the payload;
* manifests / assignments (what the controller published, as signed and received): the newest per
  model (by version) and per device+model (by issue time); an empty retained payload (the topic was
  cleared) deletes the row, as it deletes the broker's copy. Signatures are checked when read
  (:func:`deploy.observe.state.state_from_store`), with the same code as a broker read;
* devices: ``last_seen`` only moves forward;
* telemetry: at most one row per device per ``telemetry_every_s`` (per collector), rows older than the
  retention window are deleted by :meth:`FleetStore.prune`.

Query API for the fleet view and the selector: :meth:`FleetStore.latest_statuses`,
:meth:`FleetStore.latest_reports` (shaped like ``deploy.control.select.select``'s arguments),
:meth:`FleetStore.all_latest_reports` (every model),
:meth:`FleetStore.events`, :meth:`FleetStore.devices`, :meth:`FleetStore.telemetry`.
"""

from __future__ import annotations

import contextlib
import hashlib
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

from agent import wire
from deploy.observe.store_sql import (
    SCHEMA_VERSION,
    DbUrl,
    StoreError,
    StoreNamespaceError,
    StoreSchemaError,
    StoreUnavailable,
    close_quietly,
    driver_errors,
    lost_connection,
    open_store,
    parse_db_url,
    tables,
    wrap,
)

__all__ = [
    "SCHEMA_VERSION",
    "DbUrl",
    "DeviceRow",
    "EventRow",
    "FleetStore",
    "ReportRow",
    "StoreError",
    "StoreNamespaceError",
    "StoreSchemaError",
    "StoreUnavailable",
    "digest",
    "parse_db_url",
]

# last_seen only moves forward (a conditional update, not max(): the same SQL on both databases).
_TOUCH_DEVICE = (
    "INSERT INTO devices (device, first_seen, last_seen) VALUES (?, ?, ?) "
    "ON CONFLICT (device) DO UPDATE SET last_seen = excluded.last_seen "
    "WHERE excluded.last_seen > devices.last_seen"
)

MALFORMED_KEEP = 1000  # rows of the malformed table kept (the newest)


@dataclass(frozen=True, slots=True)
class EventRow:
    id: int
    device: str
    ts: float
    kind: str
    model: str | None
    variant: str | None
    sha256: str | None
    reason: str | None
    detail: str | None
    correlation_id: str | None
    received_at: float

    def as_dict(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in self.__slots__}


@dataclass(frozen=True, slots=True)
class DeviceRow:
    device: str
    first_seen: float
    last_seen: float
    online: bool | None
    device_class: str | None
    board: str | None
    arch: str | None
    agent_version: str | None


def digest(message: wire.Message) -> str:
    """sha256 of the message's canonical JSON: the key of a message stored without its raw payload."""
    return hashlib.sha256(message.to_json()).hexdigest()


def _keyed(message: wire.Message, raw: bytes | None) -> tuple[str, str]:
    """(payload text, its key): the raw payload as received and its sha256, or else the canonical JSON's.

    ``raw`` must be the payload ``message`` was parsed from (valid UTF-8, as the parser checked).
    """
    data = message.to_json() if raw is None else raw
    return data.decode(), hashlib.sha256(data).hexdigest()


class ReportRow(NamedTuple):
    """What :meth:`FleetStore.ingest_reports` stores of a report: plain values, not the parsed model.

    A batch holds these, not :class:`agent.wire.Report` objects: hundreds of reports of ~400 objects
    each, alive until the commit, made the garbage collector run full collections over the whole heap
    every few batches (~40% of the collector's CPU in benches/fleet.py).
    """

    device: str
    model: str
    manifest_version: int
    ts: float
    payload: bytes  # as received (hashed and stored as is), or the canonical JSON
    received_at: float

    @classmethod
    def of(cls, report: wire.Report, received_at: float, raw: bytes | None = None) -> ReportRow:
        """``raw``: the payload ``report`` was parsed from (valid UTF-8); None: its canonical JSON."""
        payload = report.to_json() if raw is None else raw
        return cls(report.device, report.model, report.manifest_version, report.ts, payload, received_at)


class FleetStore:
    """One connection to the store at ``url`` (a path, ``sqlite:///PATH`` or ``postgresql://...``).

    Writers: use from one thread only; ``namespace`` (the collector's MQTT namespace) is recorded in the
    store and a store of another namespace is refused. Readers: ``readonly=True``, another FleetStore.
    Every database error comes out as a :class:`StoreError` (:class:`StoreUnavailable` when the
    connection was lost: the next :meth:`transaction` reconnects).
    """

    def __init__(
        self,
        url: Path | str,
        readonly: bool = False,
        telemetry_every_s: float = 60.0,
        telemetry_retention_s: float = 7 * 24 * 3600,
        namespace: str | None = None,
        timeout_s: float = 10.0,
    ) -> None:
        self.url: DbUrl = parse_db_url(url)
        self.readonly = readonly
        self.telemetry_every_s = telemetry_every_s
        self.telemetry_retention_s = telemetry_retention_s
        self.timeout_s = timeout_s
        self._wanted_namespace = namespace
        opened = open_store(self.url, readonly=readonly, namespace=namespace, timeout_s=timeout_s)
        self._conn: Any = opened.conn  # sqlite3 or psycopg connection: only through _run/_many
        self._dialect = opened.dialect
        self._errors = driver_errors(opened.dialect)
        self.namespace: str | None = opened.namespace  # the MQTT namespace the store belongs to
        self._last_telemetry: dict[str, float] = {}

    @property
    def source(self) -> str:
        """The store for messages: its path, or its URL without the password."""
        return self.url.display

    @property
    def dialect(self) -> str:
        """ "sqlite" or "postgresql"."""
        return self._dialect.name

    def close(self) -> None:
        close_quietly(self._conn)

    def __enter__(self) -> FleetStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def reconnect(self) -> None:
        """Open a new connection (after :class:`StoreUnavailable`); StoreError if it still cannot."""
        close_quietly(self._conn)
        opened = open_store(
            self.url, readonly=self.readonly, namespace=self._wanted_namespace, timeout_s=self.timeout_s
        )
        self._conn = opened.conn

    @contextmanager
    def transaction(self) -> Iterator[None]:
        """Group several ingests in one commit (the collector commits per batch): all or nothing.

        Reconnects first if the connection was lost (PostgreSQL restarted); a failure inside rolls back
        and comes out as a StoreError, so the caller keeps its messages and retries.
        """
        if lost_connection(self._dialect, self._conn):
            self.reconnect()
        try:
            yield
            self._conn.commit()
        except BaseException as err:
            with contextlib.suppress(*self._errors):  # a lost connection: the server rolled back
                self._conn.rollback()
            if isinstance(err, self._errors):
                raise wrap(self._dialect, err, self.url) from err
            raise

    @contextmanager
    def snapshot(self) -> Iterator[None]:
        """A reader's queries inside see one state of the store, whatever the collectors commit meanwhile
        (a SQLite read transaction; a PostgreSQL REPEATABLE READ one). A writer's reads: no-op."""
        if not self.readonly:
            yield
            return
        self._run(self._dialect.begin_read)
        try:
            yield
        finally:
            with contextlib.suppress(StoreError):
                self._run("ROLLBACK")

    def _run(self, sql: str, params: Sequence[Any] = ()) -> Any:
        """Execute one statement (``?`` placeholders); the cursor, for rowcount or fetching."""
        try:
            cur = self._conn.cursor()
            cur.execute(self._dialect.sql(sql), self._dialect.params(params))
        except self._errors as err:
            raise wrap(self._dialect, err, self.url) from err
        return cur

    def _rows(self, sql: str, params: Sequence[Any] = ()) -> list[Any]:
        try:
            return list(self._run(sql, params).fetchall())
        except self._errors as err:
            raise wrap(self._dialect, err, self.url) from err

    def _many(self, sql: str, rows: Sequence[Sequence[Any]]) -> int:
        """executemany; the rows changed over all items (0 when the driver cannot tell)."""
        if not rows:
            return 0
        try:
            cur = self._conn.cursor()
            cur.executemany(self._dialect.sql(sql), [self._dialect.params(r) for r in rows])
        except self._errors as err:
            raise wrap(self._dialect, err, self.url) from err
        return max(int(cur.rowcount), 0)

    # ---------------------------------------------------------------- writing (one thread)

    def _touch_device(self, device: str, now: float, status: wire.Status | None = None) -> None:
        self._run(_TOUCH_DEVICE, (device, now, now))
        if status is not None:
            self._run(
                "UPDATE devices SET online = ?, device_class = ?, board = ?, arch = ?, agent_version = ? "
                "WHERE device = ?",
                (
                    int(status.online),
                    status.device_class,
                    status.board,
                    status.arch,
                    status.agent_version,
                    device,
                ),
            )

    def ingest_status(self, status: wire.Status, received_at: float | None = None) -> bool:
        """Keep the newest status per device; True if it replaced the stored one."""
        now = time.time() if received_at is None else received_at
        cur = self._run(
            "INSERT INTO statuses (device, ts, online, payload, received_at) VALUES (?, ?, ?, ?, ?) "
            "ON CONFLICT (device) DO UPDATE SET ts = excluded.ts, online = excluded.online, "
            "payload = excluded.payload, received_at = excluded.received_at WHERE excluded.ts >= statuses.ts",
            (status.device, status.ts, int(status.online), status.to_json().decode(), now),
        )
        changed = cur.rowcount > 0
        self._touch_device(status.device, now, status if changed else None)
        return bool(changed)

    def ingest_report(
        self, report: wire.Report, received_at: float | None = None, raw: bytes | None = None
    ) -> bool:
        """Keep the newest report per device+model, and every distinct report in the history.

        ``raw``: the payload ``report`` was parsed from (stored and hashed as is); None: its canonical JSON.
        """
        now = time.time() if received_at is None else received_at
        return self.ingest_reports([ReportRow.of(report, now, raw)]) > 0

    def ingest_reports(self, rows: Sequence[ReportRow]) -> int:
        """:meth:`ingest_report` for each row in order, in three statements; how many replaced the latest.

        The same rows as one call per report: each statement touches one table only, so running all the
        history inserts, then all the latest-row upserts, then all the device touches is equivalent to
        interleaving them (within a statement only the order of rows with the same key matters).
        """
        history = []
        latest = []
        touches = []
        for device, model, version, ts, payload, now in rows:
            text = payload.decode()
            history.append((hashlib.sha256(payload).hexdigest(), device, model, version, ts, text, now))
            latest.append((device, model, version, ts, text, now))
            touches.append((device, now, now))
        # Each statement's rows in key order (stable: rows of one key keep their order, so the result is
        # the same): concurrent collectors then lock the rows of a table in the same order, which keeps
        # PostgreSQL from deadlocking two batches that share devices.
        history.sort(key=lambda r: r[0])
        latest.sort(key=lambda r: (r[0], r[1]))
        touches.sort(key=lambda r: r[0])
        self._many(
            "INSERT INTO report_history (digest, device, model, manifest_version, ts, payload, "
            "received_at) VALUES (?, ?, ?, ?, ?, ?, ?) ON CONFLICT (digest) DO NOTHING",
            history,
        )
        replaced = self._many(
            "INSERT INTO reports (device, model, manifest_version, ts, payload, received_at) "
            "VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT (device, model) DO UPDATE SET "
            "manifest_version = excluded.manifest_version, ts = excluded.ts, payload = excluded.payload, "
            "received_at = excluded.received_at WHERE excluded.ts >= reports.ts",
            latest,
        )  # both drivers sum the rows changed by every item
        self._many(_TOUCH_DEVICE, touches)
        return replaced

    def ingest_event(
        self, event: wire.Event, received_at: float | None = None, raw: bytes | None = None
    ) -> bool:
        """Append the event unless the same payload is already stored; True if a row was added.

        ``raw``: the payload ``event`` was parsed from (stored and hashed as is); None: its canonical JSON.
        """
        now = time.time() if received_at is None else received_at
        text, key = _keyed(event, raw)
        cur = self._run(
            "INSERT INTO events (digest, device, ts, kind, model, variant, sha256, reason, detail, "
            "correlation_id, payload, received_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?) "
            "ON CONFLICT (digest) DO NOTHING",
            (
                key,
                event.device,
                event.ts,
                event.kind.value,
                event.model,
                event.variant,
                event.sha256,
                event.reason.value if event.reason else None,
                event.detail,
                event.correlation_id,
                text,
                now,
            ),
        )
        self._touch_device(event.device, now)
        return bool(cur.rowcount > 0)

    def ingest_telemetry(self, sample: wire.Telemetry, received_at: float | None = None) -> bool:
        """Store at most one sample per device per ``telemetry_every_s``; True if stored."""
        now = time.time() if received_at is None else received_at
        last = self._last_telemetry.get(sample.device)
        if last is not None and sample.ts - last < self.telemetry_every_s:
            return False
        self._last_telemetry[sample.device] = sample.ts
        self._run(
            "INSERT INTO telemetry (device, ts, cpu_percent, rss_bytes, temperature_c, throttled, "
            "inferences, uptime_s, received_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (
                sample.device,
                sample.ts,
                sample.cpu_percent,
                sample.rss_bytes,
                sample.temperature_c,
                None if sample.throttled is None else int(sample.throttled),
                sample.inferences,
                sample.uptime_s,
                now,
            ),
        )
        self._touch_device(sample.device, now)
        return True

    def ingest_manifest(
        self, manifest: wire.Manifest, received_at: float | None = None, raw: bytes | None = None
    ) -> bool:
        """Keep the newest manifest version per model (signed payload as received); True if stored."""
        now = time.time() if received_at is None else received_at
        text, _ = _keyed(manifest, raw)
        cur = self._run(
            "INSERT INTO manifests (model, version, payload, received_at) VALUES (?, ?, ?, ?) "
            "ON CONFLICT (model) DO UPDATE SET version = excluded.version, payload = excluded.payload, "
            "received_at = excluded.received_at "
            "WHERE excluded.version >= manifests.version AND excluded.payload != manifests.payload",
            (manifest.model, manifest.version, text, now),
        )
        return bool(cur.rowcount > 0)

    def ingest_assignment(
        self, assignment: wire.Assignment, received_at: float | None = None, raw: bytes | None = None
    ) -> bool:
        """Keep the newest assignment per device+model (signed payload as received); True if stored."""
        now = time.time() if received_at is None else received_at
        text, _ = _keyed(assignment, raw)
        cur = self._run(
            "INSERT INTO assignments (device, model, issued_at, payload, received_at) VALUES (?, ?, ?, ?, ?) "
            "ON CONFLICT (device, model) DO UPDATE SET issued_at = excluded.issued_at, "
            "payload = excluded.payload, received_at = excluded.received_at "
            "WHERE excluded.issued_at >= assignments.issued_at AND excluded.payload != assignments.payload",
            (assignment.device, assignment.model, assignment.issued_at, text, now),
        )
        self._touch_device(assignment.device, now)
        return bool(cur.rowcount > 0)

    def clear_retained(self, parsed: wire.ParsedTopic) -> bool:
        """A retained manifest or assignment was cleared on the broker: forget it too; True if deleted."""
        if parsed.kind is wire.TopicKind.MANIFEST and parsed.model:
            cur = self._run("DELETE FROM manifests WHERE model = ?", (parsed.model,))
        elif parsed.kind is wire.TopicKind.ASSIGN and parsed.device and parsed.model:
            cur = self._run(
                "DELETE FROM assignments WHERE device = ? AND model = ?", (parsed.device, parsed.model)
            )
        else:
            return False
        return bool(cur.rowcount > 0)

    def record_malformed(self, topic: str, error: str, size: int, received_at: float | None = None) -> None:
        now = time.time() if received_at is None else received_at
        self._run(
            "INSERT INTO malformed (topic, error, size, received_at) VALUES (?, ?, ?, ?)",
            (topic[:500], error[:2000], size, now),
        )

    def prune(self, now: float | None = None) -> int:
        """Delete telemetry older than the retention window and old malformed rows; rows deleted."""
        now = time.time() if now is None else now
        deleted = self._run(
            "DELETE FROM telemetry WHERE ts < ?", (now - self.telemetry_retention_s,)
        ).rowcount
        deleted += self._run(
            "DELETE FROM malformed WHERE id <= (SELECT max(id) FROM malformed) - ?", (MALFORMED_KEEP,)
        ).rowcount
        return int(deleted)

    def commit(self) -> None:
        try:
            self._conn.commit()
        except self._errors as err:
            raise wrap(self._dialect, err, self.url) from err

    def checkpoint(self) -> None:
        """SQLite: copy the WAL into the database and fsync it (PASSIVE: never waits for readers).
        PostgreSQL checkpoints on its own: nothing to do."""
        if self._dialect.name == "sqlite":
            self._run("PRAGMA wal_checkpoint(PASSIVE)")

    # ---------------------------------------------------------------- reading

    def latest_statuses(self) -> dict[str, wire.Status]:
        """Device id → its newest status (online or the Last Will's offline)."""
        rows = self._rows("SELECT device, payload FROM statuses ORDER BY device")
        return {device: wire.Status.from_json(payload) for device, payload in rows}

    def latest_reports(self, model: str) -> dict[str, wire.Report]:
        """Device id → its newest report for ``model`` (the shape ``deploy.control.select.select`` takes)."""
        wire.check_id(model, "model")
        rows = self._rows("SELECT device, payload FROM reports WHERE model = ? ORDER BY device", (model,))
        return {device: wire.Report.from_json(payload) for device, payload in rows}

    def all_latest_reports(self) -> dict[tuple[str, str], wire.Report]:
        """(device, model) → newest report, for every model (the fleet view's shape)."""
        rows = self._rows("SELECT device, model, payload FROM reports ORDER BY device, model")
        return {(device, model): wire.Report.from_json(payload) for device, model, payload in rows}

    def retained_payloads(self, topics: wire.Topics, model: str | None = None) -> dict[str, bytes]:
        """What the broker would hold retained, as {topic: payload}: every manifest and status, the latest
        report and assignment per device (of ``model`` only, if given). Feeds
        ``deploy.observe.state.parse_state``.
        """
        where, params = ("", ()) if model is None else (" WHERE model = ?", (wire.check_id(model, "model"),))
        out: dict[str, bytes] = {}
        with self.snapshot():  # statuses, reports and manifests of one moment
            for device, payload in self._rows("SELECT device, payload FROM statuses"):
                out[topics.status(device)] = payload.encode()
            for device, m, payload in self._rows(
                "SELECT device, model, payload FROM reports" + where,  # noqa: S608 - fixed clauses
                params,
            ):
                out[topics.report(device, m)] = payload.encode()
            for device, m, payload in self._rows(
                "SELECT device, model, payload FROM assignments" + where,  # noqa: S608 - fixed clauses
                params,
            ):
                out[topics.assign(device, m)] = payload.encode()
            for m, payload in self._rows("SELECT model, payload FROM manifests"):
                out[topics.manifest(m)] = payload.encode()
        return out

    def last_received(self) -> float | None:
        """When the collector last stored a status or report (host time), None if it never did."""
        rows = self._rows(
            "SELECT max(t) FROM (SELECT max(received_at) AS t FROM statuses "
            "UNION ALL SELECT max(received_at) FROM reports) AS r"
        )
        return None if not rows or rows[0][0] is None else float(rows[0][0])

    def report_history(self, device: str, model: str, limit: int = 100) -> list[wire.Report]:
        """Distinct reports of ``device`` for ``model``, newest first."""
        rows = self._rows(
            "SELECT payload FROM report_history WHERE device = ? AND model = ? ORDER BY ts DESC, id DESC "
            "LIMIT ?",
            (device, model, limit),
        )
        return [wire.Report.from_json(r[0]) for r in rows]

    def events(
        self,
        device: str | None = None,
        since: float | None = None,
        limit: int = 1000,
        kind: str | None = None,
    ) -> list[EventRow]:
        """Events by device time, oldest first; ``since`` is a device timestamp (exclusive)."""
        where: list[str] = []
        params: list[Any] = []
        for clause, value in (("device = ?", device), ("ts > ?", since), ("kind = ?", kind)):
            if value is not None:
                where.append(clause)
                params.append(value)
        rows = self._rows(
            "SELECT id, device, ts, kind, model, variant, sha256, reason, detail, correlation_id, "  # noqa: S608
            "received_at FROM events" + (" WHERE " + " AND ".join(where) if where else "") + " "
            "ORDER BY ts, id LIMIT ?",
            (*params, limit),
        )
        return [EventRow(*row) for row in rows]

    def devices(self) -> list[DeviceRow]:
        rows = self._rows(
            "SELECT device, first_seen, last_seen, online, device_class, board, arch, agent_version "
            "FROM devices ORDER BY device"
        )
        return [DeviceRow(r[0], r[1], r[2], None if r[3] is None else bool(r[3]), *r[4:]) for r in rows]

    def telemetry(self, device: str, since: float | None = None, limit: int = 1000) -> list[dict[str, Any]]:
        after, params = ("", (device, limit)) if since is None else (" AND ts > ?", (device, since, limit))
        rows = self._rows(
            "SELECT ts, cpu_percent, rss_bytes, temperature_c, throttled, inferences, uptime_s "
            "FROM telemetry WHERE device = ?" + after + " ORDER BY ts LIMIT ?",
            params,
        )
        keys = ("ts", "cpu_percent", "rss_bytes", "temperature_c", "throttled", "inferences", "uptime_s")
        return [dict(zip(keys, r, strict=True)) for r in rows]

    def counts(self) -> dict[str, int]:
        """Rows per table (for logs and tests)."""
        return {t: int(self._rows(f"SELECT count(*) FROM {t}")[0][0]) for t in tables()}  # noqa: S608
