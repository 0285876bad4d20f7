"""The dataset in memory: every image of the kohya layout as a row of pixels.

The layout, decoding and captions are checked by ``inputs`` (which lorasup's pre-flight
uses too); here everything is decoded before the first step, so a bad dataset fails in
well under a second with a message naming the offending file, and nothing is trained or
written. Images are centre-cropped to a square and downscaled to 32×32 RGB once, then
kept in memory as rows of pixels in [-1, 1].
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .inputs import Concept, decode_image, read_caption, read_image_bytes, scan
from .model import IMAGE_SIZE


@dataclass(frozen=True, slots=True)
class Dataset:
    """The decoded images and how often each one appears in an epoch."""

    root: Path
    concepts: tuple[Concept, ...]
    pixels: np.ndarray  # (n_images, PIXELS) float32 in [-1, 1]
    repeats: np.ndarray  # (n_images,) int64
    captions: tuple[str, ...]
    fingerprint: str
    warnings: tuple[str, ...] = ()

    @property
    def image_count(self) -> int:
        return int(self.pixels.shape[0])

    @property
    def entries(self) -> int:
        """Images × repeats: kohya's "num train images", the length of one epoch."""
        return int(self.repeats.sum())

    def steps_per_epoch(self, batch_size: int) -> int:
        return math.ceil(self.entries / batch_size)


def load_image(path: Path, data: bytes | None = None, size: int = IMAGE_SIZE) -> np.ndarray:
    """Decode, centre-crop to square, downscale to size×size RGB; flattened, in [-1, 1].

    ``data`` is the file's bytes when the caller already read them (for the fingerprint).
    """
    from PIL import Image, ImageOps

    with decode_image(path, data) as rgb_full:
        rgb = ImageOps.fit(rgb_full, (size, size), Image.Resampling.LANCZOS)
    pixels = np.asarray(rgb, dtype=np.float32).reshape(-1)
    return pixels / np.float32(127.5) - np.float32(1.0)


def load_dataset(root: Path) -> Dataset:
    """Scan, decode and fingerprint the whole dataset, or raise DatasetError."""
    concepts, warnings = scan(root)
    digest = hashlib.sha256()
    rows: list[np.ndarray] = []
    repeats: list[int] = []
    captions: list[str] = []
    for concept in concepts:
        for path in concept.images:
            data = read_image_bytes(path)
            rows.append(load_image(path, data))
            caption = read_caption(path)
            repeats.append(concept.repeats)
            captions.append(caption)
            for part in (f"{concept.folder.name}/{path.name}", str(concept.repeats), caption):
                digest.update(part.encode("utf-8") + b"\0")
            digest.update(hashlib.sha256(data).digest())
    pixels = np.stack(rows).astype(np.float32, copy=False)
    return Dataset(root=root, concepts=tuple(concepts), pixels=pixels,
                   repeats=np.asarray(repeats, dtype=np.int64), captions=tuple(captions),
                   fingerprint=digest.hexdigest()[:16], warnings=tuple(warnings))


def epoch_order(dataset: Dataset, seed: int, epoch: int) -> np.ndarray:
    """Image index of every entry of 1-based ``epoch``, shuffled.

    A pure function of (seed, epoch), so a resumed run replays exactly the order the
    uninterrupted run would have used, with no generator state to carry over.
    """
    entries = np.repeat(np.arange(dataset.image_count), dataset.repeats)
    rng = np.random.default_rng([seed, 1, epoch])
    return entries[rng.permutation(entries.size)]
