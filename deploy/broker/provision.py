"""``edgefleet provision``: one device's bundle, ready for a field engineer to copy onto the device.

::

    edgefleet provision pi-kitchen --out bundles/pi-kitchen --broker-host broker.lan [--broker-port 8883]
                        [--broker-dir DIR] [--passwd FILE] [--acl FILE] [--cert] [--rotate]
                        [--class fast] [--public-key FILE] [--namespace NS]

``--broker-dir`` is the output of ``edgefleet broker-config`` (or where it was installed, e.g.
/etc/mosquitto/edgefleet): its ``ca.crt`` goes into the bundle (TLS), its ``ca.key`` signs the client
certificate (``--cert``), its ``passwd`` receives the device's password hash, its ``acl`` the device's
block, and its ``credentials/`` is where broker-config left the passwords of ``--devices``. The bundle::

    agent.toml          validated with agent.config.parse_config before it is written
    mqtt-password       the device's password (0600)   — or, with --cert:
    client.crt/.key     a client certificate (CN = device id) signed by the fleet CA
    ca.crt              the CA that signed the broker's certificate (when the broker uses TLS)
    trusted.pub         the fleet's Ed25519 signing public key (also inline in agent.toml)
    edgefleet-agent.service, edgefleet.sysusers.conf   copied from systemd/ when the repository has them
    INSTALL.md          the commands to run on the device

Credentials are never replaced behind the operator's back: a device already in the password file
keeps its password, taken from ``credentials/<device>.password`` or the bundle's ``mqtt-password``
(checked against the hash); if neither exists provisioning refuses and asks for ``--rotate``, which
issues a new password (the old one stops working at the next reload). A client certificate in the
bundle that still fits is kept likewise. Files mosquitto reads (passwd, acl) keep their owner, group
and mode; see deploy.broker.conf for the ownership rule.
"""

from __future__ import annotations

import argparse
import base64
import json
import sys
import tomllib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from agent import wire
from agent.config import parse_config
from agent.errors import ConfigError
from deploy.broker.conf import (
    RELOAD_HINT,
    BrokerConfigError,
    FileChange,
    acl_namespace,
    acl_unscoped_patterns,
    add_acl_device,
    broker_account,
    broker_files_to_fix,
    check_device_id,
    check_password,
    issue_cert,
    load_ca,
    new_password,
    ownership_command,
    read_passwd,
    reusable_cert,
    set_passwords,
    write_file,
)
from deploy.errors import DeployError

ETC = Path("/etc/edgefleet")
VENV = Path("/opt/edgefleet/venv")
SYSTEMD_DIR = Path(__file__).resolve().parents[2] / "systemd"
AGENT_UNIT = SYSTEMD_DIR / "edgefleet-agent.service"
SYSUSERS = SYSTEMD_DIR / "edgefleet.sysusers.conf"


class ProvisionError(DeployError):
    """A device bundle cannot be produced (bad id, missing CA or key, invalid resulting config, or
    existing credentials that cannot be reused without --rotate)."""


@dataclass(frozen=True)
class ProvisionRequest:
    device: str
    out: Path
    broker_host: str
    broker_port: int | None = None
    device_class: str | None = None
    public_key: Path | None = None
    ca_cert: Path | None = None  # TLS to the broker when given
    ca_key: Path | None = None  # needed for cert
    passwd: Path | None = None  # broker password file to update
    acl: Path | None = None  # broker ACL to give the device its block in
    credentials_dir: Path | None = None  # broker-config's credentials/ (passwords of --devices)
    cert: bool = False
    rotate: bool = False  # issue new credentials even if the device has some
    namespace: str | None = None  # None: the ACL's namespace, else the default
    etc: Path = ETC


@dataclass
class Bundle:
    out: Path
    files: list[Path] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    password: str | None = field(default=None, repr=False)
    changes: list[FileChange] = field(default_factory=list)
    broker_files: list[Path] = field(default_factory=list)  # what mosquitto reads (passwd, acl)
    rotated: bool = False

    @property
    def broker_changed(self) -> bool:
        """True if the broker must reload (SIGHUP) to see this device's credentials or ACL."""
        return any(c.changed and c.path in self.broker_files for c in self.changes)


def _toml_str(value: str) -> str:
    return json.dumps(value, ensure_ascii=True)  # a JSON string is a valid TOML basic string


