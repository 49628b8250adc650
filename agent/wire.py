"""The edgefleet wire contract: MQTT topics, JSON payloads and their signatures.

Everything that crosses the broker is defined here and nowhere else; host and device both import this
module (it needs only pydantic and cryptography, never TensorFlow). Dashboards and devices in the field
depend on it, so changes are additive within a schema major version.

Payloads are UTF-8 JSON objects with a ``schema`` field ``edgefleet.<kind>/<major>``; blob chunks are raw
bytes. Manifests, assignments and commands are signed with Ed25519 over canonical JSON (sorted keys, no
spaces, the ``signature`` field removed).

Exceptions::

    WireError                 anything this module refuses
    ├── IdentifierError       a device/model/variant id, sha256 or topic segment outside its pattern
    ├── PayloadError          not UTF-8 JSON, too large, or fails the schema (reason code MALFORMED/TOO_LARGE)
    └── SignatureError        unsigned, unknown key, or a signature that does not verify
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import math
import re
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from enum import StrEnum
from typing import Annotated, Any, ClassVar, Literal, Self, TypeVar

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from pydantic import BaseModel, ConfigDict, Field, StringConstraints, ValidationError, model_validator

# --------------------------------------------------------------------------------------------------------
# Errors


class ReasonCode(StrEnum):
    MALFORMED = "MALFORMED"
    TOO_LARGE = "TOO_LARGE"
    BAD_IDENTIFIER = "BAD_IDENTIFIER"
    UNSIGNED = "UNSIGNED"
    UNKNOWN_KEY = "UNKNOWN_KEY"
    BAD_SIGNATURE = "BAD_SIGNATURE"
    BAD_KEY = "BAD_KEY"
    REPLAY = "REPLAY"
    WRONG_DEVICE = "WRONG_DEVICE"
    BAD_HASH = "BAD_HASH"
    BAD_SIZE = "BAD_SIZE"
    UNKNOWN_VARIANT = "UNKNOWN_VARIANT"
    NOT_FETCHED = "NOT_FETCHED"
    DISK_FULL = "DISK_FULL"
    RUNTIME_TOO_OLD = "RUNTIME_TOO_OLD"
    BENCH_FAILED = "BENCH_FAILED"
    HEALTH_CHECK_FAILED = "HEALTH_CHECK_FAILED"
    NO_PREVIOUS = "NO_PREVIOUS"
    NOT_RUNNING = "NOT_RUNNING"  # a cancel command for a model that is not benchmarking
    COMMAND = "COMMAND"
    INTERNAL = "INTERNAL"


class WireError(Exception):
    """Base of everything the wire layer refuses. ``reason`` is the Event reason code to report."""

    reason: ReasonCode = ReasonCode.MALFORMED


class IdentifierError(WireError, ValueError):
    reason = ReasonCode.BAD_IDENTIFIER


class PayloadError(WireError):
    def __init__(self, message: str, reason: ReasonCode = ReasonCode.MALFORMED) -> None:
        super().__init__(message)
        self.reason = reason


class SignatureError(WireError):
    def __init__(self, message: str, reason: ReasonCode = ReasonCode.BAD_SIGNATURE) -> None:
        super().__init__(message)
        self.reason = reason


# --------------------------------------------------------------------------------------------------------
# Identifiers

ID_PATTERN = r"^[a-z0-9][a-z0-9_-]{0,62}$"
SHA256_PATTERN = r"^[0-9a-f]{64}$"
_ID_RE = re.compile(ID_PATTERN)
_SHA_RE = re.compile(SHA256_PATTERN)

Identifier = Annotated[str, StringConstraints(pattern=ID_PATTERN)]
Sha256 = Annotated[str, StringConstraints(pattern=SHA256_PATTERN)]
# Bundle file names: an identifier plus an extension; never a path.
FileName = Annotated[str, StringConstraints(pattern=r"^[a-z0-9][a-z0-9_.-]{0,126}$")]

DEFAULT_NAMESPACE = "edgefleet"
DEFAULT_CHUNK_SIZE = 256 * 1024
MAX_JSON_PAYLOAD = 4 * 1024 * 1024  # a manifest of many large variants stays far below this
MAX_CHUNK_SIZE = 8 * 1024 * 1024


def check_id(value: str, what: str = "identifier") -> str:
    """Return ``value`` if it is a valid device/model/variant id, else raise IdentifierError."""
    if not isinstance(value, str) or not _ID_RE.fullmatch(value):
        raise IdentifierError(f"{what} {value!r} must match {ID_PATTERN}")
    return value


def check_sha256(value: str) -> str:
    if not isinstance(value, str) or not _SHA_RE.fullmatch(value):
        raise IdentifierError(f"sha256 {value!r} must be 64 lowercase hex digits")
    return value


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def now() -> float:
    """Wall-clock timestamp used in payloads (seconds since the epoch)."""
    return time.time()


# --------------------------------------------------------------------------------------------------------
# Base model


class WireModel(BaseModel):
    """Strict base: unknown keys are errors, instances are immutable.

    ``defer_build``: a model's validator/serializer is built on its first use, not at import. The idle
    daemon only ever touches Status/Telemetry (and what they nest); Manifest, Report, BenchResult, Command,
    ... cost their build (~0.1 s, ~1 MB in all) only once the device has work. Behaviour is unchanged.
    """

    model_config = ConfigDict(extra="forbid", frozen=True, defer_build=True)


_M = TypeVar("_M", bound="Message")


class Message(WireModel):
    """A top-level payload. Subclasses fix ``schema`` to ``edgefleet.<kind>/<major>``."""

    SCHEMA: ClassVar[str]

    def to_json(self) -> bytes:
        return canonical_json(self.model_dump(mode="json", by_alias=True, exclude_none=True))

    @classmethod
    def from_json(cls, payload: bytes | str, max_bytes: int = MAX_JSON_PAYLOAD) -> Self:
        return cls.model_validate(parse_json(payload, max_bytes))

    @classmethod
    def message_kind(cls) -> str:
        return cls.SCHEMA.split(".", 1)[1].split("/", 1)[0]


# --------------------------------------------------------------------------------------------------------
# Canonical JSON and payload decoding


def canonical_json(obj: Any) -> bytes:
    """Sorted keys, no whitespace, UTF-8; NaN/Infinity are refused (they are not JSON)."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False).encode(
        "utf-8"
    )


