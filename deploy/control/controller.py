"""``edgefleet controller``: keeps every device on its best variant, with no operator in the loop.

::

    edgefleet controller [--db URL] [--policy controller.toml] [--select-policy P] [--key K] [--name N]
                         [broker options]
    edgefleet approve [ID ...] [--model M] [--db URL]       apply proposals (mode "approve")
    edgefleet mode MODEL auto|approve|manual|policy [--db URL]   a model's mode, over the policy file's
    edgefleet pause [MODEL] [--db URL]                      stop acting (on one model, or on all)
    edgefleet resume [MODEL] [--device D] [--db URL]        act again; --device releases a quarantine

A thin shell around the pure :func:`deploy.control.controller_policy.decide`: every ``interval_s`` (``while
not
stop.wait(t)``) it takes the leader lock (or stands by), reads the fleet store (``edgefleet collect``'s
database; manifests verified with the fleet key), rebuilds its memory from the store
(:mod:`deploy.control.controller_journal`, :mod:`deploy.control.rollout`'s tables in the same database),
decides, and
applies: signed retained assignments (:func:`deploy.control.assign.make_assignment`), staged rollouts
(:class:`deploy.control.rollout.RolloutController`, whose state lives in the same database, SQLite or
PostgreSQL (:mod:`deploy.control.controller_rollouts`), so whoever leads next resumes them), quarantines,
proposals. Every action, proposal and note is journaled with its reason.

One controller acts at a time: the leader holds an exclusive ``fcntl`` lock on ``<db>.controller.lock``
(SQLite) or a ``pg_try_advisory_lock`` (PostgreSQL); the kernel or the server drops it when the process
dies, even by SIGKILL; the others retry it every tick and take over.
Nothing here stops on bad input: a store it cannot read or lock, a broker it cannot reach, a manifest that
fails verification are a log line (and a note in the journal when the store is reachable), and the next
tick tries again. Under systemd (Type=notify) it sends READY=1 once running and WATCHDOG=1 every tick.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import logging
import os
import signal
import socket
import sys
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from agent import wire
from agent.notify import Notifier
from deploy.broker.client import Bus
from deploy.control.controller_journal import Journal, JournalError
from deploy.control.controller_policy import (
    MODES,
    Action,
    AdvanceRollout,
    AssignAction,
    ControllerPolicy,
    HealthFailure,
    Memory,
    Note,
    Propose,
    QuarantineAction,
    Snapshot,
    StartRollout,
    Withdraw,
    decide,
    load_controller_policy,
)
from deploy.errors import DeployError, PolicyError, RolloutError

log = logging.getLogger("edgefleet.controller")

EVENT_KINDS = ("rolled_back", "rejected")  # what rollouts and quarantine read from the event log
MAX_ROLLOUT_STEPS = 16  # state-machine moves per rollout per tick (a rollout has at most 5 transitions)
NOTE_EVERY_S = 3600.0  # the same note is journaled at most once an hour (it is logged once per process)


# ---------------------------------------------------------------------------------------------- leader


class LeaderLock:
    """An exclusive, non-blocking ``flock`` on a file next to the SQLite database.

    PostgreSQL would use ``pg_try_advisory_lock`` on the store's connection instead (not done yet: the
    store has no PostgreSQL backend in this tree).
    """

    def __init__(self, db: Path) -> None:
        self.path = db.with_name(db.name + ".controller.lock")
        self._fh: IO[str] | None = None

    @property
    def held(self) -> bool:
        return self._fh is not None

    def try_acquire(self, name: str) -> bool:
        if self._fh is not None:
            return True
        try:
            fh = self.path.open("a+", encoding="utf-8")
        except OSError as err:
            log.warning("cannot open the leader lock %s: %s", self.path, err)
            return False
        try:
            fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            fh.close()
            return False
        fh.seek(0)
        fh.truncate()
        fh.write(f"{name} pid {os.getpid()} since {time.time():.0f}\n")
        fh.flush()
        self._fh = fh
        return True

    def holder(self) -> str:
        try:
            return self.path.read_text(encoding="utf-8").strip() or "unknown"
        except OSError:
            return "unknown"

    def release(self) -> None:
        if self._fh is not None:
            with contextlib.suppress(OSError):
                fcntl.flock(self._fh.fileno(), fcntl.LOCK_UN)
            self._fh.close()
            self._fh = None


class AdvisoryLock:
    """PostgreSQL: a session-level ``pg_try_advisory_lock`` held on a connection of its own (the server
    drops it when that connection ends: process killed, host gone, network cut)."""

    KEY = 0x6564676566_6C74  # "edgefleet" in spirit: one fixed 64-bit key per database

    def __init__(self, url: Any) -> None:
        self.url = url
        self._conn: Any = None

    @property
    def held(self) -> bool:
        return self._conn is not None

    def try_acquire(self, name: str) -> bool:
        from deploy.observe.store_sql import POSTGRES, close_quietly, lost_connection, open_store

        if self._conn is not None:
            if not lost_connection(POSTGRES, self._conn):
                return True
            log.warning("lost the connection holding the leader lock: standing by")
            close_quietly(self._conn)
            self._conn = None
            return False
        try:
            opened = open_store(self.url, readonly=True)
            cur = opened.conn.cursor()
            cur.execute("SELECT pg_try_advisory_lock(%s)", (self.KEY,))
            got = bool(cur.fetchone()[0])
        except Exception as err:  # noqa: BLE001 (driver errors of an optional package: log, stand by)
            log.warning("cannot take the leader lock on %s: %s", self.url.display, err)
            return False
        if not got:
            close_quietly(opened.conn)
            return False
        self._conn = opened.conn
        return True

    def holder(self) -> str:
        return "another controller (PostgreSQL advisory lock)"

    def release(self) -> None:
        from deploy.observe.store_sql import close_quietly

        if self._conn is not None:
            close_quietly(self._conn)  # ending the session releases the lock
            self._conn = None


def leader_lock(db: Path | str) -> LeaderLock | AdvisoryLock:
    from deploy.observe.store_sql import parse_db_url

    url = parse_db_url(db)
    if url.path is not None:
        return LeaderLock(url.path)
    return AdvisoryLock(url)


# ---------------------------------------------------------------------------------------------- reading


def _event(row: Any) -> wire.Event | None:
    try:
        return wire.Event(
            device=row.device,
            ts=row.ts,
            kind=wire.EventKind(row.kind),
            model=row.model,
            variant=row.variant,
            sha256=row.sha256,
            reason=wire.ReasonCode(row.reason) if row.reason else None,
            detail=row.detail,
            correlation_id=row.correlation_id,
        )
    except (ValueError, wire.WireError):
        return None


def read_snapshot(
    db: Path | str, trusted: Mapping[str, Ed25519PublicKey], now: float
) -> tuple[Snapshot, dict[str, list[wire.Event]]]:
    """The store now (manifests verified against ``trusted``), and the events rollouts judge by."""
    from deploy.observe.state import state_from_store
    from deploy.observe.store import FleetStore

    state = state_from_store(db, None, trusted)
    events: dict[str, list[wire.Event]] = {}
    failures: list[HealthFailure] = []
    with FleetStore(db, readonly=True) as store:
        for kind in EVENT_KINDS:
            for row in store.events(kind=kind, limit=200_000):
                ev = _event(row)
                if ev is None:
                    continue
                events.setdefault(ev.device, []).append(ev)
                if (
                    ev.kind is wire.EventKind.ROLLED_BACK
                    and ev.reason is wire.ReasonCode.HEALTH_CHECK_FAILED
                    and ev.model is not None
                    and ev.sha256 is not None
                ):
                    failures.append(HealthFailure(ev.device, ev.model, ev.sha256, ev.variant, ev.ts))
    return Snapshot(now, state, tuple(failures)), events


# ---------------------------------------------------------------------------------------------- the loop


@dataclass
class TickResult:
    role: str  # "leader", "standby", "paused" or "error"
    applied: list[str] = field(default_factory=list)  # action keys applied this tick
    proposed: list[str] = field(default_factory=list)
    deferred: int = 0
    error: str | None = None


BusFactory = Callable[[], Bus]


class Controller:
    """Reads the store, decides, applies; one :meth:`tick` at a time (see the module docstring)."""

    def __init__(
        self,
        db: Path | str,
        policy: ControllerPolicy,
        key: Ed25519PrivateKey,
        bus_factory: BusFactory,
        name: str | None = None,
        stop: threading.Event | None = None,
        notifier: Notifier | None = None,
    ) -> None:
        from deploy.keys import trusted_keys

        self.db = db
        self.policy = policy
        self.selection = policy.selection_policy()
        self.key = key
        self.trusted = trusted_keys(key)
        self.bus_factory = bus_factory
        self.name = name or f"{socket.gethostname()}-{os.getpid()}"
        self.stop = stop or threading.Event()
        self.notifier = notifier or Notifier()
        self.lock = leader_lock(db)
        self._bus: Bus | None = None
        self._journal: Journal | None = None
        self._noted: set[str] = set()
        self._last_role = ""
        self._last_error: str | None = None  # logged once while the same error lasts

    # lifecycle

    def run(self, max_ticks: int | None = None) -> int:
        """Tick every ``interval_s`` until stopped (or ``max_ticks``); returns the exit code (0)."""
        ticks = 0
        self.notifier.ready(f"controller {self.name} starting")
        try:
            while True:
                self.tick()
                ticks += 1
                self.notifier.watchdog()
                if max_ticks is not None and ticks >= max_ticks:
                    break
                if self.stop.wait(self.policy.interval_s):
                    break
        finally:
            self.notifier.stopping()
            self.close()
        return 0

    def close(self) -> None:
        self._drop_bus()
        if self._journal is not None:
            self._journal.close()
            self._journal = None
        self.lock.release()

    def _role(self, role: str, line: str) -> None:
        if role != self._last_role:
            log.info("%s", line)
            self.notifier.send(f"STATUS={line}")
            self._last_role = role

    def _bus_now(self) -> Bus:
        if self._bus is None:
            self._bus = self.bus_factory()
        return self._bus

    def _drop_bus(self) -> None:
        """Disconnect (the next action connects again): after a broker error, and at the end."""
        close = getattr(self._bus, "close", None)  # MqttSession has one; the Bus protocol does not
        if close is not None:
            with contextlib.suppress(Exception):
                close()
        self._bus = None

    def tick(self) -> TickResult:
        """One round: lock (or stand by), read, decide, apply. Never raises for a fleet or store problem."""
        if not self.lock.try_acquire(self.name):
            self._role("standby", f"controller {self.name}: standing by (leader: {self.lock.holder()})")
            return TickResult("standby")
        self._role("leader", f"controller {self.name}: leading ({self.db})")
        try:
            now = time.time()
            t0 = time.monotonic()
            # the store first: a store that does not exist is the collector's to create, never ours
            snapshot, events = read_snapshot(self.db, self.trusted, now)
            if self._journal is None:
                self._journal = Journal(self.db)
            for model, manifest in snapshot.state.manifests.items():
                self._journal.see_version(model, manifest.version, now)
            memory = self._journal.memory(now, max(3600.0, 2 * self.policy.limits.settle_timeout_s))
            if memory.paused:
                self._role("paused", f"controller {self.name}: paused (edgefleet resume)")
                return TickResult("paused")
            if self._last_error is not None:
                log.info("controller tick works again (after: %s)", self._last_error)
                self._last_error = None
            t1 = time.monotonic()
            outcome = decide(snapshot, memory, self.policy)
            t2 = time.monotonic()
            result = TickResult("leader", deferred=outcome.deferred)
            for action in outcome.actions:
                self._apply(action, snapshot, events, memory, result)
            if outcome.deferred:
                log.info("rate limits: %d assignment(s) deferred to a later tick", outcome.deferred)
            if result.applied or result.proposed:
                log.info(
                    "tick over %d device(s): %d applied, %d proposed in %.2f s (read %.2f, decide %.2f)",
                    len(snapshot.state.statuses),
                    len(result.applied),
                    len(result.proposed),
                    time.monotonic() - t0,
                    t1 - t0,
                    t2 - t1,
                )
        except (DeployError, wire.WireError, OSError) as err:
            # the store or the broker: say it (once while it lasts), keep the lock, try again next tick
            if str(err) != self._last_error:
                log.warning("controller tick failed (retrying every %g s): %s", self.policy.interval_s, err)
                self._last_error = str(err)
            if isinstance(err, JournalError) and self._journal is not None:
                self._journal.close()
                self._journal = None
            self._drop_bus()
            return TickResult("error", error=str(err))
        else:
            return result

    # applying

    def _apply(
        self,
        action: Action,
        snapshot: Snapshot,
        events: dict[str, list[wire.Event]],
        memory: Memory,
        result: TickResult,
    ) -> None:
        journal = self._journal
        assert journal is not None
        now = snapshot.now
        if isinstance(action, Note):
            self._note(action, now)
        elif isinstance(action, Withdraw):
            if journal.close_proposals(action.key, "withdrawn"):
                log.info("withdrew proposal %s: %s", action.key, action.why)
        elif isinstance(action, Propose):
            a = action.action
            d = a.decision if isinstance(a, AssignAction) else None
            version = a.manifest_version if isinstance(a, StartRollout) else a.decision.manifest_version
            journal.record(
                "assign" if d is not None else "rollout",
                a.key,
                "proposed",
                a.why,
                self.name,
                model=a.model,
                device=d.device if d else None,
                variant=d.variant if d else None,
                sha256=d.sha256 if d else None,
                manifest_version=version,
                at=now,
            )
            log.info("proposed %s: %s", a.key, a.why)
            result.proposed.append(a.key)
        elif isinstance(action, QuarantineAction):
            if journal.quarantine(action.device, action.model, action.why, now):
                journal.record(
                    "quarantine",
                    action.key,
                    "applied",
                    action.why,
                    self.name,
                    action.model,
                    action.device,
                    at=now,
                )
                log.warning("quarantined %s for %s: %s", action.device, action.model, action.why)
                result.applied.append(action.key)
        elif isinstance(action, AssignAction):
            self._assign(action, now, result)
        elif isinstance(action, StartRollout | AdvanceRollout):
            try:
                if isinstance(action, StartRollout):
                    self._start_rollout(action, snapshot, events, now, result)
                else:
                    self._advance(action.rollout, action.assign_limit, snapshot, events, result)
            except RolloutError as err:  # this rollout cannot move: say so, the rest of the tick goes on
                self._note(Note(str(err), action.model), now)

    def _note(self, note: Note, now: float) -> None:
        journal = self._journal
        assert journal is not None
        if note.key not in self._noted:
            self._noted.add(note.key)
            where = " ".join(x for x in (note.model, note.device) if x)
            log.warning("%s%s", f"{where}: " if where else "", note.why)
            if not any(r.key == note.key and now - r.at < NOTE_EVERY_S for r in journal.recent(50)):
                journal.record("note", note.key, "note", note.why, self.name, note.model, note.device, at=now)

    def _assign(self, action: AssignAction, now: float, result: TickResult) -> None:
        from deploy.control.assign import make_assignment

        journal = self._journal
        assert journal is not None
        d = action.decision
        signed = make_assignment(d, self.key, issued_at=now)
        bus = self._bus_now()
        bus.publish(bus.topics.assign(d.device, d.model), signed.to_json(), retain=True)
        bus.flush()
        journal.record(
            "assign",
            action.key,
            "applied",
            f"{action.kind}: {action.why}",
            self.name,
            d.model,
            d.device,
            d.variant,
            d.sha256,
            d.manifest_version,
            issued_at=now,
            at=now,
        )
        journal.close_proposals(action.key, "done")
        log.info("assigned %s to %s (%s)", d.variant, d.device, action.kind)
        result.applied.append(action.key)

    def _rollouts(self, events: dict[str, list[wire.Event]], snapshot: Snapshot, limit: int | None) -> Any:
        from deploy.control.rollout import RolloutController, RolloutStore
        from deploy.observe.store_sql import parse_db_url

        url = parse_db_url(self.db)
        if url.path is not None:
            store: RolloutStore = RolloutStore(url.path)  # the same file as the collector's tables
        else:
            from deploy.control.controller_rollouts import SqlRolloutStore

            store = SqlRolloutStore(url)  # PostgreSQL: the same tables, shared by every controller
        rc = RolloutController(self._bus_now(), store, self.key, progress=lambda m: log.info("%s", m))
        rc.statuses = dict(snapshot.state.statuses)
        rc.events = events
        rc.assign_limit = limit
        return store, rc

    def _start_rollout(
        self,
        action: StartRollout,
        snapshot: Snapshot,
        events: dict[str, list[wire.Event]],
        now: float,
        result: TickResult,
    ) -> None:
        journal = self._journal
        assert journal is not None
        rules = self.policy.rollout
        store, rc = self._rollouts(events, snapshot, 0)
        with store:
            planned = rc.plan_from_state(
                snapshot.state,
                action.model,
                self.selection,
                canaries=rules.canaries,
                canary_percent=rules.canary_percent,
                canary_devices=rules.canary_devices,
                only=action.devices,
            )
        journal.close_proposals(action.key, "done")
        for device, why in sorted(planned.skipped.items()):
            self._note(
                Note(f"not in the v{action.manifest_version} rollout: {why}", action.model, device), now
            )
        if planned.rollout is None:
            journal.record(
                "rollout",
                action.key,
                "settled",
                f"{action.why}: nothing to change ({len(planned.skipped)} device(s) already fine)",
                self.name,
                action.model,
                manifest_version=action.manifest_version,
                at=now,
            )
            return
        journal.record(
            "rollout",
            action.key,
            "applied",
            f"rollout {planned.rollout.id} planned: {action.why}",
            self.name,
            action.model,
            manifest_version=action.manifest_version,
            at=now,
        )
        result.applied.append(action.key)

    def _advance(
        self,
        rollout_id: str,
        limit: int,
        snapshot: Snapshot,
        events: dict[str, list[wire.Event]],
        result: TickResult,
    ) -> None:
        journal = self._journal
        assert journal is not None
        store, rc = self._rollouts(events, snapshot, limit)
        with store:
            r = store.get(rollout_id)
            if r is None:
                return
            before = r.state
            assigned = sum(1 for d in store.devices(r.id) if d.assigned_at is not None)
            for _ in range(MAX_ROLLOUT_STEPS):
                r, changed = rc.step(r)
                if not changed:
                    break
                now_assigned = sum(1 for d in store.devices(r.id) if d.assigned_at is not None)
                rc.assign_limit = max(0, limit - (now_assigned - assigned))  # the budget is per tick
            if r.state is not before:
                journal.record(
                    "rollout",
                    f"advance:{r.id}",
                    "applied",
                    f"rollout {r.id}: {before} -> {r.state}: {r.reason or ''}",
                    self.name,
                    r.model,
                    manifest_version=r.manifest_version,
                )
                result.applied.append(f"advance:{r.id}:{r.state}")


# ---------------------------------------------------------------------------------------------- CLI


def _db(args: argparse.Namespace) -> Path | str:
    from deploy.observe.state import default_store

    return str(args.db) if args.db is not None else default_store()


def with_selection(policy: ControllerPolicy, path: Path) -> ControllerPolicy:
    """``policy`` with its ``[selection]`` replaced by a ``deploy.control.select`` policy file (the one
    ``edgefleet select --policy`` takes); PolicyError names the file."""
    import tomllib

    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as err:
        raise PolicyError(f"cannot read the selection policy {path}: {err}") from err
    data.setdefault("name", path.stem)
    updated = policy.model_copy(update={"selection": data})
    updated.selection_policy()  # a broken file fails now, naming its key
    return updated


def _cmd_controller(args: argparse.Namespace) -> int:
    from deploy.cli import _session
    from deploy.keys import load_signing_key

    logging.basicConfig(
        level=logging.INFO,
        format="%(asctime)s edgefleet-controller %(levelname)s %(message)s",
        stream=sys.stderr,
    )
    policy = load_controller_policy(args.policy)  # before anything else: a broken policy fails fast
    if args.select_policy is not None:
        policy = with_selection(policy, args.select_policy)
    if args.interval is not None:
        policy = policy.model_copy(update={"interval_s": args.interval})
    key = load_signing_key(args.key)
    stop = threading.Event()

    def _stop(signum: int, _frame: Any) -> None:
        log.info("signal %d: stopping after this tick", signum)
        stop.set()

    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, _stop)

    def connect() -> Bus:
        session = _session(args)
        session.connect()
        return session  # type: ignore[no-any-return]

    ctl = Controller(_db(args), policy, key, connect, name=args.name, stop=stop)
    return ctl.run(max_ticks=args.ticks)


def _cmd_approve(args: argparse.Namespace) -> int:
    if not args.ids and args.model is None:
        print("edgefleet approve: give proposal ids or --model M (see `edgefleet fleet`)", file=sys.stderr)
        return 1
    with Journal(_db(args)) as journal:
        rows = journal.approve(args.ids, wire.check_id(args.model, "model") if args.model else None)
    if not rows:
        print("no pending proposal to approve")
    for r in rows:
        print(f"approved #{r.id} {r.key}: the controller applies it on its next tick")
    return 0


def _cmd_pause(args: argparse.Namespace) -> int:
    model = wire.check_id(args.model, "model") if args.model else None
    with Journal(_db(args)) as journal:
        journal.set_setting(f"paused:{model}" if model else "paused", "1")
        journal.record(
            "pause", f"pause:{model or '*'}", "applied", "paused by the operator", "operator", model
        )
    print(f"controller paused{' for ' + model if model else ''}; `edgefleet resume` to go on")
    return 0


def _cmd_resume(args: argparse.Namespace) -> int:
    model = wire.check_id(args.model, "model") if args.model else None
    with Journal(_db(args)) as journal:
        if args.device:
            device = wire.check_id(args.device, "device")
            n = journal.release(device, model)
            journal.record(
                "resume", f"release:{device}", "applied", "quarantine released", "operator", model, device
            )
            print(f"released {device} from quarantine ({n} model(s))")
            return 0
        journal.set_setting(f"paused:{model}" if model else "paused", None)
        journal.record(
            "resume", f"resume:{model or '*'}", "applied", "resumed by the operator", "operator", model
        )
    print(f"controller resumed{' for ' + model if model else ''}")
    return 0


def _cmd_mode(args: argparse.Namespace) -> int:
    model = wire.check_id(args.model, "model")
    with Journal(_db(args)) as journal:
        journal.set_setting(f"mode:{model}", None if args.mode == "policy" else args.mode)
        journal.record("mode", f"mode:{model}", "applied", f"mode set to {args.mode}", "operator", model)
    print(f"{model}: mode {args.mode} (the controller applies it on its next tick)")
    return 0


def _db_arg(p: argparse.ArgumentParser) -> None:
    from deploy.observe.state import DB_ENV, DEFAULT_DB

    p.add_argument(
        "--db",
        metavar="URL",
        help=f"the fleet store: a file, sqlite:///PATH or postgresql://...; default: ${DB_ENV}, "
        f"else {DEFAULT_DB}",
    )


def register(subparsers: Any, parents: Sequence[argparse.ArgumentParser] = ()) -> None:
    """Add ``controller``, ``approve``, ``mode``, ``pause`` and ``resume`` to ``edgefleet``."""
    c = subparsers.add_parser(
        "controller", parents=list(parents), help="keep every device on its best variant (long-running)"
    )
    _db_arg(c)
    c.add_argument("--policy", type=Path, help="controller policy TOML (modes, limits, [selection])")
    c.add_argument(
        "--select-policy",
        type=Path,
        help="a selection policy file (as `edgefleet select --policy`): replaces the policy's [selection]",
    )
    c.add_argument("--key", type=Path, help="signing key (PEM; default: the fleet key)")
    c.add_argument("--name", help="this controller's name in the journal (default: host-pid)")
    c.add_argument("--interval", type=float, help="seconds between ticks (overrides interval_s)")
    c.add_argument("--ticks", type=int, help=argparse.SUPPRESS)  # tests: stop after N ticks
    c.set_defaults(func=_cmd_controller)

    a = subparsers.add_parser("approve", help="apply the controller's proposals (mode approve)")
    a.add_argument("ids", nargs="*", type=int, help="proposal ids (shown by `edgefleet fleet`)")
    a.add_argument("--model", help="every pending proposal of this model")
    _db_arg(a)
    a.set_defaults(func=_cmd_approve)

    m = subparsers.add_parser("mode", help="set a model's controller mode (overrides the policy file)")
    m.add_argument("model", help="model id")
    m.add_argument("mode", choices=[*MODES, "policy"], help='"policy": back to the policy file\'s mode')
    _db_arg(m)
    m.set_defaults(func=_cmd_mode)

    p = subparsers.add_parser("pause", help="stop the controller acting (on one model, or on all)")
    p.add_argument("model", nargs="?", help="only this model")
    _db_arg(p)
    p.set_defaults(func=_cmd_pause)

    r = subparsers.add_parser("resume", help="let the controller act again; --device releases a quarantine")
    r.add_argument("model", nargs="?", help="only this model")
    r.add_argument("--device", help="release this device from quarantine (for MODEL, or every model)")
    _db_arg(r)
    r.set_defaults(func=_cmd_resume)
