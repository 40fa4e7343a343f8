"""A real-photo multi-label dataset built from the 370 shared Oxford-IIIT Pet photos: canvases of 1 to 3 pets.

`write_canvases(out_dir, seed, per_split, size, task)` splits the PHOTOS first (per breed, seeded: 7 of each breed's
10 photos for training canvases, 3 held out, so both sides hold every breed), then composes `size` x `size` RGB
JPEGs (quality 90) on a plain grey background: 1 photo fills the canvas, 2 share it as left / right halves, 3 take
three tiles of a 2x2 grid (one tile left empty). Each photo keeps its aspect ratio inside its tile. About a third of
the canvases hold one photo, and about a third hold a cat and a dog together (the rest: 2 or 3 animals of one
species). Held-out canvases are made only of held-out photos and are `split=test` in the index; training canvases
only of training photos, split blank. It returns the index CSV of `task` (species: labels from {cat, dog}; breeds:
the breed names as the files spell them, e.g. `Abyssinian`, `american_bulldog`); both indexes are always written
(`index_species.csv`, `index_breeds.csv`, columns path,labels,split; paths relative to out_dir) over the same
images/, once. A second call with the same arguments on the same folder reuses what is there.

`out_dir/canvases.json` (`load_metadata(out_dir)`) records what was made: {"params", "photos": {"train": [...],
"test": [...]} (file names), "canvases": [{"path", "split", "photos", "species", "breeds"}], "indexes": {task:
file}}. `write_two_animal_canvas(path, seed, size)` composes one held-out cat beside one held-out dog (the held-out
photos of `split_photos(seed)`, so a model trained on the training canvases of the same seed never saw them) and
returns {"path", "photos", "species": ["cat", "dog"], "breeds"}: a picture for predict / serve tests.

`write_voc_folder(root)` writes a tiny hand-made Pascal VOC 2007 tree (VOCdevkit/VOC2007 with JPEGImages,
Annotations including `difficult` objects, ImageSets/Main/trainval.txt and test.txt) and returns what a reader
must find in it: for data=voc2007 tests.
"""

from __future__ import annotations

import csv
import json
from collections import deque
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Optional

import numpy as np
from PIL import Image, ImageOps

from conftest import PETS
from transferlab.data.oxford_pets import breed_of, species_of

VERSION = 1
TRAIN_SHARE = 0.7
BACKGROUND = (128, 128, 128)
TASKS = ("species", "breeds")
PER_SPLIT = {"train": 240, "test": 100}
PHOTO_COUNTS, COUNT_SHARES = (1, 2, 3), (0.34, 0.38, 0.28)


def split_photos(seed: int = 0, photos: Path = PETS) -> dict[str, list[Path]]:
    """{train, test}: per breed, a seeded 70 % / 30 % cut of its photos (every breed on both sides)."""
    by_breed: dict[str, list[Path]] = {}
    for path in sorted(photos.glob("*.jpg")):
        by_breed.setdefault(breed_of(path.stem), []).append(path)
    rng = np.random.default_rng(seed)
    found: dict[str, list[Path]] = {"train": [], "test": []}
    for breed in sorted(by_breed):
        files = [by_breed[breed][i] for i in rng.permutation(len(by_breed[breed]))]
        cut = min(max(1, round(TRAIN_SHARE * len(files))), len(files) - 1)
        found["train"] += sorted(files[:cut])
        found["test"] += sorted(files[cut:])
    return found


def tiles(count: int, size: int, empty: int = 3) -> list[tuple[int, int, int, int]]:
    """(left, top, width, height) of each photo's tile: the canvas, two halves, or three quadrants of four."""
    half = size // 2
    if count == 1:
        return [(0, 0, size, size)]
    if count == 2:
        return [(0, 0, half, size), (half, 0, size - half, size)]
    quadrants = [(0, 0, half, half), (half, 0, size - half, half), (0, half, half, size - half), (half, half, size - half, size - half)]
    return [q for i, q in enumerate(quadrants) if i != empty]


