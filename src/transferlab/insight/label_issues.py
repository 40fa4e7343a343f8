"""Images whose label looks wrong, and images unlike every class, from frozen features alone (no fine-tuning).

Label issues: confident learning (Northcutt et al. 2021) on out-of-fold probabilities. Every image gets
probabilities from a linear probe that never saw it (models.linear_probe.select_by_cv: K stratified folds, the
L2 strength chosen by the pooled held-out accuracy); cleanlab's `find_label_issues` flags the images whose given
label disagrees with what the other images imply, ranked by self-confidence (the probability of the given label).

Multi-label data (labels: a 0/1 matrix [N, K]) gets a one-vs-rest probe (K binary logistic regressions, folds
stratified across labels, C chosen by the out-of-fold mAP) and sigmoid probabilities, and cleanlab's multi-label
functions (`cleanlab.multilabel_classification`): `filter.find_label_issues` flags an image when any of its labels
looks wrong (each label's given yes / no against the others' one-vs-rest confident joint), and
`rank.get_label_quality_scores` (self-confidence per label, aggregated over labels by an exponential moving
average that weighs the worst label most) orders them; the suggested set is the labels whose out-of-fold
probability is at least 0.5 (the probe's own decision: a logistic regression's sigmoid, no tuned threshold).

Outliers: an image's mean cosine similarity to its k nearest neighbours (the density score cleanlab's
OutOfDistribution uses on features), flagged where it is more than `z` robust standard deviations (1.4826 x median
absolute deviation) below the median: an image unlike every other image, hence unlike every class.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from transferlab.data.labels import Label
from transferlab.models.linear_probe import select_by_cv
from transferlab.models.multilabel_metrics import average_precision

CHUNK = 4096


@dataclass
class OutOfFold:
    probs: np.ndarray  # [N, K], each row from a probe that did not train on that image
    c: float  # the L2 strength the folds chose
    accuracy: float  # out-of-fold accuracy against the given labels (multi-label: mAP)
    metric: str = "accuracy"  # what `accuracy` holds: accuracy, or map for multi-label data


def out_of_fold_probabilities(features: np.ndarray, labels: np.ndarray, num_classes: int, folds: int, seed: int) -> OutOfFold:
    """K-fold linear-probe probabilities of every image (memory: the [N, D] features once in float64); labels [N]
    class indices (softmax probe), or [N, K] 0/1 label sets (one-vs-rest probe, sigmoid probabilities)."""
    x = torch.from_numpy(np.asarray(features, dtype=np.float32))
    multilabel = np.ndim(labels) == 2
    y = torch.from_numpy(np.asarray(labels, dtype=np.float32 if multilabel else np.int64))
    fit = select_by_cv((x, y), num_classes, standardize=False, folds=folds, seed=seed)
    assert fit.held_out is not None
    if multilabel:
        probs = fit.held_out[0].double().sigmoid().numpy()
        ap = average_precision(probs, np.asarray(labels))
        return OutOfFold(probs, fit.c, float(np.mean(ap[np.isfinite(ap)])) if np.isfinite(ap).any() else 0.0, "map")
    probs = fit.held_out[0].softmax(dim=-1).numpy()
    return OutOfFold(probs, fit.c, float((probs.argmax(axis=1) == labels).mean()))


@dataclass
class LabelIssue:
    index: int
    given: Label  # a class index, or (multi-label) the given label set
    suggested: Label  # the class the probe prefers, or the set of labels at or over 0.5
    score: float  # 1 - cleanlab's label quality (self-confidence; multi-label: aggregated over labels): higher = more suspicious


def find_label_issues(labels: np.ndarray, probs: np.ndarray) -> list[LabelIssue]:
    """cleanlab's confident-learning filter, most suspicious first."""
    from cleanlab.filter import find_label_issues as cleanlab_issues
    from cleanlab.rank import get_label_quality_scores

    labels = np.asarray(labels, dtype=np.int64)
    if len(np.unique(labels)) < 2:
        return []
    ranked = cleanlab_issues(labels, probs, return_indices_ranked_by="self_confidence")
    quality = get_label_quality_scores(labels, probs, method="self_confidence")
    return [LabelIssue(int(i), int(labels[i]), int(probs[i].argmax()), float(1.0 - quality[i])) for i in ranked]


def find_multilabel_issues(labels: np.ndarray, probs: np.ndarray, cut: float = 0.5) -> list[LabelIssue]:
    """cleanlab's multi-label filter on label sets ([N, K] 0/1) and out-of-fold sigmoid probabilities [N, K], most
    suspicious first (lowest aggregated label quality)."""
    from cleanlab.multilabel_classification.filter import find_label_issues as cleanlab_issues
    from cleanlab.multilabel_classification.rank import get_label_quality_scores

    hot = np.asarray(labels) > 0.5
    if hot.shape[1] < 2 or not hot.any() or hot.all():
        return []  # nothing to contrast: every label absent, or present, everywhere
    sets = [np.flatnonzero(row).tolist() for row in hot]
    probs = np.clip(np.asarray(probs, dtype=np.float64), 0.0, 1.0)
    flagged = np.flatnonzero(cleanlab_issues(labels=sets, pred_probs=probs))
    quality = get_label_quality_scores(sets, probs)
    ranked = sorted(flagged.tolist(), key=lambda i: (quality[i], i))
    return [LabelIssue(i, tuple(sets[i]), tuple(np.flatnonzero(probs[i] >= cut).tolist()), float(1.0 - quality[i])) for i in ranked]


@dataclass
class Outlier:
    index: int
    nearest: int  # the class whose centre is closest
    similarity: float  # mean cosine similarity to its nearest neighbours
    z: float  # robust standard deviations below the median of that


def _normalised(block: np.ndarray) -> np.ndarray:
    block = np.asarray(block, dtype=np.float32)
    return block / np.maximum(np.linalg.norm(block, axis=1, keepdims=True), 1e-12)


def find_outliers(features: np.ndarray, labels: np.ndarray, num_classes: int, neighbour_similarity: np.ndarray, z: float) -> list[Outlier]:
    """Images far from all others (`neighbour_similarity` [N, k] from duplicates.nearest_neighbours), least typical
    first, each with the class whose centre is nearest (features read in chunks; labels [N] or [N, K] 0/1 label
    sets, where an image counts towards the centre of each of its labels)."""
    labels = np.asarray(labels)
    density = np.asarray(neighbour_similarity, dtype=np.float64).mean(axis=1)
    median = float(np.median(density))
    spread = 1.4826 * float(np.median(np.abs(density - median))) or 1e-12
    scores = (median - density) / spread
    flagged = [int(i) for i in np.argsort(-scores) if scores[i] > z]
    if not flagged:
        return []
    centres = np.zeros((num_classes, features.shape[1]), dtype=np.float64)
    for start in range(0, len(features), CHUNK):
        block = _normalised(features[start : start + CHUNK])
        if labels.ndim == 2:
            centres += labels[start : start + CHUNK].T.astype(np.float64) @ block
        else:
            np.add.at(centres, labels[start : start + CHUNK], block)
    nearest = _normalised(np.asarray(features[flagged])) @ _normalised(centres).T
    return [Outlier(i, int(row.argmax()), float(density[i]), float(scores[i])) for i, row in zip(flagged, nearest)]
