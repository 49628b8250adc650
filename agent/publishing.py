"""What the agent tells the fleet: events, retained status, telemetry and Home Assistant discovery.

Events may be published from the main loop and from the pipeline worker (:mod:`agent.pipeline`): the
broker client's ``publish`` is thread-safe (paho serialises it). The retained status is published by
the main loop only, built from a snapshot of the state book (immutable records); the worker asks for it
with :meth:`Publisher.request_status` (a ``threading.Event``). Which discovery configs were published is
guarded by a lock.
"""

from __future__ import annotations

import contextlib
import logging
import os
import platform
import threading
import time
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING

import agent
from agent.active import read_counters
from agent.config import AgentConfig
from agent.thermal import cpu_temperature, read_throttled
from agent.wire import (
    Event,
    EventKind,
    ModelStatus,
    ReasonCode,
    Report,
    RuntimeInfo,
    Status,
    Telemetry,
    Topics,
    WireError,
    decode,
    now,
)

if TYPE_CHECKING:
    from agent.board import BoardInfo
    from agent.mqtt import BrokerClient
    from agent.state import StateBook
    from agent.store import Store

log = logging.getLogger(__name__)


def build_status(
    config: AgentConfig,
    book: StateBook,
    board_info: BoardInfo,
    board: str,
    runtime: RuntimeInfo | None,
    online: bool = True,
    reports: Mapping[str, Report] | None = None,
) -> Status:
    """The device's Status from a snapshot of its records (also the Last Will, built before any client);
    ``reports`` (model → this device's latest report) put the active file's figures in the status."""
    reports = reports or {}
    return Status(
        device=config.device.id,
        online=online,
        ts=now(),
        agent_version=agent.__version__,
        runtime=runtime,
        board=board,
        arch=platform.machine()[:64] or None,
        cpu_count=board_info.cpu_count,
        ram_bytes=total_ram(),
        device_class=config.device.device_class,
        models={m: with_figures(rec.status(), reports.get(m)) for m, rec in book.models.items()},
    )


def with_figures(status: ModelStatus, report: Report | None) -> ModelStatus:
    """``status`` with its active variant's p50 latency and energy from ``report``'s successful result for
    that file (the fastest thread count, uncontended first, as select ranks them); unchanged without."""
    if status.active is None or report is None:
        return status
    runs = [r for r in report.results if r.ok and r.sha256 == status.active.sha256 and r.latency_ms]
    if not runs:
        return status
    best = min(runs, key=lambda r: (bool(r.contended), r.latency_ms.p50 if r.latency_ms else 0.0))
    figures = {
        "latency_ms_p50": best.latency_ms.p50 if best.latency_ms else None,
        "energy_mj_per_inference": best.energy.mj_per_inference if best.energy else None,
    }
    return status.model_copy(update={"active": status.active.model_copy(update=figures)})


