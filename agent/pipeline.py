"""The per-model pipeline: manifest → fetch → verify → benchmark → report, and store garbage collection.

Threads (why: a benchmark sweep takes minutes on a Pi, and the main loop must keep answering pings,
commands and assignments meanwhile):

* the **main loop** accepts manifests (:meth:`Pipeline.on_manifest`), feeds received chunks to the
  :class:`~agent.fetch.Fetcher` (the fetcher keeps one owner thread) and, once every blob of a model is
  stored, submits a :class:`Job`. A chunk is verified and stored on the main loop because it is cheap:
  measured with ``Store.write_chunk`` (sha256 + temp file + rename; chunks are not fsynced, the whole blob
  is at assembly, on the worker) for 1024 chunks of 256 KiB on ext4, 2-core x86 VM: p50 0.26 ms, p99
  0.31 ms, max 0.46 ms (the sha256 is 0.12 ms of it); an fsynced 256 KiB write (``atomic_write``) p50
  0.65 ms, max 0.90 ms. On a Pi 4 (no ARMv8 crypto extensions) the hash is slower: a few ms per chunk
  (estimated, not measured on one), still far under the loop's 0.5 s tick. A thread would buy nothing
  and add a lock around the fetcher;
* the **worker** thread (:meth:`Pipeline.start_worker`) runs one job at a time: whole-blob verification
  (hashing MiBs), the benchmark sweep (children, :mod:`agent.bench`), the report, then garbage collection.

What crosses threads, and how:

* jobs go to the worker through ``Pipeline._jobs_in`` (a ``queue.Queue``); a finished job's model comes
  back through ``Pipeline.settled`` (a ``queue.Queue`` the main loop drains, then applies a pending
  assignment: an assignment that arrives during a measurement is applied when it ends);
* the state book is locked internally (:class:`agent.state.StateBook`); the held manifests and the
  running job per model are guarded by ``Pipeline._lock``; garbage collection and the start of a fetch
  share ``Pipeline._gc_lock`` (a collection never deletes the chunks of a manifest accepted meanwhile);
* the worker publishes events and the report itself (paho's publish is thread-safe) but only *asks* for
  the retained status (:meth:`agent.publishing.Publisher.request_status`): the main loop publishes it,
  so status messages go out in the order of the snapshots they carry;
* a job is cancelled with :meth:`Job.cancel` (a newer manifest, a ``cancel`` command, shutdown): its
  ``stop`` event ends the benchmark child (``agent.bench.run_child`` kills its process group within
  0.25 s). Every state move of the worker happens under the job's lock after checking it was not
  cancelled, so once ``cancel()`` returns True the worker moves nothing and publishes no report: the
  canceller owns the record from then on (a newer manifest moves it to fetching, a cancel command back to
  where the measurement started — see :mod:`agent.state` — and shutdown leaves it for recovery).

The post-activation health check is not a job of this worker: it runs on a thread of its own
(:mod:`agent.health`, which says why and what crosses that boundary), so it never waits behind a sweep.
"""

from __future__ import annotations

import contextlib
import ctypes
import gc
import logging
import queue
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from enum import StrEnum
from typing import TYPE_CHECKING

from agent.errors import DiskFullError, IntegrityError
from agent.fetch import Fetcher, FetchNote
from agent.state import IN_ACTIVATION, IN_PIPELINE, SETTLED, StateBook
from agent.store import BlobKind, Store
from agent.wire import (
    BenchError,
    BenchResult,
    BlobRef,
    EventKind,
    Manifest,
    ModelState,
    ReasonCode,
    Report,
    Variant,
    WireError,
    decode_inbound,
    now,
    verify_signed,
)

if TYPE_CHECKING:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

    from agent.board import BoardInfo
    from agent.config import AgentConfig
    from agent.energy import EnergyMeter
    from agent.mqtt import BrokerClient
    from agent.publishing import Publisher
    from agent.wire import RuntimeInfo