def parse_json(payload: bytes | str, max_bytes: int = MAX_JSON_PAYLOAD) -> dict[str, Any]:
    """Decode a JSON object payload, refusing oversize, non-UTF-8, non-object or NaN-bearing input."""
    raw = payload.encode("utf-8") if isinstance(payload, str) else payload
    if len(raw) > max_bytes:
        raise PayloadError(
            f"payload of {len(raw)} bytes exceeds the {max_bytes}-byte limit", ReasonCode.TOO_LARGE
        )
    try:
        obj = json.loads(raw.decode("utf-8"), parse_constant=_refuse_constant)
    except (UnicodeDecodeError, json.JSONDecodeError, ValueError) as err:
        raise PayloadError(f"payload is not UTF-8 JSON: {err}") from err
    if not isinstance(obj, dict):
        raise PayloadError(f"payload must be a JSON object, got {type(obj).__name__}")
    return obj


def _refuse_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


# --------------------------------------------------------------------------------------------------------
# Signatures


class Signature(WireModel):
    alg: Literal["ed25519"] = "ed25519"
    key_id: Annotated[str, StringConstraints(pattern=r"^[0-9a-f]{16}$")]
    value: Annotated[str, StringConstraints(min_length=1, max_length=200)]


def key_id_for(public_key: Ed25519PublicKey) -> str:
    """Stable short id of a public key: first 16 hex digits of sha256 over its raw bytes."""
    raw = public_key.public_bytes_raw()  # not public_bytes(): serialization costs the idle daemon 0.7 MB
    return sha256_hex(raw)[:16]


def public_key_from_text(text: str) -> Ed25519PublicKey:
    """Accept a PEM public key or the base64 of the 32 raw bytes."""
    text = text.strip()
    try:
        if text.startswith("-----BEGIN"):
            # only here: the serialization module costs the daemon 0.7 MB and base64 keys need none of it
            from cryptography.hazmat.primitives.serialization import load_pem_public_key

            key = load_pem_public_key(text.encode("ascii"))
        else:
            key = Ed25519PublicKey.from_public_bytes(base64.b64decode(text, validate=True))
    except (ValueError, binascii.Error, TypeError) as err:
        raise SignatureError(
            f"not an Ed25519 public key (PEM or base64 raw): {err}", ReasonCode.BAD_KEY
        ) from err
    if not isinstance(key, Ed25519PublicKey):
        raise SignatureError("public key is not Ed25519", ReasonCode.BAD_KEY)
    return key


def signing_bytes(obj: Mapping[str, Any]) -> bytes:
    """The bytes a signature covers: canonical JSON of the object without its ``signature`` field."""
    return canonical_json({k: v for k, v in obj.items() if k != "signature"})


def sign(message: _SM, private_key: Ed25519PrivateKey) -> _SM:
    """Return a copy of ``message`` carrying an Ed25519 signature over its canonical JSON."""
    body = message.model_dump(mode="json", by_alias=True, exclude_none=True)
    value = base64.b64encode(private_key.sign(signing_bytes(body))).decode("ascii")
    sig = Signature(key_id=key_id_for(private_key.public_key()), value=value)
    return message.model_copy(update={"signature": sig})


