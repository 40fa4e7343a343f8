"""What a multi-label classifier's sigmoid outputs on a split say: per-label AP and its mean, F1 at chosen thresholds,
calibration, intervals over images, and a per-label temperature.

Pure numpy over [N, K] arrays (probabilities, 0/1 targets and an optional mask: 0 leaves one image out for one label
only, as Pascal VOC's "difficult" objects are), so training, evaluation and reports compute them the same way.
Definitions are scikit-learn's (average_precision_score, f1_score, hamming_loss, accuracy_score), with one rule for
what is undefined: a metric with nothing to measure (AP of a label without a counted positive; F1, precision and
recall of a label with neither a positive nor a prediction) is left out of its means and out of the returned dict,
never written as NaN or a made-up 0.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from scipy import optimize, special

from transferlab.core.statistics import CONFIDENCE, RESAMPLES, clopper_pearson
from transferlab.models.evaluation import ECE_BINS, TEMPERATURE_RANGE

CLIP = 1e-7  # probabilities are clipped to [CLIP, 1 - CLIP] for the NLL: one saturated sigmoid must not make it infinite
CHUNK_VALUES = 4_000_000  # images x resamples per bootstrap chunk: ~32 MB per float64 array


def _array(values: Any) -> np.ndarray:
    if isinstance(values, torch.Tensor):
        values = values.detach().cpu()
    return np.asarray(values, dtype=np.float64)


def _cuts(thresholds: Any) -> np.ndarray:
    """Thresholds [K] for every image, or [N, K] per image (out-of-fold predictions: each fold's own)."""
    cuts = _array(thresholds)
    return cuts if cuts.ndim == 2 else cuts.reshape(1, -1)


def _inputs(probs: Any, targets: Any, mask: Any = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(probs, targets in {0, 1}, mask in {0, 1}) as float64 [N, K]; no mask counts every pair."""
    p, y = _array(probs), _array(targets)
    p, y = (a.reshape(0, 0) if a.size == 0 and a.ndim < 2 else a for a in (p, y))  # [] is no images
    m = np.ones_like(p) if mask is None else _array(mask)
    if p.ndim != 2 or p.shape != y.shape or p.shape != m.shape:
        raise ValueError(f"probs, targets and mask must all be [N, K] (got {p.shape}, {y.shape}, {m.shape})")
    return p, (y > 0.5).astype(np.float64), (m > 0.5).astype(np.float64)


def _average_precisions(p: np.ndarray, y: np.ndarray, m: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """AP [R, K] of R weightings of the images (counts [N, R]: 1s for the data itself, bootstrap counts for resamples).

    Each label is sorted once. A threshold admits a group of tied scores at once (sklearn's precision_recall_curve),
    and AP = sum over thresholds of the recall step times the precision there; only groups holding a positive have a
    step, so the weights are summed per stretch between those groups' ends (reduceat over whole rows of R weights,
    never an [R, N] cumulative sum). A weighting without a counted positive of a label gives NaN for it."""
    found = np.full((counts.shape[1], p.shape[1]), np.nan)
    for k in range(p.shape[1]):
        kept = np.flatnonzero(m[:, k])
        order = kept[np.argsort(-p[kept, k], kind="stable")]
        scores, positive = p[order, k], y[order, k] > 0
        if not positive.any():
            continue
        group = np.cumsum(np.r_[False, scores[1:] != scores[:-1]])  # the tie group of each sorted image
        at = np.flatnonzero(positive)
        last = np.r_[group[at[1:]] != group[at[:-1]], True]  # the last positive of each group holding one
        ends = np.flatnonzero(np.r_[group[1:] != group[:-1], True])[group[at[last]]]  # those groups' last images
        weights = counts[order[: ends[-1] + 1]]
        seen = np.cumsum(np.add.reduceat(weights, np.r_[0, ends[:-1] + 1], axis=0), axis=0)
        steps = np.add.reduceat(weights[at], np.r_[0, np.flatnonzero(last)[:-1] + 1], axis=0)
        precision = np.divide(np.cumsum(steps, axis=0), seen, out=np.zeros(seen.shape), where=seen > 0)
        total = steps.sum(axis=0)
        found[:, k] = np.divide((steps * precision).sum(axis=0), total, out=np.full(total.shape, np.nan), where=total > 0)
    return found


def average_precision(probs: Any, targets: Any, mask: Any = None) -> np.ndarray:
    """Per-label AP [K] as sklearn's average_precision_score (step-wise, no interpolation, ties grouped) over the
    images counted for that label; NaN for a label with no counted positive (its AP is undefined, not 0)."""
    p, y, m = _inputs(probs, targets, mask)
    return _average_precisions(p, y, m, np.ones((len(p), 1)))[0]


def best_f1_thresholds(probs: Any, targets: Any, mask: Any = None, fallback: float = 0.5) -> tuple[np.ndarray, np.ndarray]:
    """(threshold [K], fell_back [K] bool): per label, the threshold that maximises F1 (positive when prob >= it) on
    these held-out images.

    The threshold is the midpoint between the best cut's score and the next lower distinct score (0 below the lowest),
    not the score itself, so a tiny shift of the probabilities does not flip an image at the edge. Ties in F1 go to
    the higher threshold (fewer positive calls for the same F1). A label with no counted positive has no F1 to
    maximise: it gets `fallback` and its flag is True."""
    p, y, m = _inputs(probs, targets, mask)
    thresholds, fell_back = np.full(p.shape[1], float(fallback)), np.ones(p.shape[1], dtype=bool)
    for k in range(p.shape[1]):
        kept = np.flatnonzero(m[:, k])
        positives = float(y[kept, k].sum())
        if positives == 0:
            continue
        order = kept[np.argsort(-p[kept, k], kind="stable")]
        scores = p[order, k]
        ends = np.flatnonzero(np.r_[scores[1:] != scores[:-1], True])
        tp = np.cumsum(y[order, k])[ends]
        f1 = 2 * tp / (ends + 1 + positives)  # 2 TP / (predicted + positives)
        best = int(np.argmax(f1))  # the first maximum: the highest threshold
        score, below = scores[ends[best]], scores[ends[best] + 1] if best + 1 < len(ends) else 0.0
        middle = (score + below) / 2
        thresholds[k], fell_back[k] = (middle if middle > below or score == below else score), False
    return thresholds, fell_back


def binary_ece(probs_k: Any, targets_k: Any, bins: int = ECE_BINS) -> float:
    """Expected calibration error of one label's probability of being positive: `bins` equal-width bins over [0, 1]
    (the last closed at 1), each weighed by its share of the images, L1 between its mean probability and its positive
    rate. torchmetrics' binary_calibration_error gives a probability of exactly 1.0 a bin of its own; here it
    belongs to the top bin, as on a reliability diagram. NaN with no images."""
    p, y = _array(probs_k).ravel(), (_array(targets_k).ravel() > 0.5).astype(np.float64)
    if p.size == 0:
        return math.nan
    index = np.clip(np.searchsorted(np.linspace(0, 1, bins + 1), p, side="right") - 1, 0, bins - 1)
    gap = np.abs(np.bincount(index, weights=p, minlength=bins) - np.bincount(index, weights=y, minlength=bins))
    return float(gap.sum() / p.size)  # sum_b (n_b / n) |mean p_b - rate_b| = sum_b |sum p - sum y| / n


def _counts(predicted: np.ndarray, y: np.ndarray, m: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per-image [N, K] indicators of true positives, false positives and false negatives among counted pairs."""
    return predicted * y * m, predicted * (1 - y) * m, (1 - predicted) * y * m


def _f1_scores(tp: np.ndarray, fp: np.ndarray, fn: np.ndarray) -> dict[str, np.ndarray]:
    """Per-label precision, recall, F1 [..., K] (0 where a denominator is 0: sklearn's zero_division=0), which labels
    count (a positive or a prediction) and their macro means, and the micro F1 [...] (NaN where nothing counts)."""
    counted = (tp + fp + fn) > 0
    precision = np.divide(tp, tp + fp, out=np.zeros_like(tp), where=(tp + fp) > 0)
    recall = np.divide(tp, tp + fn, out=np.zeros_like(tp), where=(tp + fn) > 0)
    f1 = np.divide(2 * tp, 2 * tp + fp + fn, out=np.zeros_like(tp), where=counted)
    labels = counted.sum(axis=-1)
    found = {"precision": precision, "recall": recall, "f1": f1, "counted": counted}
    for name in ("precision", "recall", "f1"):
        found[f"{name}_macro"] = np.divide((found[name] * counted).sum(axis=-1), labels, out=np.full(labels.shape, np.nan), where=labels > 0)
    micro = 2 * tp.sum(axis=-1) + fp.sum(axis=-1) + fn.sum(axis=-1)
    found["f1_micro"] = np.divide(2 * tp.sum(axis=-1), micro, out=np.full(micro.shape, np.nan), where=micro > 0)
    return found


def multilabel_metrics(probs: Any, targets: Any, thresholds: Any, names: Sequence[str], per_label: bool = True, mask: Any = None) -> dict[str, float]:
    """map, f1_micro / f1_macro, precision and recall (micro, macro), subset_acc, hamming_loss, ece, nll,
    label_cardinality, true_cardinality; with `per_label` also ap/, f1/, precision/, recall/, ece/ and support/<name>.

    Predicted positive: prob >= the label's threshold. Only counted (unmasked) pairs enter any count. F1, precision
    and recall are sklearn's with zero_division=0 over the labels that have a counted positive or a prediction;
    a label with neither is left out of the macro means and its per-label keys are absent (sklearn's multilabel
    default would average it in as 0; we treat it as multiclass sklearn treats a class absent from both sides).
    Micro precision and recall are 0 when nothing is predicted / nothing is positive; f1_micro is absent when neither.
    map is the mean of the defined APs; ece the mean of the labels' binary ECE over their counted images; nll the
    mean binary cross-entropy per counted pair. subset_acc (every label of an image right) and hamming_loss (wrong
    pairs / N K) treat a masked pair as right. Cardinalities are predicted / true positives per image, counted pairs
    only. Empty input gives {}; a value that is undefined (NaN) is never a key, as these dicts go to JSON and logs."""
    p, y, m = _inputs(probs, targets, mask)
    if len(p) == 0:
        return {}
    if per_label and len(names) != p.shape[1]:
        raise ValueError(f"{len(names)} names for {p.shape[1]} labels")
    predicted = (p >= _cuts(thresholds)).astype(np.float64)
    tp, fp, fn = (a.sum(axis=0) for a in _counts(predicted, y, m))
    scores = _f1_scores(tp, fp, fn)
    ap = average_precision(p, y, m)
    ece = np.array([binary_ece(p[m[:, k] > 0, k], y[m[:, k] > 0, k]) for k in range(p.shape[1])])
    clipped = np.clip(p, CLIP, 1 - CLIP)
    entropy = -(y * np.log(clipped) + (1 - y) * np.log(1 - clipped))
    wrong = (predicted != y) & (m > 0)
    found = {
        "map": float(np.mean(ap[np.isfinite(ap)])) if np.isfinite(ap).any() else math.nan,
        "f1_micro": float(scores["f1_micro"]),
        "f1_macro": float(scores["f1_macro"]),
        "precision_micro": float(tp.sum() / (tp.sum() + fp.sum())) if tp.sum() + fp.sum() > 0 else 0.0,
        "recall_micro": float(tp.sum() / (tp.sum() + fn.sum())) if tp.sum() + fn.sum() > 0 else 0.0,
        "precision_macro": float(scores["precision_macro"]),
        "recall_macro": float(scores["recall_macro"]),
        "subset_acc": float(np.mean(~wrong.any(axis=1))),
        "hamming_loss": float(wrong.mean()),
        "ece": float(np.mean(ece[np.isfinite(ece)])) if np.isfinite(ece).any() else math.nan,
        "nll": float((entropy * m).sum() / m.sum()) if m.sum() > 0 else math.nan,
        "label_cardinality": float((predicted * m).sum() / len(p)),
        "true_cardinality": float((y * m).sum() / len(p)),
    }
    if per_label:
        for k, name in enumerate(names):
            found[f"ap/{name}"], found[f"ece/{name}"], found[f"support/{name}"] = float(ap[k]), float(ece[k]), float(tp[k] + fn[k])
            if scores["counted"][k]:
                for metric in ("f1", "precision", "recall"):
                    found[f"{metric}/{name}"] = float(scores[metric][k])
    return {key: value for key, value in found.items() if math.isfinite(value)}


def _edge_honest(values: np.ndarray, observed: float, images: int, confidence: float) -> list[float]:
    """The percentile interval of the finite bootstrap values, widened at a perfect (or zero) observed score to at
    least the Clopper-Pearson interval of `images` successes (failures) in `images` trials."""
    tail = (1 - confidence) / 2 * 100
    low, high = (float(v) for v in np.percentile(values, [tail, 100 - tail]))
    if observed >= 1 - 1e-12:
        low, high = min(low, clopper_pearson(images, images, confidence)[0]), 1.0
    elif observed <= 1e-12:
        low, high = 0.0, max(high, clopper_pearson(0, images, confidence)[1])
    return [low, high]


def multilabel_intervals(
    probs: Any, targets: Any, thresholds: Any, seed: int = 0, resamples: int = RESAMPLES, mask: Any = None
) -> dict[str, list[float]]:
    """map_ci95, f1_micro_ci95, f1_macro_ci95: 95 % percentile bootstrap over images, the same resamples for all
    three (an image's labels travel together, so their correlation is kept). Seeded: same seed, same intervals.

    Within a resample a label without a counted positive is left out of that resample's mAP, and one with neither a
    positive nor a prediction out of its macro-F1, as for the point values. Honest at the edges: at a perfect score
    the bootstrap has no spread (every resample of 20 perfectly ranked images gives mAP 1.0), which would claim
    certainty; so at an observed 1.0 the interval is never narrower than Clopper-Pearson of N successes in N trials
    (N = images with a counted pair; [0.832, 1] for 20 images), and at an observed 0 never narrower than that of 0 in N.
    A metric undefined on the whole data is absent; empty input gives {}.

    Each label is sorted once and every resample is a column of image counts (how often it drew each image), so a
    resample's AP is a weighted cumulative sum over the sorted images and its F1 counts a matrix product; columns go
    in bounded chunks (2,000 resamples of 400 images and 20 labels: ~0.15 s on one core)."""
    p, y, m = _inputs(probs, targets, mask)
    images = int((m.sum(axis=1) > 0).sum())
    if images == 0:
        return {}
    predicted = (p >= _cuts(thresholds)).astype(np.float64)
    parts = _counts(predicted, y, m)
    rng = np.random.default_rng(seed)
    chunk = max(1, CHUNK_VALUES // len(p))
    values: dict[str, list[np.ndarray]] = {"map": [], "f1_micro": [], "f1_macro": []}
    for start in range(0, resamples, chunk):
        picks = rng.integers(0, len(p), size=(min(chunk, resamples - start), len(p)))  # a row of image indices per resample
        columns = len(picks)
        flat = (picks * columns + np.arange(columns)[:, None]).ravel()  # image i of resample r counts at i * columns + r
        counts = np.bincount(flat, minlength=len(p) * columns).reshape(len(p), columns).astype(np.float64)
        ap = _average_precisions(p, y, m, counts)
        defined = np.isfinite(ap)
        values["map"].append(
            np.divide(np.where(defined, ap, 0).sum(axis=1), defined.sum(axis=1), out=np.full(len(ap), np.nan), where=defined.any(axis=1))
        )
        scores = _f1_scores(*(counts.T @ part for part in parts))
        values["f1_micro"].append(scores["f1_micro"])
        values["f1_macro"].append(scores["f1_macro"])
    observed = multilabel_metrics(p, y, thresholds, [], per_label=False, mask=m)
    found = {}
    for name, chunks in values.items():
        finite = np.concatenate(chunks)
        finite = finite[np.isfinite(finite)]
        if name in observed and finite.size:
            found[f"{name}_ci95"] = _edge_honest(finite, observed[name], images, CONFIDENCE)
    return found


def _mean_confidence(raw: np.ndarray, m: np.ndarray, log_t: np.ndarray) -> np.ndarray:
    """Per-label mean of max(p, 1 - p) over counted images at temperatures exp(log_t) [K]."""
    p = special.expit(raw / np.exp(log_t))
    return (np.maximum(p, 1 - p) * m).sum(axis=0) / np.maximum(m.sum(axis=0), 1)


def label_temperatures(raw: Any, targets: Any, mask: Any = None) -> tuple[np.ndarray, list[str], np.ndarray]:
    """(temperature [K], rule per label, fitted [K]): temperature scaling of each label's binary logit, sigmoid(raw / T).

    The fit is fit_temperature's MAP estimate per label: binary cross-entropy summed over the counted images plus the
    same weak normal prior on log T (std 1), within TEMPERATURE_RANGE; the loss is separable, so one L-BFGS-B over the
    K log-temperatures fits them all. choose_temperature's one limit on sharpening then holds per label: a T below 1
    may not make the mean confidence max(p, 1 - p) exceed Laplace's estimate of the accuracy at threshold 0.5,
    (right + 1) / (n + 2), since a label the held-out images never get wrong has its loss fall without end as T -> 0;
    such a T is raised (bisection on log T) until the two meet, or to 1 if T = 1 already exceeds it. Rules: fitted |
    capped_at_laplace_accuracy | no_held_out_images (T = 1, fitted NaN). Softening (T > 1) is never limited."""
    z, y, m = _inputs(raw, targets, mask)
    z = np.where(m > 0, z, 0.0)
    images = m.sum(axis=0)
    low, high = (math.log(v) for v in TEMPERATURE_RANGE)

    def loss(log_t: np.ndarray) -> tuple[float, np.ndarray]:
        a = z / np.exp(log_t)
        value = ((np.logaddexp(0, a) - y * a) * m).sum() + 0.5 * float((log_t**2).sum())
        return value, -((special.expit(a) - y) * a * m).sum(axis=0) + log_t

    options = {"ftol": 1e-15, "gtol": 1e-9, "maxiter": 500}
    result = optimize.minimize(loss, np.zeros(z.shape[1]), jac=True, method="L-BFGS-B", bounds=[(low, high)] * z.shape[1], options=options)
    fitted = np.clip(np.asarray(result.x, dtype=np.float64), low, high)
    right = (((z >= 0) == (y > 0)) * m).sum(axis=0)
    cap = (right + 1) / (images + 2)
    capped = (fitted < 0) & (_mean_confidence(z, m, fitted) > cap) & (images > 0)
    lower, upper = np.where(_mean_confidence(z, m, np.zeros_like(fitted)) > cap, 0.0, fitted), np.zeros_like(fitted)
    for _ in range(60 if capped.any() else 0):  # mean confidence falls as T rises: bisect log T for the cap
        middle = (lower + upper) / 2
        above = _mean_confidence(z, m, middle) > cap
        lower, upper = np.where(above, middle, lower), np.where(above, upper, middle)
    log_t = np.where(capped, upper, fitted)
    rules = ["no_held_out_images" if n == 0 else "capped_at_laplace_accuracy" if c else "fitted" for n, c in zip(images, capped)]
    temperatures = np.where(images > 0, np.exp(log_t), 1.0)
    return temperatures, rules, np.where(images > 0, np.exp(fitted), np.nan)
