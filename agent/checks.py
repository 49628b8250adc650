"""``edgefleet-agent --check-config``: checks that check what the daemon will need, before it starts.

Pure functions returning :class:`CheckResult` lists; the CLI only prints them. Checked:

* every file the config names exists, is a regular file and is readable by the *service user* (the user the
  daemon runs as; from the owner/group/mode bits of the file and of every directory above it, because
  ``--check-config`` usually runs as root or as that user): ``mqtt.password_file``, ``mqtt.tls.ca_file``,
  ``cert_file``, ``key_file``, ``trust.public_key_files``, ``energy.profile_file``;
* the TLS files parse, the client certificate matches its key and chains to the CA, none has expired, and
  OpenSSL loads them as paho will;
* the trusted public keys decode (the decoder the daemon verifies signatures with);
* the store directory exists (or can be created) and is writable by the service user;
* with ``connect=True``: the broker accepts the configured credentials and TLS (the CONNACK reason).

POSIX ACLs are not evaluated for another user (the mode bits are); as the current user ``os.access`` is.
"""

from __future__ import annotations

import contextlib
import grp
import os
import pwd
import stat
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime
from enum import StrEnum
from pathlib import Path
from typing import Any, Literal

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization

from agent.config import AgentConfig
from agent.connectivity import (
    Cause,
    Diagnosis,
    classify_connack,
    classify_error,
    close_failed_socket,
    resolve,
    tls_context,
)
from agent.errors import ConfigError
from agent.mqttclient import ClientSpec, Endpoint, build_client
from agent.wire import WireError, public_key_from_text

DEFAULT_SERVICE_USER = "edgefleet"  # User= in the systemd unit

Access = Literal["r", "w"]


class Level(StrEnum):
    OK = "ok"
    WARN = "warning"
    FAIL = "FAIL"


@dataclass(frozen=True, slots=True)
class CheckResult:
    """One finding: which config key, how bad, and a message that names the path and what to do."""

    level: Level
    key: str
    message: str
    path: Path | None = None

    @property
    def failed(self) -> bool:
        return self.level is Level.FAIL

    def line(self) -> str:
        return f"{self.level.value}: {self.key}: {self.message}"


def _ok(key: str, message: str, path: Path | None = None) -> CheckResult:
    return CheckResult(Level.OK, key, message, path)


def _warn(key: str, message: str, path: Path | None = None) -> CheckResult:
    return CheckResult(Level.WARN, key, message, path)


def _fail(key: str, message: str, path: Path | None = None) -> CheckResult:
    return CheckResult(Level.FAIL, key, message, path)


# ------------------------------------------------------------------------------------------ service user


@dataclass(frozen=True, slots=True)
class ServiceUser:
    """Whose access the file checks judge. ``current``: this process (os.access) rather than mode bits."""

    name: str
    uid: int
    gids: frozenset[int]
    current: bool = False

    @classmethod
    def named(cls, name: str) -> ServiceUser:
        """Look ``name`` up (KeyError when there is no such user)."""
        entry = pwd.getpwnam(name)
        gids = {entry.pw_gid} | {g.gr_gid for g in grp.getgrall() if name in g.gr_mem}
        current = entry.pw_uid == os.geteuid()
        return cls(entry.pw_name, entry.pw_uid, frozenset(gids), current)

    @classmethod
    def me(cls) -> ServiceUser:
        uid = os.geteuid()
        try:
            name = pwd.getpwuid(uid).pw_name
        except KeyError:
            name = str(uid)
        return cls(name, uid, frozenset({os.getegid(), *os.getgroups()}), current=True)

    def may(self, st: os.stat_result, want: Literal["r", "w", "x"]) -> bool:
        """Would this user get ``want`` on a file with this owner/group/mode? (root: always, x on dirs.)"""
        if self.uid == 0:
            return want != "x" or stat.S_ISDIR(st.st_mode) or bool(st.st_mode & 0o111)
        shift = 6 if st.st_uid == self.uid else 3 if st.st_gid in self.gids else 0
        bit = {"r": 4, "w": 2, "x": 1}[want]
        return bool((st.st_mode >> shift) & bit)


