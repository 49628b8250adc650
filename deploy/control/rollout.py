"""Staged rollouts: canary devices first, the rest only after every canary committed.

::

    edgefleet rollout MODEL [--canary N | --canary-percent P] [--canary-device D ...] [--policy P]
                            [--key K] [--state-db PATH] [--wait] [--timeout S] [--resume] [--json]
                            [--db URL | --from-broker [--allow-partial]]
    edgefleet rollout status MODEL [--state-db PATH] [--json]
    edgefleet rollout abort MODEL [--key K] [--state-db PATH]

State machine (one row per rollout in SQLite; every transition is written, and committed, *before*
the work it announces, so a controller killed at any point resumes into a consistent state)::

    planned ──► canary_assigned ──► canary_committed ──► rolling_out ──► completed
       │              │                    │                  │
       └──────────────┴────────────────────┴──────────────────┴──────► halted

``TRANSITIONS`` is the whole table; :meth:`RolloutStore.transition` refuses anything else.

* **planned**: the policy's decisions are frozen: per device the variant, its sha256, the signed
  assignment (carrying ``rollout=<id>``), the assignment the broker held before (to restore on halt)
  and the timestamp of the status the device had then. Devices already running the chosen file
  (committed) and devices for which no variant meets the policy are left out.
* **canary_assigned**: canary assignments are published (retained, QoS1). Canaries are the first N
  (``--canary``, default 1, or ``--canary-percent``, at least 1) of: devices named with
  ``--canary-device``, then online devices by id, then offline ones by id. Deterministic, and an
  offline device is never picked while an online one is available.
* **canary_committed**: every canary's retained ``Status`` shows the assigned sha256 active and the
  model ``committed``.
* **rolling_out**: the other devices' assignments are published.
* **completed**: every device settled (committed, rolled back or refused). A non-canary that rolls
  back has already restored its previous model on its own; it is listed, the rollout is not halted.
* **halted**: a canary rolled back (its status turned ``rolled_back`` after the assignment, or its
  ``rolled_back`` event named the assigned sha256), or refused the assignment (``rejected`` event),
  or the operator ran ``rollout abort``. Non-canaries are then never assigned. Every device that was
  assigned is restored: a device still running the rollout's file gets a signed ``rollback``
  command (the agent swaps back to ``previous.tflite``; a device that rolled back by itself needs
  none), then the retained assignment is put back as it was: the exact bytes the broker held before
  (still validly signed), or, if there was none, an empty retained payload that deletes it. Clearing
  alone would not change a running device (the agent ignores an empty assignment), and leaving the
  rollout's assignment retained would re-apply the failed variant to a device that reconnects with a
  fresh state; hence both.

Re-running ``edgefleet rollout MODEL`` continues the model's unfinished rollout (``--resume`` insists
on one); publishing is idempotent (the stored, signed bytes are republished). Without ``--wait`` a run
advances as far as the fleet's current state allows and returns; with ``--wait`` it follows the
devices until ``completed`` / ``halted`` or ``--timeout`` (exit 2; the state stays, re-run to go on).

The state lives in its own SQLite file (default ``$EDGEFLEET_HOME/rollouts.db``); ``--state-db`` may
point at the collector's database (the table names do not collide).
"""

from __future__ import annotations

import math
import secrets
import sqlite3
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, replace
from enum import StrEnum
from pathlib import Path
from typing import Any, Protocol

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from agent import wire
from deploy.broker.client import Bus, Watch
from deploy.errors import RolloutError

Progress = Callable[[str], None]


def _quiet(_: str) -> None:
    return None


class RolloutState(StrEnum):
    PLANNED = "planned"
    CANARY_ASSIGNED = "canary_assigned"
    CANARY_COMMITTED = "canary_committed"
    ROLLING_OUT = "rolling_out"
    COMPLETED = "completed"
    HALTED = "halted"


S = RolloutState
TRANSITIONS: Mapping[RolloutState, frozenset[RolloutState]] = {
    S.PLANNED: frozenset({S.CANARY_ASSIGNED, S.HALTED}),
    S.CANARY_ASSIGNED: frozenset({S.CANARY_COMMITTED, S.HALTED}),
    S.CANARY_COMMITTED: frozenset({S.ROLLING_OUT, S.HALTED}),
    S.ROLLING_OUT: frozenset({S.COMPLETED, S.HALTED}),
    S.COMPLETED: frozenset(),
    S.HALTED: frozenset(),
}
TERMINAL = frozenset(s for s, nxt in TRANSITIONS.items() if not nxt)


