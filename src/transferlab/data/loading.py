"""How a datamodule's images reach the model: worker count, pinning, and the samplers that make an epoch's order a
function of (run seed, epoch) alone, so neither the worker settings nor resuming from a checkpoint change it.

A mixin of data.base.ImageClassificationDataModule (which holds the settings it reads).
"""

from __future__ import annotations

import functools
from typing import Any, Optional, Union

import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from transferlab.core.hardware import default_workers
from transferlab.data.images import Sample
from transferlab.data.labels import class_index
from transferlab.data.sampling import EpochBalancedSampler, EpochDataLoader, EpochRandomSampler, EvaluationShardSampler, epoch_seed


class EpochLoaders:
    """DataLoaders of a LightningDataModule's datasets (`trainer` is Lightning's; the rest are data.* settings)."""

    trainer: Any
    num_workers: Union[int, str]
    pin_memory: Union[bool, str]
    prefetch_factor: Optional[int]
    sampler: str
    batch_size: int
    splits: dict[str, list[Sample]]

    def _on_gpu(self) -> bool:
        trainer = self.trainer
        return trainer.strategy.root_device.type == "cuda" if trainer is not None else torch.cuda.is_available()

    def workers(self) -> int:
        """data.num_workers, with `auto` = derived from the cores this process may use (hardware.default_workers)."""
        if self.num_workers != "auto":
            return int(self.num_workers)
        trainer = self.trainer
        return default_workers(trainer.num_devices if trainer is not None else 1, gpu=self._on_gpu())

    def loader(self, dataset: Dataset, train: bool, workers: Optional[int] = None) -> DataLoader:
        """Shuffling by (run seed, epoch): the order depends neither on worker settings nor on resuming."""
        workers = self.workers() if workers is None else workers
        on_gpu = self._on_gpu()
        pin = on_gpu if self.pin_memory == "auto" else bool(self.pin_memory)
        run_seed = torch.initial_seed()  # what seed_everything(cfg.seed) set
        sampler: Optional[Sampler] = EpochRandomSampler(dataset, run_seed) if train else None  # type: ignore[arg-type]
        if train and self.sampler == "balanced":  # under DDP, Lightning shards it (DistributedSamplerWrapper)
            sampler = EpochBalancedSampler([class_index(label) for _, label in self.splits["train"]], run_seed)
        if not train and torch.distributed.is_available() and torch.distributed.is_initialized():
            sampler = EvaluationShardSampler(dataset)  # each image evaluated exactly once across ranks
        # Deterministic mode: workers are started per epoch, so their seeds follow the epoch's (EpochDataLoader).
        persistent = not torch.are_deterministic_algorithms_enabled()
        extra: dict[str, Any] = (
            {"persistent_workers": persistent, "prefetch_factor": self.prefetch_factor or (4 if on_gpu else 2)} if workers > 0 else {}
        )
        if train:
            extra["epoch_state"] = functools.partial(self._epoch_state, run_seed)
        extra["collate_fn"] = getattr(dataset, "collate", None)  # EncodedImageDataset (data.decode=gpu) brings its own
        return (EpochDataLoader if train else DataLoader)(
            dataset, batch_size=self.batch_size, sampler=sampler, num_workers=workers, pin_memory=pin, drop_last=False, **extra
        )

    def _epoch_state(self, run_seed: int) -> Optional[tuple[int, int]]:
        """(the epoch about to be trained, its seed): Lightning's own count, restored from a checkpoint on resume."""
        trainer = self.trainer
        if trainer is None:
            return None
        epoch = trainer.fit_loop.epoch_progress.current.processed
        return epoch, epoch_seed(run_seed, epoch, trainer.global_rank)
