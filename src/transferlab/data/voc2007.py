"""Pascal VOC 2007 classification: which of 20 object classes each photo shows (data=voc2007, always multi-label).

data.root holds `VOCdevkit/VOC2007/` (or is `VOC2007/` itself): JPEGImages/, Annotations/<id>.xml and the official
lists ImageSets/Main/trainval.txt (5,011 photos) and test.txt (4,952; its annotations were published with the test
archive in 2007). test.txt is the test set, as the VOC benchmark reports it; trainval goes through the stable hash
split into training and validation photos (data.val_fraction), not VOC's own train/val lists, so every dataset of
the project selects the same way. Without test.txt (only the trainval archive) the hash split also draws the test
photos (data.test_fraction).

An image's labels are the classes with at least one object in it, `difficult` ones included: the object is there,
so training treats it as a positive. VOC's evaluation counts such a class as neither positive nor negative for that
image when all its objects there are difficult (the devkit's ground truth 0); `difficult_only` keeps those
(image, class) pairs and `ignore_mask` hands them to the metrics as 0, so mAP leaves them out exactly as the devkit's
classification AP does. An annotation that is missing or does not parse skips its photo (reported in
skipped_images.csv with the reason, never fatal): one bad XML file should not cost the other 9,962.
"""

from __future__ import annotations

import logging
import xml.etree.ElementTree as ET
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Optional

import numpy as np

from transferlab.core.errors import ConfigError, DataError
from transferlab.data.base import Discovered, ImageClassificationDataModule, Sample
from transferlab.data.download import download_file, safe_extract_tar

log = logging.getLogger(__name__)

CLASSES = (
    "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
    "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train", "tvmonitor",
)  # fmt: skip
# (archive, md5, the list it brings): the official archives, with the md5 sums torchvision's VOCDetection checks.
ARCHIVES = (
    ("VOCtrainval_06-Nov-2007.tar", "c52e279531787c972589f7e41ab4ae64", "trainval.txt"),
    ("VOCtest_06-Nov-2007.tar", "b6e924de25625d8de591ea690078ad9f", "test.txt"),
)


def parse_annotation(file: Path) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """(labels: classes with any object, difficult-only: classes whose every object in the photo is `difficult`).
    Raises OSError, ET.ParseError or ValueError (an unknown class name) for a file that cannot be used."""
    easy: dict[int, bool] = {}  # class -> has a non-difficult object
    for obj in ET.parse(file).getroot().iter("object"):  # Python's expat refuses entity expansion bombs
        name = (obj.findtext("name") or "").strip()
        if name not in CLASSES:
            raise ValueError(f"unknown class {name!r}; expected one of the 20 VOC classes")
        label = CLASSES.index(name)
        easy[label] = easy.get(label, False) or (obj.findtext("difficult") or "0").strip() != "1"
    return tuple(sorted(easy)), tuple(sorted(k for k, any_easy in easy.items() if not any_easy))


def read_ids(file: Path) -> list[str]:
    """The image ids of an ImageSets/Main list (first word of each line)."""
    return [line.split()[0] for line in file.read_text().splitlines() if line.strip()]


