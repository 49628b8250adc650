"""Where the fleet store lives and how it speaks SQL: database URLs, the two dialects (SQLite, PostgreSQL),
the one schema with its migrations, and opening a connection with the schema created or checked.

:class:`deploy.observe.store.FleetStore` holds the queries, written once: ``?`` placeholders and SQL that both
databases accept (``INSERT ... ON CONFLICT (...) DO NOTHING`` / ``DO UPDATE ... WHERE``). A
:class:`Dialect` carries only what differs: the placeholder, column types (SQLite's ``REAL`` is a
double, PostgreSQL's is 4 bytes: a Unix time in it is off by minutes), the identity column, the schema
lock, SQLite's WAL pragmas, and which driver errors mean "connection lost".

``--db`` accepts::

    /var/lib/edgefleet-collector/fleet.db         SQLite (the embedded default)
    sqlite:///var/lib/edgefleet-collector/fleet.db   the same (the URL's path, as in file: URLs)
    postgresql://edgefleet@127.0.0.1:5432/fleet   PostgreSQL through psycopg 3 (postgres:// too)

Errors (all :class:`StoreError`, a :class:`deploy.errors.DeployError`: one line, exit 2)::

    StoreError              not an edgefleet store, an unsupported URL, a query that failed
    ├── StoreUnavailable    the database cannot be reached, or the connection was lost (transient)
    ├── StoreSchemaError    the store's schema is older or newer than this edgefleet's
    └── StoreNamespaceError the store belongs to another MQTT namespace

The schema version lives in ``meta``; a writer (the collector) creates a new store and upgrades an older
one under a lock (several collectors may start at once against one PostgreSQL), all in one transaction:
a refusal leaves nothing written. Readers need the exact version and say what to run otherwise.
"""

from __future__ import annotations

import contextlib
import re
import sqlite3
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from deploy.errors import DeployError


class StoreError(DeployError):
    """The fleet store cannot be opened, has an incompatible schema, or a query failed."""


class StoreUnavailable(StoreError):
    """The database cannot be reached or the connection was lost (the collector retries)."""


class StoreSchemaError(StoreError):
    """The store's schema version is not this edgefleet's."""


class StoreNamespaceError(StoreError):
    """The store records another MQTT namespace than the collector's."""


# ------------------------------------------------------------------------------------------- URLs

_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*)://")


@dataclass(frozen=True, slots=True)
class DbUrl:
    """A parsed ``--db``: ``kind`` "sqlite" (``path``) or "postgresql" (``conninfo``, the URL as given)."""

    kind: str
    path: Path | None = None
    conninfo: str = ""

    @property
    def display(self) -> str:
        """For messages and ``FleetState.source``: the path, or the URL without its password."""
        if self.path is not None:
            return str(self.path)
        return re.sub(r"(://[^:/@]*):[^@/]*@", r"\1:***@", self.conninfo)

    def where(self) -> str:
        """``host:port`` (database ``db``, user ``u``) of a PostgreSQL URL, for error lines."""
        parts = pg_parts(self.conninfo)
        return (
            f"{parts.get('host', 'localhost')}:{parts.get('port', '5432')} "
            f"(database {parts.get('dbname', '?')}, user {parts.get('user', '?')})"
        )


def parse_db_url(value: str | Path) -> DbUrl:
    """A path or ``sqlite:///PATH`` → SQLite; ``postgresql://...`` → PostgreSQL; else StoreError."""
    if isinstance(value, Path):
        return DbUrl("sqlite", path=value)
    text = value.strip()
    match = _SCHEME.match(text)
    if match is None:
        if not text:
            raise StoreError("empty database path")
        return DbUrl("sqlite", path=Path(text))
    scheme = match.group(1).lower()
    if scheme == "sqlite":
        rest = text[match.end() :]
        if not rest.startswith("/") or rest == "/":
            raise StoreError(f"{text}: write sqlite:///ABSOLUTE/PATH, or give the file's path alone")
        return DbUrl("sqlite", path=Path(rest))
    if scheme in ("postgresql", "postgres"):
        return DbUrl("postgresql", conninfo=text)
    raise StoreError(
        f"unsupported database URL scheme {scheme!r} in {text}: use a file path, sqlite:///PATH or "
        "postgresql://USER@HOST:PORT/DATABASE"
    )


