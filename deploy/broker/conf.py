"""``edgefleet broker-config``: a hardened mosquitto configuration for a fleet, with its credentials.

::

    edgefleet broker-config --out DIR [--devices a,b,c] [--tls] [--port 8883] [--cert-port 8884]
                            [--install-dir /etc/mosquitto/edgefleet] [--server-name broker.lan ...]
                            [--controller-host broker.lan]

writes into DIR:

    mosquitto.conf     allow_anonymous false, password_file, acl_file, set_tcp_nodelay, queue limits
                       sized for 32-chunk windows of 256 KiB, persistence; with --tls a TLS listener
    passwd             mosquitto's PBKDF2-SHA512 ``$7$`` hashes (controller, collector, --devices)
    acl                the service users' ``user`` blocks, ``pattern`` lines with ``%u`` for every
                       device's own topics, and one ``user`` block per device for the fleet-wide
                       topics it reads (manifests, blobs); ``edgefleet provision`` appends blocks
    credentials/       one ``<user>.password`` per generated user (mode 0600): hand them out, then delete
    controller/        host.toml + the controller's password (+ ca.crt): the host commands' broker config
    ca.crt ca.key      the fleet CA (--tls or --cert-port); keep ca.key off the broker in production,
    server.crt/.key    the broker's certificate (SANs: --server-name, localhost, 127.0.0.1)

Ownership: mosquitto 2 reads the password file, the ACL and the server key *after* dropping to its
own user, on start and on every SIGHUP (measured: a root-owned 0600 passwd makes it log "Unable to
open pwfile" and refuse every client). So those three are owner ``mosquitto``, group ``mosquitto``,
mode 0640 (:data:`BROKER_FILE_MODE`): set directly when running as root and the user exists, else
the exact chown/chmod command is printed. A file that already exists keeps its owner, group and mode
when rewritten, unless (as root) mosquitto could not read it. Certificates and mosquitto.conf are
0644; ca.key and credentials stay 0600 with the operator.

Facts this relies on (FACTS.md, mosquitto 2.0): in an ``acl_file``, ``topic`` lines before any
``user`` line apply only to anonymous clients, and a ``pattern`` without ``%u``/``%c`` draws a warning
on every start, so fixed topics every device reads are ``topic`` lines in per-device ``user`` blocks;
with MQTT v5 a refused publish gets PUBACK 0x87; ``use_identity_as_username`` maps a client
certificate's CN to the user name; mixing password and certificate listeners needs
``per_listener_settings true`` (then every auth setting follows its listener).
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import datetime as dt
import enum
import grp
import hashlib
import ipaddress
import json
import os
import pwd
import secrets
import shlex
import socket
import stat
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from agent import wire
from deploy.errors import DeployError

CONTROLLER_USER = "edgefleet-controller"
COLLECTOR_USER = "edgefleet-collector"
RESERVED_PREFIX = "edgefleet-"  # device ids must not start with it (they would share the service users' ACL)
HA_PREFIX = "homeassistant"
PBKDF2_ITERATIONS = 101  # mosquitto_passwd's default for $7$
BROKER_ACCOUNT = "mosquitto"  # the user (and group) mosquitto 2 drops to when started as root
BROKER_FILE_MODE = 0o640  # passwd, acl, server.key: owner and group mosquitto, nobody else
RELOAD_HINT = "reload mosquitto: sudo systemctl reload mosquitto"
RESTART_HINT = "restart mosquitto: sudo systemctl restart mosquitto"
HOST_CONFIG_NAME = "host.toml"
_RENEW_BEFORE = dt.timedelta(days=30)  # reissue a certificate that expires sooner than this
_SALT_BYTES = 12
_HASH_BYTES = 64


class BrokerConfigError(DeployError):
    """Broker configuration files cannot be written or read."""


# ------------------------------------------------------------------------------------------------ files


def write_private(path: Path, data: bytes | str, mode: int = 0o600) -> None:
    """Write atomically with ``mode`` from the first byte (temp file in the same directory, fsync, rename)."""
    _replace(path, data.encode("utf-8") if isinstance(data, str) else data, mode, None)


def _replace(path: Path, raw: bytes, mode: int, owner: tuple[int, int] | None) -> bool:
    """Atomic write; the temp file gets ``owner`` and ``mode`` before it is renamed over ``path``.

    Returns False if ``owner`` could not be set (not root): the file then belongs to us.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    owned = True
    try:
        with os.fdopen(fd, "wb") as fh:
            if owner is not None:
                owned = _fchown(fh.fileno(), owner)
            os.fchmod(fh.fileno(), mode)  # after chown (it may clear bits), and umask may have narrowed it
            fh.write(raw)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return owned


