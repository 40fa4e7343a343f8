"""Oxford-IIIT Pet: 37 breeds (12 cats, 25 dogs). Official trainval/test lists when annotations/ exists,
otherwise labels from file names (`Abyssinian_101.jpg`: breed = name minus `_N`; cats are capitalised)."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Optional

from transferlab.core.errors import ConfigError, DataError, close_matches
from transferlab.data.base import Discovered, ImageClassificationDataModule, Sample
from transferlab.data.download import download_file, safe_extract_tar

_NUMBER_SUFFIX = re.compile(r"_\d+$")
SPECIES = ["cat", "dog"]


def breed_of(stem: str) -> str:
    return _NUMBER_SUFFIX.sub("", stem)


def species_of(breed: str) -> str:
    return "cat" if breed[:1].isupper() else "dog"


def display_name(breed: str) -> str:
    """'american_pit_bull_terrier' -> 'American Pit Bull Terrier' (torchvision's naming)."""
    return " ".join(part[:1].upper() + part[1:] for part in breed.split("_"))


# (url, md5): the official archives, with the checksums torchvision's OxfordIIITPet publishes for them.
RESOURCES = (
    ("https://www.robots.ox.ac.uk/~vgg/data/pets/data/images.tar.gz", "5c4f3ee8e5d25df40f4fd59a7f44e54c"),
    ("https://www.robots.ox.ac.uk/~vgg/data/pets/data/annotations.tar.gz", "95a8c909bbe2e81eed6a22bccdf3f68f"),
)


class OxfordPetsDataModule(ImageClassificationDataModule):
    resources = RESOURCES
    layout = "images/*.jpg (+ annotations/) or the photos themselves, named like Abyssinian_101.jpg"

    def __init__(self, *, task: str, **kwargs: Any) -> None:
        """`task` (breeds | species, checked here so that multilabel gets its own line) and the rest: conf/data/oxford_pets.yaml."""
        if task == "multilabel":
            raise ConfigError(
                "data.task=multilabel: Oxford-IIIT Pet has one animal (one breed) per photo; use data.task=breeds or species here, "
                "or data=image_index with a labels column for multi-label images"
            )
        if task not in ("breeds", "species"):
            raise ConfigError(f"data.task: expected one of breeds, species, got {task!r}{close_matches(str(task), ['breeds', 'species'])}")
        super().__init__(**kwargs, task="single")  # data.task names the pets' labelling (breeds | species): one class each
        self.task = task

    def _images_dir(self) -> Optional[Path]:
        for candidate in (self.root / "images", self.root / "oxford-iiit-pet" / "images", self.root):
            if candidate.is_dir() and any(candidate.glob("*.jpg")):
                return candidate
        return None

    def is_present(self) -> bool:
        return self._images_dir() is not None

    def download(self) -> None:
        """The two official archives (md5 as published with torchvision), checked, then safely extracted into root."""
        try:
            for url, md5 in self.resources:
                archive = download_file(url, self.root / Path(url).name, md5=md5)
                safe_extract_tar(archive, self.root)
        except DataError as exc:
            raise DataError(
                f"data.root: no Oxford-IIIT Pet images at {self.root} and the download failed ({exc}); "
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
