"""Per-model lifecycle, persisted in ``state.json`` before the work of each state starts.

::

    idle ─► fetching ─► verifying ─► benchmarking ─► reported ─► activating ─► probation ─► committed
              ▲  │                     ▲    │           │  ▲          │             │
              │  └─► idle              │    └─► idle / the settled state it came from (cancelled)
              │                        └── rebenchmark command from reported, committed, rolled_back
              └─────── new manifest from any settled state (reported, committed, rolled_back) ...
    activating again from reported / committed / rolled_back when a new assignment comes;
    rolled_back from reported / committed on a rollback command.

A move outside :data:`TRANSITIONS` raises IllegalTransition.

A :class:`ModelRecord` is immutable: :meth:`StateBook.move` builds the next one with
``dataclasses.replace`` and swaps it in. The book is shared by the main loop and the pipeline worker
(:mod:`agent.pipeline`): every read-modify-write of it happens under its lock, and readers get whole
records (immutable, so a record can be used after the lock is released).
"""

from __future__ import annotations

import dataclasses
import logging
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, NamedTuple, TypedDict, Unpack

from agent.errors import IllegalTransition
from agent.store import Store
from agent.wire import ActiveVariant, ModelState, ModelStatus, check_id

log = logging.getLogger(__name__)

S = ModelState
_SETTLED = frozenset({S.REPORTED, S.COMMITTED, S.ROLLED_BACK})

TRANSITIONS: dict[ModelState, frozenset[ModelState]] = {
    S.IDLE: frozenset({S.FETCHING}),
    # fetching → fetching: a newer manifest arrived mid-fetch, start over with it
    S.FETCHING: frozenset({S.FETCHING, S.VERIFYING, S.IDLE}),
    S.VERIFYING: frozenset({S.BENCHMARKING, S.FETCHING, S.IDLE}),
    # → idle / committed / rolled_back: a cancelled measurement goes back to where it started
    S.BENCHMARKING: frozenset({S.REPORTED, S.FETCHING, S.IDLE, S.COMMITTED, S.ROLLED_BACK}),
    S.REPORTED: frozenset({S.FETCHING, S.BENCHMARKING, S.ACTIVATING, S.ROLLED_BACK}),
    S.ACTIVATING: frozenset({S.PROBATION, S.ROLLED_BACK}),
    S.PROBATION: frozenset({S.COMMITTED, S.ROLLED_BACK}),
    S.COMMITTED: frozenset({S.FETCHING, S.BENCHMARKING, S.ACTIVATING, S.ROLLED_BACK}),
    S.ROLLED_BACK: frozenset({S.FETCHING, S.BENCHMARKING, S.ACTIVATING}),
}

# Where an interrupted pipeline resumes after a restart (the manifest is re-verified from the store).
IN_PIPELINE = frozenset({S.FETCHING, S.VERIFYING, S.BENCHMARKING})
IN_ACTIVATION = frozenset({S.ACTIVATING, S.PROBATION})
SETTLED = _SETTLED


def check_transition(current: ModelState, new: ModelState) -> None:
    if new not in TRANSITIONS[current]:
        allowed = ", ".join(sorted(s.value for s in TRANSITIONS[current])) or "nothing"
        raise IllegalTransition(f"cannot move from {current.value} to {new.value} (allowed: {allowed})")


class AssignmentKey(NamedTuple):
    """An assignment by what it installs: a rolled-back one is not re-applied when re-delivered."""

    variant: str
    sha256: str
    manifest_version: int


class Changes(TypedDict, total=False):
    """The fields a move may change besides ``state`` and ``detail`` (checked by mypy at each call)."""

    manifest_version: int | None
    active: ActiveVariant | None
    previous: ActiveVariant | None
    rejected_assignment: AssignmentKey | None
    target: ActiveVariant | None
    return_to: ModelState | None


