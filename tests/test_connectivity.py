"""Connection failures named by their cause (agent.connectivity), against real sockets and a real mosquitto.

Each cause is produced for real on loopback: refused (a free port nobody listens on), unknown host (a name
under the reserved ``.invalid`` TLD), TLS expected (plain client at the TLS listener), TLS not offered (TLS
client at a plain listener), TLS handshake failed (wrong CA), not authorized (bad password), timeout (a
socket that accepts and never answers). Checked three ways: the classifier, a host command (MqttSession and
the ``edgefleet`` CLI: message and speed), and the agent's rate-limited offline log lines.
"""

from __future__ import annotations

import base64
import dataclasses
import itertools
import os
import re
import socket
import ssl
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from broker_helpers import generated_tls_broker
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from agent.connectivity import (
    Cause,
    Diagnosis,
    OfflineLog,
    TlsProblem,
    classify_connack,
    classify_error,
    diagnose,
    duration,
    tls_context,
)
from deploy.broker.client import BrokerOptions, MqttSession
from deploy.broker.conf import create_ca
from deploy.broker.spawn import MosquittoBroker, find_mosquitto, free_port
from deploy.errors import BrokerError

ROOT = Path(__file__).resolve().parent.parent
LOOP = "127.0.0.1"
UNKNOWN = "edgefleet-broker.invalid"  # RFC 6761: never resolves, no network needed

needs_mosquitto = pytest.mark.skipif(find_mosquitto() is None, reason="mosquitto is not installed")


@dataclasses.dataclass
class TlsBroker:
    broker: MosquittoBroker
    dir: Path
    ca: Path
    wrong_ca: Path
    user: str
    password: str

    @property
    def port(self) -> int:
        return self.broker.port


@pytest.fixture(scope="module")
def tls_broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TlsBroker]:
    """A TLS listener with password auth (the generated production config), on a free loopback port."""
    if find_mosquitto() is None:
        pytest.skip("mosquitto is not installed")
    tmp = tmp_path_factory.mktemp("conn")
    wrong = tmp / "other-ca.crt"
    wrong.write_bytes(create_ca("some other CA").cert_pem())
    with generated_tls_broker(tmp, ["pi-a"]) as (b, out, _):
        password = (out / "credentials" / "pi-a.password").read_text().strip()
        yield TlsBroker(b, out, out / "ca.crt", wrong, "pi-a", password)


@pytest.fixture(scope="module")
def plain_broker() -> Iterator[MosquittoBroker]:
    if find_mosquitto() is None:
        pytest.skip("mosquitto is not installed")
    with MosquittoBroker() as b:
        yield b


