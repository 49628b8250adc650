"""broker-config and provision: file formats, and the generated files against a real mosquitto."""

from __future__ import annotations

import argparse
import base64
import os
import shutil
import signal
import stat
import subprocess
import time
import tomllib
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from agent import wire
from agent.config import parse_config
from deploy import brokerconf, collect, provision
from deploy.broker import MosquittoBroker, find_mosquitto, free_port
from deploy.brokerconf import BrokerSpec, check_password, hash_password, render_acl, write_broker_config
from deploy.errors import BrokerError, PublishError
from deploy.mqtt import BrokerOptions, MqttSession
from deploy.provision import ProvisionError, ProvisionRequest

MOSQUITTO_PASSWD = shutil.which("mosquitto_passwd") or "/usr/bin/mosquitto_passwd"


def public_key_file(tmp_path: Path) -> Path:
    pub = Ed25519PrivateKey.generate().public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)
    path = tmp_path / "signing.pub"
    path.write_text(base64.b64encode(pub).decode() + "\n")
    return path


# ------------------------------------------------------------------------------------------- unit


def test_password_hash_format_matches_mosquitto() -> None:
    hashed = hash_password("s3cret", salt=b"0123456789ab")
    _, alg, iterations, salt, digest = hashed.split("$")
    assert (alg, iterations, len(base64.b64decode(salt)), len(base64.b64decode(digest))) == (
        "7",
        "101",
        12,
        64,
    )
    assert check_password("s3cret", hashed)
    assert not check_password("wrong", hashed)


@pytest.mark.skipif(not Path(MOSQUITTO_PASSWD).exists(), reason="mosquitto_passwd is not installed")
def test_hashes_of_mosquitto_passwd_verify(tmp_path: Path) -> None:
    path = tmp_path / "passwd"
    subprocess.run([MOSQUITTO_PASSWD, "-c", "-b", str(path), "alice", "s3cret"], check=True, timeout=10)
    hashed = brokerconf.read_passwd(path)["alice"]
    assert hashed.startswith("$7$101$")
    assert check_password("s3cret", hashed)
    brokerconf.set_passwords(path, {"bob": "other"})  # appending keeps mosquitto's line intact
    users = brokerconf.read_passwd(path)
    assert users["alice"] == hashed
    assert check_password("other", users["bob"])
    assert stat.S_IMODE(path.stat().st_mode) == 0o600


def test_acl_uses_patterns_and_no_anonymous_topic_lines() -> None:
    acl = render_acl("fleet")
    lines = [ln for ln in acl.splitlines() if ln and not ln.startswith("#")]
    first_user = next(i for i, ln in enumerate(lines) if ln.startswith("user "))
    assert not any(ln.startswith("topic ") for ln in lines[:first_user])
    assert "pattern write fleet/devices/%u/status" in lines
    assert "pattern read fleet/devices/%u/assign/+" in lines
    assert "pattern write homeassistant/+/%u/+/config" in lines
    assert not any(ln.startswith("pattern write fleet/models") for ln in lines)


def test_conf_is_sized_and_hardened(tmp_path: Path) -> None:
    text = brokerconf.render_conf(
        BrokerSpec(install_dir=Path("/etc/mosquitto/edgefleet"), port=8883, tls=True)
    )
    for line in (
        "allow_anonymous false",
        "password_file /etc/mosquitto/edgefleet/passwd",
        "acl_file /etc/mosquitto/edgefleet/acl",
        "set_tcp_nodelay true",
        "max_inflight_messages 64",
        "persistence true",
        "listener 8883",
        "keyfile /etc/mosquitto/edgefleet/server.key",
        "per_listener_settings false",
    ):
        assert line in text.splitlines(), line
    mixed = brokerconf.render_conf(BrokerSpec(install_dir=tmp_path, port=8883, tls=True, cert_port=8884))
    assert "per_listener_settings true" in mixed
    assert mixed.count("allow_anonymous false") == 2
    assert "use_identity_as_username true" in mixed


