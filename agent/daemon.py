"""The agent's main loop: a dispatcher in front of the pipeline, activation and publishing.

::

    paho network thread ──inbox──►  main loop (this module)  ──jobs──►  pipeline worker
                                    ├ handle(): decode by topic, dispatch      (agent.pipeline:
                                    ├ commands: ping, rebenchmark, cancel,      verify, benchmark,
                                    │   rollback                                report, gc)
                                    ├ pipeline.tick(): fetch timeouts, jobs ◄──settled──┘
                                    ├ activation (agent.activation):  ──check──►  health check thread
                                    │   assignments, probation, commit,  ◄──done──  (agent.health: one
                                    │   rollback: state moves here                   child per check)
                                    └ publishing (agent.publishing): status, events, telemetry, HA

The main loop never runs a benchmark or a health check: it takes a message from the inbox with a timeout
(``stop`` is checked at least twice a second), so pings, signed commands, assignments and status are
answered while the worker measures or a health check runs. Benchmarks and health checks run in child
processes (:mod:`agent.bench`), so a bad model cannot take the daemon down. What crosses threads is listed
in :mod:`agent.pipeline` (the worker) and :mod:`agent.health` (the health check threads).

Refusals (bad signature, replay, wrong device, bad chunk, ...) are published as ``Event(kind=rejected)``
with a reason code and the loop goes on; only bad broker credentials stop it (ConnectionFatal, exit 2).
"""

from __future__ import annotations

import dataclasses
import gc
import logging
import os
import queue
import threading
import time
from collections import deque

from paho.mqtt.client import topic_matches_sub

import agent
from agent.activation import Activation
from agent.board import BoardInfo, HardwareError, detect_board, profile_key_for
from agent.children import adopt as adopt_children
from agent.config import AgentConfig
from agent.connectivity import Diagnosis
from agent.energy import EnergyConfig, EnergyMeter, resolve_profile_file
from agent.errors import ConfigError, ConnectionFatal, IllegalTransition, StoreError
from agent.mqtt import BrokerClient, Inbound, PahoBroker
from agent.notify import Notifier
from agent.pipeline import Pipeline, trim_heap
from agent.publishing import Publisher, build_status
from agent.runtime import detect_runtime
from agent.state import IN_PIPELINE, StateBook
from agent.store import Store
from agent.wire import (
    Command,
    CommandAction,
    EventKind,
    Manifest,
    ModelState,
    ReasonCode,
    Report,
    TopicKind,
    Topics,
    Variant,
    WireError,
    decode_inbound,
    now,
)

log = logging.getLogger(__name__)

