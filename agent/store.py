"""The device store (ARCHITECTURE §4), everything under ``store.path``::

    blobs/<sha>.tflite             verified model, read-only (0444), content-addressed
    blobs/<sha>.npz                verified evaluation sample of a variant (same rules)
    partial/<sha>/<index>          verified chunks of a blob being fetched (kept across restarts)
    models/<model>/active.tflite   symlink → current/model.tflite (fixed; see agent.generations)
    models/<model>/active.json     symlink → current/active.json: variant id, sha, manifest version, ...
    models/<model>/current         symlink → gen/<n>, swapped atomically: model and metadata together
    models/<model>/gen/<n>/        one generation: model.tflite → ../../../../blobs/<sha>.tflite + active.json
    models/<model>/previous.tflite symlink → gen/<m>/model.tflite, the generation active before
    models/<model>/manifest.json   the signed manifest exactly as received (re-verified on restart)
    state.json                     per-model state machine, written atomically; a corrupt file is moved aside
    counters/<model>.count         inferences applications served (agent.active), summed in telemetry

Every write is a temp file in the same directory + fsync + ``os.replace`` + fsync of the directory, so a
power cut leaves either the old or the new file, never a torn one. A crash between the write and the rename
leaves the temp file (``.{name}.tmp-{pid}``); the next start sweeps those whose writer is gone.

One exception, for fetch speed: chunks in ``partial/`` are written temp file + ``os.replace`` without
fsync (two fsyncs per 256 KiB chunk were half the time of a fetch). A process crash cannot tear them
(the page cache holds what was written); a power cut may leave a chunk missing, empty or with stale
blocks. That costs only a re-fetch: a chunk found on disk that this process did not write itself is
re-verified (length and sha256) by :meth:`Store.missing_chunks` before it counts, and the assembled blob
is verified again as a whole and fsynced (file and directory) before it is renamed into ``blobs/``.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import re
import shutil
import time
from pathlib import Path
from typing import Any, Literal

from agent.errors import DiskFullError, IntegrityError, StoreError
from agent.wire import ActiveVariant, BlobRef, ReasonCode, check_id, check_sha256

log = logging.getLogger(__name__)

BlobKind = Literal["tflite", "npz"]
_MIB = 1024 * 1024
# Every atomic write goes through `.{name}.tmp-{pid}`; a process killed mid-write leaves one behind.
_TEMP_NAME = re.compile(r"^\..+\.tmp-(\d+)$")


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path: Path, data: bytes, mode: int = 0o644) -> None:
    """Write ``data`` to ``path`` so readers see the old or the new content, never a mix."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        raise
    fsync_dir(path.parent)


def _replace_unsynced(path: Path, data: bytes) -> None:
    """Temp file + ``os.replace`` without fsync: never torn by a crash, may be lost by a power cut.

    Only for re-verifiable data (fetched chunks, see the module docstring).
    """
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        raise


def atomic_symlink(target: str, link: Path) -> None:
    """Point ``link`` at ``target`` by creating a temp symlink and renaming it over ``link``."""
    tmp = link.with_name(f".{link.name}.tmp-{os.getpid()}")
    with contextlib.suppress(FileNotFoundError):
        tmp.unlink()
    os.symlink(target, tmp)
    os.replace(tmp, link)
    fsync_dir(link.parent)


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def verify_chunk(ref: BlobRef, index: int, data: bytes) -> None:
    """Raise IntegrityError (BAD_SIZE / BAD_HASH) unless ``data`` is exactly chunk ``index`` of ``ref``."""
    expected_len = ref.chunk_length(index)
    if len(data) != expected_len:
        raise IntegrityError(
            f"chunk {index} of {ref.sha256[:12]} has {len(data)} bytes, the manifest says {expected_len}",
            ReasonCode.BAD_SIZE,
        )
    digest = hashlib.sha256(data).hexdigest()
    if digest != ref.chunks[index]:
        raise IntegrityError(
            f"chunk {index} of {ref.sha256[:12]} hashes to {digest[:12]}, "
            f"the manifest says {ref.chunks[index][:12]}",
            ReasonCode.BAD_HASH,
        )