@dataclass(frozen=True, slots=True)
class ModelRecord:
    """What the agent remembers about one model across restarts."""

    state: ModelState = S.IDLE
    manifest_version: int | None = None
    detail: str | None = None
    active: ActiveVariant | None = None
    previous: ActiveVariant | None = None
    rejected_assignment: AssignmentKey | None = None
    # ACTIVATING: the variant being switched to (recovery undoes a cut switch with it)
    target: ActiveVariant | None = None
    # BENCHMARKING of a rebenchmark: the settled state to return to (None: a new manifest → REPORTED)
    return_to: ModelState | None = None
    updated_at: float = 0.0

    def to_json(self) -> dict[str, Any]:
        return {
            "state": self.state.value,
            "manifest_version": self.manifest_version,
            "detail": self.detail,
            "active": self.active.model_dump(mode="json") if self.active else None,
            "previous": self.previous.model_dump(mode="json") if self.previous else None,
            "rejected_assignment": list(self.rejected_assignment) if self.rejected_assignment else None,
            "target": self.target.model_dump(mode="json") if self.target else None,
            "return_to": self.return_to.value if self.return_to else None,
            "updated_at": self.updated_at,
        }

    @classmethod
    def from_json(cls, obj: Mapping[str, Any]) -> ModelRecord:
        # state.json written before the record was typed kept the target under "extra"
        target = obj.get("target") or (obj.get("extra") or {}).get("target")
        rejected = obj.get("rejected_assignment")
        version = obj.get("manifest_version")
        return cls(
            state=ModelState(obj.get("state", "idle")),
            manifest_version=int(version) if version is not None else None,
            detail=str(obj["detail"]) if obj.get("detail") is not None else None,
            active=ActiveVariant.model_validate(obj["active"]) if obj.get("active") else None,
            previous=ActiveVariant.model_validate(obj["previous"]) if obj.get("previous") else None,
            rejected_assignment=(
                AssignmentKey(str(rejected[0]), str(rejected[1]), int(rejected[2])) if rejected else None
            ),
            target=ActiveVariant.model_validate(target) if target else None,
            return_to=ModelState(obj["return_to"]) if obj.get("return_to") else None,
            updated_at=float(obj.get("updated_at", 0.0)),
        )

    def status(self) -> ModelStatus:
        detail = self.detail[:1000] if self.detail else None
        return ModelStatus(
            state=self.state, manifest_version=self.manifest_version, active=self.active, detail=detail
        )


class StateBook:
    """All model records, loaded from and saved to ``state.json`` through the store. Thread-safe."""

    def __init__(self, store: Store, clock: Callable[[], float] = time.time) -> None:
        self._store = store
        self._clock = clock
        self._lock = threading.RLock()
        self._models: dict[str, ModelRecord] = {}

    @property
    def models(self) -> dict[str, ModelRecord]:
        """A snapshot: a copy of the mapping, safe to iterate while the other thread moves records."""
        with self._lock:
            return dict(self._models)

    def load(self) -> None:
        raw = self._store.read_state()
        models: dict[str, ModelRecord] = {}
        for name, obj in (raw.get("models") or {}).items():
            try:
                models[check_id(name, "model")] = ModelRecord.from_json(obj)
            except (ValueError, KeyError, TypeError, IndexError) as err:
                log.warning("state.json: dropping unreadable record of model %r: %s", name, err)
        with self._lock:
            self._models = models

    def _save(self) -> None:
        self._store.write_state({"version": 1, "models": {k: v.to_json() for k, v in self._models.items()}})

    def get(self, model: str) -> ModelRecord:
        """The model's record; an unknown model gets an idle one (in status; saved on its first move)."""
        with self._lock:
            rec = self._models.get(model)
            if rec is None:
                rec = self._models[check_id(model, "model")] = ModelRecord()
            return rec

    def move(
        self, model: str, new: ModelState, detail: str | None = None, **changes: Unpack[Changes]
    ) -> ModelRecord:
        """Check the transition, build the next record with ``changes``, persist it, then return it."""
        with self._lock:
            rec = self.get(model)
            check_transition(rec.state, new)
            log.info(
                "model %s: %s -> %s%s", model, rec.state.value, new.value, f" ({detail})" if detail else ""
            )
            nxt = dataclasses.replace(rec, state=new, detail=detail, updated_at=self._clock(), **changes)
            self._models[model] = nxt
            self._save()
            return nxt