def _fchown(fd: int, owner: tuple[int, int]) -> bool:
    uid, gid = owner
    if (os.fstat(fd).st_uid, os.fstat(fd).st_gid) == owner:
        return True
    try:
        os.fchown(fd, uid, gid)
    except PermissionError:
        with contextlib.suppress(PermissionError):  # not root: a group we belong to can still be kept
            os.fchown(fd, -1, gid)
        return False
    return True


class Change(enum.StrEnum):
    CREATED = "created"
    UPDATED = "updated"
    UNCHANGED = "unchanged"


@dataclass(frozen=True)
class FileChange:
    """What one run did to one file, for the "created / updated / unchanged" lines."""

    path: Path
    change: Change
    detail: str = ""

    @property
    def changed(self) -> bool:
        return self.change is not Change.UNCHANGED

    def line(self) -> str:
        detail = f" ({self.detail})" if self.detail else ""
        return f"  {self.change.value:<9} {self.path}{detail}"


def broker_account() -> tuple[int, int] | None:
    """uid and gid of the ``mosquitto`` user and group, or None if this machine has no such user."""
    try:
        user = pwd.getpwnam(BROKER_ACCOUNT)
    except KeyError:
        return None
    try:
        gid = grp.getgrnam(BROKER_ACCOUNT).gr_gid
    except KeyError:
        gid = user.pw_gid
    return user.pw_uid, gid


def _is_root() -> bool:
    return os.geteuid() == 0


def broker_can_read(st: os.stat_result, account: tuple[int, int]) -> bool:
    """True if the mosquitto user can read the file and no other unprivileged user can."""
    uid, gid = account
    mode = stat.S_IMODE(st.st_mode)
    if mode & 0o007:
        return False
    if st.st_uid == uid:
        return bool(mode & 0o400) and (not mode & 0o070 or st.st_gid in (gid, 0))
    if st.st_gid == gid:
        return bool(mode & 0o040) and st.st_uid == 0
    return False


def write_file(path: Path, data: bytes | str, mode: int = 0o644, *, broker_reads: bool = False) -> FileChange:
    """Write ``path`` if its content differs, and say whether it was created, updated or unchanged.

    A new file gets ``mode`` (and, with ``broker_reads`` as root, owner mosquitto:mosquitto and
    :data:`BROKER_FILE_MODE`). An existing file keeps its owner, group and mode: the operator may have
    set them. The one exception, as root: a file mosquitto cannot read, or others can (e.g. the
    root:root 0600 that ``mosquitto_passwd`` run as root leaves), gets mosquitto's owner and mode.
    """
    raw = data.encode("utf-8") if isinstance(data, str) else data
    account = broker_account() if broker_reads and _is_root() else None
    try:
        st: os.stat_result | None = path.stat()
    except FileNotFoundError:
        st = None
    if st is None:
        if account is not None:
            _replace(path, raw, BROKER_FILE_MODE, account)
        else:
            _replace(path, raw, BROKER_FILE_MODE if broker_reads else mode, None)
        return FileChange(path, Change.CREATED)
    repair = account is not None and not broker_can_read(st, account)
    detail = f"owner set to {BROKER_ACCOUNT}:{BROKER_ACCOUNT} {BROKER_FILE_MODE:04o}" if repair else ""
    try:
        same = path.read_bytes() == raw
    except PermissionError:
        same = False  # not ours to read: rewriting will say why
    if same:
        if not repair:
            return FileChange(path, Change.UNCHANGED)
        assert account is not None
        os.chown(path, *account)
        os.chmod(path, BROKER_FILE_MODE)
        return FileChange(path, Change.UPDATED, detail)
    if repair:
        assert account is not None
        _replace(path, raw, BROKER_FILE_MODE, account)
        return FileChange(path, Change.UPDATED, detail)
    kept = _replace(path, raw, stat.S_IMODE(st.st_mode), (st.st_uid, st.st_gid))
    if not kept:
        detail = f"could not keep owner {st.st_uid}:{st.st_gid}: not running as root"
    return FileChange(path, Change.UPDATED, detail)


