"""The agent's main loop: manifests → fetch → verify → benchmark → report; assignments → activate → commit.

Everything runs on the main thread. paho's network thread only puts messages in a queue; the loop takes
them with a timeout (``stop`` is checked at least twice a second), and between messages it advances the
per-model pipelines, ends probations, sends telemetry and pings the systemd watchdog. Benchmarks and
health checks run in child processes (:mod:`agent.bench`), so a bad model cannot take the daemon down.

Refusals (bad signature, replay, wrong device, bad chunk, ...) are published as ``Event(kind=rejected)``
with a reason code and the loop goes on; only bad broker credentials stop it (ConnectionFatal, exit 2).
"""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import gc
import logging
import os
import platform
import queue
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any

import psutil
from paho.mqtt.client import topic_matches_sub

import agent
from agent.active import read_counters
from agent.bench import measure_variant
from agent.board import BoardInfo, HardwareError, detect_board, profile_key_for
from agent.config import AgentConfig
from agent.connectivity import Diagnosis
from agent.energy import EnergyConfig, EnergyMeter, resolve_profile_file
from agent.errors import (
    ConfigError,
    ConnectionFatal,
    DiskFullError,
    IllegalTransition,
    IntegrityError,
    StoreError,
)
from agent.faults import crash_point
from agent.fetch import Fetcher, FetchNote
from agent.health import check_health
from agent.mqtt import BrokerClient, Inbound, PahoBroker
from agent.notify import Notifier
from agent.runtime import detect_runtime
from agent.state import IN_ACTIVATION, IN_PIPELINE, SETTLED, StateBook
from agent.store import Store, file_sha256
from agent.thermal import cpu_temperature, read_throttled
from agent.wire import (
    ActiveVariant,
    Assignment,
    BenchError,
    BenchResult,
    Command,
    CommandAction,
    Event,
    EventKind,
    Manifest,
    ModelState,
    ReasonCode,
    Report,
    Status,
    Telemetry,
    TopicKind,
    Topics,
    Variant,
    WireError,
    now,
    verify_signed,
)

log = logging.getLogger(__name__)

_TICK_S = 0.5


def _reason(code: str | None) -> ReasonCode:
    try:
        return ReasonCode(code or "MALFORMED")
    except ValueError:
        return ReasonCode.MALFORMED


@dataclass(slots=True)
class _Pending:
    """Work that arrived before it could be done (an assignment during a fetch, a manifest in probation)."""

    assignment: dict[str, bytes] = field(default_factory=dict)
    manifest: dict[str, bytes] = field(default_factory=dict)


