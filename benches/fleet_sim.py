"""A simulated fleet of thousands, end to end: publish, reports stored, select, assign, a canary rollout.

Prints ONE JSON object on stdout (progress on stderr)::

    python benches/fleet_sim.py [--devices 2000] [--agents 2] [--workers 4] [--fail-fraction 0.03]
                                [--db sqlite | --db postgresql://... | --postgres] [--seed 7] [--tls]

What runs, all real processes on loopback:

* mosquitto on a free port with the configuration ``edgefleet broker-config`` writes (deploy.broker.conf:
  per-device passwords, the generated ACL, queue limits, persistence), on a plain listener, or with
  ``--tls`` on the generated TLS listener (its CA and server certificate): the simulated devices, the
  agents (``[mqtt.tls] ca_file``), the collector and the commands (the generated host.toml) verify the
  broker with the CA. The handshakes cost the connect stage, not the fleet's work: measured on the
  shared 2-core VM (load 2.6-7), 2,000 devices + 2 agents, two runs each, every floor held either way.
  Connected with their births stored in 3.6-6.1 s over TLS against 2.6-2.8 s plain; the broker's CPU up
  to then 1.07-1.14 s against 0.28-0.33 s (0.54-0.57 against 0.14-0.17 ms per device), the simulator's
  (client side of the handshakes, one at a time per worker) 2.2-2.6 s against 0.6-0.7 s; broker RSS
  63-68 against 36-39 MiB; the later stages differed no more than between two runs of one mode. With
  200 devices the stage's time does not tell them apart (1.5-2.2 against 1.7 s), the broker's CPU does
  (0.5 against 0.1 ms per device). ``connect`` in the JSON gives these per run;
* ``--devices`` simulated devices (benches/_sim_device.py: the agent's wire behaviour, Ed25519 checks,
  seeded figures per device class) as paho clients multiplexed over ``--workers`` processes
  (benches/_sim_fleet.py), and ``--agents`` REAL agents (``python -m agent``, own store each), which
  fetch, benchmark and health-check the bundle's tiny .tflite files for real;
* ``edgefleet collect --db`` storing everything; ``edgefleet publish``, ``select --db``, ``assign --db``
  and ``rollout`` as the operator runs them (each a process; its wall time is the stage's time).

Stages: connect (every device online, its birth status stored) → publish v1 → every report stored →
select → assign → every device committed or rolled back → publish v2 → every report stored → select v2
(to pick canaries the simulation knows to be healthy: an operator picks trusted boards) → ``rollout``
with canaries first → every device committed or rolled back exactly as its simulated health decided
(``--fail-fraction`` of the (device, variant) pairs fail; the real agents pass).

Floors (``floors`` in the JSON): at least 2,000 devices, 0 reports lost (sim reports the broker
acknowledged minus report rows the collector stored), 0 devices missing from the decisions, select and
assign under 10 s each, the rollout completed with every outcome as expected.

Also in the JSON: ``stage_seconds``, ``cli_cpu_seconds`` (each command's own CPU: on a shared machine
wall time measures the load too), ``collector_cpu_seconds``, ``collector_ingest`` (events and reports
stored per second), ``broker`` (CPU, peak RSS), ``connect`` (the connect stage's time, and the broker's,
the simulator's and the collector's CPU up to its end: the handshakes' cost with ``--tls``), ``db``
(bytes, rows, bytes per 1,000 devices over the empty schema), ``simulator`` (the workers' counters),
``machine`` (CPU, memory, load before and after).

``--controller CMD`` hands v2 to a long-running controller process instead of ``edgefleet rollout``
(issue 15): the simulator talks only to the broker, so whatever drives the fleet runs beside it.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import os
import platform
import resource
import shlex
import shutil
import signal
import sqlite3
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

# benches/agent.py would shadow the `agent` package: the package is imported first, then this directory
# goes back on sys.path (last) for the simulator's helper modules.
_HERE = Path(__file__).resolve().parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _HERE]

import psutil  # noqa: E402

import agent.wire  # noqa: E402, F401

sys.path.append(str(_HERE))

from _sim_device import SimSettings, fails_health  # noqa: E402
from _sim_fleet import SimFleet  # noqa: E402
from _sim_models import write_bundle  # noqa: E402

from agent import wire  # noqa: E402
from deploy.broker.conf import COLLECTOR_USER, BrokerSpec, write_broker_config  # noqa: E402
from deploy.broker.spawn import MosquittoBroker, free_port  # noqa: E402
from deploy.keys import init_keys  # noqa: E402

MODEL = "kws"
PY = sys.executable
POLICY = """\
name = "fleet-sim"

[default]
objective = "accuracy"
max_accuracy_drop = 0.05

[classes.pi3]
objective = "latency"
max_accuracy_drop = 0.02

