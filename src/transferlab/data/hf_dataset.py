"""A Hugging Face `datasets` image-classification dataset: a hub name, a `save_to_disk` folder, or an image folder.

The images are written once, as the bytes the dataset holds (no re-encoding), to a folder under the cache keyed
by the dataset's fingerprint; from there everything works as for any other dataset: the integrity scan reports
undecodable images (nothing is deleted), the feature cache, the audit, predictions with file paths. Rows whose
image is a file on disk already (the `imagefolder` builder, local paths) are used where they are. The dataset's
own `test` split is the official test list when it has one; `train` (and `validation`) form the pool that the
stable split and cross-validation use. An image's split is hashed from `<class>/<its original file name>` (the
row index when it has none), as an image folder's `<class>/<file>`: the same photos get the same split whether they
come as a folder or as a dataset, and a new version of the dataset (a new fingerprint) moves none of the old ones.

With data.task=multilabel the label column is a sequence per image: `Sequence(ClassLabel(...))` (the ClassLabel's
names are the labels) or a sequence of strings (the names found, sorted); an empty sequence is an image with none of
the labels. A plain class-label column is allowed too (each image a set of one). A sequence column with
data.task=single stops with one line: reading only one of an image's labels would drop the rest silently.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path
from typing import Any, Optional

from filelock import FileLock

from transferlab.core.errors import ConfigError, DataError, require_packages
from transferlab.core.files import write_json
from transferlab.data.base import Discovered, ImageClassificationDataModule, Sample
from transferlab.data.labels import Label

log = logging.getLogger(__name__)

TEST_SPLITS, POOL_SPLITS = ("test",), ("train", "validation", "valid", "val")
SEQUENCES = ("Sequence", "List", "LargeList")  # datasets' list features (Sequence is List since datasets 4)


def item_feature(feature: Any) -> Optional[Any]:
    """The feature of a sequence column's items (`Sequence(ClassLabel(...))` -> the ClassLabel), None for a plain column."""
    if isinstance(feature, (list, tuple)):
        return feature[0] if feature else None
    return feature.feature if type(feature).__name__ in SEQUENCES else None


