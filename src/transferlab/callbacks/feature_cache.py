"""finetune=frozen: compute the backbone's pooled features of each image once; the head trains from them.

A frozen backbone (weights fixed, BatchNorm in eval mode) gives the same features for an image every epoch,
so recomputing them (as the lesson's loop does) spends ~all of a linear probe's time on identical work.
This callback fills a FeatureStore (transferlab.data.features, whose `fill_features` is the fill loop the audit
uses too) at setup; what is left here is Lightning's and DDP's part: which rank computes which share, the
exchange of shares, the (features, label) datasets handed to the datamodule (the model takes an [N, D] batch
as features) and <run>/feature_cache.json.
"""

from __future__ import annotations

import json
import logging
import time
import uuid
from pathlib import Path
from typing import Any, Optional, Union

import lightning.pytorch as pl
import torch

from transferlab.core.errors import ConfigError, DataError
from transferlab.core.files import atomic_write
from transferlab.data.features import (
    Extractor,
    FeatureDataset,
    FeatureStore,
    Fill,
    FillSettings,
    Inputs,
    describe,
    fill_features,
    fingerprint,
    image_key,
    weights_digest,
)
from transferlab.models.classifier import as_classifier

log = logging.getLogger(__name__)

STAGE_SPLITS = {"fit": ("train", "val"), "validate": ("val",), "test": ("test",)}


