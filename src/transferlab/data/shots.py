"""Few-shot training sets (`data.shots=K`): K training images per class, drawn with `data.shots_seed`.

Only the training split is cut; validation and test images stay exactly the hash split's (data.splits), so a
`-m data.shots=1,2,4,8,all seed=1,2,3 data.split_seed=0` grid measures every point on the same test images and the
seeds vary only which K images train. The draw is reproducible on any machine: the training images sorted by their
split key (their path relative to data.root), then one permutation by numpy's PCG64 seeded with shots_seed, and each
class keeps its first K images in that order. So, for one seed, the 1-shot images are among the 2-shot ones, and
those among the 4-shot ones (nested sets: the curve's steps add images, they do not swap them). A class with fewer
than K training images keeps all it has (logged).

Multi-label (label sets): greedy, rarest label first, each label walks the same seeded order and adds images until
at least K kept images hold it (or it has no more). An image kept for one label counts for all its labels, so common
labels usually end up with more than K; training images with none of the labels are left out.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Optional, Union

import numpy as np

from transferlab.core.errors import ConfigError
from transferlab.data.images import Sample
from transferlab.data.labels import counts, label_set, members

log = logging.getLogger(__name__)

ALL = "all"  # data.shots=all (or null): every training image
Shots = Union[int, str, None]


def parse_shots(value: object) -> Optional[int]:
    """data.shots as K (an int >= 1) or None (all / null); anything else is one line."""
    if value is None or value == ALL:
        return None
    number = value
    if isinstance(value, str) and value.strip().isdigit():
        number = int(value.strip())
    if isinstance(number, bool) or not isinstance(number, int) or number < 1:
        raise ConfigError(f"data.shots: expected a whole number >= 1 (training images per class), all or null (every training image), got {value!r}")
    return number


def refuse_folds(shots: Optional[int]) -> None:
    """cv.folds splits every non-test image into folds: a K-shot training set cannot be one of them."""
    if shots is not None:
        raise ConfigError(
            f"data.shots={shots} with cv.folds: the folds would each need {shots} training image(s) per class of their own, and the "
            f"folds' test images would not be the same across shot counts; repeat over seeds instead: -m seed=1,2,3 data.split_seed=0"
        )


def seeded_order(samples: Sequence[Sample], key_of: Callable[[Path], str], seed: int) -> list[int]:
    """Indices of `samples`: sorted by split key, then permuted by PCG64(seed) (the same on every machine)."""
    by_key = sorted(range(len(samples)), key=lambda i: key_of(Path(samples[i][0])))
    permutation = np.random.default_rng(int(seed) % 2**32).permutation(len(by_key))
    return [by_key[int(i)] for i in permutation]


def keep_shots(train: Sequence[Sample], shots: int, seed: int, key_of: Callable[[Path], str]) -> list[Sample]:
    """The few-shot training set: at least `shots` images of each class / label where it has them (see the module
    docstring), in the order of `train`."""
    order = seeded_order(train, key_of, seed)
    holders = members([label for _, label in train])  # label -> indices of its images
    rank = {index: position for position, index in enumerate(order)}
    kept: set[int] = set()
    for label in sorted(holders, key=lambda one: (len(holders[one]), one)):  # rarest first (single-label: any order)
        have = sum(1 for i in holders[label] if i in kept)
        for index in sorted(holders[label], key=rank.__getitem__):
            if have >= shots:
                break
            if index not in kept:
                kept.add(index)
                have += 1
    return [sample for i, sample in enumerate(train) if i in kept]


def few_shot_train(
    splits: dict[str, list[Sample]], shots: int, seed: int, key_of: Callable[[Path], str], class_names: Sequence[str], multilabel: bool
) -> list[Sample]:
    """splits["train"] cut to `shots` per class (per label); logs what was kept and the classes that had fewer."""
    train = splits["train"]
    kept = keep_shots(train, shots, seed, key_of)
    per = "label" if multilabel else "class"
    available = counts([label for _, label in train], len(class_names))
    short = [f"{name} {int(n)}" for name, n in zip(class_names, available) if n < shots]
    untouched = " and ".join(f"{split} {len(splits.get(split, []))}" for split in ("val", "test"))
    fewer = f", fewer where a {per} has fewer" if short else ""
    at_least = "at least " if multilabel else ""
    log.info(
        "data.shots=%d: %s%d training images per %s%s (%d of %d kept; %s untouched)",
        shots,
        at_least,
        shots,
        per,
        fewer,
        len(kept),
        len(train),
        untouched,
    )
    if short:
        plural = "classes" if per == "class" else "labels"
        log.warning("data.shots=%d: %d %s have fewer training images, all of them kept: %s", shots, len(short), plural, ", ".join(short))
    if multilabel:
        unlabelled = sum(1 for _, label in train if not label_set(label))
        if unlabelled:
            log.info("data.shots=%d: %d training image(s) with none of the labels left out", shots, unlabelled)
    return kept
