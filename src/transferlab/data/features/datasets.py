"""The two datasets around the cache: augmented views of images going in, (features, label) pairs coming out."""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from transferlab.data.features.store import FeatureStore

__all__ = ["FeatureDataset", "ViewsDataset"]


class FeatureDataset(Dataset):
    """(features, label) pairs read from a store; with several cached views, a random one each time.

    `rows` ([(memory-mapped array, row)] in key order) and `labels` are read by training code directly."""

    def __init__(self, store: FeatureStore, keys: Sequence[str], labels: Sequence[Any]) -> None:
        self.rows = store.rows(keys)
        self.labels = list(labels)

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, Any]:
        array, row = self.rows[index]
        value = array[row]
        if value.ndim == 2:  # [views, D]
            value = value[int(torch.randint(len(value), ()))]
        return torch.from_numpy(np.array(value, dtype=np.float32)), self.labels[index]


class ViewsDataset(Dataset):
    """`views` transformed copies of each image, the k-th always drawn with the same seed (cacheable)."""

    def __init__(self, dataset: Any, keys: Sequence[str], views: int, seed: int) -> None:
        """`dataset`: a map-style dataset of (image, label), e.g. data.images.ImageDataset."""
        self.dataset, self.keys, self.views, self.seed = dataset, list(keys), views, seed

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        images = []
        for view in range(self.views):
            view_seed = int(hashlib.sha256(f"{self.seed}|{self.keys[index]}|{view}".encode()).hexdigest()[:15], 16)
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(view_seed)
                image, label = self.dataset[index]
            images.append(image)
        return torch.stack(images), label