class FeatureCache(pl.Callback):
    """Fills `datamodule.feature_sets[split]` with FeatureDatasets (`.rows`, `.labels`) at setup, from the stores
    of the splits' fingerprints; `stats` (per split: images, computed, reused, seconds) is feature_cache.json."""

    def __init__(
        self, *, storage: str, cache_dir: Optional[str], augmented_views: int, seed: int, batch_size: Union[int, str], shard_images: int
    ) -> None:
        """From `performance.feature_cache` (conf/performance/default.yaml) and the run's seed and cache dir, as the
        config's validation guarantees them (storage disk | memory, disk with a cache dir, views >= 0)."""
        self.root = Path(cache_dir).expanduser() / "features" if storage == "disk" and cache_dir else None
        self.views, self.seed, self.batch_size, self.shard_images = int(augmented_views), int(seed), batch_size, int(shard_images)
        self.stats: dict[str, Any] = {}
        self.skip_splits: set[str] = set()  # evaluated on images instead (tta: test-time views need pixels)
        self._stores: dict[str, FeatureStore] = {}
        self._inputs: dict[str, Inputs] = {}  # per store: what its images go through on the way to the backbone

    def _store(self, pl_module: pl.LightningModule, datamodule: Any, precision: str, views: int, digest: str) -> FeatureStore:
        backbone = as_classifier(pl_module).backbone
        prep = datamodule.preprocessing
        augment = datamodule.augment if views else None
        transform = prep.train_transform(augment) if views else prep.eval_transform()
        inputs = Inputs(transform, prep.decode_size(augment), views, self.seed)
        description = describe(backbone, inputs, precision, digest)
        key = fingerprint(**description)
        if key not in self._stores:
            self._stores[key] = FeatureStore(self.root, key, description)
            self._inputs[key] = inputs
        return self._stores[key]

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        datamodule = trainer.datamodule  # type: ignore[attr-defined]
        backbone = as_classifier(pl_module).backbone
        if not getattr(pl_module, "backbone_frozen", False):
            raise ConfigError("performance.feature_cache: only a frozen backbone (finetune=frozen) can use cached features")
        started = time.perf_counter()
        backbone.to(trainer.strategy.root_device)  # Lightning moves the module after setup; extraction needs it now
        # Fitting is followed by testing: fill the test split too, in the same pass (one loader, full batches).
        splits = [
            s
            for s in STAGE_SPLITS.get(stage, ()) + (("test",) if stage == "fit" else ())
            if s not in datamodule.feature_sets and datamodule.splits.get(s) and s not in self.skip_splits
        ]
        by_store: dict[str, list[str]] = {}
        digest = weights_digest(backbone.body) if splits else ""  # once: ~0.3 s for ResNet-50's 100 MB
        for split in splits:
            views = self.views if split == "train" else 0
            store = self._store(pl_module, datamodule, str(trainer.precision), views, digest)
            by_store.setdefault(store.key, []).append(split)
        for key, store_splits in by_store.items():
            store = self._stores[key]
            samples = list({str(path): (path, label) for s in store_splits for path, label in datamodule.splits[s]}.values())
            missing, fill = self.ensure(trainer, pl_module, datamodule, store, samples, as_classifier(pl_module).backbone, "backbone")
            self._record(datamodule, store, store_splits, set(missing), fill)
        if splits:
            seconds = time.perf_counter() - started
            log.info(
                "Feature cache (%s): %s; %.1f s",
                self.root or "memory",
                ", ".join(f"{s} {self.stats[s]['images']} ({self.stats[s]['computed']} computed, {self.stats[s]['reused']} reused)" for s in splits),
                seconds,
            )
            self.stats[f"seconds_{getattr(stage, 'value', stage)}"] = round(seconds, 2)
            self.write_stats(trainer)

    def write_stats(self, trainer: pl.Trainer) -> None:
        """<run>/feature_cache.json (rank 0): what each split computed and reused (finetune=distill: the teacher too)."""
        if trainer.is_global_zero:
            atomic_write(Path(trainer.default_root_dir) / "feature_cache.json", json.dumps(self.stats, indent=2).encode())

    def ensure(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, datamodule: Any, store: FeatureStore, samples: list, module: Any, what: str
    ) -> tuple[list[str], Fill]:
        """Fill `store` with `module`'s outputs for `samples` where it lacks them (the backbone's features; finetune=distill:
        the teacher's logits too); returns the keys it computed and the fill."""
        keys = [image_key(path) for path, _ in samples]
        fill = Fill()
        # One fill per store at a time (concurrent runs wait, then reuse); under DDP rank 0 holds it for all ranks,
        # and rank 0's view of what is missing decides for every rank: the same shares everywhere.
        with store.filling(take_lock=trainer.is_global_zero):
            missing = trainer.strategy.broadcast(sorted(store.missing(keys)), src=0)
            if missing:
                fill = self._fill(trainer, pl_module, datamodule, store, samples, keys, missing, module)
        store.refresh()
        unusable = store.missing(keys)
        if unusable:
            raise DataError(
                f"the {what} gives NaN or inf outputs for {len(unusable)} image(s), e.g. {unusable[0].split('|')[0]}; "
                f"with trainer.precision={trainer.precision} try trainer.precision=32-true, or leave them out with data.exclude"
            )
        return missing, fill

    def _record(self, datamodule: Any, store: FeatureStore, store_splits: list[str], computed_keys: set[str], fill: Fill) -> None:
        """Hand the datamodule its feature datasets; per split: images, computed, reused, and the fill's seconds and img/s."""
        measured = sum(fill.key_seconds.values())
        for split in store_splits:
            split_keys = [image_key(path) for path, _ in datamodule.splits[split]]
            datamodule.feature_sets[split] = FeatureDataset(store, split_keys, [datamodule.target(label) for _, label in datamodule.splits[split]])
            computed = sum(k in computed_keys for k in split_keys)
            # This rank's time per computed image, scaled to the whole fill's wall time (under DDP: both ranks' work)
            share = sum(fill.key_seconds.get(k, 0.0) for k in dict.fromkeys(split_keys)) / measured if measured else 0.0
            seconds = fill.seconds * share
            self.stats[split] = {
                "images": len(split_keys),
                "computed": computed,
                "reused": len(split_keys) - computed,
                "seconds": round(seconds, 4),
                "images_per_second": round(computed / seconds, 1) if computed and seconds else None,
                "views": self.views if split == "train" else 0,
                "store": str(store.folder or "memory"),
            }

    def _fill(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        datamodule: Any,
        store: FeatureStore,
        samples: list,
        keys: list[str],
        missing: list[str],
        module: Any,
    ) -> Fill:
        """Each rank computes its share of the missing images; the shares meet on disk, or through the process group."""
        started = time.perf_counter()
        rank, world = trainer.global_rank, trainer.world_size
        position = {key: i for i, key in enumerate(keys)}
        mine = missing[rank::world]
        inputs = self._inputs[store.key]
        split = "train" if inputs.views else "eval"
        extractor = Extractor(
            module,
            trainer.strategy.root_device,
            trainer.precision_plugin.forward_context,
            getattr(pl_module, "channels_last", False),
        )
        settings = FillSettings(self.batch_size, self.shard_images, datamodule.workers(), datamodule.num_workers == "auto")
        fill = fill_features(store, [samples[position[key]] for key in mine], mine, inputs, extractor, settings, split + "-{}-r" + str(rank))
        if world > 1:
            trainer.strategy.barrier("feature_cache")
            store.refresh()
            # Memory storage, or a cache dir the nodes do not share: exchange the shares through the process group.
            if trainer.strategy.reduce_boolean_decision(bool(store.missing(missing)), all=False):
                gathered: list[Any] = [None] * world
                lacking = set(store.missing(mine))  # rows that were not finite: not stored, not sent
                own = [k for k in mine if k not in lacking]
                torch.distributed.all_gather_object(gathered, (own, store.stack(own)))
                for other_rank, (other_keys, other_features) in enumerate(gathered):
                    if len(other_keys) and store.missing(other_keys):
                        store.add(other_keys, other_features, f"{split}-{uuid.uuid4().hex[:12]}-from-r{other_rank}")
        fill.seconds = time.perf_counter() - started
        return fill
