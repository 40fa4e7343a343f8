"""Realistic image-folder datasets of any size, made from a folder of real photos (for scale measurements).

    python scripts/synthetic_photos.py --count 16000 --out /tmp/pets-16k [--seed 0]

Every output is its own random variant of one source photo: a crop that keeps 50-100 % of each side, a
horizontal flip half of the time, a resize so that the longer side is one of LONG_SIDES (some outputs have a
short side above 512 px, so the loaders' reduced JPEG decoding is exercised too) and a JPEG quality in
60-95. Files are named `<class>/<source stem>_s<seed>_v<k>.jpg` and each one's randomness is seeded by
that name alone, so a rerun writes the same bytes, a larger count is a superset of a smaller one, and
files already present are reused instead of rebuilt.

Variants of one photo are near-duplicates: a random split puts some of them on both sides, so accuracies
measured on these folders are optimistic; they are meant for cost, not for model quality.
"""

from __future__ import annotations

import argparse
import os
import random
import sys
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

from PIL import Image, ImageOps

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("TRANSFERLAB_SHARED", REPO.parent / "shared"))
LONG_SIDES = (320, 400, 480, 560, 640, 800)
QUALITY = (60, 95)
KEEP_FRACTION = (0.5, 1.0)
WORKERS = 2


def _species(path: Path) -> str:
    """Oxford-IIIT Pet naming: cat breeds are capitalised (`Abyssinian_1`), dog breeds are not (`beagle_1`)."""
    return "cat" if path.name[:1].isupper() else "dog"


def _is_inside(path: Path, folder: Path) -> bool:
    return path == folder or folder in path.parents


def _refuse_protected(into: Path, source: Path) -> None:
    """Generated data belongs in a temporary folder: never in the repository (it would get committed) nor in shared/."""
    for protected in (REPO, SHARED.resolve(), source):
        if _is_inside(into, protected):
            raise ValueError(f"refusing to write generated photos into {into}: it is inside {protected}; pass a temporary folder")


def _plan(source: Path, count: int, seed: int, task: str) -> dict[Path, list[Path]]:
    """Source photo -> the output files it yields: classes as balanced as possible, photos used round-robin."""
    if task != "species":
        raise ValueError(f"task={task!r}: only 'species' (cat / dog) is supported")
    photos = sorted(p for p in source.iterdir() if p.suffix.lower() in (".jpg", ".jpeg") and not p.name.startswith("."))
    by_class: dict[str, list[Path]] = {}
    for photo in photos:
        by_class.setdefault(_species(photo), []).append(photo)
    if sorted(by_class) != ["cat", "dog"]:
        raise ValueError(f"{source} needs photos of both classes (capitalised names = cat, lowercase = dog), found {sorted(by_class)}")
    plan: dict[Path, list[Path]] = {}
    for index, (name, members) in enumerate(sorted(by_class.items())):
        wanted = count // 2 + (1 if index < count % 2 else 0)
        for j in range(wanted):
            photo = members[j % len(members)]
            plan.setdefault(photo, []).append(Path(name) / f"{photo.stem}_s{seed}_v{j // len(members)}.jpg")
    return plan


def _variant(photo: Image.Image, rng: random.Random) -> tuple[Image.Image, int]:
    width, height = photo.size
    crop_w = max(1, round(width * rng.uniform(*KEEP_FRACTION)))
    crop_h = max(1, round(height * rng.uniform(*KEEP_FRACTION)))
    left, top = rng.randint(0, width - crop_w), rng.randint(0, height - crop_h)
    image = photo.crop((left, top, left + crop_w, top + crop_h))
    if rng.random() < 0.5:
        image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    long_side = rng.choice(LONG_SIDES)
    scale = long_side / max(crop_w, crop_h)
    image = image.resize((max(1, round(crop_w * scale)), max(1, round(crop_h * scale))), Image.Resampling.BICUBIC)
    return image, rng.randint(*QUALITY)


def _render(job: tuple[Path, Path, list[Path]]) -> int:
    """Decode one source photo once and write all of its missing variants (atomically: no half files to reuse)."""
    photo_path, into, outputs = job
    missing = [name for name in outputs if not (into / name).is_file()]
    if not missing:
        return 0
    with Image.open(photo_path) as opened:
        photo = ImageOps.exif_transpose(opened).convert("RGB")
    for name in missing:
        image, quality = _variant(photo, random.Random(name.as_posix()))
        target = into / name
        partial = target.with_name(f".{target.name}.part")
        image.save(partial, format="JPEG", quality=quality)
        os.replace(partial, target)
    return len(missing)


def build_photos(source: Path, count: int, into: Path, seed: int = 0, task: str = "species") -> Path:
    """`count` realistic JPEGs made from the photos in `source`, in `into/<class>/`; returns `into`.

    Reuses files that an earlier call wrote and removes other JPEGs from the class folders, so the folder
    holds exactly this call's `count` images.
    """
    source, into = Path(source).resolve(), Path(into).resolve()
    _refuse_protected(into, source)
    plan = _plan(source, count, seed, task)
    expected = {name for outputs in plan.values() for name in outputs}
    for name in {name.parent for name in expected}:
        (into / name).mkdir(parents=True, exist_ok=True)
        for stale in (into / name).glob("*.jpg"):
            if stale.relative_to(into) not in expected:
                stale.unlink()
    jobs = [(photo, into, outputs) for photo, outputs in plan.items()]
    with ProcessPoolExecutor(max_workers=WORKERS) as pool:
        for _ in pool.map(_render, jobs, chunksize=4):  # consume: a worker's exception surfaces here
            pass
    return into


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, required=True, help="number of images to write")
    parser.add_argument("--out", type=Path, required=True, help="output folder (temporary: not in the repository)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--data", type=Path, default=SHARED / "data" / "oxford-pets-sample", help="folder of source photos")
    args = parser.parse_args(argv)
    if not args.data.is_dir():
        print(f"error: {args.data} is not a folder of photos", file=sys.stderr)
        return 2
    print(build_photos(args.data, args.count, args.out, seed=args.seed))
    return 0


if __name__ == "__main__":
    sys.exit(main())