def _blob_problem(ref: BlobRef, size: int, digest: str) -> tuple[str, ReasonCode] | None:
    if size != ref.size:
        return f"blob {ref.sha256[:12]} has {size} bytes, the manifest says {ref.size}", ReasonCode.BAD_SIZE
    if digest != ref.sha256:
        return f"blob {ref.sha256[:12]} hashes to {digest[:12]}", ReasonCode.BAD_HASH
    return None


class Store:
    """Paths and atomic operations of the device store rooted at ``root``."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.blobs = root / "blobs"
        self.partial = root / "partial"
        self.models = root / "models"
        self.state_path = root / "state.json"
        # chunks this process wrote and verified (sha -> indices): trusted without re-hashing; any other
        # chunk on disk (from before a restart or power cut, written without fsync) is re-verified
        self._verified: dict[str, set[int]] = {}

    def ensure(self) -> None:
        from agent import generations  # builds on this module's atomic writes

        for d in (self.root, self.blobs, self.partial, self.models):
            d.mkdir(parents=True, exist_ok=True)
        for model_dir in self.models.iterdir():
            if model_dir.is_dir() and not model_dir.is_symlink():
                generations.recover(model_dir, self.blobs)  # older layout, a kill mid-activation
        counters = self.root / "counters"  # applications add their inference counts here (agent.active)
        if not counters.is_dir():
            counters.mkdir()
            with contextlib.suppress(OSError):
                os.chmod(counters, 0o770)  # noqa: S103 - the edgefleet group's applications write counts

    def sweep_stale_temp_files(self) -> list[Path]:
        """Delete the temp files of processes that died between writing and renaming (kill -9, power cut).

        Only a temp file whose writer is gone is removed: this process's own, and a live process's
        (a second agent wrongly sharing the store), are left alone. Returns what was removed.
        """
        dirs = [self.root, self.blobs, self.partial, self.models]
        for base in (self.partial, self.models):
            if base.is_dir():
                dirs += [d for d in base.iterdir() if d.is_dir() and not d.is_symlink()]
        removed = []
        for d in dirs:
            for path in d.iterdir() if d.is_dir() else []:
                match = _TEMP_NAME.match(path.name)
                if match and not _alive(int(match.group(1))):
                    with contextlib.suppress(FileNotFoundError):
                        path.unlink()
                    removed.append(path)
        if removed:
            log.info("store: removed %d temp file(s) left by a process that died mid-write", len(removed))
        return removed

    # ---------------------------------------------------------------- blobs and chunks

    def blob_path(self, sha: str, kind: BlobKind = "tflite") -> Path:
        return self.blobs / f"{check_sha256(sha)}.{kind}"

    def has_blob(self, sha: str, kind: BlobKind = "tflite") -> bool:
        return self.blob_path(sha, kind).is_file()

    def chunk_path(self, sha: str, index: int) -> Path:
        return self.partial / check_sha256(sha) / str(int(index))

    def has_chunk(self, ref: BlobRef, index: int) -> bool:
        path = self.chunk_path(ref.sha256, index)
        try:
            return path.stat().st_size == ref.chunk_length(index)
        except FileNotFoundError:
            return False

    def missing_chunks(self, ref: BlobRef) -> list[int]:
        """Indices still to fetch. A stored chunk of the wrong length or content is deleted (re-fetched).

        Chunks are written without fsync (see the module docstring), so one this process did not write
        is re-verified (sha256) once before it counts.
        """
        missing = []
        verified = self._verified.setdefault(ref.sha256, set())
        for i in range(len(ref.chunks)):
            if i in verified:
                if self.has_chunk(ref, i):
                    continue
                verified.discard(i)
            path = self.chunk_path(ref.sha256, i)
            try:
                data = path.read_bytes()
            except FileNotFoundError:
                missing.append(i)
                continue
            try:
                verify_chunk(ref, i, data)
            except IntegrityError as err:
                log.warning("discarding stored chunk %s: %s", path, err)
                with contextlib.suppress(FileNotFoundError):
                    path.unlink()
                missing.append(i)
                continue
            verified.add(i)
        return missing

    def write_chunk(self, ref: BlobRef, index: int, data: bytes) -> None:
        """Verify then store one chunk atomically; raises IntegrityError on a bad chunk."""
        verify_chunk(ref, index, data)
        path = self.chunk_path(ref.sha256, index)
        try:
            _replace_unsynced(path, data)
        except FileNotFoundError:
            path.parent.mkdir(parents=True, exist_ok=True)
            _replace_unsynced(path, data)
        self._verified.setdefault(ref.sha256, set()).add(index)

    def assemble(self, ref: BlobRef, kind: BlobKind = "tflite") -> Path:
        """Concatenate the stored chunks, verify size and sha256, move into blobs/ (0444), drop partial/."""
        final = self.blob_path(ref.sha256, kind)
        if final.is_file():
            self._drop_partial(ref.sha256)
            return final
        tmp = final.with_name(f".{final.name}.tmp-{os.getpid()}")
        h = hashlib.sha256()
        size = 0
        try:
            with tmp.open("wb") as out:
                for i in range(len(ref.chunks)):
                    data = self.chunk_path(ref.sha256, i).read_bytes()
                    h.update(data)
                    size += len(data)
                    out.write(data)
                out.flush()
                os.fsync(out.fileno())
            problem = _blob_problem(ref, size, h.hexdigest())
            if problem is None:
                os.chmod(tmp, 0o444)
                os.replace(tmp, final)
                fsync_dir(final.parent)
        finally:
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()
        if problem is not None:
            raise IntegrityError(problem[0], problem[1])
        self._drop_partial(ref.sha256)
        return final

    def gc(self, keep: set[str]) -> list[str]:
        """Delete blobs and partial downloads whose sha is not in ``keep``; return the deleted shas.

        The caller keeps every blob named by a held manifest and by active/previous links.
        """
        for model_dir in self.models.iterdir() if self.models.is_dir() else []:
            for link in ("active.tflite", "previous.tflite"):
                sha = self.link_sha(model_dir / link)
                if sha:
                    keep.add(sha)
        removed: list[str] = []
        for path in list(self.blobs.iterdir()):
            sha = path.name.split(".", 1)[0]
            if path.name.startswith(".") or sha in keep:
                continue
            path.unlink()
            removed.append(sha)
        for path in list(self.partial.iterdir()):
            if path.name not in keep:
                self._drop_partial(path.name)
                removed.append(path.name)
        if removed:
            fsync_dir(self.blobs)
            log.info("store gc: removed %d blob(s) no manifest or link references", len(removed))
        return removed

    def discard_partial(self, sha: str) -> None:
        self._drop_partial(check_sha256(sha))

    def _drop_partial(self, sha: str) -> None:
        self._verified.pop(sha, None)
        shutil.rmtree(self.partial / sha, ignore_errors=True)

    def check_free(self, needed_bytes: int, min_free_mb: float, budget_mb: float) -> None:
        """Raise DiskFullError if fetching ``needed_bytes`` would break the free-space floor or the budget."""
        free = shutil.disk_usage(self.root).free
        if free - needed_bytes < min_free_mb * _MIB:
            raise DiskFullError(
                f"fetching {needed_bytes / _MIB:.1f} MiB would leave "
                f"{(free - needed_bytes) / _MIB:.1f} MiB free on {self.root}, "
                f"under store.min_free_mb = {min_free_mb:g}"
            )
        used = self.usage_bytes()
        if used + needed_bytes > budget_mb * _MIB:
            raise DiskFullError(
                f"store holds {used / _MIB:.1f} MiB; {needed_bytes / _MIB:.1f} MiB more exceeds "
                f"store.disk_budget_mb = {budget_mb:g}"
            )

    def usage_bytes(self) -> int:
        total = 0
        for base in (self.blobs, self.partial):
            for dirpath, _dirs, files in os.walk(base):
                for name in files:
                    with contextlib.suppress(FileNotFoundError):
                        total += (Path(dirpath) / name).stat().st_size
        return total

    # ---------------------------------------------------------------- per-model files

    def model_dir(self, model: str) -> Path:
        d = self.models / check_id(model, "model")
        d.mkdir(parents=True, exist_ok=True)
        return d

    def active_link(self, model: str) -> Path:
        return self.model_dir(model) / "active.tflite"

    def previous_link(self, model: str) -> Path:
        return self.model_dir(model) / "previous.tflite"

    def link_sha(self, link: Path) -> str | None:
        """sha256 of the blob a store symlink finally resolves to (through ``current``), or None."""
        from agent import generations

        return generations.sha_of(link)

    def activate(self, model: str, sha: str, info: ActiveVariant | None = None) -> str | None:
        """Make blob ``sha`` (with its metadata ``info``) the active model in one atomic step; the old
        active becomes previous. Returns the old sha."""
        from agent import generations

        if not self.has_blob(sha):
            raise StoreError(f"blob {sha[:12]} is not in the store; fetch it first")
        return generations.activate(self.model_dir(model), self.blob_path(sha), info)

    def restore_previous(self, model: str) -> str | None:
        """Make previous (model and metadata) active again and drop previous. Returns the restored sha,
        or None if there is none."""
        from agent import generations

        return generations.restore_previous(self.model_dir(model))

    def deactivate(self, model: str) -> None:
        """Nothing active (a failed first activation has nothing to fall back to)."""
        from agent import generations

        generations.deactivate(self.model_dir(model))

    def write_active_info(self, model: str, info: ActiveVariant) -> None:
        """Make ``info`` the active metadata together with the model it names (a no-op when it already is)."""
        from agent import generations

        generations.set_info(self.model_dir(model), self.blob_path(info.sha256), info)

    def read_active_info(self, model: str) -> ActiveVariant | None:
        path = self.model_dir(model) / "active.json"
        try:
            return ActiveVariant.model_validate_json(path.read_bytes())
        except FileNotFoundError:
            return None
        except ValueError as err:
            log.warning("ignoring unreadable %s: %s", path, err)
            return None

    def write_report(self, model: str, payload: bytes) -> None:
        """The latest report this device published for ``model`` (its figures go in the status)."""
        atomic_write(self.model_dir(model) / "report.json", payload)

    def read_report(self, model: str) -> bytes | None:
        try:
            return (self.model_dir(model) / "report.json").read_bytes()
        except FileNotFoundError:
            return None

    def write_manifest(self, model: str, payload: bytes) -> None:
        atomic_write(self.model_dir(model) / "manifest.json", payload)

    def read_manifest(self, model: str) -> bytes | None:
        try:
            return (self.model_dir(model) / "manifest.json").read_bytes()
        except FileNotFoundError:
            return None

    # ---------------------------------------------------------------- state.json

    def read_state(self) -> dict[str, Any]:
        """The persisted state, or ``{}``; a corrupt file is moved to ``state.json.corrupt-<ts>``."""
        try:
            raw = self.state_path.read_bytes()
        except FileNotFoundError:
            return {}
        try:
            obj = json.loads(raw)
            if not isinstance(obj, dict):
                raise ValueError(f"top level is {type(obj).__name__}, not an object")  # noqa: TRY004, TRY301
        except ValueError as err:
            aside = self.state_path.with_name(f"state.json.corrupt-{int(time.time())}")
            os.replace(self.state_path, aside)
            log.warning(
                "state.json is corrupt (%s); moved it to %s and starting from an empty state", err, aside
            )
            return {}
        return obj

    def write_state(self, state: dict[str, Any]) -> None:
        atomic_write(self.state_path, json.dumps(state, indent=2, sort_keys=True).encode())


def _alive(pid: int) -> bool:
    """True if a process with this PID exists (ours included)."""
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by another user
        return True
    return True
