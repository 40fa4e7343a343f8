"""Which images go where: the stratified train / val / test split, and the files a user asked to leave out.

`data.exclude` names a text file of paths (one per line, absolute or relative to data.root; lines starting
with `#` are comments), e.g. the `exclude.txt` that transferlab-audit writes: those images are dropped before the split, so
a run trains and tests without them, and nothing on disk is touched.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from transferlab.core.errors import DataError
from transferlab.data.images import Sample

log = logging.getLogger(__name__)


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