def verify_signed(
    cls: type[_SM],
    payload: bytes | str,
    trusted: Mapping[str, Ed25519PublicKey],
    max_bytes: int = MAX_JSON_PAYLOAD,
) -> _SM:
    """Parse a signed payload and check its signature against ``trusted`` (key id → public key).

    The signature is checked over the JSON exactly as received (minus ``signature``), before the
    schema is applied, so a verifier never depends on how pydantic would re-serialise the object.
    """
    obj = parse_json(payload, max_bytes)
    sig_obj = obj.get("signature")
    if sig_obj is None:
        raise SignatureError(f"{cls.message_kind()} is not signed", ReasonCode.UNSIGNED)
    try:
        sig = Signature.model_validate(sig_obj)
    except ValidationError as err:
        raise SignatureError(f"{cls.message_kind()} signature block is malformed: {err}") from err
    key = trusted.get(sig.key_id)
    if key is None:
        raise SignatureError(
            f"{cls.message_kind()} is signed with key {sig.key_id}, which is not among the trusted keys "
            f"({', '.join(sorted(trusted)) or 'none configured'})",
            ReasonCode.UNKNOWN_KEY,
        )
    try:
        key.verify(base64.b64decode(sig.value, validate=True), signing_bytes(obj))
    except (InvalidSignature, binascii.Error, ValueError) as err:
        raise SignatureError(f"{cls.message_kind()} signature does not verify with key {sig.key_id}") from err
    try:
        return cls.model_validate(obj)
    except ValidationError as err:
        raise PayloadError(f"signed {cls.message_kind()} fails its schema: {err}") from err


def decode(cls: type[_M], payload: bytes | str, max_bytes: int = MAX_JSON_PAYLOAD) -> _M:
    """Parse an unsigned payload into ``cls``, raising PayloadError with a readable message."""
    try:
        return cls.model_validate(parse_json(payload, max_bytes))
    except ValidationError as err:
        raise PayloadError(f"{cls.message_kind()} fails its schema: {err}") from err


# --------------------------------------------------------------------------------------------------------
# Shared parts


class RuntimeInfo(WireModel):
    name: Literal["ai-edge-litert", "tflite-runtime", "tensorflow"]
    version: str


def version_tuple(version: str) -> tuple[int, ...]:
    """``"2.14.0"`` → ``(2, 14, 0)``; non-digits in a part are dropped, missing parts are 0."""
    parts = []
    for piece in version.strip().split("."):
        digits = "".join(ch for ch in piece if ch.isdigit())
        parts.append(int(digits) if digits else 0)
    while len(parts) < 3:
        parts.append(0)
    return tuple(parts)


# ai-edge-litert restarted its numbering: 1.x shipped the TFLite kernels of TensorFlow 2.18-2.19, 2.x
# those of 2.20 and later. Variants state ``min_runtime`` on the TensorFlow Lite scale.
_LITERT_TFLITE_EQUIVALENT = {1: "2.18.0", 2: "2.20.0"}


def tflite_version(runtime: RuntimeInfo) -> str:
    """The TensorFlow Lite version ``runtime`` is equivalent to, for comparing with ``min_runtime``."""
    if runtime.name == "ai-edge-litert":
        major = version_tuple(runtime.version)[0]
        return _LITERT_TFLITE_EQUIVALENT.get(major, "2.20.0" if major > 2 else "2.18.0")
    return runtime.version


def runtime_supports(runtime: RuntimeInfo, min_runtime: str | None) -> bool:
    """True when ``runtime`` is at least ``min_runtime`` (no requirement: always)."""
    return min_runtime is None or version_tuple(tflite_version(runtime)) >= version_tuple(min_runtime)


class BlobRef(WireModel):
    """A content-addressed file shipped as retained chunks on ``{ns}/blobs/{sha}/{index}``."""

    sha256: Sha256
    size: int = Field(ge=1, description="bytes")
    chunk_size: int = Field(default=DEFAULT_CHUNK_SIZE, ge=1024, le=MAX_CHUNK_SIZE)
    chunks: list[Sha256] = Field(description="sha256 of each chunk, in order")

    @model_validator(mode="after")
    def _chunk_count(self) -> Self:
        expected = math.ceil(self.size / self.chunk_size)
        if len(self.chunks) != expected:
            raise ValueError(
                f"{self.size} bytes in {self.chunk_size}-byte chunks needs {expected} chunk hashes, "
                f"got {len(self.chunks)}"
            )
        return self

    def chunk_length(self, index: int) -> int:
        """Exact byte length chunk ``index`` must have."""
        if not 0 <= index < len(self.chunks):
            raise IndexError(index)
        if index < len(self.chunks) - 1:
            return self.chunk_size
        return self.size - self.chunk_size * (len(self.chunks) - 1)

    @classmethod
    def of(cls, data: bytes, chunk_size: int = DEFAULT_CHUNK_SIZE) -> BlobRef:
        return cls(**blob_fields(data, chunk_size))


def blob_fields(data: bytes, chunk_size: int = DEFAULT_CHUNK_SIZE) -> dict[str, Any]:
    """sha256, size, chunk_size and chunk hashes of ``data`` (for BlobRef and Variant)."""
    return {
        "sha256": sha256_hex(data),
        "size": len(data),
        "chunk_size": chunk_size,
        "chunks": [sha256_hex(c) for c in iter_chunks(data, chunk_size)],
    }


def iter_chunks(data: bytes, chunk_size: int = DEFAULT_CHUNK_SIZE) -> Iterable[bytes]:
    for start in range(0, len(data), chunk_size):
        yield data[start : start + chunk_size]


