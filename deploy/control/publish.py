"""Publish a compressor bundle to the fleet: verify, sign, chunks first, then the manifest, then clean up.

A bundle is a directory the compressor wrote; the host reads it only through ``manifest.json`` (an
unsigned wire ``Manifest``) and the files the manifest names: ``<variant.file>`` for every variant and
``<variant-id>.sample.npz`` for a variant that has a ``sample``. Every file's size, sha256 and chunk
hashes are checked before anything is published, so a tampered or truncated bundle never reaches a
device.

Order on the wire (agents never see a manifest whose chunks are missing):

1. read the model's previous retained manifest (to know which blobs it referenced);
2. every blob's chunks, retained QoS1, on ``{ns}/blobs/{sha}/{i}``;
3. the signed manifest, retained QoS1, on ``{ns}/models/{model}/manifest``;
4. an empty retained payload on every chunk of blobs the previous manifest referenced and the new
   one does not (retained blobs live in broker RAM).

Publishing the same bundle twice gives the same signed manifest (Ed25519 is deterministic).
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from pydantic import ValidationError

from agent import wire
from deploy.broker.client import MqttSession
from deploy.errors import BundleError, PublishError

MANIFEST_NAME = "manifest.json"
Progress = Callable[[str], None]


def _quiet(_: str) -> None:
    return None


@dataclass(frozen=True, slots=True)
class BlobFile:
    """One file of the bundle and the manifest entry that describes it."""

    label: str  # "variant int8" / "sample of int8"
    path: Path
    ref: wire.BlobRef


@dataclass(frozen=True, slots=True)
class Bundle:
    path: Path
    manifest: wire.Manifest
    files: tuple[BlobFile, ...]

    @property
    def total_bytes(self) -> int:
        return sum(f.ref.size for f in self.files)


def sample_file_name(variant_id: str) -> str:
    return f"{variant_id}.sample.npz"


def referenced_blobs(manifest: wire.Manifest) -> dict[str, wire.BlobRef]:
    """sha256 → BlobRef of every blob a manifest references (variants and their samples)."""
    out: dict[str, wire.BlobRef] = {}
    for v in manifest.variants:
        out.setdefault(v.sha256, v)
        if v.sample is not None:
            out.setdefault(v.sample.sha256, v.sample)
    return out


def load_manifest(bundle_dir: Path) -> wire.Manifest:
    path = bundle_dir / MANIFEST_NAME
    if not bundle_dir.is_dir():
        raise BundleError(f"bundle {bundle_dir} is not a directory")
    try:
        raw = path.read_bytes()
    except FileNotFoundError as err:
        raise BundleError(f"bundle {bundle_dir} has no {MANIFEST_NAME}") from err
    except OSError as err:
        raise BundleError(f"cannot read {path}: {err}") from err
    try:
        obj = wire.parse_json(raw)
    except wire.PayloadError as err:
        raise BundleError(f"{path} is not valid JSON: {err}") from err
    try:
        manifest = wire.Manifest.model_validate(obj)
    except ValidationError as err:
        raise BundleError(f"{path} fails the manifest schema: {_short(err)}") from err
    if manifest.signature is not None:
        raise BundleError(f"{path} is already signed; the compressor writes unsigned manifests")
    return manifest


def _short(err: ValidationError) -> str:
    parts = []
    for e in err.errors()[:5]:
        loc = ".".join(str(x) for x in e["loc"]) or "(root)"
        parts.append(f"{loc}: {e['msg']}")
    more = f" (+{err.error_count() - 5} more)" if err.error_count() > 5 else ""
    return "; ".join(parts) + more


def _read_chunks(path: Path, chunk_size: int) -> Iterator[bytes]:
    with path.open("rb") as fh:
        while chunk := fh.read(chunk_size):
            yield chunk


def verify_file(path: Path, ref: wire.BlobRef) -> None:
    """Stream ``path`` and check size, whole-file sha256 and every chunk hash against ``ref``."""
    try:
        size = path.stat().st_size
    except FileNotFoundError as err:
        raise BundleError(f"bundle file {path.name} is missing ({path})") from err
    except OSError as err:
        raise BundleError(f"cannot read bundle file {path}: {err}") from err
    if size != ref.size:
        raise BundleError(f"bundle file {path.name} has {size} bytes, the manifest says {ref.size}")
    whole = hashlib.sha256()
    try:
        for i, chunk in enumerate(_read_chunks(path, ref.chunk_size)):
            whole.update(chunk)
            if i >= len(ref.chunks) or wire.sha256_hex(chunk) != ref.chunks[i]:
                raise BundleError(f"bundle file {path.name}: chunk {i} does not match the manifest's hash")
    except OSError as err:
        raise BundleError(f"cannot read bundle file {path}: {err}") from err
    if whole.hexdigest() != ref.sha256:
        raise BundleError(f"bundle file {path.name}: sha256 {whole.hexdigest()} != manifest {ref.sha256}")


def load_bundle(bundle_dir: Path | str) -> Bundle:
    """Read and validate a bundle directory; every file is hash-checked. Raises BundleError."""
    bundle_dir = Path(bundle_dir)
    manifest = load_manifest(bundle_dir)
    files: list[BlobFile] = []
    seen: set[str] = set()
    for v in manifest.variants:
        entries: list[tuple[str, str, wire.BlobRef]] = [(f"variant {v.id}", v.file, v)]
        if v.sample is not None:
            entries.append((f"sample of {v.id}", sample_file_name(v.id), v.sample))
        for label, name, ref in entries:
            path = bundle_dir / name
            verify_file(path, ref)
            if ref.sha256 not in seen:
                seen.add(ref.sha256)
                files.append(BlobFile(label, path, wire.BlobRef(**_ref_fields(ref))))
    return Bundle(bundle_dir, manifest, tuple(files))


def _ref_fields(ref: wire.BlobRef) -> dict[str, object]:
    return {"sha256": ref.sha256, "size": ref.size, "chunk_size": ref.chunk_size, "chunks": list(ref.chunks)}


@dataclass(frozen=True, slots=True)
class PublishResult:
    manifest: wire.Manifest  # the signed manifest as published
    manifest_topic: str
    blobs: int
    chunks: int
    bytes: int
    cleared_blobs: int
    cleared_chunks: int
    seconds: float
    previous_version: int | None

    @property
    def mib_per_s(self) -> float:
        return self.bytes / (1024 * 1024) / self.seconds if self.seconds > 0 else 0.0


def previous_manifest(session: MqttSession, model: str, progress: Progress = _quiet) -> wire.Manifest | None:
    """The model's manifest currently retained on the broker, or None (unreadable ones are reported)."""
    topic = session.topics.manifest(model)
    got = session.collect_retained([topic], quiet_s=0.2).get(topic)
    if got is None:
        return None
    try:
        return wire.decode(wire.Manifest, got)
    except wire.WireError as err:
        progress(f"warning: ignoring the unreadable manifest retained on {topic}: {err}")
        return None