def resolve_service_user(name: str | None) -> tuple[ServiceUser, list[CheckResult]]:
    """The user to check for: ``name``; else, when running as root, the unit's user if it exists here."""
    if name is not None:
        try:
            return ServiceUser.named(name), []
        except KeyError:
            me = ServiceUser.me()
            return me, [
                _fail(
                    "--service-user",
                    f"user {name!r} does not exist on this machine: create it (see systemd/"
                    f"edgefleet.sysusers.conf) or name the user the daemon runs as; checked as {me.name}",
                )
            ]
    if os.geteuid() == 0:
        try:
            return ServiceUser.named(DEFAULT_SERVICE_USER), []
        except KeyError:
            return ServiceUser.me(), [
                _warn(
                    "--service-user",
                    f"user {DEFAULT_SERVICE_USER!r} (the systemd unit's) does not exist here; file access "
                    "was checked for root: pass --service-user USER to check for the user the daemon runs as",
                )
            ]
    return ServiceUser.me(), []


def _who(st: os.stat_result) -> str:
    try:
        owner = pwd.getpwuid(st.st_uid).pw_name
    except KeyError:
        owner = str(st.st_uid)
    try:
        group = grp.getgrgid(st.st_gid).gr_name
    except KeyError:
        group = str(st.st_gid)
    return f"owner {owner}:{group}, mode {stat.S_IMODE(st.st_mode):04o}"


def _blocking_dir(path: Path, user: ServiceUser) -> tuple[Path, os.stat_result] | None:
    """The first directory above ``path`` the user cannot enter (x), if any."""
    for parent in reversed(path.absolute().parents):
        try:
            st = parent.stat()
        except OSError:
            return None  # reported by the caller's own stat
        if not user.may(st, "x"):
            return parent, st
    return None


def _access(path: Path, user: ServiceUser, want: Access) -> bool:
    if user.current:
        return os.access(path, os.R_OK if want == "r" else os.W_OK | os.X_OK)
    st = path.stat()
    return user.may(st, want) and (want == "r" or user.may(st, "x")) and _blocking_dir(path, user) is None


def check_file(key: str, path: Path, user: ServiceUser, what: str) -> CheckResult:
    """``path`` exists, is a regular file and ``user`` may read it (``what``: how to get the file)."""
    path = path.expanduser()
    try:
        st = path.stat()
    except FileNotFoundError:
        return _fail(key, f"{path} does not exist: {what}, or fix the path in {key}", path)
    except OSError as err:
        return _fail(key, f"cannot check {path}: {err.strerror}; run --check-config as root", path)
    if not stat.S_ISREG(st.st_mode):
        return _fail(key, f"{path} is not a regular file: point {key} at the file itself", path)
    if not user.current:
        blocked = _blocking_dir(path, user)
        if blocked is not None:
            d, dst = blocked
            return _fail(
                key,
                f"{path} is out of reach of user {user.name}: directory {d} ({_who(dst)}) is not searchable "
                f"by it: chmod o+x {d}, or chgrp {user.name} {d} && chmod g+x {d}",
                path,
            )
    if not _access(path, user, "r"):
        return _fail(
            key,
            f"{path} is not readable by user {user.name} ({_who(st)}): "
            f"chgrp {user.name} {path} && chmod 0640 {path}",
            path,
        )
    return _ok(key, f"{path} readable by {user.name}", path)


def _read(path: Path) -> bytes:
    return path.expanduser().read_bytes()


# ------------------------------------------------------------------------------------------ the checks


def check_password(config: AgentConfig, user: ServiceUser) -> list[CheckResult]:
    m = config.mqtt
    out: list[CheckResult] = []
    if m.password_file is not None:
        key = "mqtt.password_file"
        found = check_file(
            key,
            m.password_file,
            user,
            "write this device's MQTT password there (`edgefleet provision` creates it)",
        )
        out.append(found)
        if not found.failed:
            text = _read(m.password_file).decode("utf-8", errors="replace").strip()
            if not text:
                out.append(_fail(key, f"{m.password_file} is empty: write this device's MQTT password there"))
            st = m.password_file.stat()
            if st.st_mode & 0o004:
                out.append(
                    _warn(key, f"{m.password_file} is readable by everyone: chmod 0640 {m.password_file}")
                )
    if (m.password_file is not None or m.password is not None) and m.username is None:
        out.append(_warn("mqtt.username", "a password is configured but no mqtt.username: it is never sent"))
    return out


