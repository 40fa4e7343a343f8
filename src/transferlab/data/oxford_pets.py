"""Oxford-IIIT Pet: 37 breeds (12 cats, 25 dogs). Official trainval/test lists when annotations/ exists,
otherwise labels from file names (`Abyssinian_101.jpg`: breed = name minus `_N`; cats are capitalised)."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Literal, Optional

from transferlab.data.base import Discovered, ImageClassificationDataModule, Sample
from transferlab.errors import DataError

_NUMBER_SUFFIX = re.compile(r"_\d+$")
SPECIES = ["cat", "dog"]


def breed_of(stem: str) -> str:
    return _NUMBER_SUFFIX.sub("", stem)


def species_of(breed: str) -> str:
    return "cat" if breed[:1].isupper() else "dog"


def display_name(breed: str) -> str:
    """'american_pit_bull_terrier' -> 'American Pit Bull Terrier' (torchvision's naming)."""
    return " ".join(part[:1].upper() + part[1:] for part in breed.split("_"))


class OxfordPetsDataModule(ImageClassificationDataModule):
    def __init__(self, root: str, task: Literal["breeds", "species"] = "breeds", download: bool = True, **kwargs) -> None:
        if task not in ("breeds", "species"):
            raise DataError(f"data.task: expected breeds or species, got {task!r}")
        super().__init__(root=root, download=download, **kwargs)
        self.task = task

    def _images_dir(self) -> Optional[Path]:
        for candidate in (self.root / "images", self.root / "oxford-iiit-pet" / "images", self.root):
            if candidate.is_dir() and any(candidate.glob("*.jpg")):
                return candidate
        return None

    def is_present(self) -> bool:
        return self._images_dir() is not None

    def download(self) -> None:
        from torchvision.datasets import OxfordIIITPet

        try:
            OxfordIIITPet(root=str(self.root), download=True)
        except Exception as exc:  # noqa: BLE001 - network errors come in many types
            raise DataError(
                f"data.root: no Oxford-IIIT Pet images at {self.root} and the download failed ({type(exc).__name__}: {exc}); "
                f"without network, set data.root=<folder with images/ or the photos themselves>"
            ) from exc

    def discover(self) -> Discovered:
        images = self._images_dir()
        if images is None:
            raise DataError(f"data.root: no Oxford-IIIT Pet images (*.jpg) under {self.root}; set data.root=<folder with images/>")
        files = sorted(p for p in images.iterdir() if p.suffix.lower() == ".jpg" and not p.name.startswith("."))
        breeds = sorted({breed_of(p.stem) for p in files}, key=str.lower)
        if self.task == "breeds":
            class_names = [display_name(b) for b in breeds]
            label_of = {b: i for i, b in enumerate(breeds)}
        else:
            class_names = SPECIES
            label_of = {b: SPECIES.index(species_of(b)) for b in breeds}

        def labelled(paths: list[Path]) -> list[Sample]:
            return [(p, label_of[breed_of(p.stem)]) for p in paths]

        annotations = images.parent / "annotations"
        if (annotations / "trainval.txt").is_file() and (annotations / "test.txt").is_file():
            by_stem = {p.stem: p for p in files}

            def listed(name: str) -> list[Path]:
                stems = [line.split()[0] for line in (annotations / name).read_text().splitlines() if line.strip() and not line.startswith("#")]
                missing = [s for s in stems if s not in by_stem]
                if missing:
                    raise DataError(f"{annotations / name}: {len(missing)} listed image(s) missing from {images}, e.g. {missing[0]}.jpg")
                return [by_stem[s] for s in stems]

            return Discovered(class_names, labelled(listed("trainval.txt")), labelled(listed("test.txt")))
        return Discovered(class_names, labelled(files))
