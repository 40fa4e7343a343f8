"""Pooled backbone features of images, computed once and reused by every frozen-backbone run that can.

A store holds the features of one *fingerprint*: backbone name, a hash of its weights, the transform that
made its inputs (eval transform, or the augmentation pipeline + number of views + seed) and the precision.
Any change of those gives another fingerprint, hence another store. Inside a store, rows are found by image
key (resolved path, size, modification time), so a changed or added file is computed again and nothing else.

The store itself (self-checking shards, fill lock) is data/feature_store.py. `fill_store` streams a loader
through the backbone and writes a shard every `shard_images` images, so an interrupted pass keeps what it did
and the next run computes only the rest.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
import uuid
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ContextManager, Optional

import numpy as np
import torch
from torch import nn
from torch.utils.data import Dataset

from transferlab.core.errors import add_note
from transferlab.core.progress import progress
from transferlab.data.feature_store import FeatureStore, finite_rows

__all__ = ["FeatureStore", "FeatureDataset", "ViewsDataset", "fill_store", "compute_features", "describe", "fingerprint", "image_key"]

log = logging.getLogger(__name__)

FORMAT_VERSION = 2  # 2: shards carry a checksum of their bytes


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


def feature_batches(
    backbone: nn.Module, loader: Iterable, device: torch.device, forward_context: Callable[[], ContextManager], channels_last: bool
) -> Iterator[np.ndarray]:
    """The backbone's features (eval mode, no grad) of each batch of images [N,3,H,W] or views [N,K,3,H,W], as it comes."""
    was_training = backbone.training
    backbone.eval()
    try:
        total = len(getattr(loader, "dataset", ())) or None
        for images, _ in progress(loader, total, "Computing features", size=lambda batch: len(batch[0])):
            views = images.shape[1] if images.ndim == 5 else 0
            batch = images.flatten(0, 1) if views else images
            batch = batch.to(device, non_blocking=True)
            if channels_last:
                batch = batch.contiguous(memory_format=torch.channels_last)
            with torch.inference_mode(), forward_context():
                out = backbone(batch).float()
            yield (out.unflatten(0, (-1, views)) if views else out).cpu().numpy()
    finally:
        backbone.train(was_training)


def compute_features(
    backbone: nn.Module, loader: Iterable, device: torch.device, forward_context: Callable[[], ContextManager], channels_last: bool
) -> np.ndarray:
    """All features of a loader in one array (for small sets; the cache streams them into shards instead)."""
    chunks = list(feature_batches(backbone, loader, device, forward_context, channels_last))
    return np.concatenate(chunks) if chunks else np.zeros((0,), dtype=np.float32)


@dataclass
class Fill:
    """What one fill pass did: rows computed and stored, its wall time, and each computed key's share of it."""

    computed: int = 0
    seconds: float = 0.0
    key_seconds: dict[str, float] = field(default_factory=dict)
    not_finite: list[str] = field(default_factory=list)


def fill_store(
    store: FeatureStore,
    keys: Sequence[str],
    loader: Iterable,
    backbone: nn.Module,
    device: torch.device,
    forward_context: Callable[[], ContextManager],
    channels_last: bool,
    shard_images: int,
    name: str,
) -> Fill:
    """Compute the features of `keys` (the loader yields their images in that order) and store them a shard of
    `shard_images` rows at a time, each named `name` with a unique part in its `{}`; interrupted (Ctrl-C, an
    error), the finished rows are stored before leaving."""
    fill, written, done = Fill(), 0, 0
    pending: list[np.ndarray] = []
    started = last = time.perf_counter()

    def flush(everything: bool) -> None:
        """Write shards of exactly `shard_images` rows (and, at the end, what is left)."""
        nonlocal pending, written
        rows = np.concatenate(pending) if pending else np.zeros((0,), dtype=np.float32)
        while len(rows) >= shard_images or (everything and len(rows)):
            shard, rows = rows[:shard_images], rows[shard_images:]
            shard_keys = keys[written : written + len(shard)]
            fill.not_finite += [k for k, ok in zip(shard_keys, finite_rows(shard)) if not ok]
            store.add(shard_keys, shard, name.format(uuid.uuid4().hex[:12]))
            written += len(shard)
        pending = [rows] if len(rows) else []

    try:
        for features in feature_batches(backbone, loader, device, forward_context, channels_last):
            now = time.perf_counter()
            for key in keys[done : done + len(features)]:
                fill.key_seconds[key] = (now - last) / len(features)
            last, done = now, done + len(features)
            pending.append(features)
            if done - written >= shard_images:
                flush(everything=False)
    except BaseException as stopped:
        flush(everything=True)
        if store.folder is not None and written < len(keys):
            note = f"the feature cache kept {written} of {len(keys)} images' features in {store.folder}; the next run computes only the other {len(keys) - written}"
            log.warning("Feature cache: interrupted; %s", note)
            add_note(stopped, note)  # cli.exits prints it with the interruption's one line
        raise
    flush(everything=True)
    fill.computed, fill.seconds = written - len(fill.not_finite), time.perf_counter() - started
    return fill
