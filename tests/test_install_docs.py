"""The install steps of README.md ("Running the agent on a Raspberry Pi"), run as written.

The README's two ``sh`` blocks marked ``<!-- install-steps: host -->`` and ``<!-- install-steps: device -->``
are the only copy of the install commands (docs/agent.md points to them). This test runs them line by line
in a private root: the wheel is built from a copy of this repository, a fresh venv gets it with the
``[agent]`` extra, ``edgefleet provision`` writes the device's bundle against a broker configuration of
``edgefleet broker-config``, the bundle is copied into ``ROOT/etc/edgefleet`` and checked with
``--check-config``; then the unit's own ``ExecStartPre=``/``ExecStart=`` lines (parsed from
systemd/edgefleet-agent.service) start the agent as systemd would (``User=``, ``SupplementaryGroups=``,
``UMask=``, ``WorkingDirectory=``, ``Environment=``, ``StateDirectory=``, ``NOTIFY_SOCKET``), a bundle is
published to a real mosquitto on a free loopback port (never the system broker on 1883) and the test waits
for the device's report.

What is changed, and nothing else:

* paths under /opt/edgefleet, /etc/edgefleet, /var/lib/edgefleet, /etc/systemd/system,
  /usr/lib/sysusers.d and /tmp get the ROOT prefix (in the commands, the unit's lines and the generated
  agent.toml, whose absolute paths point at /etc/edgefleet and /var/lib/edgefleet);
* ``scp ... pi@host:/tmp/`` copies into ROOT/tmp; ``--broker-host broker.lan`` points at the test broker;
* ``sudo`` is dropped (the test is root, or runs everything as itself);
* ``systemctl`` and ``journalctl`` are skipped (no systemd here: the test starts the unit's command lines
  itself).

This machine's user database is never changed (the agent's ``--check-config`` run as root elsewhere in
the suite looks for a user named ``edgefleet``, so creating one here would change what those tests see).
As root, ``systemd-sysusers`` runs with ``--root=ROOT`` and the test checks the user and group it wrote
into ROOT/etc/passwd and ROOT/etc/group; the docs' user and group ``edgefleet`` are then played by the
existing unprivileged account ``nobody:nogroup`` (``-o``/``-g``/``sudo -u`` and the unit's
``User=``/``Group=``), so every owner and mode of the docs is really exercised by a user that is not
root. When not root, ``systemd-sysusers`` and the ``-o``/``-g`` options are skipped and everything runs as
the current user. Each skip or substitution is printed with its reason.
"""

from __future__ import annotations

import contextlib
import grp
import json
import os
import pwd
import re
import shlex
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
import tomllib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import paho.mqtt.client as paho
import pytest
from install_steps import (
    IS_ROOT,
    README,
    SECURE_PATH,
    SERVICE_USER,
    STAND_IN_GROUP,
    STAND_IN_USER,
    copy_repo,
    device_command,
    device_parts,
    host_command,
    install_blocks,
    make_root,
    raspberry_pi_section,
    reroot,
)
from paho.mqtt.enums import CallbackAPIVersion

from deploy.broker.conf import BrokerSpec, write_broker_config
from deploy.broker.spawn import MosquittoBroker, find_mosquitto, free_port

REPO = Path(__file__).resolve().parent.parent
AGENT_UNIT = REPO / "systemd" / "edgefleet-agent.service"
COLLECTOR_UNIT = REPO / "systemd" / "edgefleet-collector.service"
SYSUSERS = REPO / "systemd" / "edgefleet.sysusers.conf"
DEVICE = "pi-kitchen"
MODEL = "digits"
USERADD = (
    "useradd --system --user-group --no-create-home --home-dir /nonexistent --shell /usr/sbin/nologin "
    "--groups video edgefleet"
)
CHECK_CONFIG = (
    "sudo -u edgefleet /opt/edgefleet/venv/bin/edgefleet-agent --config /etc/edgefleet/agent.toml "
    "--check-config --connect"
)


def project_version() -> str:
    return str(tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["version"])


# ------------------------------------------------------------------------------------------ the docs