def render_agent_toml(
    req: ProvisionRequest,
    public_key_b64: str,
    tls: bool,
    port: int,
    username: str | None,
    namespace: str = wire.DEFAULT_NAMESPACE,
) -> str:
    etc = req.etc
    lines = [
        f"# edgefleet agent configuration for {req.device} (generated by `edgefleet provision`)",
        "[device]",
        f"id = {_toml_str(req.device)}",
    ]
    if req.device_class:
        lines.append(f"class = {_toml_str(req.device_class)}")
    lines += [
        "",
        "[mqtt]",
        f"host = {_toml_str(req.broker_host)}",
        f"port = {port}",
        f"namespace = {_toml_str(namespace)}",
        'protocol = "v5"',
    ]
    if username is not None:
        lines += [
            f"username = {_toml_str(username)}",
            f"password_file = {_toml_str(str(etc / 'mqtt-password'))}",
        ]
    if tls:
        lines += ["", "[mqtt.tls]", f"ca_file = {_toml_str(str(etc / 'ca.crt'))}"]
        if req.cert:
            lines += [
                f"cert_file = {_toml_str(str(etc / 'client.crt'))}",
                f"key_file = {_toml_str(str(etc / 'client.key'))}",
            ]
    lines += [
        "",
        "[trust]",
        f"public_keys = [{_toml_str(public_key_b64)}]",
        "",
        "[store]",
        'path = "/var/lib/edgefleet"',
        "",
    ]
    return "\n".join(lines)


def _public_key_b64(path: Path) -> str:
    try:
        key = wire.public_key_from_text(path.read_text(encoding="ascii"))
    except (OSError, UnicodeDecodeError) as err:
        raise ProvisionError(f"cannot read the fleet public key {path}: {err}") from err
    except wire.SignatureError as err:
        raise ProvisionError(f"{path}: {err}") from err
    return base64.b64encode(key.public_bytes(Encoding.Raw, PublicFormat.Raw)).decode("ascii")


_NOT_INSTALLED = ("INSTALL.md", AGENT_UNIT.name, SYSUSERS.name)


def _install_md(req: ProvisionRequest, files: Sequence[str], has_unit: bool, has_sysusers: bool) -> str:
    etc = req.etc
    venv_bin = VENV / "bin"
    bundle = f"/tmp/{req.out.name}"
    config_files = " ".join(f"{bundle}/{f}" for f in files if f not in _NOT_INSTALLED)
    sysusers = (
        f"sudo install -m 0644 {bundle}/{SYSUSERS.name} /usr/lib/sysusers.d/edgefleet.conf\n"
        "sudo systemd-sysusers\n"
        if has_sysusers
        else "sudo useradd --system --user-group --no-create-home --home-dir /nonexistent "
        "--shell /usr/sbin/nologin --groups video edgefleet\n"
    )
    unit = (
        f"sudo install -m 0644 {bundle}/{AGENT_UNIT.name} /etc/systemd/system/\n"
        if has_unit
        else "# (no edgefleet-agent.service in this bundle: take it from the repository's systemd/)\n"
    )
    return f"""# Installing edgefleet on {req.device}

On the host, build the wheel (`.venv/bin/python -m pip wheel --no-deps -w dist .`) and copy it with
this directory to the device:

```sh
scp -r dist/edgefleet-*.whl {req.out} pi@{req.device}:/tmp/
```

Then on the device (Debian 12 / Raspberry Pi OS or later, Python >= 3.11):

```sh
{sysusers}sudo python3 -m venv {VENV}
sudo {venv_bin}/pip install "$(ls /tmp/edgefleet-*.whl)[agent]"
sudo install -d -m 0750 -o root -g edgefleet {etc}
sudo install -m 0640 -o root -g edgefleet {config_files} {etc}/
sudo install -d -m 0750 -o edgefleet -g edgefleet /var/lib/edgefleet
sudo -u edgefleet {venv_bin}/edgefleet-agent --config {etc}/agent.toml --check-config --connect
{unit}sudo systemctl daemon-reload
sudo systemctl enable --now edgefleet-agent
journalctl -u edgefleet-agent -f      # expect "connected" and a status "online"
```

Instead of the copied wheel, the package index: `sudo {venv_bin}/pip install 'edgefleet[agent]'` (the
same version as the host's). The service runs as the system user `edgefleet` (group `edgefleet`, also
in `video` for the power and throttling sensors); {etc} is root:edgefleet 0750 and its files
root:edgefleet 0640, so the agent reads its configuration and secrets and cannot change them.
`--check-config --connect`, run as that user, proves it can read them and reach the broker.

Secrets in this bundle (mqtt-password or client.key) belong to this device only: delete the bundle
from the workstation once it is installed (`edgefleet provision` then needs `--rotate` to make a new
bundle for it). To revoke the device, remove its line from the broker's password file (or stop
trusting its certificate) and reload mosquitto (`sudo systemctl reload mosquitto`).
"""


