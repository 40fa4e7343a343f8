"""The datasets around the cache: augmented views of images going in, (features, label) pairs coming out, and
(features, label, teacher logits) triples of the same view for finetune=distill."""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from transferlab.data.features.store import FeatureStore

__all__ = ["DistillDataset", "FeatureDataset", "ViewsDataset"]


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


class DistillDataset(Dataset):
    """(student features, label, teacher logits) of one image and ONE view: with K cached views a random k each
    time, the same k on both sides, so the soft target is the teacher's answer to exactly the view the student sees."""

    def __init__(self, features: FeatureDataset, teacher: FeatureStore, keys: Sequence[str]) -> None:
        """`features`: the student's cached train split; `teacher`: the store of teacher logits, `keys` in its order."""
        self.features, self.teacher_rows, self.labels = features, teacher.rows(keys), features.labels
        self.rows = features.rows  # what code that reads a FeatureDataset's rows directly finds

    def __len__(self) -> int:
        return len(self.features)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, Any, torch.Tensor]:
        array, row = self.features.rows[index]
        value = array[row]
        teacher_array, teacher_row = self.teacher_rows[index]
        logits = teacher_array[teacher_row]
        if value.ndim == 2:  # [views, D] and [views, classes]: one view, the same on both sides
            if len(value) != len(logits):
                raise ValueError(f"{len(value)} cached student views but {len(logits)} teacher views of image {index}")
            view = int(torch.randint(len(value), ()))
            value, logits = value[view], logits[view]
        as_tensor = torch.from_numpy
        return as_tensor(np.array(value, dtype=np.float32)), self.labels[index], as_tensor(np.array(logits, dtype=np.float32))


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