def unit_service(path: Path) -> dict[str, list[str]]:
    """The ``[Service]`` section of a unit: key → every value given (in order)."""
    out: dict[str, list[str]] = {}
    section = None
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            section = line.strip("[]")
            continue
        if section == "Service":
            key, _, value = line.partition("=")
            out.setdefault(key.strip(), []).append(value.strip())
    return out


def unit_environment(values: list[str]) -> dict[str, str]:
    env: dict[str, str] = {}
    for value in values:
        for item in shlex.split(value):
            k, _, v = item.partition("=")
            env[k] = v
    return env


# ------------------------------------------------------------------------------------------ the runner


@dataclass
class Runner:
    """Runs doc lines, prints a transcript, fails with the doc line and its output."""

    root: Path
    broker_port: int
    transcript: list[str] = field(default_factory=list)

    def log(self, text: str) -> None:
        self.transcript.append(text)
        print(text, flush=True)

    def skip(self, line: str, reason: str) -> None:
        self.log(f"SKIP  {line}\n      ({reason})")

    def run(self, line: str, shell_cmd: str, cwd: Path, env: dict[str, str], timeout: float = 300) -> str:
        self.log(f"RUN   {line}" + (f"\n   as {shell_cmd}" if shell_cmd != line else ""))
        t0 = time.monotonic()
        try:
            proc = subprocess.run(
                ["bash", "-euo", "pipefail", "-c", shell_cmd],
                cwd=cwd,
                env=env,
                capture_output=True,
                text=True,
                timeout=timeout,
                check=False,
            )
        except subprocess.TimeoutExpired as err:
            pytest.fail(f"the documented command did not finish within {timeout:.0f} s:\n  {line}\n{err}")
        out = (proc.stdout + proc.stderr).strip()
        self.log(f"      exit {proc.returncode} in {time.monotonic() - t0:.1f} s")
        if proc.returncode != 0:
            pytest.fail(
                f"the documented command failed (exit {proc.returncode}):\n  {line}\nrun as:\n  {shell_cmd}\n"
                f"output:\n{out[-4000:]}"
            )
        return out


# ------------------------------------------------------------------------------------------ static checks


def test_the_install_blocks_are_plain_one_command_lines() -> None:
    blocks = install_blocks(README.read_text())
    assert set(blocks) == {"host", "device"}, blocks
    for name, lines in blocks.items():
        assert lines, name
        for line in lines:
            # One command per line: the test runs (or skips, with a reason) each line on its own.
            assert not re.search(r"&&|\|\||;|(?<![|])\|(?![|])|\bcd\b", line), (name, line)
    device = blocks["device"]
    version = project_version()
    wheel = f"edgefleet-{version}-py3-none-any.whl"
    assert any(wheel in line for line in blocks["host"]), f"the host block does not copy {wheel}"
    assert f'sudo /opt/edgefleet/venv/bin/pip install "/tmp/{wheel}[agent]"' in device
    assert "sudo python3 -m venv /opt/edgefleet/venv" in device
    assert "sudo install -d -m 0750 -o root -g edgefleet /etc/edgefleet" in device
    assert any(line.startswith("sudo install -m 0640 -o root -g edgefleet ") for line in device), device
    assert CHECK_CONFIG in device
    assert device.index(CHECK_CONFIG) < device.index("sudo systemctl enable --now edgefleet-agent")


