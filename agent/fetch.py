"""Chunked blob fetching over retained MQTT messages with a sliding window of subscriptions.

A wildcard over many retained chunks is silently truncated by mosquitto (FACTS.md), so the fetcher
subscribes to at most ``window`` (≤ 32) exact chunk topics ``{ns}/blobs/{sha}/{index}`` that are still
missing, verifies each arriving chunk (length, sha256) before storing it atomically in
``partial/<sha>/<index>``, unsubscribes it, and subscribes the next missing one. Chunks stored before a
restart are not fetched again. A blob that makes no progress for ``timeout_s`` is given up (its chunks
are kept for a later attempt). Whole-blob assembly and verification is :meth:`agent.store.Store.assemble`.

The fetcher is driven from the daemon's main thread only (``on_chunk``, ``pump``, ``check_timeouts``).

Failover: the broker client re-subscribes every chunk still in flight after it reconnects, to whichever
node it reached, and retained chunks are delivered again there; chunks already stored stay stored, so a
fetch interrupted by a node loss resumes where it was. Chunk subscriptions use the client's
``chunk_qos`` (``mqtt.chunk_qos``; 0 on NATS, where a QoS1 subscription is a JetStream consumer).
"""

from __future__ import annotations

import bisect
import errno
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from agent.errors import IntegrityError
from agent.mqtt import BrokerClient
from agent.store import BlobKind, Store
from agent.wire import BlobRef, ReasonCode, Topics

log = logging.getLogger(__name__)

DISK_RETRY_S = 5.0  # a fetch paused by a full disk asks for its chunks again after this


@dataclass(frozen=True, slots=True)
class FetchNote:
    """Something the daemon reports as an Event: a blob complete, a bad chunk, or a timeout."""

    kind: str  # "complete" | "rejected" | "timeout"
    sha256: str
    owners: tuple[tuple[str, str], ...]  # (model, variant id)
    reason: ReasonCode | None = None  # None exactly when the blob is complete
    detail: str | None = None
    blob_kind: str = "tflite"


@dataclass(slots=True)
class BlobJob:
    ref: BlobRef
    kind: BlobKind
    owners: set[tuple[str, str]]
    queued: list[int]  # missing chunk indices not yet subscribed, ascending
    in_flight: set[int] = field(default_factory=set)
    last_progress: float = 0.0
    bad_chunks: int = 0
    paused_until: float = 0.0  # the disk was full: no new subscriptions before then

    @property
    def done(self) -> bool:
        return not self.queued and not self.in_flight