def _read_secret(path: Path) -> str | None:
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        return None
    except (OSError, UnicodeDecodeError) as err:
        raise ProvisionError(f"cannot read {path}: {err}") from err
    return lines[0].strip() if lines and lines[0].strip() else None


def _password_files(req: ProvisionRequest) -> list[Path]:
    """Where an existing password of the device may be: broker-config's credentials, then the bundle."""
    out = [req.out / "mqtt-password"]
    if req.credentials_dir is not None:
        out.insert(0, req.credentials_dir / f"{req.device}.password")
    return out


def _choose_password(req: ProvisionRequest, hashed: str | None) -> tuple[str, Path | None]:
    """The device's password and the file it came from (None: a new one). Refuses rather than
    silently replacing a password the broker already holds."""
    if req.rotate:
        return new_password(), None
    candidates = _password_files(req)
    found = [(path, pw) for path in candidates if (pw := _read_secret(path)) is not None]
    if hashed is None:
        return (found[0][1], found[0][0]) if found else (new_password(), None)
    for path, pw in found:
        if check_password(pw, hashed):
            return pw, path
    where = " or ".join(str(p) for p in candidates)
    if found:
        raise ProvisionError(
            f"{req.device} is in {req.passwd}, but {found[0][0]} does not hold its password: "
            f"pass --rotate to issue a new one (the old one stops working at the next reload)"
        )
    raise ProvisionError(
        f"{req.device} is already in {req.passwd} and no credentials file was found ({where}): "
        f"pass --rotate to issue a new password (the old one stops working at the next reload)"
    )


def _namespace(req: ProvisionRequest) -> str:
    found = None
    if req.acl is not None:
        try:
            found = acl_namespace(req.acl.read_text(encoding="utf-8"))
        except FileNotFoundError:
            found = None
        except OSError as err:
            raise ProvisionError(f"cannot read the ACL {req.acl}: {err.strerror}") from err
    if req.namespace is not None and found is not None and req.namespace != found:
        raise ProvisionError(f"{req.acl} is the ACL of namespace {found!r}, not {req.namespace!r}")
    return wire.check_id(req.namespace or found or wire.DEFAULT_NAMESPACE, "namespace")