def test_units_sysusers_and_docs_tell_one_story() -> None:
    agent = unit_service(AGENT_UNIT)
    assert agent["User"] == [SERVICE_USER] and agent["Group"] == [SERVICE_USER]
    assert "video" in agent["SupplementaryGroups"][0].split()
    exec_start = "/opt/edgefleet/venv/bin/edgefleet-agent --config /etc/edgefleet/agent.toml"
    assert agent["ExecStart"] == [exec_start]
    assert agent["ExecStartPre"][0].startswith("/opt/edgefleet/venv/bin/edgefleet-agent ")
    assert agent["StateDirectory"] == ["edgefleet"] and agent["StateDirectoryMode"] == ["0750"]
    assert agent["ConfigurationDirectory"] == ["edgefleet"]
    assert agent["ConfigurationDirectoryMode"] == ["0750"]
    collector = unit_service(COLLECTOR_UNIT)
    assert collector["ExecStart"][0].startswith("/opt/edgefleet/venv/bin/edgefleet ")
    assert SERVICE_USER in collector.get("SupplementaryGroups", [""])[0].split()

    rules = [ln.split() for ln in SYSUSERS.read_text().splitlines() if ln and not ln.startswith("#")]
    user = next(r for r in rules if r[0] == "u")
    assert user[1] == SERVICE_USER and user[2] == "-"
    assert user[-2:] == ["/nonexistent", "/usr/sbin/nologin"], user
    assert ["m", SERVICE_USER, "video"] in rules

    docs = [README, REPO / "docs" / "agent.md", REPO / "docs" / "arm64.md", REPO / "docs" / "operator.md"]
    docs += sorted((REPO / "systemd").iterdir())
    for path in docs:
        text = path.read_text()
        if path == README:
            text = raspberry_pi_section(text)
        for m in re.finditer(r"/opt/edgefleet(?!/venv\b)\S*", text):
            raise AssertionError(f"{path.name}: {m.group(0)} (the venv is /opt/edgefleet/venv)")
        for m in re.finditer(r"useradd [^`\n]*", text):
            assert m.group(0).rstrip(".") == USERADD, f"{path.name}: {m.group(0)!r} differs from {USERADD!r}"
        for m in re.finditer(r"install -d[^`\n]*/etc/edgefleet\b", text):
            assert "-m 0750" in m.group(0) and "-g edgefleet" in m.group(0), f"{path.name}: {m.group(0)}"
        for m in re.finditer(r"pip install [^`\n]*", text):
            assert "/opt/edgefleet/bin/" not in m.group(0), f"{path.name}: {m.group(0)}"


def test_docs_name_no_issue_number_or_machine_path() -> None:
    bad = re.compile(r"\bissue\s*#?\s*\d+|closing report|/work/|/root/", re.IGNORECASE)
    paths = [p for p in (REPO / "docs").rglob("*") if p.is_file() and p.suffix in (".md", ".py", ".json")]
    paths += [*sorted((REPO / "systemd").iterdir()), README]
    for path in paths:
        for n, line in enumerate(path.read_text().splitlines(), 1):
            assert not bad.search(line), f"{path.relative_to(REPO)}:{n}: {line.strip()}"


def install_options(command: str) -> dict:
    """``install`` options of one command: {"-m": "0640", "-o": …, "-g": …, "-d": True, "args": [...]}."""
    words = shlex.split(command, comments=True)
    words = words[words.index("install") + 1 :]
    out: dict = {"args": []}
    i = 0
    while i < len(words):
        w = words[i]
        if w in ("-m", "-o", "-g"):
            out[w] = words[i + 1]
            i += 2
            continue
        if w.startswith("-"):
            out[w] = True
        else:
            out["args"].append(w)
        i += 1
    return out


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze is not installed")
def test_systemd_analyze_verify_accepts_the_units(tmp_path: Path) -> None:
    """`systemd-analyze verify` on copies whose ExecStart paths point at stand-ins under tmp_path."""
    units = []
    for unit in (AGENT_UNIT, COLLECTOR_UNIT):
        text = unit.read_text()
        for exe in sorted(set(re.findall(r"/opt/edgefleet/venv/bin/[\w.-]+", text))):
            stub = tmp_path / exe.lstrip("/")
            stub.parent.mkdir(parents=True, exist_ok=True)
            stub.write_text("#!/bin/sh\nexit 0\n")
            stub.chmod(0o755)
        copy = tmp_path / unit.name
        copy.write_text(text.replace("/opt/edgefleet/venv/bin/", f"{tmp_path}/opt/edgefleet/venv/bin/"))
        units.append(str(copy))
    proc = subprocess.run(
        ["systemd-analyze", "verify", *units], capture_output=True, text=True, timeout=60, check=False
    )
    out = (proc.stdout + proc.stderr).strip()
    assert proc.returncode == 0 and not out, out


# ------------------------------------------------------------------------------------------ the real thing


@dataclass
class Install:
    """The README's install steps, done: the device root, the host's repository copy and the broker."""

    root: Path
    host: Path
    port: int
    work: Path
    runner: Runner
    host_env: dict[str, str]
    device_env: dict[str, str]
    builder: subprocess.Popen[bytes]

    @property
    def broker_dir(self) -> Path:
        return self.host / "broker"

    def broker_args(self) -> list[str]:
        """The controller's broker settings, as the README's host steps use them."""
        return ["--config", str(self.broker_dir / "controller" / "host.toml")]


