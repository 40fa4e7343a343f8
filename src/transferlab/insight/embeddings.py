"""Pooled backbone features of many images outside training: memory-mapped, through the shared feature cache.

The audit and a run's embedding map need one feature vector per image. They fill and read the same store a
frozen training run uses (same fingerprint: backbone, weights, eval transform, precision), so an audit after a
frozen run of the same data computes nothing, and the reverse. The result is written to a `.npy` file and
opened memory-mapped, so 25,000 x 1,280 features never need to sit in RAM at once.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader

from transferlab.core.errors import DataError
from transferlab.core.hardware import choose_precision, forward_context
from transferlab.data.feature_cache import FeatureStore, describe, fill_store, fingerprint, image_key, weights_digest
from transferlab.data.images import ImageDataset, Sample

log = logging.getLogger(__name__)

CHUNK = 4096  # rows copied from the store into the output file at a time
SHARD_IMAGES = 1024  # features written every this many images: an interrupted audit keeps what it computed


def pooled_features(
    backbone: Any,
    samples: Sequence[Sample],
    out_file: Path,
    *,
    cache_dir: Optional[str],
    device: torch.device,
    precision: str,
    batch_size: int,
    workers: int,
) -> np.ndarray:
    """[N, D] float32 features of `samples` (eval transform), memory-mapped from `out_file`.

    `backbone`: a models.backbone.Backbone (`body`, `preprocessing`, `name`, `source`); `precision`: as
    trainer.precision (`auto` = the hardware's choice, as training makes it), part of the cache fingerprint."""
    precision = choose_precision(precision, "gpu" if device.type == "cuda" else "cpu")
    prep = backbone.preprocessing
    transform = prep.eval_transform()
    digest = weights_digest(backbone.body)
    description = describe(backbone, transform, prep.decode_size(None), precision, 0, None, digest)
    root = Path(cache_dir).expanduser() / "features" if cache_dir else None
    store = FeatureStore(root, fingerprint(**description), description)
    keys = [image_key(path) for path, _ in samples]
    with store.filling():  # a concurrent audit or frozen run of the same images computes them once
        missing = set(store.missing(keys))
        if missing:
            todo_keys = [k for k in dict.fromkeys(keys) if k in missing]
            first = {k: s for s, k in zip(samples, keys)}
            dataset = ImageDataset([first[k] for k in todo_keys], transform, prep.decode_size(None))
            workers = min(workers, math.ceil(len(todo_keys) / batch_size))
            loader = DataLoader(dataset, batch_size=batch_size, num_workers=workers, prefetch_factor=4 if workers else None)
            body: nn.Module = backbone.to(device)
            channels_last = sum(isinstance(m, nn.Conv2d) for m in body.modules()) > 1
            if channels_last:
                body = body.to(memory_format=torch.channels_last)
            log.info(
                "Features: computing %d of %d image(s) with %s (%s); the rest come from the cache",
                len(todo_keys),
                len(samples),
                backbone.name,
                precision,
            )
            fill = fill_store(
                store, todo_keys, loader, body, device, forward_context(precision, device), channels_last, SHARD_IMAGES, "eval-{}-audit"
            )
            log.info("Features: %d image(s) in %.1f s (%.0f img/s)", fill.computed, fill.seconds, fill.computed / max(fill.seconds, 1e-9))
    unusable = store.missing(keys)
    if unusable:
        raise DataError(
            f"the backbone gives NaN or inf features for {len(unusable)} image(s), e.g. {unusable[0].split('|')[0]}; try precision=32-true"
        )
    rows = store.rows(keys)
    dim = rows[0][0].shape[-1] if rows else 0
    out_file.parent.mkdir(parents=True, exist_ok=True)
    out = np.lib.format.open_memmap(out_file, mode="w+", dtype=np.float32, shape=(len(rows), dim))
    for start in range(0, len(rows), CHUNK):
        out[start : start + CHUNK] = np.stack([array[row] for array, row in rows[start : start + CHUNK]])
    out.flush()
    del out
    return np.load(out_file, mmap_mode="r")
