"""The builtin trainer's inputs on disk, checked without numpy or the training code.

The kohya dataset layout (``<root>/<repeats>_<name>/`` folders of images and captions),
image decoding, the output folder and the resume state's file. The trainer uses these
before its first step, and lorasup's pre-flight uses the same functions before it starts
the trainer at all, so both refuse the same inputs with the same message.
"""

from __future__ import annotations

import io
import json
import os
import re
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from PIL import Image

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp")
#: kohya's folder convention: the leading number is how often each image counts per epoch
FOLDER_PATTERN = re.compile(r"^(\d+)_(.+)$")
#: where the embedded demo dataset lives (used when the default --dataset is missing)
DEMO_DATASET = Path(__file__).resolve().parent / "demo_dataset"


class DatasetError(Exception):
    """The dataset cannot be used; the message names the file or folder at fault."""


class StateError(Exception):
    """No usable resume state; the message says which file and why."""


@dataclass(frozen=True, slots=True)
class Concept:
    """One ``<repeats>_<name>`` folder."""

    folder: Path
    name: str
    repeats: int
    images: tuple[Path, ...]


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


#: PIL names an in-memory file by its repr; the path is said once, in front
_BUFFER_REPR = re.compile(r"\s*<_io\.BytesIO object at 0x[0-9a-fA-F]+>")


def decode_image(path: Path, data: bytes | None = None) -> Image.Image:
    """The whole image decoded to RGB, or DatasetError naming ``path``.

    ``data`` is the file's bytes when the caller already read them (for the fingerprint).
    """
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(io.BytesIO(data) if data is not None else path) as image:
            image.load()
            return image.convert("RGB")
    except UnidentifiedImageError:
        raise DatasetError(f"cannot read image {path}: not a PNG, JPEG or WebP image, or the "
                           "file is corrupt") from None
    except Exception as exc:  # any decoder failure means the same thing: unreadable
        detail = _BUFFER_REPR.sub("", str(exc)).strip() or type(exc).__name__
        raise DatasetError(f"cannot read image {path}: {detail}") from exc


def read_caption(image: Path) -> str:
    """The same-stem ``.txt`` caption, or "" when there is none."""
    caption = image.with_suffix(".txt")
    if not caption.is_file():
        return ""
    try:
        return caption.read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError) as exc:
        raise DatasetError(f"cannot read caption {caption}: {exc}") from exc


def read_image_bytes(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise DatasetError(f"cannot read image {path}: {exc.strerror or exc}") from exc


def verify_dataset(root: Path) -> list[str]:
    """Every image decodes and every caption reads, or DatasetError; the scan's warnings."""
    concepts, warnings = scan(root)
    for concept in concepts:
        for path in concept.images:
            decode_image(path, read_image_bytes(path)).close()
            read_caption(path)
    return warnings


def dataset_root(option: str | None, cwd: Path, default: str) -> tuple[Path, bool]:
    """The dataset folder and whether it is the demo set: an explicit --dataset as given,
    else ``default`` when it exists in ``cwd``, else the built-in demo dataset."""
    if option is not None:
        return cwd / option, False
    if (cwd / default).exists():
        return cwd / default, False
    return DEMO_DATASET, True


def output_dir_problem(output_dir: Path) -> str | None:
    """Why the LoRA cannot be written into ``output_dir`` (made when missing), or None."""
    if output_dir.exists():
        if not output_dir.is_dir():
            return f"output folder {output_dir} exists and is not a folder"
        if not os.access(output_dir, os.W_OK | os.X_OK):
            return f"cannot write into the output folder {output_dir}: permission denied"
        return None
    # Missing: it will be made, so the nearest existing parent must be a writable folder.
    parent = output_dir.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        return f"cannot make the output folder {output_dir}: {parent} is not a folder"
    if not os.access(parent, os.W_OK | os.X_OK):
        return f"cannot make the output folder {output_dir}: {parent} is not writable"
    return None


def lora_path(output_dir: Path, name: str) -> Path:
    return output_dir / f"{name}.safetensors"


def state_path(output_dir: Path, name: str) -> Path:
    return output_dir / f"{name}-state.npz"


def check_state_file(path: Path) -> None:
    """The resume state exists and is an intact archive with its metadata, or StateError.

    The full read (and the shape checks) need numpy and happen in the trainer.
    """
    if not path.is_file():
        raise StateError(f"no saved state to continue from: {path} does not exist")
    try:
        with zipfile.ZipFile(path) as archive:
            bad = archive.testzip()
            names = set(archive.namelist())
    except (OSError, zipfile.BadZipFile, EOFError) as exc:
        raise StateError(f"cannot read saved state {path}: {exc}") from exc
    if bad is not None:
        raise StateError(f"cannot read saved state {path}: {bad} is damaged")
    if "meta.npy" not in names:
        raise StateError(f"{path} is not a lorasup builtin state (no metadata)")


#: the metadata member of a state file is small JSON: more is not a state of ours
MAX_META_BYTES = 1 << 20


def saved_state_step(path: Path) -> int:
    """The step a state file holds, read from its ``meta.npy`` member without numpy (so that
    lorasup can plan a resume while staying small), or StateError naming the file.

    ``meta.npy`` is a 1-D uint8 array (``save_state``): the npy magic, a version, a header
    length (2 bytes in version 1, 4 after), the header, then the JSON bytes themselves.
    """
    check_state_file(path)
    try:
        with zipfile.ZipFile(path) as archive, archive.open("meta.npy") as member:
            raw = member.read(MAX_META_BYTES + 1)
        if len(raw) > MAX_META_BYTES or not raw.startswith(b"\x93NUMPY") or len(raw) < 10:
            raise ValueError("meta.npy is not an npy array of metadata")
        size = 2 if raw[6] == 1 else 4
        start = 8 + size + int.from_bytes(raw[8:8 + size], "little")
        header = raw[8 + size:start].decode("latin-1")
        if "'|u1'" not in header and "'u1'" not in header:
            raise ValueError("meta.npy is not a byte array")
        step = json.loads(raw[start:].decode("utf-8"))["step"]
    except (OSError, zipfile.BadZipFile, ValueError, KeyError, TypeError, IndexError) as exc:
        raise StateError(f"cannot read saved state {path}: {exc}") from exc
    if isinstance(step, bool) or not isinstance(step, int) or step < 0:
        raise StateError(f"cannot read saved state {path}: step {step!r} is not a step")
    return step