class Voc2007DataModule(ImageClassificationDataModule):
    layout = "VOCdevkit/VOC2007/ (JPEGImages/, Annotations/, ImageSets/Main/trainval.txt and test.txt)"

    def __init__(self, *, task: str, url: str, **kwargs: Any) -> None:
        """`task` (multilabel, the only choice), `url` (where the archives are) and the rest: conf/data/voc2007.yaml."""
        if task != "multilabel":
            raise ConfigError(
                f"data.task={task}: Pascal VOC 2007 photos hold several object classes each, so data=voc2007 is multi-label only; "
                "drop the override (data.task=multilabel)"
            )
        super().__init__(task=task, **kwargs)
        self.url = url
        self.difficult_only: dict[str, tuple[int, ...]] = {}  # resolved image path -> classes left out of its metrics

    def voc_dir(self) -> Optional[Path]:
        """The VOC2007 folder under data.root (the one holding ImageSets/Main/trainval.txt or test.txt), or None."""
        for candidate in (self.root / "VOCdevkit" / "VOC2007", self.root / "VOC2007", self.root):
            if any((candidate / "ImageSets" / "Main" / name).is_file() for _, _, name in ARCHIVES):
                return candidate
        return None

    def is_present(self) -> bool:
        """Both official lists; with data.download=false one is enough (the other part is then not fetched)."""
        found = self.voc_dir()
        lists = [found is not None and (found / "ImageSets" / "Main" / name).is_file() for _, _, name in ARCHIVES]
        return all(lists) or (any(lists) and not self.download_enabled)

    def download(self) -> None:
        """The archives whose list is missing (md5-checked, safely extracted into data.root: VOCdevkit/VOC2007/)."""
        found = self.voc_dir()
        try:
            for name, md5, listed in ARCHIVES:
                if found is not None and (found / "ImageSets" / "Main" / listed).is_file():
                    continue
                archive = download_file(f"{self.url.rstrip('/')}/{name}", self.root / name, md5=md5)
                safe_extract_tar(archive, self.root)
        except DataError as exc:
            raise DataError(
                f"data.root: no Pascal VOC 2007 at {self.root} and the download failed ({exc}); without network, set "
                f"data.root=<folder with VOCdevkit/VOC2007/>, or data.url=<a mirror>"
            ) from exc

    def discover(self) -> Discovered:
        found = self.voc_dir()
        if found is None:
            raise DataError(f"data.root: no Pascal VOC 2007 under {self.root}; expected {self.layout} (or data.download=true)")
        main = found / "ImageSets" / "Main"
        self.difficult_only = {}
        refused: dict[str, str] = {}
        lists = {name: self._annotated(found, read_ids(main / name), refused) for _, _, name in ARCHIVES if (main / name).is_file()}
        if refused:
            self.skipped.update(refused)
            log.warning(
                "Skipped %d photo(s) whose annotation cannot be used (nothing was deleted): %s%s",
                len(refused),
                "; ".join(f"{p}: {r}" for p, r in list(refused.items())[:3]),
                " ..." if len(refused) > 3 else "",
            )
        pool, test = lists.get("trainval.txt"), lists.get("test.txt")
        if pool is None:  # only the test archive: its photos are the pool of the hash split
            log.warning("data.root: %s has no trainval.txt: the test photos are split by hash (data.test_fraction)", main)
            pool, test = test, None
        elif test is None:
            log.warning(
                "data.root: %s has no test.txt (extract VOCtest_06-Nov-2007.tar for the official test set): the test photos come from the hash split",
                main,
            )
        return Discovered(class_names=list(CLASSES), samples=pool or [], test_samples=test)

    def _annotated(self, found: Path, ids: list[str], refused: dict[str, str]) -> list[Sample]:
        """(JPEGImages/<id>.jpg, labels) per listed id; a photo whose annotation cannot be used goes to `refused`."""
        samples: list[Sample] = []
        for image_id in ids:
            image, xml = found / "JPEGImages" / f"{image_id}.jpg", found / "Annotations" / f"{image_id}.xml"
            try:
                labels, difficult_only = parse_annotation(xml)
            except (OSError, ET.ParseError, ValueError) as exc:
                refused[str(image)] = f"annotation {xml.name}: {type(exc).__name__}: {exc}"
                continue
            samples.append((image, labels))
            if difficult_only:
                self.difficult_only[str(image.resolve())] = difficult_only
        return samples

    def split_key(self, path: Path) -> str:
        """The photo's id: the same split whether data.root is VOCdevkit's parent or VOC2007 itself."""
        return f"VOC2007/{Path(path).stem}"

    def ignore_mask(self, samples: Sequence[Sample]) -> Optional[np.ndarray]:
        """[N, 20]: 0 where the photo's only objects of that class are difficult (VOC's evaluation ignores the pair)."""
        mask = np.ones((len(samples), len(CLASSES)), dtype=np.int64)
        for row, (path, _) in enumerate(samples):
            for label in self.difficult_only.get(str(Path(path).resolve()), ()):
                mask[row, label] = 0
        return mask