def run_device_lines(inst: Install, root: Path, lines: list[str]) -> None:
    cwd = root / "home/pi"
    for line in lines:
        for part in device_parts(line):
            if part.startswith("cd "):
                cwd = Path(reroot(shlex.split(part)[1], root))
                inst.runner.log(f"CD    {part}")
                continue
            cmd, why = device_command(part, root)
            if cmd is None:
                inst.runner.skip(part, why)
                continue
            out = inst.runner.run(part, cmd, cwd, inst.device_env)
            if "--check-config" in part:
                inst.runner.log(f"      {out}")
                assert f": OK (device {DEVICE}" in out, out


def check_sysusers_result(root: Path) -> None:
    """The user and group ``systemd-sysusers --root=ROOT`` wrote: system ids, no home, nologin, video."""
    assert (root / "etc/passwd").exists(), "the device steps created no user (no systemd-sysusers run)"
    users = {ln.split(":")[0]: ln.split(":") for ln in (root / "etc/passwd").read_text().splitlines()}
    groups = {ln.split(":")[0]: ln.split(":") for ln in (root / "etc/group").read_text().splitlines()}
    _, _, uid, gid, _, home, shell = users[SERVICE_USER]
    assert (home, shell) == ("/nonexistent", "/usr/sbin/nologin"), users[SERVICE_USER]
    assert int(uid) < 1000, f"not a system user: {users[SERVICE_USER]}"
    assert groups[SERVICE_USER][2] == gid, (users[SERVICE_USER], groups[SERVICE_USER])
    assert SERVICE_USER in groups["video"][3].split(","), groups["video"]


def check_etc(root: Path) -> None:
    etc = root / "etc/edgefleet"
    assert (etc.stat().st_mode & 0o777) == 0o750, oct(etc.stat().st_mode)
    for f in etc.iterdir():
        assert (f.stat().st_mode & 0o777) == 0o640, (f, oct(f.stat().st_mode))
    if IS_ROOT:
        gid = grp.getgrnam(STAND_IN_GROUP).gr_gid
        assert etc.stat().st_uid == 0 and etc.stat().st_gid == gid
        assert all(f.stat().st_uid == 0 and f.stat().st_gid == gid for f in etc.iterdir())


@pytest.fixture(scope="module")
def install(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Install]:
    """Host block, then (against a running broker) device block of the README; one device venv."""
    if find_mosquitto() is None:
        pytest.skip("mosquitto is not installed")
    if not Path("/usr/bin/python3").exists():
        pytest.skip("no /usr/bin/python3 (what `sudo python3` runs on a device) for the device venv")
    work = Path(tempfile.mkdtemp(prefix="edgefleet-install-"))
    work.chmod(0o755)
    root = make_root(work)
    port = free_port()
    host = copy_repo(tmp_path_factory.mktemp("host") / "edgefleet")
    host_env = dict(os.environ, EDGEFLEET_HOME=str(work / "keys"), PIP_DISABLE_PIP_VERSION_CHECK="1")
    for var in ("EDGEFLEET_HOST_CONFIG", "VIRTUAL_ENV"):
        host_env.pop(var, None)
    device_env = {
        "PATH": SECURE_PATH,
        "HOME": os.environ.get("HOME", "/root"),  # pip's cache
        "LANG": "C.UTF-8",
        "PIP_DISABLE_PIP_VERSION_CHECK": "1",
    }
    edgefleet = str(REPO / ".venv" / "bin" / "edgefleet")
    # A small bundle to publish, built while the device installs (the demo recipe's float32 on digits).
    build_log = (work / "compress.log").open("wb")
    builder = subprocess.Popen(
        [edgefleet, "compress", "--demo", "--recipe", "demo", "--epochs", "1", "--variants", "float32",
         "--out", str(work / "bundle")],
        cwd=work, env=host_env, stdout=build_log, stderr=subprocess.STDOUT,
    )  # fmt: skip
    inst = Install(root, host, port, work, Runner(root, port), host_env, device_env, builder)
    broker = None
    try:
        # The operator's one-time steps (docs/operator.md): the signing key and the broker configuration.
        subprocess.run([edgefleet, "keys", "init"], env=host_env, check=True, capture_output=True, timeout=60)
        state = work / "mosquitto"
        state.mkdir()
        spec = BrokerSpec(
            install_dir=inst.broker_dir,
            port=port,
            bind="127.0.0.1",
            tls=True,
            state_dir=state,
            log_dest=f"file {state / 'mosquitto.log'}",
            extra=["user root"] if IS_ROOT else [],
        )
        write_broker_config(inst.broker_dir, spec, devices=[], server_names=["127.0.0.1"])

        blocks = install_blocks(README.read_text())
        inst.runner.log("== host (README install-steps: host)")
        for line in blocks["host"]:
            inst.runner.run(line, host_command(line, root, port), host, host_env)
            agent_toml = host / "provision" / DEVICE / "agent.toml"
            if agent_toml.exists():  # its absolute paths (/etc/edgefleet, /var/lib/edgefleet) go to ROOT
                agent_toml.write_text(reroot(agent_toml.read_text(), root))

        # Started after provisioning, so it reads the password file with the device in it.
        broker = MosquittoBroker(
            port=port, state_dir=state, config=(inst.broker_dir / "mosquitto.conf").read_text()
        )
        broker.start()
        inst.runner.log("== device (README install-steps: device)")
        run_device_lines(inst, root, blocks["device"])
        yield inst
    finally:
        if broker is not None:
            broker.stop()
        if builder.poll() is None:
            builder.send_signal(signal.SIGTERM)
            builder.wait(timeout=30)
        build_log.close()
        shutil.rmtree(work, ignore_errors=True)