def is_url(value: str | Path) -> bool:
    """Whether ``value`` is a URL (not a plain path)."""
    return isinstance(value, str) and _SCHEME.match(value.strip()) is not None


def pg_parts(conninfo: str) -> dict[str, str]:
    """host, port, dbname, user of a PostgreSQL URL (psycopg's own parser; {} if it cannot parse it)."""
    try:
        from psycopg.conninfo import conninfo_to_dict

        return {k: str(v) for k, v in conninfo_to_dict(conninfo).items() if v is not None}
    except Exception:  # noqa: BLE001 - only for an error message: never hide the real error
        return {}


# ------------------------------------------------------------------------------------------- schema

SCHEMA_VERSION = 2
_SCHEMA_LOCK = 0x6564676566  # PostgreSQL advisory lock key ("edgef"): one schema writer at a time

# Version 1, written for both dialects: {id} {real} {int} are the column types that differ.
_BASE: tuple[str, ...] = (
    "CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)",
    """CREATE TABLE IF NOT EXISTS devices (
    device TEXT PRIMARY KEY, first_seen {real} NOT NULL, last_seen {real} NOT NULL, online {int},
    device_class TEXT, board TEXT, arch TEXT, agent_version TEXT)""",
    """CREATE TABLE IF NOT EXISTS statuses (
    device TEXT PRIMARY KEY, ts {real} NOT NULL, online {int} NOT NULL, payload TEXT NOT NULL,
    received_at {real} NOT NULL)""",
    """CREATE TABLE IF NOT EXISTS reports (
    device TEXT NOT NULL, model TEXT NOT NULL, manifest_version {int} NOT NULL, ts {real} NOT NULL,
    payload TEXT NOT NULL, received_at {real} NOT NULL, PRIMARY KEY (device, model))""",
    """CREATE TABLE IF NOT EXISTS report_history (
    id {id}, digest TEXT NOT NULL UNIQUE, device TEXT NOT NULL, model TEXT NOT NULL,
    manifest_version {int} NOT NULL, ts {real} NOT NULL, payload TEXT NOT NULL,
    received_at {real} NOT NULL)""",
    "CREATE INDEX IF NOT EXISTS report_history_dm ON report_history (device, model, ts)",
    """CREATE TABLE IF NOT EXISTS events (
    id {id}, digest TEXT NOT NULL UNIQUE, device TEXT NOT NULL, ts {real} NOT NULL, kind TEXT NOT NULL,
    model TEXT, variant TEXT, sha256 TEXT, reason TEXT, detail TEXT, correlation_id TEXT,
    payload TEXT NOT NULL, received_at {real} NOT NULL)""",
    "CREATE INDEX IF NOT EXISTS events_device_ts ON events (device, ts)",
    "CREATE INDEX IF NOT EXISTS events_ts ON events (ts)",
    """CREATE TABLE IF NOT EXISTS telemetry (
    id {id}, device TEXT NOT NULL, ts {real} NOT NULL, cpu_percent {real}, rss_bytes {int},
    temperature_c {real}, throttled {int}, inferences {int}, uptime_s {real}, received_at {real} NOT NULL)""",
    "CREATE INDEX IF NOT EXISTS telemetry_device_ts ON telemetry (device, ts)",
    """CREATE TABLE IF NOT EXISTS manifests (
    model TEXT PRIMARY KEY, version {int} NOT NULL, payload TEXT NOT NULL, received_at {real} NOT NULL)""",
    """CREATE TABLE IF NOT EXISTS assignments (
    device TEXT NOT NULL, model TEXT NOT NULL, issued_at {real} NOT NULL, payload TEXT NOT NULL,
    received_at {real} NOT NULL, PRIMARY KEY (device, model))""",
    """CREATE TABLE IF NOT EXISTS malformed (
    id {id}, topic TEXT NOT NULL, error TEXT NOT NULL, size {int} NOT NULL, received_at {real} NOT NULL)""",
)