def test_provision_writes_a_valid_bundle(tmp_path: Path) -> None:
    out = tmp_path / "bundle"
    passwd = tmp_path / "passwd"
    req = ProvisionRequest(
        device="pi-kitchen",
        out=out,
        broker_host="broker.lan",
        device_class="fast",
        public_key=public_key_file(tmp_path),
        passwd=passwd,
    )
    bundle = provision.provision(req)
    config = parse_config(tomllib.loads((out / "agent.toml").read_text()))
    assert config.device.id == "pi-kitchen"
    assert config.device.device_class == "fast"
    assert (config.mqtt.host, config.mqtt.port, config.mqtt.username) == ("broker.lan", 1883, "pi-kitchen")
    assert config.mqtt.password_file == Path("/etc/edgefleet/mqtt-password")
    assert config.store.path == Path("/var/lib/edgefleet")
    assert len(config.trusted_keys()) == 1
    password = (out / "mqtt-password").read_text().strip()
    assert stat.S_IMODE((out / "mqtt-password").stat().st_mode) == 0o600
    assert check_password(password, brokerconf.read_passwd(passwd)["pi-kitchen"])
    assert "systemctl enable --now edgefleet-agent" in (out / "INSTALL.md").read_text()
    assert bundle.password == password
    # Re-provisioning rotates the password in place.
    provision.provision(req)
    assert len(brokerconf.read_passwd(passwd)) == 1
    assert check_password(
        (out / "mqtt-password").read_text().strip(), brokerconf.read_passwd(passwd)["pi-kitchen"]
    )


@pytest.mark.parametrize("device", ["Pi", "edgefleet-controller", "../x", ""])
def test_provision_refuses_bad_or_reserved_ids(tmp_path: Path, device: str) -> None:
    req = ProvisionRequest(
        device=device, out=tmp_path / "b", broker_host="h", public_key=public_key_file(tmp_path)
    )
    with pytest.raises(wire.IdentifierError):
        provision.provision(req)
    with pytest.raises(ProvisionError):
        provision.provision(replace(req, device="pi-1", cert=True))  # --cert without a CA


def test_register_adds_subcommands() -> None:
    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers()
    collect.register(sub)
    brokerconf.register(sub)
    provision.register(sub)
    args = parser.parse_args(["provision", "pi-1", "--out", "x", "--cert", "--class", "fast"])
    assert (args.device, args.cert, args.device_class) == ("pi-1", True, "fast")
    args = parser.parse_args(["broker-config", "--out", "d", "--tls", "--port", "8883", "--devices", "a,b"])
    assert (args.listen_port, args.tls) == (8883, True)
    args = parser.parse_args(["collect", "--db", "f.db", "--duration", "1", "--share", "g"])
    assert callable(args.func)


# ------------------------------------------------------------------------------------------- integration


@pytest.fixture
def fleet_broker(tmp_path: Path) -> Iterator[tuple[MosquittoBroker, Path, int]]:
    """A mosquitto running the generated config (TLS password listener + mTLS listener) on loopback."""
    if find_mosquitto() is None:
        pytest.skip("mosquitto is not installed")
    out = tmp_path / "broker"
    port, cert_port = free_port(), free_port()
    spec = BrokerSpec(
        install_dir=out,
        port=port,
        bind="127.0.0.1",
        tls=True,
        cert_port=cert_port,
        state_dir=tmp_path / "state",
        log_dest=f"file {tmp_path / 'state' / 'mosquitto.log'}",
        extra=["user root"] if os.geteuid() == 0 else [],  # as root, mosquitto would drop to "mosquitto"
    )
    (tmp_path / "state").mkdir()
    write_broker_config(out, spec, devices=["pi-1", "pi-2"], server_names=["localhost", "127.0.0.1"])
    broker = MosquittoBroker(
        port=port, state_dir=tmp_path / "state", config=(out / "mosquitto.conf").read_text()
    )
    with broker:
        yield broker, out, cert_port


def opts(
    broker: MosquittoBroker, out: Path, user: str | None, password: str | None, **kw: object
) -> BrokerOptions:
    return BrokerOptions(
        host="127.0.0.1",
        port=broker.port,
        username=user,
        password=password,
        tls_ca=out / "ca.crt",
        connect_timeout_s=5,
        **kw,  # type: ignore[arg-type]
    )


def cred(out: Path, user: str) -> str:
    return (out / "credentials" / f"{user}.password").read_text().strip()


