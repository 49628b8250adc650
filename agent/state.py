"""Per-model lifecycle, persisted in ``state.json`` before the work of each state starts.

::

    idle ─► fetching ─► verifying ─► benchmarking ─► reported ─► activating ─► probation ─► committed
              ▲  │                                      │  ▲          │             │
              │  └─► idle (nothing could be fetched)    │  │          └─► rolled_back ◄┘
              └─────── new manifest from any settled state (reported, committed, rolled_back) ...
    activating again from reported / committed / rolled_back when a new assignment comes;
    rolled_back from reported / committed on a rollback command.

A move outside :data:`TRANSITIONS` raises IllegalTransition.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

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
    S.BENCHMARKING: frozenset({S.REPORTED, S.FETCHING}),
    S.REPORTED: frozenset({S.FETCHING, S.ACTIVATING, S.ROLLED_BACK}),
    S.ACTIVATING: frozenset({S.PROBATION, S.ROLLED_BACK}),
    S.PROBATION: frozenset({S.COMMITTED, S.ROLLED_BACK}),
    S.COMMITTED: frozenset({S.FETCHING, S.ACTIVATING, S.ROLLED_BACK}),
    S.ROLLED_BACK: frozenset({S.FETCHING, S.ACTIVATING}),
}

# Where an interrupted pipeline resumes after a restart (the manifest is re-verified from the store).
IN_PIPELINE = frozenset({S.FETCHING, S.VERIFYING, S.BENCHMARKING})
IN_ACTIVATION = frozenset({S.ACTIVATING, S.PROBATION})
SETTLED = _SETTLED


def check_transition(current: ModelState, new: ModelState) -> None:
    if new not in TRANSITIONS[current]:
        allowed = ", ".join(sorted(s.value for s in TRANSITIONS[current])) or "nothing"
        raise IllegalTransition(f"cannot move from {current.value} to {new.value} (allowed: {allowed})")


@dataclass(slots=True)
class ModelRecord:
    """What the agent remembers about one model across restarts."""

    state: ModelState = S.IDLE
    manifest_version: int | None = None
    detail: str | None = None
    active: ActiveVariant | None = None
    previous: ActiveVariant | None = None
    # the assignment that was rolled back (variant, sha, manifest_version): not re-applied when re-delivered
    rejected_assignment: list[Any] | None = None
    updated_at: float = 0.0
    extra: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["state"] = self.state.value
        d["active"] = self.active.model_dump(mode="json") if self.active else None
        d["previous"] = self.previous.model_dump(mode="json") if self.previous else None
        return d

    @classmethod
    def from_json(cls, obj: dict[str, Any]) -> ModelRecord:
        return cls(
            state=ModelState(obj.get("state", "idle")),
            manifest_version=obj.get("manifest_version"),
            detail=obj.get("detail"),
            active=ActiveVariant.model_validate(obj["active"]) if obj.get("active") else None,
            previous=ActiveVariant.model_validate(obj["previous"]) if obj.get("previous") else None,
            rejected_assignment=obj.get("rejected_assignment"),
            updated_at=float(obj.get("updated_at", 0.0)),
            extra=dict(obj.get("extra") or {}),
        )

    def status(self) -> ModelStatus:
        detail = self.detail[:1000] if self.detail else None
        return ModelStatus(
            state=self.state, manifest_version=self.manifest_version, active=self.active, detail=detail
        )


class StateBook:
    """All model records, loaded from and saved to ``state.json`` through the store."""

    def __init__(self, store: Store, clock: Callable[[], float] = time.time) -> None:
        self._store = store
        self._clock = clock
        self.models: dict[str, ModelRecord] = {}

    def load(self) -> None:
        raw = self._store.read_state()
        self.models = {}
        for name, obj in (raw.get("models") or {}).items():
            try:
                self.models[check_id(name, "model")] = ModelRecord.from_json(obj)
            except (ValueError, KeyError, TypeError) as err:
                log.warning("state.json: dropping unreadable record of model %r: %s", name, err)

    def save(self) -> None:
        self._store.write_state({"version": 1, "models": {k: v.to_json() for k, v in self.models.items()}})

    def get(self, model: str) -> ModelRecord:
        rec = self.models.get(model)
        if rec is None:
            rec = self.models[check_id(model, "model")] = ModelRecord()
        return rec

    def move(self, model: str, new: ModelState, detail: str | None = None, **changes: Any) -> ModelRecord:
        """Check the transition, apply it with ``changes``, persist, then return the record."""
        rec = self.get(model)
        check_transition(rec.state, new)
        log.info("model %s: %s -> %s%s", model, rec.state.value, new.value, f" ({detail})" if detail else "")
        rec.state = new
        rec.detail = detail
        for key, value in changes.items():
            setattr(rec, key, value)
        rec.updated_at = self._clock()
        self.save()
        return rec

    def update(self, model: str, **changes: Any) -> ModelRecord:
        """Persist field changes that are not a state move."""
        rec = self.get(model)
        for key, value in changes.items():
            setattr(rec, key, value)
        rec.updated_at = self._clock()
        self.save()
        return rec
