"""Regenerate the embedded demo dataset (run once; the PNGs and captions are committed).

    python -m lorasup.trainers.builtin.make_demo_dataset [OUT_DIR]

Six 64×64 pictures of simple shapes on colour gradients, in kohya layout
(``10_shapes/``), each with a same-stem ``.txt`` caption. They are drawn with Pillow
from fixed coordinates, so the images are the same on every run; 64×64 rather than
32×32 so the trainer's downscale path is exercised by the default run.
"""

from __future__ import annotations

import sys
from pathlib import Path

from PIL import Image, ImageDraw

SIZE = 64
FOLDER = "10_shapes"
DEFAULT_OUT = Path(__file__).resolve().parent / "demo_dataset"

#: (stem, shape, shape colour, gradient top, gradient bottom, caption)
PICTURES: tuple[tuple[str, str, tuple[int, int, int], tuple[int, int, int],
                      tuple[int, int, int], str], ...] = (
    ("red_circle", "circle", (220, 40, 40), (20, 40, 120), (90, 140, 230),
     "a red circle on a blue sky gradient"),
    ("yellow_square", "square", (240, 210, 40), (30, 90, 40), (120, 200, 110),
     "a yellow square on a green gradient"),
    ("white_triangle", "triangle", (245, 245, 245), (120, 20, 80), (240, 120, 60),
     "a white triangle on a sunset gradient"),
    ("blue_ring", "ring", (40, 80, 230), (240, 230, 200), (200, 170, 120),
     "a blue ring on a sand gradient"),
    ("green_diamond", "diamond", (40, 200, 90), (15, 15, 30), (70, 60, 110),
     "a green diamond on a night gradient"),
    ("orange_bars", "bars", (250, 140, 20), (200, 200, 210), (90, 90, 100),
     "orange bars on a grey gradient"),
)


def _gradient(top: tuple[int, int, int], bottom: tuple[int, int, int]) -> Image.Image:
    image = Image.new("RGB", (SIZE, SIZE))
    draw = ImageDraw.Draw(image)
    for y in range(SIZE):
        f = y / (SIZE - 1)
        colour = tuple(round(a + (b - a) * f) for a, b in zip(top, bottom, strict=True))
        draw.line([(0, y), (SIZE - 1, y)], fill=colour)
    return image


def draw_picture(shape: str, colour: tuple[int, int, int], top: tuple[int, int, int],
                 bottom: tuple[int, int, int]) -> Image.Image:
    """One picture: a centred shape of about half the image on a vertical gradient."""
    image = _gradient(top, bottom)
    draw = ImageDraw.Draw(image)
    lo, hi, mid = 16, 48, 32
    if shape == "circle":
        draw.ellipse([lo, lo, hi, hi], fill=colour)
    elif shape == "square":
        draw.rectangle([lo, lo, hi, hi], fill=colour)
    elif shape == "triangle":
        draw.polygon([(mid, lo - 4), (hi + 4, hi), (lo - 4, hi)], fill=colour)
    elif shape == "ring":
        draw.ellipse([lo - 4, lo - 4, hi + 4, hi + 4], outline=colour, width=7)
    elif shape == "diamond":
        draw.polygon([(mid, lo - 6), (hi + 6, mid), (mid, hi + 6), (lo - 6, mid)], fill=colour)
    elif shape == "bars":
        for x in range(8, 56, 12):
            draw.rectangle([x, 10, x + 5, 54], fill=colour)
    else:
        raise ValueError(f"unknown shape {shape!r}")
    return image


def write_demo_dataset(out_dir: Path) -> list[Path]:
    """Write every picture and caption under ``out_dir/FOLDER``; returns the image paths."""
    folder = out_dir / FOLDER
    folder.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    for stem, shape, colour, top, bottom, caption in PICTURES:
        path = folder / f"{stem}.png"
        draw_picture(shape, colour, top, bottom).save(path, optimize=True)
        (folder / f"{stem}.txt").write_text(caption + "\n", encoding="utf-8")
        written.append(path)
    return written


def main(argv: list[str]) -> int:
    out_dir = Path(argv[0]) if argv else DEFAULT_OUT
    for path in write_demo_dataset(out_dir):
        print(path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
