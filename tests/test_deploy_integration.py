"""The host side against a real, private mosquitto: publish, clean-up, refusals, select/assign, fleet."""

from __future__ import annotations

import itertools
import json
import os
import pty
import select
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from broker_helpers import fleet_source
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from test_deploy import make_report, make_status, make_variant, ok_result, write_bundle

from agent import wire
from deploy import cli
from deploy.broker.client import BrokerOptions, MqttSession
from deploy.broker.spawn import MosquittoBroker, find_mosquitto, free_port
from deploy.control.publish import publish_bundle, referenced_blobs
from deploy.errors import BrokerError, PublishError
from deploy.keys import init_keys, load_signing_key, trusted_keys

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(find_mosquitto() is None, reason="mosquitto is not installed"),
]

_ns_counter = itertools.count()
# mosquitto started as root drops to user "mosquitto", which cannot read files under pytest's tmp_path;
# MosquittoBroker's generated config already keeps the current user ("user <name>"), and mosquitto
# refuses a second "user" line, so the extra config adds none.
KEEP_USER = ""


@pytest.fixture(scope="module")
def broker() -> Iterator[MosquittoBroker]:
    with MosquittoBroker() as b:
        yield b


@pytest.fixture
def ns() -> str:
    """A fresh namespace per test: tests share one broker but never each other's retained state."""
    return f"t{next(_ns_counter)}"


@pytest.fixture
def key_path(tmp_path: Path) -> Path:
    return init_keys(tmp_path / "keys").private_path


def options(broker: MosquittoBroker, ns: str, **kw: object) -> BrokerOptions:
    return BrokerOptions(host=broker.host, port=broker.port, namespace=ns, connect_timeout_s=5, **kw)  # type: ignore[arg-type]


def broker_args(broker: MosquittoBroker, ns: str) -> list[str]:
    return ["--host", broker.host, "--port", str(broker.port), "--namespace", ns]


def read_chunks(session: MqttSession, ref: wire.BlobRef) -> dict[int, bytes]:
    """Retained chunks of a blob, subscribing per chunk topic in windows of 32 (never a wildcard)."""
    topics = session.topics
    got: dict[int, bytes] = {}
    for start in range(0, len(ref.chunks), 32):
        wanted = {topics.blob(ref.sha256, i): i for i in range(start, min(start + 32, len(ref.chunks)))}
        for topic, payload in session.collect_retained(wanted, quiet_s=0.1).items():
            got[wanted[topic]] = payload
    return got


def retained(session: MqttSession, topic: str) -> bytes | None:
    return session.collect_retained([topic], quiet_s=0.1).get(topic)


def assert_blob_published(session: MqttSession, path: Path, ref: wire.BlobRef) -> None:
    chunks = read_chunks(session, ref)
    assert sorted(chunks) == list(range(len(ref.chunks))), f"missing chunks of {path.name}"
    data = b"".join(chunks[i] for i in range(len(ref.chunks)))
    assert data == path.read_bytes()
    assert wire.sha256_hex(data) == ref.sha256


# --------------------------------------------------------------------------------------------------------
# publish