def provision(req: ProvisionRequest) -> Bundle:
    """Write the bundle for ``req.device`` into ``req.out`` and give the device its place in the broker's
    password file and ACL; the agent.toml is validated before anything is written."""
    device = check_device_id(req.device)
    if req.device_class is not None:
        wire.check_id(req.device_class, "device class")
    if req.public_key is None:
        raise ProvisionError("no fleet public key: pass --public-key (e.g. ~/.config/edgefleet/signing.pub)")
    public_b64 = _public_key_b64(req.public_key)
    tls = req.ca_cert is not None
    if req.cert and not (tls and req.ca_key is not None):
        raise ProvisionError(
            "--cert needs the fleet CA certificate and key (--broker-dir or --ca-cert/--ca-key)"
        )
    namespace = _namespace(req)
    port = req.broker_port or (8883 if tls else 1883)
    username = None if req.cert else device
    text = render_agent_toml(req, public_b64, tls, port, username, namespace)
    try:
        parse_config(tomllib.loads(text), source=f"{device}/agent.toml")
    except ConfigError as err:
        raise ProvisionError(f"the generated agent.toml does not validate: {err}") from err

    # Decide the credentials before writing anything: a refusal leaves every file as it was.
    password: str | None = None
    password_from: Path | None = None
    hashed: str | None = None
    if not req.cert:
        try:
            hashed = read_passwd(req.passwd).get(device) if req.passwd is not None else None
        except BrokerConfigError as err:
            raise ProvisionError(str(err)) from err
        password, password_from = _choose_password(req, hashed)

    out = req.out
    out.mkdir(parents=True, exist_ok=True)
    bundle = Bundle(out)

    def put(name: str, data: bytes | str, mode: int = 0o644) -> None:
        bundle.changes.append(write_file(out / name, data, mode))
        bundle.files.append(out / name)

    put("agent.toml", text)
    put("trusted.pub", public_b64 + "\n")
    if tls and req.ca_cert is not None:
        try:
            put("ca.crt", req.ca_cert.read_bytes())
        except OSError as err:
            raise ProvisionError(f"cannot read the CA certificate {req.ca_cert}: {err.strerror}") from err
    if req.cert:
        _client_cert(req, device, put, bundle)
    else:
        assert password is not None
        _password(req, device, password, password_from, hashed, put, bundle)
    if req.acl is not None:
        try:
            bundle.changes.append(add_acl_device(req.acl, device, namespace))
        except BrokerConfigError as err:
            raise ProvisionError(str(err)) from err
        bundle.broker_files.append(req.acl)
        unscoped = acl_unscoped_patterns(req.acl.read_text(encoding="utf-8"))
        if unscoped:
            bundle.notes.append(
                f"{req.acl} has {len(unscoped)} pattern line(s) without %u or %c (mosquitto warns on every "
                f"start): run `edgefleet broker-config` again on its directory to regenerate it"
            )
    else:
        bundle.notes.append(
            f"no broker ACL given: add `user {device}` with `topic read {namespace}/models/+/manifest` and "
            f"`topic read {namespace}/blobs/#` to the broker's acl_file (or pass --broker-dir / --acl)"
        )
    has_unit, has_sysusers = AGENT_UNIT.exists(), SYSUSERS.exists()
    if has_unit:
        put(AGENT_UNIT.name, AGENT_UNIT.read_bytes())
    else:
        bundle.notes.append(f"{AGENT_UNIT.name} is not in the repository's systemd/: the bundle has no unit")
    if has_sysusers:
        put(SYSUSERS.name, SYSUSERS.read_bytes())
    put("INSTALL.md", _install_md(req, [p.name for p in bundle.files], has_unit, has_sysusers))
    return bundle


def _client_cert(req: ProvisionRequest, device: str, put: Callable[..., None], bundle: Bundle) -> None:
    assert req.ca_cert is not None and req.ca_key is not None
    try:
        ca = load_ca(req.ca_cert, req.ca_key)
    except BrokerConfigError as err:
        raise ProvisionError(str(err)) from err
    pair = None if req.rotate else reusable_cert(ca, req.out / "client.crt", req.out / "client.key", device)
    if pair is None:
        pair = issue_cert(ca, device, client=True)
        bundle.rotated = req.rotate
        if req.rotate:
            bundle.notes.append(
                f"new client certificate for {device}; the old one stays valid until it expires "
                "(the broker trusts every certificate the fleet CA signed)"
            )
    put("client.crt", pair.cert_pem())
    put("client.key", pair.key_pem(), 0o600)
    bundle.notes.append(
        f"client certificate CN={device} (the broker's cert listener maps it to the user name)"
    )


def _password(
    req: ProvisionRequest,
    device: str,
    password: str,
    password_from: Path | None,
    hashed: str | None,
    put: Callable[..., None],
    bundle: Bundle,
) -> None:
    bundle.password = password
    put("mqtt-password", password + "\n", 0o600)
    if password_from is not None:
        bundle.notes.append(
            f"kept the existing password of {device} (from {password_from}); --rotate issues a new one"
        )
    if req.passwd is None:
        bundle.notes.append(
            f"no broker password file given: run `mosquitto_passwd /etc/mosquitto/edgefleet/passwd "
            f"{device}` with the password in mqtt-password (or pass --broker-dir / --passwd)"
        )
        return
    bundle.broker_files.append(req.passwd)
    if hashed is not None and check_password(password, hashed):
        # Rewrite nothing (comments and order stay); only repairs an owner mosquitto cannot read from.
        bundle.changes.append(write_file(req.passwd, req.passwd.read_bytes(), broker_reads=True))
        return
    change = set_passwords(req.passwd, {device: password})
    if hashed is None:
        detail = f"password entry for {device} added"
    else:
        bundle.rotated = True
        detail = f"password of {device} rotated: the old one stops working at the next reload"
    bundle.changes.append(
        FileChange(change.path, change.change, "; ".join(filter(None, [detail, change.detail])))
    )
    cred = req.credentials_dir / f"{device}.password" if req.credentials_dir else None
    if cred is not None and cred.exists():
        # broker-config's copy would otherwise disagree with the broker from now on.
        bundle.changes.append(write_file(cred, password + "\n", 0o600))


