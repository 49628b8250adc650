"""Calibration images: a folder of PNG/JPEG files, or realistic sample crops from installed packages.

:func:`load_image_folder` turns every ``.png``/``.jpg``/``.jpeg`` file of a folder (any case, sorted by
name, not recursive) into a float32 batch for a model input: EXIF orientation applied, converted to grey
(1 channel) or RGB (3 channels; an alpha channel is dropped, as ``tf.io.decode_png(channels=3)`` does),
resized keeping the aspect ratio and centre-cropped to H×W (Pillow, bilinear with antialiasing), then
scaled linearly from 0..255 to the model's value range. 16-bit grey PNGs are scaled from 0..65535.
Layout NHWC, or NCHW on request.

:func:`sample_images` makes calibration images without any user files: random crops (random scale and
position, horizontal flips, ±15 % brightness) of scikit-learn's bundled ``china.jpg`` and ``flower.jpg``,
plus scikit-image's ``skimage.data`` pictures when scikit-image is installed. It is deterministic for a
given seed and set of installed packages. :func:`write_sample_image_folder` writes such crops to a folder
(tests, the ``--calibration DIR`` demo). :func:`parse_input_range` parses ``--input-range`` (``"0,1"``).

Only numpy is imported at module level; Pillow and scikit-learn are imported when used.
"""

from __future__ import annotations

import functools
import importlib
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from compressor.errors import DataError

IMAGE_EXTENSIONS: tuple[str, ...] = (".png", ".jpg", ".jpeg")
LAYOUTS: tuple[str, ...] = ("NHWC", "NCHW")
RANGE_EXAMPLES = "0,1 or -1,1 or 0,255"


# --------------------------------------------------------------------------------------------------------
# argument checks shared by the loaders


def parse_input_range(text: str) -> tuple[float, float]:
    """``"0,1"`` → ``(0.0, 1.0)``; any ``"a,b"`` of finite numbers with ``a < b`` (spaces allowed)."""
    parts = text.strip().split(",")
    low = high = math.nan
    if len(parts) == 2:
        try:
            low, high = float(parts[0]), float(parts[1])
        except ValueError:
            low = high = math.nan
    if not (math.isfinite(low) and math.isfinite(high) and low < high):
        raise DataError(
            f"input range {text!r} is not valid: give LOW,HIGH with LOW < HIGH, e.g. {RANGE_EXAMPLES}"
        )
    return low, high


def _check_range(value_range: Sequence[float]) -> tuple[float, float]:
    try:
        low, high = (float(v) for v in value_range)
    except (TypeError, ValueError) as err:
        raise DataError(f"value range {value_range!r} must be two numbers, e.g. (0, 1)") from err
    if not (math.isfinite(low) and math.isfinite(high) and low < high):
        raise DataError(f"value range {value_range!r} must be finite with low < high, e.g. {RANGE_EXAMPLES}")
    return low, high


def _check_geometry(height: int, width: int, layout: str) -> None:
    if height < 1 or width < 1:
        raise DataError(f"image size {height}x{width} must be at least 1x1")
    if layout not in LAYOUTS:
        raise DataError(f"layout {layout!r} is not one of {', '.join(LAYOUTS)}")


def _finish(images: list[np.ndarray], height: int, width: int, channels: int, layout: str) -> np.ndarray:
    """(N, H, W, C) float32 from a list of (H, W) or (H, W, C) arrays, transposed for NCHW."""
    batch = (
        np.stack([im.reshape(height, width, channels) for im in images]).astype(np.float32)
        if images
        else np.zeros((0, height, width, channels), dtype=np.float32)
    )
    if layout == "NCHW":
        batch = np.ascontiguousarray(batch.transpose(0, 3, 1, 2))
    return batch


def _scale(arr: np.ndarray, value_range: tuple[float, float]) -> np.ndarray:
    low, high = value_range
    return (arr.astype(np.float64) / 255.0 * (high - low) + low).astype(np.float32)


# --------------------------------------------------------------------------------------------------------
# a folder of image files


def image_files(path: Path) -> list[Path]:
    """PNG/JPEG files directly in ``path`` (case-insensitive extensions), sorted by name."""
    return sorted(
        (p for p in path.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS),
        key=lambda p: p.name,
    )


