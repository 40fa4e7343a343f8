"""Which images go where: the stable train / val / test split, and the files a user asked to leave out.

Each image's split is a function of its own path alone: sha256 of `<data.split_seed>:<path relative to data.root>`
read as a number u in [0, 1); u < test_fraction -> test, u < test_fraction + val_fraction -> val, else train. So
adding, removing, excluding or losing a file never moves another file between splits, and a retrain after
`data.exclude` is tested on the same test images as the run before it (minus the excluded ones). The price: a
class's split sizes follow its hashes, not exact fractions. A class of 3+ images that gets no test (or no
validation) image by hash alone gives one, the image nearest to that split's hash band (logged); every class
keeps at least one training image. Official test lists (Oxford-IIIT Pet's) are used as they are.
`stratified_split` (seeded, per class) remains for the validation part of cross-validation folds and for
checkpoints that predate stored splits.

`data.exclude` names a text file of paths (one per line, absolute or relative to data.root; lines starting
with `#` are comments), e.g. the `exclude.txt` that transferlab-audit writes: those images are dropped before the split, so
a run trains and tests without them, and nothing on disk is touched.
"""

from __future__ import annotations

import hashlib
import logging
import math
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from transferlab.core.errors import DataError
from transferlab.data.images import Sample
from transferlab.data.labels import class_index, label_set, members

log = logging.getLogger(__name__)


SPLITS = ("train", "val", "test")


def split_key(path: str | Path, root: Path) -> str:
    """A file's name in the split: its path relative to data.root, '/'-separated (the absolute path if outside it)."""
    absolute = Path(path).expanduser().absolute()
    try:
        return absolute.relative_to(root.expanduser().absolute()).as_posix()
    except ValueError:
        return absolute.as_posix()


def hash_unit(key: str, seed: int) -> float:
    """A number in [0, 1) fixed by (seed, key): the first 8 bytes of sha256 over '<seed>:<key>'."""
    return int.from_bytes(hashlib.sha256(f"{seed}:{key}".encode()).digest()[:8], "big") / 2**64


def hash_split(
    samples: Sequence[Sample], key_of: Callable[[Path], str], val_fraction: float, test_fraction: float, seed: int
) -> dict[str, list[Sample]]:
    """{train, val, test}: each sample by hash_unit of its key (`key_of(path)`: the path relative to data.root, or what
    a dataset names its images by), small classes helped (see the module docstring)."""
    bands = {"test": (0.0, test_fraction), "val": (test_fraction, test_fraction + val_fraction), "train": (test_fraction + val_fraction, 1.0)}
    units = [hash_unit(key_of(Path(path)), seed) for path, _ in samples]
    chosen = ["test" if u < test_fraction else "val" if u < test_fraction + val_fraction else "train" for u in units]
    by_class = members([label for _, label in samples])  # a multi-label image counts for each of its labels
    moved = 0
    for held in by_class.values():
        needed = ["train"] + [s for s, f in (("test", test_fraction), ("val", val_fraction)) if f > 0 and len(held) >= 3]
        for split in needed:
            counts = {s: sum(1 for i in held if chosen[i] == s) for s in SPLITS}
            donors = [i for i in held if counts[chosen[i]] > 1 or chosen[i] not in needed]
            if counts[split] or not donors:
                continue
            low, high = bands[split]
            nearest = min(donors, key=lambda i: (max(low - units[i], units[i] - high, 0.0), units[i]))
            chosen[nearest] = split
            moved += 1
    if moved:
        log.info("Split: %d image(s) of small classes moved into an empty split (the nearest by hash; every class of 3+ images gets one)", moved)
    return {split: [s for s, c in zip(samples, chosen) if c == split] for split in SPLITS}


def require_training_images(
    class_names: Sequence[str], files: Sequence[Sample], usable: Sequence[Sample], train: Sequence[Sample], root: Path
) -> None:
    """Every class (label) needs a usable training image; otherwise one line naming it (and how many more)."""
    present = {one for _, label in train for one in label_set(label)}
    empty = [i for i in range(len(class_names)) if i not in present]
    if not empty:
        return
    found = sum(1 for _, label in files if empty[0] in label_set(label))
    refused = found - sum(1 for _, label in usable if empty[0] in label_set(label))
    raise DataError(
        f"data.root: class {class_names[empty[0]]!r} has no usable training images under {root} ({found} file(s) found, {refused} refused); "
        f"expected at least one image per class: add images or remove the class"
        + (f" (and {len(empty) - 1} more such class(es))" if len(empty) > 1 else "")
    )


def stratified_split(labels: Sequence[int], val_fraction: float, test_fraction: float, seed: int) -> tuple[list[int], list[int], list[int]]:
    """Per class, shuffle with `seed` and cut off val/test shares (at least one each when the class has 3+)."""
    rng = np.random.default_rng(seed)
    labels_arr = np.asarray(labels)
    train, val, test = [], [], []
    for label in np.unique(labels_arr):
        idx = rng.permutation(np.flatnonzero(labels_arr == label)).tolist()
        n = len(idx)
        n_test = int(math.floor(n * test_fraction + 0.5))
        n_val = int(math.floor(n * val_fraction + 0.5))
        if n >= 3:
            n_test = max(n_test, 1 if test_fraction > 0 else 0)
            n_val = max(n_val, 1 if val_fraction > 0 else 0)
        n_test, n_val = min(n_test, max(n - 1, 0)), min(n_val, max(n - 1 - n_test, 0))
        test += idx[:n_test]
        val += idx[n_test : n_test + n_val]
        train += idx[n_test + n_val :]
    return sorted(train), sorted(val), sorted(test)


def legacy_splits(pool: Sequence[Sample], val_fraction: float, test_fraction: float, seed: int) -> dict[str, list[Sample]]:
    """The split of checkpoints that predate stored splits: stratified_split over the pool, as it was made then."""
    train, val, test = stratified_split([class_index(label) for _, label in pool], val_fraction, test_fraction, seed)
    return {name: [pool[i] for i in indices] for name, indices in (("train", train), ("val", val), ("test", test))}


def read_exclude_list(file: str | Path, root: Path) -> set[str]:
    """The resolved paths listed in `file` (data.exclude); relative ones are relative to data.root."""
    path = Path(file).expanduser()
    if not path.is_file():
        raise DataError(f"data.exclude: {path} is not a file; give a text file with one image path per line (transferlab-audit writes one)")
    listed = set()
    for line in path.read_text(errors="replace").splitlines():
        entry = "" if line.lstrip().startswith("#") else line.strip()  # a file name may hold a '#': only whole lines are comments
        if entry:
            candidate = Path(entry).expanduser()
            listed.add(str((candidate if candidate.is_absolute() else root / candidate).resolve()))
    return listed


def drop_excluded(file: str | Path, root: Path, *lists: list[Sample]) -> list[list[Sample]]:
    """Each sample list without the files listed in `file`; says how many went and how many listed paths matched nothing."""
    listed = read_exclude_list(file, root)
    kept = [[s for s in samples if str(Path(s[0]).resolve()) not in listed] for samples in lists]
    dropped = sum(len(a) - len(b) for a, b in zip(lists, kept))
    log.info(
        "data.exclude: left out %d image(s) listed in %s%s (nothing was moved or deleted)",
        dropped,
        file,
        f"; {len(listed) - dropped} listed path(s) match no image of this dataset" if len(listed) > dropped else "",
    )
    return kept