def start_unit(root: Path, log: Path) -> tuple[subprocess.Popen[bytes], socket.socket]:
    """ExecStartPre= then ExecStart= of the installed unit, the way systemd runs them."""
    unit = unit_service(root / "etc/systemd/system/edgefleet-agent.service")
    assert unit["User"] == [SERVICE_USER] and unit["Group"] == [SERVICE_USER]
    user = STAND_IN_USER if IS_ROOT else None
    group = STAND_IN_GROUP if IS_ROOT else None
    extra = unit.get("SupplementaryGroups", [""])[0].split() if IS_ROOT else None
    umask = int(unit["UMask"][0], 8)
    state = root / "var/lib" / unit["StateDirectory"][0]
    state.mkdir(exist_ok=True)
    state.chmod(int(unit["StateDirectoryMode"][0], 8))
    if IS_ROOT:
        assert user is not None and group is not None
        os.chown(state, pwd.getpwnam(user).pw_uid, grp.getgrnam(group).gr_gid)
    conf_dir = root / "etc" / unit["ConfigurationDirectory"][0]
    assert (conf_dir.stat().st_mode & 0o777) == int(unit["ConfigurationDirectoryMode"][0], 8)
    cwd = Path(reroot(unit["WorkingDirectory"][0], root))

    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    notify_path = root / "run" / "notify"
    notify.bind(str(notify_path))
    notify_path.chmod(0o666)
    notify.settimeout(0.5)
    account = pwd.getpwnam(user) if user else pwd.getpwuid(os.geteuid())
    env = {
        "PATH": SECURE_PATH,
        "HOME": account.pw_dir,
        "USER": account.pw_name,
        "LOGNAME": account.pw_name,
        "SHELL": account.pw_shell,
        "NOTIFY_SOCKET": str(notify_path),
        "WATCHDOG_USEC": str(int(unit["WatchdogSec"][0]) * 1_000_000),
        **unit_environment(unit.get("Environment", [])),
    }
    as_service: dict = {"user": user, "group": group, "extra_groups": extra, "umask": umask}
    pre = shlex.split(reroot(unit["ExecStartPre"][0], root))
    done = subprocess.run(
        pre, cwd=cwd, env=env, capture_output=True, text=True, timeout=60, check=False, **as_service
    )
    print(f"ExecStartPre: exit {done.returncode}: {(done.stdout + done.stderr).strip()}", flush=True)
    assert done.returncode == 0, f"ExecStartPre= failed: {done.stdout}{done.stderr}"
    assert "warning:" not in done.stderr, done.stderr
    argv = shlex.split(reroot(unit["ExecStart"][0], root))
    with log.open("wb") as fh:
        proc = subprocess.Popen(
            argv, cwd=cwd, env=env, stdin=subprocess.DEVNULL, stdout=fh, stderr=fh, **as_service
        )
    return proc, notify