# MIGRATIONS[v]: the statements that take a version v-1 store to version v (idempotent, both dialects).
MIGRATIONS: dict[int, tuple[str, ...]] = {
    # select/assign read one model's latest reports: without it, a scan of every device's every model.
    2: ("CREATE INDEX IF NOT EXISTS reports_model ON reports (model, device)",),
}


# ------------------------------------------------------------------------------------------- dialects


@dataclass(frozen=True)
class Dialect:
    """What differs between the databases; the queries themselves are shared (``?`` placeholders)."""

    name: str
    placeholder: str
    types: dict[str, str]
    begin_read: str  # a reader's snapshot: several queries, one state of the store

    def sql(self, query: str) -> str:
        return query if self.placeholder == "?" else query.replace("?", self.placeholder)

    def ddl(self, statement: str) -> str:
        return statement.format(**self.types)

    def params(self, values: Sequence[Any]) -> Sequence[Any]:
        return values


class _SQLite(Dialect):
    pass


class _Postgres(Dialect):
    def params(self, values: Sequence[Any]) -> Sequence[Any]:
        # PostgreSQL text cannot hold NUL, which a device may put in free text (an event's detail):
        # one such message would fail its batch on every retry and stall the collector.
        if any(isinstance(v, str) and "\x00" in v for v in values):
            return [v.replace("\x00", "\ufffd") if isinstance(v, str) else v for v in values]
        return values


SQLITE = _SQLite("sqlite", "?", {"id": "INTEGER PRIMARY KEY", "real": "REAL", "int": "INTEGER"}, "BEGIN")
POSTGRES = _Postgres(
    "postgresql",
    "%s",
    {
        "id": "BIGINT GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY",
        "real": "DOUBLE PRECISION",
        "int": "BIGINT",
    },
    "BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY",
)


def driver_errors(dialect: Dialect) -> tuple[type[Exception], ...]:
    """The driver's error base classes for ``dialect`` (psycopg imported only for PostgreSQL)."""
    if dialect is POSTGRES:
        import psycopg

        return (psycopg.Error,)
    return (sqlite3.Error, OverflowError)  # sqlite3 raises OverflowError for an int past 64 bits


def lost_connection(dialect: Dialect, conn: Any) -> bool:
    """Whether ``conn`` can no longer be used (PostgreSQL restarted, network cut): reopen it."""
    if dialect is POSTGRES:
        return bool(conn.closed or conn.broken)
    return False


def wrap(dialect: Dialect, err: Exception, url: DbUrl) -> StoreError:
    """The StoreError for a driver error raised by a query on ``url``."""
    text = _one_line(err)
    if dialect is POSTGRES:
        import psycopg
        from psycopg import errors as pg

        transient = (psycopg.OperationalError, pg.DeadlockDetected, pg.SerializationFailure)
        if isinstance(err, transient):
            return StoreUnavailable(f"PostgreSQL at {url.where()}: {text}")
        return StoreError(f"{url.display}: {text}")
    if isinstance(err, sqlite3.OperationalError):  # locked, disk I/O: may pass
        return StoreUnavailable(f"{url.display}: {text}")
    return StoreError(f"{url.display}: {text}")


def _one_line(err: BaseException) -> str:
    lines = [ln.strip() for ln in str(err).splitlines() if ln.strip()]
    text = lines[0] if lines else type(err).__name__
    return text.removeprefix("connection failed: ")[:300]


# ------------------------------------------------------------------------------------------- opening


