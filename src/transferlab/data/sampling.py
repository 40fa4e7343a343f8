"""The order images are served in: shuffled as a function of (seed, epoch), each evaluation image exactly once.

Both matter for results one can trust: a resumed run sees the same order as an uninterrupted one (issue 6's
exact resume), and a DDP evaluation counts every test image once (torch's DistributedSampler pads the last
batch with repeats; Lightning's UnrepeatedDistributedSampler is internal, so this is our own, on torch's public
DistributedSampler; upstream: Lightning-AI/pytorch-lightning #7929, #3325).
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterator, Sequence, Sized
from typing import Any, Optional

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, RandomSampler, Sampler, WeightedRandomSampler
from torch.utils.data.distributed import DistributedSampler


class EpochRandomSampler(RandomSampler):
    """Shuffles as a function of (seed, epoch), not of how many epochs this process has run. Still a
    RandomSampler, so under DDP Lightning swaps it for a DistributedSampler (also a function of seed and epoch)."""

    def __init__(self, data_source: Sized, seed: int) -> None:
        super().__init__(data_source)
        self.seed, self.epoch = seed, 0
        self._epoch_given, self._iterated = False, False

    def set_epoch(self, epoch: int) -> None:
        self.epoch, self._epoch_given = epoch, True

    def __iter__(self) -> Iterator[int]:
        if self._iterated and not self._epoch_given:  # a loop without Lightning: the next pass is the next epoch
            self.epoch += 1
        self._epoch_given, self._iterated = False, True
        generator = torch.Generator().manual_seed(epoch_seed(self.seed, self.epoch))  # torch keeps 32 bits of a seed
        yield from torch.randperm(len(self.data_source), generator=generator).tolist()


def epoch_seed(seed: int, epoch: int, rank: int = 0) -> int:
    """A well-mixed 32-bit seed per (run seed, epoch, rank), valid for torch, numpy and random."""
    return int(np.random.SeedSequence([seed % 2**32, epoch, rank]).generate_state(1)[0])


class EpochDataLoader(DataLoader):
    """The training loader. Each epoch's iterator starts from random state f(seed, epoch, rank): sampler epoch set,
    torch/numpy/random reseeded (augmentation in this process, dropout, the workers' seeds) at the moment the
    iterator is created. That moment is the one a resumed run shares with an uninterrupted one (Lightning creates
    a resumed run's first iterator before any epoch hook), so a run resumed from a checkpoint continues exactly as
    the uninterrupted run would have."""

    def __init__(self, *args: Any, epoch_state: Optional[Callable[[], Optional[tuple[int, int]]]] = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.epoch_state = epoch_state  # () -> (epoch, seed), or None outside a Lightning fit (nothing is reseeded)

    def __iter__(self) -> Any:
        state = self.epoch_state() if self.epoch_state is not None else None
        if state is not None:
            epoch, seed = state
            for sampler in (self.sampler, getattr(self.batch_sampler, "sampler", None)):
                set_epoch = getattr(sampler, "set_epoch", None)
                if callable(set_epoch):
                    set_epoch(epoch)
            torch.manual_seed(seed)
            np.random.seed(seed)
            random.seed(seed)
        return super().__iter__()


class EvaluationShardSampler(DistributedSampler):
    """Rank r of n gets images r, r+n, r+2n, ... in order: every image evaluated once, shards differ by at most one.

    A DistributedSampler subclass, so Lightning keeps it instead of wrapping it in a padding one.
    """

    def __init__(self, dataset: Dataset, num_replicas: Optional[int] = None, rank: Optional[int] = None) -> None:
        """`num_replicas`, `rank`: from the process group unless given."""
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=False, drop_last=False)
        assert isinstance(dataset, Sized)
        self.total_size = len(dataset)
        self.num_samples = len(range(self.rank, self.total_size, self.num_replicas))

    def __iter__(self) -> Iterator[int]:
        return iter(range(self.rank, self.total_size, self.num_replicas))

    def __len__(self) -> int:
        return self.num_samples


class EpochBalancedSampler(Sampler[int]):
    """data.sampler=balanced: each epoch draws len(dataset) items with replacement, every class equally likely
    (torch's WeightedRandomSampler, with its generator seeded by (seed, epoch) like EpochRandomSampler)."""

    def __init__(self, labels: Sequence[int], seed: int) -> None:
        counts = np.bincount(np.asarray(labels, dtype=np.int64))
        self.weights = [1.0 / float(counts[label]) for label in labels]
        self.seed, self.epoch = seed, 0
        self._epoch_given, self._iterated = False, False

    def set_epoch(self, epoch: int) -> None:
        self.epoch, self._epoch_given = epoch, True

    def __len__(self) -> int:
        return len(self.weights)

    def __iter__(self) -> Iterator[int]:
        if self._iterated and not self._epoch_given:
            self.epoch += 1
        self._epoch_given, self._iterated = False, True
        generator = torch.Generator().manual_seed(epoch_seed(self.seed, self.epoch))
        yield from WeightedRandomSampler(self.weights, len(self.weights), replacement=True, generator=generator)


def balanced_loss_weights(labels: Sequence[int], num_classes: int) -> list[float]:
    """data.class_weights=balanced: n / (K * count_c) per class, scikit-learn's `class_weight="balanced"`."""
    counts = np.bincount(np.asarray(labels, dtype=np.int64), minlength=num_classes)
    return [float(len(labels) / (num_classes * c)) if c else 0.0 for c in counts]