def check_transition(current: RolloutState, target: RolloutState) -> None:
    if target not in TRANSITIONS[current]:
        allowed = ", ".join(sorted(TRANSITIONS[current])) or "none (final state)"
        raise RolloutError(f"illegal rollout transition {current} -> {target} (allowed: {allowed})")


class Role(StrEnum):
    CANARY = "canary"
    REST = "rest"


class Outcome(StrEnum):
    COMMITTED = "committed"
    ROLLED_BACK = "rolled_back"
    REJECTED = "rejected"


FAILED = frozenset({Outcome.ROLLED_BACK, Outcome.REJECTED})


@dataclass(frozen=True, slots=True)
class Rollout:
    id: str
    model: str
    manifest_version: int
    policy: str
    state: RolloutState
    created_at: float
    updated_at: float
    reason: str | None = None

    @property
    def finished(self) -> bool:
        return self.state in TERMINAL


@dataclass(frozen=True, slots=True)
class RolloutDevice:
    rollout: str
    device: str
    role: Role
    ordinal: int
    variant: str
    sha256: str
    manifest_version: int
    why: str
    assignment: bytes  # the signed assignment, published as is (idempotent on resume)
    previous: bytes | None  # what the broker held retained before the rollout (restored on halt)
    baseline_status_ts: float | None  # the device's status timestamp when the rollout was planned
    assigned_at: float | None = None
    outcome: Outcome | None = None
    outcome_at: float | None = None
    detail: str | None = None
    restored: str | None = None
    restored_at: float | None = None

    def as_dict(self) -> dict[str, Any]:
        return {
            "device": self.device,
            "role": self.role.value,
            "variant": self.variant,
            "sha256": self.sha256,
            "manifest_version": self.manifest_version,
            "assigned_at": self.assigned_at,
            "outcome": self.outcome.value if self.outcome else None,
            "outcome_at": self.outcome_at,
            "detail": self.detail,
            "had_previous_assignment": self.previous is not None,
            "restored": self.restored,
        }


@dataclass(frozen=True, slots=True)
class Transition:
    seq: int
    from_state: RolloutState | None
    to_state: RolloutState
    at: float
    reason: str | None


# ---------------------------------------------------------------- persistence

_SCHEMA = """
CREATE TABLE IF NOT EXISTS rollouts (
    id TEXT PRIMARY KEY,
    model TEXT NOT NULL,
    manifest_version INTEGER NOT NULL,
    policy TEXT NOT NULL,
    state TEXT NOT NULL,
    created_at REAL NOT NULL,
    updated_at REAL NOT NULL,
    reason TEXT
);
CREATE UNIQUE INDEX IF NOT EXISTS rollouts_one_unfinished_per_model
    ON rollouts (model) WHERE state NOT IN ('completed', 'halted');
CREATE TABLE IF NOT EXISTS rollout_devices (
    rollout TEXT NOT NULL REFERENCES rollouts (id),
    device TEXT NOT NULL,
    role TEXT NOT NULL,
    ordinal INTEGER NOT NULL,
    variant TEXT NOT NULL,
    sha256 TEXT NOT NULL,
    manifest_version INTEGER NOT NULL,
    why TEXT NOT NULL,
    assignment BLOB NOT NULL,
    previous BLOB,
    baseline_status_ts REAL,
    assigned_at REAL,
    outcome TEXT,
    outcome_at REAL,
    detail TEXT,
    restored TEXT,
    restored_at REAL,
    PRIMARY KEY (rollout, device)
);
CREATE TABLE IF NOT EXISTS rollout_transitions (
    rollout TEXT NOT NULL REFERENCES rollouts (id),
    seq INTEGER NOT NULL,
    from_state TEXT,
    to_state TEXT NOT NULL,
    at REAL NOT NULL,
    reason TEXT,
    PRIMARY KEY (rollout, seq)
);
"""

