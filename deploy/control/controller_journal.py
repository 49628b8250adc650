"""The controller's persisted state, in the fleet store's database: what it did and proposed (with the
reason), operator settings (pause, modes), quarantined devices and the manifest versions it has seen.

Tables (created with ``CREATE TABLE IF NOT EXISTS`` through :func:`deploy.observe.store.connect`, beside the
collector's and the rollouts' tables; a database without them simply has no controller history yet)::

    controller_actions   one row per action, proposal or note: kind, key, model, device, variant,
                         sha256, manifest_version, issued_at, state, reason, controller, at
                         state: applied | failed | proposed | approved | done | withdrawn | note
    controller_settings  key -> value: "paused" ("1"), "paused:<model>", "mode:<model>"
    controller_quarantine (device, model) -> at, reason
    controller_versions  (model, version) -> first_seen (the rollout's report_wait_s counts from it)

Every tick the controller rebuilds its :class:`deploy.control.controller_policy.Memory` from these tables and
the
rollout tables (:mod:`deploy.control.rollout`, same database), so a restarted or newly elected controller
knows
everything its predecessor did. The SQL is shared by SQLite and PostgreSQL: ``?`` placeholders and
column types translated by the store's dialect (:mod:`deploy.observe.store_sql`), ``ON CONFLICT`` upserts.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from deploy.control.controller_policy import MODES, RATE_WINDOW_S, Assigned, Memory, Mode, RolloutView
from deploy.errors import DeployError
from deploy.observe.store_sql import StoreError, close_quietly, driver_errors, open_store, parse_db_url, wrap


class JournalError(DeployError):
    """The controller's tables cannot be read or written."""


_SCHEMA = (
    """CREATE TABLE IF NOT EXISTS controller_actions (
    id {id},
    at {real} NOT NULL,
    controller TEXT NOT NULL,
    kind TEXT NOT NULL,
    key TEXT NOT NULL,
    model TEXT,
    device TEXT,
    variant TEXT,
    sha256 TEXT,
    manifest_version {int},
    issued_at {real},
    state TEXT NOT NULL,
    reason TEXT NOT NULL
)""",
    "CREATE INDEX IF NOT EXISTS controller_actions_state ON controller_actions (state, key)",
    "CREATE INDEX IF NOT EXISTS controller_actions_dm ON controller_actions (kind, state, issued_at)",
    "CREATE TABLE IF NOT EXISTS controller_settings (key TEXT PRIMARY KEY, value TEXT NOT NULL)",
    """CREATE TABLE IF NOT EXISTS controller_quarantine (
    device TEXT NOT NULL,
    model TEXT NOT NULL,
    at {real} NOT NULL,
    reason TEXT NOT NULL,
    PRIMARY KEY (device, model)
)""",
    """CREATE TABLE IF NOT EXISTS controller_versions (
    model TEXT NOT NULL,
    version {int} NOT NULL,
    first_seen {real} NOT NULL,
    PRIMARY KEY (model, version)
)""",
)

OPEN_PROPOSAL = ("proposed", "approved")


@dataclass(frozen=True, slots=True)
class ActionRow:
    id: int
    at: float
    controller: str
    kind: str
    key: str
    model: str | None
    device: str | None
    variant: str | None
    manifest_version: int | None
    state: str
    reason: str

    def as_dict(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in self.__slots__}