def wait_ready(notify: socket.socket, proc: subprocess.Popen[bytes], log: Path, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"the agent exited with code {proc.returncode}:\n{log.read_text()[-3000:]}")
        with contextlib.suppress(TimeoutError):
            if b"READY=1" in notify.recv(4096).split(b"\n"):
                return
    pytest.fail(f"no READY=1 on NOTIFY_SOCKET within {timeout:.0f} s:\n{log.read_text()[-3000:]}")


@dataclass
class Reports:
    """The controller's view of the device: its status and reports (TLS, user edgefleet-controller)."""

    inst: Install
    got: dict[str, list[dict]] = field(default_factory=dict)
    cond: threading.Condition = field(default_factory=threading.Condition)

    def __post_init__(self) -> None:
        self.client = paho.Client(
            CallbackAPIVersion.VERSION2, client_id="install-docs-test", protocol=paho.MQTTv5
        )
        creds = self.inst.broker_dir / "credentials" / "edgefleet-controller.password"
        self.client.username_pw_set("edgefleet-controller", creds.read_text().strip())
        self.client.tls_set(ca_certs=str(self.inst.broker_dir / "ca.crt"))
        self.client.on_message = self._on_message
        self.client.on_connect = lambda c, *_: c.subscribe(f"edgefleet/devices/{DEVICE}/#", 1)
        self.client.connect("127.0.0.1", self.inst.port)
        self.client.loop_start()

    def _on_message(self, _c: object, _u: object, msg: paho.MQTTMessage) -> None:
        kind = msg.topic.split("/")[3]
        with contextlib.suppress(ValueError), self.cond:
            self.got.setdefault(kind, []).append(json.loads(msg.payload))
            self.cond.notify_all()

    def wait(
        self, kind: str, pred: Callable[[dict], bool], timeout: float, agent: subprocess.Popen[bytes]
    ) -> dict:
        deadline = time.monotonic() + timeout
        with self.cond:
            while True:
                for obj in self.got.get(kind, []):
                    if pred(obj):
                        return obj
                if agent.poll() is not None:
                    pytest.fail(f"the agent exited with code {agent.returncode} while waiting for its {kind}")
                left = deadline - time.monotonic()
                if left <= 0:
                    pytest.fail(f"no {kind} from {DEVICE} within {timeout:.0f} s; got {list(self.got)}")
                self.cond.wait(min(left, 0.5))

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


@pytest.mark.integration
@pytest.mark.slow
@pytest.mark.timeout(420)
def test_readme_install_steps_bring_up_a_reporting_device(install: Install) -> None:
    root = install.root
    check_etc(root)
    if IS_ROOT:
        check_sysusers_result(root)

    install.runner.log("== systemd (the installed unit's ExecStartPre= and ExecStart=)")
    log = install.work / "agent.log"
    agent, notify = start_unit(root, log)
    reports = Reports(install)
    try:
        wait_ready(notify, agent, log, timeout=60)
        reports.wait("status", lambda s: s.get("online") is True, 30, agent)
        assert install.builder.wait(timeout=120) == 0, (install.work / "compress.log").read_text()[-3000:]
        edgefleet = str(REPO / ".venv" / "bin" / "edgefleet")
        pub = subprocess.run(
            [edgefleet, "publish", str(install.work / "bundle"), *install.broker_args()],
            env=install.host_env, capture_output=True, text=True, timeout=120, check=False,
        )  # fmt: skip
        assert pub.returncode == 0, pub.stdout + pub.stderr
        report = reports.wait("reports", lambda r: r.get("model") == MODEL, 120, agent)
        install.runner.log(f"      report: {json.dumps(report)[:300]}")
        assert [r for r in report["results"] if r.get("ok")], f"no variant benchmarked: {report['results']}"
        # "on the host, `edgefleet fleet --from-broker --config broker/controller/host.toml` lists the device"
        fleet = subprocess.run(
            [edgefleet, "fleet", "--from-broker", *install.broker_args(), "--json"],
            cwd=install.host, env=install.host_env, capture_output=True, text=True, timeout=60, check=False,
        )  # fmt: skip
        assert fleet.returncode == 0 and DEVICE in fleet.stdout, fleet.stdout + fleet.stderr
    finally:
        reports.close()
        if agent.poll() is None:
            agent.send_signal(signal.SIGTERM)  # by PID, as systemctl stop would
        try:
            code = agent.wait(timeout=30)
        except subprocess.TimeoutExpired:
            agent.kill()
            agent.wait(timeout=10)
            raise
        finally:
            notify.close()
    assert code == 0, f"the agent exited {code} on SIGTERM:\n{log.read_text()[-3000:]}"
    store = root / "var/lib/edgefleet"
    assert (store / "state.json").exists(), sorted(p.name for p in store.iterdir())
    if IS_ROOT:
        uid = pwd.getpwnam(STAND_IN_USER).pw_uid
        assert all(p.stat().st_uid == uid for p in store.rglob("*")), "store files not owned by edgefleet"


