"""The generated broker config (deploy.broker.conf) against a real mosquitto, beyond test_deploy_provision:

* device A cannot read device B's assignments: its subscription to B's assign topic is granted but
  filtered (FACTS.md), so a retained assignment the controller publishes for B reaches B and not A;
* a plain-TCP client (no TLS) to the TLS listener gets no MQTT session;
* mosquitto logs no ACL warning on start (every ``pattern`` has ``%u``);
* run as production runs it (as root it drops to the ``mosquitto`` user, which must read passwd, acl
  and server.key on start and on every SIGHUP), a device provisioned later works after a reload and
  the earlier device and the controller keep working.
"""

from __future__ import annotations

import base64
import dataclasses
import os
import shutil
import signal
import socket
import stat
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import paho.mqtt.client as paho
import pytest
from broker_helpers import generated_tls_broker
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat
from paho.mqtt.enums import CallbackAPIVersion

from agent import wire
from deploy import cli
from deploy.broker import conf as brokerconf
from deploy.broker.client import BrokerOptions, MqttSession
from deploy.broker.conf import BrokerSpec, write_broker_config
from deploy.broker.spawn import MosquittoBroker, find_mosquitto, free_port
from deploy.errors import BrokerError, PublishError

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(find_mosquitto() is None, reason="mosquitto is not installed"),
]


@pytest.fixture(scope="module")
def tls_broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[MosquittoBroker, Path]]:
    with generated_tls_broker(tmp_path_factory.mktemp("acl"), ["pi-a", "pi-b"]) as (b, out, _):
        yield b, out


def _cred(out: Path, user: str) -> str:
    return (out / "credentials" / f"{user}.password").read_text().strip()


class Listener:
    """A TLS paho client (MQTT v5) that records what it receives."""

    def __init__(self, broker: MosquittoBroker, out: Path, user: str, topic: str) -> None:
        self.got: list[tuple[str, bytes]] = []
        self.granted: list[int] = []
        self.subscribed = threading.Event()
        self.c = paho.Client(CallbackAPIVersion.VERSION2, client_id=f"acl-{user}", protocol=paho.MQTTv5)
        self.c.username_pw_set(user, _cred(out, user))
        self.c.tls_set(ca_certs=str(out / "ca.crt"))
        self.c.on_message = lambda _c, _u, m: self.got.append((m.topic, bytes(m.payload)))
        self.c.on_connect = lambda c, _u, _f, rc, _p: c.subscribe(topic, 1)

        def on_subscribe(_c: paho.Client, _u: object, _mid: int, codes: list[Any], _p: object) -> None:
            self.granted = [int(rc.value) for rc in codes]
            self.subscribed.set()

        self.c.on_subscribe = on_subscribe
        self.c.connect("127.0.0.1", broker.port)
        self.c.loop_start()
        assert self.subscribed.wait(10), f"{user}: no SUBACK"

    def close(self) -> None:
        self.c.disconnect()
        self.c.loop_stop()


def test_device_cannot_read_another_devices_assignments(tls_broker: tuple[MosquittoBroker, Path]) -> None:
    broker, out = tls_broker
    t = wire.Topics()
    b_topic = t.assign("pi-b", "digits")
    spy = Listener(broker, out, "pi-a", b_topic)  # A subscribes to B's assignment topic
    owner = Listener(broker, out, "pi-b", t.device_assignments("pi-b"))
    try:
        assert spy.granted == [1]  # mosquitto grants it (QoS 1) ... and then filters every message
        payload = b'{"schema": "edgefleet.assignment/1", "note": "for pi-b only"}'
        ctl = MqttSession(
            BrokerOptions(
                host="127.0.0.1",
                port=broker.port,
                username=brokerconf.CONTROLLER_USER,
                password=_cred(out, brokerconf.CONTROLLER_USER),
                tls_ca=out / "ca.crt",
                connect_timeout_s=5,
            )
        )
        with ctl:
            ctl.publish(b_topic, payload, retain=True)
            ctl.flush()
        deadline = threading.Event()
        for _ in range(30):  # B receives it ...
            if owner.got:
                break
            deadline.wait(0.1)
        assert owner.got == [(b_topic, payload)]
        deadline.wait(1.0)  # ... and A, subscribed to the very same topic, nothing within a second
        assert spy.got == []
        # a fresh subscription by A does not get the retained message either
        late = Listener(broker, out, "pi-a", f"{t.ns}/devices/+/assign/+")
        try:
            deadline.wait(0.5)
            assert late.got == []
        finally:
            late.close()
    finally:
        spy.close()
        owner.close()


