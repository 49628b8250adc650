"""``edgefleet demo``: the whole loop on one machine, started and stopped by one command.

Stages: broker (a private mosquitto on a free loopback port; without mosquitto, amqtt in a child
process, see deploy.broker.embedded) → signing key → compress (the seed CNN on scikit-learn's digits,
in a child process so TensorFlow never loads here) → publish → two agents as separate processes
(separate stores, 1 and 2 benchmark threads, device classes ``accurate`` and ``fast``) → wait for
their reports → select → assign → wait until both report the assigned variant active → result.
A collector (deploy.observe.collect, in a thread) stores everything the fleet says in ``<workdir>/fleet.db``
from the start, and select decides from that store, as ``edgefleet select --db`` does: the demo shows
the operator's loop, not a shortcut around it. Everything it started is stopped on the way out, also on
Ctrl-C.

The integration test runs this same code with a smaller budget, so the demo and the test cannot drift.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import tomllib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from agent import wire
from deploy.broker.client import BrokerOptions, MqttSession
from deploy.broker.embedded import BROKER_CHOICES, AmqttBroker, BrokerChoice, start_broker
from deploy.control.assign import assign
from deploy.control.publish import publish_bundle
from deploy.control.select import Decision, Policy, select
from deploy.errors import DeployError
from deploy.keys import init_keys, load_signing_key

Progress = Callable[[str], None]

DEMO_MODEL = "digits"  # the model id of the demo's seed CNN, named after its data set


@dataclass(frozen=True, slots=True)
class DemoDevice:
    """One simulated board: its id, policy class and benchmark threads."""

    id: str
    device_class: str
    threads: int


DEMO_DEVICES = (DemoDevice("demo-pi4", "accurate", 1), DemoDevice("demo-pi5", "fast", 2))

# The demo's policy: one class wants the most accurate variant, the other the fastest one that keeps
# accuracy within two points of the float32 baseline. Both simulated boards benchmark on this one machine
# at the same time, so their measurements disturb each other (contended, by construction): the demo
# ranks on them anyway, which a fleet policy does not by default.
DEMO_POLICY = """\
[default]
objective = "accuracy"
max_accuracy_drop = 0.05
reject_contended = false

[classes.accurate]
objective = "accuracy"
max_accuracy_drop = 0.05

