"""Multi-label metrics against scikit-learn and torchmetrics on random data (ties, masks, empty labels), the
bootstrap's honesty at the edges, and per-label temperature scaling. Pure numbers, no data, a few seconds."""

from __future__ import annotations

import json
import math
import warnings

import numpy as np
import pytest
import torch
from scipy.special import expit, logit
from sklearn.metrics import accuracy_score, average_precision_score, f1_score, hamming_loss, precision_score, recall_score
from torchmetrics.functional.classification import binary_calibration_error

from transferlab.core.statistics import clopper_pearson
from transferlab.models.multilabel_metrics import (
    _average_precisions,
    average_precision,
    best_f1_thresholds,
    binary_ece,
    label_temperatures,
    multilabel_intervals,
    multilabel_metrics,
)


def scored(n: int, k: int, seed: int, rounding: int = 2) -> tuple[np.ndarray, np.ndarray]:
    """Probabilities that rank positives higher but not perfectly, rounded so that scores tie."""
    rng = np.random.default_rng(seed)
    targets = (rng.random((n, k)) < rng.uniform(0.1, 0.5, k)).astype(np.int64)
    probs = np.clip(0.35 * targets + 0.65 * rng.random((n, k)), 0, 1).round(rounding)
    return probs, targets


def sklearn_quiet(function, *args, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return function(*args, **kwargs)


# -- average precision -----------------------------------------------------------------------------------------
def test_average_precision_is_scikit_learns_with_ties_masks_and_an_empty_label():
    probs, targets = scored(300, 6, seed=1, rounding=1)  # 11 distinct scores: heavy ties
    targets[:, 5] = 0
    found = average_precision(torch.from_numpy(probs), torch.from_numpy(targets))
    expected = [average_precision_score(targets[:, k], probs[:, k]) for k in range(5)]
    assert found[:5] == pytest.approx(expected, abs=1e-12) and math.isnan(found[5])
    mask = (np.random.default_rng(2).random(probs.shape) > 0.3).astype(np.int64)
    masked = average_precision(probs, targets, mask)
    for k in range(5):
        kept = mask[:, k] > 0
        assert masked[k] == pytest.approx(average_precision_score(targets[kept, k], probs[kept, k]), abs=1e-12)


def test_the_bootstraps_weighted_average_precision_is_scikit_learns_with_sample_weights():
    probs, targets = scored(120, 4, seed=3)
    counts = np.random.default_rng(4).multinomial(120, np.full(120, 1 / 120), size=5).astype(np.float64)
    found = _average_precisions(probs, targets.astype(np.float64), np.ones_like(probs), counts.T)
    for r in range(5):
        expected = [average_precision_score(targets[:, k], probs[:, k], sample_weight=counts[r]) for k in range(4)]
        assert found[r] == pytest.approx(expected, abs=1e-12)


# -- thresholds ----------------------------------------------------------------------------------------------------
def test_best_f1_threshold_is_the_maximum_between_two_scores_and_falls_back_without_positives():
    probs, targets = scored(200, 5, seed=5)
    targets[:, 4] = 0
    thresholds, fell_back = best_f1_thresholds(probs, targets, fallback=0.4)
    assert fell_back.tolist() == [False] * 4 + [True] and thresholds[4] == 0.4
    for k in range(4):
        cuts = np.unique(probs[:, k])[::-1]
        scores = [f1_score(targets[:, k], probs[:, k] >= c) for c in cuts]
        best = int(np.argmax(scores))
        assert f1_score(targets[:, k], probs[:, k] >= thresholds[k]) == pytest.approx(max(scores))
        below = cuts[best + 1] if best + 1 < len(cuts) else 0.0
        assert thresholds[k] == pytest.approx((cuts[best] + below) / 2)
    # a tie in F1 goes to the higher threshold: cutting at 0.8 or at 0.2 both give F1 = 2/3
    thresholds, _ = best_f1_thresholds(np.array([[0.8], [0.6], [0.4], [0.2]]), np.array([[1], [0], [0], [1]]))
    assert thresholds[0] == pytest.approx(0.7)
    # a masked image is not there: without the masked negative at 0.9 the best cut is 0.7, halfway to 0.3
    thresholds, fell_back = best_f1_thresholds(np.array([[0.9], [0.7], [0.3]]), np.array([[0], [1], [0]]), mask=np.array([[0], [1], [1]]))
    assert thresholds[0] == pytest.approx(0.5) and not fell_back[0]
    assert best_f1_thresholds(np.zeros((0, 3)), np.zeros((0, 3)))[1].all()


# -- point metrics -------------------------------------------------------------------------------------------------
def test_multilabel_metrics_are_scikit_learns():
    probs, targets = scored(250, 7, seed=6)
    targets[:, 6] = 0
    probs[:, 6] *= 0.5  # label 6: no positive and (threshold 0.6) no prediction: undefined, left out
    thresholds = np.array([0.5, 0.55, 0.6, 0.45, 0.5, 0.99, 0.6])
    names = [f"l{k}" for k in range(7)]
    found = multilabel_metrics(probs, targets, thresholds, names)
    predicted = (probs >= thresholds).astype(np.int64)
    defined = list(range(6))
    for average in ("micro", "macro"):
        for metric, function in (("f1", f1_score), ("precision", precision_score), ("recall", recall_score)):
            expected = sklearn_quiet(function, targets, predicted, average=average, labels=defined, zero_division=0)
            assert found[f"{metric}_{average}"] == pytest.approx(expected, abs=1e-12), (metric, average)
    assert found["f1_micro"] == pytest.approx(f1_score(targets, predicted, average="micro"))
    assert found["hamming_loss"] == pytest.approx(hamming_loss(targets, predicted))
    assert found["subset_acc"] == pytest.approx(accuracy_score(targets, predicted))
    per_label = sklearn_quiet(f1_score, targets, predicted, average=None, zero_division=0)
    assert [found[f"f1/l{k}"] for k in defined] == pytest.approx(per_label[:6])
    assert "f1/l6" not in found and "ap/l6" not in found and "precision/l6" not in found and found["support/l6"] == 0
    assert found["map"] == pytest.approx(np.mean([average_precision_score(targets[:, k], probs[:, k]) for k in defined]))
    assert found["ece"] == pytest.approx(np.mean([binary_ece(probs[:, k], targets[:, k]) for k in range(7)]))
    bce = torch.nn.functional.binary_cross_entropy(torch.from_numpy(probs).clamp(1e-7, 1 - 1e-7), torch.from_numpy(targets).double())
    assert found["nll"] == pytest.approx(float(bce))
    assert found["label_cardinality"] == pytest.approx(predicted.sum(1).mean()) and found["true_cardinality"] == pytest.approx(targets.sum(1).mean())
    assert found["support/l0"] == targets[:, 0].sum()
    json.dumps(found, allow_nan=False)  # nothing undefined is written
    assert multilabel_metrics(np.zeros((0, 7)), np.zeros((0, 7)), thresholds, names) == {}


def test_a_masked_pair_is_left_out_of_every_count_and_is_right_for_the_exact_match():
    probs, targets = scored(150, 4, seed=7)
    mask = (np.random.default_rng(8).random(probs.shape) > 0.25).astype(np.int64)
    thresholds = np.full(4, 0.5)
    found = multilabel_metrics(probs, targets, thresholds, list("abcd"), mask=mask)
    predicted = (probs >= 0.5).astype(np.int64)
    right_where_masked = np.where(mask > 0, predicted, targets)
    assert found["hamming_loss"] == pytest.approx(hamming_loss(targets, right_where_masked))
    assert found["subset_acc"] == pytest.approx(accuracy_score(targets, right_where_masked))
    for k, name in enumerate("abcd"):
        kept = mask[:, k] > 0
        assert found[f"f1/{name}"] == pytest.approx(f1_score(targets[kept, k], predicted[kept, k]))
        assert found[f"ap/{name}"] == pytest.approx(average_precision_score(targets[kept, k], probs[kept, k]))
        assert found[f"ece/{name}"] == pytest.approx(binary_ece(probs[kept, k], targets[kept, k]))
    tp = (predicted * targets * mask).sum()
    assert found["f1_micro"] == pytest.approx(2 * tp / ((predicted * mask).sum() + (targets * mask).sum()))


def test_binary_ece_is_torchmetrics():
    rng = np.random.default_rng(9)
    probs = rng.random(500) ** 2
    targets = (rng.random(500) < probs**0.7).astype(np.int64)
    expected = binary_calibration_error(torch.from_numpy(probs).float(), torch.from_numpy(targets), n_bins=15, norm="l1")
    assert binary_ece(probs, targets) == pytest.approx(float(expected), abs=1e-5)
    assert binary_ece(np.ones(4), np.ones(4)) == 0.0 and math.isnan(binary_ece([], []))


# -- intervals -----------------------------------------------------------------------------------------------------
def test_intervals_contain_the_point_shrink_with_more_images_and_repeat_with_the_seed():
    widths = []
    for n in (60, 600):
        probs, targets = scored(n, 5, seed=10)
        thresholds, _ = best_f1_thresholds(probs, targets)
        point = multilabel_metrics(probs, targets, thresholds, [], per_label=False)
        found = multilabel_intervals(probs, targets, thresholds, seed=3, resamples=500)
        assert set(found) == {"map_ci95", "f1_micro_ci95", "f1_macro_ci95"}
        for name in ("map", "f1_micro", "f1_macro"):
            low, high = found[f"{name}_ci95"]
            assert low < point[name] < high
        widths.append(found["map_ci95"][1] - found["map_ci95"][0])
        assert multilabel_intervals(probs, targets, thresholds, seed=3, resamples=500) == found
    assert widths[1] < widths[0] / 2


def test_a_perfect_score_gets_the_clopper_pearson_interval_of_its_images_not_zero_width():
    targets = np.tile(np.eye(4, dtype=np.int64), (5, 1))  # 20 images, each label on 5
    probs = np.where(targets > 0, 0.9, 0.1)
    found = multilabel_intervals(probs, targets, np.full(4, 0.5), resamples=300)
    low = clopper_pearson(20, 20)[0]
    assert low == pytest.approx(0.8316, abs=1e-4)
    for name in ("map", "f1_micro", "f1_macro"):
        assert found[f"{name}_ci95"] == pytest.approx([low, 1.0])
    never = multilabel_intervals(probs, targets, np.full(4, 0.95), resamples=300)  # F1 0: nothing predicted
    assert never["f1_micro_ci95"] == pytest.approx([0.0, clopper_pearson(0, 20)[1]])
    assert multilabel_intervals(np.zeros((0, 4)), np.zeros((0, 4)), np.full(4, 0.5)) == {}


def test_a_mask_in_the_bootstrap_keeps_a_label_without_counted_positives_out():
    probs, targets = scored(80, 3, seed=11)
    mask = np.ones_like(targets)
    mask[:, 2] = 1 - targets[:, 2]  # label 2's positives are all difficult
    with_mask = multilabel_intervals(probs, targets, np.full(3, 0.5), resamples=300, mask=mask)
    without_label = multilabel_intervals(probs[:, :2], targets[:, :2], np.full(2, 0.5), resamples=300)
    assert with_mask["map_ci95"] == pytest.approx(without_label["map_ci95"])


# -- temperatures --------------------------------------------------------------------------------------------------
def test_label_temperatures_undo_a_known_overconfidence_cap_a_perfect_label_and_keep_one_without_images():
    rng = np.random.default_rng(12)
    true_logits = rng.normal(0, 2, (4000, 3))
    targets = (rng.random((4000, 3)) < expit(true_logits)).astype(np.int64)
    raw = true_logits * np.array([3.0, 1.0, 0.5])
    temperatures, rules, fitted = label_temperatures(raw, targets)
    assert temperatures == pytest.approx([3.0, 1.0, 0.5], rel=0.06) and rules[0] == "fitted"
    for k in range(3):  # a calibrated label may want T a shade below 1, which the Laplace cap may hold back
        confidence = np.mean(np.maximum(expit(raw[:, k] / temperatures[k]), 1 - expit(raw[:, k] / temperatures[k])))
        cap = (np.sum((raw[:, k] >= 0) == (targets[:, k] > 0)) + 1) / (4000 + 2)
        assert rules[k] == "fitted" or (rules[k] == "capped_at_laplace_accuracy" and confidence == pytest.approx(cap, abs=1e-9))
    alone, _, _ = label_temperatures(raw[:, :1], targets[:, :1])  # separable: one label's fit ignores the others
    assert alone[0] == pytest.approx(temperatures[0], rel=1e-4)

    separated = np.r_[np.ones(15), np.zeros(15)].astype(np.int64)[:, None]  # every image right at 0.5
    raw = np.where(separated > 0, 1.0, -1.0)
    mask = np.ones((30, 2))
    mask[:, 1] = 0
    temperatures, rules, fitted = label_temperatures(torch.from_numpy(np.c_[raw, raw]), np.c_[separated, separated], mask)
    cap = 31 / 32  # Laplace: (30 + 1) / (30 + 2)
    assert rules == ["capped_at_laplace_accuracy", "no_held_out_images"]
    assert fitted[0] < temperatures[0] < 1 and expit(1 / temperatures[0]) == pytest.approx(cap, abs=1e-9)
    assert temperatures[0] == pytest.approx(1 / logit(cap), rel=1e-6)
    assert temperatures[1] == 1.0 and math.isnan(fitted[1])
