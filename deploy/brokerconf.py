"""``edgefleet broker-config``: a hardened mosquitto configuration for a fleet, with its credentials.

::

    edgefleet broker-config --out DIR [--devices a,b,c] [--tls] [--port 8883] [--cert-port 8884]
                            [--install-dir /etc/mosquitto/edgefleet] [--server-name broker.lan ...]

writes into DIR:

    mosquitto.conf     allow_anonymous false, password_file, acl_file, set_tcp_nodelay, queue limits
                       sized for 32-chunk windows of 256 KiB, persistence; with --tls a TLS listener
    passwd             mosquitto's PBKDF2-SHA512 ``$7$`` hashes (controller, collector, --devices)
    acl                ``pattern`` lines: every device (user name = device id) writes only its own topics
    credentials/       one ``<user>.password`` per generated user (mode 0600): hand them out, then delete
    ca.crt ca.key      the fleet CA (--tls or --cert-port); keep ca.key off the broker in production,
    server.crt/.key    the broker's certificate (SANs: --server-name, localhost, 127.0.0.1)

Facts this relies on (FACTS.md, mosquitto 2.0): in an ``acl_file``, ``topic`` lines before any
``user`` line apply only to anonymous clients, so per-device rules are ``pattern`` lines with ``%u``;
with MQTT v5 a refused publish gets PUBACK 0x87; ``use_identity_as_username`` maps a client
certificate's CN to the user name; mixing password and certificate listeners needs
``per_listener_settings true`` (then every auth setting follows its listener).
"""

from __future__ import annotations

import argparse
import base64
import datetime as dt
import hashlib
import ipaddress
import os
import secrets
import socket
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cryptography import x509
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
_SALT_BYTES = 12
_HASH_BYTES = 64


class BrokerConfigError(DeployError):
    """Broker configuration files cannot be written or read."""


# ------------------------------------------------------------------------------------------------ files


def write_private(path: Path, data: bytes | str, mode: int = 0o600) -> None:
    """Write atomically with ``mode`` from the first byte (temp file in the same directory, fsync, rename)."""
    raw = data.encode("utf-8") if isinstance(data, str) else data
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(raw)
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, mode)  # umask may have narrowed it
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


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


def set_passwords(path: Path, passwords: dict[str, str]) -> None:
    """Add or replace users in a mosquitto password file (atomically, mode 0600)."""
    users = read_passwd(path)
    for user, password in passwords.items():
        users[_check_user(user)] = hash_password(password)
    write_private(path, "".join(f"{u}:{h}\n" for u, h in users.items()))


# ------------------------------------------------------------------------------------------------ ACL


def render_acl(
    namespace: str = wire.DEFAULT_NAMESPACE,
    controller: str = CONTROLLER_USER,
    collector: str = COLLECTOR_USER,
    ha_prefix: str = HA_PREFIX,
) -> str:
    """The fleet ACL. Devices are covered by ``pattern`` lines (``%u`` = user name = device id)."""
    ns = wire.check_id(namespace, "namespace")
    dev = f"{ns}/devices/%u"
    return f"""\
# edgefleet ACL (generated by `edgefleet broker-config`). mosquitto reads it at start and on SIGHUP.
# No `topic` line before the first `user` line: those would apply to anonymous clients only.

# The controller publishes models, blobs, assignments and commands, and reads every device topic.
user {_check_user(controller)}
topic readwrite {ns}/models/#
topic readwrite {ns}/blobs/#
topic readwrite {ns}/devices/+/assign/+
topic write {ns}/devices/+/cmd
topic read {ns}/devices/#
topic read $SYS/broker/#

# The collector only reads device topics (shared subscriptions included).
user {_check_user(collector)}
topic read {ns}/devices/+/status
topic read {ns}/devices/+/reports/+
topic read {ns}/devices/+/events
topic read {ns}/devices/+/telemetry

# Every device: user name = device id. Applies to all users; the service users above have
# names that no device may take (ids starting with "{RESERVED_PREFIX}" are refused by provisioning).
pattern write {dev}/status
pattern write {dev}/reports/+
pattern write {dev}/events
pattern write {dev}/telemetry
pattern write {ha_prefix}/+/%u/+/config
pattern read {ns}/models/+/manifest
pattern read {ns}/blobs/#
pattern read {dev}/assign/+
pattern read {dev}/cmd
"""


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

    def write(self, cert_path: Path, key_path: Path) -> None:
        write_private(cert_path, self.cert_pem(), 0o644)
        write_private(key_path, self.key_pem(), 0o600)


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
        "# mosquitto's defaults (20 in flight, 1000 queued) cut larger bursts silently.",
        f"per_listener_settings {'true' if per_listener else 'false'}",
        "set_tcp_nodelay true",
        "max_inflight_messages 64",
        "max_queued_messages 10000",
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


