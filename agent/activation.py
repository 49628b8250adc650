"""Assignments → activate → probation (health check) → commit, and the one rollback.

Runs on the main loop only. An assignment that arrives while its model is in the pipeline (or in another
activation) waits in :attr:`Activation.pending` and is applied when that ends: a measurement is never
cut short by an assignment (the device reports on every variant first; a ``cancel`` command or a newer
manifest is how a measurement is ended early).

:meth:`Activation.rollback` is the only rollback. It is idempotent over the store — it looks at where
the ``active`` and ``previous`` links point now instead of assuming how far an earlier attempt got — so
the live path (a failed health check, a rollback command) and crash recovery (a restart during an
activation or during a rollback) use the same code.

The health check of a newly activated variant runs off the main loop (:class:`agent.health.HealthChecks`,
one small thread per check; the module says why not the pipeline worker). The model is in PROBATION
(persisted, and in the status) from before the check starts; :meth:`Activation.tick` takes the check's
outcome and makes the state move here, on the main loop: a failure rolls back (HEALTH_CHECK_FAILED), a
pass starts the ``health.probation_s`` timer that ends in COMMITTED. While the check runs:

* an assignment for the model waits in :attr:`Activation.pending` (PROBATION is in ``IN_ACTIVATION``) and
  is applied once the activation settles (committed or rolled back), as during a measurement;
* a newer manifest waits in ``Pipeline.pending_manifest`` likewise, so nothing is fetched, measured or
  garbage-collected under the running check;
* a ``rollback`` command (or any :meth:`Activation.rollback`) cancels the check first — its child is
  killed and its outcome dropped — then rolls back (the daemon refuses the command with NO_PREVIOUS
  when nothing ran before this variant; the check then goes on);
* shutdown (:meth:`Activation.shutdown`) cancels it and leaves PROBATION on disk: the restarted agent's
  recovery calls :meth:`Activation.begin_probation`, which checks the variant again.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

from agent.faults import crash_point
from agent.health import HealthChecks
from agent.state import IN_ACTIVATION, IN_PIPELINE, AssignmentKey, StateBook
from agent.store import Store, file_sha256
from agent.wire import (
    ActiveVariant,
    Assignment,
    EventKind,
    ModelState,
    ReasonCode,
    WireError,
    decode_inbound,
    now,
)

if TYPE_CHECKING:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

    from agent.config import AgentConfig
    from agent.pipeline import Pipeline
    from agent.publishing import Publisher

log = logging.getLogger(__name__)


class Activation:
    def __init__(
        self,
        config: AgentConfig,
        store: Store,
        book: StateBook,
        publisher: Publisher,
        pipeline: Pipeline,
        trusted: dict[str, Ed25519PublicKey],
        *,
        stop: threading.Event,
        on_settled: Callable[[str], None] | None = None,
    ) -> None:
        self.config = config
        self.store = store
        self.book = book
        self.pub = publisher
        self.pipeline = pipeline
        self.trusted = trusted
        self.stop = stop
        self.on_settled = on_settled
        self.device = config.device.id
        self.max_payload = config.mqtt.max_payload_kb * 1024
        self.pending: dict[str, bytes] = {}  # model → assignment payload, applied when the model settles
        self.probation_until: dict[str, float] = {}  # model → when it commits (its check passed)
        self.checks = HealthChecks(config.health, memory_limit_mb=config.bench.memory_limit_mb, stop=stop)

    # ================================================================== assignments

    def on_assignment(self, model: str, payload: bytes) -> None:
        if not payload:
            return None
        try:  # signature, schema and topic (this device, this model) checked by the wire's one decoder
            topics = self.pub.topics
            topic = topics.assign(self.device, model)
            a = decode_inbound(topics, topic, payload, trusted=self.trusted, max_bytes=self.max_payload).as_(
                Assignment
            )
        except WireError as err:
            log.warning("refused assignment for %s: %s", model, err)
            self.pub.event(EventKind.REJECTED, model, reason=err.reason, detail=str(err))
            return None

        def reject(reason: ReasonCode, detail: str) -> None:
            log.warning("refused assignment of %s/%s: %s", model, a.variant, detail)
            self.pub.event(EventKind.REJECTED, model, a.variant, a.sha256, reason, detail=detail)

        rec = self.book.get(model)
        held = rec.manifest_version
        if held is not None and a.manifest_version < held:
            return reject(
                ReasonCode.REPLAY, f"assignment names manifest v{a.manifest_version}, v{held} is held"
            )
        if (
            held is None
            or a.manifest_version > held
            or rec.state in IN_PIPELINE
            or rec.state in IN_ACTIVATION
            or self.pipeline.busy(model)
            # a cancelled first measurement: applied once the manifest is measured again
            or (rec.state is ModelState.IDLE and self.store.has_blob(a.sha256))
        ):
            log.info("assignment of %s/%s waits (state %s)", model, a.variant, rec.state.value)
            self.pending[model] = payload
            return None
        manifest = self.pipeline.manifest(model)
        if manifest is None:
            return reject(ReasonCode.NOT_FETCHED, "no manifest held for this model")
        try:
            variant = manifest.variant(a.variant)
        except KeyError:
            return reject(
                ReasonCode.UNKNOWN_VARIANT, f"variant {a.variant!r} is not in manifest v{manifest.version}"
            )
        if variant.sha256 != a.sha256:
            return reject(
                ReasonCode.BAD_HASH, f"assignment sha {a.sha256[:12]} != manifest sha {variant.sha256[:12]}"
            )
        if not self.store.has_blob(a.sha256):
            return reject(ReasonCode.NOT_FETCHED, f"variant {a.variant} is not in the store")
        if rec.active is not None and rec.active.sha256 == a.sha256 and rec.state is ModelState.COMMITTED:
            log.info("assignment of %s/%s: already active", model, a.variant)
            return None
        if rec.rejected_assignment == AssignmentKey(a.variant, a.sha256, a.manifest_version):
            log.info("assignment of %s/%s was rolled back before; not re-applying it", model, a.variant)
            return None
        self.activate(model, a)
        return None

    # ================================================================== activate, probation, commit

    def activate(self, model: str, a: Assignment) -> None:
        path = self.store.blob_path(a.sha256)
        if file_sha256(path) != a.sha256:
            self.pub.event(
                EventKind.REJECTED,
                model,
                a.variant,
                a.sha256,
                ReasonCode.BAD_HASH,
                detail=f"{path} is corrupt",
            )
            return
        rec = self.book.get(model)
        target = ActiveVariant(
            variant=a.variant, sha256=a.sha256, manifest_version=a.manifest_version, activated_at=now()
        )
        previous = rec.active if rec.active is not None and rec.active.sha256 != a.sha256 else rec.previous
        self.book.move(model, ModelState.ACTIVATING, detail=f"{a.variant} (policy {a.policy})", target=target)
        self.pub.publish_status()
        self.store.activate(model, a.sha256, target)  # model and active.json in one atomic step
        crash_point("after-swap")
        self.store.write_active_info(model, target)
        self.book.move(
            model,
            ModelState.PROBATION,
            detail=f"{a.variant} (policy {a.policy})",
            active=target,
            previous=previous,
            target=None,
        )
        self.pub.event(EventKind.ACTIVATED, model, a.variant, a.sha256, detail=f"policy {a.policy}")
        self.pub.publish_status()
        self.begin_probation(model)

    def begin_probation(self, model: str) -> None:
        """Start the health check of the active variant of ``model`` (in PROBATION); returns at once."""
        rec = self.book.get(model)
        if rec.active is None or self.stop.is_set():
            return  # stopping: the state stays probation and the check runs after the restart
        manifest = self.pipeline.manifest(model)
        sample = None
        variant = None
        if manifest is not None:
            with contextlib.suppress(KeyError):
                v = variant = manifest.variant(rec.active.variant)
                if v.sample is not None and self.store.has_blob(v.sample.sha256, "npz"):
                    sample = self.store.blob_path(v.sample.sha256, "npz")
        self.probation_until.pop(model, None)
        log.info("model %s: health check of %s started", model, rec.active.variant)
        self.checks.start(model, rec.active.sha256, self.store.active_link(model), sample, variant)

    def tick(self) -> None:
        """Main loop: apply the outcome of every finished health check, commit every ended probation."""
        for check in self.checks.finished():
            rec = self.book.get(check.model)
            if (
                rec.state is not ModelState.PROBATION
                or rec.active is None
                or rec.active.sha256 != check.sha256
            ):
                log.info("health check of %s ended after the model moved on; ignoring it", check.model)
                continue
            if check.problem is not None:
                detail = f"health check failed: {check.problem}"
                self.rollback(check.model, ReasonCode.HEALTH_CHECK_FAILED, detail, mark_rejected=True)
                continue
            log.info(
                "model %s: health check passed; probation %g s", check.model, self.config.health.probation_s
            )
            self.probation_until[check.model] = time.monotonic() + self.config.health.probation_s
        t = time.monotonic()
        for model, until in list(self.probation_until.items()):
            if t >= until:
                del self.probation_until[model]
                self.commit(model)

    def commit(self, model: str) -> None:
        rec = self.book.get(model)
        if rec.state is not ModelState.PROBATION or rec.active is None:
            return
        self.book.move(model, ModelState.COMMITTED, detail=rec.active.variant)
        self.pub.event(EventKind.COMMITTED, model, rec.active.variant, rec.active.sha256)
        self.pub.publish_status()
        self._settled(model)

    # ================================================================== rollback

    def interrupted_rollback(self, model: str) -> bool:
        """The state names an active variant, but the link already points elsewhere (back at previous).

        :meth:`rollback` swaps the link first and records ROLLED_BACK after; a kill between the two leaves
        PROBATION or COMMITTED on disk with the old model running.
        """
        rec = self.book.get(model)
        if rec.state not in (ModelState.PROBATION, ModelState.COMMITTED) or rec.active is None:
            return False
        return self.store.link_sha(self.store.active_link(model)) != rec.active.sha256

    def rollback(
        self,
        model: str,
        reason: ReasonCode,
        detail: str,
        *,
        mark_rejected: bool = False,
        correlation_id: str | None = None,
    ) -> bool:
        """Put back what ran before the failed (or interrupted) activation and record ROLLED_BACK.

        Safe to run again after being cut at any point: the links say how far the last attempt got.
        ``mark_rejected`` remembers the failed assignment so its re-delivery is not applied again.
        Returns False when the model is not in a state a rollback applies to.
        """
        rec = self.book.get(model)
        if rec.state not in (
            ModelState.ACTIVATING,
            ModelState.PROBATION,
            ModelState.COMMITTED,
            ModelState.REPORTED,
        ):
            return False
        self.checks.cancel(model)  # a check still running is of the variant being rolled back
        activating = rec.state is ModelState.ACTIVATING
        failed = rec.target if activating else rec.active
        before = rec.active if activating else rec.previous  # what ran before the failed variant
        self.probation_until.pop(model, None)
        active_link, previous_link = self.store.active_link(model), self.store.previous_link(model)
        running = self.store.link_sha(active_link)
        if (
            failed is not None
            and running == failed.sha256
            and (before is None or before.sha256 != failed.sha256)
        ):
            running = self.store.restore_previous(model)  # None: there was nothing before
        elif running is not None and self.store.link_sha(previous_link) == running:
            previous_link.unlink()  # a restore that was cut before it dropped the previous link
        active: ActiveVariant | None = None
        if running is None:
            self.store.deactivate(model)
        else:
            on_disk = self.store.read_active_info(model)
            known = [v for v in (before, on_disk) if v is not None and v.sha256 == running]
            active = (
                known[0]
                if known
                else ActiveVariant(
                    variant="previous",
                    sha256=running,
                    manifest_version=rec.manifest_version or 1,
                    activated_at=now(),
                )
            )
            self.store.write_active_info(model, active)
        key = AssignmentKey(failed.variant, failed.sha256, failed.manifest_version) if failed else None
        self.book.move(
            model,
            ModelState.ROLLED_BACK,
            detail=detail[:1000],
            active=active,
            previous=None,
            target=None,
            rejected_assignment=key if (mark_rejected and key) else rec.rejected_assignment,
        )
        log.warning("model %s rolled back (%s): %s", model, reason.value, detail)
        self.pub.event(
            EventKind.ROLLED_BACK,
            model,
            failed.variant if failed else None,
            failed.sha256 if failed else None,
            reason,
            detail=detail,
            correlation_id=correlation_id,
        )
        self.pub.publish_status()
        self._settled(model)
        return True

    def shutdown(self) -> None:
        """Cancel running health checks (their models stay in PROBATION for recovery) and join them."""
        self.checks.shutdown()

    def _settled(self, model: str) -> None:
        if self.on_settled is not None:
            self.on_settled(model)