def broker_files_to_fix(paths: Iterable[Path]) -> list[Path]:
    """Files mosquitto must read that are not (verifiably) owned and moded for it on this machine."""
    account = broker_account()
    out = []
    for path in paths:
        try:
            st = path.stat()
        except FileNotFoundError:
            continue
        if account is None or not broker_can_read(st, account):
            out.append(path)
    return out


def ownership_command(paths: Sequence[Path]) -> str:
    """The one command line that gives ``paths`` to the mosquitto user."""
    names = " ".join(shlex.quote(str(p)) for p in paths)
    return (
        f"sudo chown {BROKER_ACCOUNT}:{BROKER_ACCOUNT} {names} && sudo chmod {BROKER_FILE_MODE:04o} {names}"
    )


def new_password() -> str:
    return secrets.token_urlsafe(24)


# ------------------------------------------------------------------------------------------------ passwd


def hash_password(password: str, salt: bytes | None = None, iterations: int = PBKDF2_ITERATIONS) -> str:
    """mosquitto's ``$7$`` format: PBKDF2-HMAC-SHA512, base64 salt and hash."""
    salt = secrets.token_bytes(_SALT_BYTES) if salt is None else salt
    digest = hashlib.pbkdf2_hmac("sha512", password.encode("utf-8"), salt, iterations, _HASH_BYTES)
    return f"$7${iterations}${base64.b64encode(salt).decode()}${base64.b64encode(digest).decode()}"


def check_password(password: str, hashed: str) -> bool:
    """True if ``password`` matches a ``$7$`` (or ``$6$``, sha512 single round) mosquitto hash."""
    parts = hashed.split("$")
    if len(parts) == 5 and parts[1] == "7":
        salt = base64.b64decode(parts[3])
        expected = hash_password(password, salt, int(parts[2]))
    elif len(parts) == 4 and parts[1] == "6":
        salt = base64.b64decode(parts[2])
        digest = hashlib.sha512(password.encode("utf-8") + salt).digest()
        expected = f"$6${parts[2]}${base64.b64encode(digest).decode()}"
    else:
        return False
    return secrets.compare_digest(expected, hashed)


def _check_user(user: str) -> str:
    if not user or any(c in user for c in ":\n\r") or user != user.strip():
        raise BrokerConfigError(f"user name {user!r} cannot go into a mosquitto password file")
    return user


def read_passwd(path: Path) -> dict[str, str]:
    """user → hash, in file order (missing file: empty)."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return {}
    except OSError as err:
        raise BrokerConfigError(f"cannot read the password file {path}: {err.strerror}") from err
    users: dict[str, str] = {}
    for line in text.splitlines():
        if line.strip() and not line.startswith("#") and ":" in line:
            user, hashed = line.split(":", 1)
            users[user] = hashed
    return users


def render_passwd(users: dict[str, str]) -> str:
    return "".join(f"{_check_user(u)}:{h}\n" for u, h in users.items())


def set_passwords(path: Path, passwords: dict[str, str]) -> FileChange:
    """Add or replace users in a mosquitto password file (atomically; owner and mode kept)."""
    users = read_passwd(path)
    for user, password in passwords.items():
        users[_check_user(user)] = hash_password(password)
    return write_file(path, render_passwd(users), broker_reads=True)


# ------------------------------------------------------------------------------------------------ ACL


_NS_MARK = "# namespace: "


def render_acl(
    namespace: str = wire.DEFAULT_NAMESPACE,
    devices: Iterable[str] = (),
    controller: str = CONTROLLER_USER,
    collector: str = COLLECTOR_USER,
    ha_prefix: str = HA_PREFIX,
) -> str:
    """The fleet ACL: ``pattern`` lines (``%u`` = user name = device id) and one block per device."""
    ns = wire.check_id(namespace, "namespace")
    dev = f"{ns}/devices/%u"
    head = f"""\
# edgefleet ACL (generated by `edgefleet broker-config`; `edgefleet provision` appends device blocks).
# mosquitto reads it at start and on SIGHUP, as the mosquitto user.
# No `topic` line before the first `user` line: those would apply to anonymous clients only.
# Every `pattern` contains %u: mosquitto warns about (and cannot scope) patterns without %u or %c.
{_NS_MARK}{ns}

