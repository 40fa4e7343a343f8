"""A copy of the shared sample as a cats-vs-dogs image folder, with known faults planted in it (the audit's checks).

Label flips (5 cats filed under dog/, 5 dogs under cat/), near-duplicates (resized, re-encoded, slightly cropped
copies of other photos, beside their original), one unreadable file. Originals are symbolic links: nothing of
../shared is copied except the derived duplicates.
"""

from __future__ import annotations

import io
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image

DUPLICATE_KINDS = ("resized", "reencoded", "cropped", "resized_reencoded", "cropped_resized")


@dataclass
class Planted:
    root: Path
    flipped: list[Path] = field(default_factory=list)  # files whose folder (label) is wrong
    duplicates: list[tuple[Path, Path]] = field(default_factory=list)  # (original, planted copy)
    broken: list[Path] = field(default_factory=list)


def _derived_copy(src: Path, dst: Path, kind: str) -> None:
    with Image.open(src) as img:
        img = img.convert("RGB")
    w, h = img.size
    if "cropped" in kind:  # 4 % off each side
        img = img.crop((int(0.04 * w), int(0.04 * h), int(0.96 * w), int(0.96 * h)))
    if "resized" in kind:
        img = img.resize((max(1, int(img.width * 0.6)), max(1, int(img.height * 0.6))), Image.Resampling.BICUBIC)
    quality = 55 if "reencoded" in kind else 90
    buffer = io.BytesIO()
    img.save(buffer, format="JPEG", quality=quality)
    dst.write_bytes(buffer.getvalue())


def plant_faults(pets: Path, root: Path, flips: int = 10, duplicates: int = 10) -> Planted:
    """root/cat, root/dog from the shared sample (species by capitalisation), with the faults planted."""
    photos = sorted(pets.glob("*.jpg"))
    cats = [p for p in photos if p.name[0].isupper()]
    dogs = [p for p in photos if not p.name[0].isupper()]
    flip = set(cats[3 :: len(cats) // (flips // 2)][: flips // 2]) | set(dogs[5 :: len(dogs) // (flips - flips // 2)][: flips - flips // 2])
    planted = Planted(root)
    for photo in photos:
        label = "cat" if photo in cats else "dog"
        if photo in flip:
            label = "dog" if label == "cat" else "cat"
            planted.flipped.append(root / label / photo.name)
        target = root / label / photo.name
        target.parent.mkdir(parents=True, exist_ok=True)
        target.symlink_to(photo.resolve())
    originals = [p for p in cats[1::24][: duplicates // 2] + dogs[2::50][: duplicates - duplicates // 2] if p not in flip]
    for n, photo in enumerate(originals):
        label = "cat" if photo in cats else "dog"
        copy = root / label / f"{photo.stem}_copy{n}.jpg"
        _derived_copy(photo, copy, DUPLICATE_KINDS[n % len(DUPLICATE_KINDS)])
        planted.duplicates.append((root / label / photo.name, copy))
    broken = root / "dog" / "broken_download.jpg"
    broken.write_bytes(photos[0].read_bytes()[:300])  # a truncated JPEG: skipped and reported, never deleted
    planted.broken.append(broken)
    return planted
