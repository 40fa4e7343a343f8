"""The one fill loop: compute the features a store lacks and store them a shard at a time.

`fill_features` is what a frozen training run (callbacks.feature_cache), the audit and a run's embedding map
(insight.embeddings) all call: it builds the loader over the missing images (batch size, workers, augmented
views, pinned memory), streams it through the backbone and writes a shard every `shard_images` images, so
memory holds one shard, not the data set, and an interrupted pass keeps what it finished (the next run computes
only the rest). It also times each computed image, for feature_cache.json's per-split seconds.
"""

from __future__ import annotations

import json
import logging
import math
import time
import uuid
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import ContextManager, Optional, Union

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from transferlab.core.errors import add_note
from transferlab.core.files import atomic_write
from transferlab.core.hardware import inference_batch_size, inference_workers
from transferlab.core.progress import progress
from transferlab.data.features.datasets import ViewsDataset
from transferlab.data.features.keys import Inputs
from transferlab.data.features.store import FeatureStore, finite_rows
from transferlab.data.images import ImageDataset, Sample

__all__ = ["Extractor", "Fill", "FillSettings", "compute_features", "feature_batches", "fill_features"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class FillSettings:
    """How a fill runs, from performance.feature_cache (conf/performance/default.yaml) and data.num_workers: the
    same settings for a training run's cache, the audit and the embedding map."""

    batch_size: Union[int, str]  # images per backbone pass; auto = core.hardware.inference_batch_size for the device
    shard_images: Optional[int]  # rows per shard (what an interruption keeps); None = one shard at the end
    workers: int  # DataLoader worker processes (data.num_workers, resolved)
    auto_workers: bool = False  # data.num_workers was auto: core.hardware.inference_workers decides for inference


@dataclass(frozen=True)
class Extractor:
    """The frozen backbone (images -> pooled features) and how to run it."""

    backbone: nn.Module
    device: torch.device
    forward_context: Callable[[], ContextManager]  # autocast or nothing: the precision, as training uses it
    channels_last: bool = False


@dataclass
class Fill:
    """What one fill pass did: rows computed and stored, its wall time, and each computed key's share of it."""

    computed: int = 0
    seconds: float = 0.0
    key_seconds: dict[str, float] = field(default_factory=dict)
    not_finite: list[str] = field(default_factory=list)


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


def fill_features(
    store: FeatureStore, samples: Sequence[Sample], keys: Sequence[str], inputs: Inputs, extractor: Extractor, settings: FillSettings, name: str
) -> Fill:
    """Compute the features of `samples` (their image keys: `keys`, in the same order) and store them in `store`, a
    shard of `settings.shard_images` rows at a time, each shard named `name` with a unique part in its `{}`.

    Batches hold `batch_size // views` images (the backbone sees about `batch_size` inputs either way). The run's
    random stream is left as if nothing had been computed. Interrupted (Ctrl-C, an error), the finished rows are
    stored and the interruption note says how many."""
    unlabelled = [(path, 0) for path, _ in samples]  # features do not depend on labels (single or label sets)
    dataset: Dataset = ImageDataset(unlabelled, inputs.transform, inputs.decode_size)
    if inputs.views:
        dataset = ViewsDataset(dataset, keys, inputs.views, int(inputs.seed or 0))
    gpu = extractor.device.type == "cuda"
    batch_size = max(1, inference_batch_size(settings.batch_size, gpu) // max(1, inputs.views))
    workers = inference_workers(settings.workers, gpu) if settings.auto_workers else settings.workers
    workers = min(workers, math.ceil(len(keys) / batch_size))  # no idle worker processes to start
    loader = DataLoader(dataset, batch_size=batch_size, num_workers=workers, pin_memory=gpu, prefetch_factor=4 if workers else None)
    with torch.random.fork_rng(devices=[]):
        fill = _stream_into_shards(store, keys, loader, extractor, settings.shard_images or max(1, len(keys)), name)
    log.info(
        "Feature cache: %d image(s) computed in %.1f s (%.0f img/s; batch %d, %d worker(s), %d thread(s))",
        fill.computed,
        fill.seconds,
        fill.computed / max(fill.seconds, 1e-9),
        batch_size,
        workers,
        torch.get_num_threads(),
    )
    record_throughput(store, fill, extractor.device)
    return fill


THROUGHPUT = "throughput.json"  # in a store's folder: the images/s of the last fill that computed rows (transferlab-rank's cost)


def record_throughput(store: FeatureStore, fill: Fill, device: torch.device) -> None:
    """Whoever fills a store (a training run, the audit, a ranking), the rate is kept beside it: a later reader of
    cached features can still say what computing them cost."""
    if store.folder is not None and fill.computed and fill.seconds > 0:
        figures = {"images_per_second": round(fill.computed / fill.seconds, 1), "images": fill.computed, "device": str(device)}
        atomic_write(store.folder / THROUGHPUT, json.dumps(figures).encode())


def recorded_throughput(folder: Optional[Path]) -> Optional[float]:
    """The images/s record_throughput kept for a store folder, or None."""
    record = folder / THROUGHPUT if folder is not None else None
    return float(json.loads(record.read_text())["images_per_second"]) if record is not None and record.is_file() else None


def _stream_into_shards(store: FeatureStore, keys: Sequence[str], loader: Iterable, extractor: Extractor, shard_images: int, name: str) -> Fill:
    """The loader's features, a shard of `shard_images` rows at a time; on an interruption, what is finished first."""
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

    batches = feature_batches(extractor.backbone, loader, extractor.device, extractor.forward_context, extractor.channels_last)
    try:
        for features in batches:
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