# The controller publishes models, blobs, assignments and commands, and reads every device topic.
user {_check_user(controller)}
topic readwrite {ns}/models/#
topic readwrite {ns}/blobs/#
topic readwrite {ns}/devices/+/assign/+
topic write {ns}/devices/+/cmd
topic read {ns}/devices/#
topic read $SYS/broker/#

# The collector reads what the fleet says and what it was told (shared subscriptions included): the
# decisions read its database (manifests and assignments too).
user {_check_user(collector)}
topic read {ns}/models/+/manifest
topic read {ns}/devices/+/assign/+
topic read {ns}/devices/+/status
topic read {ns}/devices/+/reports/+
topic read {ns}/devices/+/events
topic read {ns}/devices/+/telemetry

# Every device: user name = device id. Patterns apply to all users wherever they stand; the service
# users above have names no device may take (ids starting with "{RESERVED_PREFIX}" are refused).
pattern write {dev}/status
pattern write {dev}/reports/+
pattern write {dev}/events
pattern write {dev}/telemetry
pattern write {ha_prefix}/+/%u/+/config
pattern read {dev}/assign/+
pattern read {dev}/cmd

# What every device reads in common (fixed topics, hence `topic` lines in its own block).
"""
    return head + "".join(render_device_acl(ns, d) for d in dict.fromkeys(devices))


def render_device_acl(namespace: str, device: str) -> str:
    return (
        f"\nuser {_check_user(device)}\n"
        f"topic read {namespace}/models/+/manifest\n"
        f"topic read {namespace}/blobs/#\n"
    )


def acl_users(text: str) -> list[str]:
    """The user names of an ACL's ``user`` blocks, in file order."""
    return [
        ln.split(None, 1)[1].strip() for ln in text.splitlines() if ln.startswith("user ") and ln[5:].strip()
    ]


def acl_unscoped_patterns(text: str) -> list[str]:
    """``pattern`` lines without ``%u``/``%c``, which mosquitto warns about on every start."""
    return [ln for ln in text.splitlines() if ln.startswith("pattern ") and "%u" not in ln and "%c" not in ln]


def acl_namespace(text: str) -> str | None:
    """The namespace a generated ACL was written for (None for a file we did not write)."""
    for line in text.splitlines():
        if line.startswith(_NS_MARK):
            return line[len(_NS_MARK) :].strip()
    return None


def add_acl_device(path: Path, device: str, namespace: str) -> FileChange:
    """Give ``device`` its block in the ACL at ``path`` (appended: operator edits stay untouched)."""
    check_device_id(device)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return write_file(path, render_acl(namespace, [device]), broker_reads=True)
    except OSError as err:
        raise BrokerConfigError(f"cannot read the ACL {path}: {err.strerror}") from err
    found = acl_namespace(text)
    if found is not None and found != namespace:
        raise BrokerConfigError(f"{path} is the ACL of namespace {found!r}, not {namespace!r}")
    if device in acl_users(text):
        return write_file(path, text, broker_reads=True)  # unchanged (repairs its owner if needed)
    sep = "" if text.endswith("\n") or not text else "\n"
    change = write_file(path, text + sep + render_device_acl(namespace, device), broker_reads=True)
    return FileChange(change.path, change.change, f"block for {device}")


def check_device_id(device: str) -> str:
    wire.check_id(device, "device id")
    if device.startswith(RESERVED_PREFIX):
        raise wire.IdentifierError(f"device id {device!r} must not start with {RESERVED_PREFIX!r} (reserved)")
    return device


# ------------------------------------------------------------------------------------------------ PKI


@dataclass(frozen=True)
class CertPair:
    cert: x509.Certificate
    key: ec.EllipticCurvePrivateKey

    def cert_pem(self) -> bytes:
        return self.cert.public_bytes(serialization.Encoding.PEM)

    def key_pem(self) -> bytes:
        return self.key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )

    def write(self, cert_path: Path, key_path: Path, *, broker_reads: bool = False) -> list[FileChange]:
        """Certificate 0644; key 0600, or mosquitto's 0640 when the broker reads it."""
        return [
            write_file(cert_path, self.cert_pem(), 0o644),
            write_file(key_path, self.key_pem(), 0o600, broker_reads=broker_reads),
        ]


