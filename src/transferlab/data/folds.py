"""Cross-validation splits (cv.folds=K): stratified, seeded folds over every image that is not in an official test list.

Multi-label data (label sets) is stratified across labels by iterative stratification (Sechidis et al. 2011,
the `iterative-stratification` package): each fold holds about 1/K of every label's images, so a label with
at least K images appears in every fold (`multilabel_folds`).

Fold k holds out its k-th part as that fold's test set (the out-of-fold images); the rest is split once more,
stratified, into training and validation images (checkpoint selection and calibration need a validation set
that the out-of-fold images never take part in). Over the K folds every image is out-of-fold exactly once.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence

import numpy as np
from sklearn.model_selection import StratifiedKFold

from transferlab.core.errors import ConfigError
from transferlab.data.images import Sample
from transferlab.data.labels import class_index, counts, multi_hot
from transferlab.data.splits import stratified_split


def multilabel_folds(hot: np.ndarray, folds: int, seed: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """(rest, held-out) index pairs of K folds stratified across the labels of a [N, K] 0/1 matrix."""
    from iterstrat.ml_stratifiers import MultilabelStratifiedKFold

    splitter = MultilabelStratifiedKFold(n_splits=folds, shuffle=True, random_state=seed % 2**32)
    return [(np.asarray(rest), np.asarray(held)) for rest, held in splitter.split(np.zeros(len(hot)), hot)]


def multilabel_val(hot: np.ndarray, val_fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """(train, val) indices: a validation share stratified across labels (iterative stratification)."""
    if val_fraction <= 0 or len(hot) < 3:
        return list(range(len(hot))), []
    from iterstrat.ml_stratifiers import MultilabelStratifiedShuffleSplit

    splitter = MultilabelStratifiedShuffleSplit(n_splits=1, test_size=val_fraction, random_state=seed % 2**32)
    train, val = next(splitter.split(np.zeros(len(hot)), hot))
    return sorted(train.tolist()), sorted(val.tolist())


def fold_splits(pool: Sequence[Sample], class_names: Sequence[str], folds: int, seed: int, val_fraction: float) -> list[dict[str, list[Sample]]]:
    """[{train, val, test}] per fold; the same folds for the same (images, K, seed), whatever else the run changes."""
    if any(isinstance(label, tuple) for _, label in pool):
        return _multilabel_fold_splits(pool, class_names, folds, seed, val_fraction)
    labels = [class_index(label) for _, label in pool]
    counts = Counter(labels)
    smallest, count = min(((class_names[c], n) for c, n in counts.items()), key=lambda item: item[1])
    if folds < 2 or count < folds:
        raise ConfigError(
            f"cv.folds: expected 2 <= K <= the images of the smallest class, got {folds} "
            f"(class {smallest!r} has {count} usable non-test image(s)); lower cv.folds"
        )
    splitter = StratifiedKFold(n_splits=folds, shuffle=True, random_state=seed % 2**32)
    found = []
    for rest, held_out in splitter.split([[0]] * len(pool), labels):
        rest_labels = [labels[i] for i in rest]
        train_i, val_i, _ = stratified_split(rest_labels, val_fraction, 0.0, seed)
        found.append(
            {
                "train": [pool[rest[i]] for i in train_i],
                "val": [pool[rest[i]] for i in val_i],
                "test": [pool[i] for i in sorted(held_out)],
            }
        )
    return found


def _multilabel_fold_splits(
    pool: Sequence[Sample], names: Sequence[str], folds: int, seed: int, val_fraction: float
) -> list[dict[str, list[Sample]]]:
    hot = multi_hot([label for _, label in pool], len(names))
    if folds < 2 or folds > len(pool):
        raise ConfigError(f"cv.folds: expected 2 <= K <= the {len(pool)} usable non-test image(s), got {folds}; lower cv.folds")
    rare = [(names[k], int(n)) for k, n in enumerate(counts([label for _, label in pool], len(names))) if n < folds]
    if rare:
        raise ConfigError(
            f"cv.folds: label {rare[0][0]!r} has {rare[0][1]} usable non-test image(s), fewer than the {folds} folds, so some fold "
            f"could not test it; lower cv.folds or add images" + (f" ({len(rare) - 1} more such label(s))" if len(rare) > 1 else "")
        )
    found = []
    for rest, held_out in multilabel_folds(hot, folds, seed):
        train_i, val_i = multilabel_val(hot[rest], val_fraction, seed)
        found.append({"train": [pool[rest[i]] for i in train_i], "val": [pool[rest[i]] for i in val_i], "test": [pool[i] for i in sorted(held_out)]})
    return found
