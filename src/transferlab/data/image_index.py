"""Images listed in an index file: a CSV with a header, or JSON lines, one image per row (data=image_index).

Columns: `path` (relative to data.root, or absolute) and, with data.task=single, `label` (one class name per image)
or, with data.task=multilabel, `labels` (the names joined by `;`, blank = none of the labels; in JSON lines also a
list of strings). The classes are the sorted set of the names found. An optional `split` column holds train, val,
test or blank: only `test` is honoured (those rows are the official test list, as Oxford-IIIT Pet's test.txt); every
other row goes through the stable hash split, because which image validates is the split's choice (data.val_fraction)
and a hand-made train/val cut would not survive cross-validation anyway.

A listed file that is missing is reported like a corrupt image (skipped_images.csv, never fatal): the index is read
once, files come and go. A malformed index (no such file, a missing column, an empty or repeated path, fewer than
two classes) stops the run with one line naming the file and row: guessing would train on the wrong labels.
"""

from __future__ import annotations

import csv
import json
import logging
import os
from pathlib import Path
from typing import Any, Optional

from transferlab.core.errors import ConfigError, DataError
from transferlab.data.base import Discovered, ImageClassificationDataModule, Sample
from transferlab.data.labels import SEPARATOR, Label, parse_joined, sorted_names

log = logging.getLogger(__name__)

JSON_SUFFIXES = (".jsonl", ".ndjson", ".json")
SPLIT_VALUES = ("", "train", "val", "test")
Row = tuple[int, dict[str, Any]]  # (line number in the file, the row's values)


def read_rows(file: Path) -> tuple[list[str], list[Row]]:
    """(the columns, the rows with their line numbers) of a CSV with a header or a JSON-lines file."""
    try:
        if file.suffix.lower() in JSON_SUFFIXES:
            return _json_rows(file)
        with open(file, newline="", encoding="utf-8-sig") as fh:
            reader = csv.DictReader(fh)
            columns = [str(c).strip() for c in reader.fieldnames or []]
            rows = []
            for values in reader:
                row = {str(k).strip(): v for k, v in values.items() if k is not None}
                if any(str(v or "").strip() for v in row.values()):  # a blank line is no image
                    rows.append((reader.line_num, row))
            return columns, rows
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise DataError(f"data.index: {file} cannot be read as a CSV with a header ({exc}); give a .csv or a .jsonl file") from None


