"""The collector's SQLite store: latest status per device, latest report per device+model with history,
an append-only, duplicate-free event log, and sampled telemetry with bounded retention.

Writing is done by one thread only (:class:`deploy.collect.Collector`'s writer); readers open their own
connection (WAL mode lets them read while the writer commits). Every ``ingest_*`` method is
idempotent, so a QoS1 redelivery, or the retained copy a broker sends again after a restart, never
creates a second row:

* statuses / reports: the latest row is replaced only by a payload with a timestamp at least as new;
* report history and events: keyed by the sha256 of the payload bytes as received (``INSERT OR IGNORE``),
  and that payload is what is stored. A QoS1 redelivery or a retained copy is byte-identical, so it is
  recognised; hashing the bytes costs microseconds where re-serialising the parsed message cost ~0.25 ms
  a report. Agents publish canonical JSON (:meth:`agent.wire.Message.to_json`), whose bytes are exactly
  what the earlier digest (over the canonical JSON re-serialised by the collector) hashed, so rows
  written by either version deduplicate against each other. Only a publisher sending the same message
  in two different byte forms (key order, whitespace) now gets two history rows. The digest is internal
  to this database (not part of the wire contract), hence no schema version bump. Callers without the
  raw payload (tests, tools) get the canonical JSON as the payload;
* manifests / assignments (what the controller published, as signed and received): the newest per
  model (by version) and per device+model (by issue time); an empty retained payload (the topic was
  cleared) deletes the row, as it deletes the broker's copy. Signatures are checked when read
  (:func:`deploy.state.state_from_store`), with the same code as a broker read. Tables added to schema
  version 1 (``CREATE TABLE IF NOT EXISTS``): an older database simply has none yet;
* telemetry: at most one row per device per ``telemetry_every_s``, rows older than the retention
  window are deleted by :meth:`FleetStore.prune_telemetry`.

Query API for the fleet view and the selector: :meth:`FleetStore.latest_statuses`,
:meth:`FleetStore.latest_reports` (shaped like ``deploy.select.select``'s arguments),
:meth:`FleetStore.all_latest_reports` (every model),
:meth:`FleetStore.events`, :meth:`FleetStore.devices`, :meth:`FleetStore.telemetry`.
"""

from __future__ import annotations

import hashlib
import sqlite3
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

from agent import wire
from deploy.errors import DeployError


class StoreError(DeployError):
    """The SQLite database cannot be opened or has an incompatible schema."""


