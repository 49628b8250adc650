"""The wire contract: round trips, identifiers, canonical JSON, signatures, topics, committed schemas."""

from __future__ import annotations

import base64
import json
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat
from hypothesis import given
from hypothesis import strategies as st
from pydantic import ValidationError

from agent import wire
from agent.wire import (
    Assignment,
    BenchError,
    BenchResult,
    BlobRef,
    Command,
    Energy,
    Event,
    EventKind,
    HostMetrics,
    LatencyStats,
    Manifest,
    ModelState,
    ModelStatus,
    ReasonCode,
    Report,
    Status,
    Telemetry,
    TensorSpec,
    TopicKind,
    Topics,
    Variant,
)

SCHEMA_DIR = Path(__file__).resolve().parent.parent / "docs" / "schemas"


def make_variant(vid: str = "float32", data: bytes = b"\x01" * 300_000, **kw: object) -> Variant:
    fields: dict[str, object] = {"id": vid, "file": f"{vid}.tflite", **kw}
    return Variant(
        quantization="none",
        inputs=[TensorSpec(name="input", shape=[1, 28, 28, 1], dtype="float32")],
        outputs=[TensorSpec(name="output", shape=[1, 10], dtype="float32")],
        metrics=HostMetrics(accuracy=0.97, size_bytes=len(data)),
        **wire.blob_fields(data),
        **fields,  # type: ignore[arg-type]
    )


def make_manifest(version: int = 1, variants: list[Variant] | None = None) -> Manifest:
    return Manifest(
        model="digits",
        version=version,
        created_at=1.0,
        baseline="float32",
        labels=[str(i) for i in range(10)],
        variants=variants or [make_variant(), make_variant("int8", b"\x02" * 1000)],
    )


@pytest.fixture(scope="module")
def key() -> Ed25519PrivateKey:
    return Ed25519PrivateKey.from_private_bytes(bytes(range(32)))


@pytest.fixture(scope="module")
def trusted(key: Ed25519PrivateKey) -> dict[str, object]:
    return {wire.key_id_for(key.public_key()): key.public_key()}


def latency() -> LatencyStats:
    return LatencyStats(count=50, mean=1.0, std=0.1, min=0.8, p50=1.0, p90=1.1, p95=1.2, p99=1.3, max=1.5)


def sample_messages() -> list[wire.Message]:
    ok = BenchResult(
        variant="float32",
        sha256="a" * 64,
        ok=True,
        latency_ms=latency(),
        ts=2.0,
        energy=Energy(method="model", measured=False, mj_per_inference=1.5, avg_power_w=3.0),
    )
    failed = BenchResult(variant="int8", sha256="b" * 64, ok=False, error=BenchError.LOAD_ERROR, ts=2.0)
    return [
        make_manifest(),
        Status(device="pi-1", online=True, ts=1.0, models={"digits": ModelStatus(state=ModelState.IDLE)}),
        Report(device="pi-1", model="digits", manifest_version=1, ts=1.0, results=[ok, failed]),
        Event(device="pi-1", ts=1.0, kind=EventKind.REJECTED, reason=ReasonCode.BAD_SIGNATURE, detail="x"),
        Assignment(
            device="pi-1",
            model="digits",
            variant="int8",
            sha256="b" * 64,
            manifest_version=1,
            issued_at=1.0,
            policy="default",
        ),
        Command(id="c1", device="pi-1", action="ping", issued_at=1.0),
        Telemetry(device="pi-1", ts=1.0, uptime_s=5.0, cpu_percent=1.5),
    ]


@pytest.mark.parametrize("message", sample_messages(), ids=lambda m: type(m).__name__)
def test_every_message_round_trips_and_carries_its_schema(message: wire.Message) -> None:
    payload = message.to_json()
    obj = json.loads(payload)
    assert obj["schema"] == type(message).SCHEMA
    assert type(message).from_json(payload) == message
    assert wire.decode(type(message), payload) == message


def test_unknown_keys_are_rejected() -> None:
    obj = json.loads(make_manifest().to_json())
    obj["surprise"] = 1
    with pytest.raises(wire.PayloadError, match="surprise"):
        wire.decode(Manifest, json.dumps(obj))


def test_wrong_schema_major_is_rejected() -> None:
    obj = json.loads(Telemetry(device="pi-1", ts=1.0, uptime_s=1.0).to_json())
    obj["schema"] = "edgefleet.telemetry/2"
    with pytest.raises(wire.PayloadError):
        wire.decode(Telemetry, json.dumps(obj))


@pytest.mark.parametrize(
    "bad", ["", "Pi-1", "-pi", "pi/1", "pi+", "pi#", "a" * 64, "../etc", "pi 1", "é", "pi\n"]
)
def test_bad_identifiers_are_rejected_everywhere(bad: str) -> None:
    with pytest.raises(wire.IdentifierError):
        wire.check_id(bad)
    with pytest.raises(wire.IdentifierError):
        Topics().status(bad)
    with pytest.raises(ValidationError):
        Status(device=bad, online=True, ts=0)


