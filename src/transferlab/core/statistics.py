"""How sure a number is: exact intervals for test metrics, paired comparisons, intervals over folds and seeds.

Plain numpy over per-image labels and predictions, so a run (metrics.json), cross-validation (cv_summary.json)
and a sweep report (from the runs' test_predictions.csv) compute them the same way.

The intervals answer "where could this number be on another test set of the same size from the same source",
and stay honest at the edges (22 of 22 right, 2 test images per class):

- accuracy (and top-3 accuracy): the exact Clopper-Pearson interval of `correct` successes in `n` trials. Its
  coverage is at least 95 % for every n and every true accuracy; at 22 of 22 it is [0.846, 1].
- balanced accuracy and macro-F1: Clopper-Pearson at an *effective* sample size (Korn & Graubard 1998, the
  interval survey statisticians use for weighted proportions): n_eff = v (1 - v) / var, with var the jackknife
  variance of the metric over test images, at most n; where the jackknife sees no variation (every image right)
  n_eff is Kish's size of the class-weighted mean, classes^2 / sum(1 / images of class), so a perfect score on
  7 cats and 15 dogs gets [0.824, 1] and not a zero-width interval. With one image per class the variance is
  large and the interval wide, as it should be.
- The jackknife leaves out one image at a time, but images in the same (true, predicted) cell give the same
  value, so it is computed once per distinct cell, in closed form: memory grows with the cells, never n x K x K.

tests/test_evaluation.py simulates the coverage (>= 0.93 for n in 10, 22, 74, 400 and true rates 0.5 to 1.0,
two classes 1:2 and 37 classes). A paired bootstrap resamples the same images for two models at once, so what
they share (easy and hard images) cancels and only their difference is tested. Over cross-validation folds,
whose training sets overlap, the t-interval uses Nadeau & Bengio's (2003) corrected variance.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from scipy import stats

RESAMPLES = 2000  # >= 1,000 for a stable 95 % percentile interval of a paired difference (Efron & Tibshirani, ch. 13)
CONFIDENCE = 0.95
INTERVAL_METRICS = ("acc", "balanced_acc", "macro_f1")
INTERVAL_METHODS = {
    "acc": "Clopper-Pearson (exact)",
    "balanced_acc": "Clopper-Pearson at the jackknife effective sample size (Korn-Graubard)",
    "macro_f1": "Clopper-Pearson at the jackknife effective sample size (Korn-Graubard)",
}


def confusion_matrix(labels: Sequence[int], predicted: Sequence[int], num_classes: int) -> np.ndarray:
    """[K, K] counts, true x predicted."""
    labels_arr, predicted_arr = np.asarray(labels, dtype=np.int64), np.asarray(predicted, dtype=np.int64)
    return np.bincount(labels_arr * num_classes + predicted_arr, minlength=num_classes * num_classes).reshape(num_classes, num_classes)


def class_metrics(diagonal: np.ndarray, support: np.ndarray, predicted: np.ndarray) -> dict[str, np.ndarray]:
    """acc, balanced_acc (mean recall over classes present) and macro_f1 (over classes present or predicted) of
    rows of per-class counts [..., K]: right answers, true images and predictions of each class.

    A class absent from the test set is left out of the class means, as scikit-learn's balanced accuracy does;
    macro-F1 counts a class that is predicted but absent with F1 = 0 (sklearn's `labels=None` convention).
    """
    diagonal, support, predicted = (np.asarray(a, dtype=np.float64) for a in (diagonal, support, predicted))
    present = support > 0
    counted = present | (predicted > 0)
    recall = np.divide(diagonal, support, out=np.zeros_like(diagonal), where=present)
    f1 = np.divide(2 * diagonal, support + predicted, out=np.zeros_like(diagonal), where=counted)  # = 2PR / (P + R)
    return {
        "acc": diagonal.sum(axis=-1) / np.maximum(support.sum(axis=-1), 1),
        "balanced_acc": (recall * present).sum(axis=-1) / np.maximum(present.sum(axis=-1), 1),
        "macro_f1": (f1 * counted).sum(axis=-1) / np.maximum(counted.sum(axis=-1), 1),
    }


def metrics_of_confusions(confusions: np.ndarray) -> dict[str, np.ndarray]:
    """class_metrics of confusion matrices [..., K, K]."""
    return class_metrics(np.diagonal(confusions, axis1=-2, axis2=-1), confusions.sum(axis=-1), confusions.sum(axis=-2))


def point_metrics(labels: Sequence[int], predicted: Sequence[int], num_classes: int) -> dict[str, float]:
    return {k: float(v) for k, v in metrics_of_confusions(confusion_matrix(labels, predicted, num_classes)).items()}


def leave_one_out(confusion: np.ndarray) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """({metric: value without one image of cell c}, images in cell c) for every non-empty (true, predicted) cell:
    the jackknife as per-class count vectors, a bounded chunk of cells at a time (never one K x K matrix per image)."""
    rows, cols = np.nonzero(confusion)
    chunk = max(1, 2_000_000 // max(1, confusion.shape[0]))  # ~16 MB per [chunk, K] float64 array
    counts = confusion[rows, cols].astype(np.float64)
    diagonal, support, predicted = (np.asarray(a, dtype=np.float64) for a in (np.diagonal(confusion), confusion.sum(1), confusion.sum(0)))
    found: dict[str, list[np.ndarray]] = {name: [] for name in INTERVAL_METRICS}
    for start in range(0, len(rows), chunk):
        r, c = rows[start : start + chunk], cols[start : start + chunk]
        at = np.arange(len(r))
        d, s, p = (np.repeat(a[None], len(r), axis=0) for a in (diagonal, support, predicted))
        s[at, r] -= 1
        p[at, c] -= 1
        d[at, r] -= r == c
        for name, values in class_metrics(d, s, p).items():
            found[name].append(values)
    return {name: np.concatenate(values) if values else np.zeros(0) for name, values in found.items()}, counts


def clopper_pearson(successes: float, trials: float, confidence: float = CONFIDENCE) -> list[float]:
    """The exact binomial interval (Beta quantiles), also for the non-whole counts of an effective sample size."""
    if trials <= 0:
        return [0.0, 1.0]
    tail = (1 - confidence) / 2
    successes = min(max(successes, 0.0), trials)
    low = 0.0 if successes <= 0 else float(stats.beta.ppf(tail, successes, trials - successes + 1))
    high = 1.0 if successes >= trials else float(stats.beta.ppf(1 - tail, successes + 1, trials - successes))
    return [low, high]


def kish_size(support: np.ndarray) -> float:
    """Kish's effective sample size of a mean over classes that weighs every present class equally."""
    sizes = np.asarray(support, dtype=np.float64)
    sizes = sizes[sizes > 0]
    return float(len(sizes) ** 2 / np.sum(1.0 / sizes)) if len(sizes) else 0.0


def metric_intervals(labels: Sequence[int], predicted: Sequence[int], num_classes: int, confidence: float = CONFIDENCE) -> dict[str, list[float]]:
    """{metric: [low, high]} for acc, balanced_acc and macro_f1 (INTERVAL_METHODS says how); deterministic."""
    confusion = confusion_matrix(labels, predicted, num_classes)
    n = int(confusion.sum())
    if n == 0:
        return {}
    observed = {k: float(v) for k, v in metrics_of_confusions(confusion).items()}
    found = {"acc": clopper_pearson(float(np.trace(confusion)), n, confidence)}
    left_out, weights = leave_one_out(confusion)
    fallback = kish_size(confusion.sum(1))
    for name in ("balanced_acc", "macro_f1"):
        value = observed[name]
        mean = float(np.sum(weights * left_out[name]) / n)
        variance = (n - 1) / n * float(np.sum(weights * (left_out[name] - mean) ** 2)) if n > 1 else 0.0
        effective = value * (1 - value) / variance if variance > 1e-15 and 0 < value < 1 else fallback
        effective = min(max(effective, 1.0), float(n))
        found[name] = clopper_pearson(value * effective, effective, confidence)
    return found


def proportion_interval(successes: int, trials: int, confidence: float = CONFIDENCE) -> list[float]:
    """Clopper-Pearson for a plain proportion (top-3 accuracy, a class's recall)."""
    return clopper_pearson(float(successes), float(trials), confidence)


def _resamples(n: int, resamples: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, n, size=(resamples, n))


def _percentiles(values: np.ndarray, confidence: float) -> list[float]:
    tail = (1 - confidence) / 2 * 100
    low, high = np.percentile(values, [tail, 100 - tail])
    return [float(low), float(high)]


@dataclass
class Comparison:
    """Model B against model A on per-image correctness: difference of accuracy (B - A), its interval, a p-value."""

    difference: float
    ci95: list[float]
    p_value: float
    images: int
    paired: bool

    def verdict(self, alpha: float = 0.05) -> str:
        if self.p_value >= alpha:
            return "indistinguishable"
        return "worse" if self.difference < 0 else "better"


def _p_value(differences: np.ndarray) -> float:
    """Two-sided bootstrap p-value of `difference = 0`: twice the smaller tail, with the +1 correction (never 0)."""
    below, above = np.sum(differences <= 0), np.sum(differences >= 0)
    return float(min(1.0, 2 * (min(below, above) + 1) / (len(differences) + 1)))


def paired_bootstrap(correct_a: Sequence[bool], correct_b: Sequence[bool], seed: int, resamples: int = RESAMPLES) -> Comparison:
    """Both models judged on the same images (position i = the same image): resample images, not models."""
    a, b = np.asarray(correct_a, dtype=np.float64), np.asarray(correct_b, dtype=np.float64)
    if a.shape != b.shape or a.size == 0:
        raise ValueError(f"a paired comparison needs the same images on both sides (got {a.size} and {b.size})")
    rows = _resamples(len(a), resamples, seed)
    differences = b[rows].mean(axis=1) - a[rows].mean(axis=1)
    return Comparison(float(b.mean() - a.mean()), _percentiles(differences, CONFIDENCE), _p_value(differences), len(a), True)


def unpaired_bootstrap(correct_a: Sequence[bool], correct_b: Sequence[bool], seed: int, resamples: int = RESAMPLES) -> Comparison:
    """Two models tested on different images (different splits): each side resampled on its own."""
    a, b = np.asarray(correct_a, dtype=np.float64), np.asarray(correct_b, dtype=np.float64)
    if a.size == 0 or b.size == 0:
        raise ValueError("a comparison needs test images on both sides")
    rng = np.random.default_rng(seed)
    means_a = a[rng.integers(0, len(a), size=(resamples, len(a)))].mean(axis=1)
    means_b = b[rng.integers(0, len(b), size=(resamples, len(b)))].mean(axis=1)
    differences = means_b - means_a
    centred = differences - differences.mean()  # the null: the same accuracy, the observed spread
    observed = float(b.mean() - a.mean())
    p_value = float(min(1.0, (np.sum(np.abs(centred) >= abs(observed)) + 1) / (resamples + 1)))
    return Comparison(observed, _percentiles(differences, CONFIDENCE), p_value, min(len(a), len(b)), False)


def mean_std_interval(values: Sequence[float], test_to_train: float = 0.0) -> tuple[float, float, list[float]]:
    """(mean, sample std, 95 % t-interval of the mean) of a few repeated measurements (folds, seeds).

    `test_to_train` > 0: the measurements come from resampled training sets that overlap (K-fold CV: each pair of
    folds shares (K-2)/(K-1) of its training images), so they are correlated and the plain t-interval is too
    narrow; Nadeau & Bengio's corrected resampled t uses the variance (1/J + n_test/n_train) s^2 instead of s^2/J.
    """
    data = np.asarray([v for v in values if v is not None and math.isfinite(v)], dtype=np.float64)
    if data.size == 0:
        return math.nan, math.nan, [math.nan, math.nan]
    mean = float(data.mean())
    if data.size == 1:
        return mean, 0.0, [mean, mean]
    std = float(data.std(ddof=1))
    half = float(stats.t.ppf(0.5 + CONFIDENCE / 2, data.size - 1)) * std * math.sqrt(1 / data.size + test_to_train)
    return mean, std, [mean - half, mean + half]


def fold_test_to_train(folds: int) -> float:
    """n_test / n_train of K-fold cross-validation: one fold held out, K - 1 trained on."""
    return 1.0 / (folds - 1)


def corrected_paired_t(scores_a: Sequence[float], scores_b: Sequence[float], test_to_train: float) -> tuple[float, float]:
    """(mean difference b - a, two-sided p) of two models scored on the same cross-validation folds: Nadeau & Bengio's
    corrected resampled paired t-test (variance (1/J + n_test/n_train) s^2 of the per-fold differences, J - 1 degrees
    of freedom). The folds' training sets overlap, so the plain paired t-test finds differences that are not there.
    Identical differences on every fold leave no variance: p = 1 when they are all 0, else 0."""
    a, b = np.asarray(scores_a, dtype=np.float64), np.asarray(scores_b, dtype=np.float64)
    if a.shape != b.shape or a.size < 2:
        raise ValueError(f"a paired test needs the same folds on both sides, at least 2 (got {a.size} and {b.size})")
    differences = b - a
    mean = float(differences.mean())
    variance = float(differences.var(ddof=1)) * (1 / differences.size + test_to_train)
    if variance <= 1e-24:
        return mean, 1.0 if abs(mean) < 1e-12 else 0.0
    t = mean / math.sqrt(variance)
    return mean, float(min(1.0, 2 * stats.t.sf(abs(t), differences.size - 1)))
