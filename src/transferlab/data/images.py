"""Reading images the same way everywhere: EXIF orientation applied, RGB, truncated files refused."""

from __future__ import annotations

import warnings
from pathlib import Path

from PIL import Image, ImageOps

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm"}


def load_rgb(path: str | Path) -> Image.Image:
    """Decode fully (so truncation raises here, not inside a transform), honour EXIF rotation, return RGB."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # e.g. "Corrupt EXIF data" on files that decode fine
        with Image.open(path) as img:
            img.load()
            img = ImageOps.exif_transpose(img)
            return img.convert("RGB")


def check_image(path: str | Path) -> str | None:
    """None when the file decodes completely, else the reason it cannot be used."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with Image.open(path) as img:
                if img.format == "JPEG":
                    img.draft("RGB", (img.width // 8 or 1, img.height // 8 or 1))  # DCT-scaled: fast, still reads every byte
                img.load()
        return None
    except Exception as exc:  # noqa: BLE001 - every failure becomes a reported reason
        reason = " ".join(str(exc).split()) or type(exc).__name__
        return f"{type(exc).__name__}: {reason}"


def list_files(folder: Path) -> list[Path]:
    """Every non-hidden file below folder, sorted; the integrity scan decides which are images."""
    return sorted(
        p for p in folder.rglob("*")
        if p.is_file() and not any(part.startswith(".") for part in p.relative_to(folder).parts)
    )