@dataclass(frozen=True, slots=True)
class Opened:
    conn: Any  # sqlite3.Connection or psycopg.Connection; used through FleetStore's helpers only
    dialect: Dialect
    namespace: str | None


def open_store(
    url: DbUrl, readonly: bool = False, namespace: str | None = None, timeout_s: float = 10.0
) -> Opened:
    """Connect; a writer creates or upgrades the schema and records ``namespace`` (one transaction)."""
    if url.kind == "sqlite":
        assert url.path is not None
        conn: Any = _connect_sqlite(url.path, readonly, timeout_s)
        dialect: Dialect = SQLITE
    else:
        conn = _connect_postgres(url, readonly, timeout_s)
        dialect = POSTGRES
    try:
        stored_ns = _prepare(conn, dialect, url, readonly, namespace)
    except BaseException:
        close_quietly(conn)
        raise
    return Opened(conn, dialect, stored_ns)


def _connect_sqlite(path: Path, readonly: bool, timeout_s: float) -> sqlite3.Connection:
    try:
        if readonly:
            uri = f"file:{path.resolve()}?mode=ro"
            conn = sqlite3.connect(uri, uri=True, timeout=timeout_s, check_same_thread=False)
        else:
            path.parent.mkdir(parents=True, exist_ok=True)
            conn = sqlite3.connect(str(path), timeout=timeout_s, check_same_thread=False)
        conn.execute(f"PRAGMA busy_timeout = {int(timeout_s * 1000)}")
        if not readonly:
            conn.execute("PRAGMA journal_mode = WAL")
            conn.execute("PRAGMA synchronous = NORMAL")
            # Checkpoint (the fsync of WAL mode with synchronous=NORMAL) at 64 MiB of WAL, not SQLite's
            # 4 MiB: at ~11 KiB per report that was one fsync per ~400 reports, 0.1 ms a report. The
            # collector checkpoints every second besides (FleetStore.checkpoint), which bounds what a
            # power cut can take back by time as well.
            conn.execute(f"PRAGMA wal_autocheckpoint = {WAL_AUTOCHECKPOINT_PAGES}")
            conn.execute(f"PRAGMA journal_size_limit = {WAL_AUTOCHECKPOINT_PAGES * 4096}")
    except (sqlite3.Error, OSError) as err:
        raise StoreError(f"cannot open the collector database {path}: {_one_line(err)}") from err
    return conn


WAL_AUTOCHECKPOINT_PAGES = 16384  # 64 MiB of 4 KiB pages


def _connect_postgres(url: DbUrl, readonly: bool, timeout_s: float) -> Any:
    try:
        import psycopg
    except ImportError as err:
        raise StoreError(
            f"{url.display} needs psycopg 3: pip install 'psycopg[binary]' (part of edgefleet[host])"
        ) from err
    kwargs: dict[str, Any] = {
        "autocommit": readonly,  # a reader never holds a transaction open; the writer commits per batch
        "connect_timeout": max(1, round(timeout_s)),
        "application_name": "edgefleet",
    }
    if readonly:
        kwargs["options"] = "-c default_transaction_read_only=on"
    try:
        return psycopg.connect(url.conninfo, **kwargs)
    except psycopg.Error as err:
        text = _one_line(err)
        if "does not exist" in text and "database" in text:
            p = pg_parts(url.conninfo)
            raise StoreUnavailable(
                f"PostgreSQL at {url.where()}: {text}: create it (createdb -h {p.get('host', 'localhost')} "
                f"-p {p.get('port', '5432')} -U {p.get('user', 'postgres')} {p.get('dbname', 'DATABASE')})"
            ) from err
        raise StoreUnavailable(
            f"cannot reach PostgreSQL at {url.where()}: {text} (check that the server runs and listens "
            "there, and the URL's user, password and database)"
        ) from err