def _name(cn: str) -> x509.Name:
    return x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "edgefleet"),
            x509.NameAttribute(NameOID.COMMON_NAME, cn),
        ]
    )


def create_ca(cn: str = "edgefleet fleet CA", days: int = 3650) -> CertPair:
    key = ec.generate_private_key(ec.SECP256R1())
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name(cn))
        .issuer_name(_name(cn))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    return CertPair(cert, key)


def load_ca(cert_path: Path, key_path: Path) -> CertPair:
    try:
        cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
        key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
    except (OSError, ValueError) as err:
        raise BrokerConfigError(f"cannot load the fleet CA from {cert_path} / {key_path}: {err}") from err
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise BrokerConfigError(f"{key_path} is not an EC private key")
    return CertPair(cert, key)


def issue_cert(
    ca: CertPair,
    cn: str,
    *,
    server_names: Sequence[str] = (),
    client: bool = False,
    days: int = 825,
) -> CertPair:
    """A leaf certificate signed by ``ca``: a server certificate (SANs) or a client one (CN = identity)."""
    key = ec.generate_private_key(ec.SECP256R1())
    now = dt.datetime.now(dt.UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(cn))
        .issuer_name(ca.cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.ExtendedKeyUsage(
                [ExtendedKeyUsageOID.CLIENT_AUTH if client else ExtendedKeyUsageOID.SERVER_AUTH]
            ),
            critical=False,
        )
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca.key.public_key()), critical=False
        )
    )
    if server_names:
        sans: list[x509.GeneralName] = []
        for name in dict.fromkeys(server_names):
            try:
                sans.append(x509.IPAddress(ipaddress.ip_address(name)))
            except ValueError:
                sans.append(x509.DNSName(name))
        builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
    return CertPair(builder.sign(ca.key, hashes.SHA256()), key)


def reusable_cert(
    ca: CertPair, cert_path: Path, key_path: Path, cn: str, server_names: Sequence[str] = ()
) -> CertPair | None:
    """An existing leaf pair worth keeping: CN (and SANs) as asked, signed by ``ca``, its key matching,
    valid for 30 more days. Reissuing needlessly would force a broker restart or a device reinstall."""
    try:
        cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
        key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
    except (OSError, ValueError):
        return None
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        return None
    if cert.issuer != ca.cert.subject or cert.public_key() != key.public_key():
        return None
    try:
        algorithm = cert.signature_hash_algorithm or hashes.SHA256()
        ca.key.public_key().verify(cert.signature, cert.tbs_certificate_bytes, ec.ECDSA(algorithm))
    except InvalidSignature:
        return None
    names = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    if not names or names[0].value != cn:
        return None
    if cert.not_valid_after_utc - dt.datetime.now(dt.UTC) < _RENEW_BEFORE:
        return None
    if server_names:
        try:
            sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        except x509.ExtensionNotFound:
            return None
        have = {str(v) for v in sans.get_values_for_type(x509.DNSName)}
        have |= {str(v) for v in sans.get_values_for_type(x509.IPAddress)}
        want = set()
        for name in server_names:
            try:
                want.add(str(ipaddress.ip_address(name)))
            except ValueError:
                want.add(name)
        if have != want:
            return None
    return CertPair(cert, key)


# ------------------------------------------------------------------------------------------------ config


@dataclass(frozen=True)
class BrokerSpec:
    """What goes into mosquitto.conf. Paths are where the files live on the broker machine."""

    install_dir: Path
    port: int = 1883
    bind: str | None = None
    tls: bool = False
    cert_port: int | None = None  # an extra mTLS listener: CN = user name (use_identity_as_username)
    state_dir: Path = Path("/var/lib/mosquitto")
    log_dest: str = "syslog"
    max_packet_bytes: int = wire.MAX_CHUNK_SIZE + 64 * 1024
    extra: list[str] = field(default_factory=list)