[classes.pi4]
objective = "energy"
max_accuracy_drop = 0.05
"""
# The real agents share this machine's two cores with the whole simulation (and whatever else runs):
# they rightly publish their windows as contended. What is measured here is the fleet, not their
# latency, so their class ranks on those results anyway (where the policy has that key).
LAB_CLASS = """
[classes.lab]
reject_contended = false
"""
SETTLED = ("committed", "rolled_back")


def policy_text() -> str:
    from deploy.control.select import Rule

    return POLICY + (LAB_CLASS if "reject_contended" in Rule.model_fields else "")


def say(msg: str) -> None:
    print(f"[fleet_sim {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


class BenchFailure(Exception):
    """A stage did not finish: the JSON says which and why."""


# ------------------------------------------------------------------------------------------ the store


class FleetDb:
    """Read-only queries on the collector's store (SQLite file or PostgreSQL URL), for the verdicts."""

    def __init__(self, url: str) -> None:
        self.pg = url.startswith(("postgresql://", "postgres://"))
        self.url = url.removeprefix("sqlite://") if url.startswith("sqlite:///") else url

    @contextlib.contextmanager
    def _conn(self) -> Iterator[Any]:
        if self.pg:
            import psycopg

            with psycopg.connect(self.url, connect_timeout=10) as conn:
                yield conn
        else:
            lite = sqlite3.connect(f"file:{self.url}?mode=ro", uri=True, timeout=10)
            try:
                yield lite
            finally:
                lite.close()

    def rows(self, sql: str, params: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
        if self.pg:
            sql = sql.replace("?", "%s")
        try:
            with self._conn() as conn:
                return list(conn.execute(sql, tuple(params)).fetchall())
        except sqlite3.OperationalError:
            return []  # not created yet
        except Exception as err:  # psycopg's errors: psycopg is imported only for a PostgreSQL URL
            if self.pg and type(err).__name__ in ("UndefinedTable", "OperationalError"):
                return []
            raise

    def count(self, sql: str, params: Sequence[Any] = ()) -> int:
        rows = self.rows(sql, params)
        return int(rows[0][0]) if rows else 0

    def statuses(self) -> dict[str, dict[str, Any]]:
        return {d: json.loads(p) for d, p in self.rows("SELECT device, payload FROM statuses")}

    def size_bytes(self) -> int:
        if self.pg:
            return self.count("SELECT pg_database_size(current_database())")
        return sum(p.stat().st_size for p in Path(self.url).parent.glob(Path(self.url).name + "*"))


# ------------------------------------------------------------------------------------------ processes


class Stages:
    """Wall time per stage, and the peak RSS of the broker sampled while waiting."""

    def __init__(self, broker_pid: int | None) -> None:
        self.seconds: dict[str, float] = {}
        self.broker = psutil.Process(broker_pid) if broker_pid else None
        self.broker_rss_peak = 0

    def sample(self) -> None:
        if self.broker is not None:
            with contextlib.suppress(psutil.Error):
                self.broker_rss_peak = max(self.broker_rss_peak, self.broker.memory_info().rss)

    @contextlib.contextmanager
    def stage(self, name: str) -> Iterator[None]:
        say(f"stage {name}")
        t0 = time.monotonic()
        try:
            yield
        finally:
            self.seconds[name] = round(time.monotonic() - t0, 3)
            self.sample()
            say(f"stage {name}: {self.seconds[name]:.2f} s")

    def wait(self, what: str, done: Callable[[], bool], timeout_s: float, every_s: float = 0.5) -> None:
        deadline = time.monotonic() + timeout_s
        while not done():
            self.sample()
            if time.monotonic() > deadline:
                raise BenchFailure(f"{what}: not within {timeout_s:g} s")
            time.sleep(every_s)


CLI_CPU: dict[str, float] = {}  # command -> CPU seconds of its processes (user + system), summed


def run_cli(args: Sequence[str], env: dict[str, str], timeout_s: float) -> tuple[int, str, str]:
    """``edgefleet ARGS`` as a process of its own (``python -m deploy``): (exit code, stdout, stderr).

    Its CPU time goes into :data:`CLI_CPU`: on a shared machine the wall time says how busy the machine
    was as much as what the command costs."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    try:
        proc = subprocess.run(
            [PY, "-m", "deploy", *args],
            env=env,
            capture_output=True,
            text=True,
            timeout=timeout_s,
            check=False,
        )
    except subprocess.TimeoutExpired as err:
        raise BenchFailure(f"edgefleet {args[0]} did not finish within {timeout_s:g} s") from err
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = after.ru_utime - before.ru_utime + after.ru_stime - before.ru_stime
    CLI_CPU[args[0]] = round(CLI_CPU.get(args[0], 0.0) + cpu, 2)
    return proc.returncode, proc.stdout, proc.stderr


def stop_process(proc: subprocess.Popen[bytes], timeout_s: float = 15.0) -> int | None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)
    return proc.returncode


def agent_config(
    d: Path, device: str, port: int, password_file: Path, public_key: str, ca_file: Path | None = None
) -> Path:
    cfg = d / "agent.toml"
    tls = f'[mqtt.tls]\nca_file = "{ca_file}"\n' if ca_file is not None else ""
    cfg.write_text(
        f"""[device]
id = "{device}"
class = "lab"
[mqtt]
host = "127.0.0.1"
port = {port}
username = "{device}"
password_file = "{password_file}"
{tls}[trust]
public_keys = ["{public_key}"]
[store]
path = "{d / "store"}"
min_free_mb = 1
[bench]
threads = [1]
warmup_runs = 2
min_runs = 20
min_seconds = 0.05
timeout_s = 60
[health]
probation_s = 0.5
inferences = 4
[telemetry]
interval_s = 10
""",
        encoding="utf-8",
    )
    return cfg


# ------------------------------------------------------------------------------------------ the run


def run(args: argparse.Namespace, tmp: Path) -> dict[str, Any]:
    n_sim, n_real = args.devices, args.agents
    sim_ids = [f"sim-{i:05d}" for i in range(n_sim)]
    real_ids = [f"agent-{i}" for i in range(n_real)]
    everyone = sim_ids + real_ids
    out: dict[str, Any] = {
        "bench": "fleet_sim",
        "devices": {"simulated": n_sim, "real_agents": n_real, "total": len(everyone)},
        "settings": {
            "workers": args.workers,
            "fail_fraction": args.fail_fraction,
            "seed": args.seed,
            "broker": "mosquitto, generated config (per-device passwords + ACL), "
            + (
                "TLS loopback listener (the generated CA and server certificate)"
                if args.tls
                else "plain loopback listener"
            ),
        },
        "machine": machine_note(),
    }
    key_pair = init_keys(tmp / "keys")
    pub = key_pair.public_text
    bundles = {v: tmp / f"bundle-v{v}" for v in (1, 2)}
    manifests = {v: write_bundle(bundles[v], MODEL, v, time.time()) for v in (1, 2)}
    policy = tmp / "policy.toml"
    policy.write_text(policy_text(), encoding="utf-8")
    db_url = args.db if args.db and args.db != "sqlite" else str(tmp / "fleet.db")
    out["settings"]["db"] = "postgresql" if db_url.startswith("postgres") else "sqlite"
    db = FleetDb(db_url)

    say(f"broker configuration for {len(everyone)} devices")
    port = free_port()
    state = tmp / "state"
    state.mkdir()
    spec = BrokerSpec(
        install_dir=tmp / "broker",
        port=port,
        bind="127.0.0.1",
        tls=args.tls,
        state_dir=state,
        log_dest=f"file {state / 'mosquitto.log'}",
        extra=["user root"] if os.geteuid() == 0 else [],
    )
    files = write_broker_config(
        tmp / "broker", spec, devices=everyone, server_names=["localhost", "127.0.0.1"]
    )
    passwords = {d: files.credentials[d].read_text().strip() for d in everyone}
    ca_file = files.ca_cert if args.tls else None  # the host commands find it in files.host_config
    assert files.host_config is not None
    env = dict(
        os.environ,
        EDGEFLEET_HOME=str(tmp / "keys"),
        EDGEFLEET_HOST_CONFIG=str(files.host_config),
        EDGEFLEET_COLLECTOR_DB=str(tmp / "none.db"),
        PYTHONUNBUFFERED="1",
    )
    env.pop("EDGEFLEET_CRASH_AT", None)
    settings = SimSettings(
        namespace=wire.DEFAULT_NAMESPACE,
        seed=args.seed,
        fail_fraction=args.fail_fraction,
        fetch_s=args.fetch_s,
        bench_s=args.bench_s,
        probation_s=args.probation_s,
    )
    procs: list[subprocess.Popen[bytes]] = []
    db_start = 0
    with contextlib.ExitStack() as stack:
        broker = stack.enter_context(
            MosquittoBroker(port=port, state_dir=state, config=files.conf.read_text(encoding="utf-8"))
        )
        st = Stages(broker.pid)
        collector_log = (tmp / "collector.log").open("wb")
        stack.callback(collector_log.close)
        collector = subprocess.Popen(
            [PY, "-m", "deploy", "collect", "--db", db_url, "--name", "sim",
             "--username", COLLECTOR_USER, "--password-file", str(files.credentials[COLLECTOR_USER])],
            env=env, stdout=collector_log, stderr=subprocess.STDOUT,
        )  # fmt: skip
        stack.callback(stop_process, collector)
        collector_ps = psutil.Process(collector.pid)
        fleet = SimFleet(
            broker.host,
            broker.port,
            sim_ids,
            passwords,
            settings,
            [pub],
            workers=args.workers,
            ca_file=str(ca_file) if ca_file is not None else None,
        )
        try:
            with st.stage("connect"):
                st.wait("collector ready", lambda: _collector_ready(db, collector), 60, 0.2)
                db_start = db.size_bytes()  # the empty schema (PostgreSQL's alone is ~7.5 MB)
                fleet.start()
                stack.callback(fleet.stop)
                for dev in real_ids:
                    d = tmp / dev
                    d.mkdir()
                    cfg = agent_config(d, dev, broker.port, files.credentials[dev], pub, ca_file)
                    log = (d / "agent.log").open("ab")
                    stack.callback(log.close)
                    env_agent = dict(env)
                    procs.append(
                        subprocess.Popen([PY, "-m", "agent", "--config", str(cfg)], stderr=log, env=env_agent)
                    )
                    stack.callback(stop_process, procs[-1])
                stats = fleet.wait_connected(args.timeout)
                if stats.get("connacks", 0) < n_sim:
                    raise BenchFailure(
                        f"only {stats.get('connacks', 0)} of {n_sim} simulated devices connected: {stats}"
                    )
                st.wait(
                    "every birth status stored",
                    lambda: db.count("SELECT count(*) FROM statuses WHERE online = 1") >= len(everyone),
                    args.timeout,
                )
            out["connect"] = connect_cost(st, fleet, collector_ps, n_sim)
            for version in (1, 2):
                with st.stage(f"publish_v{version}"):
                    code, so, se = run_cli(["publish", str(bundles[version])], env, args.timeout)
                    if code != 0:
                        raise BenchFailure(f"publish v{version} exited {code}: {se[-800:]}")
                if version == 2 and args.controller:
                    # issue 15: a controller process rolls v2 out by itself; the stage ends when every
                    # device settled as its health decides (decisions read afterwards, from the store)
                    with st.stage("controller_v2"):
                        ctl = start_controller(args.controller, env, db_url, files.host_config, policy, tmp)
                        stack.callback(stop_process, ctl)
                        st.wait(
                            "every report of v2 stored",
                            lambda: (
                                db.count(
                                    "SELECT count(*) FROM reports WHERE model = ? AND manifest_version = 2",
                                    (MODEL,),
                                )
                                >= len(everyone)
                            ),
                            args.timeout,
                        )
                        decisions = select_quiet(env, db_url, policy, args.timeout)
                        expected = expected_outcomes(decisions, args, real_ids)
                        settle(st, db, expected, manifests[2], args.timeout, ctl)
                        st.wait(
                            "the controller's rollout completed",
                            lambda: controller_rollout(db).get("state") == "completed",
                            args.timeout,
                        )
                    out["decisions_v2"] = decision_summary(decisions, everyone)
                    out["after_controller_v2"] = outcome_summary(db, expected, manifests[2])
                    out["controller_rollout_v2"] = controller_rollout(db)
                    break
                with st.stage(f"reports_v{version}"):
                    st.wait(
                        f"every report of v{version} stored",
                        functools.partial(all_reported, db, version, len(everyone)),
                        args.timeout,
                    )
                decisions = select_stage(st, f"select_v{version}", env, db_url, policy, args.timeout)
                out[f"decisions_v{version}"] = decision_summary(decisions, everyone)
                expected = expected_outcomes(decisions, args, real_ids)
                if version == 1:
                    with st.stage("assign_v1"):
                        code, so, se = run_cli(
                            ["assign", "--model", MODEL, "--db", db_url, "--policy", str(policy), "--json"],
                            env,
                            args.timeout,
                        )
                        if code != 0:
                            raise BenchFailure(f"assign exited {code}: {se[-800:]}")
                    with st.stage("settled_v1"):
                        settle(st, db, expected, manifests[1], args.timeout)
                    out["assign_v1"] = outcome_summary(db, expected, manifests[1])
                else:
                    canaries = pick_canaries(decisions, expected, real_ids, args.canaries)
                    with st.stage("rollout_v2"):
                        canary_flags = [x for c in canaries for x in ("--canary-device", c)]
                        rollouts_db = tmp / "rollouts.db"
                        code, so, se = run_cli(
                            ["rollout", MODEL, "--policy", str(policy), "--state-db", str(rollouts_db),
                             "--db", db_url,
                             "--canary", str(len(canaries)), *canary_flags,
                             "--wait", "--timeout", str(args.timeout), "--json"],
                            env,
                            args.timeout + 60,
                        )  # fmt: skip
                    out["rollout_v2"] = rollout_summary(code, so, se, expected, canaries)
                    with st.stage("settled_v2"):
                        settle(st, db, expected, manifests[2], args.timeout)
                    out["after_rollout_v2"] = outcome_summary(db, expected, manifests[2])
        except BenchFailure as err:
            out["error"] = str(err)
            say(f"FAILED: {err}")
        finally:
            out["stage_seconds"] = st.seconds
            out["cli_cpu_seconds"] = dict(CLI_CPU)
            final = fleet.stop()  # every worker's last counters (the collector is still running)
            with contextlib.suppress(psutil.Error):
                t = collector_ps.cpu_times()
                out["collector_cpu_seconds"] = round(t.user + t.system, 2)
            with contextlib.suppress(psutil.Error):
                if st.broker is not None:
                    t = st.broker.cpu_times()
                    out["broker"] = {
                        "cpu_seconds": round(t.user + t.system, 2),
                        "rss_mib_peak": round(st.broker_rss_peak / 2**20, 1),
                        "rss_mib_end": round(st.broker.memory_info().rss / 2**20, 1),
                    }
            out["simulator"] = final
            out["reports"] = report_counts(db, final, real_ids)
            out["db"] = {"kind": "sqlite file" if not db.pg else "postgresql"}
            out["db"]["rows"] = {
                t: db.count(f"SELECT count(*) FROM {t}")
                for t in ("statuses", "reports", "report_history", "events")
            }
    out["collector_ingest"] = ingest_rate(db)
    # after the collector stopped: SQLite has checkpointed its WAL into the file
    out["db"]["bytes"] = db.size_bytes()
    out["db"]["bytes_empty"] = db_start
    grown = out["db"]["bytes"] - db_start
    out["db"]["bytes_per_1000_devices"] = round(grown * 1000 / max(1, len(everyone)))
    for dev in real_ids:
        log_text = (tmp / dev / "agent.log").read_text(errors="replace")
        if "Traceback" in log_text:
            out.setdefault("agent_tracebacks", []).append(dev)
    out["machine"]["loadavg_end"] = [round(x, 2) for x in os.getloadavg()]
    out["floors"] = floors(out, len(everyone))
    out["ok"] = all(out["floors"].values()) and "error" not in out
    return out


def _cpu(proc: psutil.Process | None) -> float:
    if proc is None:
        return 0.0
    with contextlib.suppress(psutil.Error):
        t = proc.cpu_times()
        return float(t.user + t.system)
    return 0.0


def connect_cost(st: Stages, fleet: SimFleet, collector: psutil.Process, devices: int) -> dict[str, Any]:
    """What connecting the fleet cost, apart from the rest of the run: with --tls the handshakes show
    here (the broker's CPU per device; the workers' CPU includes the client side of the handshakes).
    Every figure covers the process's life up to the end of the connect stage (CONNACKs and births)."""
    workers = 0.0
    for pid in fleet.pids:
        with contextlib.suppress(psutil.Error):
            workers += _cpu(psutil.Process(pid))
    broker = _cpu(st.broker)
    seconds = st.seconds.get("connect", 0.0)
    return {
        "seconds": seconds,
        "broker_cpu_seconds": round(broker, 2),
        "broker_cpu_ms_per_device": round(broker * 1000 / max(1, devices), 3),
        "simulator_cpu_seconds": round(workers, 2),
        "simulator_cpu_ms_per_device": round(workers * 1000 / max(1, devices), 3),
        "collector_cpu_seconds": round(_cpu(collector), 2),
        "devices_per_second": round(devices / seconds, 1) if seconds else None,
    }


def _collector_ready(db: FleetDb, collector: subprocess.Popen[bytes]) -> bool:
    if collector.poll() is not None:
        raise BenchFailure(f"the collector exited with code {collector.returncode}")
    if not db.pg and not Path(db.url).exists():
        return False
    return _has_table(db)


def _has_table(db: FleetDb) -> bool:
    if db.pg:
        return db.count("SELECT count(*) FROM information_schema.tables WHERE table_name = 'statuses'") > 0
    return db.count("SELECT count(*) FROM sqlite_master WHERE name = 'statuses'") > 0


def all_reported(db: FleetDb, version: int, devices: int) -> bool:
    sql = "SELECT count(*) FROM reports WHERE model = ? AND manifest_version = ?"
    return db.count(sql, (MODEL, version)) >= devices


def select_stage(
    st: Stages, name: str, env: dict[str, str], db_url: str, policy: Path, timeout_s: float
) -> list[dict[str, Any]]:
    with st.stage(name):
        code, so, se = run_cli(
            ["select", "--model", MODEL, "--db", db_url, "--policy", str(policy), "--json"], env, timeout_s
        )
    if code != 0:
        raise BenchFailure(f"select exited {code}: {se[-800:]}")
    decisions: list[dict[str, Any]] = json.loads(so)
    return decisions


def select_quiet(env: dict[str, str], db_url: str, policy: Path, timeout_s: float) -> list[dict[str, Any]]:
    """``select --json`` outside any timed stage (what the expected outcomes are computed from)."""
    code, so, se = run_cli(
        ["select", "--model", MODEL, "--db", db_url, "--policy", str(policy), "--json"], env, timeout_s
    )
    if code != 0:
        raise BenchFailure(f"select exited {code}: {se[-800:]}")
    decisions: list[dict[str, Any]] = json.loads(so)
    return decisions


def start_controller(
    template: str, env: dict[str, str], db_url: str, host_config: Path, policy: Path, tmp: Path
) -> subprocess.Popen[bytes]:
    """The ``--controller`` command line, its placeholders filled, as a process (log: controller.log)."""
    fields = {
        "python": PY,
        "db": db_url,
        "config": str(host_config),
        "policy": str(policy),
        "key_dir": env["EDGEFLEET_HOME"],
        "model": MODEL,
        "tmp": str(tmp),
    }
    try:
        argv = [part.format(**fields) for part in shlex.split(template)]
    except (KeyError, ValueError) as err:
        raise BenchFailure(f"--controller {template!r}: {err} (placeholders: {', '.join(fields)})") from err
    say(f"controller: {' '.join(argv)}")
    with (tmp / "controller.log").open("ab") as log:
        return subprocess.Popen(argv, env=env, stdout=log, stderr=subprocess.STDOUT)


def controller_rollout(db: FleetDb) -> dict[str, Any]:
    """--controller: the v2 rollout it ran, from the store (deploy.control.rollout's tables): each
    state's time
    since planning, and how many devices it covered."""
    rows = db.rows(
        "SELECT r.id, r.state, t.to_state, t.at FROM rollouts r "
        "JOIN rollout_transitions t ON t.rollout = r.id "
        "WHERE r.model = ? AND r.manifest_version = 2 ORDER BY r.created_at, t.seq",
        (MODEL,),
    )
    if not rows:
        return {"error": "no rollout of v2 in the store"}
    rid, state = rows[-1][0], rows[-1][1]
    mine = [r for r in rows if r[0] == rid]
    return {
        "id": rid,
        "state": state,
        "rollouts": len({r[0] for r in rows}),
        "devices": db.count("SELECT count(*) FROM rollout_devices WHERE rollout = ?", (rid,)),
        "seconds_since_planned": {to: round(at - mine[0][3], 3) for _, _, to, at in mine},
    }


def decision_summary(decisions: list[dict[str, Any]], everyone: Sequence[str]) -> dict[str, Any]:
    decided = {d["device"] for d in decisions}
    chosen: dict[str, int] = {}
    for d in decisions:
        chosen[str(d.get("variant"))] = chosen.get(str(d.get("variant")), 0) + 1
    missing = sorted(set(everyone) - decided)
    return {
        "decisions": len(decisions),
        "missing": len(missing),
        "missing_first": missing[:5],
        "chosen": chosen,
    }


def expected_outcomes(
    decisions: list[dict[str, Any]], args: argparse.Namespace, real_ids: Sequence[str]
) -> dict[str, tuple[str, str]]:
    """device → (sha256 assigned, "committed" | "rolled_back") as the simulation decides it."""
    out = {}
    for d in decisions:
        sha = d.get("sha256")
        if not sha:
            continue
        dev = d["device"]
        bad = dev not in real_ids and fails_health(args.seed, args.fail_fraction, dev, sha)
        out[dev] = (sha, "rolled_back" if bad else "committed")
    return out


def settled_states(db: FleetDb, manifest: wire.Manifest) -> dict[str, tuple[str | None, str | None]]:
    """device → (state, active sha) of the model in its latest stored status."""
    out: dict[str, tuple[str | None, str | None]] = {}
    for dev, status in db.statuses().items():
        ms = (status.get("models") or {}).get(MODEL) or {}
        if ms.get("manifest_version") != manifest.version:
            out[dev] = (None, None)
            continue
        out[dev] = (ms.get("state"), (ms.get("active") or {}).get("sha256"))
    return out


def settle(
    st: Stages,
    db: FleetDb,
    expected: dict[str, tuple[str, str]],
    manifest: wire.Manifest,
    timeout_s: float,
    process: subprocess.Popen[bytes] | None = None,
) -> None:
    def done() -> bool:
        if process is not None and process.poll() is not None:
            raise BenchFailure(f"the controller exited with code {process.returncode}")
        now = settled_states(db, manifest)
        return all(now.get(dev, (None, None))[0] in SETTLED for dev in expected)

    st.wait(f"every device of v{manifest.version} committed or rolled back", done, timeout_s, 1.0)


def outcome_summary(
    db: FleetDb, expected: dict[str, tuple[str, str]], manifest: wire.Manifest
) -> dict[str, Any]:
    now = settled_states(db, manifest)
    counts: dict[str, int] = {}
    wrong = []
    for dev, (sha, want) in sorted(expected.items()):
        state, active = now.get(dev, (None, None))
        counts[str(state)] = counts.get(str(state), 0) + 1
        ok = state == want and (active == sha) == (want == "committed")
        if not ok:
            wrong.append(f"{dev}: {state} (expected {want})")
    return {
        "states": counts,
        "as_expected": len(expected) - len(wrong),
        "unexpected": len(wrong),
        "unexpected_first": wrong[:5],
    }


def pick_canaries(
    decisions: list[dict[str, Any]], expected: dict[str, tuple[str, str]], real_ids: Sequence[str], n: int
) -> list[str]:
    """The real agents, then simulated devices whose health check will pass, up to ``n``."""
    healthy = [d["device"] for d in decisions if expected.get(d["device"], ("", ""))[1] == "committed"]
    ordered = [*[d for d in real_ids if d in expected], *[d for d in healthy if d not in real_ids]]
    return ordered[: max(1, n)]


def rollout_summary(
    code: int, so: str, se: str, expected: dict[str, tuple[str, str]], canaries: Sequence[str]
) -> dict[str, Any]:
    # the controller re-reads every status when its bounded watch dropped messages (deploy/control/rollout.py)
    resyncs = se.count("dropped while busy")
    out: dict[str, Any] = {"exit_code": code, "canaries": len(canaries), "status_resyncs": resyncs}
    try:
        summary = json.loads(so)
    except ValueError:
        out["error"] = f"no JSON from rollout: {se[-800:]}"
        return out
    out["state"] = summary["state"]
    out["reason"] = summary.get("reason")
    devices = {d["device"]: d for d in summary["devices"]}
    out["devices"] = len(devices)
    out["missing"] = sorted(set(expected) - set(devices))[:5]
    out["missing_count"] = len(set(expected) - set(devices))
    outcomes: dict[str, int] = {}
    wrong = []
    for dev, (sha, want) in expected.items():
        d = devices.get(dev)
        got = d.get("outcome") if d else None
        outcomes[str(got)] = outcomes.get(str(got), 0) + 1
        if got != want or (d and d.get("sha256") != sha):
            wrong.append(f"{dev}: {got} (expected {want})")
    out["outcomes"] = outcomes
    out["unexpected"] = len(wrong)
    out["unexpected_first"] = wrong[:5]
    trans = summary.get("transitions") or []
    if trans:
        t0 = trans[0]["at"]
        out["transitions_s"] = {t["to"]: round(t["at"] - t0, 2) for t in trans}
    return out


def report_counts(db: FleetDb, sim: dict[str, Any], real_ids: Sequence[str]) -> dict[str, Any]:
    stored_sim = db.count("SELECT count(*) FROM report_history WHERE device LIKE ?", ("sim-%",))
    stored_all = db.count("SELECT count(*) FROM report_history")
    acked = int(sim.get("reports_acked", 0))
    return {
        "published_sim_acked": acked,
        "published_sim": int(sim.get("reports", 0)),
        "stored_sim": stored_sim,
        "stored_real_agents": stored_all - stored_sim,
        "stored": stored_all,
        "lost": max(0, acked - stored_sim),
    }


def ingest_rate(db: FleetDb) -> dict[str, Any]:
    """Events and reports the collector stored per second (by their arrival time), peak and busy seconds;
    the devices' timing spreads them, so the peak is what the collector kept up with, not its limit."""
    rows = db.rows(
        "SELECT CAST(received_at AS INTEGER), count(*) FROM "
        "(SELECT received_at FROM events UNION ALL SELECT received_at FROM report_history) AS x "
        "GROUP BY CAST(received_at AS INTEGER)"
    )
    per_s = sorted(int(n) for _, n in rows)
    if not per_s:
        return {}
    return {
        "messages": sum(per_s),
        "peak_per_s": per_s[-1],
        "busy_seconds": len(per_s),
        "median_busy_per_s": per_s[len(per_s) // 2],
    }


def floors(out: dict[str, Any], total: int) -> dict[str, bool]:
    secs = out.get("stage_seconds", {})
    roll = out.get("rollout_v2", {})
    found = {
        "devices_at_least_2000": total >= 2000,
        "no_report_lost": out.get("reports", {}).get("lost", 1) == 0
        and out.get("reports", {}).get("published_sim_acked", 0) > 0,
        "no_device_missing_from_decisions": all(
            out.get(f"decisions_v{v}", {}).get("missing", 1) == 0 for v in (1, 2)
        ),
        # --controller decides v2 itself: only the select stage that ran counts
        "select_under_10s": all(
            secs.get(f"select_v{v}", 99.0) < 10 for v in (1, 2) if v == 1 or "after_controller_v2" not in out
        ),
        "assign_under_10s": secs.get("assign_v1", 99.0) < 10,
        "assign_outcomes_as_expected": out.get("assign_v1", {}).get("unexpected", 1) == 0,
    }
    if "after_controller_v2" in out:  # --controller: the controller rolled v2 out, no `edgefleet rollout`
        found["controller_outcomes_as_expected"] = out["after_controller_v2"].get("unexpected", 1) == 0
        rollout = out.get("controller_rollout_v2", {})
        found["controller_rollout_completed"] = rollout.get("state") == "completed"
        return found
    found["rollout_completed"] = roll.get("state") == "completed" and roll.get("missing_count", 1) == 0
    found["rollout_outcomes_as_expected"] = (
        roll.get("unexpected", 1) == 0 and out.get("after_rollout_v2", {}).get("unexpected", 1) == 0
    )
    return found


def machine_note() -> dict[str, Any]:
    return {
        "cpus": os.cpu_count(),
        "cpu_model": _cpu_model(),
        "memory_gib": round(psutil.virtual_memory().total / 2**30, 1),
        "python": platform.python_version(),
        "loadavg_start": [round(x, 2) for x in os.getloadavg()],
        "note": "everything (broker, collector, simulator workers, agents, CLI) on this one machine",
    }


def _cpu_model() -> str | None:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return None


def start_postgres(stack: contextlib.ExitStack, tmp: Path) -> str:
    """A throwaway PostgreSQL through tests/pg_helpers.py (the helper the tests use); its URL."""
    sys.path.append(str(_HERE.parent / "tests"))
    try:
        from pg_helpers import throwaway_postgres
    except ImportError as err:
        raise BenchFailure(f"--postgres needs tests/pg_helpers.py ({err})") from err
    try:
        url: str = stack.enter_context(throwaway_postgres(tmp / "pg"))
    except RuntimeError as err:
        raise BenchFailure(f"--postgres: {err}") from err
    say(f"throwaway PostgreSQL at {url}")
    return url


def main(argv: Sequence[str] | None = None) -> int:
    from agent.argparsing import StrictParser

    p = StrictParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    p.add_argument("--devices", type=int, default=2000, help="simulated devices (default 2000)")
    p.add_argument("--agents", type=int, default=2, help="real agents among them (default 2)")
    p.add_argument("--workers", type=int, default=4, help="simulator processes (default 4)")
    p.add_argument(
        "--fail-fraction", type=float, default=0.03, help="share of (device, variant) failing health"
    )
    p.add_argument(
        "--canaries", type=int, default=0, help="canary devices (default: 1 %% of the fleet, at least 1)"
    )
    p.add_argument("--seed", type=int, default=7)
    p.add_argument(
        "--db",
        default="sqlite",
        help="sqlite (default: a file in the run's directory) or a postgresql:// URL",
    )
    p.add_argument(
        "--postgres", action="store_true", help="start a throwaway PostgreSQL (tests/pg_helpers.py) for --db"
    )
    p.add_argument("--fetch-s", type=float, default=1.0, help="simulated fetch+verify time per manifest, s")
    p.add_argument("--bench-s", type=float, default=2.0, help="simulated benchmark time per manifest, s")
    p.add_argument("--probation-s", type=float, default=1.0, help="simulated probation, s")
    p.add_argument("--timeout", type=float, default=300.0, help="limit per stage, s (default 300)")
    p.add_argument(
        "--tls",
        action="store_true",
        help="the broker on the generated TLS listener; devices, agents and commands verify it with the CA",
    )
    p.add_argument("--keep", type=Path, help="keep the run's directory here (logs, database)")
    p.add_argument(
        "--controller",
        metavar="CMD",
        help="roll v2 out with this long-running command instead of `edgefleet rollout` (started after "
        "v1 settled, stopped at the end); placeholders {python} {db} {config} {policy} {key_dir} {model} "
        '{tmp}, e.g. "{python} -m deploy controller --db {db} --config {config} --policy {policy}"',
    )
    args = p.parse_args(argv)
    if not 0 <= args.fail_fraction < 1:
        p.error("--fail-fraction must be in [0, 1)")
    if args.canaries <= 0:
        args.canaries = max(1, (args.devices + args.agents) // 100)
    _raise_fd_limit(args.devices)
    with contextlib.ExitStack() as stack:
        tmp = Path(tempfile.mkdtemp(prefix="edgefleet-sim-"))
        stack.callback(shutil.rmtree, tmp, ignore_errors=True)
        try:
            if args.postgres:
                args.db = start_postgres(stack, tmp)
            out = run(args, tmp)
        except BenchFailure as err:
            out = {"bench": "fleet_sim", "error": str(err), "ok": False}
        if args.keep:
            shutil.copytree(
                tmp, args.keep, dirs_exist_ok=True, ignore=shutil.ignore_patterns("credentials", "*.key")
            )
    print(json.dumps(out, indent=2))
    return 0 if out.get("ok") else 1


def _raise_fd_limit(devices: int) -> None:
    """The broker (a child) holds one socket per device: lift the soft limit as far as the hard one."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = min(hard, max(soft, devices * 2 + 1024))
    if want > soft:
        resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))


if __name__ == "__main__":
    sys.exit(main())