def load_image_folder(
    path: Path,
    height: int,
    width: int,
    channels: int,
    value_range: tuple[float, float],
    *,
    layout: str = "NHWC",
    limit: int | None = None,
) -> np.ndarray:
    """Every PNG/JPEG in ``path`` as a float32 (N, H, W, C) batch (or (N, C, H, W) for ``NCHW``).

    Each image is converted to ``channels`` (1 → grey, 3 → RGB), resized keeping its aspect ratio and
    centre-cropped to ``height`` × ``width``, and scaled from 0..255 to ``value_range``. ``limit`` keeps
    the first files by name. A missing or empty folder, an unreadable image, or a channel count other
    than 1 or 3 raises DataError.
    """
    path = Path(path)
    value_range = _check_range(value_range)
    _check_geometry(height, width, layout)
    if limit is not None and limit < 1:
        raise DataError(f"image limit must be at least 1, got {limit}")
    if not path.is_dir():
        raise DataError(f"calibration folder {str(path)!r} does not exist or is not a directory")
    files = image_files(path)
    if not files:
        raise DataError(
            f"no images in {str(path)!r}: looked for {', '.join('*' + e for e in IMAGE_EXTENSIONS)} "
            "(any case, not in subfolders)"
        )
    if limit is not None:
        files = files[:limit]
    images = [_load_one(f, height, width, channels) for f in files]
    return _finish([_scale(im, value_range) for im in images], height, width, channels, layout)


def _load_one(file: Path, height: int, width: int, channels: int) -> np.ndarray:
    from PIL import Image, ImageOps

    if channels not in (1, 3):
        raise DataError(
            f"cannot make a {channels}-channel input from image {str(file)!r}: image folders fill only "
            "1-channel (grey) or 3-channel (RGB) inputs; give calibration samples of this shape as a "
            ".npz instead"
        )
    try:
        with Image.open(file) as opened:
            opened.load()
            im = ImageOps.exif_transpose(opened)
            im = _to_channels(im, channels)
            im = ImageOps.fit(im, (width, height), method=Image.Resampling.BILINEAR)
            return np.asarray(im, dtype=np.uint8)
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as err:
        raise DataError(
            f"cannot read image {str(file)!r} ({type(err).__name__}: {err}); replace or remove the file"
        ) from err


def _to_channels(im: Any, channels: int) -> Any:
    """Pillow image in mode ``L`` (channels 1) or ``RGB`` (channels 3); 16-bit/float grey is rescaled."""
    from PIL import Image

    if im.mode in ("I", "I;16", "I;16B", "I;16L", "I;16N", "F"):
        arr = np.asarray(im, dtype=np.float64)
        if im.mode == "F":
            arr = arr * 255.0 if arr.size and arr.max() <= 1.0 else arr
        elif arr.size and (im.mode != "I" or arr.max() > 255):
            arr = arr / 257.0  # 16-bit 0..65535 → 0..255
        im = Image.fromarray(np.clip(np.round(arr), 0, 255).astype(np.uint8))
    if im.mode == "P":
        im = im.convert("RGBA" if "transparency" in im.info else "RGB")
    return im.convert("L" if channels == 1 else "RGB")


# --------------------------------------------------------------------------------------------------------
# sample images from installed packages


@functools.cache
def _sources() -> tuple[np.ndarray, ...]:
    """uint8 (H, W, 3) pictures: scikit-learn's two sample images, then scikit-image's if installed."""
    try:
        from sklearn.datasets import load_sample_images
    except ImportError as err:
        raise DataError("sample calibration images need scikit-learn (pip install scikit-learn)") from err
    pictures = [np.asarray(im, dtype=np.uint8) for im in load_sample_images().images]
    pictures.extend(_skimage_sources())
    return tuple(pictures)