log = logging.getLogger(__name__)

_POLL_S = 0.5  # the idle worker checks the agent's stop this often
_JOIN_S = 15.0  # shutdown: the child is killed within 0.25 s of the stop; saving state takes the rest


class JobKind(StrEnum):
    PIPELINE = "pipeline"  # verify the fetched blobs, benchmark, report → REPORTED
    REBENCHMARK = "rebenchmark"  # benchmark what is stored, report → back to the settled state


@dataclass(slots=True)
class Job:
    model: str
    manifest: Manifest
    kind: JobKind
    return_to: ModelState = ModelState.REPORTED
    correlation_id: str | None = None
    stop: threading.Event = field(default_factory=threading.Event)
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _finished: bool = False

    def cancel(self) -> bool:
        """Stop the job. True: it will move and publish nothing more; False: it had already finished."""
        with self._lock:
            if self._finished:
                return False
            self.stop.set()
            return True

    @contextlib.contextmanager
    def step(self, final: bool = False) -> Iterator[bool]:
        """Hold the job's lock around a state move; yields False when the job was cancelled."""
        with self._lock:
            live = not self.stop.is_set() and not self._finished
            yield live
            if live and final:
                self._finished = True


def blobs_of(manifest: Manifest) -> list[tuple[str, BlobRef, BlobKind]]:
    """Every blob a manifest names: (variant id, ref, kind), the sample after its variant."""
    out: list[tuple[str, BlobRef, BlobKind]] = []
    for v in manifest.variants:
        out.append((v.id, v, "tflite"))
        if v.sample is not None:
            out.append((v.id, v.sample, "npz"))
    return out