@pytest.fixture
def silent_port() -> Iterator[int]:
    """A loopback socket that accepts connections (kernel backlog) and never reads or answers."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as srv:
        srv.bind((LOOP, 0))
        srv.listen(16)
        yield int(srv.getsockname()[1])


# ------------------------------------------------------------------------------------------ classifier


def _raised(fn: object) -> BaseException:
    try:
        fn()  # type: ignore[operator]
    except BaseException as err:
        return err
    raise AssertionError("no exception")


def test_classify_real_socket_errors() -> None:
    port = free_port()
    err = _raised(lambda: socket.create_connection((LOOP, port), timeout=2))
    d = classify_error(err, LOOP, port, tls=False)
    assert d.cause is Cause.REFUSED and f"{LOOP}:{port}" in d.describe("agent")

    err = _raised(lambda: socket.create_connection((UNKNOWN, 1883), timeout=2))
    d = classify_error(err, UNKNOWN, 1883, tls=False)
    assert d.cause is Cause.UNKNOWN_HOST and UNKNOWN in d.detail
    assert "mqtt.host" in d.advice("agent") and "--host" in d.advice("host")


def test_diagnose_refused_and_unknown_host_fail_at_once() -> None:
    t0 = time.monotonic()
    refused = diagnose(LOOP, free_port())
    unknown = diagnose(UNKNOWN, 1883)
    assert time.monotonic() - t0 < 2
    assert refused is not None and refused.cause is Cause.REFUSED
    assert unknown is not None and unknown.cause is Cause.UNKNOWN_HOST


@needs_mosquitto
def test_diagnose_tls_expected(tls_broker: TlsBroker) -> None:
    d = diagnose(LOOP, tls_broker.port)
    assert d is not None and d.cause is Cause.TLS_EXPECTED, d
    assert "--tls-ca" in d.advice("host") and "ca_file" in d.advice("agent")


@needs_mosquitto
def test_diagnose_tls_handshake_failed_with_the_wrong_ca(tls_broker: TlsBroker) -> None:
    d = diagnose(LOOP, tls_broker.port, context=tls_context(tls_broker.wrong_ca))
    assert d is not None and d.cause is Cause.TLS_FAILED and d.tls is TlsProblem.VERIFY, d
    assert "certificate verify failed" in d.detail and "mqtt.tls.ca_file" in d.advice("agent")
    # the real handshake error, classified directly
    with socket.create_connection((LOOP, tls_broker.port), timeout=3) as raw:
        err = _raised(lambda: tls_context(tls_broker.wrong_ca).wrap_socket(raw, server_hostname=LOOP))
    assert isinstance(err, ssl.SSLCertVerificationError)
    assert classify_error(err, LOOP, tls_broker.port, tls=True).tls is TlsProblem.VERIFY


@needs_mosquitto
def test_diagnose_tls_client_at_a_plain_port(plain_broker: MosquittoBroker, tls_broker: TlsBroker) -> None:
    d = diagnose(LOOP, plain_broker.port, context=tls_context(tls_broker.ca))
    assert d is not None and d.cause is Cause.TLS_NOT_OFFERED, d


@needs_mosquitto
def test_diagnose_finds_nothing_wrong_with_working_ports(
    plain_broker: MosquittoBroker, tls_broker: TlsBroker
) -> None:
    assert diagnose(LOOP, plain_broker.port) is None
    assert diagnose(LOOP, tls_broker.port, context=tls_context(tls_broker.ca)) is None


def test_diagnose_timeout_on_a_port_that_never_answers(silent_port: int) -> None:
    t0 = time.monotonic()
    d = diagnose(LOOP, silent_port, timeout=1.0)
    assert d is not None and d.cause is Cause.TIMEOUT, d
    assert time.monotonic() - t0 < 3


def test_classify_connack_codes() -> None:
    for code in (0x04, 0x05, 0x86, 0x87):
        d = classify_connack(code, LOOP, 1883)
        assert d is not None and d.cause is Cause.NOT_AUTHORIZED
    assert classify_connack(0, LOOP, 1883) is None
    other = classify_connack(0x88, LOOP, 1883)
    assert other is not None and other.cause is Cause.OTHER and "server unavailable" in other.detail


# ------------------------------------------------------------------------------------------ host command


def _session_error(**kw: object) -> tuple[str, float]:
    opts = BrokerOptions(**{"host": LOOP, "connect_timeout_s": 3.0, **kw})  # type: ignore[arg-type]
    t0 = time.monotonic()
    with pytest.raises(BrokerError) as info:
        MqttSession(opts).connect()
    return str(info.value), time.monotonic() - t0


def test_host_refused_and_unknown_host_fail_immediately() -> None:
    port = free_port()
    msg, took = _session_error(port=port, connect_timeout_s=10.0)
    assert f"cannot connect to {LOOP}:{port}: connection refused" in msg and took < 1.0
    msg, took = _session_error(host=UNKNOWN, port=1883, connect_timeout_s=10.0)
    assert "unknown host" in msg and "--host" in msg and took < 2.0


@needs_mosquitto
def test_host_plain_client_at_tls_port(tls_broker: TlsBroker) -> None:
    msg, took = _session_error(
        port=tls_broker.port, username=tls_broker.user, password=tls_broker.password, connect_timeout_s=10.0
    )
    assert "TLS expected" in msg and "--tls-ca" in msg, msg
    assert took < 3.0


@needs_mosquitto
def test_host_wrong_ca_and_bad_password(tls_broker: TlsBroker) -> None:
    msg, took = _session_error(
        port=tls_broker.port,
        username=tls_broker.user,
        password=tls_broker.password,
        tls_ca=tls_broker.wrong_ca,
    )
    assert "TLS handshake failed" in msg and "certificate verify failed" in msg and took < 2.0, msg
    msg, took = _session_error(
        port=tls_broker.port, username=tls_broker.user, password="not-the-password", tls_ca=tls_broker.ca
    )
    assert "not authorized" in msg and "--password-file" in msg and took < 2.0, msg
    # and with everything right, it connects
    ok = BrokerOptions(
        host=LOOP,
        port=tls_broker.port,
        username=tls_broker.user,
        password=tls_broker.password,
        tls_ca=tls_broker.ca,
    )
    MqttSession(ok).connect().close()


def test_host_timeout_names_the_cause(silent_port: int) -> None:
    msg, took = _session_error(port=silent_port, connect_timeout_s=3.0)
    assert "timeout" in msg and "no answer (CONNACK) within 3 s" in msg, msg
    assert took < 5.0


def _edgefleet(*args: str) -> tuple[subprocess.CompletedProcess[str], float]:
    t0 = time.monotonic()
    proc = subprocess.run(
        [sys.executable, "-m", "deploy", *args],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
        check=False,
    )
    return proc, time.monotonic() - t0


@needs_mosquitto
def test_cli_names_tls_expected_quickly(tls_broker: TlsBroker) -> None:
    proc, took = _edgefleet("fleet", "--from-broker", "--host", LOOP, "--port", str(tls_broker.port))
    assert proc.returncode != 0
    assert "TLS expected" in proc.stderr and "--tls-ca" in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr and took < 5.0 + 3.0  # the interpreter's start-up included


def test_cli_refused_fails_immediately() -> None:
    port = free_port()
    proc, took = _edgefleet("fleet", "--from-broker", "--host", LOOP, "--port", str(port))
    assert proc.returncode != 0 and "connection refused" in proc.stderr, proc.stderr
    assert took < 5.0 + 3.0


# ------------------------------------------------------------------------------------------ offline log


class Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


def test_offline_log_rate_limits_and_logs_every_cause_change() -> None:
    clock = Clock()
    log = OfflineLog(LOOP, 1883, first=3, every_s=30.0, clock=clock)
    refused = Diagnosis(Cause.REFUSED, LOOP, 1883, "nothing listens")
    lines = []
    for _ in range(10):  # 10 attempts, 5 s apart: the first 3, then one 30 s after the last line
        lines.append(log.failed(refused, 5))
        clock.t += 5
    logged = [line for line in lines if line]
    assert len(logged) == 4 and lines[:3] == logged[:3] and lines[8] is not None
    assert "retrying in 5 s (attempt 1, offline 0 s)" in logged[0]
    assert "attempt 9, offline 40 s" in logged[3]
    # a new cause is always logged, even inside the interval
    line = log.failed(Diagnosis(Cause.TLS_EXPECTED, LOOP, 1883), 5)
    assert line is not None and "TLS expected" in line
    clock.t += 1
    assert log.failed(Diagnosis(Cause.TLS_EXPECTED, LOOP, 1883), 5) is None
    clock.t += 14
    back = log.connected()
    assert back == f"connected to {LOOP}:1883 after 1 min 05 s offline (12 failed attempts)"
    assert log.connected() is None  # nothing to report when we were never offline
    assert duration(7322) == "2 h 02 min"


# ------------------------------------------------------------------------------------------ the agent


def _write_agent_config(tmp_path: Path, port: int, extra: str = "") -> Path:
    raw = (
        Ed25519PrivateKey.generate()
        .public_key()
        .public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    )
    cfg = tmp_path / "agent.toml"
    cfg.write_text(
        f"""
