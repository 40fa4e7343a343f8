"""Pooled backbone features of many images outside training: memory-mapped, through the shared feature cache.

The audit and a run's embedding map need one feature vector per image. They fill and read the same store a
frozen training run uses (same fingerprint: backbone, weights, eval transform, precision, library versions),
through the same fill loop (data.features.fill_features) with the same settings (performance.feature_cache's
batch size and shard size), so an audit after a frozen run of the same data computes nothing, and the reverse.
What is left here: the result is written to a `.npy` file and opened memory-mapped, so 25,000 x 1,280 features
never need to sit in RAM at once.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Optional, Union

import numpy as np
import torch
from torch import nn

from transferlab.core.errors import DataError
from transferlab.core.hardware import choose_precision, forward_context
from transferlab.data.features import Extractor, FeatureStore, FillSettings, Inputs, describe, fill_features, fingerprint, image_key, weights_digest
from transferlab.data.images import Sample

log = logging.getLogger(__name__)

CHUNK = 4096  # rows copied from the store into the output file at a time


def pooled_features(
    backbone: Any,
    samples: Sequence[Sample],
    out_file: Path,
    *,
    cache_dir: Optional[str],
    device: torch.device,
    precision: str,
    batch_size: Union[int, str],
    workers: int,
    shard_images: Optional[int] = None,
    auto_workers: bool = False,
    stats: Optional[dict[str, Any]] = None,
) -> np.ndarray:
    """[N, D] float32 features of `samples` (eval transform), memory-mapped from `out_file`.

    `backbone`: a models.backbone.Backbone (`body`, `preprocessing`, `name`, `source`); `precision`: as
    trainer.precision (`auto` = the hardware's choice, as training makes it), part of the cache fingerprint.
    `batch_size`, `shard_images`: performance.feature_cache's (data.features.FillSettings; shard_images=None
    writes one shard at the end: for a pass with nothing to resume); `workers`, `auto_workers`: data.num_workers,
    resolved, and whether it was `auto`; `stats`, when given, receives what the pass did: `computed` (images),
    `seconds` (of the fill) and `store` (its folder, None in memory)."""
    precision = choose_precision(precision, "gpu" if device.type == "cuda" else "cpu")
    prep = backbone.preprocessing
    inputs = Inputs(prep.eval_transform(), prep.decode_size(None))
    description = describe(backbone, inputs, precision, weights_digest(backbone.body))
    root = Path(cache_dir).expanduser() / "features" if cache_dir else None
    store = FeatureStore(root, fingerprint(**description), description)
    keys = [image_key(path) for path, _ in samples]
    found = {"computed": 0, "seconds": 0.0, "store": store.folder}
    with store.filling():  # a concurrent audit or frozen run of the same images computes them once
        missing = set(store.missing(keys))
        if missing:
            todo_keys = [k for k in dict.fromkeys(keys) if k in missing]
            first = {k: s for s, k in zip(samples, keys)}
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
            extractor = Extractor(body, device, forward_context(precision, device), channels_last)
            settings = FillSettings(batch_size, shard_images, workers, auto_workers)
            fill = fill_features(store, [first[k] for k in todo_keys], todo_keys, inputs, extractor, settings, "eval-{}-audit")
            found.update(computed=fill.computed, seconds=fill.seconds)
    if stats is not None:
        stats.update(found)
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
