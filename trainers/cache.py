"""Decode once: every image is decoded and resized a single time per (data set, size, crop).

The result is one uint8 ``(N, H, W, 3)`` ``.npy`` file opened memory-mapped, so every fold, epoch, trial and
process on the machine shares the same pages instead of decoding JPEGs again every epoch. The file name
is a key over the image paths, their sizes and modification times, the target size and the crop, so a
changed image or a different size builds a new cache. Files are written to a temporary name and renamed,
under a lock, so a crash or two concurrent builders never leave a half-written cache behind.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import math
import os
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from trainers.errors import FoldtuneError

CACHE_FORMAT = 2
_LISTED = 10  # bad files named in one error


def foldtune_home() -> Path:
    """foldtune's node-local folder (FOLDTUNE_CACHE, else ~/.cache/foldtune): image caches, weights, resume
    states. Node-local on purpose: on a cluster the search storage is shared, and these are per machine."""
    return Path(os.environ.get("FOLDTUNE_CACHE", Path.home() / ".cache" / "foldtune"))


def default_cache_dir() -> Path:
    """Where decoded-image caches live; shared by every run on the machine."""
    return foldtune_home() / "images"


class CacheError(FoldtuneError, RuntimeError):
    """The cache could not be built or opened; the message names the file."""


@dataclass
class ImageCache:
    """A memory-mapped image array and the path of each row."""

    path: Path
    images: np.ndarray  # (N, H, W, 3) uint8, memory-mapped read-only
    paths: list[str]

    def __post_init__(self) -> None:
        self._row_of = {p: i for i, p in enumerate(self.paths)}

    def rows(self, image_paths: Sequence[str]) -> np.ndarray:
        """Row index of each image path; a path missing from the cache is an error naming it."""
        try:
            return np.fromiter(
                (self._row_of[str(p)] for p in image_paths), dtype=np.int64, count=len(image_paths)
            )
        except KeyError as missing:
            raise CacheError(f"{missing.args[0]} is not in the image cache {self.path}; rebuild it") from None


def cache_key(image_paths: Sequence[str], size: tuple[int, int], crop: Sequence[float] | None) -> str:
    """Content key: paths, file sizes and mtimes, target size and crop."""
    digest = hashlib.sha1(f"v{CACHE_FORMAT}|{tuple(size)}|{tuple(crop) if crop else None}".encode())
    for path in image_paths:
        stat = os.stat(path)
        digest.update(f"{path}|{stat.st_size}|{stat.st_mtime_ns}\n".encode())
    return digest.hexdigest()[:20]


def decode_image(path: str, size: tuple[int, int], crop: Sequence[float] | None = None) -> np.ndarray:
    """Decode one image to RGB uint8 of ``size`` = (height, width), cropping fractions first if given."""
    height, width = size
    with Image.open(path) as image:
        # JPEG DCT scaling: decode at the smallest scale still >= the target size (much faster)
        if crop is None:
            image.draft("RGB", (width, height))
        else:
            top, bottom, left, right = crop
            image.draft("RGB", (math.ceil(width / (right - left)), math.ceil(height / (bottom - top))))
        image = image.convert("RGB")
        if crop is not None:
            top, bottom, left, right = crop
            w, h = image.size
            image = image.crop((round(left * w), round(top * h), round(right * w), round(bottom * h)))
        image = image.resize((width, height), Image.Resampling.BILINEAR, reducing_gap=2.0)
        return np.asarray(image, dtype=np.uint8)


def build_cache(
    image_paths: Sequence[str],
    size: tuple[int, int],
    cache_dir: Path,
    crop: Sequence[float] | None = None,
    workers: int | None = None,
    log=None,
) -> Path:
    """Return the cache file for these images, decoding them only if no matching cache exists."""
    image_paths = [str(p) for p in image_paths]
    cache_dir = Path(cache_dir).absolute()
    cache_dir.mkdir(parents=True, exist_ok=True)
    height, width = (int(s) for s in size)
    key = cache_key(image_paths, (height, width), crop)
    target = cache_dir / f"images-{height}x{width}-{key}.npy"
    index = target.with_suffix(".json")
    if target.exists() and index.exists():
        return target
    with open(cache_dir / f".{key}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # a second builder waits, then finds the finished cache
        if target.exists() and index.exists():
            return target
        if log:
            log(f"building image cache: {len(image_paths)} images at {height}x{width} -> {target}")
        tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
        array = np.lib.format.open_memmap(
            tmp, mode="w+", dtype=np.uint8, shape=(len(image_paths), height, width, 3)
        )

        def fill(item: tuple[int, str]) -> str:
            row, path = item
            try:
                array[row] = decode_image(path, (height, width), crop)
            except (OSError, ValueError, SyntaxError) as error:  # SyntaxError: PIL's "not a JPEG" family
                return f"{path} ({error})"
            return ""

        try:
            with ThreadPoolExecutor(max_workers=workers or min(8, os.cpu_count() or 1)) as pool:
                failed = [why for why in pool.map(fill, enumerate(image_paths)) if why]
            if failed:  # every bad file named at once, not one per attempt
                shown = "\n  ".join(failed[:_LISTED])
                more = f"\n  ... and {len(failed) - _LISTED} more" if len(failed) > _LISTED else ""
                raise CacheError(
                    f"{len(failed)} image(s) cannot be decoded; fix or remove them (`foldtune check-data "
                    f"--decode` lists them all):\n  {shown}{more}"
                )
            array.flush()
            index_tmp = index.with_name(f".{index.name}.{os.getpid()}.tmp")
            index_tmp.write_text(
                json.dumps(
                    {"format": CACHE_FORMAT, "size": [height, width], "crop": crop, "paths": image_paths}
                )
            )
            os.replace(index_tmp, index)
            os.replace(tmp, target)  # the .npy appears last: its presence means the cache is complete
        finally:
            tmp.unlink(missing_ok=True)
    return target


def open_cache(path: Path) -> ImageCache:
    """Open a finished cache memory-mapped (read-only, shared by every process)."""
    path = Path(path)
    index = path.with_suffix(".json")
    if not path.exists() or not index.exists():
        raise CacheError(
            f"image cache {path} (or its index {index.name}) is missing; it is rebuilt on the next run"
        )
    try:
        images = np.load(path, mmap_mode="r")
        paths = json.loads(index.read_text())["paths"]
    except (OSError, ValueError, KeyError) as error:
        raise CacheError(f"image cache {path} is unreadable ({error}); delete it to rebuild") from None
    if len(paths) != len(images):
        raise CacheError(
            f"image cache {path} has {len(images)} images but its index lists {len(paths)}; delete it"
        )
    return ImageCache(path=path, images=images, paths=paths)


def prepare_cache(cfg, table, cache_dir: Path, log=None, workers: int | None = None) -> Path:
    """Build (or reuse) the cache holding every training image of ``table`` at the config's size and crop;
    ``workers`` decoding threads (a trial passes its CPU reservation, so it never takes more cores)."""
    return build_cache(
        sorted(table["image_path"]), tuple(cfg.image_size), cache_dir, cfg.crop, log=log, workers=workers
    )