def test_plain_tcp_client_is_refused_by_the_tls_listener(tls_broker: tuple[MosquittoBroker, Path]) -> None:
    broker, out = tls_broker
    opts = BrokerOptions(
        host="127.0.0.1",
        port=broker.port,
        username="pi-a",
        password=_cred(out, "pi-a"),
        connect_timeout_s=3,
    )
    with pytest.raises(BrokerError):
        MqttSession(opts).connect()  # right credentials, but no TLS
    # on the wire: a plaintext MQTT CONNECT gets no CONNACK (0x20); the TLS listener drops it
    connect = bytes.fromhex("101000044d5154540402003c0004") + b"test"
    with socket.create_connection(("127.0.0.1", broker.port), timeout=3) as sock:
        sock.sendall(connect)
        try:
            reply = sock.recv(16)
        except (TimeoutError, ConnectionResetError):
            reply = b""
    assert not reply.startswith(b"\x20"), f"plaintext CONNECT answered with {reply!r}"
    # with TLS and the same credentials it works (the refusal above is about TLS, nothing else)
    with MqttSession(dataclasses.replace(opts, tls_ca=out / "ca.crt")):
        pass


def _log_warnings(broker: MosquittoBroker) -> list[str]:
    """Warnings (an ACL pattern without %u/%c) and files mosquitto could not open; not the TLS errors
    a plaintext client causes on purpose in another test."""
    text = broker.log_path.read_text(errors="replace") if broker.log_path.exists() else ""
    return [ln for ln in text.splitlines() if "Warning" in ln or "Unable to" in ln or "Error opening" in ln]


def test_no_acl_warning_on_start(tls_broker: tuple[MosquittoBroker, Path]) -> None:
    broker, _ = tls_broker
    assert broker.log_path.exists()
    assert _log_warnings(broker) == []


# ------------------------------------------------------------------------------------------- reload


@pytest.fixture
def production_broker() -> Iterator[tuple[MosquittoBroker, Path]]:
    """The generated config with no ``user`` line: started as root, mosquitto drops to its own user and
    reads passwd, acl and server.key as that user (as it does under systemd); otherwise as us."""
    account = brokerconf.broker_account()
    root = os.geteuid() == 0
    if root and account is None:
        pytest.skip("running as root without a mosquitto user: mosquitto would not start")
    base = Path(tempfile.mkdtemp(prefix="edgefleet-reload-"))  # pytest's tmp_path is closed to others
    try:
        base.chmod(0o755)
        out, state = base / "broker", base / "state"
        state.mkdir()
        if root and account is not None:
            os.chown(state, *account)  # persistence and log are written as mosquitto
        port = free_port()
        spec = BrokerSpec(
            install_dir=out,
            port=port,
            bind="127.0.0.1",
            tls=True,
            state_dir=state,
            log_dest=f"file {state / 'mosquitto.log'}",
        )
        write_broker_config(out, spec, devices=["pi-old"], server_names=["localhost", "127.0.0.1"])
        config = (out / "mosquitto.conf").read_text()
        with MosquittoBroker(port=port, state_dir=state, config=config) as b:
            yield b, out
    finally:
        shutil.rmtree(base, ignore_errors=True)


def _opts(broker: MosquittoBroker, out: Path, user: str, password: str) -> BrokerOptions:
    return BrokerOptions(
        host="127.0.0.1",
        port=broker.port,
        username=user,
        password=password,
        tls_ca=out / "ca.crt",
        connect_timeout_s=5,
    )