class Publisher:
    """Publishes on behalf of one device; every method may be called from any agent thread."""

    def __init__(
        self,
        config: AgentConfig,
        client: BrokerClient,
        book: StateBook,
        store: Store,
        board_info: BoardInfo,
        board: str,
        runtime: RuntimeInfo | None,
    ) -> None:
        self.config = config
        self.client = client
        self.book = book
        self.store = store
        self.board_info = board_info
        self.board = board
        self.runtime = runtime
        self.device = config.device.id
        self.topics = Topics(config.mqtt.namespace)
        self.started = time.monotonic()
        self._ha_lock = threading.Lock()
        self._ha_published: dict[str, bytes] = {}
        self._cpu = CpuPercent()
        self._status_wanted = threading.Event()
        self._reports_lock = threading.Lock()
        self._reports: dict[str, Report] = {}  # model → latest report (figures for the status)
        for model in book.models:
            payload = store.read_report(model)
            if payload:
                with contextlib.suppress(WireError):
                    self._reports[model] = decode(Report, payload)

    def note_report(self, report: Report) -> None:
        """A report was published: keep it (and on disk, for a restart) for the status's figures."""
        with self._reports_lock:
            self._reports[report.model] = report
        try:
            self.store.write_report(report.model, report.to_json())
        except OSError as err:  # a full disk must not lose the report already published
            log.warning("could not keep the report of %s: %s", report.model, err)

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

    def status(self, online: bool = True) -> Status:
        with self._reports_lock:
            reports = dict(self._reports)
        return build_status(
            self.config, self.book, self.board_info, self.board, self.runtime, online, reports=reports
        )

    def request_status(self) -> None:
        """Another thread changed a record: the main loop publishes the status at its next turn."""
        self._status_wanted.set()

    def publish_requested_status(self) -> None:
        """Main loop: publish the status if another thread asked for it."""
        if self._status_wanted.is_set():
            self._status_wanted.clear()
            self.publish_status()

    def publish_status(self) -> None:
        """Main loop only (see :meth:`request_status`): retained statuses must leave in snapshot order."""
        payload = self.status().to_json()
        topic = self.topics.status(self.device)
        self.client.set_birth(topic, payload)
        self.client.publish(topic, payload, qos=1, retain=True, timeout=5.0)
        self.publish_discovery()

    def publish_discovery(self, force: bool = False) -> None:
        """Retained Home Assistant discovery configs (opt-in); republished on connect and when they change."""
        if not self.config.telemetry.home_assistant:
            return
        from agent.homeassistant import DeviceInfo, discovery_messages  # opt-in: not loaded otherwise

        records = self.book.models
        models = {*records, *self.config.models.follow}
        active = {m: rec.active.variant for m, rec in records.items() if rec.active is not None}
        info = DeviceInfo(
            self.device, self.board, agent.__version__, device_class=self.config.device.device_class
        )
        messages = discovery_messages(
            info, models, active, self.config.mqtt.namespace, self.config.telemetry.interval_s
        )
        with self._ha_lock:  # the compare-and-publish must not interleave between threads
            for msg in messages:
                payload = msg.payload_bytes()
                if force or self._ha_published.get(msg.topic) != payload:
                    self.client.publish(msg.topic, payload, qos=1, retain=True, timeout=5.0)
                    self._ha_published[msg.topic] = payload

    def send_telemetry(self) -> None:
        tel = Telemetry(
            device=self.device,
            ts=now(),
            uptime_s=time.monotonic() - self.started,
            cpu_percent=self._cpu.percent(),
            rss_bytes=own_rss(),
            temperature_c=cpu_temperature(),
            throttled=throttled_now(),
            inferences=read_counters(self.store.root),
        )
        self.client.publish(self.topics.telemetry(self.device), tel.to_json(), qos=0, retain=False)


# Read from /proc and sysconf rather than psutil (whose import is 0.8 MB of the idle daemon's 25 MB);
# psutil remains the fallback where they are missing.


def total_ram() -> int | None:
    with contextlib.suppress(ValueError, OSError, AttributeError):
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    import psutil

    return int(psutil.virtual_memory().total)


def own_rss() -> int | None:
    with contextlib.suppress(OSError, ValueError, IndexError):
        pages = int(Path("/proc/self/statm").read_text().split()[1])
        return pages * os.sysconf("SC_PAGE_SIZE")
    import psutil

    try:
        return int(psutil.Process().memory_info().rss)
    except psutil.Error:
        return None


class CpuPercent:
    """System-wide busy percentage since the previous call (what ``psutil.cpu_percent(None)`` gives)."""

    def __init__(self) -> None:
        self._last: tuple[float, float] | None = self._read()

    @staticmethod
    def _read() -> tuple[float, float] | None:
        """(busy, total) jiffies from /proc/stat: user..steal; idle and iowait are not busy."""
        try:
            with open("/proc/stat", encoding="ascii") as fh:
                fields = [float(v) for v in fh.readline().split()[1:9]]
        except (OSError, ValueError):
            return None
        if len(fields) < 5:
            return None
        total = sum(fields)
        return total - fields[3] - fields[4], total

    def percent(self) -> float | None:
        cur = self._read()
        if cur is None:
            import psutil

            return float(psutil.cpu_percent(interval=None))
        last, self._last = self._last, cur
        if last is None or cur[1] <= last[1]:
            return 0.0
        return max(0.0, 100.0 * (cur[0] - last[0]) / (cur[1] - last[1]))


def throttled_now() -> bool | None:
    """Raspberry Pi firmware throttling flags, any set now; None where there is no firmware interface."""
    state = read_throttled()
    return None if state is None else state.any_now