def render_conf(spec: BrokerSpec) -> str:
    d = spec.install_dir
    per_listener = spec.cert_port is not None
    lines = [
        "# edgefleet mosquitto configuration (generated by `edgefleet broker-config`)",
        "# Sizing: agents fetch blobs through a sliding window of <= 32 retained chunk topics of 256 KiB;",
        "# mosquitto's defaults (20 in flight, 1000 queued) cut larger bursts silently. The collector and",
        "# the controller subscribe to every device: 2,000 devices answering one manifest sent ~28,000",
        "# messages in seconds, and a 10,000 queue dropped 604 of 2,000 reports (benches/fleet_sim.py).",
        f"per_listener_settings {'true' if per_listener else 'false'}",
        "set_tcp_nodelay true",
        "max_inflight_messages 64",
        "max_queued_messages 200000",
        f"max_packet_size {spec.max_packet_bytes}",
        "persistence true",
        f"persistence_location {spec.state_dir}/",
        "autosave_interval 300",
        f"log_dest {spec.log_dest}",
        "log_type error",
        "log_type warning",
        "log_type notice",
        "connection_messages true",
        "",
    ]

    def auth(password: bool) -> list[str]:
        out = ["allow_anonymous false"]
        if password:
            out.append(f"password_file {d / 'passwd'}")
        out.append(f"acl_file {d / 'acl'}")
        return out

    bind = f" {spec.bind}" if spec.bind else ""
    lines.append(f"listener {spec.port}{bind}")
    if spec.tls:
        lines += [
            f"cafile {d / 'ca.crt'}",
            f"certfile {d / 'server.crt'}",
            f"keyfile {d / 'server.key'}",
            "tls_version tlsv1.2",
        ]
    if per_listener:
        lines += auth(password=True)
        lines += [
            "",
            f"listener {spec.cert_port}{bind}",
            f"cafile {d / 'ca.crt'}",
            f"certfile {d / 'server.crt'}",
            f"keyfile {d / 'server.key'}",
            "tls_version tlsv1.2",
            "require_certificate true",
            "use_identity_as_username true",
            *auth(password=False),
        ]
    else:
        lines += ["", *auth(password=True)]
    lines += spec.extra
    return "\n".join(lines) + "\n"


@dataclass
class BrokerFiles:
    out: Path
    conf: Path
    passwd: Path
    acl: Path
    credentials: dict[str, Path]
    ca_cert: Path | None = None
    ca_key: Path | None = None
    host_config: Path | None = None
    changes: list[FileChange] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def broker_reads(self) -> list[Path]:
        """The files mosquitto opens as its own user (passwd, acl, and the server key with TLS)."""
        key = self.out / "server.key"
        return [self.passwd, self.acl, *([key] if self.ca_cert is not None else [])]

    def changed(self, *paths: Path) -> bool:
        return any(c.changed and c.path in paths for c in self.changes)


def default_server_names() -> list[str]:
    return [socket.gethostname(), "localhost", "127.0.0.1", "::1"]


def render_host_config(
    host: str, port: int, namespace: str, *, tls: bool, password_file: str, ca_file: str = "ca.crt"
) -> str:
    """The controller's host.toml (deploy.hostconfig): relative paths are relative to the file itself."""

    def q(value: str) -> str:
        return json.dumps(value, ensure_ascii=True)  # a JSON string is a valid TOML basic string

    lines = [
        "# edgefleet host configuration (generated by `edgefleet broker-config`): the broker the host",
        "# commands talk to. Relative paths are relative to this file's directory.",
        "[broker]",
        f"host = {q(host)}",
        f"port = {port}",
        f"username = {q(CONTROLLER_USER)}",
        f"password_file = {q(password_file)}",
        f"namespace = {q(namespace)}",
    ]
    if tls:
        lines += ["", "[broker.tls]", f"ca_file = {q(ca_file)}"]
    return "\n".join(lines) + "\n"


