"""A synthetic task whose right answer is known, for token backbones trained from scratch in seconds.

Each image is grey noise with smaller green and yellow squares, distractors that decide nothing, anywhere. Class
`red` adds a red square, class `blue` a blue one, class `plain` nothing. With `plain` as the class of no evidence,
neither colour can be learned as "not the other one": a model that learned the task must look at the red or blue
square, so its class activation map must put its mass there:
`quadrant_mass` measures that, for squares placed in one quadrant and for squares at the centre (where a map that
follows the evidence spreads evenly over the four quadrants, and a map stuck in one corner does not).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

SIZE, SQUARE = 64, 16
COLOURS = {"red": (220, 30, 30), "blue": (30, 30, 220)}
CLASSES = (*COLOURS, "plain")
DISTRACTORS = ((30, 200, 30), (220, 220, 30))
QUADRANTS = {"top_left": (0, 0), "top_right": (0, 1), "bottom_left": (1, 0), "bottom_right": (1, 1)}


def draw(label: str, corner: tuple[int, int], rng: np.random.Generator) -> Image.Image:
    """A SIZE x SIZE image with the class's square at `corner` (row, col of its top-left pixel) and two distractors
    away from it."""
    pixels = rng.normal(128, 20, (SIZE, SIZE, 3)).clip(0, 255)
    for colour in DISTRACTORS:
        while True:
            y, x = (int(v) for v in rng.integers(0, SIZE - SQUARE // 2, 2))
            if abs(y - corner[0]) >= SQUARE or abs(x - corner[1]) >= SQUARE:
                break
        pixels[y : y + SQUARE // 2, x : x + SQUARE // 2] = colour
    if label in COLOURS:
        pixels[corner[0] : corner[0] + SQUARE, corner[1] : corner[1] + SQUARE] = COLOURS[label]
    return Image.fromarray(pixels.astype(np.uint8))


def write_training_folder(root: Path, per_class: int = 48, seed: int = 0) -> Path:
    """root/<class>/<n>.png with the square anywhere."""
    rng = np.random.default_rng(seed)
    for label in CLASSES:
        (root / label).mkdir(parents=True, exist_ok=True)
        for n in range(per_class):
            corner = tuple(int(v) for v in rng.integers(0, SIZE - SQUARE, 2))
            draw(label, corner, rng).save(root / label / f"{n:03d}.png")  # type: ignore[arg-type]
    return root


def write_probes(folder: Path, seed: int = 1) -> dict[str, tuple[str, str]]:
    """One image per class and quadrant (the square inside that quadrant) and per class at the centre:
    {stem: (label, quadrant or "centre")}."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    half, written = SIZE // 2, {}
    for label in COLOURS:
        for quadrant, (row, col) in QUADRANTS.items():
            corner = (row * half + int(rng.integers(2, half - SQUARE - 2)), col * half + int(rng.integers(2, half - SQUARE - 2)))
            draw(label, corner, rng).save(folder / f"{label}_{quadrant}.png")
            written[f"{label}_{quadrant}"] = (label, quadrant)
        draw(label, (half - SQUARE // 2, half - SQUARE // 2), rng).save(folder / f"{label}_centre.png")
        written[f"{label}_centre"] = (label, "centre")
    return written


def quadrant_mass(cam: np.ndarray) -> dict[str, float]:
    """The share of the map's total in each quadrant."""
    half_h, half_w = cam.shape[0] // 2, cam.shape[1] // 2
    total = float(cam.sum()) or 1.0
    return {q: float(cam[r * half_h : (r + 1) * half_h, c * half_w : (c + 1) * half_w].sum()) / total for q, (r, c) in QUADRANTS.items()}
