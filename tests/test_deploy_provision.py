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
from deploy import cli
from deploy.broker import conf as brokerconf
from deploy.broker import provision
from deploy.broker.client import BrokerOptions, MqttSession
from deploy.broker.conf import BrokerSpec, check_password, hash_password, render_acl, write_broker_config
from deploy.broker.provision import ProvisionError, ProvisionRequest
from deploy.broker.spawn import MosquittoBroker, find_mosquitto, free_port
from deploy.errors import BrokerError, PublishError
from deploy.observe import collect

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
    st = path.stat()
    if os.geteuid() == 0 and brokerconf.broker_account() is not None:
        # mosquitto_passwd left it root:root 0600, which mosquitto 2 cannot read: repaired
        assert ((st.st_uid, st.st_gid), stat.S_IMODE(st.st_mode)) == (brokerconf.broker_account(), 0o640)
    else:
        assert stat.S_IMODE(st.st_mode) == 0o600  # kept as mosquitto_passwd made it


def test_acl_uses_patterns_and_no_anonymous_topic_lines() -> None:
    acl = render_acl("fleet", ["pi-1", "pi-2"])
    lines = [ln for ln in acl.splitlines() if ln and not ln.startswith("#")]
    first_user = next(i for i, ln in enumerate(lines) if ln.startswith("user "))
    assert not any(ln.startswith("topic ") for ln in lines[:first_user])
    assert "pattern write fleet/devices/%u/status" in lines
    assert "pattern read fleet/devices/%u/assign/+" in lines
    assert "pattern write homeassistant/+/%u/+/config" in lines
    assert not any(ln.startswith("pattern write fleet/models") for ln in lines)
    # mosquitto warns about every pattern without %u/%c: fixed topics go into per-device blocks
    assert all("%u" in ln or "%c" in ln for ln in lines if ln.startswith("pattern "))
    block = lines[lines.index("user pi-2") :]
    assert block == ["user pi-2", "topic read fleet/models/+/manifest", "topic read fleet/blobs/#"]
    assert brokerconf.acl_users(acl) == [
        brokerconf.CONTROLLER_USER,
        brokerconf.COLLECTOR_USER,
        "pi-1",
        "pi-2",
    ]
    assert brokerconf.acl_namespace(acl) == "fleet"


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
    install = (out / "INSTALL.md").read_text()
    files = " ".join(f"/tmp/bundle/{f}" for f in ("agent.toml", "trusted.pub", "mqtt-password"))
    for text in (
        'sudo /opt/edgefleet/venv/bin/pip install "$(ls /tmp/edgefleet-*.whl)[agent]"',
        "sudo /opt/edgefleet/venv/bin/pip install 'edgefleet[agent]'",
        "sudo install -d -m 0750 -o root -g edgefleet /etc/edgefleet\n",
        f"sudo install -m 0640 -o root -g edgefleet {files} /etc/edgefleet/\n",
        "sudo -u edgefleet /opt/edgefleet/venv/bin/edgefleet-agent --config /etc/edgefleet/agent.toml "
        "--check-config --connect",
        "sudo systemd-sysusers",
    ):
        assert text in install, text
    # Re-provisioning keeps the password (the device already has it) and changes nothing.
    again = provision.provision(req)
    assert again.password == password
    assert {c.change for c in again.changes} == {brokerconf.Change.UNCHANGED}
    assert not again.broker_changed
    # --rotate issues a new one, in the bundle and in the password file alike.
    rotated = provision.provision(replace(req, rotate=True))
    assert rotated.password != password and rotated.rotated and rotated.broker_changed
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
        acl=out / "acl",
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


# ------------------------------------------------------------------------------------------- credentials


def broker_dir(tmp_path: Path, devices: list[str], tls: bool = False) -> tuple[Path, brokerconf.BrokerFiles]:
    out = tmp_path / "broker"
    spec = BrokerSpec(install_dir=out, port=8883 if tls else 1883, tls=tls)
    return out, write_broker_config(out, spec, devices=devices, server_names=["localhost"])


