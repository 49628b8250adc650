"""Why a connection to the broker failed, in words an operator can act on.

Shared by the agent (one log line per reconnect step, ``--check-config --connect``) and the host commands
(``deploy.broker.client``; deploy may import agent, never the other way round).

* :func:`classify_error` maps the exception of a connect attempt (DNS, TCP, TLS handshake) to a
  :class:`Cause`; :func:`classify_connack` maps a refused CONNACK.
* Some symptoms are ambiguous: a connection closed before any CONNACK is what a TLS listener does to a
  plain MQTT client (mosquitto resets it at once), and a reset during a TLS handshake is what a plain
  listener does to a TLS client. :func:`diagnose` then probes ``host:port`` itself, each step bounded by a
  timeout: a plain MQTT CONNECT (a CONNACK, a TLS record, a close or silence), and if the port closed on
  it, a TLS ClientHello without verification (does the port speak TLS at all?).
* :class:`OfflineLog` decides which failed attempts deserve a log line (the first few, every change of
  cause, else one per interval) and words the line, and the one when the connection is back.
"""

from __future__ import annotations

import contextlib
import errno
import secrets
import socket
import ssl
import time
from collections.abc import Callable
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import Literal

Flavor = Literal["agent", "host"]
"""Who reads the advice: the agent (config keys) or a host command (command-line flags)."""

PROBE_TIMEOUT_S = 2.0


class Cause(StrEnum):
    UNKNOWN_HOST = "unknown host"
    REFUSED = "connection refused"
    UNREACHABLE = "network unreachable"
    TIMEOUT = "timeout"
    TLS_EXPECTED = "TLS expected"
    TLS_NOT_OFFERED = "no TLS on this port"
    TLS_FAILED = "TLS handshake failed"
    NOT_AUTHORIZED = "not authorized"
    CLOSED = "connection closed"
    OTHER = "other"


class TlsProblem(StrEnum):
    """Which part of a failed TLS handshake (picks the advice)."""

    NONE = ""
    VERIFY = "verify"  # the broker's certificate does not chain to our CA
    HOSTNAME = "hostname"  # it does, but not for the name we connected to
    CLIENT_CERT = "client-cert"  # the broker refused our client certificate (or wanted one)
    PROTOCOL = "protocol"


# OpenSSL reasons when a TLS client talks to something that answers, but not in TLS.
_NOT_TLS_REASONS = frozenset(
    {
        "WRONG_VERSION_NUMBER",
        "RECORD_LAYER_FAILURE",
        "PACKET_LENGTH_TOO_LONG",
        "UNKNOWN_PROTOCOL",
        "HTTP_REQUEST",
    }
)
# Alerts a broker sends when it does not accept our client certificate.
_CLIENT_CERT_ALERTS = frozenset(
    {
        "TLSV1_ALERT_UNKNOWN_CA",
        "SSLV3_ALERT_BAD_CERTIFICATE",
        "SSLV3_ALERT_CERTIFICATE_UNKNOWN",
        "SSLV3_ALERT_CERTIFICATE_EXPIRED",
        "SSLV3_ALERT_CERTIFICATE_REVOKED",
        "SSLV3_ALERT_UNSUPPORTED_CERTIFICATE",
        "TLSV13_ALERT_CERTIFICATE_REQUIRED",
        "TLSV1_ALERT_DECRYPT_ERROR",
    }
)
_UNREACHABLE = frozenset({errno.ENETUNREACH, errno.EHOSTUNREACH, errno.ENETDOWN, errno.EHOSTDOWN})
# CONNACK codes retrying cannot fix: v3.1.1 (4, 5) and v5 (0x86, 0x87, 0x8C).
_AUTH_CODES = {
    0x04: "bad user name or password",
    0x05: "not authorized",
    0x86: "bad user name or password",
    0x87: "not authorized",
    0x8C: "bad authentication method",
}
_OTHER_CODES = {
    0x01: "unacceptable protocol version",
    0x02: "client identifier rejected",
    0x03: "server unavailable",
    0x84: "unsupported protocol version",
    0x85: "client identifier not valid",
    0x88: "server unavailable",
    0x89: "server busy",
    0x8A: "banned",
    0x9C: "use another server",
    0x9D: "server moved",
    0x9F: "connection rate exceeded",
}