[classes.fast]
objective = "latency"
max_accuracy_drop = 0.02
"""


@dataclass
class DemoSettings:
    workdir: Path | None = None
    epochs: int = 8
    recipe: str = "demo"  # float32, float16, dynint8, int8, prune50-int8: the interesting ones, fast
    variants: tuple[str, ...] = ()  # empty: every variant of the recipe
    bench_min_runs: int = 50
    bench_min_seconds: float = 1.0
    probation_s: float = 1.0
    timeout_s: float = 240.0
    devices: tuple[DemoDevice, ...] = DEMO_DEVICES
    extra_env: dict[str, str] = field(default_factory=dict)
    broker: BrokerChoice = "auto"  # mosquitto if installed, else the embedded amqtt fallback
    # The same loop for any model: `edgefleet compress` arguments replacing "--demo --recipe ... --epochs"
    # (e.g. ["--model", "m.tflite", "--calibration", "images/"]), and a policy TOML replacing DEMO_POLICY.
    compress_args: tuple[str, ...] = ()
    policy: str | None = None


@dataclass(slots=True)
class DemoResult:
    workdir: Path
    bundle: Path
    model: str
    manifest_version: int
    broker: str
    devices: list[dict[str, Any]]
    seconds: float

    def as_json(self) -> dict[str, Any]:
        return {
            "ok": True,
            "model": self.model,
            "manifest_version": self.manifest_version,
            "broker": self.broker,
            "workdir": str(self.workdir),
            "bundle": str(self.bundle),
            "seconds": round(self.seconds, 1),
            "devices": self.devices,
        }


class DemoError(DeployError):
    """A demo stage failed; the message says which and where its log is."""


def run_demo(settings: DemoSettings, progress: Progress) -> DemoResult:
    start = time.monotonic()
    deadline = start + settings.timeout_s
    workdir = settings.workdir or Path(tempfile.mkdtemp(prefix="edgefleet-demo-"))
    workdir.mkdir(parents=True, exist_ok=True)
    bundle_dir = workdir / "bundle"

    with contextlib.ExitStack() as stack:
        progress(f"[1/7] broker: starting a private broker ({settings.broker}; files in {workdir})")
        broker = start_broker(settings.broker, state_dir=workdir / "broker")
        stack.callback(broker.stop)
        amqtt = isinstance(broker, AmqttBroker)
        name = "amqtt" if amqtt else "mosquitto"
        options = BrokerOptions(host=broker.host, port=broker.port, protocol="v311" if amqtt else "v5")
        window = AmqttBroker.publish_window if amqtt else 32
        progress(f"      {name} pid {broker.pid} on {broker.host}:{broker.port} (MQTT {options.protocol})")
        if amqtt:
            why = "mosquitto not found; " if settings.broker == "auto" else ""
            limits = "; ".join(AmqttBroker.limitations)
            progress(f"      {why}embedded amqtt fallback, for a one-machine demo only: {limits}")

        db = workdir / "fleet.db"
        stack.enter_context(_collector(options, db, settings.timeout_s + 60))
        progress(f"      collector storing the fleet's messages in {db}")

        progress("[2/7] keys: creating the fleet signing key")
        pair = init_keys(workdir / "keys", force=True)
        key = load_signing_key(pair.private_path)

        what = (
            " ".join(settings.compress_args)
            if settings.compress_args
            else f"training the seed CNN on digits ({settings.epochs} epochs)"
        )
        progress(f"[3/7] compress: {what} and converting")
        _compress(bundle_dir, settings, workdir / "compress.log", deadline, progress)

        progress("[4/7] publish: signing and publishing the bundle")
        with MqttSession(options, window=window) as session:
            published = publish_bundle(bundle_dir, key, session, progress=lambda m: progress(f"      {m}"))
        manifest = published.manifest

        progress(f"[5/7] agents: starting {len(settings.devices)} agents and waiting for their reports")
        agents = stack.enter_context(
            _agents(settings, workdir, options, pair.public_text, manifest.model, progress)
        )
        with MqttSession(options, window=window) as watch:
            reports, statuses = _wait_for_reports(db, manifest, settings.devices, agents, deadline, progress)

            progress(f"[6/7] select + assign: the demo policy decides per device on what {db.name} holds")
            decisions = _select_and_assign(
                manifest, reports, statuses, key, watch, workdir, progress, settings.policy or DEMO_POLICY
            )

            progress("[7/7] activate: waiting until every device runs its assigned variant")
            final = _wait_for_active(watch, manifest, decisions, agents, deadline, progress)

        devices = [
            _device_row(d, manifest, reports[d.id], final[d.id], decisions[d.id]) for d in settings.devices
        ]
    return DemoResult(
        workdir=workdir,
        bundle=bundle_dir,
        model=manifest.model,
        manifest_version=manifest.version,
        broker=f"{name} {broker.host}:{broker.port} (stopped)",
        devices=devices,
        seconds=time.monotonic() - start,
    )


# ------------------------------------------------------------------------------------------- stages


def _compress(
    bundle_dir: Path, settings: DemoSettings, log: Path, deadline: float, progress: Progress
) -> None:
    cmd = [sys.executable, "-m", "deploy", "compress", "--out", str(bundle_dir)]
    if settings.compress_args:
        cmd += list(settings.compress_args)
    else:
        cmd += [
            "--demo",
            "--model-id",
            DEMO_MODEL,
            "--recipe",
            settings.recipe,
            "--epochs",
            str(settings.epochs),
        ]
    if settings.variants:
        cmd += ["--variants", ",".join(settings.variants)]
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2", **settings.extra_env}
    with log.open("wb") as out, subprocess.Popen(cmd, stdout=out, stderr=subprocess.PIPE, env=env) as proc:
        assert proc.stderr is not None
        # The stage's share of the deadline: a hung compressor is killed, which ends the read loop.
        killer = threading.Timer(max(1.0, deadline - time.monotonic()), proc.kill)
        killer.start()
        try:
            for raw in proc.stderr:  # the compressor's progress lines
                out.write(raw)
                line = raw.decode(errors="replace").rstrip()
                if line:
                    progress(f"      {line}")
            proc.wait(timeout=10)
        finally:
            killer.cancel()
            if proc.poll() is None:
                proc.kill()
    if proc.returncode != 0:
        raise DemoError(f"compress failed with exit code {proc.returncode}; see {log}")


@dataclass(slots=True)
class _Agent:
    device: DemoDevice
    process: subprocess.Popen[bytes]
    log: Path

    def check_alive(self) -> None:
        code = self.process.poll()
        if code is not None:
            tail = self.log.read_text(errors="replace")[-1500:] if self.log.exists() else ""
            raise DemoError(f"agent {self.device.id} exited with code {code}; log {self.log}:\n{tail}")


def agent_config(
    device: DemoDevice,
    store: Path,
    options: BrokerOptions,
    public_key: str,
    min_runs: int,
    min_seconds: float,
    probation_s: float,
) -> str:
    """An agent.toml for one demo device (JSON strings are valid TOML basic strings)."""
    q = json.dumps
    return f"""\