def _load_certs(key: str, path: Path) -> tuple[list[x509.Certificate], CheckResult | None]:
    try:
        certs = x509.load_pem_x509_certificates(_read(path))
    except (ValueError, OSError) as err:
        return [], _fail(key, f"{path} is not a PEM certificate ({err}): {_pem_hint(key)}", path)
    now = datetime.now(UTC)
    for cert in certs:
        if cert.not_valid_after_utc < now:
            return certs, _fail(
                key,
                f"{path}: certificate {_cn(cert)} expired on {cert.not_valid_after_utc:%Y-%m-%d}: "
                "issue a new one",
                path,
            )
        if cert.not_valid_before_utc > now:
            return certs, _fail(
                key,
                f"{path}: certificate {_cn(cert)} is valid only from "
                f"{cert.not_valid_before_utc:%Y-%m-%d %H:%M} UTC: check this device's clock",
                path,
            )
    return certs, None


def _pem_hint(key: str) -> str:
    if key.endswith("ca_file"):
        return "use the fleet CA certificate (ca.crt from `edgefleet broker-config --tls`)"
    return "use the PEM certificate issued for this device"


def _cn(cert: x509.Certificate) -> str:
    names = cert.subject.get_attributes_for_oid(x509.NameOID.COMMON_NAME)
    return repr(str(names[0].value)) if names else repr(cert.subject.rfc4514_string())


def _spki(key: Any) -> bytes:
    return bytes(
        key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    )


def _chains_to(
    leaf: x509.Certificate, pool: Iterable[x509.Certificate], roots: list[x509.Certificate]
) -> bool:
    """Does ``leaf`` chain to one of ``roots`` through certificates of ``pool`` (at most 5 steps)?"""
    candidates = [*roots, *pool]
    cert = leaf
    for _ in range(5):
        issuer = None
        for cand in candidates:
            if cand.subject != cert.issuer:
                continue
            try:
                cert.verify_directly_issued_by(cand)
            except (ValueError, TypeError, InvalidSignature):
                continue
            issuer = cand
            break
        if issuer is None:
            return False
        if any(issuer == root for root in roots):
            return True
        cert = issuer
    return False


def check_tls(config: AgentConfig, user: ServiceUser) -> list[CheckResult]:
    tls = config.mqtt.tls
    if tls is None:
        return []
    out: list[CheckResult] = []
    cas: list[x509.Certificate] = []
    if tls.ca_file is not None:
        key = "mqtt.tls.ca_file"
        found = check_file(key, tls.ca_file, user, "copy the fleet CA certificate (ca.crt) there")
        out.append(found)
        if not found.failed:
            cas, bad = _load_certs(key, tls.ca_file)
            out.append(bad or _ok(key, f"{tls.ca_file}: {len(cas)} CA certificate(s)", tls.ca_file))
    if tls.cert_file is None or tls.key_file is None:
        return [*out, *_openssl_loads(config, out)]
    chain: list[x509.Certificate] = []
    found = check_file(
        "mqtt.tls.cert_file", tls.cert_file, user, "copy this device's client certificate there"
    )
    out.append(found)
    if not found.failed:
        chain, bad = _load_certs("mqtt.tls.cert_file", tls.cert_file)
        if bad is not None:
            out.append(bad)
    found = check_file("mqtt.tls.key_file", tls.key_file, user, "copy this device's private key there")
    out.append(found)
    private: Any = None
    if not found.failed:
        try:
            private = serialization.load_pem_private_key(_read(tls.key_file), password=None)
        except TypeError:
            out.append(
                _fail(
                    "mqtt.tls.key_file",
                    f"{tls.key_file} is encrypted: the agent cannot ask for a passphrase; store it "
                    "unencrypted (mode 0640, group of the service user)",
                    tls.key_file,
                )
            )
        except ValueError as err:
            out.append(
                _fail(
                    "mqtt.tls.key_file",
                    f"{tls.key_file} is not a PEM private key ({err}): use the key the certificate was "
                    "issued for",
                    tls.key_file,
                )
            )
        else:
            if tls.key_file.stat().st_mode & 0o004:
                out.append(
                    _warn("mqtt.tls.key_file", f"{tls.key_file} is readable by everyone: chmod 0640 it")
                )
    if chain and private is not None and _spki(chain[0].public_key()) != _spki(private.public_key()):
        out.append(
            _fail(
                "mqtt.tls.key_file",
                f"{tls.key_file} does not belong to the certificate in {tls.cert_file} ({_cn(chain[0])}): "
                "use the key the certificate was issued for",
                tls.key_file,
            )
        )
    if chain and cas and not _chains_to(chain[0], chain[1:], cas):
        out.append(
            _fail(
                "mqtt.tls.cert_file",
                f"{tls.cert_file} ({_cn(chain[0])}, issuer {chain[0].issuer.rfc4514_string()}) is not signed "
                f"by the CA in {tls.ca_file}: the broker will refuse it; issue it with the fleet CA",
                tls.cert_file,
            )
        )
    return [*out, *_openssl_loads(config, out)]