def test_publish_cli_chunks_manifest_and_idempotence(
    broker: MosquittoBroker, ns: str, tmp_path: Path, key_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    bundle = tmp_path / "bundle"
    manifest = write_bundle(bundle, {"fp32": 20_000, "int8": 5_000, "tiny": 700}, samples=True)
    args = ["publish", str(bundle), "--key", str(key_path), *broker_args(broker, ns)]
    assert cli.main(args) == 0
    captured = capsys.readouterr()
    summary = json.loads(captured.out)
    assert summary["model"] == "digits" and summary["blobs"] == 6
    assert "publishing digits v1" in captured.err and "done in" in captured.err

    key = load_signing_key(key_path)
    with MqttSession(options(broker, ns)) as s:
        payload = retained(s, s.topics.manifest("digits"))
        assert payload is not None
        got = wire.verify_signed(wire.Manifest, payload, trusted_keys(key))
        assert got.model_dump(exclude={"signature"}) == manifest.model_dump(exclude={"signature"})
        for v in manifest.variants:
            assert_blob_published(s, bundle / v.file, v)
            assert v.sample is not None
            assert_blob_published(s, bundle / f"{v.id}.sample.npz", v.sample)

        # Same bundle again: the same signed manifest (Ed25519 is deterministic), nothing cleared.
        result = publish_bundle(bundle, key, s)
        assert result.manifest.to_json() == payload
        assert retained(s, s.topics.manifest("digits")) == payload
        assert result.cleared_blobs == 0


def test_publish_draws_a_progress_bar_on_a_terminal(
    broker: MosquittoBroker, ns: str, tmp_path: Path, key_path: Path
) -> None:
    """``edgefleet publish`` with stderr on a real pseudo-terminal: the bar is drawn and reaches 100 %."""
    bundle = tmp_path / "bundle"
    write_bundle(bundle, {"fp32": 3 * 1024 * 1024, "int8": 1024 * 1024}, chunk_size=64 * 1024)
    master, slave = pty.openpty()
    cmd = [sys.executable, "-m", "deploy", "publish", str(bundle), "--key", str(key_path)]
    proc = subprocess.Popen(
        [*cmd, *broker_args(broker, ns)], stdout=subprocess.PIPE, stderr=slave, stdin=subprocess.DEVNULL
    )
    os.close(slave)
    seen = b""
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        ready, _, _ = select.select([master], [], [], 0.5)
        if ready:
            try:
                data = os.read(master, 65536)
            except OSError:  # EIO: the child closed the terminal
                break
            if not data:
                break
            seen += data
        elif proc.poll() is not None:
            break
    os.close(master)
    out, _ = proc.communicate(timeout=30)
    assert proc.returncode == 0, seen.decode(errors="replace")
    assert json.loads(out)["bytes"] == 4 * 1024 * 1024
    text = seen.decode()
    assert "\r\x1b[2Kpublishing [" in text
    assert "100% 4.0/4.0 MiB" in text
    assert "done in" in text  # the log lines still come through, the bar erased before each


def test_new_version_clears_obsolete_chunks(broker: MosquittoBroker, ns: str, tmp_path: Path) -> None:
    key = Ed25519PrivateKey.generate()
    v1_dir = tmp_path / "v1"
    v1 = write_bundle(v1_dir, {"fp32": 6_000, "int8": 3_000}, samples=True)
    # v2 keeps fp32 (same file) and replaces int8 with new bytes and no sample.
    v2_dir = tmp_path / "v2"
    shutil.copytree(v1_dir, v2_dir)
    new_int8 = bytes(range(256)) * 10
    (v2_dir / "int8.tflite").write_bytes(new_int8)
    v2 = v1.model_copy(
        update={
            "version": 2,
            "variants": [v1.variant("fp32"), make_variant("int8", new_int8, 0.95, "int8", chunk_size=1024)],
        }
    )
    (v2_dir / "manifest.json").write_bytes(v2.to_json())

    with MqttSession(options(broker, ns)) as s:
        publish_bundle(v1_dir, key, s)
        old_int8, old_sample = v1.variant("int8"), v1.variant("int8").sample
        assert old_sample is not None
        assert len(read_chunks(s, old_int8)) == len(old_int8.chunks)

        result = publish_bundle(v2_dir, key, s)
        obsolete = set(referenced_blobs(v1)) - set(referenced_blobs(v2))
        assert obsolete == {old_int8.sha256, old_sample.sha256}
        assert result.cleared_blobs == 2 and result.previous_version == 1
        assert read_chunks(s, old_int8) == {}
        assert read_chunks(s, old_sample) == {}
        assert_blob_published(s, v2_dir / "fp32.tflite", v2.variant("fp32"))
        assert_blob_published(s, v2_dir / "int8.tflite", v2.variant("int8"))

        # The broker now holds v2: publishing v1 again would be a replay for the devices.
        with pytest.raises(PublishError, match="newer than this bundle"):
            publish_bundle(v1_dir, key, s)


def test_tampered_bundle_is_refused_before_publishing(
    broker: MosquittoBroker, ns: str, tmp_path: Path, key_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    bundle = tmp_path / "bundle"
    write_bundle(bundle, {"fp32": 5_000, "int8": 2_000})
    data = bytearray((bundle / "int8.tflite").read_bytes())
    data[100] ^= 1
    (bundle / "int8.tflite").write_bytes(bytes(data))
    assert cli.main(["publish", str(bundle), "--key", str(key_path), *broker_args(broker, ns)]) == 2
    err = capsys.readouterr().err
    assert "int8.tflite" in err and "Traceback" not in err
    with MqttSession(options(broker, ns)) as s:
        assert retained(s, s.topics.manifest("digits")) is None


def test_broker_not_running_is_a_clear_error(
    tmp_path: Path, key_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    bundle = tmp_path / "bundle"
    write_bundle(bundle, {"fp32": 2_000})
    port = free_port()
    rc = cli.main(["publish", str(bundle), "--key", str(key_path), "--port", str(port), "--timeout", "2"])
    assert rc == 2
    err = capsys.readouterr().err
    assert f"cannot connect to 127.0.0.1:{port}" in err and "Traceback" not in err
    assert cli.main(["fleet", "--port", str(port)]) == 2


def test_acl_refusal_names_the_topic(tmp_path: Path) -> None:
    acl = tmp_path / "acl"
    acl.write_text("topic read #\ntopic write t/blobs/#\n")  # anonymous may not write manifests
    with MosquittoBroker(extra_config=f"{KEEP_USER}acl_file {acl}\n") as b:
        bundle = tmp_path / "bundle"
        write_bundle(bundle, {"fp32": 3_000})
        with (
            MqttSession(options(b, "t"), ack_timeout_s=5) as s,
            pytest.raises(PublishError, match=r"t/models/digits/manifest.*0x87"),
        ):
            publish_bundle(bundle, Ed25519PrivateKey.generate(), s)


@pytest.mark.skipif(shutil.which("mosquitto_passwd") is None, reason="needs mosquitto_passwd")
def test_bad_password_is_fatal(tmp_path: Path) -> None:
    pw = tmp_path / "passwd"
    subprocess.run(["mosquitto_passwd", "-b", "-c", str(pw), "host", "right"], check=True, timeout=30)
    pw.chmod(0o600)
    with MosquittoBroker(anonymous=False, extra_config=f"{KEEP_USER}password_file {pw}\n") as b:
        for proto in ("v5", "v311"):
            bad = options(b, "t", username="host", password="wrong", protocol=proto)
            with pytest.raises(BrokerError, match=r"broker refused: (bad user name or password|not auth)"):
                MqttSession(bad).connect()
        with MqttSession(options(b, "t", username="host", password="right")) as s:
            s.publish("t/x", b"1")
            s.flush()


def test_mqtt_311_publishes_too(broker: MosquittoBroker, ns: str, tmp_path: Path) -> None:
    bundle = tmp_path / "bundle"
    m = write_bundle(bundle, {"fp32": 4_000})
    with MqttSession(options(broker, ns, protocol="v311")) as s:
        publish_bundle(bundle, Ed25519PrivateKey.generate(), s)
        assert_blob_published(s, bundle / "fp32.tflite", m.variants[0])


def test_window_keeps_many_publishes_bounded(broker: MosquittoBroker, ns: str) -> None:
    with MqttSession(options(broker, ns), window=4) as s:
        for i in range(300):
            s.publish(f"{ns}/load/{i % 7}", b"x" * 4096)
            assert len(s._pending) <= 4
        s.flush(5)
        assert s.published == 300


# --------------------------------------------------------------------------------------------------------
# select / assign / fleet


@pytest.mark.parametrize("source", ["store", "broker"])
def test_select_assign_fleet(
    broker: MosquittoBroker,
    ns: str,
    tmp_path: Path,
    key_path: Path,
    capsys: pytest.CaptureFixture[str],
    source: str,
) -> None:
    """select, assign and fleet decide from the collector's store (and, in the lab, the broker)."""
    with fleet_source(source, options(broker, ns), tmp_path / "fleet.db") as (where, synced):
        _select_assign_fleet(broker, ns, tmp_path, key_path, capsys, where, synced)


def _select_assign_fleet(
    broker: MosquittoBroker,
    ns: str,
    tmp_path: Path,
    key_path: Path,
    capsys: pytest.CaptureFixture[str],
    where: list[str],
    synced: Any,
) -> None:
    bundle = tmp_path / "bundle"
    m = write_bundle(bundle, {"fp32": 3_000, "fp16": 2_000, "int8": 1_000})  # acc .97, .96, .95
    key = load_signing_key(key_path)
    policy = tmp_path / "lab.toml"
    policy.write_text(
        'name = "lab"\n[default]\nobjective = "accuracy"\nmax_p95_ms = 9\n'
        '[classes.fast]\nobjective = "latency"\nmin_accuracy = 0.9\n'
    )
    res = [
        ok_result(m.variant("fp32"), 10.0),
        ok_result(m.variant("fp16"), 6.0),
        ok_result(m.variant("int8"), 2.0),
    ]
    topics = wire.Topics(ns)
    with MqttSession(options(broker, ns)) as s:
        publish_bundle(bundle, key, s)
        s.publish(
            topics.status("pi-a"), make_status("pi-a", "fast", m.variant("fp32"), m).to_json(), retain=True
        )
        s.publish(topics.status("pi-b"), make_status("pi-b", "slow").to_json(), retain=True)
        s.publish(topics.status("pi-c"), make_status("pi-c").to_json(), retain=True)  # no report yet
        for dev in ("pi-a", "pi-b"):
            s.publish(
                topics.report(dev, "digits"), make_report(dev, m, res, ts=wire.now()).to_json(), retain=True
            )
        s.flush()
    synced(statuses=3, reports=2, manifests=1)

    common = ["--model", "digits", "--policy", str(policy), *broker_args(broker, ns), *where]
    assert cli.main(["select", *common, "--json"]) == 0
    decisions = {d["device"]: d for d in json.loads(capsys.readouterr().out)}
    assert decisions["pi-a"]["variant"] == "int8"
    assert decisions["pi-b"]["variant"] == "fp16"
    assert decisions["pi-b"]["lost"]["fp32"] == "p95 12 ms > max 9 ms"

    assert cli.main(["select", *common]) == 0
    table = capsys.readouterr().out
    assert "pi-a" in table and "no report for this version from: pi-c" in table

    assert cli.main(["assign", *common, "--key", str(key_path)]) == 0
    assert "assigned 2" in capsys.readouterr().err
    with MqttSession(options(broker, ns)) as s:
        first = {}
        for dev, variant in (("pi-a", "int8"), ("pi-b", "fp16")):
            payload = retained(s, topics.assign(dev, "digits"))
            assert payload is not None
            a = wire.verify_signed(wire.Assignment, payload, trusted_keys(key))
            assert (a.device, a.variant, a.sha256) == (dev, variant, m.variant(variant).sha256)
            assert a.policy == "lab" and a.reason and a.manifest_version == 1
            first[dev] = payload
        assert retained(s, topics.assign("pi-c", "digits")) is None

    # Re-running changes nothing on the wire; --device limits the scope.
    synced(assignments=2)
    assert cli.main(["assign", *common, "--key", str(key_path), "--device", "pi-a"]) == 0
    assert "assigned 0, unchanged 1" in capsys.readouterr().err
    with MqttSession(options(broker, ns)) as s:
        assert retained(s, topics.assign("pi-a", "digits")) == first["pi-a"]

    assert cli.main(["fleet", "--json", *broker_args(broker, ns), *where]) == 0
    rows = {(r["device"], r["model"]): r for r in json.loads(capsys.readouterr().out)}
    assert rows[("pi-a", "digits")]["active"] == "fp32"
    assert rows[("pi-a", "digits")]["assigned"] == "int8"
    assert rows[("pi-a", "digits")]["p50_ms"] == 10.0
    assert rows[("pi-c", None)]["online"] is True
    assert cli.main(["fleet", *broker_args(broker, ns), *where]) == 0
    assert "fp32 (v1) → int8" in capsys.readouterr().out


@pytest.mark.parametrize("source", ["store", "broker"])
def test_select_without_manifest_is_an_expected_error(
    broker: MosquittoBroker, ns: str, tmp_path: Path, capsys: pytest.CaptureFixture[str], source: str
) -> None:
    with fleet_source(source, options(broker, ns), tmp_path / "fleet.db") as (where, _):
        assert cli.main(["select", "--model", "digits", *broker_args(broker, ns), *where]) == 2
    assert "no manifest for model 'digits'" in capsys.readouterr().err