class HfDatasetDataModule(ImageClassificationDataModule):
    layout = "a Hugging Face dataset with an image column and a class-label column"

    def __init__(self, *, path: str, name: Optional[str], image_column: str, label_column: str, **kwargs: Any) -> None:
        """`path`, `name`, the columns and the rest: conf/data/hf_dataset.yaml (`root` = where its images are written)."""
        super().__init__(**kwargs)
        self.path, self.name, self.image_column, self.label_column = str(path), name, image_column, label_column
        self.keys: dict[str, str] = {}  # image file -> what its split is hashed from

    def is_present(self) -> bool:
        return True  # datasets fetches (or fails) in discover(); root is only the image store

    def _load(self) -> Any:
        require_packages("data=hf_dataset", "hf", "datasets")
        import datasets

        local = Path(self.path).expanduser()
        try:
            if local.is_dir() and any((local / f).is_file() for f in ("dataset_dict.json", "dataset_info.json", "state.json")):
                loaded = datasets.load_from_disk(str(local))
            elif local.is_dir():
                loaded = datasets.load_dataset("imagefolder", data_dir=str(local))
            else:
                loaded = datasets.load_dataset(self.path, self.name)
        except FileNotFoundError as exc:
            raise DataError(f"data.path: {self.path} is neither a dataset folder nor a dataset on the hub ({exc})") from None
        except ConnectionError as exc:
            raise DataError(f"data.path: {self.path} could not be fetched from the hub ({exc}); give a local folder (save_to_disk) instead") from None
        return loaded if isinstance(loaded, datasets.DatasetDict) else datasets.DatasetDict({"train": loaded})

    def _class_names(self, split: Any) -> list[str]:
        if self.image_column not in split.column_names or self.label_column not in split.column_names:
            raise DataError(
                f"data.image_column / data.label_column: {self.path} has the columns {', '.join(split.column_names)}, "
                f"not {self.image_column!r} and {self.label_column!r}; set them, e.g. data.label_column=labels"
            )
        feature = split.features[self.label_column]
        inner = item_feature(feature)
        if inner is not None and not self.multilabel:
            raise ConfigError(
                f"data.label_column: {self.label_column!r} of {self.path} holds a list of labels per image (a multi-label dataset); "
                f"set data.task=multilabel"
            )
        names = getattr(inner if inner is not None else feature, "names", None)
        if names:
            return list(names)
        values = split[self.label_column]
        return sorted({str(v) for row in values for v in (row or [])} if inner is not None else {str(v) for v in values if v is not None})

    def discover(self) -> Discovered:
        import datasets

        found = self._load()
        known = [s for s in found if s in TEST_SPLITS + POOL_SPLITS] or list(found)[:1]
        class_names = self._class_names(found[known[0]])
        fingerprint = hashlib.sha256(json.dumps([self.path, self.name, [found[s]._fingerprint for s in known]]).encode()).hexdigest()[:16]
        store = self.root / f"{Path(self.path).name or 'dataset'}-{fingerprint}"
        samples: dict[str, list[Sample]] = {}
        with FileLock(str(store) + ".lock"):
            done = store / "samples.json"
            if done.is_file():
                stored = json.loads(done.read_text())
                samples = {k: [(Path(p), self._stored_label(y)) for p, y, *_ in v] for k, v in stored.items()}
                self.keys = {str(p): rest[0] for v in stored.values() for p, _, *rest in v if rest}  # stores before keys: none
            else:
                for split in known:
                    rows = found[split].cast_column(self.image_column, datasets.Image(decode=False))
                    samples[split] = self._write(rows, store / split, class_names)
                write_json(done, {k: [[str(p), list(y) if isinstance(y, tuple) else y, self.keys[str(p)]] for p, y in v] for k, v in samples.items()})
        test = [s for split in TEST_SPLITS if split in samples for s in samples[split]] or None
        pool = [s for split in known if split not in TEST_SPLITS for s in samples[split]]
        if not pool and test:  # only a test split: it becomes the pool of the stratified split
            pool, test = test, None
        log.info("data.path %s: splits %s, %d classes, images in %s", self.path, {k: len(v) for k, v in samples.items()}, len(class_names), store)
        return Discovered(class_names=class_names, samples=pool, test_samples=test)

    def _write(self, rows: Any, folder: Path, class_names: list[str]) -> list[Sample]:
        """Each row's image as a file (its own bytes), or its existing file; labels as indices into class_names."""
        folder.mkdir(parents=True, exist_ok=True)
        index = {name: i for i, name in enumerate(class_names)}
        found: list[Sample] = []
        feature = rows.features[self.label_column]
        inner = item_feature(feature)
        by_name = not getattr(inner if inner is not None else feature, "names", None)  # strings, not ClassLabel indices
        for i, row in enumerate(rows):
            image, value = row[self.image_column] or {}, row[self.label_column]
            if value is None or (isinstance(value, int) and value < 0):  # unlabelled rows (ClassLabel -1): nothing to learn
                continue
            values = list(value) if inner is not None else [value]
            found_labels = sorted({index[str(v)] if by_name else int(v) for v in values if v is not None and not (isinstance(v, int) and v < 0)})
            label: Label = tuple(found_labels) if self.multilabel else found_labels[0]
            source = Path(image["path"]) if image.get("path") else None
            first = f"{class_names[found_labels[0]]}/" if found_labels else ""  # as image_folder names it: the first label's folder
            key = f"{first}{source.name if source else f'{i:07d}'}"
            if image.get("bytes") is None and source is not None and source.is_file():
                found.append((source, label))
                self.keys[str(source)] = key
                continue
            file = folder / f"{i:07d}{source.suffix if source and source.suffix else '.img'}"
            file.write_bytes(image.get("bytes") or b"")  # an empty image stays an (empty) file: the scan reports it
            found.append((file, label))
            self.keys[str(file)] = key
        return found

    def _stored_label(self, value: Any) -> Label:
        """A label from samples.json (a class index, or a list: a label set), as data.task reads it."""
        labels = tuple(int(v) for v in value) if isinstance(value, list) else (int(value),)
        return labels if self.multilabel else labels[0]  # single: a plain column (a sequence one was refused), a set of one

    def split_key(self, path: Path) -> str:
        return self.keys.get(str(path)) or super().split_key(path)