def _skimage_sources() -> list[np.ndarray]:
    try:
        skdata = importlib.import_module("skimage.data")  # optional
    except ImportError:
        return []
    out: list[np.ndarray] = []
    for name in ("astronaut", "coffee", "chelsea", "rocket", "camera", "coins", "moon", "page"):
        try:
            arr = np.asarray(getattr(skdata, name)())
        except (AttributeError, ImportError, OSError, ValueError, RuntimeError):
            continue  # some need a download (pooch) in some versions: skip them
        if arr.dtype != np.uint8 or min(arr.shape[:2]) < 64:
            continue
        if arr.ndim == 2:
            arr = np.repeat(arr[..., None], 3, axis=-1)
        if arr.ndim == 3 and arr.shape[-1] >= 3:
            out.append(np.ascontiguousarray(arr[..., :3]))
    return out


def _sample_uint8(count: int, height: int, width: int, channels: int, seed: int) -> list[np.ndarray]:
    from PIL import Image, ImageOps

    if count < 0:
        raise DataError(f"sample image count must be >= 0, got {count}")
    if channels not in (1, 3):
        raise DataError(f"sample images come in 1 (grey) or 3 (RGB) channels, not {channels}")
    sources = _sources()
    rng = np.random.default_rng(seed)
    aspect = width / height
    out: list[np.ndarray] = []
    for _ in range(count):
        src = sources[int(rng.integers(len(sources)))]
        src_h, src_w = src.shape[:2]
        max_h = min(float(src_h), src_w / aspect)  # the largest crop of the target aspect ratio
        crop_h = max(1.0, max_h * float(rng.uniform(0.25, 1.0)))
        crop_w = min(float(src_w), crop_h * aspect)
        top = float(rng.uniform(0.0, src_h - crop_h))
        left = float(rng.uniform(0.0, src_w - crop_w))
        flip = bool(rng.random() < 0.5)
        brightness = float(rng.uniform(0.85, 1.15))
        im = Image.fromarray(src).resize(
            (width, height), Image.Resampling.BILINEAR, box=(left, top, left + crop_w, top + crop_h)
        )
        if flip:
            im = ImageOps.mirror(im)
        arr = np.asarray(im.convert("L" if channels == 1 else "RGB"), dtype=np.float64) * brightness
        out.append(np.clip(np.round(arr), 0, 255).astype(np.uint8))
    return out


def sample_images(
    count: int,
    height: int,
    width: int,
    channels: int,
    value_range: tuple[float, float],
    *,
    seed: int = 0,
    layout: str = "NHWC",
) -> np.ndarray:
    """``count`` realistic calibration images, float32 (N, H, W, C) scaled to ``value_range``.

    Random crops (scale 25–100 % of the largest crop of the target aspect ratio, random position,
    horizontal flip half of the time, brightness ×0.85–1.15) of scikit-learn's sample photos (and
    scikit-image's when it is installed), resized to ``height`` × ``width``; deterministic for ``seed``.
    """
    value_range = _check_range(value_range)
    _check_geometry(height, width, layout)
    images = _sample_uint8(count, height, width, channels, seed)
    return _finish([_scale(im, value_range) for im in images], height, width, channels, layout)


def write_sample_image_folder(
    directory: Path,
    count: int,
    size: int | tuple[int, int] = 64,
    seed: int = 0,
    *,
    formats: Sequence[str] = ("png", "jpg"),
) -> list[Path]:
    """Write ``count`` RGB sample crops as ``sample_0000.png``, ``sample_0001.jpg``, … (``formats`` in
    turn) into ``directory`` (created if needed); ``size`` is a side or ``(height, width)``. Returns the
    paths in order."""
    from PIL import Image

    height, width = (size, size) if isinstance(size, int) else size
    _check_geometry(height, width, "NHWC")
    exts = [f.lower().lstrip(".") for f in formats]
    if not exts or any(f".{e}" not in IMAGE_EXTENSIONS for e in exts):
        raise DataError(f"formats {list(formats)!r} must be among png, jpg, jpeg")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    paths: list[Path] = []
    for i, arr in enumerate(_sample_uint8(count, height, width, 3, seed)):
        ext = exts[i % len(exts)]
        path = directory / f"sample_{i:04d}.{ext}"
        im = Image.fromarray(arr)
        if ext == "png":
            im.save(path, format="PNG")
        else:
            im.save(path, format="JPEG", quality=92)
        paths.append(path)
    return paths