@pytest.mark.integration
def test_generated_broker_config_enforces_auth_and_acl(
    fleet_broker: tuple[MosquittoBroker, Path, int],
) -> None:
    broker, out, _ = fleet_broker
    t = wire.Topics()
    own = wire.Status(device="pi-1", online=True, ts=1.0).to_json()
    with MqttSession(opts(broker, out, "pi-1", cred(out, "pi-1"))) as dev:
        dev.publish(t.status("pi-1"), own, retain=True)
        dev.publish(t.events("pi-1"), wire.Event(device="pi-1", ts=1.0, kind=wire.EventKind.PONG).to_json())
        dev.flush()
        with pytest.raises(PublishError, match="0x87"):
            dev.publish(t.status("pi-2"), wire.Status(device="pi-2", online=True, ts=1.0).to_json())
            dev.flush()
        with pytest.raises(PublishError, match="0x87"):
            dev.publish(t.manifest("digits"), b"{}")
            dev.flush()
    with pytest.raises(BrokerError, match="refused"):
        MqttSession(opts(broker, out, "pi-1", "wrong-password")).connect()
    with pytest.raises(BrokerError, match="refused"):
        MqttSession(opts(broker, out, None, None)).connect()
    # The controller reads what devices published; the collector may not publish device topics.
    with MqttSession(
        opts(broker, out, brokerconf.CONTROLLER_USER, cred(out, brokerconf.CONTROLLER_USER))
    ) as ctl:
        got = ctl.collect_retained([t.all_statuses()], quiet_s=0.3)
        assert got == {t.status("pi-1"): own}
    with (
        MqttSession(
            opts(broker, out, brokerconf.COLLECTOR_USER, cred(out, brokerconf.COLLECTOR_USER))
        ) as col,
        pytest.raises(PublishError, match="0x87"),
    ):
        col.publish(t.status("pi-1"), own)
        col.flush()


@pytest.mark.integration
def test_provisioned_credentials_work(
    fleet_broker: tuple[MosquittoBroker, Path, int], tmp_path: Path
) -> None:
    broker, out, cert_port = fleet_broker
    t = wire.Topics()
    key = public_key_file(tmp_path)
    base = ProvisionRequest(
        device="pi-new",
        out=tmp_path / "pw-bundle",
        broker_host="127.0.0.1",
        broker_port=broker.port,
        public_key=key,
        ca_cert=out / "ca.crt",
        ca_key=out / "ca.key",
        passwd=out / "passwd",
    )
    bundle = provision.provision(base)
    config = parse_config(tomllib.loads((base.out / "agent.toml").read_text()))
    assert config.mqtt.tls is not None and config.mqtt.tls.ca_file == Path("/etc/edgefleet/ca.crt")
    assert broker.pid is not None
    os.kill(broker.pid, signal.SIGHUP)  # mosquitto reloads passwd and acl
    status = wire.Status(device="pi-new", online=True, ts=1.0).to_json()
    for _ in range(50):  # the reload is asynchronous
        try:
            session = MqttSession(opts(broker, out, "pi-new", bundle.password)).connect()
            break
        except BrokerError:
            time.sleep(0.1)
    else:
        pytest.fail("provisioned password was not accepted after SIGHUP")
    with session:
        session.publish(t.status("pi-new"), status)
        session.flush()

    cert_req = replace(
        base, device="pi-cert", out=tmp_path / "cert-bundle", cert=True, broker_port=cert_port, passwd=None
    )
    provision.provision(cert_req)
    config = parse_config(tomllib.loads((cert_req.out / "agent.toml").read_text()))
    assert config.mqtt.username is None and config.mqtt.tls is not None
    assert config.mqtt.tls.cert_file == Path("/etc/edgefleet/client.crt")
    cert_opts = BrokerOptions(
        host="127.0.0.1",
        port=cert_port,
        tls_ca=cert_req.out / "ca.crt",
        tls_cert=cert_req.out / "client.crt",
        tls_key=cert_req.out / "client.key",
        connect_timeout_s=5,
    )
    with MqttSession(cert_opts) as dev:
        dev.publish(t.status("pi-cert"), wire.Status(device="pi-cert", online=True, ts=1.0).to_json())
        dev.flush()
        with pytest.raises(PublishError, match="0x87"):
            dev.publish(t.status("pi-1"), status)
            dev.flush()
    # Without a client certificate the mTLS listener refuses the TLS handshake.
    with pytest.raises(BrokerError):
        MqttSession(replace(cert_opts, tls_cert=None, tls_key=None)).connect()