@given(st.from_regex(wire.ID_PATTERN, fullmatch=True))
def test_every_valid_identifier_builds_and_parses_every_topic(ident: str) -> None:
    t = Topics()
    assert t.parse(t.status(ident)).device == ident
    parsed = t.parse(t.report(ident, ident))
    assert (parsed.kind, parsed.device, parsed.model) == (TopicKind.REPORT, ident, ident)
    assert t.parse(t.assign(ident, ident)).kind is TopicKind.ASSIGN
    assert t.parse(t.manifest(ident)).model == ident


@given(st.text(max_size=80))
def test_parse_never_crashes_on_arbitrary_topics(topic: str) -> None:
    try:
        parsed = Topics().parse(topic)
    except wire.IdentifierError:
        return
    assert parsed.kind in TopicKind


def test_topic_table_matches_the_contract() -> None:
    t = Topics("edgefleet")
    sha = "0" * 64
    assert t.manifest("digits") == "edgefleet/models/digits/manifest"
    assert t.blob(sha, 3) == f"edgefleet/blobs/{sha}/3"
    assert t.status("pi-1") == "edgefleet/devices/pi-1/status"
    assert t.report("pi-1", "digits") == "edgefleet/devices/pi-1/reports/digits"
    assert t.events("pi-1") == "edgefleet/devices/pi-1/events"
    assert t.telemetry("pi-1") == "edgefleet/devices/pi-1/telemetry"
    assert t.assign("pi-1", "digits") == "edgefleet/devices/pi-1/assign/digits"
    assert t.cmd("pi-1") == "edgefleet/devices/pi-1/cmd"
    assert t.parse(f"edgefleet/blobs/{sha}/3") == wire.ParsedTopic(TopicKind.BLOB, sha256=sha, index=3)
    for bad in (
        f"other/blobs/{sha}/3",
        f"edgefleet/blobs/{sha}/-1",
        "edgefleet/blobs/ABC/1",
        "edgefleet/devices/pi-1/status/extra",
        "edgefleet/devices/+/status",
    ):
        with pytest.raises(wire.IdentifierError):
            t.parse(bad)


def test_canonical_json_is_sorted_compact_and_refuses_nan() -> None:
    assert (
        wire.canonical_json({"b": 1, "a": [1, {"d": 2, "c": "é"}]})
        == '{"a":[1,{"c":"é","d":2}],"b":1}'.encode()
    )
    with pytest.raises(ValueError):
        wire.canonical_json({"x": float("nan")})
    with pytest.raises(wire.PayloadError):
        wire.parse_json(b'{"x": NaN}')


@pytest.mark.parametrize("payload", [b"\xff\xfe", b"[1,2]", b"not json", b"", b"null"])
def test_undecodable_payloads_give_payload_error(payload: bytes) -> None:
    with pytest.raises(wire.PayloadError):
        wire.decode(Status, payload)


def test_oversize_payload_is_refused_before_parsing() -> None:
    with pytest.raises(wire.PayloadError) as info:
        wire.parse_json(b"{" + b" " * 100 + b"}", max_bytes=50)
    assert info.value.reason == "TOO_LARGE"


def test_signed_manifest_verifies(key: Ed25519PrivateKey, trusted: dict[str, object]) -> None:
    signed = wire.sign(make_manifest(), key)
    assert signed.signature is not None
    assert signed.signature.key_id == wire.key_id_for(key.public_key())
    assert wire.verify_signed(Manifest, signed.to_json(), trusted) == signed  # type: ignore[arg-type]


def test_signature_is_deterministic(key: Ed25519PrivateKey) -> None:
    assert wire.sign(make_manifest(), key).to_json() == wire.sign(make_manifest(), key).to_json()


def test_tampered_manifest_is_detected(key: Ed25519PrivateKey, trusted: dict[str, object]) -> None:
    obj = json.loads(wire.sign(make_manifest(), key).to_json())
    obj["variants"][1]["sha256"] = "f" * 64  # point a variant at other bytes
    with pytest.raises(wire.SignatureError) as info:
        wire.verify_signed(Manifest, json.dumps(obj), trusted)  # type: ignore[arg-type]
    assert info.value.reason == "BAD_SIGNATURE"


def test_signature_covers_key_order_independent_json(
    key: Ed25519PrivateKey, trusted: dict[str, object]
) -> None:
    obj = json.loads(wire.sign(make_manifest(), key).to_json())
    reordered = json.dumps(dict(reversed(list(obj.items()))), indent=2)  # same content, other bytes
    assert wire.verify_signed(Manifest, reordered, trusted).version == 1  # type: ignore[arg-type]