@pytest.mark.integration
@pytest.mark.slow
def test_provision_install_md_commands_work(install: Install) -> None:
    """The device block of the bundle's INSTALL.md, in a second root that shares the first one's venv."""
    text = (install.host / "provision" / DEVICE / "INSTALL.md").read_text()
    blocks = [b for b in re.findall(r"```sh\n(.*?)```", text, re.DOTALL) if "systemctl" in b]
    assert len(blocks) == 1, text
    lines = [ln.strip() for ln in blocks[0].splitlines() if ln.strip() and not ln.strip().startswith("#")]
    root = make_root(install.work)
    (root / "opt/edgefleet").symlink_to(install.root / "opt/edgefleet")  # one device venv per session
    for f in (install.root / "tmp").iterdir():  # what the host copied to the device
        (shutil.copytree if f.is_dir() else shutil.copy2)(f, root / "tmp" / f.name)
    agent_toml = root / "tmp" / DEVICE / "agent.toml"  # re-rooted for the first root: now for this one
    agent_toml.write_text(agent_toml.read_text().replace(str(install.root), str(root)))
    install.runner.log("== device (the bundle's INSTALL.md)")
    run_device_lines(install, root, lines)
    check_etc(root)


def test_provision_install_md_tells_the_same_story(tmp_path: Path) -> None:
    """The INSTALL.md that `edgefleet provision` writes agrees with the README on paths, user and modes."""
    from deploy.broker.provision import ProvisionRequest, provision
    from deploy.keys import init_keys

    keys = init_keys(tmp_path / "keys")
    bundle = provision(
        ProvisionRequest(
            device=DEVICE, out=tmp_path / DEVICE, broker_host="broker.lan", public_key=keys.public_path
        )
    )
    text = (bundle.out / "INSTALL.md").read_text()
    commands = "\n".join(re.findall(r"```sh\n(.*?)```", text, re.DOTALL))
    installs = [install_options(c) for c in re.split(r"\n|&&", commands) if "install" in c.split()[:2]]
    assert "/opt/edgefleet/venv/bin/pip install" in commands, commands
    assert not re.search(r"/opt/edgefleet(?!/venv)", commands), commands
    etc_dir = [o for o in installs if "-d" in o and o["args"] == ["/etc/edgefleet"]]
    assert etc_dir and etc_dir[0]["-m"] == "0750" and etc_dir[0]["-o"] == "root", installs
    assert etc_dir[0]["-g"] == SERVICE_USER, installs
    files = [o for o in installs if "-d" not in o and o["args"][-1:] == ["/etc/edgefleet/"]]
    assert files and files[0]["-m"] == "0640" and files[0]["-g"] == SERVICE_USER, installs
    assert "systemd-sysusers" in commands or USERADD in commands, commands
    check = re.search(r"^.*--check-config.*$", commands, re.MULTILINE)
    assert check and check.group(0).startswith("sudo -u edgefleet /opt/edgefleet/venv/bin/edgefleet-agent"), (
        f"INSTALL.md should run --check-config as the service user: {check and check.group(0)}"
    )
    assert ".whl" in text, "INSTALL.md should install the wheel the host built (or say when the index has it)"