def request(tmp_path: Path, bdir: Path, device: str, **kw: object) -> ProvisionRequest:
    return ProvisionRequest(
        device=device,
        out=tmp_path / "bundles" / device,
        broker_host="broker.lan",
        public_key=public_key_file(tmp_path),
        passwd=bdir / "passwd",
        acl=bdir / "acl",
        credentials_dir=bdir / "credentials",
        **kw,  # type: ignore[arg-type]
    )


def test_existing_credentials_are_reused_never_regenerated(tmp_path: Path) -> None:
    bdir, _ = broker_dir(tmp_path, ["pi-1", "pi-2"])
    passwd_before = (bdir / "passwd").read_bytes()
    bundle = provision.provision(request(tmp_path, bdir, "pi-1"))
    # the password broker-config made for pi-1 is the one in the bundle; the broker's files are untouched
    assert bundle.password == cred(bdir, "pi-1")
    assert (bdir / "passwd").read_bytes() == passwd_before
    assert not bundle.broker_changed and not bundle.rotated
    assert any("kept the existing password of pi-1" in n for n in bundle.notes)

    # pi-2's credentials file is gone: refuse (one line, naming --rotate) and write nothing at all
    (bdir / "credentials" / "pi-2.password").unlink()
    req2 = request(tmp_path, bdir, "pi-2")
    with pytest.raises(ProvisionError, match=r"no credentials file was found.*pass --rotate") as err:
        provision.provision(req2)
    assert "\n" not in str(err.value)
    assert not req2.out.exists()
    assert (bdir / "passwd").read_bytes() == passwd_before

    # a credentials file that does not match the broker's hash is refused too
    (bdir / "credentials" / "pi-2.password").write_text("not-the-password\n")
    with pytest.raises(ProvisionError, match="does not hold its password: pass --rotate"):
        provision.provision(req2)

    # --rotate: a new password, in the bundle, the password file and broker-config's credentials file
    rotated = provision.provision(replace(req2, rotate=True))
    assert rotated.rotated and rotated.broker_changed
    new = rotated.password
    assert new is not None and check_password(new, brokerconf.read_passwd(bdir / "passwd")["pi-2"])
    assert cred(bdir, "pi-2") == new
    assert (req2.out / "mqtt-password").read_text().strip() == new
    line = next(c.line() for c in rotated.changes if c.path == bdir / "passwd")
    assert "updated" in line and "password of pi-2 rotated" in line
    # the other users' hashes did not move
    users = brokerconf.read_passwd(bdir / "passwd")
    assert check_password(cred(bdir, "pi-1"), users["pi-1"])
    assert check_password(cred(bdir, brokerconf.CONTROLLER_USER), users[brokerconf.CONTROLLER_USER])


def test_a_client_certificate_that_still_fits_is_kept(tmp_path: Path) -> None:
    bdir, _ = broker_dir(tmp_path, [], tls=True)
    req = replace(
        request(tmp_path, bdir, "pi-cert"),
        cert=True,
        passwd=None,
        ca_cert=bdir / "ca.crt",
        ca_key=bdir / "ca.key",
    )
    provision.provision(req)
    cert = (req.out / "client.crt").read_bytes()
    again = provision.provision(req)
    assert (req.out / "client.crt").read_bytes() == cert
    assert not any(c.changed for c in again.changes)
    provision.provision(replace(req, rotate=True))
    assert (req.out / "client.crt").read_bytes() != cert