[device]
id = "pi-offline"
[mqtt]
host = "{LOOP}"
port = {port}
reconnect_min_s = 1
reconnect_max_s = 1
connect_timeout_s = 2
{extra}
[trust]
public_keys = ["{base64.b64encode(raw).decode()}"]
[store]
path = "{tmp_path / "store"}"
min_free_mb = 1
""",
        encoding="utf-8",
    )
    return cfg


def _start_agent(cfg: Path, log: Path) -> subprocess.Popen[bytes]:
    with log.open("ab") as fh:
        return subprocess.Popen(
            [sys.executable, "-m", "agent", "--config", str(cfg)],
            stderr=fh,
            cwd=ROOT,
            env=dict(os.environ, PYTHONUNBUFFERED="1"),
        )


def _stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.terminate()
    try:
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=10)


def _wait_for(path: Path, pattern: str, timeout: float) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        text = path.read_text(errors="replace") if path.exists() else ""
        if re.search(pattern, text):
            return text
        time.sleep(0.2)
    raise AssertionError(f"{pattern!r} not logged within {timeout} s:\n{text[-3000:]}")


_STAMP = re.compile(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}) ")


def _seconds(line: str) -> float:
    m = _STAMP.match(line)
    assert m, line
    h, mi, rest = m.group(1)[11:].split(":")
    return int(h) * 3600 + int(mi) * 60 + float(rest.replace(",", "."))


@needs_mosquitto
def test_agent_offline_lines_name_the_cause_are_rate_limited_and_end_when_back(tmp_path: Path) -> None:
    port = free_port()
    cfg, log = _write_agent_config(tmp_path, port), tmp_path / "agent.log"
    proc = _start_agent(cfg, log)
    try:
        _wait_for(log, r"attempt 3,", 20)
        time.sleep(4)  # ~4 more attempts (1 s apart), inside the 30 s interval: not logged
        with MosquittoBroker(port=port):
            text = _wait_for(log, rf"connected to {LOOP}:{port} after .* offline", 15)
    finally:
        _stop(proc)
    lines = [ln for ln in text.splitlines() if f"cannot connect to {LOOP}:{port}" in ln]
    assert len(lines) == 3, "\n".join(lines)
    for i, line in enumerate(lines, 1):
        assert "WARNING agent.mqtt" in line and "connection refused" in line and "mqtt.port" in line
        assert f"(attempt {i}, offline" in line
    # the announced delay is what paho really waits (1 + 1 s after the first attempt, then 1 s)
    announced = [float(re.search(r"retrying in (\d+) s", ln).group(1)) for ln in lines]  # type: ignore[union-attr]
    assert announced == [2, 1, 1]
    gaps = [_seconds(b) - _seconds(a) for a, b in itertools.pairwise(lines)]
    assert all(abs(g - a) < 0.7 for g, a in zip(gaps, announced, strict=False)), (gaps, announced)
    back = re.search(r"connected to .* offline \((\d+) failed attempts\)", text)
    assert back is not None and int(back.group(1)) > 3  # attempts happened that were not logged
    assert "no connection to" in text and "(connection refused" in text  # the daemon's own line names it


@needs_mosquitto
def test_agent_offline_line_says_tls_expected(tmp_path: Path, tls_broker: TlsBroker) -> None:
    cfg, log = _write_agent_config(tmp_path, tls_broker.port), tmp_path / "agent.log"
    proc = _start_agent(cfg, log)
    try:
        text = _wait_for(log, r"cannot connect to .*: TLS expected", 20)
    finally:
        _stop(proc)
    line = next(ln for ln in text.splitlines() if "TLS expected" in ln)
    assert f"{LOOP}:{tls_broker.port}" in line and "[mqtt.tls]" in line and "retrying in" in line