def _openssl_loads(config: AgentConfig, so_far: list[CheckResult]) -> list[CheckResult]:
    """What paho does with the files (only when each parsed: otherwise the cause is already reported)."""
    tls = config.mqtt.tls
    if tls is None or any(r.failed for r in so_far):
        return []
    try:
        tls_context(tls.ca_file, tls.cert_file, tls.key_file, insecure=tls.insecure)
    except (OSError, ValueError) as err:
        return [_fail("mqtt.tls", f"OpenSSL cannot load the TLS files: {err}")]
    return []


def check_trust(config: AgentConfig, user: ServiceUser) -> list[CheckResult]:
    out: list[CheckResult] = []
    for i, text in enumerate(config.trust.public_keys):
        key = f"trust.public_keys[{i}]"
        try:
            public_key_from_text(text)
        except (WireError, ValueError) as err:
            out.append(_fail(key, f"{err}: paste the key `edgefleet keys show` prints (base64 or PEM)"))
        else:
            out.append(_ok(key, "Ed25519 public key"))
    for i, path in enumerate(config.trust.public_key_files):
        key = f"trust.public_key_files[{i}]"
        found = check_file(key, path, user, "copy the fleet's public key (`edgefleet keys show`) there")
        out.append(found)
        if found.failed:
            continue
        try:
            public_key_from_text(_read(path).decode("ascii"))
        except (WireError, ValueError) as err:
            out.append(_fail(key, f"{path}: {err}: put the fleet's Ed25519 public key there", path))
    return out


def check_store(config: AgentConfig, user: ServiceUser) -> list[CheckResult]:
    key, path = "store.path", config.store.path.expanduser()
    # the unit's StateDirectory= makes it on the first start; a check run before that needs it made
    create = f"install -d -o {user.name} -g {user.name} -m 0750 {path} (systemd makes it on the first start)"
    probe = path
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    if probe.exists() and not probe.is_dir():
        return [_fail(key, f"{probe} is not a directory: point {key} at a directory", path)]
    try:
        writable = _access(probe, user, "w")
        blocked = None if user.current else _blocking_dir(probe, user)
    except OSError as err:
        return [_fail(key, f"cannot check {probe}: {err.strerror}", path)]
    if blocked is not None or not writable:
        where = "" if probe == path else f" and it does not exist; {probe} is not writable either"
        return [_fail(key, f"{path} is not writable by user {user.name}{where}: {create}", path)]
    if probe != path:
        return [_ok(key, f"{path} does not exist yet; {user.name} can create it", path)]
    return [_ok(key, f"{path} writable by {user.name}", path)]


def check_energy(config: AgentConfig, user: ServiceUser) -> list[CheckResult]:
    profile = config.energy.profile_file
    if profile is None:
        return []
    return [check_file("energy.profile_file", profile, user, "run `edgefleet-agent calibrate` to write it")]


