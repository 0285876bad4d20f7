"""The kohya dataset layout: ``<root>/<repeats>_<name>/`` folders of images and captions.

Everything is validated and decoded before the first step, so a bad dataset fails in
well under a second with a message naming the offending file, and nothing is trained or
written. Images are centre-cropped to a square and downscaled to 32×32 RGB once, then
kept in memory as rows of pixels in [-1, 1].
"""

from __future__ import annotations

import hashlib
import io
import math
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .model import IMAGE_SIZE

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp")
#: kohya's folder convention: the leading number is how often each image counts per epoch
FOLDER_PATTERN = re.compile(r"^(\d+)_(.+)$")
#: where the embedded demo dataset lives (used when the default --dataset is missing)
DEMO_DATASET = Path(__file__).resolve().parent / "demo_dataset"


class DatasetError(Exception):
    """The dataset cannot be used; the message names the file or folder at fault."""


@dataclass(frozen=True, slots=True)
class Concept:
    """One ``<repeats>_<name>`` folder."""

    folder: Path
    name: str
    repeats: int
    images: tuple[Path, ...]


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


def is_image(path: Path) -> bool:
    return path.suffix.lower() in IMAGE_EXTENSIONS


def scan(root: Path) -> tuple[list[Concept], list[str]]:
    """Find the concept folders and their images, in a filesystem-independent order.

    Hidden entries (``.git``, ``.ipynb_checkpoints``) and stray non-image files at the
    top level are ignored; a folder not named ``<repeats>_<name>`` or an image outside
    any folder is an error, since kohya would silently skip it and train on less.
    """
    if not root.exists():
        raise DatasetError(f"dataset folder not found: {root}")
    if not root.is_dir():
        raise DatasetError(f"dataset is not a folder: {root}")
    concepts: list[Concept] = []
    warnings: list[str] = []
    for entry in sorted(root.iterdir(), key=lambda p: p.name):
        if entry.name.startswith("."):
            continue
        if not entry.is_dir():
            if is_image(entry):
                raise DatasetError(
                    f"image {entry} is not inside a <repeats>_<name> folder (e.g. {root}/10_name/)"
                )
            continue
        match = FOLDER_PATTERN.match(entry.name)
        if match is None:
            raise DatasetError(
                f"dataset folder {entry} is not named <repeats>_<name> (e.g. 10_{entry.name})"
            )
        repeats = int(match.group(1))
        if repeats < 1:
            raise DatasetError(f"dataset folder {entry} has {repeats} repeats; at least 1 needed")
        images = tuple(sorted((p for p in entry.iterdir() if p.is_file() and is_image(p)
                               and not p.name.startswith(".")), key=lambda p: p.name))
        if not images:
            warnings.append(f"dataset folder {entry} has no images; skipped")
            continue
        concepts.append(Concept(entry, match.group(2), repeats, images))
    if not concepts:
        raise DatasetError(
            f"no images ({', '.join(e[1:] for e in IMAGE_EXTENSIONS)}) in any <repeats>_<name> "
            f"folder of dataset {root}"
        )
    return concepts, warnings


def load_image(path: Path, data: bytes | None = None, size: int = IMAGE_SIZE) -> np.ndarray:
    """Decode, centre-crop to square, downscale to size×size RGB; flattened, in [-1, 1].

    ``data`` is the file's bytes when the caller already read them (for the fingerprint).
    """
    from PIL import Image, ImageOps

    try:
        with Image.open(io.BytesIO(data) if data is not None else path) as image:
            image.load()
            rgb = ImageOps.fit(image.convert("RGB"), (size, size), Image.Resampling.LANCZOS)
    except Exception as exc:  # any decoder failure means the same thing: unreadable
        raise DatasetError(f"cannot read image {path}: {exc}") from exc
    pixels = np.asarray(rgb, dtype=np.float32).reshape(-1)
    return pixels / np.float32(127.5) - np.float32(1.0)


def read_caption(image: Path) -> str:
    """The same-stem ``.txt`` caption, or "" when there is none."""
    caption = image.with_suffix(".txt")
    if not caption.is_file():
        return ""
    try:
        return caption.read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError) as exc:
        raise DatasetError(f"cannot read caption {caption}: {exc}") from exc


def load_dataset(root: Path) -> Dataset:
    """Scan, decode and fingerprint the whole dataset, or raise DatasetError."""
    concepts, warnings = scan(root)
    digest = hashlib.sha256()
    rows: list[np.ndarray] = []
    repeats: list[int] = []
    captions: list[str] = []
    for concept in concepts:
        for path in concept.images:
            try:
                data = path.read_bytes()
            except OSError as exc:
                raise DatasetError(f"cannot read image {path}: {exc}") from exc
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