def test_unsigned_and_unknown_key_are_refused(key: Ed25519PrivateKey, trusted: dict[str, object]) -> None:
    with pytest.raises(wire.SignatureError) as info:
        wire.verify_signed(Manifest, make_manifest().to_json(), trusted)  # type: ignore[arg-type]
    assert info.value.reason == "UNSIGNED"
    other = Ed25519PrivateKey.generate()
    with pytest.raises(wire.SignatureError) as info:
        wire.verify_signed(Manifest, wire.sign(make_manifest(), other).to_json(), trusted)  # type: ignore[arg-type]
    assert info.value.reason == "UNKNOWN_KEY"


def test_signature_from_another_key_with_a_trusted_key_id_fails(
    key: Ed25519PrivateKey, trusted: dict[str, object]
) -> None:
    forged = json.loads(wire.sign(make_manifest(), Ed25519PrivateKey.generate()).to_json())
    forged["signature"]["key_id"] = wire.key_id_for(key.public_key())
    with pytest.raises(wire.SignatureError) as info:
        wire.verify_signed(Manifest, json.dumps(forged), trusted)  # type: ignore[arg-type]
    assert info.value.reason == "BAD_SIGNATURE"


def test_assignment_and_command_signatures(key: Ed25519PrivateKey, trusted: dict[str, object]) -> None:
    a = wire.sign(
        Assignment(
            device="pi-1",
            model="digits",
            variant="int8",
            sha256="b" * 64,
            manifest_version=3,
            issued_at=1.0,
            policy="default",
        ),
        key,
    )
    assert wire.verify_signed(Assignment, a.to_json(), trusted) == a  # type: ignore[arg-type]
    c = wire.sign(Command(id="c-7", device="pi-1", action="rollback", model="digits", issued_at=1.0), key)
    assert wire.verify_signed(Command, c.to_json(), trusted).id == "c-7"  # type: ignore[arg-type]


def test_public_key_text_forms(key: Ed25519PrivateKey) -> None:
    raw = key.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)
    pem = key.public_key().public_bytes(Encoding.PEM, PublicFormat.SubjectPublicKeyInfo).decode()
    for text in (base64.b64encode(raw).decode(), pem):
        assert wire.key_id_for(wire.public_key_from_text(text)) == wire.key_id_for(key.public_key())
    with pytest.raises(wire.SignatureError):
        wire.public_key_from_text("not a key")


def test_blob_chunking_and_lengths() -> None:
    data = bytes(range(256)) * 2049  # 524544 bytes: 2 full chunks + 256 bytes
    ref = BlobRef.of(data)
    assert len(ref.chunks) == 3
    assert [ref.chunk_length(i) for i in range(3)] == [262144, 262144, 256]
    assert b"".join(wire.iter_chunks(data)) == data
    with pytest.raises(IndexError):
        ref.chunk_length(3)
    with pytest.raises(ValidationError, match="needs 3 chunk hashes"):
        BlobRef(sha256=ref.sha256, size=ref.size, chunks=ref.chunks[:2])


def test_manifest_rules() -> None:
    v = make_variant()
    with pytest.raises(ValidationError, match="unique"):
        make_manifest(variants=[v, v])
    with pytest.raises(ValidationError, match="baseline"):
        Manifest(model="digits", version=1, created_at=0, baseline="nope", variants=[v])
    with pytest.raises(ValidationError):
        make_variant(file="../../etc/passwd")
    assert make_manifest().variant("int8").id == "int8"


def test_result_and_energy_rules() -> None:
    with pytest.raises(ValidationError, match="latency_ms"):
        BenchResult(variant="a", sha256="a" * 64, ok=True, ts=0)
    with pytest.raises(ValidationError, match="error code"):
        BenchResult(variant="a", sha256="a" * 64, ok=False, ts=0)
    with pytest.raises(ValidationError, match=r"modelled|utilisation"):
        Energy(method="model", measured=True, mj_per_inference=1, avg_power_w=1)
    with pytest.raises(ValidationError):
        Command(id="c1", device="pi-1", action="rollback", issued_at=0)  # rollback needs a model


def test_committed_schemas_are_current() -> None:
    """docs/schemas/ must equal what `edgefleet schema --out docs/schemas` writes today."""
    expected = wire.json_schemas()
    on_disk = {p.name for p in SCHEMA_DIR.glob("*.schema.json")}
    assert on_disk == set(expected), "run: edgefleet schema --out docs/schemas"
    for name, schema in expected.items():
        committed = json.loads((SCHEMA_DIR / name).read_text(encoding="utf-8"))
        assert committed == schema, f"docs/schemas/{name} is stale: run edgefleet schema --out docs/schemas"


