"""Pooled backbone features of images, computed once and reused by every frozen-backbone run that can.

A store holds the features of one *fingerprint*: backbone name, a hash of its weights, the transform that
made its inputs (eval transform, or the augmentation pipeline + number of views + seed) and the precision.
Any change of those gives another fingerprint, hence another store. Inside a store, rows are found by image
key (resolved path, size, modification time), so a changed or added file is computed again and nothing else.

On disk a store is a folder of shards under `<cache_dir>/features/<fingerprint>/`: `<name>.npy` (float32,
[N, D] or [N, views, D], read memory-mapped) and `<name>.json` (its image keys), each written to a temporary
file and renamed, the key list last; several processes (DDP ranks, sweep jobs) can fill a store at once.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any, ContextManager, Optional

import numpy as np
import torch
from torch import nn
from torch.utils.data import Dataset

from transferlab.core.progress import progress

log = logging.getLogger(__name__)

FORMAT_VERSION = 1


def image_key(path: str | os.PathLike) -> str:
    """Identity of an image file as the integrity scan sees it: path, size and modification time."""
    resolved = Path(path).resolve()
    stat = resolved.stat()
    return f"{resolved}|{stat.st_size}|{stat.st_mtime_ns}"


def weights_digest(module: nn.Module) -> str:
    """sha256 over every parameter and buffer (names, shapes, dtypes, bytes): changes when any weight does."""
    digest = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        value = tensor.detach().cpu().contiguous()
        digest.update(f"{name}:{tuple(value.shape)}:{value.dtype}".encode())
        digest.update(value.reshape(-1).view(torch.uint8).numpy().tobytes() if value.numel() else b"")
    return digest.hexdigest()


def fingerprint(**parts: Any) -> str:
    text = json.dumps({"format": FORMAT_VERSION, **parts}, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:24]


def describe(backbone: Any, transform: Any, decode_size: int, precision: str, views: int, seed: Optional[int], digest: str) -> dict[str, Any]:
    """What makes features differ (the fingerprint's parts): the same for a training run and an audit of one data set."""
    return {
        "backbone": backbone.name,
        "source": backbone.source,
        "weights_sha256": digest,
        "transform": repr(transform),
        "decode_size": decode_size,
        "precision": precision,
        "views": views,
        "seed": seed if views else None,
    }


class FeatureStore:
    """Rows of features by image key, in memory (root=None) or in memory-mapped shards under root/fingerprint."""

    def __init__(self, root: Optional[Path], key: str, description: Optional[dict[str, Any]] = None) -> None:
        self.key = key
        self.folder = Path(root) / key if root is not None else None
        self._shards: list[np.ndarray] = []
        self._index: dict[str, tuple[int, int]] = {}
        self._loaded: set[str] = set()
        if self.folder is not None:
            self.folder.mkdir(parents=True, exist_ok=True)
            info = self.folder / "fingerprint.json"
            if description is not None and not info.exists():
                _atomic_write(info, json.dumps(description, indent=2, sort_keys=True, default=str).encode())
            self.refresh()

    def refresh(self) -> None:
        """Pick up shards written since (by another rank or another run)."""
        if self.folder is None:
            return
        for keys_file in sorted(self.folder.glob("*.keys.json")):
            if keys_file.name in self._loaded:
                continue
            array_file = keys_file.with_name(keys_file.name[: -len(".keys.json")] + ".npy")
            try:
                keys = json.loads(keys_file.read_text())
                array = np.load(array_file, mmap_mode="r")
            except (OSError, ValueError) as exc:
                log.warning("Feature cache: ignoring unreadable shard %s (%s)", array_file, exc)
                continue
            if len(keys) != len(array):
                log.warning("Feature cache: ignoring shard %s (%d keys, %d rows)", array_file, len(keys), len(array))
                continue
            self._add_shard(keys, array)
            self._loaded.add(keys_file.name)

    def _add_shard(self, keys: Sequence[str], array: np.ndarray) -> None:
        shard = len(self._shards)
        self._shards.append(array)
        for row, key in enumerate(keys):
            self._index[key] = (shard, row)

    def missing(self, keys: Iterable[str]) -> list[str]:
        return [k for k in dict.fromkeys(keys) if k not in self._index]

    def add(self, keys: Sequence[str], features: np.ndarray, name: str) -> None:
        """Store rows for `keys`; on disk as one new shard called `name`."""
        features = np.ascontiguousarray(features, dtype=np.float32)
        if self.folder is None:
            self._add_shard(keys, features)
            return
        array_file = self.folder / f"{name}.npy"
        with tempfile.NamedTemporaryFile(dir=self.folder, suffix=".tmp", delete=False) as fh:
            np.save(fh, features)
        os.replace(fh.name, array_file)
        _atomic_write(self.folder / f"{name}.keys.json", json.dumps(list(keys)).encode())
        self.refresh()

    def rows(self, keys: Sequence[str]) -> list[tuple[np.ndarray, int]]:
        return [(self._shards[self._index[k][0]], self._index[k][1]) for k in keys]


def _atomic_write(path: Path, data: bytes) -> None:
    with tempfile.NamedTemporaryFile(dir=path.parent, suffix=".tmp", delete=False) as fh:
        fh.write(data)
    os.replace(fh.name, path)


class FeatureDataset(Dataset):
    """(features, label) pairs read from a store; with several cached views, a random one each time."""

    def __init__(self, store: FeatureStore, keys: Sequence[str], labels: Sequence[int]) -> None:
        self.rows = store.rows(keys)
        self.labels = list(labels)

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
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


@torch.no_grad()
def compute_features(
    backbone: nn.Module, loader: Iterable, device: torch.device, forward_context: Callable[[], ContextManager], channels_last: bool
) -> np.ndarray:
    """Run the backbone (eval mode, no grad) over a loader of images [N,3,H,W] or views [N,K,3,H,W]."""
    was_training = backbone.training
    backbone.eval()
    chunks = []
    try:
        total = len(getattr(loader, "dataset", ())) or None
        for images, _ in progress(loader, total, "Computing features", size=lambda batch: len(batch[0])):
            views = images.shape[1] if images.ndim == 5 else 0
            batch = images.flatten(0, 1) if views else images
            batch = batch.to(device, non_blocking=True)
            if channels_last:
                batch = batch.contiguous(memory_format=torch.channels_last)
            with forward_context():
                out = backbone(batch).float()
            chunks.append((out.unflatten(0, (-1, views)) if views else out).cpu().numpy())
    finally:
        backbone.train(was_training)
    return np.concatenate(chunks) if chunks else np.zeros((0,), dtype=np.float32)