def address(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


@dataclass(frozen=True, slots=True)
class Diagnosis:
    """One failed connection attempt: the cause, where, and what was seen (``detail``)."""

    cause: Cause
    host: str
    port: int
    detail: str = ""
    tls: TlsProblem = TlsProblem.NONE

    @property
    def address(self) -> str:
        return address(self.host, self.port)

    @property
    def ambiguous(self) -> bool:
        """Closed without an answer: only :func:`diagnose` can tell why."""
        return self.cause is Cause.CLOSED

    def summary(self) -> str:
        """``cause (detail)``, e.g. ``connection refused (nothing listens on 127.0.0.1:1884)``."""
        return f"{self.cause.value} ({self.detail})" if self.detail else self.cause.value

    def advice(self, flavor: Flavor) -> str:
        """What to do about it, naming config keys (agent) or command-line flags (host)."""
        agent = flavor == "agent"
        host_key, port_key = ("mqtt.host", "mqtt.port") if agent else ("--host", "--port")
        match self.cause:
            case Cause.UNKNOWN_HOST:
                return f"check {host_key} and this machine's DNS"
            case Cause.REFUSED:
                return f"is the broker running, and are {host_key}/{port_key} right?"
            case Cause.UNREACHABLE:
                return f"no route to {self.host}: check the network and {host_key}"
            case Cause.TIMEOUT:
                return f"check {host_key}/{port_key} and any firewall between here and the broker"
            case Cause.TLS_EXPECTED:
                if agent:
                    return "the port speaks TLS: add [mqtt.tls] ca_file = the fleet CA, or use the plain port"
                return "the port speaks TLS: add --tls-ca CA.crt (the fleet CA), or use the plain port"
            case Cause.TLS_NOT_OFFERED:
                if agent:
                    return "the port speaks plain MQTT: use the broker's TLS port (8883?) or drop [mqtt.tls]"
                return "the port speaks plain MQTT: use the broker's TLS port (8883?) or drop --tls-ca"
            case Cause.TLS_FAILED:
                return _tls_advice(self.tls, agent)
            case Cause.NOT_AUTHORIZED:
                if agent:
                    return (
                        "check mqtt.username and mqtt.password_file (or mqtt.password, or the client "
                        "certificate) against the broker's password file and ACL"
                    )
                return "check --username and --password-file (or --tls-cert/--tls-key)"
            case Cause.CLOSED:
                return "is this an MQTT broker? its log says why it closed the connection"
            case _:
                return f"check {host_key}/{port_key} and the broker's log"

    def describe(self, flavor: Flavor) -> str:
        """One line: ``cannot connect to HOST:PORT: cause (detail); advice``."""
        return f"cannot connect to {self.address}: {self.summary()}; {self.advice(flavor)}"


def _tls_advice(problem: TlsProblem, agent: bool) -> str:
    if problem is TlsProblem.VERIFY:
        key = "mqtt.tls.ca_file" if agent else "--tls-ca"
        return f"{key} must be the CA that signed the broker's certificate"
    if problem is TlsProblem.HOSTNAME:
        key = "mqtt.host" if agent else "--host"
        extra = " (lab only: mqtt.tls.insecure = true)" if agent else ""
        return f"{key} must be a name in the broker's certificate{extra}"
    if problem is TlsProblem.CLIENT_CERT:
        keys = "mqtt.tls.cert_file/key_file" if agent else "--tls-cert/--tls-key"
        return f"the broker did not accept our client certificate: check {keys} (signed by the broker's CA?)"
    return "check the TLS settings of the broker and of this client"


# ------------------------------------------------------------------------------------------ classifying


def classify_error(err: BaseException, host: str, port: int, *, tls: bool) -> Diagnosis:
    """The cause of an exception raised while connecting (resolve, TCP connect, TLS handshake)."""

    def d(cause: Cause, detail: str = "", problem: TlsProblem = TlsProblem.NONE) -> Diagnosis:
        return Diagnosis(cause, host, port, detail, problem)

    # Order matters: every one of these is an OSError.
    if isinstance(err, socket.gaierror):
        return d(Cause.UNKNOWN_HOST, f"cannot resolve {host!r}: {err.strerror or err}")
    if isinstance(err, ssl.SSLCertVerificationError):
        message = str(err.verify_message or err.reason or err)
        if err.verify_code == 62 or "hostname" in message.lower():  # X509_V_ERR_HOSTNAME_MISMATCH
            return d(Cause.TLS_FAILED, f"hostname mismatch: {message}", TlsProblem.HOSTNAME)
        return d(Cause.TLS_FAILED, f"certificate verify failed: {message}", TlsProblem.VERIFY)
    if isinstance(err, ssl.SSLEOFError | ssl.SSLZeroReturnError):
        return d(Cause.CLOSED, "closed during the TLS handshake")
    if isinstance(err, ssl.SSLError):
        reason = str(err.reason or "")
        if reason in _NOT_TLS_REASONS:
            return d(Cause.TLS_NOT_OFFERED, f"the port answered, but not in TLS ({reason.lower()})")
        if reason in _CLIENT_CERT_ALERTS:
            return d(Cause.TLS_FAILED, f"the broker sent alert {reason.lower()}", TlsProblem.CLIENT_CERT)
        return d(Cause.TLS_FAILED, str(reason.lower() or err), TlsProblem.PROTOCOL)
    if isinstance(err, ConnectionRefusedError):
        return d(Cause.REFUSED, f"nothing listens on {address(host, port)}")
    if isinstance(err, TimeoutError):
        return d(
            Cause.TIMEOUT,
            "no answer to the TCP connect or the TLS handshake" if tls else "no answer to the TCP connect",
        )
    if isinstance(err, ConnectionResetError | ConnectionAbortedError | BrokenPipeError):
        return d(Cause.CLOSED, "reset during the TLS handshake" if tls else "reset by the peer")
    if isinstance(err, OSError) and err.errno in _UNREACHABLE:
        return d(Cause.UNREACHABLE, err.strerror or str(err))
    return d(Cause.OTHER, f"{type(err).__name__}: {err}")


def classify_connack(code: int, host: str, port: int, name: str | None = None) -> Diagnosis | None:
    """The cause of a refused CONNACK (v3.1.1 or v5 reason code); None for success."""
    if code == 0:
        return None
    text = name or _AUTH_CODES.get(code) or _OTHER_CODES.get(code) or f"reason code 0x{code:02x}"
    detail = f"the broker answered CONNACK {text!r} (0x{code:02x})"
    if code in _AUTH_CODES:
        return Diagnosis(Cause.NOT_AUTHORIZED, host, port, detail)
    return Diagnosis(Cause.OTHER, host, port, detail)


def connack_is_fatal(code: int) -> bool:
    """Retrying with the same credentials cannot help."""
    return code in _AUTH_CODES


def close_failed_socket(err: BaseException) -> None:
    """Close the socket a failed TLS handshake left open inside paho.

    paho 2.x wraps the TCP socket, handshakes, and on failure lets the exception out without closing the
    SSL socket; it is only reachable from the traceback's frames (and would be closed late by the
    garbage collector, with a ResourceWarning).
    """
    tb = err.__traceback__
    while tb is not None:
        for value in list(tb.tb_frame.f_locals.values()):
            if isinstance(value, ssl.SSLSocket):
                value.close()
        tb = tb.tb_next


# ------------------------------------------------------------------------------------------ probing


def tls_context(
    ca_file: Path | None = None,
    cert_file: Path | None = None,
    key_file: Path | None = None,
    *,
    insecure: bool = False,
) -> ssl.SSLContext:
    """A client context as paho builds it (CA or the system store, optional client certificate)."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    if cert_file is not None:
        ctx.load_cert_chain(str(cert_file), str(key_file) if key_file else None)
    if ca_file is not None:
        ctx.load_verify_locations(str(ca_file))
    else:
        ctx.load_default_certs()
    ctx.check_hostname = not insecure
    ctx.verify_mode = ssl.CERT_REQUIRED
    return ctx


def _connect_packet() -> bytes:
    """An MQTT 3.1.1 CONNECT (clean session, no credentials) with a throwaway client id."""
    cid = f"edgefleet-probe-{secrets.token_hex(4)}".encode("ascii")
    body = b"\x00\x04MQTT\x04\x02\x00\x0a" + len(cid).to_bytes(2, "big") + cid
    return bytes([0x10, len(body)]) + body


Answer = Literal["mqtt", "tls", "closed", "silent", "other"]


def _mqtt_hello(sock: socket.socket, timeout: float) -> tuple[Answer, bytes]:
    """Send a CONNECT and look at the first bytes of the answer."""
    sock.settimeout(timeout)
    try:
        sock.sendall(_connect_packet())
        head = sock.recv(5)
    except TimeoutError:
        return "silent", b""
    except (ConnectionResetError, ConnectionAbortedError, BrokenPipeError, ssl.SSLEOFError):
        return "closed", b""
    if not head:
        return "closed", b""
    if head[0] == 0x20:
        with contextlib.suppress(OSError):
            sock.sendall(b"\xe0\x00")  # DISCONNECT: leave politely
        return "mqtt", head
    if head[0] in (0x15, 0x16) and len(head) > 1 and head[1] == 0x03:  # TLS alert / handshake record
        return "tls", head
    return "other", head


def speaks_tls(host: str, port: int, timeout: float = PROBE_TIMEOUT_S) -> bool:
    """Does ``host:port`` complete (or answer with an alert) a TLS handshake? No certificate checks."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE  # only asks whether the port speaks TLS; nothing is sent over it
    try:
        with (
            socket.create_connection((host, port), timeout=timeout) as raw,
            ctx.wrap_socket(raw, server_hostname=host),
        ):
            return True
    except ssl.SSLEOFError:
        return False
    except ssl.SSLError as err:
        return str(err.reason or "") not in _NOT_TLS_REASONS  # an alert is TLS too
    except OSError:
        return False


def diagnose(
    host: str,
    port: int,
    *,
    context: ssl.SSLContext | None = None,
    timeout: float = PROBE_TIMEOUT_S,
) -> Diagnosis | None:
    """Probe ``host:port`` as a client with ``context`` (None = plain MQTT) would connect.

    Returns the cause of failure, or None when the port answers MQTT (the transport is fine; what remains
    would be the credentials). Each network step waits at most ``timeout``.
    """
    tls = context is not None
    try:
        raw = socket.create_connection((host, port), timeout=timeout)
    except OSError as err:
        return classify_error(err, host, port, tls=tls)
    with raw:
        if context is None:
            answer, head = _mqtt_hello(raw, timeout)
        else:
            try:
                sock = context.wrap_socket(raw, server_hostname=host)
            except OSError as err:
                found = classify_error(err, host, port, tls=True)
                if found.ambiguous and _plain_answer(host, port, timeout) == "mqtt":
                    return Diagnosis(Cause.TLS_NOT_OFFERED, host, port, "the port answered plain MQTT")
                return found
            with sock:
                # TLS 1.3: a refused client certificate arrives as an alert on the first read
                try:
                    answer, head = _mqtt_hello(sock, timeout)
                except ssl.SSLError as err:
                    return classify_error(err, host, port, tls=True)
    if answer == "mqtt":
        return None
    if answer == "tls":
        return Diagnosis(Cause.TLS_EXPECTED, host, port, "the port answered a plain MQTT CONNECT with TLS")
    if answer == "silent":
        return Diagnosis(Cause.TIMEOUT, host, port, f"connected, but no MQTT answer within {timeout:g} s")
    if answer == "closed":
        if not tls and speaks_tls(host, port, timeout):
            return Diagnosis(
                Cause.TLS_EXPECTED, host, port, "the port closed a plain MQTT connection and accepts TLS"
            )
        return Diagnosis(Cause.CLOSED, host, port, "closed without an MQTT answer")
    return Diagnosis(
        Cause.OTHER, host, port, f"the port answered, but not MQTT (first bytes {head.hex(' ')})"
    )


def _plain_answer(host: str, port: int, timeout: float) -> Answer | None:
    try:
        with socket.create_connection((host, port), timeout=timeout) as raw:
            return _mqtt_hello(raw, timeout)[0]
    except OSError:
        return None


def resolve(found: Diagnosis, context: ssl.SSLContext | None, timeout: float = PROBE_TIMEOUT_S) -> Diagnosis:
    """``found``, or when it is ambiguous (closed without an answer), what :func:`diagnose` finds."""
    if not found.ambiguous:
        return found
    return diagnose(found.host, found.port, context=context, timeout=timeout) or found


# ------------------------------------------------------------------------------------------ offline log


def duration(seconds: float) -> str:
    """``45 s``, ``3 min 05 s``, ``2 h 03 min``."""
    s = round(max(0.0, seconds))
    if s < 60:
        return f"{s} s"
    if s < 3600:
        return f"{s // 60} min {s % 60:02d} s"
    return f"{s // 3600} h {s % 3600 // 60:02d} min"


class OfflineLog:
    """Which failed connection attempts get a log line, and its words.

    The first ``first`` failures are logged, then at most one per ``every_s`` — except that a change of
    cause is always logged. Suppressed attempts still count (the next line shows the attempt number).
    Not thread-safe: the owner calls it from one thread (paho's network thread).
    """

    def __init__(
        self,
        host: str,
        port: int,
        *,
        first: int = 3,
        every_s: float = 30.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.address = address(host, port)
        self.first = first
        self.every_s = every_s
        self._clock = clock
        self.attempts = 0
        self.offline_since: float | None = None
        self._last_cause: Cause | None = None
        self._last_line = float("-inf")

    def disconnected(self) -> None:
        """The connection dropped: the offline time starts now."""
        if self.offline_since is None:
            self.offline_since = self._clock()

    def failed(self, found: Diagnosis, retry_in_s: float) -> str | None:
        """Record one failed attempt; the line to log, or None when rate-limited."""
        now = self._clock()
        if self.offline_since is None:
            self.offline_since = now
        self.attempts += 1
        changed = found.cause is not self._last_cause
        self._last_cause = found.cause
        if not (changed or self.attempts <= self.first or now - self._last_line >= self.every_s):
            return None
        self._last_line = now
        return (
            f"{found.describe('agent')}; retrying in {retry_in_s:g} s "
            f"(attempt {self.attempts}, offline {duration(now - self.offline_since)})"
        )

    def connected(self) -> str | None:
        """The broker accepted us; the line to log when we had been offline, then start afresh."""
        since, attempts = self.offline_since, self.attempts
        self.offline_since, self.attempts, self._last_cause = None, 0, None
        self._last_line = float("-inf")
        if since is None:
            return None
        return (
            f"connected to {self.address} after {duration(self._clock() - since)} offline "
            f"({attempts} failed attempt{'s' if attempts != 1 else ''})"
        )