# ------------------------------------------------------------------------------ manifest schema 1 and 2

_SCHEMA2_ONLY_VARIANT_KEYS = ("output_tolerance", "required_custom_ops")


def test_signed_schema1_manifest_still_verifies_and_decodes(
    key: Ed25519PrivateKey, trusted: dict[str, object]
) -> None:
    """A manifest a schema-1 host signed (none of the schema-2 fields) verifies and decodes unchanged."""
    obj = json.loads(make_manifest().to_json())
    obj["schema"] = "edgefleet.manifest/1"
    for k in ("metrics", "primary_metric"):
        obj.pop(k, None)
    for v in obj["variants"]:
        for k in _SCHEMA2_ONLY_VARIANT_KEYS:
            v.pop(k, None)
        v["metrics"].pop("named", None)
    assert "task" in obj  # schema 1 had the task field, fixed to classification
    body = wire.signing_bytes(obj)
    obj["signature"] = {
        "alg": "ed25519",
        "key_id": wire.key_id_for(key.public_key()),
        "value": base64.b64encode(key.sign(body)).decode(),
    }
    m = wire.verify_signed(Manifest, json.dumps(obj, indent=1), trusted)  # type: ignore[arg-type]
    assert m.schema_ == "edgefleet.manifest/1" and m.task == "classification" and m.version == 1
    assert m.metrics == {} and m.primary_metric is None
    for v in m.variants:
        assert v.output_tolerance is None and v.required_custom_ops == [] and v.metrics.named == {}
    assert m.variant("float32").metrics.value("accuracy") == 0.97
    tampered = dict(obj, schema="edgefleet.manifest/2")  # the schema string is covered by the signature
    with pytest.raises(wire.SignatureError):
        wire.verify_signed(Manifest, json.dumps(tampered), trusted)  # type: ignore[arg-type]


def test_schema2_generic_manifest_with_metrics_and_tolerance_round_trips(
    key: Ed25519PrivateKey, trusted: dict[str, object]
) -> None:
    sample = BlobRef.of(b"npz bytes")
    tol = wire.OutputTolerance(min_cosine=0.995, min_sqnr_db=25.0, max_abs=0.5)
    named = {"cosine": 0.9991, "sqnr_db": 31.5, "max_abs": 0.02, "miou": 0.71}
    v = make_variant(
        "int8",
        b"\x02" * 1000,
        sample=sample,
        output_tolerance=tol,
        required_custom_ops=["TFLite_Detection_PostProcess"],
    ).model_copy(update={"metrics": HostMetrics(size_bytes=1000, named=named)})
    m = Manifest(
        model="detector",
        version=3,
        created_at=1.0,
        task="generic",
        metrics={
            "cosine": wire.MetricInfo(direction="higher"),
            "sqnr_db": wire.MetricInfo(direction="higher"),
            "max_abs": wire.MetricInfo(direction="lower"),
            "miou": wire.MetricInfo(direction="higher", source="evaluator", description="mean IoU"),
        },
        primary_metric="cosine",
        baseline="float32",
        variants=[make_variant(output_tolerance=wire.OutputTolerance()), v],
    )
    obj = json.loads(m.to_json())
    assert obj["schema"] == "edgefleet.manifest/2" and obj["task"] == "generic"
    assert obj["variants"][1]["output_tolerance"] == {
        "max_abs": 0.5,
        "min_cosine": 0.995,
        "min_sqnr_db": 25.0,
    }
    assert Manifest.from_json(m.to_json()) == m
    signed = wire.sign(m, key)
    back = wire.verify_signed(Manifest, signed.to_json(), trusted)  # type: ignore[arg-type]
    assert back == signed
    got = back.variant("int8")
    assert got.output_tolerance == tol and got.required_custom_ops == ["TFLite_Detection_PostProcess"]
    assert got.metrics.value("miou") == 0.71 and back.metrics["max_abs"].direction == "lower"
    with pytest.raises(ValidationError):
        make_variant(output_tolerance={"min_cosine": 2.0})  # out of range
    # a device's report carries its own figures against the host's references
    fid = wire.OutputFidelity(rows=64, cosine=0.9999, sqnr_db=wire.MAX_SQNR_DB, max_abs=0.0)
    r = BenchResult(variant="int8", sha256="b" * 64, ok=True, latency_ms=latency(), ts=2.0, fidelity=fid)
    report = Report(device="pi-1", model="detector", manifest_version=3, ts=2.0, results=[r])
    assert Report.from_json(report.to_json()).results[0].fidelity == fid


def test_fidelity_cap_matches_the_wire_and_keeps_the_child_light() -> None:
    import subprocess
    import sys

    from agent import fidelity

    assert fidelity.MAX_SQNR_DB == wire.MAX_SQNR_DB
    code = "import sys, agent.fidelity; print('pydantic' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