class QuantParams(WireModel):
    scale: list[float] = Field(default_factory=list)
    zero_point: list[int] = Field(default_factory=list)


TensorDType = Literal["float32", "float16", "int8", "uint8", "int16", "int32", "int64", "bool"]


class TensorSpec(WireModel):
    name: str = Field(max_length=256)
    shape: list[int]
    dtype: TensorDType
    quantization: QuantParams | None = None


Quantization = Literal[
    "none", "float16", "dynamic_int8", "int8", "weight_only_int8", "weight_only_int4", "int16x8"
]  # weight_only_int4: int4 weights where the outputs tolerate them, int8 elsewhere (manifest schema 2)
# Named metrics: lowercase identifiers such as accuracy, cosine, sqnr_db, max_abs, top1_agreement, miou.
METRIC_PATTERN = r"^[a-z][a-z0-9_]{0,62}$"
MetricName = Annotated[str, StringConstraints(pattern=METRIC_PATTERN)]
# JSON has no infinity: identical outputs have an SQNR of this many dB.
MAX_SQNR_DB = 300.0


class HostMetrics(WireModel):
    """Figures measured on the host, on the .tflite file itself, on held-out data."""

    accuracy: float | None = Field(default=None, ge=0, le=1)
    accuracy_drop: float | None = Field(default=None, description="float32 accuracy minus this one")
    agreement: float | None = Field(default=None, ge=0, le=1, description="top-1 agreement with float32")
    eval_samples: int | None = Field(default=None, ge=0)
    sample_accuracy: float | None = Field(
        default=None,
        ge=0,
        le=1,
        description="accuracy of this file on its evaluation sample (every row); a device must reproduce it",
    )
    size_bytes: int = Field(ge=1)
    gzip_bytes: int | None = Field(default=None, ge=1)
    params: int | None = Field(default=None, ge=0)
    macs: int | None = Field(default=None, ge=0)
    latency_ms_p50: float | None = Field(default=None, ge=0, description="host, 1 thread")
    named: dict[MetricName, float] = Field(
        default_factory=dict,
        description="named metrics of this file on held-out rows (accuracy, cosine, sqnr_db, max_abs, "
        "top1_agreement, or a user evaluator's, e.g. miou); directions in Manifest.metrics",
    )

    def value(self, name: str) -> float | None:
        """A named metric, falling back to the fixed fields for ``accuracy`` and ``agreement``."""
        if name in self.named:
            return self.named[name]
        if name == "accuracy":
            return self.accuracy
        if name in ("agreement", "top1_agreement"):
            return self.agreement
        return None


class MetricInfo(WireModel):
    """What a named metric means: which way is better and where it comes from."""

    direction: Literal["higher", "lower"]
    source: Literal["labels", "fidelity", "evaluator"] = "fidelity"
    description: str | None = Field(default=None, max_length=300)


class OutputTolerance(WireModel):
    """How far a device's outputs on the sample may depart from the host's outputs of the same file.

    The host and the device run the same bytes, so a healthy runtime agrees almost exactly; an old
    runtime that loads a model and computes garbage falls far outside these bounds.
    """

    min_cosine: float = Field(default=0.99, ge=-1, le=1)
    min_sqnr_db: float | None = Field(default=20.0, description="signal-to-quantization-noise ratio, dB")
    max_abs: float | None = Field(default=None, ge=0, description="largest absolute difference allowed")


class OutputFidelity(WireModel):
    """Outputs of a file compared with reference outputs (worst over every output tensor and row set)."""

    rows: int = Field(ge=0)
    cosine: float = Field(ge=-1.0001, le=1.0001)
    sqnr_db: float = Field(description=f"capped at {MAX_SQNR_DB:g} dB for identical outputs")
    max_abs: float = Field(ge=0)


class Variant(BlobRef):
    id: Identifier
    file: FileName
    quantization: Quantization
    techniques: list[Identifier] = Field(default_factory=list, description="e.g. prune, distill")
    inputs: list[TensorSpec] = Field(min_length=1)
    outputs: list[TensorSpec] = Field(min_length=1)
    metrics: HostMetrics
    min_runtime: str | None = Field(
        default=None, pattern=r"^\d+\.\d+(\.\d+)?$", description="oldest TFLite runtime this file is safe on"
    )
    sample: BlobRef | None = Field(
        default=None,
        description="evaluation sample (.npz): inputs x (one input) or x_0, x_1, ... in this variant's "
        "input dtypes, optional labels y, and ref_0, ref_1, ...: this file's outputs on the host "
        "(float32, dequantized), which a device must reproduce within output_tolerance",
    )
    output_tolerance: OutputTolerance | None = Field(
        default=None, description="device outputs vs ref_* of the sample; absent: no output check"
    )
    required_custom_ops: list[Annotated[str, StringConstraints(min_length=1, max_length=128)]] = Field(
        default_factory=list, description="custom ops a runtime must be built with to load this file"
    )
    notes: list[str] = Field(default_factory=list)

    @property
    def reference_accuracy(self) -> float | None:
        """The host figure a device's accuracy on the sample is compared with: the same rows when known."""
        if self.metrics.sample_accuracy is not None:
            return self.metrics.sample_accuracy
        return self.metrics.accuracy


