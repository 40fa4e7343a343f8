"""Any root/<class>/<image> tree: class names are the sub-folder names."""

from __future__ import annotations

from transferlab.core.errors import DataError
from transferlab.data.base import Discovered, ImageClassificationDataModule
from transferlab.data.images import list_files


class ImageFolderDataModule(ImageClassificationDataModule):
    layout = "one sub-folder of images per class (root/<class>/<image>)"

    def discover(self) -> Discovered:
        if not self.root.is_dir():
            raise DataError(f"data.root: {self.root} is not a folder; set data.root=<folder with one sub-folder per class>")
        class_dirs = sorted(p for p in self.root.iterdir() if p.is_dir() and not p.name.startswith("."))
        if len(class_dirs) < 2:
            raise DataError(f"data.root: {self.root} needs at least 2 class sub-folders (root/<class>/<image>), found {len(class_dirs)}")
        samples = [(path, label) for label, d in enumerate(class_dirs) for path in list_files(d)]
        return Discovered(class_names=[d.name for d in class_dirs], samples=samples)