_ROLLOUT_COLUMNS = "id, model, manifest_version, policy, state, created_at, updated_at, reason"
_DEVICE_COLUMNS = (
    "rollout, device, role, ordinal, variant, sha256, manifest_version, why, assignment, previous, "
    "baseline_status_ts, assigned_at, outcome, outcome_at, detail, restored, restored_at"
)


def default_state_db() -> Path:
    from deploy.keys import default_key_dir

    return default_key_dir() / "rollouts.db"


class RolloutStore:
    """Rollout state in SQLite (WAL; every method commits before it returns)."""

    def __init__(self, path: Path | str, timeout_s: float = 10.0) -> None:
        self.path = Path(path)
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._conn = sqlite3.connect(str(self.path), timeout=timeout_s)
            self._conn.execute("PRAGMA journal_mode = WAL")
            self._conn.execute("PRAGMA synchronous = FULL")  # a transition must survive a power cut
            self._conn.executescript(_SCHEMA)
            self._conn.commit()
        except (OSError, sqlite3.Error) as err:
            raise RolloutError(f"cannot open the rollout database {self.path}: {err}") from err

    def close(self) -> None:
        self._conn.close()

    def __enter__(self) -> RolloutStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # The primitives every method below is written with; deploy.control.controller_rollouts'
    # SqlRolloutStore replaces only these, to keep the same tables in a PostgreSQL fleet store.
    _FOR_UPDATE = ""  # SQLite locks the database for a write transaction: no row lock to ask for
    _NEWEST = "created_at DESC, rowid DESC"

    @contextmanager
    def _cursor(self) -> Iterator[Any]:
        """One transaction: commits at the end, rolls back and raises RolloutError on a database error."""
        try:
            with self._conn:  # commits, or rolls back on an exception
                yield self._conn.cursor()
        except sqlite3.IntegrityError as err:
            raise RolloutError(f"rollout database refused the change: {err}") from err
        except sqlite3.Error as err:
            raise RolloutError(f"rollout database error ({self.path}): {err}") from err

    def _q(self, cur: Any, sql: str, params: Sequence[Any] = ()) -> Any:
        cur.execute(sql, tuple(params))
        return cur

    def _many(self, cur: Any, sql: str, rows: Sequence[Sequence[Any]]) -> None:
        cur.executemany(sql, [tuple(r) for r in rows])

    def _all(self, sql: str, params: Sequence[Any] = ()) -> list[Any]:
        with self._cursor() as cur:
            return list(self._q(cur, sql, params).fetchall())

    # writing

    def create(self, rollout: Rollout, devices: Sequence[RolloutDevice]) -> None:
        if rollout.state is not S.PLANNED:
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
                f"INSERT INTO rollouts ({_ROLLOUT_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",  # noqa: S608
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
                self._many(
                    cur,
                    f"INSERT INTO rollout_devices ({_DEVICE_COLUMNS}) VALUES ({', '.join('?' * 17)})",  # noqa: S608
                    rows,
                )
            self._q(
                cur,
                "INSERT INTO rollout_transitions (rollout, seq, from_state, to_state, at, reason) "
                "VALUES (?, 0, NULL, ?, ?, ?)",
                (r.id, r.state.value, r.created_at, r.reason),
            )

    def transition(self, rollout: Rollout, target: RolloutState, reason: str, at: float) -> Rollout:
        """Move ``rollout`` to ``target`` (checked against the table and against the stored state)."""
        with self._cursor() as cur:
            row = self._q(
                cur,
                f"SELECT state FROM rollouts WHERE id = ?{self._FOR_UPDATE}",  # noqa: S608 (a constant)
                (rollout.id,),
            ).fetchone()
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
        """One transaction for many devices: a commit costs an fsync (~3 ms here), 2,000 of them 6 s."""
        with self._cursor() as cur:
            self._many(
                cur,
                "UPDATE rollout_devices SET assigned_at = ? WHERE rollout = ? AND device = ? "
                "AND assigned_at IS NULL",
                [(at, rollout, device) for device in devices],
            )

    def set_outcome(self, rollout: str, device: str, outcome: Outcome, detail: str | None, at: float) -> bool:
        """Record the first outcome of a device (later evidence does not overwrite it)."""
        return bool(self.set_outcomes(rollout, [(device, outcome, detail)], at))

    def set_outcomes(
        self, rollout: str, found: Sequence[tuple[str, Outcome, str | None]], at: float
    ) -> list[str]:
        """:meth:`set_outcome` for many devices in one transaction; the devices whose outcome was new."""
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

    def _rollout(self, row: Sequence[Any] | None) -> Rollout | None:
        if row is None:
            return None
        return Rollout(row[0], row[1], int(row[2]), row[3], RolloutState(row[4]), row[5], row[6], row[7])

    def _one(self, where: str, params: Sequence[Any]) -> Rollout | None:
        rows = self._all(f"SELECT {_ROLLOUT_COLUMNS} FROM rollouts {where}", params)  # noqa: S608 (constant)
        return self._rollout(rows[0] if rows else None)

    def get(self, rollout_id: str) -> Rollout | None:
        return self._one("WHERE id = ?", (rollout_id,))

    def unfinished(self, model: str) -> Rollout | None:
        return self._one("WHERE model = ? AND state NOT IN ('completed', 'halted')", (model,))

    def latest(self, model: str) -> Rollout | None:
        return self._one(f"WHERE model = ? ORDER BY {self._NEWEST} LIMIT 1", (model,))

    def halted_unrestored(self, model: str) -> Rollout | None:
        """The latest rollout of ``model`` if it halted before every assigned device was restored."""
        r = self.latest(model)
        if r is None or r.state is not S.HALTED:
            return None
        pending = self._all(
            "SELECT 1 FROM rollout_devices "
            "WHERE rollout = ? AND assigned_at IS NOT NULL AND restored IS NULL",
            (r.id,),
        )
        return r if pending else None

    def devices(self, rollout_id: str) -> list[RolloutDevice]:
        rows = self._all(
            f"SELECT {_DEVICE_COLUMNS} FROM rollout_devices WHERE rollout = ? ORDER BY ordinal",  # noqa: S608
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


# ---------------------------------------------------------------- time (a seam for tests)


class Clock(Protocol):
    def time(self) -> float: ...

    def monotonic(self) -> float: ...


class SystemClock:
    def time(self) -> float:
        return time.time()

    def monotonic(self) -> float:
        return time.monotonic()


# ---------------------------------------------------------------- planning (pure)


def canary_count(n: int, canaries: int | None = None, percent: float | None = None) -> int:
    """How many of ``n`` devices are canaries: N, or ceil(P % of n) but at least 1; never more than n."""
    if n == 0:
        return 0
    if percent is not None:
        want = max(1, math.ceil(n * percent / 100.0 - 1e-9))
    else:
        want = 1 if canaries is None else canaries
    return max(0, min(n, want))


def order_canaries(
    devices: Iterable[str], statuses: Mapping[str, wire.Status], preferred: Sequence[str] = ()
) -> list[str]:
    """Candidates in canary order: ``preferred`` (as given), then online devices by id, then the rest."""
    pool = set(devices)
    head = [d for d in dict.fromkeys(preferred) if d in pool]
    tail = sorted(
        pool - set(head),
        key=lambda d: (not (statuses[d].online if d in statuses else False), d),
    )
    return head + tail


def new_rollout_id(model: str, version: int) -> str:
    return wire.check_id(f"{model[:40]}-v{version}-{secrets.token_hex(3)}", "rollout id")


# ---------------------------------------------------------------- the controller


@dataclass(frozen=True, slots=True)
class PlanResult:
    rollout: Rollout | None
    skipped: dict[str, str]  # device -> why it is not part of the rollout


class RolloutController:
    """Plans and advances rollouts of one broker; all state goes through :class:`RolloutStore`."""

    def __init__(
        self,
        bus: Bus,
        store: RolloutStore,
        key: Ed25519PrivateKey,
        clock: Clock | None = None,
        progress: Progress = _quiet,
        poll_s: float = 0.5,
    ) -> None:
        self.bus = bus
        self.store = store
        self.key = key
        self.clock: Clock = clock or SystemClock()
        self.progress = progress
        self.poll_s = poll_s
        self.statuses: dict[str, wire.Status] = {}
        self.events: dict[str, list[wire.Event]] = {}
        self.assign_limit: int | None = None  # at most this many assignments per step (None: no limit)

    # planning

    def plan(
        self,
        model: str,
        policy: Any,
        canaries: int | None = None,
        canary_percent: float | None = None,
        canary_devices: Sequence[str] = (),
        allow_partial: bool = False,
    ) -> PlanResult:
        """Select per device, freeze the decisions, persist a ``planned`` rollout (None: nothing to do).

        A retained burst that looks cut (``deploy.observe.state``) is refused unless ``allow_partial``.
        """
        from deploy.observe.state import collect_state

        state = collect_state(self.bus, model)
        if state.cut:
            if not allow_partial:
                raise RolloutError(f"{state.cut_message()}; --allow-partial decides on what arrived")
            self.progress(f"warning: {state.cut_message()} (--allow-partial: deciding on what arrived)")
        return self.plan_from_state(state, model, policy, canaries, canary_percent, canary_devices)

    def plan_from_state(
        self,
        state: Any,
        model: str,
        policy: Any,
        canaries: int | None = None,
        canary_percent: float | None = None,
        canary_devices: Sequence[str] = (),
        only: Iterable[str] | None = None,
    ) -> PlanResult:
        """:meth:`plan` on a state already read (``deploy.observe.state.FleetState``; the controller reads its
        store), for the devices in ``only`` if given."""
        from deploy.control.assign import make_assignment, plan

        p = plan(state, model, policy, only)
        skipped: dict[str, str] = {d: "no report for this manifest version" for d in p.devices_without_report}
        targets = []
        for d in p.decisions:
            if d.variant is None or d.sha256 is None:
                skipped[d.device] = d.why
                continue
            ms = state.statuses[d.device].models.get(model) if d.device in state.statuses else None
            if ms and ms.active and ms.active.sha256 == d.sha256 and ms.state is wire.ModelState.COMMITTED:
                skipped[d.device] = f"already runs {d.variant} (committed)"
                continue
            targets.append(d)
        if not targets:
            return PlanResult(None, skipped)
        now = self.clock.time()
        rollout = Rollout(
            id=new_rollout_id(model, p.manifest.version),
            model=model,
            manifest_version=p.manifest.version,
            policy=policy.name,
            state=S.PLANNED,
            created_at=now,
            updated_at=now,
            reason=f"{len(targets)} device(s) to change",
        )
        by_device = {d.device: d for d in targets}
        order = order_canaries(by_device, state.statuses, canary_devices)
        n_canary = canary_count(len(order), canaries, canary_percent)
        devices = []
        for i, dev in enumerate(order):
            d = by_device[dev]
            signed = make_assignment(d, self.key, issued_at=now, rollout=rollout.id)
            status = state.statuses.get(dev)
            prior = state.assignments.get((dev, model))
            devices.append(
                RolloutDevice(
                    rollout=rollout.id,
                    device=dev,
                    role=Role.CANARY if i < n_canary else Role.REST,
                    ordinal=i,
                    variant=d.variant or "",
                    sha256=d.sha256 or "",
                    manifest_version=d.manifest_version,
                    why=d.why,
                    assignment=signed.to_json(),
                    previous=prior.to_json() if prior is not None else None,
                    baseline_status_ts=status.ts if status else None,
                )
            )
        self.store.create(rollout, devices)
        canary_names = ", ".join(d.device for d in devices if d.role is Role.CANARY)
        self.progress(
            f"rollout {rollout.id}: planned {len(devices)} device(s) of {model} v{p.manifest.version}, "
            f"canaries: {canary_names}"
        )
        return PlanResult(rollout, skipped)

    # observing

    def observe(self, messages: Iterable[tuple[str, bytes]]) -> None:
        """Absorb statuses and events (skipping anything that does not decode)."""
        topics = self.bus.topics
        for topic, payload in messages:
            if not payload:
                continue
            try:  # wire's one decoder: a payload for another device than its topic's is refused
                decoded = wire.decode_inbound(topics, topic, payload)
            except wire.WireError:
                continue
            msg, device = decoded.message, decoded.topic.device
            if isinstance(msg, wire.Status) and device:
                old = self.statuses.get(device)
                if old is None or msg.ts >= old.ts:
                    self.statuses[device] = msg
            elif isinstance(msg, wire.Event) and device:
                self.events.setdefault(device, []).append(msg)

    def outcome_of(self, model: str, d: RolloutDevice) -> tuple[Outcome, str] | None:
        """What the device made of its assignment, from events and its status; None: not settled yet."""
        if d.assigned_at is None:
            return None
        for ev in self.events.get(d.device, []):
            if ev.model not in (None, model) or ev.sha256 != d.sha256:
                continue
            if ev.kind is wire.EventKind.ROLLED_BACK:
                return Outcome.ROLLED_BACK, f"rolled back: {ev.reason or ''} {ev.detail or ''}".strip()
            if ev.kind is wire.EventKind.REJECTED:
                return (
                    Outcome.REJECTED,
                    f"refused the assignment: {ev.reason or ''} {ev.detail or ''}".strip(),
                )
        status = self.statuses.get(d.device)
        ms = status.models.get(model) if status else None
        if status is None or ms is None:
            return None
        if ms.state is wire.ModelState.COMMITTED and ms.active and ms.active.sha256 == d.sha256:
            return Outcome.COMMITTED, f"committed {d.variant}"
        newer = d.baseline_status_ts is None or status.ts > d.baseline_status_ts
        if ms.state is wire.ModelState.ROLLED_BACK and newer:
            return Outcome.ROLLED_BACK, f"rolled back: {ms.detail or 'no detail'}"
        return None

    # advancing

    def _move(self, r: Rollout, target: RolloutState, reason: str) -> Rollout:
        r = self.store.transition(r, target, reason, self.clock.time())
        self.progress(f"rollout {r.id}: {target} — {reason}")
        return r

    def _assign(self, r: Rollout, devices: Sequence[RolloutDevice]) -> bool:
        todo = [d for d in devices if d.assigned_at is None]
        if self.assign_limit is not None:  # the controller's rate limits: the rest waits for a later step
            todo = todo[: max(0, self.assign_limit)]
        for d in todo:
            self.bus.publish(self.bus.topics.assign(d.device, r.model), d.assignment, retain=True)
        if todo:
            self.bus.flush()
            self.store.mark_assigned_many(r.id, [d.device for d in todo], self.clock.time())
            for d in todo:
                self.progress(f"  {d.device}: assigned {d.variant} ({d.role})")
        return bool(todo)

    def _settle(self, r: Rollout, devices: Sequence[RolloutDevice]) -> list[RolloutDevice]:
        found = []
        for d in devices:
            if d.outcome is None and (seen := self.outcome_of(r.model, d)) is not None:
                found.append((d.device, seen[0], seen[1]))
        if found:  # one transaction per step, not one per device
            recorded = set(self.store.set_outcomes(r.id, found, self.clock.time()))
            for device, _outcome, detail in found:
                if device in recorded:
                    self.progress(f"  {device}: {detail}")
        wanted = {x.device for x in devices}
        return [d for d in self.store.devices(r.id) if d.device in wanted]

    def step(self, r: Rollout) -> tuple[Rollout, bool]:
        """One move of the state machine on what is known now; returns (rollout, whether anything changed)."""
        devices = self.store.devices(r.id)
        canaries = [d for d in devices if d.role is Role.CANARY]
        rest = [d for d in devices if d.role is Role.REST]
        if r.state is S.PLANNED:
            return self._move(r, S.CANARY_ASSIGNED, f"assigning {len(canaries)} canary device(s)"), True
        if r.state is S.CANARY_ASSIGNED:
            changed = self._assign(r, canaries)
            canaries = self._settle(r, canaries)
            failed = [d for d in canaries if d.outcome in FAILED]
            if failed:
                why = "; ".join(f"canary {d.device} {d.detail}" for d in failed)
                return self.halt(r, why), True
            if all(d.outcome is Outcome.COMMITTED for d in canaries):
                return self._move(
                    r, S.CANARY_COMMITTED, f"all {len(canaries)} canary device(s) committed"
                ), True
            return r, changed
        if r.state is S.CANARY_COMMITTED:
            return self._move(r, S.ROLLING_OUT, f"assigning the other {len(rest)} device(s)"), True
        if r.state is S.ROLLING_OUT:
            changed = self._assign(r, rest)
            everyone = self._settle(r, devices)
            if all(d.outcome is not None for d in everyone):
                bad = [d.device for d in everyone if d.outcome in FAILED]
                ok = len(everyone) - len(bad)
                note = f"{ok} committed" + (
                    f", {len(bad)} rolled back or refused: {', '.join(bad)}" if bad else ""
                )
                return self._move(r, S.COMPLETED, note), True
            return r, changed
        if r.state is S.HALTED:
            return r, self._restore(r, devices)
        return r, False

    def halt(self, r: Rollout, reason: str) -> Rollout:
        """Persist ``halted``, then restore every device that was assigned."""
        r = self._move(r, S.HALTED, reason)
        self._restore(r, self.store.devices(r.id))
        return r

    def _restore(self, r: Rollout, devices: Sequence[RolloutDevice]) -> bool:
        from deploy.control.command import make_command

        todo = [d for d in devices if d.assigned_at is not None and d.restored is None]
        for d in todo:
            how = []
            status = self.statuses.get(d.device)
            ms = status.models.get(r.model) if status else None
            running = (
                ms is not None
                and ms.active is not None
                and ms.active.sha256 == d.sha256
                and ms.state
                in (wire.ModelState.COMMITTED, wire.ModelState.PROBATION, wire.ModelState.ACTIVATING)
            )
            if running:
                cmd = make_command(
                    d.device,
                    wire.CommandAction.ROLLBACK,
                    self.key,
                    model=r.model,
                    correlation_id=wire.check_id(f"rb-{secrets.token_hex(8)}"),
                    issued_at=self.clock.time(),
                )
                self.bus.publish(self.bus.topics.cmd(d.device), cmd.to_json(), retain=False, qos=1)
                how.append(f"rollback command {cmd.id}")
            topic = self.bus.topics.assign(d.device, r.model)
            if d.previous is not None:
                self.bus.publish(topic, d.previous, retain=True)
                how.append("previous assignment republished")
            else:
                self.bus.publish(topic, b"", retain=True)
                how.append("assignment cleared")
            self.bus.flush()
            self.store.mark_restored(r.id, d.device, "; ".join(how), self.clock.time())
            self.progress(f"  {d.device}: restored ({'; '.join(how)})")
        return bool(todo)

    def abort(self, r: Rollout, reason: str = "aborted by the operator") -> Rollout:
        with self._watching() as watch:
            self._absorb_quiet(watch)
            if r.finished:
                raise RolloutError(f"rollout {r.id} is already {r.state}")
            return self.halt(r, reason)

    @contextmanager
    def _watching(self) -> Iterator[Watch]:
        topics = self.bus.topics
        with self.bus.watch([topics.all_statuses(), topics.all_events()]) as watch:
            yield watch

    def _absorb_quiet(self, watch: Watch, quiet_s: float = 0.3, max_s: float = 5.0) -> None:
        """Take in the retained burst that follows the subscription (until ``quiet_s`` without news)."""
        end = self.clock.monotonic() + max_s
        while self.clock.monotonic() < end:
            if not watch.wait(quiet_s):
                break
            self.observe(watch.drain())
        self.observe(watch.drain())

    def _resync_statuses(self, dropped: int) -> None:
        """The watch is bounded and drops its oldest messages when the fleet outpaces us (4,950 devices
        settling at once: ~25,000 statuses and events in seconds, 1,631 outcomes lost and the rollout
        stuck, benches/fleet_sim.py). Statuses are retained and carry the outcome: read them all again."""
        self.progress(f"  {dropped} message(s) dropped while busy: reading every device's status again")
        self.observe(self.bus.collect_retained([self.bus.topics.all_statuses()]).items())

    def run(self, r: Rollout, wait: bool = False, timeout_s: float | None = None) -> Rollout:
        """Advance ``r``: without ``wait`` as far as possible now, with it until final or timeout."""
        with self._watching() as watch:
            self._absorb_quiet(watch)
            deadline = None if timeout_s is None else self.clock.monotonic() + timeout_s
            dropped = watch.dropped
            while True:
                self.observe(watch.drain())
                if watch.dropped > dropped:
                    dropped = watch.dropped
                    self._resync_statuses(dropped)
                r, changed = self.step(r)
                if r.finished and not changed:
                    return r
                if changed:
                    continue
                if not wait:
                    return r
                left = self.poll_s if deadline is None else deadline - self.clock.monotonic()
                if left <= 0:
                    return r
                watch.wait(min(left, self.poll_s))