# --------------------------------------------------------------------------------------------------------
# Messages


class Manifest(Message):
    """Schema 2 adds the generic task, named metrics, reference outputs and custom ops; a schema-1
    manifest (classification only) still verifies and decodes: its fields are a subset."""

    SCHEMA: ClassVar[str] = "edgefleet.manifest/2"
    schema_: Literal["edgefleet.manifest/1", "edgefleet.manifest/2"] = Field(
        default="edgefleet.manifest/2", alias="schema"
    )
    model: Identifier
    version: int = Field(ge=1, description="monotonic; a device refuses a version older than it holds")
    created_at: float
    task: Literal["classification", "generic"] = Field(
        default="classification",
        description="classification: labels and accuracy; generic: any outputs, judged by their "
        "fidelity to the float reference and by user metrics",
    )
    labels: list[str] = Field(default_factory=list)
    metrics: dict[MetricName, MetricInfo] = Field(
        default_factory=dict, description="every named metric the variants carry, with its direction"
    )
    primary_metric: MetricName | None = Field(
        default=None, description="the metric 'best' means when a policy names none (e.g. accuracy, cosine)"
    )
    baseline: Identifier = Field(description="id of the float32 reference variant")
    variants: list[Variant] = Field(min_length=1)
    signature: Signature | None = None

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)

    @model_validator(mode="after")
    def _consistent(self) -> Self:
        ids = [v.id for v in self.variants]
        if len(set(ids)) != len(ids):
            raise ValueError(f"variant ids must be unique, got {ids}")
        if self.baseline not in ids:
            raise ValueError(f"baseline {self.baseline!r} is not one of the variants {ids}")
        return self

    def variant(self, variant_id: str) -> Variant:
        for v in self.variants:
            if v.id == variant_id:
                return v
        raise KeyError(variant_id)


class ModelState(StrEnum):
    IDLE = "idle"
    FETCHING = "fetching"
    VERIFYING = "verifying"
    BENCHMARKING = "benchmarking"
    REPORTED = "reported"
    ACTIVATING = "activating"
    PROBATION = "probation"
    COMMITTED = "committed"
    ROLLED_BACK = "rolled_back"


class ActiveVariant(WireModel):
    variant: Identifier
    sha256: Sha256
    manifest_version: int = Field(ge=1)
    activated_at: float
    # In a Status only: the active file's figures from this device's latest successful benchmark of it,
    # so a dashboard reading the status shows the running variant's numbers the moment it changes.
    latency_ms_p50: float | None = Field(default=None, ge=0, allow_inf_nan=False)
    energy_mj_per_inference: float | None = Field(default=None, ge=0, allow_inf_nan=False)


class ModelStatus(WireModel):
    state: ModelState
    manifest_version: int | None = None
    active: ActiveVariant | None = None
    detail: str | None = Field(default=None, max_length=1000)


class Status(Message):
    SCHEMA: ClassVar[str] = "edgefleet.status/1"
    schema_: Literal["edgefleet.status/1"] = Field(default="edgefleet.status/1", alias="schema")
    device: Identifier
    online: bool
    ts: float
    agent_version: str | None = None
    runtime: RuntimeInfo | None = None
    board: str | None = Field(default=None, max_length=200)
    arch: str | None = Field(default=None, max_length=64)
    cpu_count: int | None = Field(default=None, ge=1)
    ram_bytes: int | None = Field(default=None, ge=0)
    device_class: Identifier | None = Field(default=None, description="operator's grouping for policies")
    models: dict[Identifier, ModelStatus] = Field(default_factory=dict)

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)


class BenchError(StrEnum):
    LOAD_ERROR = "LOAD_ERROR"
    UNSUPPORTED_OP = "UNSUPPORTED_OP"
    RUN_TIMEOUT = "RUN_TIMEOUT"
    OOM = "OOM"
    CRASH = "CRASH"
    ACCURACY_MISMATCH = "ACCURACY_MISMATCH"
    RUNTIME_TOO_OLD = "RUNTIME_TOO_OLD"


class LatencyStats(WireModel):
    """Milliseconds over the timed runs (warm-up excluded)."""

    count: int = Field(ge=1)
    mean: float
    std: float
    min: float
    p50: float
    p90: float
    p95: float
    p99: float
    max: float


class EnergyMethod(StrEnum):
    HWMON = "hwmon"
    PMIC = "pmic"
    RAPL = "rapl"
    BATTERY = "battery"
    MODEL = "model"


class Energy(WireModel):
    method: EnergyMethod
    measured: bool = Field(description="false when the figure comes from a utilisation model")
    sensor: str | None = Field(default=None, max_length=200)
    mj_per_inference: float = Field(ge=0)
    avg_power_w: float = Field(ge=0)
    idle_power_w: float | None = Field(default=None, ge=0)
    samples: int = Field(default=0, ge=0)

    @model_validator(mode="after")
    def _modelled_is_not_measured(self) -> Self:
        if self.method is EnergyMethod.MODEL and self.measured:
            raise ValueError("an energy figure from the utilisation model cannot be marked measured")
        return self