def compose(photos: list[Path], size: int, empty: int = 3) -> Image.Image:
    """The canvas: each photo fitted (aspect kept, centred) into its tile on grey."""
    canvas = Image.new("RGB", (size, size), BACKGROUND)
    for photo, (left, top, width, height) in zip(photos, tiles(len(photos), size, empty)):
        with Image.open(photo) as img:
            img.draft("RGB", (width, height))  # decode at 1/2, 1/4 ... when the tile is that much smaller
            fitted = ImageOps.contain(img.convert("RGB"), (width, height), Image.Resampling.BILINEAR)
        canvas.paste(fitted, (left + (width - fitted.width) // 2, top + (height - fitted.height) // 2))
    return canvas


class _Cycle:
    """Photos of one species in a seeded order, each used once before any is used again; never twice on a canvas."""

    def __init__(self, photos: list[Path], rng: np.random.Generator) -> None:
        self.photos, self.rng = photos, rng
        self.queue: deque[Path] = deque()

    def take(self, used: set[Path]) -> Path:
        for _ in range(2 * len(self.photos) + 1):
            if not self.queue:
                self.queue.extend(self.photos[i] for i in self.rng.permutation(len(self.photos)))
            photo = self.queue.popleft()
            if photo not in used:
                return photo
            self.queue.append(photo)
        raise ValueError("not enough photos of one species for a canvas")


def plan(photos: list[Path], count: int, rng: np.random.Generator) -> list[tuple[list[Path], int]]:
    """(photos, empty tile) of `count` canvases: 1-3 photos each; with 2-3, half the time both species together."""
    cycles = {s: _Cycle([p for p in photos if species_of(breed_of(p.stem)) == s], rng) for s in ("cat", "dog")}
    found = []
    for _ in range(count):
        n = int(rng.choice(PHOTO_COUNTS, p=COUNT_SHARES))
        one = str(rng.choice(["cat", "dog"]))
        if n > 1 and rng.random() < 0.5:
            species = ["cat", "dog"] + [str(rng.choice(["cat", "dog"])) for _ in range(n - 2)]
        else:
            species = [one] * n
        used: set[Path] = set()
        for kind in species:
            used.add(cycles[kind].take(used))
        chosen = sorted(used)  # sets have no order: sorted, then shuffled by the seed
        order = rng.permutation(len(chosen))
        found.append(([chosen[i] for i in order], int(rng.integers(4))))
    return found


def _labels(photos: list[Path]) -> dict[str, list[str]]:
    return {"species": sorted({species_of(breed_of(p.stem)) for p in photos}), "breeds": sorted({breed_of(p.stem) for p in photos})}


def load_metadata(out_dir: Path) -> dict[str, Any]:
    """What write_canvases made in out_dir (canvases.json)."""
    return json.loads((Path(out_dir) / "canvases.json").read_text())


def write_canvases(
    out_dir: Path, seed: int = 0, per_split: Optional[Mapping[str, int]] = None, size: int = 448, task: str = "species", photos: Path = PETS
) -> Path:
    """Canvases under out_dir/images, both index CSVs and canvases.json; returns the index CSV of `task`."""
    if task not in TASKS:
        raise ValueError(f"task: expected species or breeds, got {task!r}")
    out_dir = Path(out_dir)
    counts = {"train": int((per_split or PER_SPLIT).get("train", 0)), "test": int((per_split or PER_SPLIT).get("test", 0))}
    params = {"version": VERSION, "seed": seed, "per_split": counts, "size": size, "photos": str(photos)}
    index = out_dir / f"index_{task}.csv"
    if (out_dir / "canvases.json").is_file() and load_metadata(out_dir)["params"] == params and index.is_file():
        return index
    split = split_photos(seed, photos)
    canvases = []
    for number, name in enumerate(("train", "test")):
        for i, (chosen, empty) in enumerate(plan(split[name], counts[name], np.random.default_rng([seed, number]))):
            canvases.append({"path": f"images/{name}_{i:04d}.jpg", "split": name, "photos": chosen, "empty": empty})
    (out_dir / "images").mkdir(parents=True, exist_ok=True)

    def render(canvas: dict[str, Any]) -> None:
        compose(canvas["photos"], size, canvas["empty"]).save(out_dir / canvas["path"], quality=90)

    with ThreadPoolExecutor(max_workers=8) as pool:  # Pillow decodes and encodes without the GIL
        list(pool.map(render, canvases))
    records = [{"path": c["path"], "split": c["split"], "photos": [p.name for p in c["photos"]], **_labels(c["photos"])} for c in canvases]
    for kind in TASKS:
        with open(out_dir / f"index_{kind}.csv", "w", newline="") as fh:
            writer = csv.writer(fh)
            writer.writerow(["path", "labels", "split"])
            writer.writerows([r["path"], ";".join(r[kind]), "test" if r["split"] == "test" else ""] for r in records)
    metadata = {
        "params": params,
        "photos": {k: [p.name for p in v] for k, v in split.items()},
        "canvases": records,
        "indexes": {kind: f"index_{kind}.csv" for kind in TASKS},
    }
    (out_dir / "canvases.json").write_text(json.dumps(metadata, indent=1))
    return index


def write_two_animal_canvas(path: Path, seed: int = 0, size: int = 448, photos: Path = PETS) -> dict[str, Any]:
    """A held-out cat (left) beside a held-out dog (right) of split_photos(seed), saved at `path`; what it shows."""
    held_out = split_photos(seed, photos)["test"]
    rng = np.random.default_rng([seed, 2])
    cat = [p for p in held_out if species_of(breed_of(p.stem)) == "cat"]
    dog = [p for p in held_out if species_of(breed_of(p.stem)) == "dog"]
    chosen = [cat[int(rng.integers(len(cat)))], dog[int(rng.integers(len(dog)))]]
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    compose(chosen, size).save(path, quality=90)
    return {"path": str(path), "photos": [p.name for p in chosen], "species": ["cat", "dog"], "breeds": [breed_of(p.stem) for p in chosen]}


# -- Pascal VOC 2007, hand-made ---------------------------------------------------------------------------------------
# id -> ([(class, difficult)], list): what data=voc2007 must read from write_voc_folder's tree; trainval holds
# every class (a training run needs each label in its training split).
VOC_OBJECTS: dict[str, tuple[list[tuple[str, int]], str]] = {
    "000001": ([("dog", 0), ("person", 0)], "trainval"),
    "000002": ([("train", 0)], "trainval"),
    "000003": ([("sofa", 0), ("chair", 1)], "trainval"),  # chair: difficult only
    "000004": ([("car", 1), ("car", 0), ("person", 1)], "trainval"),  # car: one easy object; person: difficult only
    "000005": ([("cat", 0), ("dog", 0)], "trainval"),
    "000006": ([("bird", 0), ("aeroplane", 0), ("bicycle", 0), ("boat", 0)], "trainval"),
    "000010": ([("bottle", 0), ("bus", 0), ("cow", 0), ("diningtable", 0), ("horse", 0)], "trainval"),
    "000011": ([("motorbike", 0), ("pottedplant", 0), ("sheep", 0), ("tvmonitor", 0), ("train", 1)], "trainval"),
    "000012": ([], "trainval"),  # no object of the 20 classes: an image with none of the labels
    "000007": ([("cat", 0)], "test"),
    "000008": ([("bottle", 1), ("person", 0)], "test"),  # bottle: difficult only
    "000009": ([("dog", 0), ("dog", 1)], "test"),
}


def _voc_xml(image_id: str, objects: list[tuple[str, int]]) -> str:
    body = "".join(
        f"<object><name>{name}</name><pose>Unspecified</pose><truncated>0</truncated><difficult>{difficult}</difficult>"
        f"<bndbox><xmin>1</xmin><ymin>1</ymin><xmax>20</xmax><ymax>20</ymax></bndbox></object>"
        for name, difficult in objects
    )
    return f"<annotation><folder>VOC2007</folder><filename>{image_id}.jpg</filename><size><width>32</width><height>24</height><depth>3</depth></size>{body}</annotation>"


def write_voc_folder(root: Path, objects: Optional[Mapping[str, tuple[list[tuple[str, int]], str]]] = None) -> Path:
    """root/VOCdevkit/VOC2007 with a 32x24 JPEG, an annotation and a list entry per id (VOC_OBJECTS by default);
    returns the VOC2007 folder. Each image is a different flat colour (the integrity scan's digests stay distinct)."""
    voc = Path(root) / "VOCdevkit" / "VOC2007"
    for folder in ("JPEGImages", "Annotations", "ImageSets/Main"):
        (voc / folder).mkdir(parents=True, exist_ok=True)
    lists: dict[str, list[str]] = {"trainval": [], "test": []}
    for number, (image_id, (found, listed)) in enumerate(sorted((objects or VOC_OBJECTS).items())):
        colour = ((37 * number) % 256, (91 * number) % 256, (53 * number + 80) % 256)
        Image.new("RGB", (32, 24), colour).save(voc / "JPEGImages" / f"{image_id}.jpg", quality=90)
        (voc / "Annotations" / f"{image_id}.xml").write_text(_voc_xml(image_id, found))
        lists[listed].append(image_id)
    for name, ids in lists.items():
        (voc / "ImageSets" / "Main" / f"{name}.txt").write_text("".join(f"{i}\n" for i in ids))
    return voc