# ------------------------------------------------------------------------------------------------ CLI


def _default_public_key() -> Path | None:
    try:
        from deploy.keys import PUBLIC_NAME, default_key_dir
    except ImportError:
        return None
    path = default_key_dir() / PUBLIC_NAME
    return path if path.exists() else None


def _cmd_provision(args: argparse.Namespace) -> int:
    bdir: Path | None = args.broker_dir

    def in_bdir(name: str) -> Path | None:
        return bdir / name if bdir is not None and (bdir / name).exists() else None

    passwd: Path | None = args.passwd or in_bdir("passwd")
    home = bdir or (passwd.parent if passwd is not None else None)  # broker-config's layout
    acl: Path | None = args.acl or in_bdir("acl")
    if acl is None and passwd is not None and (passwd.parent / "acl").exists():
        acl = passwd.parent / "acl"
    req = ProvisionRequest(
        device=args.device,
        out=args.out,
        broker_host=args.broker_host,
        broker_port=args.broker_port,
        device_class=args.device_class,
        public_key=args.public_key or _default_public_key(),
        ca_cert=args.ca_cert or in_bdir("ca.crt"),
        ca_key=args.ca_key or in_bdir("ca.key"),
        passwd=None if args.cert else passwd,
        acl=acl,
        credentials_dir=home / "credentials" if home is not None else None,
        cert=args.cert,
        rotate=args.rotate,
        namespace=args.namespace,
        etc=args.etc,
    )
    try:
        bundle = provision(req)
    except (DeployError, wire.WireError, OSError) as err:
        print(f"edgefleet provision: {err}", file=sys.stderr, flush=True)
        return 2
    print(f"provision {req.device}: bundle in {bundle.out}")
    for change in bundle.changes:
        print(change.line())
    for note in bundle.notes:
        print(f"  note: {note}")
    changed = [c.path for c in bundle.changes if c.changed]
    fix = broker_files_to_fix(bundle.broker_files)
    if fix and (broker_account() is not None or any(p in changed for p in fix)):
        print(f"mosquitto must own what it reads: {ownership_command(fix)}")
    if bundle.broker_changed:
        print(RELOAD_HINT)
    return 0


def register(subparsers: Any, parents: Sequence[argparse.ArgumentParser] = ()) -> None:
    """Add ``provision`` to the ``edgefleet`` command line."""
    p = subparsers.add_parser(
        "provision",
        parents=list(parents),
        help="create a device's credentials, agent.toml and install bundle",
    )
    p.add_argument("device", help="device id (also its MQTT user name / certificate CN)")
    p.add_argument("--out", type=Path, required=True, help="bundle directory")
    p.add_argument("--broker-host", default="broker.lan", help="broker host name as the device sees it")
    p.add_argument("--broker-port", type=int, help="broker port (default: 8883 with a CA, else 1883)")
    p.add_argument(
        "--broker-dir", type=Path, help="output of `edgefleet broker-config` (ca.crt, ca.key, passwd)"
    )
    p.add_argument(
        "--passwd", type=Path, help="broker password file to add the device to (default: BROKER_DIR/passwd)"
    )
    p.add_argument("--acl", type=Path, help="broker ACL to add the device to (default: BROKER_DIR/acl)")
    p.add_argument(
        "--rotate",
        action="store_true",
        help="issue new credentials even if the device has some (the old password stops working)",
    )
    p.add_argument("--namespace", help="topic namespace (default: the ACL's, else edgefleet)")
    p.add_argument("--ca-cert", type=Path, help="fleet CA certificate (default: BROKER_DIR/ca.crt)")
    p.add_argument("--ca-key", type=Path, help="fleet CA key, for --cert (default: BROKER_DIR/ca.key)")
    p.add_argument("--cert", action="store_true", help="client certificate instead of a password")
    p.add_argument("--class", dest="device_class", help="device class for selection policies")
    p.add_argument(
        "--public-key", type=Path, help="fleet signing public key (default: the keys dir's signing.pub)"
    )
    p.add_argument(
        "--etc", type=Path, default=ETC, help="config directory on the device (default: %(default)s)"
    )
    p.set_defaults(func=_cmd_provision)