class Contention(WireModel):
    """How much other processes disturbed the timed window that was kept (report/1, added in place: the
    fields are optional, so reports from older agents still decode; see agent/contention.py)."""

    cores: list[int] = Field(default_factory=list, max_length=1024, description="the child's CPU affinity")
    other_cpu_s: float = Field(ge=0, description="CPU seconds other processes used on those cores")
    other_share: float = Field(ge=0, description="other_cpu_s / (window seconds x cores)")
    involuntary_switches: int = Field(ge=0, description="the child's involuntary context switches")
    involuntary_per_s: float = Field(ge=0)
    freq_mhz_min: float | None = Field(default=None, ge=0, description="cpufreq, where the board has it")
    freq_mhz_max: float | None = Field(default=None, ge=0)
    throttled: bool | None = Field(default=None, description="firmware throttling flags during the window")
    retries: int = Field(default=0, ge=0, description="windows run again because they were disturbed")
    why: list[Annotated[str, StringConstraints(max_length=300)]] = Field(default_factory=list, max_length=8)


class BenchResult(WireModel):
    variant: Identifier
    sha256: Sha256
    ok: bool
    error: BenchError | None = None
    error_detail: str | None = Field(default=None, max_length=2000)
    runtime: RuntimeInfo | None = None
    threads: int = Field(default=1, ge=1)
    warmup_runs: int = Field(default=0, ge=0)
    duration_s: float | None = Field(default=None, ge=0)
    latency_ms: LatencyStats | None = None
    init_ms: float | None = Field(default=None, ge=0)
    first_inference_ms: float | None = Field(default=None, ge=0)
    peak_rss_bytes: int | None = Field(default=None, ge=0)
    cpu_util: float | None = Field(
        default=None, ge=0, description="CPU seconds per wall second (1.0 = one core)"
    )
    temperature_c_before: float | None = None
    temperature_c_after: float | None = None
    throttled: bool | None = None
    energy: Energy | None = None
    accuracy: float | None = Field(default=None, ge=0, le=1, description="on the bundle's sample, on device")
    agreement: float | None = Field(default=None, ge=0, le=1)
    fidelity: OutputFidelity | None = Field(
        default=None, description="this device's outputs on the sample against the host's (ref_*)"
    )
    contended: bool | None = Field(
        default=None,
        description="the timed window stayed disturbed by other processes after its retries (None: not "
        "measured, an older agent); select does not rank on a contended result by default",
    )
    contention: Contention | None = None
    ts: float

    @model_validator(mode="after")
    def _ok_has_figures(self) -> Self:
        if self.ok and self.latency_ms is None:
            raise ValueError("a successful result needs latency_ms")
        if not self.ok and self.error is None:
            raise ValueError("a failed result needs an error code")
        return self


class Report(Message):
    SCHEMA: ClassVar[str] = "edgefleet.report/1"
    schema_: Literal["edgefleet.report/1"] = Field(default="edgefleet.report/1", alias="schema")
    device: Identifier
    model: Identifier
    manifest_version: int = Field(ge=1)
    ts: float
    results: list[BenchResult]

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)

    def result(self, variant_id: str) -> BenchResult | None:
        return next((r for r in self.results if r.variant == variant_id), None)


class EventKind(StrEnum):
    DOWNLOADED = "downloaded"
    VERIFIED = "verified"
    REJECTED = "rejected"
    BENCHMARKED = "benchmarked"
    ACTIVATED = "activated"
    COMMITTED = "committed"
    ROLLED_BACK = "rolled_back"
    SKIPPED = "skipped"
    PONG = "pong"
    ACK = "ack"
    ERROR = "error"


class Event(Message):
    SCHEMA: ClassVar[str] = "edgefleet.event/1"
    schema_: Literal["edgefleet.event/1"] = Field(default="edgefleet.event/1", alias="schema")
    device: Identifier
    ts: float
    kind: EventKind
    model: Identifier | None = None
    variant: Identifier | None = None
    sha256: Sha256 | None = None
    reason: ReasonCode | None = None
    detail: str | None = Field(default=None, max_length=2000)
    correlation_id: Identifier | None = None

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)


class Assignment(Message):
    SCHEMA: ClassVar[str] = "edgefleet.assignment/1"
    schema_: Literal["edgefleet.assignment/1"] = Field(default="edgefleet.assignment/1", alias="schema")
    device: Identifier
    model: Identifier
    variant: Identifier
    sha256: Sha256
    manifest_version: int = Field(ge=1)
    issued_at: float
    policy: str = Field(max_length=200, description="name of the policy that chose this variant")
    reason: str | None = Field(default=None, max_length=4000)
    rollout: Identifier | None = None
    signature: Signature | None = None

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)


class CommandAction(StrEnum):
    PING = "ping"
    REBENCHMARK = "rebenchmark"
    ROLLBACK = "rollback"
    CANCEL = "cancel"  # end the model's running benchmark; no report


