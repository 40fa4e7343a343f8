"""Microsoft's Cats-vs-Dogs: PetImages/Cat and PetImages/Dog, downloaded as one zip."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

from transferlab.core.errors import DataError
from transferlab.data.base import Discovered, ImageClassificationDataModule
from transferlab.data.download import download_file, safe_extract_zip
from transferlab.data.images import Sample, list_files

CLASS_DIRS = ("Cat", "Dog")


class CatsDogsDataModule(ImageClassificationDataModule):
    layout = "PetImages/Cat and PetImages/Dog"

    def __init__(self, *, url: str, sha256: Optional[str], **kwargs: Any) -> None:
        """`url`, `sha256` and the rest: conf/data/cats_dogs.yaml."""
        super().__init__(**kwargs)
        self.url, self.sha256 = url, sha256

    def _pet_images(self) -> Optional[Path]:
        for candidate in (self.root / "PetImages", self.root):
            if all((candidate / name).is_dir() for name in CLASS_DIRS):
                return candidate
        return None

    def is_present(self) -> bool:
        return self._pet_images() is not None

    def download(self) -> None:
        archive = download_file(self.url, self.root / Path(self.url).name, self.sha256)
        safe_extract_zip(archive, self.root)
        if self._pet_images() is None:
            raise DataError(f"data.url: {self.url} did not contain PetImages/Cat and PetImages/Dog")

    def discover(self) -> Discovered:
        pet_images = self._pet_images()
        if pet_images is None:
            raise DataError(f"data.root: {self.root} has no PetImages/Cat and PetImages/Dog; set data.root or data.download=true")
        samples: list[Sample] = [(p, label) for label, name in enumerate(CLASS_DIRS) for p in list_files(pet_images / name)]
        return Discovered(class_names=[name.lower() for name in CLASS_DIRS], samples=samples)
