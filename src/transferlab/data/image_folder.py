"""Any root/<class>/<image> tree: class names are the sub-folder names.

With data.task=multilabel the same relative file name under several class folders (root/cat/x.jpg and root/dog/x.jpg)
is one image holding all those labels: the copy in the first of them (sorted) is the one read, so the copies must be
identical (their sizes are compared, and a mismatch is logged: the labels of the other copies would describe another
picture). A file in one folder only is an image with one label. Single-label trees are read exactly as before.
"""

from __future__ import annotations

import logging
from pathlib import Path

from transferlab.core.errors import DataError
from transferlab.data.base import Discovered, ImageClassificationDataModule, Sample
from transferlab.data.images import list_files

log = logging.getLogger(__name__)


def _size(path: Path) -> int | None:
    try:
        return path.stat().st_size
    except OSError:
        return None  # a broken link: the integrity scan reports it


def merge_copies(class_dirs: list[Path]) -> list[Sample]:
    """(first copy, sorted label set) per relative file name across the class folders; warns about copies that differ."""
    found: dict[str, tuple[Path, list[int]]] = {}
    differing: list[str] = []
    for label, folder in enumerate(class_dirs):
        for path in list_files(folder):
            name = path.relative_to(folder).as_posix()
            if name not in found:
                found[name] = (path, [label])
                continue
            first, labels = found[name]
            labels.append(label)
            if _size(first) != _size(path):
                differing.append(f"{first} vs {path}")
    if differing:
        log.warning(
            "data.task=multilabel: %d copy(ies) of the same file name differ in size, so they may be other pictures; the first "
            "copy is read with every folder's label: %s%s",
            len(differing),
            "; ".join(differing[:3]),
            " ..." if len(differing) > 3 else "",
        )
    return [(path, tuple(labels)) for path, labels in found.values()]


class ImageFolderDataModule(ImageClassificationDataModule):
    layout = "one sub-folder of images per class (root/<class>/<image>)"

    def discover(self) -> Discovered:
        if not self.root.is_dir():
            raise DataError(f"data.root: {self.root} is not a folder; set data.root=<folder with one sub-folder per class>")
        class_dirs = sorted(p for p in self.root.iterdir() if p.is_dir() and not p.name.startswith("."))
        if len(class_dirs) < 2:
            raise DataError(f"data.root: {self.root} needs at least 2 class sub-folders (root/<class>/<image>), found {len(class_dirs)}")
        if self.multilabel:
            return Discovered(class_names=[d.name for d in class_dirs], samples=merge_copies(class_dirs))
        samples: list[Sample] = [(path, label) for label, d in enumerate(class_dirs) for path in list_files(d)]
        return Discovered(class_names=[d.name for d in class_dirs], samples=samples)