class Command(Message):
    SCHEMA: ClassVar[str] = "edgefleet.command/1"
    schema_: Literal["edgefleet.command/1"] = Field(default="edgefleet.command/1", alias="schema")
    id: Identifier = Field(description="correlation id; the answering Event carries it")
    device: Identifier
    action: CommandAction
    model: Identifier | None = None
    issued_at: float
    signature: Signature | None = None

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)

    @model_validator(mode="after")
    def _model_for_model_actions(self) -> Self:
        if self.action is not CommandAction.PING and self.model is None:
            raise ValueError(f"command {self.action.value} needs a model")
        return self


class Telemetry(Message):
    SCHEMA: ClassVar[str] = "edgefleet.telemetry/1"
    schema_: Literal["edgefleet.telemetry/1"] = Field(default="edgefleet.telemetry/1", alias="schema")
    device: Identifier
    ts: float
    uptime_s: float = Field(ge=0)
    cpu_percent: float | None = Field(default=None, ge=0)
    rss_bytes: int | None = Field(default=None, ge=0)
    temperature_c: float | None = None
    throttled: bool | None = None
    inferences: int = Field(default=0, ge=0)

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)


SignedMessage = Manifest | Assignment | Command
_SM = TypeVar("_SM", Manifest, Assignment, Command)

MESSAGES: tuple[type[Message], ...] = (Manifest, Status, Report, Event, Assignment, Command, Telemetry)


# --------------------------------------------------------------------------------------------------------
# Topics


class TopicKind(StrEnum):
    MANIFEST = "manifest"
    BLOB = "blob"
    STATUS = "status"
    REPORT = "report"
    EVENTS = "events"
    TELEMETRY = "telemetry"
    ASSIGN = "assign"
    CMD = "cmd"


@dataclass(frozen=True, slots=True)
class ParsedTopic:
    kind: TopicKind
    device: str | None = None
    model: str | None = None
    sha256: str | None = None
    index: int | None = None


_MAX_CHUNK_INDEX = 1_000_000


@dataclass(frozen=True, slots=True)
class Topics:
    """Builds and parses every topic of the contract under one namespace."""

    ns: str = DEFAULT_NAMESPACE

    def __post_init__(self) -> None:
        check_id(self.ns, "namespace")

    def manifest(self, model: str) -> str:
        return f"{self.ns}/models/{check_id(model, 'model')}/manifest"

    def blob(self, sha: str, index: int) -> str:
        if not 0 <= index < _MAX_CHUNK_INDEX:
            raise IdentifierError(f"chunk index {index} out of range")
        return f"{self.ns}/blobs/{check_sha256(sha)}/{index}"

    def status(self, device: str) -> str:
        return f"{self.ns}/devices/{check_id(device, 'device')}/status"

    def report(self, device: str, model: str) -> str:
        return f"{self.ns}/devices/{check_id(device, 'device')}/reports/{check_id(model, 'model')}"

    def events(self, device: str) -> str:
        return f"{self.ns}/devices/{check_id(device, 'device')}/events"

    def telemetry(self, device: str) -> str:
        return f"{self.ns}/devices/{check_id(device, 'device')}/telemetry"

    def assign(self, device: str, model: str) -> str:
        return f"{self.ns}/devices/{check_id(device, 'device')}/assign/{check_id(model, 'model')}"

    def cmd(self, device: str) -> str:
        return f"{self.ns}/devices/{check_id(device, 'device')}/cmd"

    # Subscription filters used by the host side.
    def all_manifests(self) -> str:
        return f"{self.ns}/models/+/manifest"

    def all_statuses(self) -> str:
        return f"{self.ns}/devices/+/status"

    def all_reports(self) -> str:
        return f"{self.ns}/devices/+/reports/+"

    def all_events(self) -> str:
        return f"{self.ns}/devices/+/events"

    def all_telemetry(self) -> str:
        return f"{self.ns}/devices/+/telemetry"

    def device_assignments(self, device: str) -> str:
        return f"{self.ns}/devices/{check_id(device, 'device')}/assign/+"

    def parse(self, topic: str) -> ParsedTopic:
        """Parse a concrete topic of this namespace; raise IdentifierError for anything else."""
        parts = topic.split("/")
        if len(parts) < 3 or parts[0] != self.ns:
            raise IdentifierError(f"topic {topic!r} is not under namespace {self.ns!r}")
        match parts[1:]:
            case ["models", model, "manifest"]:
                return ParsedTopic(TopicKind.MANIFEST, model=check_id(model, "model"))
            case ["blobs", sha, index] if index.isdigit() and len(index) <= 7:
                return ParsedTopic(TopicKind.BLOB, sha256=check_sha256(sha), index=int(index))
            case ["devices", device, "status"]:
                return ParsedTopic(TopicKind.STATUS, device=check_id(device, "device"))
            case ["devices", device, "reports", model]:
                return ParsedTopic(TopicKind.REPORT, device=check_id(device, "device"), model=check_id(model))
            case ["devices", device, "events"]:
                return ParsedTopic(TopicKind.EVENTS, device=check_id(device, "device"))
            case ["devices", device, "telemetry"]:
                return ParsedTopic(TopicKind.TELEMETRY, device=check_id(device, "device"))
            case ["devices", device, "assign", model]:
                return ParsedTopic(TopicKind.ASSIGN, device=check_id(device, "device"), model=check_id(model))
            case ["devices", device, "cmd"]:
                return ParsedTopic(TopicKind.CMD, device=check_id(device, "device"))
        raise IdentifierError(f"topic {topic!r} is not part of the edgefleet contract")