class Fetcher:
    def __init__(
        self,
        store: Store,
        client: BrokerClient,
        topics: Topics,
        *,
        window: int = 32,
        timeout_s: float = 300.0,
        clock: Callable[[], float] = time.monotonic,
        qos: int | None = None,
    ) -> None:
        if not 1 <= window <= 32:
            raise ValueError("window must be between 1 and 32 subscriptions")
        self.store = store
        self.client = client
        self.topics = topics
        self.window = window
        self.timeout_s = timeout_s
        self.clock = clock
        # a fake client in unit tests may not say; the real one follows mqtt.chunk_qos
        self.qos: int = qos if qos is not None else int(getattr(client, "chunk_qos", 1))
        self.jobs: dict[str, BlobJob] = {}

    # ------------------------------------------------------------------ jobs

    def add(self, model: str, label: str, ref: BlobRef, kind: BlobKind = "tflite") -> bool:
        """Queue ``ref`` unless its chunks are all stored already. Returns True if a fetch is needed."""
        job = self.jobs.get(ref.sha256)
        if job is not None:
            job.owners.add((model, label))
            return True
        missing = self.store.missing_chunks(ref)
        if not missing:
            return False
        have = len(ref.chunks) - len(missing)
        log.info(
            "fetching %s %s (%s): %d of %d chunk(s) missing%s",
            model,
            label,
            ref.sha256[:12],
            len(missing),
            len(ref.chunks),
            f", {have} kept from before" if have else "",
        )
        self.jobs[ref.sha256] = BlobJob(ref, kind, {(model, label)}, missing, last_progress=self.clock())
        return True

    def busy(self, model: str) -> bool:
        """True while any blob of ``model`` is still being fetched."""
        return any(model == m for job in self.jobs.values() for m, _ in job.owners)

    def cancel(self, model: str) -> None:
        """Drop ``model``'s interest in its blobs (a newer manifest replaced it); chunks stay on disk."""
        for sha, job in list(self.jobs.items()):
            job.owners = {o for o in job.owners if o[0] != model}
            if not job.owners:
                self._drop(sha)

    def subscribed(self) -> int:
        return sum(len(j.in_flight) for j in self.jobs.values())

    def pump(self) -> None:
        """Fill the subscription window with the next missing chunks, oldest job first."""
        free = self.window - self.subscribed()
        now = self.clock()
        for job in self.jobs.values():
            while free > 0 and job.queued and job.paused_until <= now:
                index = job.queued.pop(0)
                job.in_flight.add(index)
                self.client.subscribe(self.topics.blob(job.ref.sha256, index), self.qos)
                free -= 1
            if free <= 0:
                return

    # ------------------------------------------------------------------ messages

    def on_chunk(self, sha: str, index: int, payload: bytes) -> list[FetchNote]:
        job = self.jobs.get(sha)
        topic = self.topics.blob(sha, index)
        if job is None or index not in job.in_flight:
            if job is None or index not in job.queued:
                # a stale subscription from a previous session, or a duplicate: drop it
                self.client.unsubscribe(topic)
            return []
        if not payload:
            return []  # a retained chunk being cleared by the publisher
        owners = tuple(sorted(job.owners))
        try:
            self.store.write_chunk(job.ref, index, payload)
        except IntegrityError as err:
            job.bad_chunks += 1
            log.warning("refused %s: %s", topic, err)
            return [FetchNote("rejected", sha, owners, err.reason, str(err), job.kind)]
        except OSError as err:
            if err.errno not in (errno.ENOSPC, errno.EDQUOT):
                raise
            return self._disk_full(job, index, topic, owners, err)
        job.in_flight.discard(index)
        job.last_progress = self.clock()
        self.client.unsubscribe(topic)
        notes: list[FetchNote] = []
        if job.done:
            del self.jobs[sha]
            notes.append(FetchNote("complete", sha, owners, blob_kind=job.kind))
        self.pump()
        return notes

    def _disk_full(
        self, job: BlobJob, index: int, topic: str, owners: tuple[tuple[str, str], ...], err: OSError
    ) -> list[FetchNote]:
        """No room for a chunk: put it back in the queue and pause the job (one DISK_FULL per pause);
        :meth:`check_timeouts` resumes it after ``DISK_RETRY_S`` (the chunk is retained on the broker)."""
        self.client.unsubscribe(topic)
        job.in_flight.discard(index)
        bisect.insort(job.queued, index)
        now = self.clock()
        job.last_progress = now  # waiting for space is not a stalled transfer
        first = job.paused_until <= now
        job.paused_until = now + DISK_RETRY_S
        if not first:
            return []
        detail = f"no space left for chunk {index} of {job.ref.sha256[:12]} ({err.strerror}); retrying"
        log.warning("fetch paused: %s", detail)
        return [FetchNote("rejected", job.ref.sha256, owners, ReasonCode.DISK_FULL, detail, job.kind)]

    def check_timeouts(self) -> list[FetchNote]:
        now = self.clock()
        if any(0 < j.paused_until <= now for j in self.jobs.values()):
            for job in self.jobs.values():
                if 0 < job.paused_until <= now:
                    job.paused_until = 0.0
                    job.last_progress = now
            self.pump()  # space may be back: ask for the chunks again
        notes = []
        for sha, job in list(self.jobs.items()):
            if now - job.last_progress > self.timeout_s:
                left = len(job.queued) + len(job.in_flight)
                detail = (
                    f"no chunk of {sha[:12]} for {self.timeout_s:g} s; {left} chunk(s) missing (rest kept)"
                )
                log.warning("fetch timed out: %s", detail)
                notes.append(
                    FetchNote("timeout", sha, tuple(sorted(job.owners)), ReasonCode.NOT_FETCHED, detail)
                )
                self._drop(sha)
        if notes:
            self.pump()
        return notes

    def _drop(self, sha: str) -> None:
        job = self.jobs.pop(sha, None)
        if job is None:
            return
        for index in job.in_flight:
            self.client.unsubscribe(self.topics.blob(sha, index))