log_level = "info"

[device]
id = {q(device.id)}
class = {q(device.device_class)}

[mqtt]
host = {q(options.host)}
port = {options.port}
protocol = {q(options.protocol)}
namespace = {q(options.namespace)}
reconnect_min_s = 0.2
reconnect_max_s = 2.0

[trust]
public_keys = [{q(public_key)}]

[store]
path = {q(str(store))}

[bench]
threads = [{device.threads}]
warmup_runs = 5
min_runs = {min_runs}
min_seconds = {min_seconds}
timeout_s = 60

[health]
probation_s = {probation_s}

[telemetry]
interval_s = 5
"""


@contextlib.contextmanager
def _agents(
    settings: DemoSettings,
    workdir: Path,
    options: BrokerOptions,
    public_key: str,
    model: str,
    progress: Progress,
) -> Iterator[list[_Agent]]:
    agents: list[_Agent] = []
    try:
        for device in settings.devices:
            home = workdir / "devices" / device.id
            home.mkdir(parents=True, exist_ok=True)
            config = home / "agent.toml"
            config.write_text(
                agent_config(
                    device,
                    home / "store",
                    options,
                    public_key,
                    settings.bench_min_runs,
                    settings.bench_min_seconds,
                    settings.probation_s,
                ),
                encoding="utf-8",
            )
            log = home / "agent.log"
            with log.open("wb") as out:
                proc = subprocess.Popen(
                    [sys.executable, "-m", "agent", "--config", str(config)],
                    stdin=subprocess.DEVNULL,
                    stdout=out,
                    stderr=subprocess.STDOUT,
                    env={**os.environ, **settings.extra_env},
                )
            agents.append(_Agent(device, proc, log))
            progress(
                f"      {device.id}: class {device.device_class}, {device.threads} thread(s), pid {proc.pid}"
            )
        yield agents
    finally:
        _stop_all(agents)


def _stop_all(agents: list[_Agent], timeout_s: float = 10.0) -> None:
    for a in agents:
        if a.process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                a.process.send_signal(signal.SIGTERM)
    end = time.monotonic() + timeout_s
    for a in agents:
        try:
            a.process.wait(timeout=max(0.1, end - time.monotonic()))
        except subprocess.TimeoutExpired:
            a.process.kill()
            a.process.wait(timeout=5)


def _poll(watch: MqttSession, filters: list[str]) -> dict[str, bytes]:
    return watch.collect_retained(filters, quiet_s=0.2, timeout_s=5.0)


@contextlib.contextmanager
def _collector(options: BrokerOptions, db: Path, duration_s: float) -> Iterator[None]:
    """``edgefleet collect --db DB`` in a thread through the block (stopped and joined on the way out)."""
    from deploy.observe.collect import Collector, CollectorOptions

    collector = Collector(options, db, CollectorOptions(name="demo"))
    ready = threading.Event()
    thread = threading.Thread(
        target=lambda: collector.run(duration_s=duration_s, ready=ready),
        name="demo-collector",
        daemon=True,
    )
    thread.start()
    try:
        if not ready.wait(15.0):
            raise DemoError(f"the collector did not subscribe within 15 s: {collector.fatal or 'no answer'}")
        yield
    finally:
        collector.stop()
        thread.join(15.0)


def _wait_for_reports(
    db: Path,
    manifest: wire.Manifest,
    devices: tuple[DemoDevice, ...],
    agents: list[_Agent],
    deadline: float,
    progress: Progress,
) -> tuple[dict[str, wire.Report], dict[str, wire.Status]]:
    """Until the collector's store holds every device's complete report of this manifest: the reports
    and the statuses, as select reads them (deploy.observe.state.state_from_store)."""
    from deploy.observe.state import state_from_store

    wanted = {d.id for d in devices}
    reports: dict[str, wire.Report] = {}
    while True:
        state = state_from_store(db, manifest.model) if db.exists() else None
        stored = state.reports_for(manifest.model) if state is not None else {}
        for device in sorted(wanted - set(reports)):
            report = stored.get(device)
            if (
                report is not None
                and report.manifest_version == manifest.version
                and len({r.variant for r in report.results}) == len(manifest.variants)
            ):
                reports[device] = report
                ok = sum(r.ok for r in report.results)
                progress(f"      {device}: report stored, {ok}/{len(report.results)} successful benchmarks")
        if state is not None and len(reports) == len(wanted) and wanted <= set(state.statuses):
            return reports, {d: state.statuses[d] for d in wanted}
        _check(agents, deadline, "reports")
        time.sleep(0.5)


def _select_and_assign(
    manifest: wire.Manifest,
    reports: dict[str, wire.Report],
    statuses: dict[str, wire.Status],
    key: Ed25519PrivateKey,
    watch: MqttSession,
    workdir: Path,
    progress: Progress,
    policy_text: str = DEMO_POLICY,
) -> dict[str, Decision]:
    (workdir / "policy.toml").write_text(policy_text, encoding="utf-8")
    policy = Policy.from_mapping(tomllib.loads(policy_text), name="demo", source=str(workdir / "policy.toml"))
    decisions = select(manifest, reports, statuses, policy)
    for d in decisions:
        progress(f"      {d.device} ({d.device_class}): {d.variant or 'keep current'} — {d.why}")
        for variant, why in d.lost.items():
            progress(f"        not {variant}: {why}")
    undecided = [d.device for d in decisions if d.variant is None]
    if undecided or len(decisions) != len(reports):
        raise DemoError(
            f"the demo policy chose nothing for {undecided or 'some devices'}; see the lines above"
        )
    assign(decisions, key, watch, progress=lambda m: progress(f"    {m}"))
    return {d.device: d for d in decisions}


def _wait_for_active(
    watch: MqttSession,
    manifest: wire.Manifest,
    decisions: dict[str, Decision],
    agents: list[_Agent],
    deadline: float,
    progress: Progress,
) -> dict[str, wire.Status]:
    topics = watch.topics
    done: dict[str, wire.Status] = {}
    while True:
        got = _poll(watch, [topics.status(d) for d in decisions])
        for device, decision in decisions.items():
            payload = got.get(topics.status(device))
            if device in done or payload is None:
                continue
            with contextlib.suppress(wire.WireError):
                status = wire.decode(wire.Status, payload)
                entry = status.models.get(manifest.model)
                if (
                    entry
                    and entry.active
                    and entry.active.variant == decision.variant
                    and entry.state is wire.ModelState.COMMITTED
                ):
                    done[device] = status
                    progress(f"      {device}: {entry.active.variant} active and committed")
                elif entry and entry.state is wire.ModelState.ROLLED_BACK:
                    raise DemoError(f"{device} rolled back {decision.variant}: {entry.detail}")
        if len(done) == len(decisions):
            return done
        _check(agents, deadline, "activation")
        time.sleep(0.5)


def _check(agents: list[_Agent], deadline: float, stage: str) -> None:
    for a in agents:
        a.check_alive()
    if time.monotonic() > deadline:
        logs = ", ".join(str(a.log) for a in agents)
        raise DemoError(f"timed out waiting for {stage}; agent logs: {logs}")


def _device_row(
    device: DemoDevice, manifest: wire.Manifest, report: wire.Report, status: wire.Status, decision: Decision
) -> dict[str, Any]:
    assert decision.variant is not None  # undecided devices stop the demo earlier
    variant = manifest.variant(decision.variant)
    results = [r for r in report.results if r.variant == variant.id and r.ok and r.latency_ms]
    best = min(results, key=lambda r: r.latency_ms.p50 if r.latency_ms else float("inf"))
    lat = best.latency_ms
    assert lat is not None
    return {
        "device": device.id,
        "class": device.device_class,
        "threads": best.threads,
        "runtime": f"{best.runtime.name} {best.runtime.version}" if best.runtime else None,
        "variant": variant.id,
        "quantization": variant.quantization,
        "accuracy": variant.metrics.accuracy,
        "device_accuracy": best.accuracy,
        "cosine": variant.metrics.named.get("cosine"),
        "device_fidelity": best.fidelity.model_dump() if best.fidelity is not None else None,
        "size_bytes": variant.size,
        "p50_ms": round(lat.p50, 4),
        "p99_ms": round(lat.p99, 4),
        "init_ms": round(best.init_ms, 2) if best.init_ms is not None else None,
        "peak_rss_bytes": best.peak_rss_bytes,
        "state": status.models[manifest.model].state.value,
        "why": decision.why,
    }


def format_table(result: DemoResult) -> str:
    head = ("device", "class", "variant", "accuracy", "size", "p50 ms", "p99 ms", "threads")
    rows = [
        (
            d["device"],
            d["class"],
            d["variant"],
            f"{d['accuracy']:.3f}" if d["accuracy"] is not None else "-",
            f"{d['size_bytes'] / 1024:.1f} KiB",
            f"{d['p50_ms']:.3f}",
            f"{d['p99_ms']:.3f}",
            str(d["threads"]),
        )
        for d in result.devices
    ]
    widths = [max(len(str(r[i])) for r in (head, *rows)) for i in range(len(head))]
    lines = ["  ".join(str(c).ljust(w) for c, w in zip(row, widths, strict=True)) for row in (head, *rows)]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------- CLI


def register(sub: Any) -> None:
    """Add ``edgefleet demo`` to the host CLI."""
    p = sub.add_parser("demo", help="run the whole loop on this machine (broker, compress, agents, select)")
    p.add_argument("--json", action="store_true", help="print the result as one JSON object on stdout")
    p.add_argument(
        "--workdir",
        type=Path,
        help="where to keep the files (default: a temporary directory, removed at the end unless --keep)",
    )
    p.add_argument(
        "--keep", action="store_true", help="keep the temporary work directory (bundle, logs, stores)"
    )
    p.add_argument(
        "--epochs", type=int, default=DemoSettings.epochs, help="training epochs (default: %(default)s)"
    )
    p.add_argument("--timeout", type=float, default=DemoSettings.timeout_s, help="overall limit, seconds")
    p.add_argument(
        "--broker",
        choices=BROKER_CHOICES,
        default=DemoSettings.broker,
        help="auto: mosquitto if installed, else the embedded amqtt fallback (default: %(default)s)",
    )
    p.set_defaults(func=_cmd_demo)


def remove_workdir(workdir: Path, keep: bool) -> bool:
    """Remove the demo's work directory unless ``keep``; True if it is gone."""
    if keep:
        return False
    shutil.rmtree(workdir, ignore_errors=True)
    return not workdir.exists()