def write_broker_config(
    out: Path,
    spec: BrokerSpec,
    devices: Iterable[str] = (),
    namespace: str = wire.DEFAULT_NAMESPACE,
    server_names: Sequence[str] = (),
    controller_host: str | None = None,
) -> BrokerFiles:
    """Write conf, passwd, acl, credentials, the controller's host.toml and (for TLS) the CA and server
    certificate into ``out``. Existing users keep their passwords; existing certificates are kept while
    they still fit; every file says whether it was created, updated or left unchanged."""
    devices = [check_device_id(d) for d in devices]
    ns = wire.check_id(namespace, "namespace")
    out.mkdir(parents=True, exist_ok=True)
    files = BrokerFiles(out, out / "mosquitto.conf", out / "passwd", out / "acl", {})
    names = list(dict.fromkeys(server_names)) or default_server_names()
    tls = spec.tls or spec.cert_port is not None
    if tls:
        ca_cert, ca_key = out / "ca.crt", out / "ca.key"
        ca = load_ca(ca_cert, ca_key) if ca_cert.exists() and ca_key.exists() else create_ca()
        files.changes += ca.write(ca_cert, ca_key)
        server = reusable_cert(ca, out / "server.crt", out / "server.key", names[0], names)
        server = server or issue_cert(ca, names[0], server_names=names)
        files.changes += server.write(out / "server.crt", out / "server.key", broker_reads=True)
        files.ca_cert, files.ca_key = ca_cert, ca_key
    existing = read_passwd(files.passwd)
    passwords = {
        user: new_password() for user in (CONTROLLER_USER, COLLECTOR_USER, *devices) if user not in existing
    }
    if passwords or not files.passwd.exists():
        files.changes.append(set_passwords(files.passwd, passwords))
    else:  # nothing to add: leave the file as it is (comments, order), only repair its owner
        files.changes.append(write_file(files.passwd, files.passwd.read_bytes(), broker_reads=True))
    (out / "credentials").mkdir(mode=0o700, exist_ok=True)
    for user, password in passwords.items():
        path = out / "credentials" / f"{user}.password"
        files.changes.append(write_file(path, password + "\n", 0o600))
        files.credentials[user] = path
    # Devices already known (provisioned later, or by certificate) keep their ACL blocks.
    try:
        old_acl = files.acl.read_text(encoding="utf-8")
    except FileNotFoundError:
        old_acl = ""
    service = {CONTROLLER_USER, COLLECTOR_USER}
    known = [u for u in (*acl_users(old_acl), *existing, *devices) if u not in service]
    files.changes.append(write_file(files.acl, render_acl(ns, known), broker_reads=True))
    files.changes.append(write_file(files.conf, render_conf(spec), 0o644))
    _write_controller_dir(files, spec, ns, names, controller_host, passwords.get(CONTROLLER_USER))
    return files


def _write_controller_dir(
    files: BrokerFiles,
    spec: BrokerSpec,
    namespace: str,
    names: Sequence[str],
    controller_host: str | None,
    new_password_: str | None,
) -> None:
    """``controller/``: host.toml + the controller's password (+ ca.crt), to copy to the host as is."""
    cdir = files.out / "controller"
    cdir.mkdir(mode=0o700, exist_ok=True)
    pw_name = f"{CONTROLLER_USER}.password"
    pw_path = cdir / pw_name
    if new_password_ is not None:
        files.changes.append(write_file(pw_path, new_password_ + "\n", 0o600))
    elif not pw_path.exists():
        cred = files.out / "credentials" / pw_name
        if cred.exists():
            files.changes.append(write_file(pw_path, cred.read_bytes(), 0o600))
        else:
            files.notes.append(
                f"{CONTROLLER_USER} is in {files.passwd} but its password is nowhere here: put it into "
                f"{pw_path} (or give the controller a new one with mosquitto_passwd)"
            )
    tls = spec.tls  # the password listener; the mTLS one is for devices
    if tls and files.ca_cert is not None:
        files.changes.append(write_file(cdir / "ca.crt", files.ca_cert.read_bytes(), 0o644))
    host = controller_host or names[0]
    text = render_host_config(host, spec.port, namespace, tls=tls, password_file=pw_name)
    files.host_config = cdir / HOST_CONFIG_NAME
    files.changes.append(write_file(files.host_config, text, 0o600))


# ------------------------------------------------------------------------------------------------ CLI


