"""What every image-classification dataset shares: integrity scan, stratified split, loaders.

A new dataset subclasses ImageClassificationDataModule and implements `discover()` (and `download()` if
it can fetch itself); see image_folder.py for the smallest example.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Union

import lightning.pytorch as pl
import numpy as np
import torch
from filelock import FileLock
from torch.utils.data import DataLoader, Dataset

from transferlab.data.images import load_rgb
from transferlab.data.integrity import scan_images
from transferlab.data.preprocessing import Preprocessing
from transferlab.errors import DataError

log = logging.getLogger(__name__)

Sample = tuple[Path, int]


@dataclass
class Discovered:
    """What a dataset finds on disk: candidate files with labels, and an official test list if it has one."""

    class_names: list[str]
    samples: list[Sample]
    test_samples: Optional[list[Sample]] = None


class ImageDataset(Dataset):
    def __init__(self, samples: Sequence[Sample], transform: Any) -> None:
        self.samples = list(samples)
        self.transform = transform

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        path, label = self.samples[index]
        try:
            image = load_rgb(path)
        except Exception as exc:
            raise DataError(f"{path}: cannot be read any more ({exc}); it passed the integrity scan, so it changed during the run") from exc
        return self.transform(image), label


def stratified_split(labels: Sequence[int], val_fraction: float, test_fraction: float, seed: int) -> tuple[list[int], list[int], list[int]]:
    """Per class, shuffle with `seed` and cut off val/test shares (at least one each when the class has 3+)."""
    rng = np.random.default_rng(seed)
    labels_arr = np.asarray(labels)
    train, val, test = [], [], []
    for label in np.unique(labels_arr):
        idx = rng.permutation(np.flatnonzero(labels_arr == label)).tolist()
        n = len(idx)
        n_test = int(math.floor(n * test_fraction + 0.5))
        n_val = int(math.floor(n * val_fraction + 0.5))
        if n >= 3:
            n_test = max(n_test, 1 if test_fraction > 0 else 0)
            n_val = max(n_val, 1 if val_fraction > 0 else 0)
        n_test, n_val = min(n_test, max(n - 1, 0)), min(n_val, max(n - 1 - n_test, 0))
        test += idx[:n_test]
        val += idx[n_test : n_test + n_val]
        train += idx[n_test + n_val :]
    return sorted(train), sorted(val), sorted(test)


class ImageClassificationDataModule(pl.LightningDataModule):
    """Base class. `preprocessing` (from the backbone) must be set before setup()."""

    def __init__(
        self,
        root: str,
        val_fraction: float = 0.15,
        test_fraction: float = 0.15,
        split_seed: int = 42,
        batch_size: int = 32,
        num_workers: int = 2,
        pin_memory: Union[bool, str] = "auto",
        augment: Optional[Mapping[str, Any]] = None,
        verify_images: bool = True,
        cache_dir: Optional[str] = None,
        download: bool = False,
    ) -> None:
        super().__init__()
        if not 0 <= val_fraction < 1 or not 0 <= test_fraction < 1 or val_fraction + test_fraction >= 1:
            raise DataError(f"data.val_fraction={val_fraction}, data.test_fraction={test_fraction}: each must be in [0, 1) and their sum < 1")
        self.root = Path(str(root)).expanduser()
        self.val_fraction, self.test_fraction, self.split_seed = val_fraction, test_fraction, split_seed
        self.batch_size, self.num_workers, self.pin_memory = batch_size, num_workers, pin_memory
        self.augment = dict(augment or {})
        self.verify_images, self.cache_dir, self.download_enabled = verify_images, cache_dir, download
        self.preprocessing: Optional[Preprocessing] = None
        self.class_names: list[str] = []
        self.skipped: dict[str, str] = {}
        self.splits: dict[str, list[Sample]] = {}

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
            raise DataError(f"data.root: no dataset found at {self.root}; set data.root=<folder with the images> or data.download=true")
        self.root.mkdir(parents=True, exist_ok=True)
        with FileLock(str(self.root) + ".lock"):  # several processes (DDP, sweeps) may start at once
            if not self.is_present():
                self.download()

    def setup(self, stage: Optional[str] = None) -> None:
        if self.splits:
            return
        self.prepare_data()
        found = self.discover()
        self.class_names = found.class_names
        pool = self._usable(found.samples)
        official_test = self._usable(found.test_samples) if found.test_samples is not None else None
        test_fraction = 0.0 if official_test is not None else self.test_fraction
        train_i, val_i, test_i = stratified_split([s[1] for s in pool], self.val_fraction, test_fraction, self.split_seed)
        self.splits = {
            "train": [pool[i] for i in train_i],
            "val": [pool[i] for i in val_i],
            "test": official_test if official_test is not None else [pool[i] for i in test_i],
        }
        present = {label for _, label in self.splits["train"]}
        empty = [name for i, name in enumerate(self.class_names) if i not in present]
        if empty:
            raise DataError(f"data.root: class(es) with no usable training images under {self.root}: {', '.join(empty[:5])}")
        log.info("Data: %s classes; %s", len(self.class_names), ", ".join(f"{k} {len(v)}" for k, v in self.splits.items()))

    def _usable(self, samples: list[Sample]) -> list[Sample]:
        if not samples:
            raise DataError(f"data.root: no images found under {self.root}")
        if not self.verify_images:
            return samples
        report = scan_images([p for p, _ in samples], self.root, self.cache_dir)
        if report.bad:
            self.skipped.update(report.bad)
            log.warning("Skipped %d unusable file(s) under %s (nothing was deleted): %s", len(report.bad), self.root,
                        "; ".join(f"{p}: {r}" for p, r in list(report.bad.items())[:5]) + (" ..." if len(report.bad) > 5 else ""))
        good = {str(p) for p in report.good}
        return [s for s in samples if str(s[0]) in good]

    def _loader(self, split: str, train: bool) -> DataLoader:
        if self.preprocessing is None:
            raise RuntimeError("datamodule.preprocessing must be set (from the backbone) before loaders are built")
        transform = self.preprocessing.train_transform(self.augment) if train else self.preprocessing.eval_transform()
        pin = torch.cuda.is_available() if self.pin_memory == "auto" else bool(self.pin_memory)
        dataset = ImageDataset(self.splits[split], transform)
        sampler = None
        if not train and torch.distributed.is_available() and torch.distributed.is_initialized():
            # Each image evaluated exactly once across ranks (Lightning's default sampler pads with repeats).
            from lightning.pytorch.overrides.distributed import UnrepeatedDistributedSampler

            sampler = UnrepeatedDistributedSampler(dataset, shuffle=False)
        return DataLoader(
            dataset,
            batch_size=self.batch_size,
            shuffle=train,
            sampler=sampler,
            num_workers=self.num_workers,
            pin_memory=pin,
            persistent_workers=self.num_workers > 0,
            drop_last=False,
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", train=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader("val", train=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader("test", train=False)