def _json_rows(file: Path) -> tuple[list[str], list[Row]]:
    columns: dict[str, None] = {}
    rows = []
    for number, line in enumerate(file.read_text(encoding="utf-8-sig").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError as exc:
            raise DataError(f"data.index: {file} line {number} is not a JSON object ({exc}); one object per line") from None
        if not isinstance(row, dict):
            raise DataError(f"data.index: {file} line {number} is {type(row).__name__}, not a JSON object; one object per line")
        columns.update(dict.fromkeys(str(k) for k in row))
        rows.append((number, {str(k): v for k, v in row.items()}))
    return list(columns), rows


def check_columns(file: Path, columns: list[str], multilabel: bool) -> str:
    """The label column the task reads (`labels` or `label`); one line naming what is missing and what to set."""
    found = ", ".join(columns) or "none"
    need, other = ("labels", "label") if multilabel else ("label", "labels")
    task = "multilabel" if multilabel else "single"
    if "path" not in columns:
        raise DataError(f"data.index: {file} has no 'path' column (found: {found}); data.task={task} needs the columns path and {need}")
    if need in columns:
        return need
    if other in columns:
        wanted = "single (one class name per image)" if multilabel else "multilabel (names joined by ';')"
        raise ConfigError(
            f"data.index: {file} has a {other!r} column but no {need!r} column (found: {found}); set data.task={wanted}, or name the column {need}"
        )
    raise DataError(f"data.index: {file} has no {need!r} column (found: {found}); data.task={task} needs the columns path and {need}")


def _names(value: Any, where: str) -> list[str]:
    """The label names of one `labels` cell: `a;b`, blank, or (JSON lines) a list of strings."""
    if value is None:
        return []
    if isinstance(value, (list, tuple)):
        if not all(isinstance(v, (str, int)) for v in value):
            raise DataError(f"{where}: labels {value!r}: expected a list of label names (strings)")
        return sorted({str(v).strip() for v in value if str(v).strip()})
    return sorted({part.strip() for part in str(value).split(SEPARATOR) if part.strip()})


class ImageIndexDataModule(ImageClassificationDataModule):
    layout = "an index file (data.index: CSV with a header, or JSON lines) with a path and a label or labels column"

    def __init__(self, *, index: str, root: Optional[str], **kwargs: Any) -> None:
        """`index`: the file (relative: to the current directory, else to data.root); `root`: what relative paths in
        it are relative to, null = the index file's own folder. The rest: conf/data/image_index.yaml."""
        self.index = str(index)
        super().__init__(root=str(root) if root is not None else str(Path(self.index).expanduser().absolute().parent), **kwargs)
        self.root_given = root is not None

    def is_present(self) -> bool:
        return True  # nothing to download; discover() names what is missing

    def index_file(self) -> Path:
        """data.index resolved: as given (absolute, or relative to the current directory), else under data.root."""
        given = Path(self.index).expanduser()
        candidates = [given] if given.is_absolute() or not self.root_given else [given.absolute(), self.root / given]
        for candidate in candidates:
            if candidate.is_file():
                return candidate
        tried = " or ".join(str(c.absolute()) for c in candidates)
        raise DataError(
            f"data.index: no index file at {tried}; set data.index=<file.csv|file.jsonl> (relative paths: to the current directory or data.root)"
        )

    def discover(self) -> Discovered:
        file = self.index_file()
        if not self.root.is_dir():
            raise DataError(f"data.root: {self.root} is not a folder; set data.root=<the folder the paths in {file.name} are relative to>")
        columns, rows = read_rows(file)
        column = check_columns(file, columns, self.multilabel)
        named = [(number, row, self._label_names(file, number, row.get(column))) for number, row in rows]
        class_names = sorted_names(names for _, _, names in named)
        kind = "labels" if self.multilabel else "classes"
        if len(class_names) < 2:
            raise DataError(f"data.index: {file} names {len(class_names)} {kind} ({', '.join(class_names) or 'none'}); expected at least 2")
        index_of = {name: i for i, name in enumerate(class_names)}
        pool: list[Sample] = []
        test: list[Sample] = []
        seen: dict[str, int] = {}
        ignored = 0
        for number, row, names in named:
            where = f"data.index: {file} row {number}"
            path = self._path(where, row.get("path"))
            key = os.path.normpath(path.absolute())
            if key in seen:
                raise DataError(
                    f"data.index: {file} rows {seen[key]} and {number} both list {path}; list each image once"
                    + (" (join its labels with ';')" if self.multilabel else " (one class per image, or data.task=multilabel)")
                )
            seen[key] = number
            label: Label = parse_joined(SEPARATOR.join(names), index_of, where) if self.multilabel else index_of[names[0]]
            split = str(row.get("split") or "").strip().lower() if "split" in columns else ""
            if split not in SPLIT_VALUES:
                raise DataError(f"{where}: split {row.get('split')!r}; expected train, val, test or blank")
            ignored += split in ("train", "val")
            (test if split == "test" else pool).append((path, label))
        if not pool:
            raise DataError(f"data.index: every row of {file} has split=test; leave the split of the training images blank")
        if ignored:
            log.info(
                "data.index: %d row(s) say split=train or val: not used; training and validation images come from the stable "
                "hash split (data.val_fraction), only split=test rows are held out as given",
                ignored,
            )
        log.info("data.index %s: %d image(s), %d %s, %d in its test list", file, len(pool) + len(test), len(class_names), kind, len(test))
        return Discovered(class_names=class_names, samples=pool, test_samples=test or None)

    def _label_names(self, file: Path, number: int, value: Any) -> list[str]:
        where = f"data.index: {file} row {number}"
        if self.multilabel:
            return _names(value, where)
        name = "" if value is None else str(value).strip()
        if not name:
            raise DataError(f"{where}: blank label; data.task=single needs one class per image (data.task=multilabel allows none)")
        if SEPARATOR in name:
            raise ConfigError(
                f"{where}: label {name!r} holds {SEPARATOR!r}; for several labels per image set data.task=multilabel and name the column labels"
            )
        return [name]

    def _path(self, where: str, value: Any) -> Path:
        text = "" if value is None else str(value).strip()
        if not text:
            raise DataError(f"{where}: empty path; every row needs the image's path (relative to data.root {self.root}, or absolute)")
        path = Path(text).expanduser()
        return path if path.is_absolute() else self.root / path
