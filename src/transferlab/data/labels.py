"""What an image's label is: one class (`data.task=single`) or a set of labels (`data.task=multilabel`).

A sample is `(path, label)`. For a single-label task the label is a class index; for a multi-label task it is a
sorted tuple of label indices, possibly empty (an image with none of the labels is allowed, and counted). Loaders
turn a label set into a multi-hot float vector [K] (`target`), which the sigmoid head and its binary losses take;
every file a person reads writes a set as the label names joined by `;` (`joined`, `parse_joined`).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Union

import numpy as np
import torch

from transferlab.core.errors import ConfigError

Label = Union[int, tuple[int, ...]]
TASKS = ("single", "multilabel")
SEPARATOR = ";"


def check_task(task: object) -> bool:
    """True for data.task=multilabel, False for single; one line for anything else."""
    if task not in TASKS:
        raise ConfigError(f"data.task: expected single or multilabel, got {task!r}")
    return task == "multilabel"


def label_set(label: Label) -> tuple[int, ...]:
    """The labels an image holds: its set, or its one class."""
    return label if isinstance(label, tuple) else (int(label),)


def class_index(label: Label) -> int:
    """The class of a single-label sample (a label set here is a bug of the caller: single-label code only)."""
    if isinstance(label, tuple):
        raise TypeError("a label set where a single class was expected (data.task=multilabel reached single-label code)")
    return int(label)


def target(label: Label, num_labels: int | None) -> Union[int, torch.Tensor]:
    """What a loader yields: the class index (single-label, `num_labels` None) or the multi-hot vector [K]."""
    if num_labels is None:
        if isinstance(label, tuple):
            raise TypeError("a label set needs the number of labels (a multi-label dataset passes num_labels)")
        return int(label)
    hot = torch.zeros(num_labels, dtype=torch.float32)
    hot[list(label_set(label))] = 1.0
    return hot


def multi_hot(labels: Sequence[Label], num_labels: int) -> np.ndarray:
    """[N, K] 0/1 matrix of label sets (or of single labels, one 1 per row)."""
    found = np.zeros((len(labels), num_labels), dtype=np.int64)
    for row, label in enumerate(labels):
        found[row, list(label_set(label))] = 1
    return found


def members(labels: Sequence[Label]) -> dict[int, list[int]]:
    """{label: indices of the samples that hold it}: a class's images, or every image tagged with a label."""
    found: dict[int, list[int]] = {}
    for index, label in enumerate(labels):
        for one in label_set(label):
            found.setdefault(one, []).append(index)
    return found


def counts(labels: Sequence[Label], num_labels: int) -> np.ndarray:
    """Images per class or per label."""
    return multi_hot(labels, num_labels).sum(axis=0) if labels else np.zeros(num_labels, dtype=np.int64)


def joined(label: Label, names: Sequence[str]) -> str:
    """`cat;dog`: a label set as the names, in label order; a single label is its class name."""
    return SEPARATOR.join(names[i] for i in label_set(label))


def over_thresholds(probs: np.ndarray, thresholds: Sequence[float]) -> np.ndarray:
    """[N, K] booleans: each label's probability at or over its threshold ([K], or [N, K]: each image's own). One rule
    for every place a label set is decided (test files, predict, serve, the API), so they cannot disagree at a tie."""
    cuts = np.asarray(thresholds, dtype=np.float64)
    return np.asarray(probs, dtype=np.float64) >= (cuts if cuts.ndim == 2 else cuts[None, :])


def predicted_sets(probs: np.ndarray, thresholds: Sequence[float], names: Sequence[str]) -> list[str]:
    """Each row's labels at or over their threshold, `;`-joined (blank: none)."""
    return [SEPARATOR.join(name for name, on in zip(names, row) if on) for row in over_thresholds(probs, thresholds)]


def parse_joined(text: str, index_of: dict[str, int], where: str) -> tuple[int, ...]:
    """The label set of a `;`-joined cell (blank: no labels); an unknown name is one line naming `where`."""
    found = set()
    for name in (part.strip() for part in str(text).split(SEPARATOR)):
        if not name:
            continue
        if name not in index_of:
            raise ConfigError(f"{where}: unknown label {name!r}; expected one of {', '.join(sorted(index_of)[:20])}")
        found.add(index_of[name])
    return tuple(sorted(found))


def sorted_names(sets: Iterable[Iterable[str]]) -> list[str]:
    """Every label name that occurs, sorted: the label order of a multi-label dataset."""
    return sorted({name for names in sets for name in names})


SWAPPED_MONITORS = {"val/acc": "val/map", "val/acc_best": "val/map"}  # single-label metric -> the multi-label one


def task_metric(metric: str | None, multilabel: bool) -> str | None:
    """A monitored or optimised metric for this task: a multi-label run has no accuracy, so the single-label defaults
    (`val/acc` of the checkpoint and early stopping, `val/acc_best` of sweeps) stand for `val/map`."""
    return SWAPPED_MONITORS.get(metric, metric) if multilabel and metric else metric