# --------------------------------------------------------------------------------------------------------
# Inbound messages: one decoder for every receiver (agent, collector, fleet state, rollout controller)

_TOPIC_MESSAGE: dict[TopicKind, type[Message]] = {
    TopicKind.MANIFEST: Manifest,
    TopicKind.STATUS: Status,
    TopicKind.REPORT: Report,
    TopicKind.EVENTS: Event,
    TopicKind.TELEMETRY: Telemetry,
    TopicKind.ASSIGN: Assignment,
    TopicKind.CMD: Command,
}


@dataclass(frozen=True, slots=True)
class Decoded:
    """An inbound message: its parsed topic and the typed payload.

    ``message`` is None for a blob chunk (raw bytes: ``payload``) and for an empty payload (a retained
    message being cleared).
    """

    topic: ParsedTopic
    message: Message | None
    payload: bytes

    def as_(self, cls: type[_M]) -> _M:
        """The message as ``cls`` (the caller dispatched on ``topic.kind``); PayloadError otherwise."""
        if not isinstance(self.message, cls):
            raise PayloadError(f"expected a {cls.message_kind()} on this topic")
        return self.message


def decode_inbound(
    topics: Topics,
    topic: str,
    payload: bytes,
    *,
    trusted: Mapping[str, Ed25519PublicKey] | None = None,
    max_bytes: int = MAX_JSON_PAYLOAD,
    parsed: ParsedTopic | None = None,
) -> Decoded:
    """Decode a message received on ``topic`` into the message its topic carries.

    With ``trusted``, manifests, assignments and commands must carry a signature by one of those keys
    (SignatureError); without, they are only schema-checked (host-side readers of what was published).
    The payload's ``device`` and ``model`` must be the ones in the topic: a mismatch is a PayloadError
    with reason WRONG_DEVICE (device) or MALFORMED (model). A topic outside the contract is an
    IdentifierError. Every refusal is a :class:`WireError` whose ``reason`` is the Event reason code.
    ``parsed``: the topic already parsed (a receiver caching its fleet's topics).
    """
    if parsed is None:
        parsed = topics.parse(topic)
    if parsed.kind is TopicKind.BLOB or not payload:
        return Decoded(parsed, None, payload)
    cls = _TOPIC_MESSAGE[parsed.kind]
    if trusted is not None and cls in (Manifest, Assignment, Command):
        message: Message = verify_signed(cls, payload, trusted, max_bytes)  # type: ignore[type-var]
    else:
        message = _decode_fast(cls, payload, max_bytes)
    check_topic_matches(parsed, message)
    return Decoded(parsed, message, payload)


def _decode_fast(cls: type[_M], payload: bytes, max_bytes: int) -> _M:
    """:func:`decode`, three times faster: pydantic parses the JSON itself, no dict in between.

    Same result for every payload: anything the fast path could treat differently goes to :func:`decode`
    (which also gives the usual error): oversize, ``NaN``/``Infinity`` literals (which pydantic's parser
    accepts and :func:`parse_json` refuses), and every payload the fast path refuses (bad UTF-8 or JSON,
    not an object, failing the schema). Duplicate keys: the last wins in both.
    """
    if len(payload) <= max_bytes and b"NaN" not in payload and b"Infinity" not in payload:
        try:
            return cls.model_validate_json(payload)
        except ValidationError:
            pass
    return decode(cls, payload, max_bytes)


def check_topic_matches(parsed: ParsedTopic, message: Message) -> None:
    """The payload's device/model are the topic's (a report on another device's topic is refused)."""
    kind = message.message_kind()
    device = getattr(message, "device", None)
    if parsed.device is not None and device != parsed.device:
        raise PayloadError(
            f"{kind} for device {device!r} arrived on the topic of device {parsed.device!r}",
            ReasonCode.WRONG_DEVICE,
        )
    model = getattr(message, "model", None)
    if parsed.model is not None and model != parsed.model:
        raise PayloadError(f"{kind} for model {model!r} arrived on the topic of model {parsed.model!r}")


def json_schemas() -> dict[str, dict[str, Any]]:
    """One JSON Schema per message, keyed by file name (``manifest.schema.json`` ...)."""
    out: dict[str, dict[str, Any]] = {}
    for cls in MESSAGES:
        schema = cls.model_json_schema(by_alias=True, mode="validation")
        schema["$id"] = f"https://edgefleet.dev/schemas/{cls.message_kind()}.schema.json"
        schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
        out[f"{cls.message_kind()}.schema.json"] = schema
    return out