class Pipeline:
    """Manifests, fetches and measurements of every followed model (see the module docstring)."""

    def __init__(
        self,
        config: AgentConfig,
        store: Store,
        book: StateBook,
        publisher: Publisher,
        client: BrokerClient,
        trusted: dict[str, Ed25519PublicKey],
        *,
        board_info: BoardInfo,
        meter: EnergyMeter,
        runtime: RuntimeInfo | None,
        stop: threading.Event,
    ) -> None:
        self.config = config
        self.store = store
        self.book = book
        self.pub = publisher
        self.client = client
        self.trusted = trusted
        self.board_info = board_info
        self.meter = meter
        self.runtime = runtime
        self.stop = stop
        self.device = config.device.id
        self.topics = publisher.topics
        self.max_payload = config.mqtt.max_payload_kb * 1024
        self.fetcher = Fetcher(
            store, client, self.topics, window=config.fetch.window, timeout_s=config.fetch.timeout_s
        )
        self.settled: queue.Queue[str] = queue.Queue()  # worker → main loop: a model left the pipeline
        self.pending_manifest: dict[str, bytes] = {}  # main loop only: waits for an activation to settle
        self._jobs_in: queue.Queue[Job | None] = queue.Queue()
        self._lock = threading.Lock()  # guards _manifests and _running
        self._manifests: dict[str, Manifest] = {}
        self._running: dict[str, Job] = {}  # submitted and not yet done, per model
        # held by a collection and by start(): a collection sees a new manifest or ends before its fetch
        self._gc_lock = threading.RLock()
        self._worker: threading.Thread | None = None

    # ================================================================== manifests (main loop)

    def manifest(self, model: str) -> Manifest | None:
        """The manifest held for ``model``: in memory, else the stored one if it still verifies."""
        with self._lock:
            held = self._manifests.get(model)
        if held is not None:
            return held
        payload = self.store.read_manifest(model)
        if payload is None:
            return None
        try:
            manifest = verify_signed(Manifest, payload, self.trusted)
        except WireError:
            return None
        with self._lock:
            return self._manifests.setdefault(model, manifest)

    def on_manifest(self, model: str, payload: bytes) -> None:
        if not payload:
            log.info("manifest of %s was cleared on the broker; keeping what is installed", model)
            return
        follow = self.config.models.follow
        if follow and model not in follow:
            log.info("ignoring manifest of %s (not in models.follow)", model)
            return
        try:  # signature, schema and topic checked by the one decoder of the wire contract
            topic = self.topics.manifest(model)
            decoded = decode_inbound(
                self.topics, topic, payload, trusted=self.trusted, max_bytes=self.max_payload
            )
            manifest = decoded.as_(Manifest)
        except WireError as err:
            log.warning("refused manifest of %s: %s", model, err)
            self.pub.event(EventKind.REJECTED, model, reason=err.reason, detail=str(err))
            return
        rec = self.book.get(model)
        held = rec.manifest_version
        if held is not None and manifest.version < held:
            detail = f"manifest v{manifest.version} is older than v{held} held (replay)"
            log.warning("refused manifest of %s: %s", model, detail)
            self.pub.event(EventKind.REJECTED, model, reason=ReasonCode.REPLAY, detail=detail)
            return
        if held == manifest.version and rec.state is not ModelState.IDLE:
            with self._lock:
                known = model in self._manifests
            if rec.state in IN_PIPELINE and not known:
                self.start(model, manifest, payload)
            else:
                log.debug("manifest v%d of %s already handled (%s)", manifest.version, model, rec.state.value)
            return
        if rec.state in IN_ACTIVATION:
            log.info("manifest v%d of %s waits until the current activation settles", manifest.version, model)
            self.pending_manifest[model] = payload
            return
        self.start(model, manifest, payload)

    def start(self, model: str, manifest: Manifest, payload: bytes) -> None:
        """Begin fetching ``manifest`` (cancelling a measurement of an older one) if the disk allows."""
        self.cancel(model)
        self.fetcher.cancel(model)
        blobs = blobs_of(manifest)
        needed = sum(ref.size for _, ref, kind in blobs if not self.store.has_blob(ref.sha256, kind))
        largest = max((ref.size for _, ref, _ in blobs), default=0)
        with self._gc_lock:
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
                self.pub.event(EventKind.REJECTED, model, reason=ReasonCode.DISK_FULL, detail=str(err))
                return
            self.store.write_manifest(model, payload)
            self.book.move(
                model,
                ModelState.FETCHING,
                detail=f"manifest v{manifest.version}",
                manifest_version=manifest.version,
                return_to=None,
            )
            with self._lock:
                self._manifests[model] = manifest
            for label, ref, kind in blobs:
                if not self.store.has_blob(ref.sha256, kind):
                    self.fetcher.add(model, label, ref, kind)
        self.fetcher.pump()
        self.pub.publish_status()

    def resume(self, model: str) -> None:
        """After a restart: pick up the pipeline ``model`` was in (the manifest is verified again)."""
        rec = self.book.get(model)
        payload = self.store.read_manifest(model)
        if payload is None:
            return
        try:
            manifest = verify_signed(Manifest, payload, self.trusted)
        except WireError as err:
            log.warning("stored manifest of %s no longer verifies (%s); waiting for a new one", model, err)
            return
        log.info("model %s: resuming %s of manifest v%d", model, rec.state.value, manifest.version)
        if rec.state is ModelState.BENCHMARKING and rec.return_to is not None:
            with self._lock:
                self._manifests[model] = manifest
            self._submit(Job(model, manifest, JobKind.REBENCHMARK, return_to=rec.return_to))
            return
        self.start(model, manifest, payload)

    def on_chunk(self, sha: str, index: int, payload: bytes) -> None:
        for note in self.fetcher.on_chunk(sha, index, payload):
            self._fetch_note(note)

    def _fetch_note(self, note: FetchNote) -> None:
        for model, variant in note.owners[:1]:
            if note.reason is None:  # the blob is complete
                what = "evaluation sample" if note.blob_kind == "npz" else "model"
                self.pub.event(EventKind.DOWNLOADED, model, variant, note.sha256, detail=what)
            else:  # a refused chunk or a full disk is a rejection; a stalled fetch (NOT_FETCHED) an error
                kind = EventKind.ERROR if note.kind == "timeout" else EventKind.REJECTED
                self.pub.event(kind, model, variant, note.sha256, note.reason, detail=note.detail)

    def tick(self) -> None:
        """Main loop: fetch timeouts, and a job for every model whose blobs are all stored."""
        for note in self.fetcher.check_timeouts():
            self._fetch_note(note)
        for model, rec in self.book.models.items():
            if rec.state is not ModelState.FETCHING or self.fetcher.busy(model):
                continue
            with self._lock:
                manifest = self._manifests.get(model)
                waiting = model in self._running
            if manifest is not None and not waiting:
                self._submit(Job(model, manifest, JobKind.PIPELINE))

    # ================================================================== commands (main loop)

    def rebenchmark(self, model: str, correlation_id: str) -> str | None:
        """Measure the stored variants again (through BENCHMARKING); a refusal's reason, or None."""
        rec = self.book.get(model)
        manifest = self.manifest(model)
        if manifest is None or rec.state not in SETTLED:
            return f"model {model} has no settled manifest (state {rec.state.value})"
        self.book.move(model, ModelState.BENCHMARKING, detail="rebenchmark command", return_to=rec.state)
        self.pub.publish_status()
        self._submit(
            Job(model, manifest, JobKind.REBENCHMARK, return_to=rec.state, correlation_id=correlation_id)
        )
        return None

    def cancel_measurement(self, model: str) -> str | None:
        """A ``cancel`` command: end the running measurement of ``model``; a refusal's reason, or None.

        The record goes back to where the measurement started: the settled state of a rebenchmark, or
        idle for the first measurement of a manifest (which restarts when the manifest is delivered
        again — a reconnect or a restart — or a new one comes). No report is published.
        """
        rec = self.book.get(model)
        if rec.state is not ModelState.BENCHMARKING:
            return f"model {model} is not benchmarking (state {rec.state.value})"
        with self._lock:
            job = self._running.get(model)
        if job is None or not job.cancel():
            return f"the measurement of {model} has just ended"
        back = rec.return_to or ModelState.IDLE
        self.book.move(model, back, detail="benchmark cancelled by command", return_to=None)
        self.pub.publish_status()
        return None

    def cancel(self, model: str) -> bool:
        """Cancel the job of ``model`` if any (a newer manifest). True if one was stopped."""
        with self._lock:
            job = self._running.get(model)
        return job is not None and job.cancel()

    def busy(self, model: str) -> bool:
        with self._lock:
            return model in self._running

    def job(self, model: str) -> Job | None:
        """The job submitted for ``model`` and not yet done, if any."""
        with self._lock:
            return self._running.get(model)

    # ================================================================== the worker

    def start_worker(self) -> None:
        """Started by the first job (an idle daemon has no worker thread)."""
        self._worker = threading.Thread(target=self._work, name="edgefleet-pipeline", daemon=True)
        self._worker.start()

    def shutdown(self) -> None:
        """Stop the worker: the running job is cancelled (its state stays for recovery), then joined."""
        with self._lock:
            jobs = list(self._running.values())
        for job in jobs:
            job.cancel()
        self._jobs_in.put(None)
        if self._worker is not None:
            self._worker.join(timeout=_JOIN_S)
            if self._worker.is_alive():
                log.warning("pipeline worker still busy after %.0f s; leaving it", _JOIN_S)

    def _submit(self, job: Job) -> None:
        if self._worker is None and not self.stop.is_set():
            self.start_worker()
        with self._lock:
            self._running[job.model] = job
        if self.stop.is_set():
            job.cancel()
        self._jobs_in.put(job)

    def _work(self) -> None:
        while True:
            try:
                job = self._jobs_in.get(timeout=_POLL_S)
            except queue.Empty:
                if self.stop.is_set():
                    return
                continue
            if job is None:  # shutdown()
                return
            self.run_job(job)

    def run_job(self, job: Job) -> None:
        """One job, start to end (the worker calls it; tests may call it on their own thread)."""
        try:
            if not job.stop.is_set():
                if job.kind is JobKind.PIPELINE:
                    self._pipeline(job)
                else:
                    self._measure_and_report(job, self._stored_variants(job.manifest))
        except Exception as err:  # the record stays in its state; a new manifest restarts it
            log.exception("model %s: %s failed", job.model, job.kind.value)
            self.pub.event(
                EventKind.ERROR, job.model, reason=ReasonCode.INTERNAL, detail=f"{type(err).__name__}: {err}"
            )
        finally:
            with self._lock:
                if self._running.get(job.model) is job:
                    del self._running[job.model]
            self.settled.put(job.model)
            trim_heap()

    def _stored_variants(self, manifest: Manifest) -> list[Variant]:
        return [v for v in manifest.variants if self.store.has_blob(v.sha256)]

    def _pipeline(self, job: Job) -> None:
        model, manifest = job.model, job.manifest
        with job.step() as live:
            if not live:
                return
            self.book.move(model, ModelState.VERIFYING, detail=f"manifest v{manifest.version}")
        self.pub.request_status()
        for label, ref, kind in blobs_of(manifest):
            if job.stop.is_set():
                return
            if self.store.has_blob(ref.sha256, kind) or self.store.missing_chunks(ref):
                continue
            try:
                self.store.assemble(ref, kind)
            except IntegrityError as err:
                self.store.discard_partial(ref.sha256)
                self.pub.event(EventKind.REJECTED, model, label, ref.sha256, err.reason, detail=str(err))
                continue
            self.pub.event(EventKind.VERIFIED, model, label, ref.sha256, detail=f"{kind} blob")
        fetched = self._stored_variants(manifest)
        if not fetched:
            with job.step(final=True) as live:
                if not live:
                    return
                detail = f"no variant of manifest v{manifest.version} could be fetched"
                self.book.move(model, ModelState.IDLE, detail=detail)
                with self._lock:
                    self._manifests.pop(model, None)
            self.pub.request_status()
            return
        with job.step() as live:
            if not live:
                return
            self.book.move(model, ModelState.BENCHMARKING, detail=f"{len(fetched)} variant(s)")
        self.pub.request_status()
        self._measure_and_report(job, fetched)

    def _measure_and_report(self, job: Job, variants: list[Variant]) -> None:
        model, manifest = job.model, job.manifest
        t0 = time.monotonic()
        report = self.measure(model, manifest, variants, job.stop)
        with job.step(final=True) as live:
            if not live or report is None:
                log.info("model %s: measurement cancelled; no report", model)
                return
            self.publish_report(report, time.monotonic() - t0)
            if job.kind is JobKind.PIPELINE:
                missing = [v.id for v in manifest.variants if v not in variants]
                detail = f"not fetched: {', '.join(missing)}" if missing else None
                self.book.move(model, ModelState.REPORTED, detail=detail)
            else:
                self.book.move(model, job.return_to, detail="rebenchmarked", return_to=None)
        if job.correlation_id is not None:
            self.pub.event(
                EventKind.ACK,
                model,
                correlation_id=job.correlation_id,
                detail="rebenchmark done; report republished",
            )
        self.pub.request_status()
        self.collect_garbage()

    # ================================================================== measuring (worker, or any thread)

    def measure(
        self, model: str, manifest: Manifest, variants: list[Variant], stop: threading.Event
    ) -> Report | None:
        """Benchmark every variant at every thread count; the Report, or None when ``stop`` cut it short.

        The baseline (float32) variant runs first: its top-1 predictions on the sample, on this device,
        give every other variant's ``agreement`` (the samples hold the same inputs in the same order, only
        the dtype differs) — for a generic task only when output 0 is a class vector. Each variant's
        outputs on its sample are also compared with the host's (``fidelity``; outside the variant's
        ``output_tolerance`` → ACCURACY_MISMATCH). A variant whose ``min_runtime`` this device's runtime
        does not meet is not run: its result is RUNTIME_TOO_OLD and a ``skipped`` event says so.
        """
        from agent.bench import measure_variant  # lazy: the idle daemon never loads the bench code

        results: list[BenchResult] = []
        baseline_predictions: list[int] | None = None
        for v in sorted(variants, key=lambda v: v.id != manifest.baseline):  # stable: baseline first
            sample = self.store.blob_path(v.sample.sha256, "npz") if v.sample else None
            for threads in self.config.bench.thread_counts():
                if stop.is_set():
                    return None
                run = measure_variant(
                    v,
                    self.store.blob_path(v.sha256),
                    sample if sample is not None and sample.is_file() else None,
                    self.config.bench,
                    board=self.board_info,
                    threads=threads,
                    stop=stop,
                    meter=self.meter,
                    runtime=self.runtime,
                    thermal=self.config.thermal,
                    baseline_predictions=baseline_predictions,
                    is_baseline=v.id == manifest.baseline,
                    task=manifest.task,
                )
                if stop.is_set():
                    return None  # the child was ended: its "result" is the interruption, not the model's
                result = run.result
                results.append(result)
                if result.error is BenchError.RUNTIME_TOO_OLD:
                    reason = ReasonCode.RUNTIME_TOO_OLD
                    self.pub.event(
                        EventKind.SKIPPED, model, v.id, v.sha256, reason, detail=result.error_detail
                    )
                    break  # the other thread counts would say the same
                if v.id == manifest.baseline and baseline_predictions is None:
                    baseline_predictions = run.predictions
                self.pub.event(
                    EventKind.BENCHMARKED,
                    model,
                    v.id,
                    v.sha256,
                    None if result.ok else ReasonCode.BENCH_FAILED,
                    detail=result.error_detail if not result.ok else f"{threads} thread(s)",
                )
        return Report(
            device=self.device, model=model, manifest_version=manifest.version, ts=now(), results=results
        )

    def publish_report(self, report: Report, seconds: float | None = None) -> None:
        # the worker publishes under the job's lock, which a cancel waits for: a short ack wait (paho
        # delivers a QoS1 message it could not get acknowledged in time on its own)
        topic = self.topics.report(self.device, report.model)
        self.client.publish(topic, report.to_json(), qos=1, retain=True, timeout=2.0)
        self.pub.note_report(report)
        self.pub.request_status()  # the active file's figures may have changed
        log.info(
            "published report of %s v%d: %d result(s)%s",
            report.model,
            report.manifest_version,
            len(report.results),
            f" in {seconds:.1f} s" if seconds is not None else "",
        )

    # ================================================================== garbage collection

    def collect_garbage(self, replacing: tuple[str, Manifest] | None = None) -> None:
        """Drop blobs that no held manifest and no active/previous link references."""
        with self._gc_lock:  # the main loop (disk full) and the worker (after a report) both collect
            self._collect(replacing)

    def _collect(self, replacing: tuple[str, Manifest] | None) -> None:
        keep: set[str] = set()
        for model in {*self.book.models, *([replacing[0]] if replacing else [])}:
            if replacing is not None and model == replacing[0]:
                manifest: Manifest | None = replacing[1]
            else:
                manifest = self.manifest(model)
            if manifest is not None:
                keep.update(ref.sha256 for _, ref, _ in blobs_of(manifest))
        try:
            self.store.gc(keep)
        except OSError as err:
            log.warning("store gc failed: %s", err)


def trim_heap() -> None:
    """Hand the heap a job freed back to the OS: the children's JSON (every timed latency) is parsed
    here, and without ``malloc_trim`` the idle daemon keeps that peak after its first report."""
    gc.collect()
    with contextlib.suppress(OSError, AttributeError):  # glibc's symbol when the process has it
        ctypes.CDLL(None).malloc_trim(0)