def check_config(config: AgentConfig, user: ServiceUser) -> list[CheckResult]:
    """Every offline check (files, TLS, keys, store); no network."""
    return [
        *check_password(config, user),
        *check_tls(config, user),
        *check_trust(config, user),
        *check_store(config, user),
        *check_energy(config, user),
    ]


# ------------------------------------------------------------------------------------------ --connect


def check_connect(config: AgentConfig, timeout_s: float | None = None) -> list[CheckResult]:
    """Connect once to every configured broker endpoint with the configured credentials and TLS; report
    each broker's answer (CONNACK)."""
    results: list[CheckResult] = []
    for endpoint in config.mqtt.broker_endpoints():
        results += _check_endpoint(config, endpoint, timeout_s)
    return results


def _check_endpoint(config: AgentConfig, endpoint: Endpoint, timeout_s: float | None) -> list[CheckResult]:
    m = config.mqtt
    timeout = timeout_s if timeout_s is not None else m.connect_timeout_s
    try:
        password = config.mqtt_password()
        ctx = (
            None
            if m.tls is None
            else tls_context(m.tls.ca_file, m.tls.cert_file, m.tls.key_file, insecure=m.tls.insecure)
        )
    except (ConfigError, OSError, ValueError) as err:
        return [_fail("mqtt", f"not connecting: {err}; fix the failures above first")]
    # A client id of its own: the daemon's would take over (and end) a running daemon's session.
    client_id = f"{m.client_id or f'edgefleet-agent-{config.device.id}'}-check"
    tls = m.tls
    try:
        client = build_client(
            ClientSpec(
                client_id=client_id,
                endpoints=(endpoint,),
                protocol=m.protocol,
                username=m.username,
                password=password if m.username is not None else None,
                tls=tls is not None,
                ca_file=tls.ca_file if tls else None,
                cert_file=tls.cert_file if tls else None,
                key_file=tls.key_file if tls else None,
                insecure=tls.insecure if tls else False,
                connect_timeout_s=timeout,
            )
        )
    except (OSError, ValueError) as err:
        return [_fail("mqtt", f"not connecting: {err}; fix the failures above first")]
    host, port = endpoint.host, endpoint.port
    done = threading.Event()
    answer: dict[str, Any] = {}

    def on_connect(_c: Any, _u: Any, _f: Any, reason: Any, _p: Any) -> None:
        answer.setdefault("code", int(reason.value))
        answer.setdefault("name", str(reason.getName()))
        done.set()

    def on_disconnect(_c: Any, _u: Any, _f: Any, _reason: Any, _p: Any) -> None:
        answer.setdefault("closed", True)
        done.set()

    client.on_connect = on_connect
    client.on_disconnect = on_disconnect
    t0 = time.monotonic()
    found: Diagnosis | None
    try:
        try:
            client.connect_next(keepalive=m.keepalive_s)  # resolve, TCP, TLS handshake
        except OSError as err:
            close_failed_socket(err)
            found = resolve(classify_error(err, host, port, tls=ctx is not None), ctx)
            return [_fail("mqtt", found.describe("agent"))]
        client.loop_start()
        done.wait(timeout)
        elapsed = time.monotonic() - t0
        if "code" in answer:
            found = classify_connack(answer["code"], host, port, answer["name"])
            if found is None:
                who = m.username or "anonymous"
                how = "TLS" if ctx is not None else "plain TCP"
                return [
                    _ok(
                        "mqtt",
                        f"broker {endpoint.address} accepted {who} over {how} (CONNACK {answer['name']}) "
                        f"in {elapsed:.2f} s",
                    )
                ]
        elif answer.get("closed"):
            found = resolve(Diagnosis(Cause.CLOSED, host, port, "before any CONNACK"), ctx)
        else:
            found = Diagnosis(Cause.TIMEOUT, host, port, f"no answer (CONNACK) within {timeout:g} s")
        return [_fail("mqtt", found.describe("agent"))]
    finally:
        client.disconnect()
        with contextlib.suppress(AttributeError):  # paho 2.2 loop_stop() race, see agent.mqtt
            client.loop_stop()


def failed(results: Iterable[CheckResult]) -> list[CheckResult]:
    return [r for r in results if r.failed]