_TICK_S = 0.5


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
        adopt_children(self.store.root)  # end benchmark children a killed predecessor left running
        self.book = StateBook(self.store)
        self.book.load()
        self.trusted = config.trusted_keys()
        self.stop = stop if stop is not None else threading.Event()
        self.board_info = board_info(config)
        self.board = config.device.board or self.board_info.model_string
        self.meter = energy_meter(config, self.board_info)  # once per daemon; logs the backend chosen
        self.runtime = detect_runtime()
        self.notifier = Notifier()
        offline = build_status(config, self.book, self.board_info, self.board, self.runtime, online=False)
        self.client: BrokerClient = client or PahoBroker(
            config, will=(self.topics.status(self.device), offline.to_json())
        )
        self.pub = Publisher(
            config, self.client, self.book, self.store, self.board_info, self.board, self.runtime
        )
        self.pipeline = Pipeline(
            config,
            self.store,
            self.book,
            self.pub,
            self.client,
            self.trusted,
            board_info=self.board_info,
            meter=self.meter,
            runtime=self.runtime,
            stop=self.stop,
        )
        self.activation = Activation(
            config,
            self.store,
            self.book,
            self.pub,
            self.pipeline,
            self.trusted,
            stop=self.stop,
            on_settled=self.after_settled,
        )
        self.seen_commands: deque[str] = deque(maxlen=256)
        self.max_payload = config.mqtt.max_payload_kb * 1024

    # ================================================================== lifecycle

    def subscriptions(self) -> list[str]:
        follow = self.config.models.follow
        subs = [self.topics.manifest(m) for m in follow] if follow else [self.topics.all_manifests()]
        return [*subs, self.topics.device_assignments(self.device), self.topics.cmd(self.device)]

    def run(self) -> None:
        """Connect, recover interrupted work, then loop until ``stop``. Raises ConnectionFatal."""
        status_topic = self.topics.status(self.device)
        try:
            self.recover()
            self.client.set_birth(status_topic, self.pub.status().to_json())
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
                self.pub.publish_status()
                self.notifier.ready(f"device {self.device}")
                self.loop()
            finally:
                log.info("stopping: publishing offline status and disconnecting")
                self.notifier.stopping()
                self.pipeline.shutdown()  # before the client stops: the worker may still publish
                self.activation.shutdown()  # kills a running health check's child; PROBATION stays
                self.client.stop(final=(status_topic, self.pub.status(online=False).to_json()))
        finally:
            self.pipeline.shutdown()
            self.activation.shutdown()

    def loop(self) -> None:
        """Until ``stop``: one inbound message (or a 0.5 s timeout), then the periodic work."""
        next_telemetry = time.monotonic() + min(5.0, self.config.telemetry.interval_s)
        self.pipeline.fetcher.pump()
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
                self.pub.send_telemetry()
                next_telemetry = time.monotonic() + self.config.telemetry.interval_s

    def tick(self) -> None:
        """Periodic work of the main loop: models the worker finished, fetch progress, probations."""
        while True:
            try:
                model = self.pipeline.settled.get_nowait()
            except queue.Empty:
                break
            if not self.pipeline.busy(model):
                self.after_settled(model)
        self.pub.publish_requested_status()
        self.pipeline.tick()
        self.activation.tick()

    def recover(self) -> None:
        """Resume what a restart interrupted; the store is consistent by construction (atomic renames)."""
        for model, rec in self.book.models.items():
            if rec.state in IN_PIPELINE:
                self.pipeline.resume(model)
            elif rec.state is ModelState.ACTIVATING:
                self.activation.rollback(
                    model, ReasonCode.INTERNAL, "agent restarted during activation; undone"
                )
            elif self.activation.interrupted_rollback(model):
                self.activation.rollback(
                    model,
                    ReasonCode.INTERNAL,
                    "agent restarted during a rollback; completed",
                    mark_rejected=True,
                )
            elif rec.state is ModelState.PROBATION and rec.active is not None:
                log.info("model %s: restarting probation of %s after a restart", model, rec.active.variant)
                self.activation.begin_probation(model)

    def after_settled(self, model: str) -> None:
        """``model`` left the pipeline or an activation: apply what waited for it (a manifest first)."""
        if model in self.pipeline.pending_manifest:
            self.pipeline.on_manifest(model, self.pipeline.pending_manifest.pop(model))
        elif model in self.activation.pending:
            self.activation.on_assignment(model, self.activation.pending.pop(model))

    # ================================================================== messages

    def handle(self, msg: Inbound) -> None:
        if msg.fatal is not None:
            raise ConnectionFatal(msg.fatal)
        if msg.connected:
            self.pub.publish_discovery(force=True)
            return
        try:
            parsed = self.topics.parse(msg.topic)
        except WireError as err:
            if any(topic_matches_sub(sub, msg.topic) for sub in self.subscriptions()):
                # one of our subscriptions matched a topic whose model/device part is not an identifier
                log.warning("refused message on %r: %s", msg.topic[:200], err)
                self.pub.event(
                    EventKind.REJECTED,
                    reason=err.reason,
                    detail=f"topic {msg.topic[:200]!r}: {err}",
                )
            else:
                log.debug("ignoring message on %s (not an edgefleet topic)", msg.topic)
            return
        try:
            if parsed.kind is TopicKind.BLOB and parsed.sha256 is not None and parsed.index is not None:
                self.pipeline.on_chunk(parsed.sha256, parsed.index, msg.payload)
            elif parsed.kind is TopicKind.MANIFEST and parsed.model is not None:
                self.pipeline.on_manifest(parsed.model, msg.payload)
            elif (
                parsed.kind is TopicKind.ASSIGN and parsed.device == self.device and parsed.model is not None
            ):
                self.activation.on_assignment(parsed.model, msg.payload)
            elif parsed.kind is TopicKind.CMD and parsed.device == self.device:
                self.on_command(msg.payload)
            else:
                log.debug("ignoring message on %s (not subscribed / not for this device)", msg.topic)
        except ConnectionFatal:
            raise
        except (StoreError, IllegalTransition, OSError) as err:
            log.exception("error handling %s", msg.topic)
            self.pub.event(EventKind.ERROR, reason=ReasonCode.INTERNAL, detail=f"{msg.topic}: {err}")
        except Exception as err:  # one bad message must not take the daemon (and its restarts) down
            log.exception("unexpected error handling %s", msg.topic)
            self.pub.event(
                EventKind.ERROR,
                reason=ReasonCode.INTERNAL,
                detail=f"{msg.topic}: {type(err).__name__}: {err}",
            )

    # ================================================================== commands

    def on_command(self, payload: bytes) -> None:
        try:
            topic = self.topics.cmd(self.device)  # wire's one decoder: signature, schema, device = topic's
            decoded = decode_inbound(
                self.topics, topic, payload, trusted=self.trusted, max_bytes=self.max_payload
            )
            cmd = decoded.as_(Command)
        except WireError as err:
            log.warning("refused command: %s", err)
            self.pub.event(EventKind.REJECTED, reason=err.reason, detail=str(err))
            return
        cid = cmd.id
        if cid in self.seen_commands:
            log.info("command %s already handled (QoS1 redelivery); ignoring it", cid)
            return
        self.seen_commands.append(cid)
        if cmd.device != self.device:
            self.pub.event(
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
            self.pub.event(
                EventKind.REJECTED, cmd.model, reason=ReasonCode.REPLAY, detail=detail, correlation_id=cid
            )
            return
        log.info("command %s (%s)", cmd.action.value, cid)
        if cmd.action is CommandAction.PING:
            self.pub.event(EventKind.PONG, correlation_id=cid, detail=f"agent {agent.__version__}")
            return
        assert cmd.model is not None  # the schema requires it for model actions
        model = cmd.model
        if cmd.action is CommandAction.REBENCHMARK:
            refused = self.pipeline.rebenchmark(model, cid)
            if refused is not None:
                self.pub.event(
                    EventKind.REJECTED,
                    model,
                    reason=ReasonCode.NOT_FETCHED,
                    detail=refused,
                    correlation_id=cid,
                )
            else:
                self.pub.event(EventKind.ACK, model, correlation_id=cid, detail="rebenchmark started")
            return
        if cmd.action is CommandAction.CANCEL:
            refused = self.pipeline.cancel_measurement(model)
            if refused is not None:
                self.pub.event(
                    EventKind.REJECTED,
                    model,
                    reason=ReasonCode.NOT_RUNNING,
                    detail=refused,
                    correlation_id=cid,
                )
                return
            self.pub.event(EventKind.ACK, model, correlation_id=cid, detail="benchmark cancelled; no report")
            self.after_settled(model)
            return
        # rollback
        rec = self.book.get(model)
        if self.store.link_sha(self.store.previous_link(model)) is None or rec.state not in (
            ModelState.COMMITTED,
            ModelState.REPORTED,
            ModelState.PROBATION,
        ):
            detail = f"nothing to roll back to for {model} (state {rec.state.value})"
            self.pub.event(
                EventKind.REJECTED, model, reason=ReasonCode.NO_PREVIOUS, detail=detail, correlation_id=cid
            )
            return
        self.activation.rollback(
            model, ReasonCode.COMMAND, "rollback command", mark_rejected=True, correlation_id=cid
        )

    # ================================================================== for benches and tests

    def benchmark_and_report(self, model: str, manifest: Manifest, variants: list[Variant]) -> Report:
        """Benchmark ``variants`` on the calling thread and publish the Report (retained)."""
        report = self.pipeline.measure(model, manifest, variants, self.stop)
        if report is None:
            return Report(
                device=self.device, model=model, manifest_version=manifest.version, ts=now(), results=[]
            )
        self.pipeline.publish_report(report)
        return report


def release_startup_memory() -> None:
    """After start-up: collect, freeze what survived (the periodic GC then skips it) and hand freed heap
    back to the OS (glibc ``malloc_trim``; a no-op elsewhere). Start-up garbage — TOML, schema building,
    import-time temporaries — otherwise stays in the idle daemon's RSS."""
    gc.collect()
    gc.freeze()
    trim_heap()


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
