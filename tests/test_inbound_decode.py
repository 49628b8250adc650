"""wire.decode_inbound: the one decoder every receiver uses (agent commands, collector, fleet state,
rollout observer): topic → typed message, payload device/model checked against the topic, signatures
checked when trusted keys are given, and the same answer as wire.decode on hostile payloads."""

from __future__ import annotations

import time

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from agent import wire

T = wire.Topics("ns-1")
KEY = Ed25519PrivateKey.generate()
TRUSTED = {wire.key_id_for(KEY.public_key()): KEY.public_key()}


def _status(device: str) -> wire.Status:
    return wire.Status(device=device, online=True, ts=time.time())


def _event(device: str) -> wire.Event:
    return wire.Event(device=device, ts=time.time(), kind=wire.EventKind.PONG)


def _telemetry(device: str) -> wire.Telemetry:
    return wire.Telemetry(device=device, ts=time.time(), uptime_s=1.0)


def _report(device: str, model: str) -> wire.Report:
    return wire.Report(device=device, model=model, manifest_version=1, ts=time.time(), results=[])


def _assignment(device: str, model: str) -> wire.Assignment:
    return wire.Assignment(
        device=device,
        model=model,
        variant="v",
        sha256="ab" * 32,
        manifest_version=1,
        issued_at=time.time(),
        policy="p",
    )


def _command(device: str) -> wire.Command:
    return wire.Command(id="c1", device=device, action=wire.CommandAction.PING, issued_at=time.time())


def test_every_kind_decodes_to_its_message() -> None:
    cases: list[tuple[str, wire.Message]] = [
        (T.status("pi-1"), _status("pi-1")),
        (T.events("pi-1"), _event("pi-1")),
        (T.telemetry("pi-1"), _telemetry("pi-1")),
        (T.report("pi-1", "m"), _report("pi-1", "m")),
        (T.assign("pi-1", "m"), _assignment("pi-1", "m")),
        (T.cmd("pi-1"), _command("pi-1")),
    ]
    for topic, msg in cases:
        d = wire.decode_inbound(T, topic, msg.to_json())
        assert d.message == msg and type(d.message) is type(msg)
        assert d.as_(type(msg)) == msg
        with pytest.raises(wire.PayloadError):
            d.as_(wire.Manifest)
    chunk = wire.decode_inbound(T, T.blob("cd" * 32, 7), b"\x00raw")
    assert chunk.message is None and chunk.payload == b"\x00raw" and chunk.topic.index == 7
    cleared = wire.decode_inbound(T, T.status("pi-1"), b"")
    assert cleared.message is None and cleared.topic.kind is wire.TopicKind.STATUS


def test_payload_must_match_its_topic() -> None:
    with pytest.raises(wire.PayloadError) as err:
        wire.decode_inbound(T, T.status("pi-1"), _status("pi-2").to_json())
    assert err.value.reason == "WRONG_DEVICE" and "pi-2" in str(err.value)
    with pytest.raises(wire.PayloadError) as err:
        wire.decode_inbound(T, T.report("pi-1", "m"), _report("pi-1", "other").to_json())
    assert err.value.reason == "MALFORMED" and "other" in str(err.value)
    with pytest.raises(wire.PayloadError) as err:
        wire.decode_inbound(T, T.assign("pi-1", "m"), _assignment("pi-9", "m").to_json())
    assert err.value.reason == "WRONG_DEVICE"
    with pytest.raises(wire.IdentifierError):
        wire.decode_inbound(T, "ns-1/devices/Pi.1/status", _status("pi-1").to_json())
    with pytest.raises(wire.IdentifierError):
        wire.decode_inbound(T, "other/devices/pi-1/status", _status("pi-1").to_json())


def test_signed_kinds_with_trusted_keys() -> None:
    signed = wire.sign(_command("pi-1"), KEY)
    assert (
        wire.decode_inbound(T, T.cmd("pi-1"), signed.to_json(), trusted=TRUSTED).as_(wire.Command) == signed
    )
    with pytest.raises(wire.SignatureError) as err:
        wire.decode_inbound(T, T.cmd("pi-1"), _command("pi-1").to_json(), trusted=TRUSTED)
    assert err.value.reason == "UNSIGNED"
    other = wire.sign(_command("pi-1"), Ed25519PrivateKey.generate())
    with pytest.raises(wire.SignatureError) as err:
        wire.decode_inbound(T, T.cmd("pi-1"), other.to_json(), trusted=TRUSTED)
    assert err.value.reason == "UNKNOWN_KEY"
    # a signed command for another device, replayed onto this device's topic
    stolen = wire.sign(_command("pi-2"), KEY)
    with pytest.raises(wire.PayloadError) as err:
        wire.decode_inbound(T, T.cmd("pi-1"), stolen.to_json(), trusted=TRUSTED)
    assert err.value.reason == "WRONG_DEVICE"
    # unsigned kinds ignore the keys; signed kinds without keys are schema-checked only
    assert wire.decode_inbound(T, T.status("pi-1"), _status("pi-1").to_json(), trusted=TRUSTED).message
    assert wire.decode_inbound(T, T.cmd("pi-1"), _command("pi-1").to_json()).message


@pytest.mark.parametrize(
    "payload",
    [
        b"{broken",
        b"[]",
        b'{"schema":"edgefleet.status/1","device":"pi-1","online":true,"ts":NaN}',
        b'{"schema":"edgefleet.status/1","device":"pi-1","online":true,"ts":Infinity}',
        b'{"schema":"edgefleet.status/1","device":"pi-1","online":true,"ts":1,"extra":1}',
        b"\xff\xfe",
        b'{"schema":"edgefleet.status/1","device":"pi-1","online":true,"ts":1' + b" " * 100 + b"}",
    ],
)
def test_refuses_like_wire_decode(payload: bytes) -> None:
    """The fast path gives the same verdict as wire.decode (NaN/Infinity, size limit, extra keys...)."""
    try:
        expected: object = wire.decode(wire.Status, payload, max_bytes=100)
    except wire.WireError as err:
        expected = type(err), err.reason
    try:
        got: object = wire.decode_inbound(T, T.status("pi-1"), payload, max_bytes=100).message
    except wire.WireError as err:
        got = type(err), err.reason
    assert got == expected
