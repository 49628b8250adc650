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
    Outcome,
    Rollout,
    RolloutDevice,
    RolloutState,
    RolloutStore,
    Transition,
    check_transition,
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

_ROLLOUT = "id, model, manifest_version, policy, state, created_at, updated_at, reason"
_DEVICE = (
    "rollout, device, role, ordinal, variant, sha256, manifest_version, why, assignment, previous, "
    "baseline_status_ts, assigned_at, outcome, outcome_at, detail, restored, restored_at"
)


class SqlRolloutStore(RolloutStore):
    """``RolloutStore`` on the fleet store's connection (PostgreSQL); every method commits."""

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

    def _all(self, sql: str, params: Sequence[Any] = ()) -> list[Any]:
        with self._cursor() as cur:
            return list(self._q(cur, sql, params).fetchall())

    # writing

    def create(self, rollout: Rollout, devices: Sequence[RolloutDevice]) -> None:
        if rollout.state is not RolloutState.PLANNED:
            raise RolloutError("a rollout is created in state planned")
        unfinished = self.unfinished(rollout.model)
        if unfinished is not None:
            raise RolloutError(
                f"rollout {unfinished.id} of {rollout.model} is still {unfinished.state}: resume or abort it"
            )
        r = rollout
        with self._cursor() as cur:
            self._q(
                cur,
                f"INSERT INTO rollouts ({_ROLLOUT}) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",  # noqa: S608 (constant)
                (
                    r.id,
                    r.model,
                    r.manifest_version,
                    r.policy,
                    r.state.value,
                    r.created_at,
                    r.updated_at,
                    r.reason,
                ),
            )
            rows = [
                (d.rollout, d.device, d.role.value, d.ordinal, d.variant, d.sha256, d.manifest_version, d.why,
                 d.assignment, d.previous, d.baseline_status_ts, None, None, None, None, None, None)
                for d in devices
            ]  # fmt: skip
            if rows:
                cur.executemany(
                    self._dialect.sql(
                        f"INSERT INTO rollout_devices ({_DEVICE}) VALUES ({', '.join('?' * 17)})"  # noqa: S608
                    ),
                    [self._dialect.params(row) for row in rows],
                )
            self._q(
                cur,
                "INSERT INTO rollout_transitions (rollout, seq, from_state, to_state, at, reason) "
                "VALUES (?, 0, NULL, ?, ?, ?)",
                (r.id, r.state.value, r.created_at, r.reason),
            )

    def transition(self, rollout: Rollout, target: RolloutState, reason: str, at: float) -> Rollout:
        from dataclasses import replace

        with self._cursor() as cur:
            row = self._q(cur, "SELECT state FROM rollouts WHERE id = ? FOR UPDATE", (rollout.id,)).fetchone()
            if row is None:
                raise RolloutError(f"no rollout {rollout.id}")
            current = RolloutState(row[0])
            if current is not rollout.state:
                raise RolloutError(
                    f"rollout {rollout.id} is {current} in the database, not {rollout.state}: "
                    "another controller is running it"
                )
            check_transition(current, target)
            seq = self._q(
                cur,
                "SELECT coalesce(max(seq), -1) + 1 FROM rollout_transitions WHERE rollout = ?",
                (rollout.id,),
            ).fetchone()[0]
            self._q(
                cur,
                "UPDATE rollouts SET state = ?, updated_at = ?, reason = ? WHERE id = ?",
                (target.value, at, reason, rollout.id),
            )
            self._q(
                cur,
                "INSERT INTO rollout_transitions (rollout, seq, from_state, to_state, at, reason) "
                "VALUES (?, ?, ?, ?, ?, ?)",
                (rollout.id, seq, current.value, target.value, at, reason),
            )
        return replace(rollout, state=target, updated_at=at, reason=reason)

    def mark_assigned(self, rollout: str, device: str, at: float) -> None:
        self.mark_assigned_many(rollout, [device], at)

    def mark_assigned_many(self, rollout: str, devices: Sequence[str], at: float) -> None:
        with self._cursor() as cur:
            for device in devices:
                self._q(
                    cur,
                    "UPDATE rollout_devices SET assigned_at = ? WHERE rollout = ? AND device = ? "
                    "AND assigned_at IS NULL",
                    (at, rollout, device),
                )

    def set_outcome(self, rollout: str, device: str, outcome: Outcome, detail: str | None, at: float) -> bool:
        return bool(self.set_outcomes(rollout, [(device, outcome, detail)], at))

    def set_outcomes(
        self, rollout: str, found: Sequence[tuple[str, Outcome, str | None]], at: float
    ) -> list[str]:
        recorded = []
        with self._cursor() as cur:
            for device, outcome, detail in found:
                self._q(
                    cur,
                    "UPDATE rollout_devices SET outcome = ?, outcome_at = ?, detail = ? "
                    "WHERE rollout = ? AND device = ? AND outcome IS NULL",
                    (outcome.value, at, detail, rollout, device),
                )
                if cur.rowcount > 0:
                    recorded.append(device)
        return recorded

    def mark_restored(self, rollout: str, device: str, how: str, at: float) -> None:
        with self._cursor() as cur:
            self._q(
                cur,
                "UPDATE rollout_devices SET restored = ?, restored_at = ? WHERE rollout = ? AND device = ?",
                (how, at, rollout, device),
            )

    # reading

    def _one(self, where: str, params: Sequence[Any]) -> Rollout | None:
        rows = self._all(f"SELECT {_ROLLOUT} FROM rollouts {where}", params)  # noqa: S608 (constant)
        return self._rollout(rows[0] if rows else None)

    def get(self, rollout_id: str) -> Rollout | None:
        return self._one("WHERE id = ?", (rollout_id,))

    def unfinished(self, model: str) -> Rollout | None:
        return self._one("WHERE model = ? AND state NOT IN ('completed', 'halted')", (model,))

    def latest(self, model: str) -> Rollout | None:
        return self._one("WHERE model = ? ORDER BY created_at DESC, id DESC LIMIT 1", (model,))

    def halted_unrestored(self, model: str) -> Rollout | None:
        r = self.latest(model)
        if r is None or r.state is not RolloutState.HALTED:
            return None
        pending = self._all(
            "SELECT 1 FROM rollout_devices "
            "WHERE rollout = ? AND assigned_at IS NOT NULL AND restored IS NULL",
            (r.id,),
        )
        return r if pending else None

    def devices(self, rollout_id: str) -> list[RolloutDevice]:
        from deploy.control.rollout import Role

        rows = self._all(
            f"SELECT {_DEVICE} FROM rollout_devices WHERE rollout = ? ORDER BY ordinal",  # noqa: S608
            (rollout_id,),
        )
        return [
            RolloutDevice(
                r[0], r[1], Role(r[2]), int(r[3]), r[4], r[5], int(r[6]), r[7], bytes(r[8]),
                bytes(r[9]) if r[9] is not None else None, r[10], r[11],
                Outcome(r[12]) if r[12] else None, r[13], r[14], r[15], r[16],
            )
            for r in rows
        ]  # fmt: skip

    def transitions(self, rollout_id: str) -> list[Transition]:
        rows = self._all(
            "SELECT seq, from_state, to_state, at, reason FROM rollout_transitions WHERE rollout = ? "
            "ORDER BY seq",
            (rollout_id,),
        )
        return [
            Transition(r[0], RolloutState(r[1]) if r[1] else None, RolloutState(r[2]), r[3], r[4])
            for r in rows
        ]