class Journal:
    """One connection to the fleet store (path, ``sqlite:///``, ``postgresql://``); every call commits."""

    def __init__(self, url: Path | str, readonly: bool = False) -> None:
        self.url = parse_db_url(url)
        try:
            opened = open_store(self.url, readonly=readonly)  # a writer creates/upgrades the store's schema
        except StoreError as err:
            raise JournalError(str(err)) from err
        self._conn: Any = opened.conn
        self._dialect = opened.dialect
        self._errors = driver_errors(opened.dialect)
        if readonly:
            return
        try:
            cur = self._conn.cursor()
            for statement in _SCHEMA:
                cur.execute(self._dialect.ddl(statement))
            self._conn.commit()
        except self._errors as err:
            close_quietly(self._conn)
            raise JournalError(f"cannot create the controller tables in {self.url.display}: {err}") from err

    @property
    def dialect(self) -> str:
        return self._dialect.name

    def close(self) -> None:
        close_quietly(self._conn)

    def __enter__(self) -> Journal:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _exec(self, sql: str, params: Sequence[Any] = ()) -> Any:
        try:
            cur = self._conn.cursor()
            cur.execute(self._dialect.sql(sql), self._dialect.params(tuple(params)))
            self._conn.commit()
        except self._errors as err:
            with contextlib.suppress(*self._errors):
                self._conn.rollback()
            raise JournalError(f"controller journal: {wrap(self._dialect, err, self.url)}") from err
        return cur

    def _rows(self, sql: str, params: Sequence[Any] = ()) -> list[Any]:
        try:
            cur = self._conn.cursor()
            cur.execute(self._dialect.sql(sql), self._dialect.params(tuple(params)))
            rows = list(cur.fetchall())
            self._conn.commit()  # PostgreSQL: end the read's transaction (next tick sees new rows)
        except self._errors as err:
            with contextlib.suppress(*self._errors):
                self._conn.rollback()
            raise JournalError(f"controller journal: {wrap(self._dialect, err, self.url)}") from err
        return rows

    def _has_table(self, name: str) -> bool:
        if self._dialect.name == "postgresql":
            return bool(self._rows("SELECT to_regclass(?) IS NOT NULL", (name,))[0][0])
        return bool(self._rows("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = ?", (name,)))

    # ------------------------------------------------------------------------------------------ writing

    def record(
        self,
        kind: str,
        key: str,
        state: str,
        reason: str,
        controller: str,
        model: str | None = None,
        device: str | None = None,
        variant: str | None = None,
        sha256: str | None = None,
        manifest_version: int | None = None,
        issued_at: float | None = None,
        at: float | None = None,
    ) -> int:
        cur = self._exec(
            "INSERT INTO controller_actions (at, controller, kind, key, model, device, variant, sha256, "
            "manifest_version, issued_at, state, reason) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (
                time.time() if at is None else at,
                controller,
                kind,
                key,
                model,
                device,
                variant,
                sha256,
                manifest_version,
                issued_at,
                state,
                reason[:4000],
            ),
        )
        return int(getattr(cur, "lastrowid", 0) or 0)

    def close_proposals(self, key: str, state: str) -> int:
        """Mark the open proposals of ``key`` ``done`` (applied) or ``withdrawn``."""
        cur = self._exec(
            "UPDATE controller_actions SET state = ? WHERE key = ? AND state IN ('proposed', 'approved')",
            (state, key),
        )
        return int(cur.rowcount)

    def approve(self, ids: Iterable[int] = (), model: str | None = None) -> list[ActionRow]:
        """Approve proposals by id, or every open one of ``model``; returns the rows approved."""
        wanted = list(ids)
        rows = [r for r in self.proposals() if r.state == "proposed"]
        if wanted:
            known = {r.id for r in rows}
            missing = [i for i in wanted if i not in known]
            if missing:
                raise JournalError(
                    f"no pending proposal {', '.join(map(str, missing))} (pending: "
                    f"{', '.join(str(r.id) for r in rows) or 'none'})"
                )
            rows = [r for r in rows if r.id in wanted]
        elif model is not None:
            rows = [r for r in rows if r.model == model]
        for r in rows:
            self._exec("UPDATE controller_actions SET state = 'approved' WHERE id = ?", (r.id,))
        return rows

    def set_setting(self, key: str, value: str | None) -> None:
        if value is None:
            self._exec("DELETE FROM controller_settings WHERE key = ?", (key,))
        else:
            self._exec(
                "INSERT INTO controller_settings (key, value) VALUES (?, ?) "
                "ON CONFLICT (key) DO UPDATE SET value = excluded.value",
                (key, value),
            )

    def quarantine(self, device: str, model: str, reason: str, at: float) -> bool:
        cur = self._exec(
            "INSERT INTO controller_quarantine (device, model, at, reason) VALUES (?, ?, ?, ?) "
            "ON CONFLICT (device, model) DO NOTHING",
            (device, model, at, reason),
        )
        return int(cur.rowcount) > 0

    def release(self, device: str, model: str | None = None) -> int:
        if model is None:
            cur = self._exec("DELETE FROM controller_quarantine WHERE device = ?", (device,))
        else:
            cur = self._exec(
                "DELETE FROM controller_quarantine WHERE device = ? AND model = ?", (device, model)
            )
        return int(cur.rowcount)

    def see_version(self, model: str, version: int, at: float) -> None:
        self._exec(
            "INSERT INTO controller_versions (model, version, first_seen) VALUES (?, ?, ?) "
            "ON CONFLICT (model, version) DO NOTHING",
            (model, version, at),
        )

    # ------------------------------------------------------------------------------------------ reading

    def settings(self) -> dict[str, str]:
        return {k: v for k, v in self._rows("SELECT key, value FROM controller_settings")}

    def proposals(self) -> list[ActionRow]:
        return self._actions("WHERE state IN ('proposed', 'approved') ORDER BY id")

    def recent(self, limit: int = 10) -> list[ActionRow]:
        """The last actions and notes (newest first), proposals excluded."""
        return self._actions("WHERE state NOT IN ('proposed', 'approved') ORDER BY id DESC LIMIT ?", (limit,))

    def quarantined(self) -> list[tuple[str, str, float, str]]:
        return [tuple(r) for r in self._rows("SELECT device, model, at, reason FROM controller_quarantine")]

    def _actions(self, where: str, params: Sequence[Any] = ()) -> list[ActionRow]:
        cols = "id, at, controller, kind, key, model, device, variant, manifest_version, state, reason"
        rows = self._rows(f"SELECT {cols} FROM controller_actions {where}", params)  # noqa: S608 (constant)
        return [ActionRow(*r) for r in rows]

    def memory(self, now: float, horizon_s: float = 3600.0) -> Memory:
        """The controller's :class:`Memory` as stored now (this journal's tables and the rollouts').

        Its own assignments are read back ``horizon_s`` only: they matter until the collector has stored
        them (seconds) and while they count as changing (``limits.settle_timeout_s``, less than that)."""
        settings = self.settings()
        modes: dict[str, Mode] = {}
        for k, v in settings.items():
            if k.startswith("mode:") and v in MODES:
                modes[k[5:]] = v
        applied: dict[tuple[str, str], Assigned] = {}
        # the newest assignment this controller published per device and model
        for device, model, variant, sha, version, issued_at in self._rows(
            "SELECT device, model, variant, sha256, manifest_version, issued_at FROM controller_actions "
            "WHERE kind = 'assign' AND state = 'applied' AND issued_at > ? ORDER BY issued_at, id",
            (now - horizon_s,),
        ):
            applied[(device, model)] = Assigned(variant, sha, int(version), float(issued_at))  # newest wins
        recent = [
            float(r[0])
            for r in self._rows(
                "SELECT issued_at FROM controller_actions WHERE kind = 'assign' AND state = 'applied' "
                "AND issued_at > ?",
                (now - RATE_WINDOW_S,),
            )
        ]
        rollouts: dict[tuple[str, int], RolloutView] = {}
        changing = 0
        if self._has_table("rollouts") and self._has_table("rollout_devices"):
            for rid, model, version, state in self._rows(
                "SELECT id, model, manifest_version, state FROM rollouts ORDER BY created_at, id"
            ):
                devices = self._rows(
                    "SELECT device, assigned_at, restored FROM rollout_devices WHERE rollout = ?", (rid,)
                )
                restore = state == "halted" and any(a is not None and r is None for _, a, r in devices)
                rollouts[(model, int(version))] = RolloutView(
                    rid, model, int(version), state, frozenset(d for d, _, _ in devices), restore
                )
            recent += [
                float(r[0])
                for r in self._rows(
                    "SELECT assigned_at FROM rollout_devices WHERE assigned_at > ?", (now - RATE_WINDOW_S,)
                )
            ]
            changing = self._rows(
                "SELECT count(*) FROM rollout_devices d JOIN rollouts r ON r.id = d.rollout "
                "WHERE r.state NOT IN ('completed', 'halted') AND d.assigned_at IS NOT NULL "
                "AND d.outcome IS NULL"
            )[0][0]
        settled = {
            (m, int(v))
            for m, v in self._rows(
                "SELECT model, manifest_version FROM controller_actions WHERE kind = 'rollout' "
                "AND state = 'settled'"
            )
        }
        open_rows = self.proposals()
        return Memory(
            paused=settings.get("paused") == "1",
            paused_models=frozenset(
                k[7:] for k, v in settings.items() if k.startswith("paused:") and v == "1"
            ),
            mode_overrides=modes,
            quarantined=frozenset((d, m) for d, m, _, _ in self.quarantined()),
            applied=applied,
            recent_assignments=tuple(recent),
            rollouts=rollouts,
            settled_versions=frozenset(settled),
            rollout_changing=int(changing),
            first_seen={
                (m, int(v)): float(t)
                for m, v, t in self._rows("SELECT model, version, first_seen FROM controller_versions")
            },
            pending=frozenset(r.key for r in open_rows if r.state == "proposed"),
            approved=frozenset(r.key for r in open_rows if r.state == "approved"),
        )


def summary_lines(url: Path | str, last: int = 10) -> list[str]:
    """For ``edgefleet fleet``: the controller's pending proposals and its last actions (empty: none)."""
    try:
        with Journal(url, readonly=True) as journal:
            if not journal._has_table("controller_actions"):
                return []
            pending = journal.proposals()
            recent = journal.recent(last)
            paused = sorted(k for k, v in journal.settings().items() if k.startswith("paused") and v == "1")
            quarantined = journal.quarantined()
    except JournalError:
        return []
    lines: list[str] = []
    if paused:
        lines.append("controller paused: " + ", ".join(paused) + " (edgefleet resume)")
    for device, model, _, why in sorted(quarantined):
        lines.append(f"quarantined: {device} for {model}: {why[:160]}")
    if pending:
        lines.append(f"pending proposals ({len(pending)}; apply with `edgefleet approve ID`):")
        lines += [f"  #{r.id} [{r.state}] {r.key}: {r.reason[:160]}" for r in pending]
    if recent:
        lines.append("controller's last actions:")
        lines += [
            f"  {time.strftime('%H:%M:%S', time.localtime(r.at))} {r.state:9} {r.key}: {r.reason[:160]}"
            for r in recent
        ]
    return lines
