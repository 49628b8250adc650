"""One simulated device: the agent's side of the wire contract, without a runtime, a store or a fetch.

:class:`SimDevice` answers what the host side needs exactly as ``agent/daemon.py`` does, with the wire
models and the agent's own signature check (``agent.wire.verify_signed``, Ed25519):

* birth ``Status`` (online, retained) on every connect; the Last Will is the offline one;
* a manifest: verified (refused with a ``rejected`` event on a bad signature, a replay, a model that
  does not match its topic), then the states a real agent goes through, each a retained status —
  fetching, verifying, benchmarking, reported — with the ``downloaded`` / ``verified`` /
  ``benchmarked`` events, and a retained ``Report`` with one result per variant. The fetch and the
  benchmark are delays: no chunk is fetched and nothing runs; the figures are drawn from a seeded
  distribution per device class (:func:`figures`), so a run is reproducible;
* an assignment: verified and checked as the agent checks it (device, model, manifest version,
  variant, sha256; it waits while a pipeline or an activation runs, as the agent's pending slot), then
  activating → probation (``activated`` event) → after ``probation_s`` committed, or rolled back to the
  previous variant with ``HEALTH_CHECK_FAILED`` for the devices :func:`fails_health` picks;
* commands: ``ping`` → ``pong`` with the correlation id, ``rollback`` → back to the previous variant
  (or ``rejected`` NO_PREVIOUS), ``rebenchmark`` → ``ack``, report again, ``ack``; stale, foreign or
  repeated commands are refused or ignored as the agent does.

The device never touches a socket: it calls ``send(topic, payload, retain)`` and ``later(delay, fn)``,
so one process can multiplex thousands of them (benches/_sim_fleet.py).
"""

from __future__ import annotations

import hashlib
import random
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from agent import wire
from agent.wire import EventKind, ModelState, ReasonCode

Send = Callable[[str, bytes, bool], None]
Later = Callable[[float, Callable[[], None]], None]

AGENT_VERSION = "sim-1"
RUNTIME = wire.RuntimeInfo(name="ai-edge-litert", version="2.3.0")
COMMAND_MAX_AGE_S = 300.0  # the agent's default commands.max_age_s


@dataclass(frozen=True, slots=True)
class DeviceClass:
    """Published board figures (FACTS.md) and a typical 1-thread latency of the baseline variant."""

    board: str
    cpu_count: int
    ram_bytes: int
    base_p50_ms: float
    idle_w: float
    max_w: float


CLASSES: Mapping[str, DeviceClass] = {
    "pi3": DeviceClass("Raspberry Pi 3 Model B Plus (simulated)", 4, 1 << 30, 9.0, 1.9, 5.1),
    "pi4": DeviceClass("Raspberry Pi 4 Model B (simulated)", 4, 4 << 30, 4.6, 2.7, 6.4),
    "pi5": DeviceClass("Raspberry Pi 5 Model B (simulated)", 4, 8 << 30, 2.1, 2.8, 9.7),
}
CLASS_NAMES = tuple(CLASSES)
# Relative cost of each variant id against the baseline (unknown ids cost as much as the baseline).
SPEED = {"float32": 1.0, "slim": 0.72, "tiny": 0.46}


# A quiet window: the figures are drawn, not disturbed (set only where the contract has the field).
_QUIET: dict[str, bool] = {"contended": False} if "contended" in wire.BenchResult.model_fields else {}


