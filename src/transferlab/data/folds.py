"""Cross-validation splits (cv.folds=K): stratified, seeded folds over every image that is not in an official test list.

Fold k holds out its k-th part as that fold's test set (the out-of-fold images); the rest is split once more,
stratified, into training and validation images (checkpoint selection and calibration need a validation set
that the out-of-fold images never take part in). Over the K folds every image is out-of-fold exactly once.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence

from sklearn.model_selection import StratifiedKFold

from transferlab.core.errors import ConfigError
from transferlab.data.images import Sample
from transferlab.data.splits import stratified_split


def fold_splits(pool: Sequence[Sample], class_names: Sequence[str], folds: int, seed: int, val_fraction: float) -> list[dict[str, list[Sample]]]:
    """[{train, val, test}] per fold; the same folds for the same (images, K, seed), whatever else the run changes."""
    labels = [label for _, label in pool]
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