def _wait_accepted(opts: BrokerOptions) -> None:
    for _ in range(50):  # the reload is asynchronous
        try:
            MqttSession(opts).connect().close()
        except BrokerError:
            time.sleep(0.1)
        else:
            return
    pytest.fail(f"{opts.username} was not accepted after SIGHUP")


def test_a_device_provisioned_later_works_after_a_reload_and_nobody_breaks(
    production_broker: tuple[MosquittoBroker, Path],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    broker, out = production_broker
    t = wire.Topics()
    ctl_opts = _opts(broker, out, brokerconf.CONTROLLER_USER, _cred(out, brokerconf.CONTROLLER_USER))
    old_opts = _opts(broker, out, "pi-old", _cred(out, "pi-old"))
    assert _log_warnings(broker) == []  # started: no ACL warning, no unreadable file
    account = brokerconf.broker_account()
    if os.geteuid() == 0 and account is not None:  # it really dropped to the mosquitto user
        uids = Path(f"/proc/{broker.pid}/status").read_text().split("\nUid:")[1].split()[:2]
        assert [int(u) for u in uids] == [account[0]] * 2

    pub = Ed25519PrivateKey.generate().public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)
    key = tmp_path / "signing.pub"
    key.write_text(base64.b64encode(pub).decode() + "\n")
    bundle = tmp_path / "pi-new"
    argv = ["provision", "pi-new", "--out", str(bundle), "--broker-dir", str(out), "--public-key", str(key)]
    assert cli.main([*argv, "--broker-host", "127.0.0.1"]) == 0
    printed = capsys.readouterr().out.splitlines()
    assert f"  updated   {out / 'passwd'} (password entry for pi-new added)" in printed
    assert f"  updated   {out / 'acl'} (block for pi-new)" in printed
    assert printed[-1] == brokerconf.RELOAD_HINT
    new_opts = _opts(broker, out, "pi-new", (bundle / "mqtt-password").read_text().strip())
    with pytest.raises(BrokerError, match="refused"):
        MqttSession(new_opts).connect()  # not before the reload

    assert broker.pid is not None
    os.kill(broker.pid, signal.SIGHUP)  # what `systemctl reload mosquitto` sends
    _wait_accepted(new_opts)
    assert broker.process is not None and broker.process.poll() is None
    manifest, assign = t.manifest("digits"), t.assign("pi-new", "digits")
    with MqttSession(new_opts) as new, MqttSession(ctl_opts) as ctl, MqttSession(old_opts) as old:
        ctl.publish(manifest, b'{"schema": "edgefleet.manifest/1"}', retain=True)
        ctl.publish(assign, b'{"schema": "edgefleet.assignment/1"}', retain=True)
        ctl.flush()
        # the new device reads the fleet-wide manifest (its ACL block) and its own assignment (pattern)
        assert set(new.collect_retained([manifest, assign])) == {manifest, assign}
        # the earlier device still reads the manifest, and not the new device's assignment
        assert set(old.collect_retained([manifest, t.device_assignments("pi-new")])) == {manifest}
        for dev, name in ((new, "pi-new"), (old, "pi-old")):
            dev.publish(t.status(name), wire.Status(device=name, online=True, ts=1.0).to_json(), retain=True)
            dev.flush()
        with pytest.raises(PublishError, match="0x87"):
            new.publish(t.status("pi-old"), wire.Status(device="pi-old", online=True, ts=2.0).to_json())
            new.flush()
        assert set(ctl.collect_retained([t.all_statuses()])) == {t.status("pi-new"), t.status("pi-old")}
    assert _log_warnings(broker) == []  # the reload re-read passwd and acl without complaint

    # Provisioning the same device again changes nothing the broker reads: no reload asked for.
    assert cli.main([*argv, "--broker-host", "127.0.0.1"]) == 0
    assert brokerconf.RELOAD_HINT not in capsys.readouterr().out
    if os.geteuid() == 0 and account is not None:
        for name in ("passwd", "acl", "server.key"):
            st = (out / name).stat()
            assert (st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode)) == (*account, 0o640), name