def _cmd_broker_config(args: argparse.Namespace) -> int:
    out: Path = args.out
    devices = [d.strip() for d in (args.devices or "").split(",") if d.strip()]
    port = args.listen_port or (8883 if args.tls else 1883)
    install_dir: Path = args.install_dir or out.resolve()
    spec = BrokerSpec(
        install_dir=install_dir,
        port=port,
        bind=args.bind,
        tls=args.tls,
        cert_port=args.cert_port,
        state_dir=args.state_dir,
        log_dest=args.log_dest,
    )
    try:
        files = write_broker_config(
            out,
            spec,
            devices,
            namespace=getattr(args, "namespace", None) or wire.DEFAULT_NAMESPACE,
            server_names=args.server_name or (),
            controller_host=args.controller_host,
        )
    except (DeployError, wire.IdentifierError, OSError) as err:
        print(f"edgefleet broker-config: {err}", flush=True)
        return 2
    print(f"broker configuration in {out}:")
    for change in files.changes:
        print(change.line())
    for user, path in files.credentials.items():
        print(f"  new user {user}: password in {path}")
    for note in files.notes:
        print(f"  note: {note}")
    if files.ca_key is not None:
        print(
            f"  fleet CA: {files.ca_cert} (keep {files.ca_key} off the broker once devices are provisioned)"
        )
    if files.host_config is not None:
        cdir = files.host_config.parent
        print(
            f"controller: {files.host_config} is the host commands' broker config; on the host run "
            f"`install -d -m 0700 ~/.config/edgefleet && install -m 0600 {cdir}/* ~/.config/edgefleet/` "
            f"(or point --config / EDGEFLEET_HOST_CONFIG at it; for a controller service, /etc/edgefleet/ "
            f"owned by its user, mode 0600)"
        )
    staged = install_dir.resolve() != out.resolve()
    if staged:
        installed = [install_dir / p.name for p in files.broker_reads]
        print(
            f"install: `sudo cp -a {out}/. {install_dir}/` (credentials/ and controller/ need not go), then "
            f"`{ownership_command(installed)}`, include {install_dir / 'mosquitto.conf'} from "
            "/etc/mosquitto/conf.d/ or run `mosquitto -c`, then `sudo systemctl restart mosquitto`"
        )
        return 0
    fix = broker_files_to_fix(files.broker_reads)
    if fix and (files.changed(*fix) or broker_account() is not None):
        print(f"mosquitto must own what it reads: {ownership_command(fix)}")
    restart = [
        files.conf,
        *([out / "ca.crt", out / "server.crt", out / "server.key"] if files.ca_cert else []),
    ]
    if all(c.change is Change.CREATED for c in files.changes if c.path == files.conf):
        print(
            f"install: include {files.conf} from /etc/mosquitto/conf.d/ or run `mosquitto -c {files.conf}`, "
            "then `sudo systemctl restart mosquitto`"
        )
    elif files.changed(*restart):
        print(RESTART_HINT)
    elif files.changed(files.passwd, files.acl):
        print(RELOAD_HINT)
    return 0


def register(subparsers: Any, parents: Sequence[argparse.ArgumentParser] = ()) -> None:
    """Add ``broker-config`` to the ``edgefleet`` command line."""
    p = subparsers.add_parser(
        "broker-config",
        parents=list(parents),
        help="write a hardened mosquitto.conf, passwd and ACL for the fleet",
    )
    p.add_argument("--out", type=Path, required=True, help="output directory")
    p.add_argument("--devices", help="comma-separated device ids to create passwords for")
    p.add_argument("--tls", action="store_true", help="TLS listener (creates a fleet CA and a server cert)")
    # If the common broker flags are mounted here, --port means where to connect; then use --listen-port.
    taken = {opt for action in p._actions for opt in action.option_strings}
    port_flags = ["--listen-port"] if "--port" in taken else ["--port", "--listen-port"]
    p.add_argument(
        *port_flags, dest="listen_port", type=int, help="listener port (default: 8883 with --tls, else 1883)"
    )
    p.add_argument("--cert-port", type=int, help="also an mTLS listener here: client certificate CN = user")
    p.add_argument("--bind", help="listener address (default: all interfaces)")
    p.add_argument(
        "--install-dir", type=Path, help="where the files will live on the broker (default: --out)"
    )
    p.add_argument("--state-dir", type=Path, default=Path("/var/lib/mosquitto"), help="persistence location")
    p.add_argument("--log-dest", default="syslog", help="mosquitto log_dest (default: %(default)s)")
    p.add_argument(
        "--server-name", action="append", help="DNS name or IP in the server certificate (repeatable)"
    )
    if "--namespace" not in taken:
        p.add_argument("--namespace", help=f"topic namespace (default: {wire.DEFAULT_NAMESPACE})")
    p.add_argument(
        "--controller-host",
        help="broker host name in controller/host.toml (default: the first --server-name, else this host)",
    )
    p.set_defaults(func=_cmd_broker_config)