SCHEMA_VERSION = 1

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS devices (
    device TEXT PRIMARY KEY,
    first_seen REAL NOT NULL,
    last_seen REAL NOT NULL,
    online INTEGER,
    device_class TEXT,
    board TEXT,
    arch TEXT,
    agent_version TEXT
);
CREATE TABLE IF NOT EXISTS statuses (
    device TEXT PRIMARY KEY,
    ts REAL NOT NULL,
    online INTEGER NOT NULL,
    payload TEXT NOT NULL,
    received_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS reports (
    device TEXT NOT NULL,
    model TEXT NOT NULL,
    manifest_version INTEGER NOT NULL,
    ts REAL NOT NULL,
    payload TEXT NOT NULL,
    received_at REAL NOT NULL,
    PRIMARY KEY (device, model)
);
CREATE TABLE IF NOT EXISTS report_history (
    id INTEGER PRIMARY KEY,
    digest TEXT NOT NULL UNIQUE,
    device TEXT NOT NULL,
    model TEXT NOT NULL,
    manifest_version INTEGER NOT NULL,
    ts REAL NOT NULL,
    payload TEXT NOT NULL,
    received_at REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS report_history_dm ON report_history (device, model, ts);
CREATE TABLE IF NOT EXISTS events (
    id INTEGER PRIMARY KEY,
    digest TEXT NOT NULL UNIQUE,
    device TEXT NOT NULL,
    ts REAL NOT NULL,
    kind TEXT NOT NULL,
    model TEXT,
    variant TEXT,
    sha256 TEXT,
    reason TEXT,
    detail TEXT,
    correlation_id TEXT,
    payload TEXT NOT NULL,
    received_at REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS events_device_ts ON events (device, ts);
CREATE INDEX IF NOT EXISTS events_ts ON events (ts);
CREATE TABLE IF NOT EXISTS telemetry (
    id INTEGER PRIMARY KEY,
    device TEXT NOT NULL,
    ts REAL NOT NULL,
    cpu_percent REAL,
    rss_bytes INTEGER,
    temperature_c REAL,
    throttled INTEGER,
    inferences INTEGER,
    uptime_s REAL,
    received_at REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS telemetry_device_ts ON telemetry (device, ts);
CREATE TABLE IF NOT EXISTS manifests (
    model TEXT PRIMARY KEY,
    version INTEGER NOT NULL,
    payload TEXT NOT NULL,
    received_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS assignments (
    device TEXT NOT NULL,
    model TEXT NOT NULL,
    issued_at REAL NOT NULL,
    payload TEXT NOT NULL,
    received_at REAL NOT NULL,
    PRIMARY KEY (device, model)
);
CREATE TABLE IF NOT EXISTS malformed (
    id INTEGER PRIMARY KEY,
    topic TEXT NOT NULL,
    error TEXT NOT NULL,
    size INTEGER NOT NULL,
    received_at REAL NOT NULL
);
"""

_TOUCH_DEVICE = (
    "INSERT INTO devices (device, first_seen, last_seen) VALUES (?, ?, ?) "
    "ON CONFLICT (device) DO UPDATE SET last_seen = max(last_seen, excluded.last_seen)"
)

WAL_AUTOCHECKPOINT_PAGES = 16384  # 64 MiB of 4 KiB pages
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


def connect(path: Path | str, readonly: bool = False, timeout_s: float = 10.0) -> sqlite3.Connection:
    """Open the database (WAL, synchronous=NORMAL, busy timeout) and create or check the schema."""
    try:
        if readonly:
            uri = f"file:{Path(path).resolve()}?mode=ro"
            conn = sqlite3.connect(uri, uri=True, timeout=timeout_s, check_same_thread=False)
        else:
            Path(path).parent.mkdir(parents=True, exist_ok=True)
            conn = sqlite3.connect(str(path), timeout=timeout_s, check_same_thread=False)
        conn.execute(f"PRAGMA busy_timeout = {int(timeout_s * 1000)}")
        if not readonly:
            conn.execute("PRAGMA journal_mode = WAL")
            conn.execute("PRAGMA synchronous = NORMAL")
            # Checkpoint (the fsync of WAL mode with synchronous=NORMAL) at 64 MiB of WAL, not SQLite's
            # 4 MiB: at ~11 KiB per report that was one fsync per ~400 reports, 0.1 ms a report. The
            # collector checkpoints every second besides (FleetStore.checkpoint), which bounds what a
            # power cut can take back by time as well (before: whatever the last 4 MiB had not flushed).
            conn.execute(f"PRAGMA wal_autocheckpoint = {WAL_AUTOCHECKPOINT_PAGES}")
            conn.execute(f"PRAGMA journal_size_limit = {WAL_AUTOCHECKPOINT_PAGES * 4096}")
            conn.executescript(_SCHEMA)
            row = conn.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()
            if row is None:
                conn.execute("INSERT INTO meta VALUES ('schema_version', ?)", (str(SCHEMA_VERSION),))
                conn.commit()
            elif int(row[0]) != SCHEMA_VERSION:
                raise StoreError(
                    f"{path} has schema version {row[0]}, this edgefleet expects {SCHEMA_VERSION}"
                )
    except sqlite3.Error as err:
        raise StoreError(f"cannot open the collector database {path}: {err}") from err
    return conn


class FleetStore:
    """One SQLite connection. Writers: use from one thread only. Readers: open another FleetStore."""

    def __init__(
        self,
        path: Path | str,
        readonly: bool = False,
        telemetry_every_s: float = 60.0,
        telemetry_retention_s: float = 7 * 24 * 3600,
    ) -> None:
        self.path = Path(path)
        self.telemetry_every_s = telemetry_every_s
        self.telemetry_retention_s = telemetry_retention_s
        self._conn = connect(path, readonly=readonly)
        self._last_telemetry: dict[str, float] = {}

    def close(self) -> None:
        self._conn.close()

    def __enter__(self) -> FleetStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @contextmanager
    def transaction(self) -> Iterator[None]:
        """Group several ingests in one commit (the collector commits per batch)."""
        try:
            yield
        except BaseException:
            self._conn.rollback()
            raise
        self._conn.commit()

    # ---------------------------------------------------------------- writing (one thread)

    def _touch_device(self, device: str, now: float, status: wire.Status | None = None) -> None:
        self._conn.execute(_TOUCH_DEVICE, (device, now, now))
        if status is not None:
            self._conn.execute(
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
        cur = self._conn.execute(
            "INSERT INTO statuses (device, ts, online, payload, received_at) VALUES (?, ?, ?, ?, ?) "
            "ON CONFLICT (device) DO UPDATE SET ts = excluded.ts, online = excluded.online, "
            "payload = excluded.payload, received_at = excluded.received_at WHERE excluded.ts >= statuses.ts",
            (status.device, status.ts, int(status.online), status.to_json().decode(), now),
        )
        changed = cur.rowcount > 0
        self._touch_device(status.device, now, status if changed else None)
        return changed

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
        history inserts, then all the latest-row upserts, then all the device touches (each in row
        order) is equivalent to interleaving them.
        """
        history = []
        latest = []
        touches = []
        for device, model, version, ts, payload, now in rows:
            text = payload.decode()
            history.append((hashlib.sha256(payload).hexdigest(), device, model, version, ts, text, now))
            latest.append((device, model, version, ts, text, now))
            touches.append((device, now, now))
        self._conn.executemany(
            "INSERT OR IGNORE INTO report_history (digest, device, model, manifest_version, ts, payload, "
            "received_at) VALUES (?, ?, ?, ?, ?, ?, ?)",
            history,
        )
        cur = self._conn.executemany(
            "INSERT INTO reports (device, model, manifest_version, ts, payload, received_at) "
            "VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT (device, model) DO UPDATE SET "
            "manifest_version = excluded.manifest_version, ts = excluded.ts, payload = excluded.payload, "
            "received_at = excluded.received_at WHERE excluded.ts >= reports.ts",
            latest,
        )
        replaced = max(cur.rowcount, 0)  # executemany sums the rows changed by every item
        self._conn.executemany(_TOUCH_DEVICE, touches)
        return replaced

    def ingest_event(
        self, event: wire.Event, received_at: float | None = None, raw: bytes | None = None
    ) -> bool:
        """Append the event unless the same payload is already stored; True if a row was added.

        ``raw``: the payload ``event`` was parsed from (stored and hashed as is); None: its canonical JSON.
        """
        now = time.time() if received_at is None else received_at
        text, key = _keyed(event, raw)
        cur = self._conn.execute(
            "INSERT OR IGNORE INTO events (digest, device, ts, kind, model, variant, sha256, reason, detail, "
            "correlation_id, payload, received_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
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
        return cur.rowcount > 0

    def ingest_telemetry(self, sample: wire.Telemetry, received_at: float | None = None) -> bool:
        """Store at most one sample per device per ``telemetry_every_s``; True if stored."""
        now = time.time() if received_at is None else received_at
        last = self._last_telemetry.get(sample.device)
        if last is not None and sample.ts - last < self.telemetry_every_s:
            return False
        self._last_telemetry[sample.device] = sample.ts
        self._conn.execute(
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
        cur = self._conn.execute(
            "INSERT INTO manifests (model, version, payload, received_at) VALUES (?, ?, ?, ?) "
            "ON CONFLICT (model) DO UPDATE SET version = excluded.version, payload = excluded.payload, "
            "received_at = excluded.received_at "
            "WHERE excluded.version >= manifests.version AND excluded.payload != manifests.payload",
            (manifest.model, manifest.version, text, now),
        )
        return cur.rowcount > 0

    def ingest_assignment(
        self, assignment: wire.Assignment, received_at: float | None = None, raw: bytes | None = None
    ) -> bool:
        """Keep the newest assignment per device+model (signed payload as received); True if stored."""
        now = time.time() if received_at is None else received_at
        text, _ = _keyed(assignment, raw)
        cur = self._conn.execute(
            "INSERT INTO assignments (device, model, issued_at, payload, received_at) VALUES (?, ?, ?, ?, ?) "
            "ON CONFLICT (device, model) DO UPDATE SET issued_at = excluded.issued_at, "
            "payload = excluded.payload, received_at = excluded.received_at "
            "WHERE excluded.issued_at >= assignments.issued_at AND excluded.payload != assignments.payload",
            (assignment.device, assignment.model, assignment.issued_at, text, now),
        )
        self._touch_device(assignment.device, now)
        return cur.rowcount > 0

    def clear_retained(self, parsed: wire.ParsedTopic) -> bool:
        """A retained manifest or assignment was cleared on the broker: forget it too; True if deleted."""
        if parsed.kind is wire.TopicKind.MANIFEST and parsed.model:
            cur = self._conn.execute("DELETE FROM manifests WHERE model = ?", (parsed.model,))
        elif parsed.kind is wire.TopicKind.ASSIGN and parsed.device and parsed.model:
            cur = self._conn.execute(
                "DELETE FROM assignments WHERE device = ? AND model = ?", (parsed.device, parsed.model)
            )
        else:
            return False
        return cur.rowcount > 0

    def record_malformed(self, topic: str, error: str, size: int, received_at: float | None = None) -> None:
        now = time.time() if received_at is None else received_at
        self._conn.execute(
            "INSERT INTO malformed (topic, error, size, received_at) VALUES (?, ?, ?, ?)",
            (topic[:500], error[:2000], size, now),
        )

    def prune(self, now: float | None = None) -> int:
        """Delete telemetry older than the retention window and old malformed rows; rows deleted."""
        now = time.time() if now is None else now
        deleted = self._conn.execute(
            "DELETE FROM telemetry WHERE ts < ?", (now - self.telemetry_retention_s,)
        ).rowcount
        deleted += self._conn.execute(
            "DELETE FROM malformed WHERE id <= (SELECT max(id) FROM malformed) - ?", (MALFORMED_KEEP,)
        ).rowcount
        return int(deleted)

    def commit(self) -> None:
        self._conn.commit()

    def checkpoint(self) -> None:
        """Copy the WAL into the database and fsync it (PASSIVE: never waits for readers)."""
        self._conn.execute("PRAGMA wal_checkpoint(PASSIVE)")

    # ---------------------------------------------------------------- reading

    def latest_statuses(self) -> dict[str, wire.Status]:
        """Device id → its newest status (online or the Last Will's offline)."""
        rows = self._conn.execute("SELECT device, payload FROM statuses ORDER BY device").fetchall()
        return {device: wire.Status.from_json(payload) for device, payload in rows}

    def latest_reports(self, model: str) -> dict[str, wire.Report]:
        """Device id → its newest report for ``model`` (the shape ``deploy.select.select`` takes)."""
        wire.check_id(model, "model")
        rows = self._conn.execute(
            "SELECT device, payload FROM reports WHERE model = ? ORDER BY device", (model,)
        ).fetchall()
        return {device: wire.Report.from_json(payload) for device, payload in rows}

    def all_latest_reports(self) -> dict[tuple[str, str], wire.Report]:
        """(device, model) → newest report, for every model (the fleet view's shape)."""
        rows = self._conn.execute(
            "SELECT device, model, payload FROM reports ORDER BY device, model"
        ).fetchall()
        return {(device, model): wire.Report.from_json(payload) for device, model, payload in rows}

    def retained_payloads(self, topics: wire.Topics, model: str | None = None) -> dict[str, bytes]:
        """What the broker would hold retained, as {topic: payload}: every manifest and status, the latest
        report and assignment per device (of ``model`` only, if given). Feeds ``deploy.state.parse_state``.
        """
        if model is not None:
            wire.check_id(model, "model")
        out: dict[str, bytes] = {}
        for device, payload in self._conn.execute("SELECT device, payload FROM statuses"):
            out[topics.status(device)] = payload.encode()
        rows = self._conn.execute(
            "SELECT device, model, payload FROM reports WHERE ?1 IS NULL OR model = ?1", (model,)
        )
        for device, m, payload in rows:
            out[topics.report(device, m)] = payload.encode()
        if self._has_table("assignments"):
            rows = self._conn.execute(
                "SELECT device, model, payload FROM assignments WHERE ?1 IS NULL OR model = ?1", (model,)
            )
            for device, m, payload in rows:
                out[topics.assign(device, m)] = payload.encode()
        if self._has_table("manifests"):
            for m, payload in self._conn.execute("SELECT model, payload FROM manifests"):
                out[topics.manifest(m)] = payload.encode()
        return out

    def last_received(self) -> float | None:
        """When the collector last stored a status or report (host time), None if it never did."""
        row = self._conn.execute(
            "SELECT max(t) FROM (SELECT max(received_at) AS t FROM statuses "
            "UNION ALL SELECT max(received_at) FROM reports)"
        ).fetchone()
        return None if row is None or row[0] is None else float(row[0])

    def _has_table(self, name: str) -> bool:
        """Whether the table exists (a database written by an older collector lacks the newer ones)."""
        row = self._conn.execute("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = ?", (name,))
        return row.fetchone() is not None

    def report_history(self, device: str, model: str, limit: int = 100) -> list[wire.Report]:
        """Distinct reports of ``device`` for ``model``, newest first."""
        rows = self._conn.execute(
            "SELECT payload FROM report_history WHERE device = ? AND model = ? ORDER BY ts DESC, id DESC "
            "LIMIT ?",
            (device, model, limit),
        ).fetchall()
        return [wire.Report.from_json(r[0]) for r in rows]

    def events(
        self,
        device: str | None = None,
        since: float | None = None,
        limit: int = 1000,
        kind: str | None = None,
    ) -> list[EventRow]:
        """Events by device time, oldest first; ``since`` is a device timestamp (exclusive)."""
        rows = self._conn.execute(
            "SELECT id, device, ts, kind, model, variant, sha256, reason, detail, correlation_id, "
            "received_at FROM events WHERE (?1 IS NULL OR device = ?1) AND (?2 IS NULL OR ts > ?2) "
            "AND (?3 IS NULL OR kind = ?3) ORDER BY ts, id LIMIT ?4",
            (device, since, kind, limit),
        ).fetchall()
        return [EventRow(*row) for row in rows]

    def devices(self) -> list[DeviceRow]:
        rows = self._conn.execute(
            "SELECT device, first_seen, last_seen, online, device_class, board, arch, agent_version "
            "FROM devices ORDER BY device"
        ).fetchall()
        return [DeviceRow(r[0], r[1], r[2], None if r[3] is None else bool(r[3]), *r[4:]) for r in rows]

    def telemetry(self, device: str, since: float | None = None, limit: int = 1000) -> list[dict[str, Any]]:
        rows = self._conn.execute(
            "SELECT ts, cpu_percent, rss_bytes, temperature_c, throttled, inferences, uptime_s "
            "FROM telemetry WHERE device = ? AND ts > ? ORDER BY ts LIMIT ?",
            (device, since if since is not None else float("-inf"), limit),
        ).fetchall()
        keys = ("ts", "cpu_percent", "rss_bytes", "temperature_c", "throttled", "inferences", "uptime_s")
        return [dict(zip(keys, r, strict=True)) for r in rows]

    def counts(self) -> dict[str, int]:
        """Rows per table (for logs and tests)."""
        tables = (
            "devices",
            "statuses",
            "reports",
            "report_history",
            "events",
            "telemetry",
            "malformed",
            "manifests",
            "assignments",
        )
        return {t: int(self._conn.execute(f"SELECT count(*) FROM {t}").fetchone()[0]) for t in tables}  # noqa: S608