def _cmd_demo(args: Any) -> int:
    def progress(line: str) -> None:
        print(line, file=sys.stderr, flush=True)

    # A --workdir the user chose is theirs: only the temporary one is removed.
    keep = bool(args.keep or args.workdir is not None)
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="edgefleet-demo-"))
    settings = DemoSettings(workdir=workdir, epochs=args.epochs, timeout_s=args.timeout, broker=args.broker)
    try:
        result = run_demo(settings, progress)
    except KeyboardInterrupt:
        where = "" if remove_workdir(workdir, keep) else f"; files in {workdir}"
        progress(f"interrupted: stopped the agents and the broker{where}")
        return 130
    # On a failure the work directory stays: the error names a log in it.
    removed = remove_workdir(workdir, keep)
    if args.json:
        print(json.dumps({**result.as_json(), "workdir_kept": not removed}, indent=2, sort_keys=True))
        return 0
    print(format_table(result))
    print()
    for d in result.devices:
        print(f"{d['device']}: {d['why']}")
    print()
    if removed:
        print(f"work directory {workdir} removed (--keep keeps the bundle, logs and device stores)")
    else:
        print(f"kept:    {result.workdir}")
        print(f"bundle:  {result.bundle} (manifest.json, *.tflite, report.md)")
        print(f"devices: {result.workdir / 'devices'} (agent.toml, agent.log, store/ per device)")
        print(f"policy:  {result.workdir / 'policy.toml'}")
    print(f"done in {result.seconds:.0f} s; broker and agents stopped")
    return 0