class Agent:
    """One device agent. ``run()`` blocks until ``stop`` is set; tests run it in a thread."""

    def __init__(
        self,
        config: AgentConfig,
        client: BrokerClient | None = None,
        stop: threading.Event | None = None,
    ) -> None:
        self.config = config
        self.device = config.device.id
        self.topics = Topics(config.mqtt.namespace)
        self.store = Store(config.store.path)
        self.store.ensure()
        self.store.sweep_stale_temp_files()
        self.book = StateBook(self.store)
        self.book.load()
        self.trusted = config.trusted_keys()
        self.stop = stop if stop is not None else threading.Event()
        self.board_info = board_info(config)
        self.board = config.device.board or self.board_info.model_string
        self.meter = energy_meter(config, self.board_info)  # once per daemon; logs the backend chosen
        self.runtime = detect_runtime()
        self.client: BrokerClient = client or PahoBroker(
            config, will=(self.topics.status(self.device), self._status(online=False).to_json())
        )
        self.fetcher = Fetcher(
            self.store, self.client, self.topics, window=config.fetch.window, timeout_s=config.fetch.timeout_s
        )
        self.manifests: dict[str, Manifest] = {}
        self.pending = _Pending()
        self.probation_until: dict[str, float] = {}
        self.seen_commands: deque[str] = deque(maxlen=256)
        self.fetch_problems: dict[str, dict[str, str]] = {}
        self.started = time.monotonic()
        self.max_payload = config.mqtt.max_payload_kb * 1024
        self.ha_published: dict[str, bytes] = {}
        self.notifier = Notifier()
        self._process = psutil.Process()

    # ================================================================== lifecycle

    def subscriptions(self) -> list[str]:
        follow = self.config.models.follow
        subs = [self.topics.manifest(m) for m in follow] if follow else [self.topics.all_manifests()]
        return [*subs, self.topics.device_assignments(self.device), self.topics.cmd(self.device)]

    def run(self) -> None:
        """Connect, recover interrupted work, then loop until ``stop``. Raises ConnectionFatal."""
        status_topic = self.topics.status(self.device)
        self.recover()
        self.client.set_birth(status_topic, self._status().to_json())
        for topic in self.subscriptions():
            self.client.subscribe(topic, 1)
        self.client.start()
        try:
            if not self.client.wait_connected(self.config.mqtt.connect_timeout_s):
                # PahoBroker knows the last cause; a test double may not
                cause = getattr(self.client, "last_failure", None)
                log.warning(
                    "no connection to %s:%d after %.0f s%s; working offline and retrying with backoff "
                    "(each attempt is logged, rate-limited)",
                    self.config.mqtt.host,
                    self.config.mqtt.port,
                    self.config.mqtt.connect_timeout_s,
                    f" ({cause.summary()})" if isinstance(cause, Diagnosis) else "",
                )
            self.publish_status()
            self.notifier.ready(f"device {self.device}")
            next_telemetry = time.monotonic() + min(5.0, self.config.telemetry.interval_s)
            self.fetcher.pump()
            release_startup_memory()
            while not self.stop.is_set():
                self.notifier.watchdog()
                try:
                    msg = self.client.inbox.get(timeout=_TICK_S)
                except queue.Empty:
                    msg = None
                if msg is not None:
                    self.handle(msg)
                self.tick()
                if time.monotonic() >= next_telemetry:
                    self.send_telemetry()
                    next_telemetry = time.monotonic() + self.config.telemetry.interval_s
        finally:
            log.info("stopping: publishing offline status and disconnecting")
            self.notifier.stopping()
            self.client.stop(final=(status_topic, self._status(online=False).to_json()))

    def recover(self) -> None:
        """Resume what a restart interrupted; the store is consistent by construction (atomic renames)."""
        for model, rec in list(self.book.models.items()):
            if rec.state in IN_PIPELINE:
                payload = self.store.read_manifest(model)
                if payload is None:
                    continue
                try:
                    manifest = verify_signed(Manifest, payload, self.trusted)
                except WireError as err:
                    log.warning(
                        "stored manifest of %s no longer verifies (%s); waiting for a new one", model, err
                    )
                    continue
                log.info("model %s: resuming %s of manifest v%d", model, rec.state.value, manifest.version)
                self.start_pipeline(model, manifest, payload)
            elif rec.state is ModelState.ACTIVATING:
                target = rec.extra.get("target") or {}
                if (
                    self.store.link_sha(self.store.active_link(model)) == target.get("sha256")
                    and self.store.restore_previous(model) is None
                    and rec.active is None
                ):
                    self.store.deactivate(model)  # a first activation: "old" is no model at all
                if rec.active is not None:
                    self.store.write_active_info(model, rec.active)
                self.book.move(
                    model, ModelState.ROLLED_BACK, detail="agent restarted during activation; undone"
                )
                self.event(
                    EventKind.ROLLED_BACK,
                    model,
                    reason=ReasonCode.INTERNAL,
                    detail="restart during activation",
                )
            elif self._rollback_was_interrupted(model):
                self._finish_interrupted_rollback(model)
            elif rec.state is ModelState.PROBATION and rec.active is not None:
                log.info("model %s: restarting probation of %s after a restart", model, rec.active.variant)
                self.begin_probation(model)

    def _rollback_was_interrupted(self, model: str) -> bool:
        """The state names an active variant, but the link already points elsewhere (back at previous).

        ``rollback`` swaps the link first and records ROLLED_BACK after; a kill between the two leaves
        PROBATION or COMMITTED on disk with the old model running.
        """
        rec = self.book.get(model)
        if rec.state not in (ModelState.PROBATION, ModelState.COMMITTED) or rec.active is None:
            return False
        return self.store.link_sha(self.store.active_link(model)) != rec.active.sha256

    def _finish_interrupted_rollback(self, model: str) -> None:
        rec = self.book.get(model)
        failed = rec.active
        assert failed is not None
        running = self.store.link_sha(self.store.active_link(model))
        if self.store.link_sha(self.store.previous_link(model)) == running:
            self.store.previous_link(model).unlink()  # restore_previous was cut before dropping it
        active: ActiveVariant | None = None
        if running is None:
            self.store.deactivate(model)
        else:
            prev = rec.previous
            active = (
                prev if prev is not None and prev.sha256 == running else self.store.read_active_info(model)
            )
            if active is None or active.sha256 != running:
                active = ActiveVariant(
                    variant="previous",
                    sha256=running,
                    manifest_version=rec.manifest_version or 1,
                    activated_at=now(),
                )
            self.store.write_active_info(model, active)
        self.book.move(
            model,
            ModelState.ROLLED_BACK,
            detail="agent restarted during a rollback; completed",
            active=active,
            previous=None,
            rejected_assignment=[failed.variant, failed.sha256, failed.manifest_version],
        )
        log.warning("model %s: finished a rollback of %s that a restart interrupted", model, failed.variant)
        self.event(
            EventKind.ROLLED_BACK,
            model,
            failed.variant,
            failed.sha256,
            ReasonCode.INTERNAL,
            detail="restart during rollback; completed",
        )

    # ================================================================== messages

    def handle(self, msg: Inbound) -> None:
        if msg.fatal is not None:
            raise ConnectionFatal(msg.fatal)
        if msg.connected:
            self.publish_discovery(force=True)
            return
        try:
            parsed = self.topics.parse(msg.topic)
        except WireError as err:
            if any(topic_matches_sub(sub, msg.topic) for sub in self.subscriptions()):
                # one of our subscriptions matched a topic whose model/device part is not an identifier
                log.warning("refused message on %r: %s", msg.topic[:200], err)
                self.event(
                    EventKind.REJECTED, reason=_reason(err.reason), detail=f"topic {msg.topic[:200]!r}: {err}"
                )
            else:
                log.debug("ignoring message on %s (not an edgefleet topic)", msg.topic)
            return
        try:
            if parsed.kind is TopicKind.BLOB and parsed.sha256 is not None and parsed.index is not None:
                for note in self.fetcher.on_chunk(parsed.sha256, parsed.index, msg.payload):
                    self._fetch_note(note)
            elif parsed.kind is TopicKind.MANIFEST and parsed.model is not None:
                self.on_manifest(parsed.model, msg.payload)
            elif (
                parsed.kind is TopicKind.ASSIGN and parsed.device == self.device and parsed.model is not None
            ):
                self.on_assignment(parsed.model, msg.payload)
            elif parsed.kind is TopicKind.CMD and parsed.device == self.device:
                self.on_command(msg.payload)
            else:
                log.debug("ignoring message on %s (not subscribed / not for this device)", msg.topic)
        except ConnectionFatal:
            raise
        except (StoreError, IllegalTransition, OSError) as err:
            log.exception("error handling %s", msg.topic)
            self.event(EventKind.ERROR, reason=ReasonCode.INTERNAL, detail=f"{msg.topic}: {err}")
        except Exception as err:  # one bad message must not take the daemon (and its restarts) down
            log.exception("unexpected error handling %s", msg.topic)
            self.event(
                EventKind.ERROR,
                reason=ReasonCode.INTERNAL,
                detail=f"{msg.topic}: {type(err).__name__}: {err}",
            )

    def on_manifest(self, model: str, payload: bytes) -> None:
        if not payload:
            log.info("manifest of %s was cleared on the broker; keeping what is installed", model)
            return
        follow = self.config.models.follow
        if follow and model not in follow:
            log.info("ignoring manifest of %s (not in models.follow)", model)
            return
        try:
            manifest = verify_signed(Manifest, payload, self.trusted, self.max_payload)
        except WireError as err:
            log.warning("refused manifest of %s: %s", model, err)
            self.event(EventKind.REJECTED, model, reason=_reason(err.reason), detail=str(err))
            return
        if manifest.model != model:
            detail = f"manifest for model {manifest.model!r} arrived on the topic of {model!r}"
            self.event(EventKind.REJECTED, model, reason=ReasonCode.MALFORMED, detail=detail)
            return
        rec = self.book.get(model)
        held = rec.manifest_version
        if held is not None and manifest.version < held:
            detail = f"manifest v{manifest.version} is older than v{held} held (replay)"
            log.warning("refused manifest of %s: %s", model, detail)
            self.event(EventKind.REJECTED, model, reason=ReasonCode.REPLAY, detail=detail)
            return
        if held == manifest.version and rec.state is not ModelState.IDLE:
            if rec.state in IN_PIPELINE and model not in self.manifests:
                self.start_pipeline(model, manifest, payload)
            else:
                log.debug("manifest v%d of %s already handled (%s)", manifest.version, model, rec.state.value)
            return
        if rec.state in IN_ACTIVATION:
            log.info("manifest v%d of %s waits until the current activation settles", manifest.version, model)
            self.pending.manifest[model] = payload
            return
        self.start_pipeline(model, manifest, payload)

    def start_pipeline(self, model: str, manifest: Manifest, payload: bytes) -> None:
        self.fetcher.cancel(model)
        blobs = self._blobs(manifest)
        needed = sum(ref.size for _, ref, kind in blobs if not self.store.has_blob(ref.sha256, kind))
        largest = max((ref.size for _, ref, _ in blobs), default=0)
        cfg = self.config.store
        try:
            try:
                self.store.check_free(needed + largest, cfg.min_free_mb, cfg.disk_budget_mb)
            except DiskFullError:
                # make room: blobs only the superseded manifest named can go (active/previous stay)
                self.collect_garbage(replacing=(model, manifest))
                self.store.check_free(needed + largest, cfg.min_free_mb, cfg.disk_budget_mb)
        except DiskFullError as err:
            log.warning("refused manifest v%d of %s: %s", manifest.version, model, err)
            self.event(EventKind.REJECTED, model, reason=ReasonCode.DISK_FULL, detail=str(err))
            return
        self.store.write_manifest(model, payload)
        self.book.move(
            model,
            ModelState.FETCHING,
            detail=f"manifest v{manifest.version}",
            manifest_version=manifest.version,
        )
        self.manifests[model] = manifest
        self.fetch_problems[model] = {}
        for label, ref, kind in blobs:
            if not self.store.has_blob(ref.sha256, kind):
                self.fetcher.add(model, label, ref, kind)
        self.fetcher.pump()
        self.publish_status()

    def collect_garbage(self, replacing: tuple[str, Manifest] | None = None) -> None:
        """Drop blobs that no held manifest and no active/previous link references."""
        keep: set[str] = set()
        for model in {*self.book.models, *([replacing[0]] if replacing else [])}:
            if replacing is not None and model == replacing[0]:
                manifest: Manifest | None = replacing[1]
            else:
                manifest = self.manifests.get(model) or self._stored_manifest(model)
            if manifest is not None:
                keep.update(ref.sha256 for _, ref, _ in self._blobs(manifest))
        try:
            self.store.gc(keep)
        except OSError as err:
            log.warning("store gc failed: %s", err)

    @staticmethod
    def _blobs(manifest: Manifest) -> list[tuple[str, Any, Any]]:
        out: list[tuple[str, Any, Any]] = []
        for v in manifest.variants:
            out.append((v.id, v, "tflite"))
            if v.sample is not None:
                out.append((v.id, v.sample, "npz"))
        return out

    def _fetch_note(self, note: FetchNote) -> None:
        for model, variant in note.owners[:1]:
            if note.kind == "complete":
                what = "evaluation sample" if note.blob_kind == "npz" else "model"
                self.event(EventKind.DOWNLOADED, model, variant, note.sha256, detail=what)
            elif note.kind == "rejected":
                self.event(
                    EventKind.REJECTED, model, variant, note.sha256, _reason(note.reason), detail=note.detail
                )
            else:
                self.fetch_problems.setdefault(model, {})[variant] = note.detail or "fetch timed out"
                self.event(
                    EventKind.ERROR, model, variant, note.sha256, ReasonCode.NOT_FETCHED, detail=note.detail
                )

    # ================================================================== pipeline

    def tick(self) -> None:
        for note in self.fetcher.check_timeouts():
            self._fetch_note(note)
        for model, rec in list(self.book.models.items()):
            if self.stop.is_set():
                return
            if rec.state is ModelState.FETCHING and model in self.manifests and not self.fetcher.busy(model):
                try:
                    self.finish_fetch(model, self.manifests[model])
                except Exception as err:  # stays in its state; a new manifest restarts it
                    log.exception("model %s: verify/benchmark failed", model)
                    self.event(
                        EventKind.ERROR,
                        model,
                        reason=ReasonCode.INTERNAL,
                        detail=f"{type(err).__name__}: {err}",
                    )
        t = time.monotonic()
        for model, until in list(self.probation_until.items()):
            if t >= until:
                del self.probation_until[model]
                self.commit(model)

    def finish_fetch(self, model: str, manifest: Manifest) -> None:
        self.book.move(model, ModelState.VERIFYING, detail=f"manifest v{manifest.version}")
        self.publish_status()
        for label, ref, kind in self._blobs(manifest):
            if self.store.has_blob(ref.sha256, kind) or self.store.missing_chunks(ref):
                continue
            try:
                self.store.assemble(ref, kind)
            except IntegrityError as err:
                self.store.discard_partial(ref.sha256)
                self.event(EventKind.REJECTED, model, label, ref.sha256, _reason(err.reason), detail=str(err))
                continue
            self.event(EventKind.VERIFIED, model, label, ref.sha256, detail=f"{kind} blob")
        fetched = [v for v in manifest.variants if self.store.has_blob(v.sha256)]
        if not fetched:
            detail = f"no variant of manifest v{manifest.version} could be fetched"
            self.book.move(model, ModelState.IDLE, detail=detail)
            self.manifests.pop(model, None)
            self.publish_status()
            return
        self.book.move(model, ModelState.BENCHMARKING, detail=f"{len(fetched)} variant(s)")
        self.publish_status()
        self.benchmark_and_report(model, manifest, fetched)
        if self.stop.is_set():
            return  # interrupted: state stays benchmarking and resumes on restart
        missing = [v.id for v in manifest.variants if v not in fetched]
        self.book.move(
            model,
            ModelState.REPORTED,
            detail=f"not fetched: {', '.join(missing)}" if missing else None,
        )
        self.publish_status()
        self.collect_garbage()
        if model in self.pending.assignment:
            self.on_assignment(model, self.pending.assignment.pop(model))

    def benchmark_and_report(self, model: str, manifest: Manifest, variants: list[Variant]) -> Report:
        """Benchmark every variant at every thread count and publish one Report (retained).

        The baseline (float32) variant runs first: its top-1 predictions on the sample, on this device,
        give every other variant's ``agreement`` (the samples hold the same inputs in the same order, only
        the dtype differs) — for a generic task only when output 0 is a class vector. Each variant's
        outputs on its sample are also compared with the host's (``fidelity``; outside the variant's
        ``output_tolerance`` → ACCURACY_MISMATCH). A variant whose ``min_runtime`` this device's runtime
        does not meet is not run: its result is RUNTIME_TOO_OLD and a ``skipped`` event says so.
        """
        t0 = time.monotonic()
        results: list[BenchResult] = []
        baseline_predictions: list[int] | None = None
        for v in sorted(variants, key=lambda v: v.id != manifest.baseline):  # stable: baseline first
            sample = self.store.blob_path(v.sample.sha256, "npz") if v.sample else None
            for threads in self.config.bench.thread_counts():
                if self.stop.is_set():
                    break
                run = measure_variant(
                    v,
                    self.store.blob_path(v.sha256),
                    sample if sample is not None and sample.is_file() else None,
                    self.config.bench,
                    board=self.board_info,
                    threads=threads,
                    stop=self.stop,
                    tick=self.notifier.watchdog,
                    meter=self.meter,
                    runtime=self.runtime,
                    thermal=self.config.thermal,
                    baseline_predictions=baseline_predictions,
                    is_baseline=v.id == manifest.baseline,
                    task=manifest.task,
                )
                result = run.result
                results.append(result)
                if result.error is BenchError.RUNTIME_TOO_OLD:
                    reason = ReasonCode.RUNTIME_TOO_OLD
                    self.event(EventKind.SKIPPED, model, v.id, v.sha256, reason, detail=result.error_detail)
                    break  # the other thread counts would say the same
                if v.id == manifest.baseline and baseline_predictions is None:
                    baseline_predictions = run.predictions
                self.event(
                    EventKind.BENCHMARKED,
                    model,
                    v.id,
                    v.sha256,
                    None if result.ok else ReasonCode.BENCH_FAILED,
                    detail=result.error_detail if not result.ok else f"{threads} thread(s)",
                )
        report = Report(
            device=self.device, model=model, manifest_version=manifest.version, ts=now(), results=results
        )
        if not self.stop.is_set():
            self.client.publish(self.topics.report(self.device, model), report.to_json(), qos=1, retain=True)
            log.info(
                "published report of %s v%d: %d result(s) in %.1f s",
                model,
                manifest.version,
                len(results),
                time.monotonic() - t0,
            )
        return report

    # ================================================================== activation

    def on_assignment(self, model: str, payload: bytes) -> None:
        if not payload:
            return None
        try:
            a = verify_signed(Assignment, payload, self.trusted, self.max_payload)
        except WireError as err:
            log.warning("refused assignment for %s: %s", model, err)
            self.event(EventKind.REJECTED, model, reason=_reason(err.reason), detail=str(err))
            return None

        def reject(reason: ReasonCode, detail: str) -> None:
            log.warning("refused assignment of %s/%s: %s", model, a.variant, detail)
            self.event(EventKind.REJECTED, model, a.variant, a.sha256, reason, detail=detail)

        if a.device != self.device:
            return reject(
                ReasonCode.WRONG_DEVICE, f"assignment is for device {a.device!r}, this is {self.device!r}"
            )
        if a.model != model:
            return reject(ReasonCode.MALFORMED, f"assignment for model {a.model!r} on the topic of {model!r}")
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
        ):
            log.info("assignment of %s/%s waits (state %s)", model, a.variant, rec.state.value)
            self.pending.assignment[model] = payload
            return None
        manifest = self.manifests.get(model) or self._stored_manifest(model)
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
        key = [a.variant, a.sha256, a.manifest_version]
        if rec.active is not None and rec.active.sha256 == a.sha256 and rec.state is ModelState.COMMITTED:
            log.info("assignment of %s/%s: already active", model, a.variant)
            return None
        if rec.rejected_assignment == key:
            log.info("assignment of %s/%s was rolled back before; not re-applying it", model, a.variant)
            return None
        self.activate(model, a)
        return None

    def _stored_manifest(self, model: str) -> Manifest | None:
        payload = self.store.read_manifest(model)
        if payload is None:
            return None
        try:
            manifest = verify_signed(Manifest, payload, self.trusted)
        except WireError:
            return None
        self.manifests[model] = manifest
        return manifest

    def activate(self, model: str, a: Assignment) -> None:
        path = self.store.blob_path(a.sha256)
        if file_sha256(path) != a.sha256:
            self.event(
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
        self.book.move(
            model,
            ModelState.ACTIVATING,
            detail=f"{a.variant} (policy {a.policy})",
            extra={"target": target.model_dump(mode="json")},
        )
        self.publish_status()
        self.store.activate(model, a.sha256)
        crash_point("after-swap")
        self.store.write_active_info(model, target)
        self.book.move(
            model,
            ModelState.PROBATION,
            detail=f"{a.variant} (policy {a.policy})",
            active=target,
            previous=previous,
            extra={},
        )
        self.event(EventKind.ACTIVATED, model, a.variant, a.sha256, detail=f"policy {a.policy}")
        self.publish_status()
        self.begin_probation(model)

    def begin_probation(self, model: str) -> None:
        rec = self.book.get(model)
        assert rec.active is not None
        manifest = self.manifests.get(model) or self._stored_manifest(model)
        sample = None
        variant = None
        if manifest is not None:
            with contextlib.suppress(KeyError):
                v = variant = manifest.variant(rec.active.variant)
                if v.sample is not None and self.store.has_blob(v.sample.sha256, "npz"):
                    sample = self.store.blob_path(v.sample.sha256, "npz")
        h = self.config.health
        problem = check_health(
            self.store.active_link(model),
            sample,
            variant,
            h,
            memory_limit_mb=self.config.bench.memory_limit_mb,
            stop=self.stop,
            tick=self.notifier.watchdog,
        )
        if self.stop.is_set():
            return  # interrupted: state stays probation and the check reruns after the restart
        if problem is not None:
            self.rollback(
                model, ReasonCode.HEALTH_CHECK_FAILED, f"health check failed: {problem}", mark_rejected=True
            )
            return
        self.probation_until[model] = time.monotonic() + h.probation_s

    def commit(self, model: str) -> None:
        rec = self.book.get(model)
        if rec.state is not ModelState.PROBATION or rec.active is None:
            return
        self.book.move(model, ModelState.COMMITTED, detail=rec.active.variant)
        self.event(EventKind.COMMITTED, model, rec.active.variant, rec.active.sha256)
        self.publish_status()
        self._after_settled(model)

    def rollback(
        self,
        model: str,
        reason: ReasonCode,
        detail: str,
        mark_rejected: bool = False,
        correlation_id: str | None = None,
    ) -> bool:
        rec = self.book.get(model)
        failed = rec.active
        self.probation_until.pop(model, None)
        restored = self.store.restore_previous(model)
        active: ActiveVariant | None = None
        if restored is not None:
            prev = rec.previous
            if prev is not None and prev.sha256 == restored:
                active = prev
            else:
                active = ActiveVariant(
                    variant="previous",
                    sha256=restored,
                    manifest_version=rec.manifest_version or 1,
                    activated_at=now(),
                )
            self.store.write_active_info(model, active)
        else:
            self.store.deactivate(model)
        key = [failed.variant, failed.sha256, failed.manifest_version] if (mark_rejected and failed) else None
        self.book.move(
            model,
            ModelState.ROLLED_BACK,
            detail=detail[:1000],
            active=active,
            previous=None,
            rejected_assignment=key if key else rec.rejected_assignment,
        )
        log.warning("model %s rolled back (%s): %s", model, reason.value, detail)
        self.event(
            EventKind.ROLLED_BACK,
            model,
            failed.variant if failed else None,
            failed.sha256 if failed else None,
            reason,
            detail=detail,
            correlation_id=correlation_id,
        )
        self.publish_status()
        self._after_settled(model)
        return True

    def _after_settled(self, model: str) -> None:
        if model in self.pending.manifest:
            self.on_manifest(model, self.pending.manifest.pop(model))
        elif model in self.pending.assignment:
            self.on_assignment(model, self.pending.assignment.pop(model))

    # ================================================================== commands

    def on_command(self, payload: bytes) -> None:
        try:
            cmd = verify_signed(Command, payload, self.trusted, self.max_payload)
        except WireError as err:
            log.warning("refused command: %s", err)
            self.event(EventKind.REJECTED, reason=_reason(err.reason), detail=str(err))
            return
        cid = cmd.id
        if cid in self.seen_commands:
            log.info("command %s already handled (QoS1 redelivery); ignoring it", cid)
            return
        self.seen_commands.append(cid)
        if cmd.device != self.device:
            self.event(
                EventKind.REJECTED,
                cmd.model,
                reason=ReasonCode.WRONG_DEVICE,
                detail=cmd.device,
                correlation_id=cid,
            )
            return
        age = now() - cmd.issued_at
        if age > self.config.commands.max_age_s:
            limit = self.config.commands.max_age_s
            detail = f"stale command: issued {age:.0f} s ago, older than commands.max_age_s = {limit:g}"
            log.warning("refused stale command %s: %s", cid, detail)
            self.event(
                EventKind.REJECTED, cmd.model, reason=ReasonCode.REPLAY, detail=detail, correlation_id=cid
            )
            return
        log.info("command %s (%s)", cmd.action.value, cid)
        if cmd.action is CommandAction.PING:
            self.event(EventKind.PONG, correlation_id=cid, detail=f"agent {agent.__version__}")
            return
        assert cmd.model is not None  # the schema requires it for model actions
        model = cmd.model
        rec = self.book.get(model)
        if cmd.action is CommandAction.REBENCHMARK:
            manifest = self.manifests.get(model) or self._stored_manifest(model)
            if manifest is None or rec.state not in SETTLED:
                detail = f"model {model} has no settled manifest (state {rec.state.value})"
                self.event(
                    EventKind.REJECTED,
                    model,
                    reason=ReasonCode.NOT_FETCHED,
                    detail=detail,
                    correlation_id=cid,
                )
                return
            self.event(EventKind.ACK, model, correlation_id=cid, detail="rebenchmark started")
            fetched = [v for v in manifest.variants if self.store.has_blob(v.sha256)]
            self.benchmark_and_report(model, manifest, fetched)
            self.event(
                EventKind.ACK, model, correlation_id=cid, detail="rebenchmark done; report republished"
            )
            return
        # rollback
        if self.store.link_sha(self.store.previous_link(model)) is None or rec.state not in (
            ModelState.COMMITTED,
            ModelState.REPORTED,
            ModelState.PROBATION,
        ):
            detail = f"nothing to roll back to for {model} (state {rec.state.value})"
            self.event(
                EventKind.REJECTED, model, reason=ReasonCode.NO_PREVIOUS, detail=detail, correlation_id=cid
            )
            return
        self.rollback(model, ReasonCode.COMMAND, "rollback command", mark_rejected=True, correlation_id=cid)

    # ================================================================== publishing

    def event(
        self,
        kind: EventKind,
        model: str | None = None,
        variant: str | None = None,
        sha: str | None = None,
        reason: ReasonCode | None = None,
        *,
        detail: str | None = None,
        correlation_id: str | None = None,
    ) -> None:
        ev = Event(
            device=self.device,
            ts=now(),
            kind=kind,
            model=model,
            variant=variant,
            sha256=sha,
            reason=reason,
            detail=detail[:2000] if detail else None,
            correlation_id=correlation_id,
        )
        log.info(
            "event %s%s%s%s",
            kind.value,
            f" {model}" if model else "",
            f"/{variant}" if variant else "",
            f" {reason.value}" if reason else "",
        )
        self.client.publish(self.topics.events(self.device), ev.to_json(), qos=1, retain=False, timeout=5.0)

    def _status(self, online: bool = True) -> Status:
        return Status(
            device=self.device,
            online=online,
            ts=now(),
            agent_version=agent.__version__,
            runtime=self.runtime,
            board=self.board,
            arch=platform.machine()[:64] or None,
            cpu_count=self.board_info.cpu_count,
            ram_bytes=psutil.virtual_memory().total,
            device_class=self.config.device.device_class,
            models={m: rec.status() for m, rec in self.book.models.items()},
        )

    def publish_status(self) -> None:
        payload = self._status().to_json()
        topic = self.topics.status(self.device)
        self.client.set_birth(topic, payload)
        self.client.publish(topic, payload, qos=1, retain=True, timeout=5.0)
        self.publish_discovery()

    def publish_discovery(self, force: bool = False) -> None:
        """Retained Home Assistant discovery configs (opt-in); republished on connect and when they change."""
        if not self.config.telemetry.home_assistant:
            return
        from agent.homeassistant import DeviceInfo, discovery_messages  # opt-in: not loaded otherwise

        models = {*self.book.models, *self.config.models.follow}
        active = {m: rec.active.variant for m, rec in self.book.models.items() if rec.active is not None}
        info = DeviceInfo(
            self.device, self.board, agent.__version__, device_class=self.config.device.device_class
        )
        messages = discovery_messages(
            info, models, active, self.config.mqtt.namespace, self.config.telemetry.interval_s
        )
        for msg in messages:
            payload = msg.payload_bytes()
            if force or self.ha_published.get(msg.topic) != payload:
                self.client.publish(msg.topic, payload, qos=1, retain=True, timeout=5.0)
                self.ha_published[msg.topic] = payload

    def send_telemetry(self) -> None:
        try:
            rss = self._process.memory_info().rss
        except psutil.Error:
            rss = None
        tel = Telemetry(
            device=self.device,
            ts=now(),
            uptime_s=time.monotonic() - self.started,
            cpu_percent=psutil.cpu_percent(interval=None),
            rss_bytes=rss,
            temperature_c=cpu_temperature(),
            throttled=throttled_now(),
            inferences=read_counters(self.store.root),
        )
        self.client.publish(self.topics.telemetry(self.device), tel.to_json(), qos=0, retain=False)


def release_startup_memory() -> None:
    """After start-up: collect, freeze what survived (the periodic GC then skips it) and hand freed heap
    back to the OS (glibc ``malloc_trim``; a no-op elsewhere). Start-up garbage — TOML, schema building,
    import-time temporaries — otherwise stays in the idle daemon's RSS."""
    gc.collect()
    gc.freeze()
    with contextlib.suppress(OSError, AttributeError):  # the process's own symbols: glibc's when present
        ctypes.CDLL(None).malloc_trim(0)


def default_store_ok(config: AgentConfig) -> str | None:
    """A human-readable problem with the store path, or None (used by --check-config)."""
    path = config.store.path
    probe = path if path.exists() else path.parent
    if not os.access(probe, os.W_OK):
        return f"store.path {path} is not writable by this user"
    return None


def board_info(config: AgentConfig) -> BoardInfo:
    """The detected board; ``[device].board`` renames it and, naming a known board, picks its profile."""
    info = detect_board()
    override = config.device.board
    if override:
        key = profile_key_for(override, info.arch)
        if not key.startswith("generic"):
            info = dataclasses.replace(info, name=override, model_string=override, profile_key=key)
    return info


def energy_meter(config: AgentConfig, info: BoardInfo) -> EnergyMeter:
    """The energy meter for this daemon: the configured backend (or the best found) and the board profile."""
    energy: EnergyConfig = config.energy
    profile_file = resolve_profile_file(energy, config.store.path)
    if profile_file != energy.profile_file:
        energy = energy.model_copy(update={"profile_file": profile_file})
    try:
        return EnergyMeter.from_config(energy, board=info)
    except HardwareError as err:
        raise ConfigError(f"[energy]: {err}") from err


def throttled_now() -> bool | None:
    """Raspberry Pi firmware throttling flags, any set now; None where there is no firmware interface."""
    state = read_throttled()
    return None if state is None else state.any_now
