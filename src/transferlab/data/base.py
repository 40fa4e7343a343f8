"""What every image-classification dataset shares: integrity scan, the stable hash split, loaders.

A new dataset subclasses ImageClassificationDataModule and implements `discover()` (and `download()` if
it can fetch itself), and gets a conf/data/<name>.yaml that extends conf/data/_base.yaml; see image_folder.py
for the smallest example.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Optional, Union

import lightning.pytorch as pl
import numpy as np
import torch
from filelock import FileLock
from torch.utils.data import DataLoader, Dataset

from transferlab.core.errors import ConfigError, DataError
from transferlab.core.hardware import usable_cores
from transferlab.data.gpu_decode import DECODE_CHOICES, DeviceDecoding, EncodedImageDataset
from transferlab.data.images import ImageDataset, Sample, decode_all
from transferlab.data.integrity import scan_images
from transferlab.data.labels import Label, check_task, class_index, counts, target
from transferlab.data.loading import EpochLoaders
from transferlab.data.preprocessing import Preprocessing
from transferlab.data.sampling import (
    balanced_loss_weights,
)
from transferlab.data.shots import few_shot_train, parse_shots, refuse_folds
from transferlab.data.splits import drop_excluded, hash_split, require_training_images, split_key
from transferlab.data.stored_splits import build_table

log = logging.getLogger(__name__)


@dataclass
class Discovered:
    """What a dataset finds on disk: candidate files with labels, and an official test list if it has one."""

    class_names: list[str]
    samples: list[Sample]
    test_samples: Optional[list[Sample]] = None


class ImageClassificationDataModule(EpochLoaders, DeviceDecoding, pl.LightningDataModule):
    """Base class. `preprocessing` (from the backbone) must be set before setup(). EpochLoaders: the DataLoaders;
    DeviceDecoding: data.decode=gpu."""

    layout = "a folder with the images"  # what data.root must hold, for error messages

    def __init__(
        self,
        *,
        root: str,
        val_fraction: float,
        test_fraction: float,
        split_seed: int,
        shots: Union[int, Literal["all"], None],
        shots_seed: int,
        batch_size: int,
        num_workers: Union[int, str],
        pin_memory: Union[bool, str],
        prefetch_factor: Optional[int],
        image_cache: bool,
        augment: Optional[Mapping[str, Any]],
        verify_images: bool,
        cache_dir: Optional[str],
        download: bool,
        class_weights: str,
        sampler: str,
        exclude: Optional[str],
        decode: Literal["cpu", "gpu"],
        task: str,
    ) -> None:
        """Every value comes from the dataset's YAML (conf/data/_base.yaml and the option extending it); `task`:
        single (one class per image) or multilabel (a set of labels per image: data.labels); `shots`: K training
        images per class drawn with `shots_seed`, or all / null (data.shots)."""
        super().__init__()
        self.multilabel = check_task(task)
        if self.multilabel and sampler == "balanced":
            raise ConfigError(
                "data.sampler=balanced: draws classes equally often, which a multi-label image (several labels) cannot be; "
                "use data.class_weights=balanced (a pos_weight per label in the loss) with data.task=multilabel"
            )
        for key, value in (("val_fraction", val_fraction), ("test_fraction", test_fraction)):
            if not isinstance(value, (int, float)) or not 0 <= value < 1 or val_fraction + test_fraction >= 1:
                raise ConfigError(
                    f"data.{key}: expected a fraction in [0, 1) with data.val_fraction + data.test_fraction < 1, "
                    f"got {value!r} (val {val_fraction!r} + test {test_fraction!r})"
                )
        checks = (
            ("class_weights", class_weights, ("none", "balanced")),
            ("sampler", sampler, ("random", "balanced")),
            ("decode", decode, DECODE_CHOICES),
        )
        for key, choice, choices in checks:
            if choice not in choices:
                raise ConfigError(f"data.{key}: expected {' or '.join(choices)}, got {choice!r}")
        self.class_weights, self.sampler, self.exclude, self.decode = class_weights, sampler, exclude, decode
        self.root = Path(str(root)).expanduser()
        self.val_fraction, self.test_fraction, self.split_seed = val_fraction, test_fraction, split_seed
        self.shots, self.shots_seed = parse_shots(shots), shots_seed  # shots: K or None (every training image)
        if num_workers != "auto" and (not isinstance(num_workers, int) or num_workers < 0):
            raise DataError(f"data.num_workers: expected auto or a whole number >= 0, got {num_workers!r}")
        self.batch_size, self.num_workers, self.pin_memory = batch_size, num_workers, pin_memory
        self.prefetch_factor, self.image_cache = prefetch_factor, image_cache
        self.feature_sets: dict[str, Dataset] = {}  # split -> cached (features, label) pairs (frozen backbone)
        self._decoded: dict[str, list[torch.Tensor]] = {}
        self.augment = dict(augment or {})
        self.verify_images, self.cache_dir, self.download_enabled = verify_images, cache_dir, download
        self.preprocessing: Optional[Preprocessing] = None
        self.class_names: list[str] = []
        self.skipped: dict[str, str] = {}
        self.splits: dict[str, list[Sample]] = {}
        self._pool: list[Sample] = []  # every usable image outside the official test list (what cv.folds splits)
        self.usable: list[Sample] = []  # every usable image, official test list included

    # -- what a dataset implements -------------------------------------------------------------------
    def discover(self) -> Discovered:
        raise NotImplementedError

    def is_present(self) -> bool:
        """True when root already holds the data (so nothing needs downloading)."""
        return self.root.is_dir() and any(self.root.iterdir())

    def download(self) -> None:
        raise DataError(f"data.root: {self.root} does not exist; point data.root at a folder with the images")

    # -- shared machinery ----------------------------------------------------------------------------
    def prepare_data(self) -> None:
        if self.is_present():
            return
        if not self.download_enabled:
            found = "an empty folder" if self.root.is_dir() else "a file" if self.root.exists() else "no such folder"
            fetch = " or data.download=true" if type(self).download is not ImageClassificationDataModule.download else ""
            raise DataError(f"data.root: no dataset found at {self.root} ({found}); expected {self.layout}; set data.root=<that folder>{fetch}")
        self.root.mkdir(parents=True, exist_ok=True)
        with FileLock(str(self.root) + ".lock"):  # several processes (DDP, sweeps) may start at once
            if not self.is_present():
                self.download()

    def setup(self, stage: Optional[str] = None) -> None:
        """Find, check and split the images once; a failed setup leaves no splits behind, so a retry starts over."""
        if self.splits:
            return
        self.prepare_data()
        found = self.discover()
        if self.exclude:  # before the integrity scan: an excluded file is neither checked nor reported
            found.samples, test = drop_excluded(self.exclude, self.root, found.samples, found.test_samples or [])
            found.test_samples = test if found.test_samples is not None else None
        pool = self._usable(found.samples)
        official_test = self._usable(found.test_samples) if found.test_samples is not None else None
        if not pool:
            raise DataError(
                f"data.root: none of the {len(found.samples)} file(s) under {self.root} is a usable image "
                f"(each is listed with its reason above); expected {self.layout}"
            )
        test_fraction = 0.0 if official_test is not None else self.test_fraction
        splits = hash_split(pool, self.split_key, self.val_fraction, test_fraction, self.split_seed)  # labels.members: per label
        require_training_images(found.class_names, found.samples, pool, splits["train"], self.root)
        self.class_names, self._pool = found.class_names, pool
        self.usable = pool + (official_test or [])
        self.has_official_test = official_test is not None
        if official_test is not None:
            splits["test"] = official_test
        if self.shots is not None:  # the training split only: val and test stay the hash split's (data.shots)
            splits["train"] = few_shot_train(splits, self.shots, self.shots_seed, self.split_key, self.class_names, self.multilabel)
        self.use_splits(splits)

    @property
    def pool(self) -> list[Sample]:
        """Every usable image outside the official test list: what cv.folds splits, so refused with data.shots."""
        refuse_folds(self.shots)
        return self._pool

    def split_key(self, path: Path) -> str:
        """What an image's split is hashed from: its path relative to data.root (a dataset may name its images otherwise)."""
        return split_key(path, self.root)

    def split_table(self) -> dict[str, Any]:
        """The current train / val / test files with their sizes and sha256 (data.stored_splits: OUT/splits.csv)."""
        return build_table(self.root, self.splits, self.cache_dir)

    def use_splits(self, splits: dict[str, list[Sample]], announce: bool = True) -> None:
        """Train / val / test lists (the split, a cross-validation fold, a refit); say what they hold."""
        self.splits = splits
        self.feature_sets.clear()
        self._decoded.clear()
        if not announce:
            return
        kind = "labels (multi-label)" if self.multilabel else "classes"
        log.info("Data: %s %s; %s", len(self.class_names), kind, ", ".join(f"{k} {len(v)}" for k, v in splits.items()))
        found = counts([label for _, label in splits["train"]], len(self.class_names))
        ratio = found.max() / max(found.min(), 1)
        shown = ", ".join(f"{name} {n}" for name, n in zip(self.class_names, found.tolist()))
        log.info("Training images per %s: %s", kind[:5], shown if len(self.class_names) <= 12 else f"{found.min()} to {found.max()}")
        if self.multilabel:
            unlabelled = {split: sum(1 for _, label in samples if not label) for split, samples in splits.items()}
            if any(unlabelled.values()):
                log.info(
                    "Images with none of the labels (kept: they are negatives for every label): %s",
                    ", ".join(f"{k} {n}" for k, n in unlabelled.items()),
                )
            return
        if ratio > 1.5 and self.class_weights == "none" and self.sampler == "random":
            log.warning(
                "Class imbalance: the largest class has %.1fx the images of the smallest; accuracy favours the large "
                "classes (watch balanced_acc), or set data.class_weights=balanced or data.sampler=balanced",
                ratio,
            )

    def loss_weights(self) -> Optional[list[float]]:
        """Per-class weights for the training loss (data.class_weights=balanced), from the training split."""
        if self.class_weights != "balanced":
            return None
        if self.multilabel:  # BCE's pos_weight: each label's negatives / positives among the training images
            positives = counts([label for _, label in self.splits["train"]], len(self.class_names)).astype(float)
            return [float((len(self.splits["train"]) - p) / p) if p else 1.0 for p in positives]
        return balanced_loss_weights([class_index(label) for _, label in self.splits["train"]], len(self.class_names))

    def _usable(self, samples: list[Sample]) -> list[Sample]:
        if not samples:
            raise DataError(f"data.root: no files found under {self.root}; expected {self.layout}")
        if not self.verify_images:
            return samples
        report = scan_images([p for p, _ in samples], self.root, self.cache_dir)
        if report.bad:
            self.skipped.update(report.bad)
            log.warning(
                "Skipped %d unusable file(s) under %s (nothing was deleted): %s",
                len(report.bad),
                self.root,
                "; ".join(f"{p}: {r}" for p, r in list(report.bad.items())[:5]) + (" ..." if len(report.bad) > 5 else ""),
            )
        good = {str(p) for p in report.good}
        return [s for s in samples if str(s[0]) in good]

    # -- loaders -------------------------------------------------------------------------------------
    def samples_dataset(self, samples: Sequence[Sample], train: bool = False) -> ImageDataset:
        """Training (augmented) or evaluation images of any (path, label) list, decoded at the size they need."""
        if self.preprocessing is None:
            raise RuntimeError("datamodule.preprocessing must be set (from the backbone) before loaders are built")
        augment = self.augment if train else None
        transform = self.preprocessing.train_transform(augment) if train else self.preprocessing.eval_transform()
        return ImageDataset(samples, transform, self.preprocessing.decode_size(augment), num_labels=self.num_labels)

    @property
    def num_labels(self) -> Optional[int]:
        """K for a multi-label task (loaders yield multi-hot vectors), None for a single-label one (class indices)."""
        return len(self.class_names) if self.multilabel else None

    def target(self, label: Label) -> Any:
        """What a loader yields for `label` (data.labels.target)."""
        return target(label, self.num_labels)

    def ignore_mask(self, samples: Sequence[Sample]) -> Optional[np.ndarray]:
        """[N, K] 1 = counted, 0 = left out of the metrics for that label (Pascal VOC's `difficult`), or None."""
        return None

    def image_dataset(self, split: str, train: bool = False) -> ImageDataset:
        dataset = self.samples_dataset(self.splits[split], train)
        if self.image_cache:
            cache_key = f"{split}:{dataset.min_short_side}"
            if cache_key not in self._decoded:
                self._decoded[cache_key] = decode_all(dataset, usable_cores())
                log.info("Image cache: %d %s images decoded at %d px short side", len(dataset), split, dataset.min_short_side)
            dataset.decoded = self._decoded[cache_key]
        return dataset

    def image_loader(self, split: str) -> DataLoader:
        """Images even when features are cached (adversarial evaluation needs pixels)."""
        return self.loader(self.image_dataset(split), train=False)

    def _split_loader(self, split: str, train: bool) -> DataLoader:
        if split in self.feature_sets:  # features come from memory / a memory map: no worker processes needed
            return self.loader(self.feature_sets[split], train, workers=0)
        images = self.image_dataset(split, train)  # data.decode=gpu: workers read bytes, on_after_batch_transfer decodes
        return self.loader(EncodedImageDataset(images, train) if self.decode == "gpu" else images, train)

    def train_dataloader(self) -> DataLoader:
        return self._split_loader("train", train=True)

    def val_dataloader(self) -> DataLoader:
        return self._split_loader("val", train=False)

    def test_dataloader(self) -> DataLoader:
        return self._split_loader("test", train=False)