def test_provision_adds_the_device_block_and_keeps_operator_lines(tmp_path: Path) -> None:
    bdir, _ = broker_dir(tmp_path, ["pi-1"])
    acl = bdir / "acl"
    acl.write_text(
        acl.read_text() + "\n# operator: a dashboard user\nuser dash\ntopic read edgefleet/devices/#\n"
    )
    bundle = provision.provision(request(tmp_path, bdir, "pi-9"))
    text = acl.read_text()
    assert "user dash\ntopic read edgefleet/devices/#\n" in text
    assert text.endswith(
        "\nuser pi-9\ntopic read edgefleet/models/+/manifest\ntopic read edgefleet/blobs/#\n"
    )
    assert next(c for c in bundle.changes if c.path == acl).change is brokerconf.Change.UPDATED
    again = provision.provision(request(tmp_path, bdir, "pi-9"))
    assert next(c for c in again.changes if c.path == acl).change is brokerconf.Change.UNCHANGED
    # broker-config run again keeps every device it finds (provisioned ones included) and the namespace
    _, files = broker_dir(tmp_path, [])
    assert {"pi-1", "pi-9"} <= set(brokerconf.acl_users(acl.read_text()))
    assert not files.changed(bdir / "passwd")
    # an ACL written before device blocks existed: provision says how to get rid of the warnings
    acl.write_text(acl.read_text() + "pattern read edgefleet/blobs/#\n")
    old = provision.provision(request(tmp_path, bdir, "pi-11"))
    assert any("1 pattern line(s) without %u or %c" in n for n in old.notes)
    broker_dir(tmp_path, [])  # ... and broker-config regenerates it
    assert brokerconf.acl_unscoped_patterns(acl.read_text()) == []
    assert "pi-11" in brokerconf.acl_users(acl.read_text())
    with pytest.raises(ProvisionError, match="namespace 'edgefleet', not 'lab'"):
        provision.provision(replace(request(tmp_path, bdir, "pi-10"), namespace="lab"))