def unit(seed: int, *parts: str) -> float:
    """A reproducible number in [0, 1) from a seed and some names (same on every process)."""
    digest = hashlib.sha256(":".join([str(seed), *parts]).encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def fails_health(seed: int, fraction: float, device: str, sha256: str) -> bool:
    """Whether ``device`` fails its health check on the variant ``sha256`` (seeded, per device and file)."""
    return unit(seed, "health", device, sha256) < fraction


def device_class(seed: int, device: str) -> str:
    return CLASS_NAMES[int(unit(seed, "class", device) * len(CLASS_NAMES))]


def figures(
    seed: int, device: str, cls: DeviceClass, manifest: wire.Manifest, ts: float
) -> list[wire.BenchResult]:
    """One plausible BenchResult per variant: this device's factor × the class × the variant's cost."""
    rng = random.Random(f"{seed}:{device}:{manifest.version}")
    board = rng.lognormvariate(0.0, 0.12)  # boards of one class differ by about ±12 %
    out = []
    for v in manifest.variants:
        p50 = cls.base_p50_ms * board * SPEED.get(v.id, 1.0) * rng.lognormvariate(0.0, 0.03)
        runs = max(100, int(2000 / p50))
        util = min(1.0, rng.uniform(0.93, 0.99))
        power = cls.idle_w + (cls.max_w - cls.idle_w) * util / cls.cpu_count
        out.append(
            wire.BenchResult(
                variant=v.id,
                sha256=v.sha256,
                ok=True,
                runtime=RUNTIME,
                threads=1,
                warmup_runs=10,
                duration_s=round(runs * p50 / 1000, 3),
                latency_ms=wire.LatencyStats(
                    count=runs,
                    mean=round(p50 * 1.04, 4),
                    std=round(p50 * rng.uniform(0.03, 0.08), 4),
                    min=round(p50 * 0.92, 4),
                    p50=round(p50, 4),
                    p90=round(p50 * 1.10, 4),
                    p95=round(p50 * 1.16, 4),
                    p99=round(p50 * 1.31, 4),
                    max=round(p50 * 1.7, 4),
                ),
                init_ms=round(rng.uniform(3, 9) * cls.base_p50_ms / 4.6, 3),
                first_inference_ms=round(p50 * rng.uniform(1.5, 3.0), 4),
                peak_rss_bytes=int((38 + 2 * SPEED.get(v.id, 1.0)) * 2**20),
                cpu_util=round(util, 3),
                temperature_c_before=round(rng.uniform(42, 55), 1),
                temperature_c_after=round(rng.uniform(48, 62), 1),
                throttled=False,
                energy=wire.Energy(
                    method=wire.EnergyMethod.MODEL,
                    measured=False,
                    mj_per_inference=round(power * p50, 4),  # W × ms = mJ
                    avg_power_w=round(power, 3),
                    idle_power_w=cls.idle_w,
                ),
                ts=ts,
                **_QUIET,
            )
        )
    return out


@dataclass(frozen=True, slots=True)
class SimSettings:
    namespace: str
    seed: int
    fail_fraction: float
    fetch_s: float  # simulated fetch + verify time of one manifest
    bench_s: float  # simulated benchmark time of one manifest
    probation_s: float


@dataclass
class Counters:
    manifests: int = 0
    reports: int = 0
    assignments: int = 0
    committed: int = 0
    rolled_back: int = 0
    rejected: int = 0
    pongs: int = 0
    commands: int = 0

    def as_dict(self) -> dict[str, int]:
        return {k: int(v) for k, v in vars(self).items()}


@dataclass
class _Model:
    """The agent's per-model record (agent/state.py), reduced to what decides the answers."""

    state: ModelState = ModelState.IDLE
    manifest_version: int | None = None
    manifest: wire.Manifest | None = None
    report: bytes | None = None
    active: wire.ActiveVariant | None = None
    previous: wire.ActiveVariant | None = None
    rejected: tuple[str, str, int] | None = None
    detail: str | None = None
    pending_assignment: bytes | None = None
    pending_manifest: bytes | None = None
    generation: int = 0  # bumps when a timer's work is superseded (a newer manifest, a rollback)


IN_PIPELINE = frozenset({ModelState.FETCHING, ModelState.VERIFYING, ModelState.BENCHMARKING})
IN_ACTIVATION = frozenset({ModelState.ACTIVATING, ModelState.PROBATION})


@dataclass
class SimDevice:
    device: str
    settings: SimSettings
    trusted: Mapping[str, Ed25519PublicKey]
    send: Send
    later: Later
    counters: Counters
    models: dict[str, _Model] = field(default_factory=dict)
    seen_commands: deque[str] = field(default_factory=lambda: deque(maxlen=256))

    def __post_init__(self) -> None:
        self.topics = wire.Topics(self.settings.namespace)
        self.class_name = device_class(self.settings.seed, self.device)
        self.cls = CLASSES[self.class_name]

    # ------------------------------------------------------------------ what it subscribes to

    def subscriptions(self) -> list[str]:
        return [
            self.topics.all_manifests(),
            self.topics.device_assignments(self.device),
            self.topics.cmd(self.device),
        ]

    def handle(self, topic: str, payload: bytes) -> None:
        """Dispatch one inbound message by its topic (a topic outside the contract is ignored)."""
        try:
            parsed = self.topics.parse(topic)
        except wire.WireError:
            return
        if parsed.kind is wire.TopicKind.MANIFEST and parsed.model:
            self.on_manifest(parsed.model, payload)
        elif parsed.kind is wire.TopicKind.ASSIGN and parsed.model and parsed.device == self.device:
            self.on_assignment(parsed.model, payload)
        elif parsed.kind is wire.TopicKind.CMD and parsed.device == self.device:
            self.on_command(payload)

    # ------------------------------------------------------------------ status and events

    def status(self, online: bool = True) -> wire.Status:
        return wire.Status(
            device=self.device,
            online=online,
            ts=wire.now(),
            agent_version=AGENT_VERSION,
            runtime=RUNTIME,
            board=self.cls.board,
            arch="aarch64",
            cpu_count=self.cls.cpu_count,
            ram_bytes=self.cls.ram_bytes,
            device_class=self.class_name,
            models={
                m: wire.ModelStatus(
                    state=rec.state,
                    manifest_version=rec.manifest_version,
                    active=rec.active,
                    detail=rec.detail,
                )
                for m, rec in self.models.items()
            },
        )

    def publish_status(self) -> None:
        self.send(self.topics.status(self.device), self.status().to_json(), True)

    def event(
        self,
        kind: EventKind,
        model: str | None = None,
        variant: str | None = None,
        sha: str | None = None,
        reason: ReasonCode | None = None,
        detail: str | None = None,
        correlation_id: str | None = None,
    ) -> None:
        ev = wire.Event(
            device=self.device,
            ts=wire.now(),
            kind=kind,
            model=model,
            variant=variant,
            sha256=sha,
            reason=reason,
            detail=detail[:2000] if detail else None,
            correlation_id=correlation_id,
        )
        if kind is EventKind.REJECTED:
            self.counters.rejected += 1
        self.send(self.topics.events(self.device), ev.to_json(), False)

    def _move(self, rec: _Model, state: ModelState, detail: str | None) -> None:
        rec.state, rec.detail = state, detail
        self.publish_status()

    # ------------------------------------------------------------------ manifest → report

    def on_manifest(self, model: str, payload: bytes) -> None:
        if not payload:
            return  # cleared on the broker: keep what is installed
        try:
            manifest = wire.verify_signed(wire.Manifest, payload, self.trusted)
        except wire.WireError as err:
            self.event(EventKind.REJECTED, model, reason=_reason(err.reason), detail=str(err))
            return
        if manifest.model != model:
            detail = f"manifest for model {manifest.model!r} arrived on the topic of {model!r}"
            self.event(EventKind.REJECTED, model, reason=ReasonCode.MALFORMED, detail=detail)
            return
        rec = self.models.setdefault(model, _Model())
        held = rec.manifest_version
        if held is not None and manifest.version < held:
            detail = f"manifest v{manifest.version} is older than v{held} held (replay)"
            self.event(EventKind.REJECTED, model, reason=ReasonCode.REPLAY, detail=detail)
            return
        if held == manifest.version and rec.state is not ModelState.IDLE:
            return  # already handled (a retained copy after a reconnect)
        if rec.state in IN_ACTIVATION:
            rec.pending_manifest = payload  # the agent waits until the activation settles
            return
        self.counters.manifests += 1
        rec.generation += 1
        rec.manifest, rec.manifest_version, rec.report = manifest, manifest.version, None
        self._move(rec, ModelState.FETCHING, f"manifest v{manifest.version}")
        gen = rec.generation
        self.later(
            self.settings.fetch_s * _jitter(self, "fetch", manifest.version),
            lambda: self._fetched(model, gen),
        )

    def _fetched(self, model: str, gen: int) -> None:
        rec = self.models[model]
        if rec.generation != gen or rec.manifest is None:
            return
        m = rec.manifest
        for v in m.variants:
            self.event(EventKind.DOWNLOADED, model, v.id, v.sha256, detail=f"{v.size} bytes")
        self._move(rec, ModelState.VERIFYING, f"manifest v{m.version}")
        for v in m.variants:
            self.event(EventKind.VERIFIED, model, v.id, v.sha256, detail="variant blob")
        self._move(rec, ModelState.BENCHMARKING, f"{len(m.variants)} variant(s)")
        self.later(
            self.settings.bench_s * _jitter(self, "bench", m.version), lambda: self._benchmarked(model, gen)
        )

    def _benchmarked(self, model: str, gen: int) -> None:
        rec = self.models[model]
        if rec.generation != gen or rec.manifest is None:
            return
        m = rec.manifest
        ts = wire.now()
        results = figures(self.settings.seed, self.device, self.cls, m, ts)
        for r in results:
            self.event(
                EventKind.BENCHMARKED,
                model,
                r.variant,
                r.sha256,
                detail=f"p50 {r.latency_ms.p50:.2f} ms" if r.latency_ms else None,
            )
        report = wire.Report(
            device=self.device, model=model, manifest_version=m.version, ts=ts, results=results
        )
        rec.report = report.to_json()
        self.send(self.topics.report(self.device, model), rec.report, True)
        self.counters.reports += 1
        self._move(rec, ModelState.REPORTED, f"{len(results)} result(s)")
        self._after_settled(model)

    # ------------------------------------------------------------------ assignment → committed / rolled back

    def on_assignment(self, model: str, payload: bytes) -> None:
        if not payload:
            return None  # a cleared assignment changes nothing on a running device
        try:
            a = wire.verify_signed(wire.Assignment, payload, self.trusted)
        except wire.WireError as err:
            self.event(EventKind.REJECTED, model, reason=_reason(err.reason), detail=str(err))
            return None
        self.counters.assignments += 1

        def reject(reason: ReasonCode, detail: str) -> None:
            self.event(EventKind.REJECTED, model, a.variant, a.sha256, reason, detail=detail)

        if a.device != self.device:
            return reject(
                ReasonCode.WRONG_DEVICE, f"assignment is for device {a.device!r}, this is {self.device!r}"
            )
        if a.model != model:
            return reject(ReasonCode.MALFORMED, f"assignment for model {a.model!r} on the topic of {model!r}")
        rec = self.models.setdefault(model, _Model())
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
            rec.pending_assignment = payload
            return None
        manifest = rec.manifest
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
        if rec.active is not None and rec.active.sha256 == a.sha256 and rec.state is ModelState.COMMITTED:
            return None
        if rec.rejected == (a.variant, a.sha256, a.manifest_version):
            return None  # rolled back before: not re-applied
        self._activate(model, rec, a)
        return None

    def _activate(self, model: str, rec: _Model, a: wire.Assignment) -> None:
        target = wire.ActiveVariant(
            variant=a.variant, sha256=a.sha256, manifest_version=a.manifest_version, activated_at=wire.now()
        )
        if rec.active is not None and rec.active.sha256 != a.sha256:
            rec.previous = rec.active
        rec.generation += 1
        self._move(rec, ModelState.ACTIVATING, f"{a.variant} (policy {a.policy})")
        rec.active = target
        rec.state, rec.detail = ModelState.PROBATION, f"{a.variant} (policy {a.policy})"
        self.event(EventKind.ACTIVATED, model, a.variant, a.sha256, detail=f"policy {a.policy}")
        self.publish_status()
        gen = rec.generation
        self.later(
            self.settings.probation_s * _jitter(self, "probation", a.sha256),
            lambda: self._probation_over(model, gen),
        )

    def _probation_over(self, model: str, gen: int) -> None:
        rec = self.models[model]
        if rec.generation != gen or rec.state is not ModelState.PROBATION or rec.active is None:
            return
        s = self.settings
        if fails_health(s.seed, s.fail_fraction, self.device, rec.active.sha256):
            self._rollback(
                model,
                rec,
                ReasonCode.HEALTH_CHECK_FAILED,
                "health check failed: outputs not finite (simulated)",
            )
            return
        self._move(rec, ModelState.COMMITTED, rec.active.variant)
        self.event(EventKind.COMMITTED, model, rec.active.variant, rec.active.sha256)
        self.counters.committed += 1
        self._after_settled(model)

    def _rollback(
        self, model: str, rec: _Model, reason: ReasonCode, detail: str, correlation_id: str | None = None
    ) -> None:
        failed = rec.active
        rec.generation += 1
        rec.active, rec.previous = rec.previous, None
        if failed is not None:
            rec.rejected = (failed.variant, failed.sha256, failed.manifest_version)
        self._move(rec, ModelState.ROLLED_BACK, detail)
        self.event(
            EventKind.ROLLED_BACK,
            model,
            failed.variant if failed else None,
            failed.sha256 if failed else None,
            reason,
            detail=detail,
            correlation_id=correlation_id,
        )
        self.counters.rolled_back += 1
        self._after_settled(model)

    def _after_settled(self, model: str) -> None:
        rec = self.models[model]
        if rec.pending_manifest is not None:
            payload, rec.pending_manifest = rec.pending_manifest, None
            self.on_manifest(model, payload)
        elif rec.pending_assignment is not None:
            payload, rec.pending_assignment = rec.pending_assignment, None
            self.on_assignment(model, payload)

    # ------------------------------------------------------------------ commands

    def on_command(self, payload: bytes) -> None:
        try:
            cmd = wire.verify_signed(wire.Command, payload, self.trusted)
        except wire.WireError as err:
            self.event(EventKind.REJECTED, reason=_reason(err.reason), detail=str(err))
            return
        if cmd.id in self.seen_commands:
            return  # a QoS1 redelivery
        self.seen_commands.append(cmd.id)
        self.counters.commands += 1
        cid = cmd.id
        if cmd.device != self.device:
            self.event(
                EventKind.REJECTED,
                cmd.model,
                reason=ReasonCode.WRONG_DEVICE,
                detail=cmd.device,
                correlation_id=cid,
            )
            return
        age = wire.now() - cmd.issued_at
        if age > COMMAND_MAX_AGE_S:
            limit = COMMAND_MAX_AGE_S
            detail = f"stale command: issued {age:.0f} s ago, older than commands.max_age_s = {limit:g}"
            self.event(
                EventKind.REJECTED, cmd.model, reason=ReasonCode.REPLAY, detail=detail, correlation_id=cid
            )
            return
        if cmd.action is wire.CommandAction.PING:
            self.event(EventKind.PONG, correlation_id=cid, detail=f"agent {AGENT_VERSION}")
            self.counters.pongs += 1
            return
        assert cmd.model is not None  # the schema requires it for model actions
        model = cmd.model
        rec = self.models.setdefault(model, _Model())
        if cmd.action is wire.CommandAction.REBENCHMARK:
            if rec.manifest is None or rec.state in IN_PIPELINE or rec.state in IN_ACTIVATION:
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
            results = figures(self.settings.seed, self.device, self.cls, rec.manifest, wire.now())
            report = wire.Report(
                device=self.device,
                model=model,
                manifest_version=rec.manifest.version,
                ts=wire.now(),
                results=results,
            )
            rec.report = report.to_json()
            self.send(self.topics.report(self.device, model), rec.report, True)
            self.counters.reports += 1
            self.event(
                EventKind.ACK, model, correlation_id=cid, detail="rebenchmark done; report republished"
            )
            return
        if cmd.action.value == "cancel":  # newer agents: end a running benchmark, no report
            if rec.state is not ModelState.BENCHMARKING:
                detail = f"model {model} is not benchmarking (state {rec.state.value})"
                self.event(
                    EventKind.REJECTED,
                    model,
                    reason=_reason("NOT_RUNNING"),
                    detail=detail,
                    correlation_id=cid,
                )
                return
            rec.generation += 1
            self._move(rec, ModelState.IDLE, "benchmark cancelled by command")
            self.event(EventKind.ACK, model, correlation_id=cid, detail="benchmark cancelled; no report")
            self._after_settled(model)
            return
        if rec.previous is None or rec.state not in (
            ModelState.COMMITTED,
            ModelState.REPORTED,
            ModelState.PROBATION,
        ):
            detail = f"nothing to roll back to for {model} (state {rec.state.value})"
            self.event(
                EventKind.REJECTED, model, reason=ReasonCode.NO_PREVIOUS, detail=detail, correlation_id=cid
            )
            return
        self._rollback(model, rec, ReasonCode.COMMAND, "rollback command", correlation_id=cid)


def _reason(code: str | None) -> ReasonCode:
    """A refusal's reason code (the agent's mapping: anything unknown is MALFORMED)."""
    try:
        return ReasonCode(code or "MALFORMED")
    except ValueError:
        return ReasonCode.MALFORMED


def _jitter(dev: SimDevice, what: str, key: object) -> float:
    """0.5-1.5× a nominal delay, fixed per device: devices do not all answer in the same millisecond."""
    return 0.5 + unit(dev.settings.seed, what, dev.device, str(key))