def _prepare(conn: Any, dialect: Dialect, url: DbUrl, readonly: bool, namespace: str | None) -> str | None:
    """Create, upgrade or check the schema and the namespace; returns the store's namespace."""
    errors = driver_errors(dialect)
    try:
        if readonly:
            return _check_readable(conn, dialect, url)
        cur = conn.cursor()
        if dialect is POSTGRES:
            cur.execute("SELECT pg_advisory_xact_lock(%s)", (_SCHEMA_LOCK,))  # opens the transaction
        else:
            cur.execute("BEGIN IMMEDIATE")  # one writer at a time from here to the commit
        for statement in _BASE:
            cur.execute(dialect.ddl(statement))
        version = _meta(cur, dialect, "schema_version")
        found = 1 if version is None else int(version)  # a new store: _BASE is version 1
        if found > SCHEMA_VERSION:
            raise _newer(url, found)
        for target in range(found + 1, SCHEMA_VERSION + 1):
            for statement in MIGRATIONS.get(target, ()):
                cur.execute(dialect.ddl(statement))
        if found != SCHEMA_VERSION or version is None:
            _set_meta(cur, dialect, "schema_version", str(SCHEMA_VERSION))
        stored_ns = _meta(cur, dialect, "namespace")
        if namespace is not None:
            if stored_ns is None:
                _set_meta(cur, dialect, "namespace", namespace)
                stored_ns = namespace
            elif stored_ns != namespace:
                raise StoreNamespaceError(
                    f"{url.display} is the store of MQTT namespace {stored_ns!r}, this collector's is "
                    f"{namespace!r}: pass --namespace {stored_ns}, or another --db for {namespace!r}"
                )
        conn.commit()
    except errors as err:
        raise wrap(dialect, err, url) from err
    return stored_ns


def _check_readable(conn: Any, dialect: Dialect, url: DbUrl) -> str | None:
    cur = conn.cursor()
    if dialect is POSTGRES:
        cur.execute("SELECT to_regclass('meta') IS NOT NULL")
        has_meta = bool(cur.fetchone()[0])
    else:
        cur.execute("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'meta'")
        has_meta = cur.fetchone() is not None
    if not has_meta:
        raise StoreSchemaError(
            f"{url.display} holds no edgefleet store yet: run `edgefleet collect --db {url.display}` first"
        )
    version = _meta(cur, dialect, "schema_version")
    found = 0 if version is None else int(version)
    if found > SCHEMA_VERSION:
        raise _newer(url, found)
    if found < SCHEMA_VERSION:
        raise StoreSchemaError(
            f"{url.display} has store schema v{found}, this edgefleet reads v{SCHEMA_VERSION}: run "
            f"`edgefleet collect --db {url.display}` (it upgrades the store when it starts), then retry"
        )
    return _meta(cur, dialect, "namespace")


def _newer(url: DbUrl, found: int) -> StoreSchemaError:
    return StoreSchemaError(
        f"{url.display} has store schema v{found}, newer than this edgefleet's v{SCHEMA_VERSION}: upgrade "
        "edgefleet on this host (pip install -U 'edgefleet[host]') to the collector's version"
    )


def _meta(cur: Any, dialect: Dialect, key: str) -> str | None:
    cur.execute(dialect.sql("SELECT value FROM meta WHERE key = ?"), (key,))
    row = cur.fetchone()
    return None if row is None else str(row[0])


def _set_meta(cur: Any, dialect: Dialect, key: str, value: str) -> None:
    cur.execute(
        dialect.sql(
            "INSERT INTO meta (key, value) VALUES (?, ?) "
            "ON CONFLICT (key) DO UPDATE SET value = excluded.value"
        ),
        (key, value),
    )


def close_quietly(conn: Any) -> None:
    """Close ``conn``, ignoring errors (a connection the server already dropped)."""
    with contextlib.suppress(Exception):
        conn.close()


def tables() -> Iterable[str]:
    """The data tables, for counts and tests."""
    return (
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