def test_cli_prints_one_line_per_file_and_reload_only_when_needed(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    bdir, _ = broker_dir(tmp_path, ["pi-1"])
    key = public_key_file(tmp_path)
    out = tmp_path / "b7"
    argv = ["provision", "pi-7", "--out", str(out), "--broker-dir", str(bdir), "--public-key", str(key)]
    assert cli.main(argv) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == f"provision pi-7: bundle in {out}"
    assert f"  created   {out / 'agent.toml'}" in lines
    assert f"  created   {out / 'mqtt-password'}" in lines
    assert f"  updated   {bdir / 'passwd'} (password entry for pi-7 added)" in lines
    assert f"  updated   {bdir / 'acl'} (block for pi-7)" in lines
    assert lines[-1] == brokerconf.RELOAD_HINT == "reload mosquitto: sudo systemctl reload mosquitto"

    assert cli.main(argv) == 0  # again: nothing changes, no reload
    lines = capsys.readouterr().out.splitlines()
    assert f"  unchanged {bdir / 'passwd'}" in lines
    assert all(" unchanged " in ln for ln in lines if ln.startswith("  ") and not ln.startswith("  note"))
    assert brokerconf.RELOAD_HINT not in lines

    (out / "mqtt-password").unlink()  # the bundle was deleted after install, as INSTALL.md says
    assert cli.main(argv) == 2
    captured = capsys.readouterr()
    assert "pass --rotate" in captured.err and len(captured.err.strip().splitlines()) == 1
    assert cli.main([*argv, "--rotate"]) == 0
    out_lines = capsys.readouterr().out.splitlines()
    assert any("password of pi-7 rotated" in ln for ln in out_lines)
    assert out_lines[-1] == brokerconf.RELOAD_HINT


def test_broker_config_rerun_changes_nothing_and_adding_a_device_asks_for_a_reload(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "bc"
    argv = ["broker-config", "--out", str(out), "--tls", "--server-name", "broker.lan", "--devices", "pi-1"]
    assert cli.main(argv) == 0
    first = capsys.readouterr().out
    assert f"  created   {out / 'passwd'}" in first and "systemctl restart mosquitto" in first
    assert cli.main(argv) == 0
    again = capsys.readouterr().out
    assert "  created " not in again and "  updated " not in again
    assert "reload mosquitto" not in again and "restart mosquitto" not in again
    assert cli.main([*argv[:-1], "pi-1,pi-2"]) == 0
    added = capsys.readouterr().out.splitlines()
    assert f"  updated   {out / 'passwd'}" in added and f"  updated   {out / 'acl'}" in added
    assert f"  unchanged {out / 'server.crt'}" in added  # the certificate still fits: kept
    assert added[-1] == brokerconf.RELOAD_HINT
    lab = tmp_path / "lab"
    assert cli.main(["broker-config", "--out", str(lab), "--namespace", "lab"]) == 0
    assert brokerconf.acl_namespace((lab / "acl").read_text()) == "lab"
    assert 'namespace = "lab"' in (lab / "controller" / "host.toml").read_text()
    capsys.readouterr()
    host = (out / "controller" / "host.toml").read_text()
    assert 'host = "broker.lan"' in host and 'password_file = "edgefleet-controller.password"' in host
    assert (out / "controller" / "edgefleet-controller.password").read_text() == (
        out / "credentials" / "edgefleet-controller.password"
    ).read_text()


def mode_of(path: Path) -> tuple[int, int, int]:
    st = path.stat()
    return st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode)


def test_files_mosquitto_reads_get_its_owner_and_keep_what_the_operator_set(tmp_path: Path) -> None:
    bdir, _ = broker_dir(tmp_path, ["pi-1"], tls=True)
    account = brokerconf.broker_account()
    root = os.geteuid() == 0
    for name in ("passwd", "acl", "server.key"):
        if root and account is not None:
            assert mode_of(bdir / name) == (*account, 0o640), name
        else:
            assert mode_of(bdir / name)[2] == 0o640, name
    assert mode_of(bdir / "ca.key")[2] == 0o600
    assert mode_of(bdir / "credentials" / "pi-1.password")[2] == 0o600
    assert mode_of(bdir / "controller" / "host.toml")[2] == 0o600
    assert mode_of(bdir / "ca.crt")[2] == 0o644

    # The operator's choices survive a rewrite (another valid one: mosquitto-owned 0600, root:mosquitto 0640).
    if root and account is not None:
        os.chown(bdir / "passwd", *account)
        os.chown(bdir / "acl", 0, account[1])
    os.chmod(bdir / "passwd", 0o600)
    os.chmod(bdir / "acl", 0o640)
    before = {n: mode_of(bdir / n) for n in ("passwd", "acl")}
    bundle = provision.provision(request(tmp_path, bdir, "pi-5"))
    assert bundle.broker_changed
    assert {n: mode_of(bdir / n) for n in ("passwd", "acl")} == before

    if root and account is not None:
        # What the old code left (root:root 0600) is repaired, and the line says so.
        os.chown(bdir / "passwd", 0, 0)
        os.chmod(bdir / "passwd", 0o600)
        bundle = provision.provision(request(tmp_path, bdir, "pi-6"))
        assert mode_of(bdir / "passwd") == (*account, 0o640)
        line = next(c.line() for c in bundle.changes if c.path == bdir / "passwd")
        assert "owner set to mosquitto:mosquitto 0640" in line


def test_without_root_the_chown_command_is_printed_once(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(brokerconf, "_is_root", lambda: False)
    monkeypatch.setattr(brokerconf, "broker_account", lambda: None)
    monkeypatch.setattr(provision, "broker_account", lambda: None)
    out = tmp_path / "bc"
    assert cli.main(["broker-config", "--out", str(out), "--tls", "--devices", "pi-1"]) == 0
    text = capsys.readouterr().out
    paths = f"{out / 'passwd'} {out / 'acl'} {out / 'server.key'}"
    expected = f"sudo chown mosquitto:mosquitto {paths} && sudo chmod 0640 {paths}"
    assert text.count("sudo chown") == 1 and expected in text
    key = public_key_file(tmp_path)
    argv = [
        "provision",
        "pi-2",
        "--out",
        str(tmp_path / "b"),
        "--broker-dir",
        str(out),
        "--public-key",
        str(key),
    ]
    assert cli.main(argv) == 0
    text = capsys.readouterr().out
    paths = f"{out / 'passwd'} {out / 'acl'}"
    assert f"sudo chown mosquitto:mosquitto {paths} && sudo chmod 0640 {paths}" in text
    assert cli.main(argv) == 0  # nothing changed and nothing can be checked here: no command again
    assert "sudo chown" not in capsys.readouterr().out


def test_staged_broker_config_names_the_install_paths(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "stage"
    argv = ["broker-config", "--out", str(out), "--install-dir", "/etc/mosquitto/edgefleet"]
    assert cli.main(argv) == 0
    text = capsys.readouterr().out
    assert (
        "sudo chown mosquitto:mosquitto /etc/mosquitto/edgefleet/passwd /etc/mosquitto/edgefleet/acl "
        "&& sudo chmod 0640 /etc/mosquitto/edgefleet/passwd /etc/mosquitto/edgefleet/acl"
    ) in text
    assert "password_file /etc/mosquitto/edgefleet/passwd" in (out / "mosquitto.conf").read_text()