def publish_bundle(
    bundle: Bundle | Path | str,
    key: Ed25519PrivateKey,
    session: MqttSession,
    progress: Progress = _quiet,
    allow_downgrade: bool = False,
    on_bytes: Callable[[int], None] | None = None,
) -> PublishResult:
    """Verify, sign and publish ``bundle`` over ``session`` (see the module docstring for the order).

    ``on_bytes``: called after each chunk is handed to the session's bounded in-flight window, with the
    bytes of blobs published so far (for a progress bar).
    """
    if not isinstance(bundle, Bundle):
        bundle = load_bundle(bundle)
    manifest = bundle.manifest
    topics = session.topics
    signed = wire.sign(manifest, key)
    manifest_topic = topics.manifest(manifest.model)

    previous = previous_manifest(session, manifest.model, progress)
    if previous is not None and previous.version > manifest.version and not allow_downgrade:
        raise PublishError(
            f"the broker holds {manifest.model} manifest version {previous.version}, newer than this "
            f"bundle's {manifest.version}; devices would refuse it as a replay "
            "(use --allow-downgrade to publish anyway)"
        )

    start = time.monotonic()
    total = bundle.total_bytes
    progress(
        f"publishing {manifest.model} v{manifest.version}: {len(bundle.files)} blob(s), "
        f"{total / 1048576:.1f} MiB to {session.address}"
    )
    chunks = done = 0
    for f in bundle.files:
        t0 = time.monotonic()
        for i, chunk in enumerate(_read_chunks(f.path, f.ref.chunk_size)):
            if wire.sha256_hex(chunk) != f.ref.chunks[i]:
                raise BundleError(f"bundle file {f.path.name} changed while publishing (chunk {i})")
            session.publish(topics.blob(f.ref.sha256, i), chunk, retain=True)
            chunks += 1
            done += len(chunk)
            if on_bytes is not None:
                on_bytes(done)
        session.flush()
        dt = time.monotonic() - t0
        progress(
            f"  {f.label}: {f.ref.size / 1048576:.2f} MiB in {len(f.ref.chunks)} chunk(s), {dt:.2f} s "
            f"[{f.ref.sha256[:12]}]"
        )

    session.publish(manifest_topic, signed.to_json(), retain=True)
    session.flush()
    progress(
        f"  manifest {manifest_topic} (signed by {signed.signature.key_id if signed.signature else '?'})"
    )

    cleared_blobs = cleared_chunks = 0
    if previous is not None:
        keep = referenced_blobs(signed)
        for sha, ref in referenced_blobs(previous).items():
            if sha in keep:
                continue
            for i in range(len(ref.chunks)):
                session.publish(topics.blob(sha, i), b"", retain=True)
                cleared_chunks += 1
            cleared_blobs += 1
        session.flush()
        if cleared_blobs:
            progress(
                f"  cleared {cleared_chunks} retained chunk(s) of {cleared_blobs} blob(s) "
                f"no longer referenced (was v{previous.version})"
            )
    seconds = time.monotonic() - start
    result = PublishResult(
        manifest=signed,
        manifest_topic=manifest_topic,
        blobs=len(bundle.files),
        chunks=chunks,
        bytes=total,
        cleared_blobs=cleared_blobs,
        cleared_chunks=cleared_chunks,
        seconds=seconds,
        previous_version=previous.version if previous else None,
    )
    progress(f"done in {seconds:.2f} s ({result.mib_per_s:.1f} MiB/s)")
    return result
