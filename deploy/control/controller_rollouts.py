"""Staged-rollout state in a PostgreSQL fleet store, for the controller.

:class:`deploy.control.rollout.RolloutStore` keeps rollouts in SQLite (its own file, or the collector's). A
controller whose store is PostgreSQL keeps them there too, in the same three tables with the same
columns (``rollouts``, ``rollout_devices``, ``rollout_transitions``), through the store's dialect layer
(:mod:`deploy.observe.store_sql`): :class:`SqlRolloutStore` is a ``RolloutStore`` whose every method
speaks that
dialect, so :class:`deploy.control.rollout.RolloutController` runs on it unchanged, and a standby controller
on
another host resumes a rollout from the shared database. SQLite keeps using ``RolloutStore`` itself.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from deploy.control.rollout import (
    RolloutStore,
)
from deploy.errors import RolloutError
from deploy.observe.store_sql import DbUrl, StoreError, close_quietly, driver_errors, open_store

_DDL = (
    """CREATE TABLE IF NOT EXISTS rollouts (
    id TEXT PRIMARY KEY,
    model TEXT NOT NULL,
    manifest_version {int} NOT NULL,
    policy TEXT NOT NULL,
    state TEXT NOT NULL,
    created_at {real} NOT NULL,
    updated_at {real} NOT NULL,
    reason TEXT
)""",
    "CREATE UNIQUE INDEX IF NOT EXISTS rollouts_one_unfinished_per_model ON rollouts (model) "
    "WHERE state NOT IN ('completed', 'halted')",
    """CREATE TABLE IF NOT EXISTS rollout_devices (
    rollout TEXT NOT NULL REFERENCES rollouts (id),
    device TEXT NOT NULL,
    role TEXT NOT NULL,
    ordinal {int} NOT NULL,
    variant TEXT NOT NULL,
    sha256 TEXT NOT NULL,
    manifest_version {int} NOT NULL,
    why TEXT NOT NULL,
    assignment BYTEA NOT NULL,
    previous BYTEA,
    baseline_status_ts {real},
    assigned_at {real},
    outcome TEXT,
    outcome_at {real},
    detail TEXT,
    restored TEXT,
    restored_at {real},
    PRIMARY KEY (rollout, device)
)""",
    """CREATE TABLE IF NOT EXISTS rollout_transitions (
    rollout TEXT NOT NULL REFERENCES rollouts (id),
    seq {int} NOT NULL,
    from_state TEXT,
    to_state TEXT NOT NULL,
    at {real} NOT NULL,
    reason TEXT,
    PRIMARY KEY (rollout, seq)
)""",
)


class SqlRolloutStore(RolloutStore):
    """``RolloutStore`` on the fleet store's connection (PostgreSQL): only its primitives differ (the
    connection, one transaction per cursor, the dialect's placeholders, a row lock in ``transition``);
    every method is RolloutStore's own."""

    _FOR_UPDATE = " FOR UPDATE"
    _NEWEST = "created_at DESC, id DESC"

    def __init__(self, url: DbUrl) -> None:  # no super().__init__(): that one opens SQLite
        self.url = url
        self.path = Path(url.display)  # for RolloutStore's messages only
        try:
            opened = open_store(url)
        except StoreError as err:
            raise RolloutError(f"cannot open the rollout tables in {url.display}: {err}") from err
        self._db: Any = opened.conn
        self._dialect = opened.dialect
        self._errors = driver_errors(opened.dialect)
        with self._cursor() as cur:
            for statement in _DDL:
                cur.execute(self._dialect.ddl(statement))

    def close(self) -> None:
        close_quietly(self._db)

    @contextlib.contextmanager
    def _cursor(self) -> Iterator[Any]:
        """One transaction: commits at the end, rolls back and raises RolloutError on a database error."""
        try:
            cur = self._db.cursor()
            yield cur
            self._db.commit()
        except self._errors as err:
            with contextlib.suppress(*self._errors):
                self._db.rollback()
            raise RolloutError(f"rollout database refused the change ({self.url.display}): {err}") from err

    def _q(self, cur: Any, sql: str, params: Sequence[Any] = ()) -> Any:
        cur.execute(self._dialect.sql(sql), self._dialect.params(tuple(params)))
        return cur

    def _many(self, cur: Any, sql: str, rows: Sequence[Sequence[Any]]) -> None:
        cur.executemany(self._dialect.sql(sql), [self._dialect.params(tuple(r)) for r in rows])
