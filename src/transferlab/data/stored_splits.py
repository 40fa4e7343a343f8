"""A run's split, stored: `OUT/splits.csv` and the same table inside every checkpoint and model package.

Columns `path` (relative to data.root, '/'-separated), `split` (train | val | test: what the model was fitted,
selected and tested on; the probe with select_c=cv trains on its validation images, so they are `train`),
`size` (bytes) and `sha256`. transferlab-eval reads it instead of splitting the data again: on the run's own data it
tests exactly the stored test files that still exist (never files added since, whatever their hash), refuses a
stored test file whose bytes changed, and on other data leaves out any file whose bytes equal a file the model was
fitted or selected on. The audit and export read it too.
"""

from __future__ import annotations

import csv
import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Optional

from transferlab.core.errors import DataError
from transferlab.data.images import Sample
from transferlab.data.integrity import sizes_and_digests
from transferlab.data.splits import SPLITS, split_key

log = logging.getLogger(__name__)

FILE = "splits.csv"
COLUMNS = ("path", "split", "size", "sha256")
FORMAT = 1
SEEN = ("train", "val")  # what fitting and selection read


def build_table(root: Path, splits: Mapping[str, Sequence[Sample]], cache_dir: Optional[str]) -> dict[str, Any]:
    """{format, root, rows: [[path, split, size, sha256], ...]} of the files in `splits` (sorted by path)."""
    paths = [Path(p) for split in SPLITS for p, _ in splits.get(split, ())]
    digests = sizes_and_digests(paths, root, cache_dir)
    rows = []
    for split in SPLITS:
        for path, _ in splits.get(split, ()):
            size, sha = digests.get(str(path), (-1, ""))
            rows.append([split_key(path, root), split, int(size), sha])
    return {"format": FORMAT, "root": str(root.expanduser().resolve()), "rows": sorted(rows)}


def write_csv(path: Path, table: Mapping[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(COLUMNS)
        writer.writerows(table["rows"])


def read_csv(path: Path) -> dict[str, Any]:
    """A splits.csv as a table (its root unknown: the file stores paths relative to it)."""
    try:
        with open(path, newline="") as fh:
            reader = csv.DictReader(fh)
            if tuple(reader.fieldnames or ()) != COLUMNS:
                raise DataError(f"{path}: expected the columns {', '.join(COLUMNS)} (a run's splits.csv), got {reader.fieldnames}")
            rows = [[r["path"], r["split"], int(r["size"]), r["sha256"]] for r in reader]
    except (OSError, ValueError, KeyError, csv.Error) as exc:
        raise DataError(f"{path}: not a readable splits.csv ({exc})") from None
    unknown = sorted({r[1] for r in rows} - set(SPLITS))
    if unknown:
        raise DataError(f"{path}: unknown split {unknown[0]!r}; expected {', '.join(SPLITS)}")
    return {"format": FORMAT, "root": None, "rows": rows}


def counts(table: Mapping[str, Any]) -> dict[str, int]:
    return {split: sum(1 for row in table["rows"] if row[1] == split) for split in SPLITS}


def assignment(table: Mapping[str, Any]) -> dict[str, str]:
    """{path relative to data.root: split}."""
    return {row[0]: row[1] for row in table["rows"]}


def stored_test(table: Mapping[str, Any], root: Path, usable: Sequence[Sample], cache_dir: Optional[str]) -> tuple[list[Sample], list[str]]:
    """(the stored test files among today's usable images, with today's labels; the stored test files that are gone
    or unusable). A stored test file that now holds other bytes stops the evaluation: its result would mean nothing."""
    by_key = {split_key(path, root): (Path(path), label) for path, label in usable}
    rows = [row for row in table["rows"] if row[1] == "test"]
    on_disk = [row for row in rows if (root / row[0]).is_file()]
    digests = sizes_and_digests([root / row[0] for row in on_disk], root, cache_dir)
    for row in on_disk:
        got = digests.get(str(root / row[0]))
        if got is not None and got[1] != row[3]:
            raise DataError(
                f"{root / row[0]}: a stored test file of this checkpoint now holds other bytes (sha256 {got[1][:12]}..., stored "
                f"{row[3][:12]}...); restore it, or test on other images with data.root=<folder>"
            )
    found = [by_key[row[0]] for row in rows if row[0] in by_key]
    missing = [row[0] for row in rows if row[0] not in by_key]
    return found, missing


def without_seen_files(table: Mapping[str, Any], samples: Sequence[Sample], root: Path, cache_dir: Optional[str]) -> tuple[list[Sample], int]:
    """`samples` minus every file whose bytes equal one the model was fitted or selected on; how many went."""
    seen = {row[3] for row in table["rows"] if row[1] in SEEN and row[3]}
    digests = sizes_and_digests([Path(p) for p, _ in samples], root, cache_dir)
    kept = [s for s in samples if digests.get(str(s[0]), (0, ""))[1] not in seen]
    return kept, len(samples) - len(kept)