def default_server_names() -> list[str]:
    return [socket.gethostname(), "localhost", "127.0.0.1", "::1"]


def write_broker_config(
    out: Path,
    spec: BrokerSpec,
    devices: Iterable[str] = (),
    namespace: str = wire.DEFAULT_NAMESPACE,
    server_names: Sequence[str] = (),
) -> BrokerFiles:
    """Write conf, passwd, acl, credentials and (for TLS) the CA and server certificate into ``out``."""
    devices = [check_device_id(d) for d in devices]
    out.mkdir(parents=True, exist_ok=True)
    files = BrokerFiles(out, out / "mosquitto.conf", out / "passwd", out / "acl", {})
    if spec.tls or spec.cert_port is not None:
        ca_cert, ca_key = out / "ca.crt", out / "ca.key"
        ca = load_ca(ca_cert, ca_key) if ca_cert.exists() and ca_key.exists() else create_ca()
        ca.write(ca_cert, ca_key)
        names = list(server_names) or default_server_names()
        issue_cert(ca, names[0], server_names=names).write(out / "server.crt", out / "server.key")
        files.ca_cert, files.ca_key = ca_cert, ca_key
    existing = read_passwd(files.passwd)
    passwords = {
        user: new_password() for user in (CONTROLLER_USER, COLLECTOR_USER, *devices) if user not in existing
    }
    set_passwords(files.passwd, passwords)
    for user, password in passwords.items():
        path = out / "credentials" / f"{user}.password"
        write_private(path, password + "\n")
        files.credentials[user] = path
    write_private(files.acl, render_acl(namespace), 0o644)
    write_private(files.conf, render_conf(spec), 0o644)
    return files


# ------------------------------------------------------------------------------------------------ CLI


def _cmd_broker_config(args: argparse.Namespace) -> int:
    out: Path = args.out
    devices = [d.strip() for d in (args.devices or "").split(",") if d.strip()]
    port = args.listen_port or (8883 if args.tls else 1883)
    spec = BrokerSpec(
        install_dir=args.install_dir or out.resolve(),
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
        )
    except (DeployError, wire.IdentifierError, OSError) as err:
        print(f"edgefleet broker-config: {err}", flush=True)
        return 2
    print(f"wrote {files.conf}, {files.passwd}, {files.acl}")
    for user, path in files.credentials.items():
        print(f"  new user {user}: password in {path}")
    if files.ca_key is not None:
        print(
            f"  fleet CA: {files.ca_cert} (keep {files.ca_key} off the broker once devices are provisioned)"
        )
    print(
        f"install: copy {out} to {spec.install_dir}, make passwd, acl and server.key readable by the "
        "mosquitto user only (chown mosquitto, chmod 600), include mosquitto.conf from "
        "/etc/mosquitto/conf.d/ or run `mosquitto -c`, then `systemctl restart mosquitto`"
    )
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
    p.set_defaults(func=_cmd_broker_config)
