"""Scores that say how well a backbone's frozen features suit a labelled data set before any head is trained:
LogME (You, Liu, Wang and Long, "LogME: Practical Assessment of Pre-trained Models for Transfer Learning",
ICML 2021), and the agreement of a cheap score with the reference (Kendall's tau).

LogME is the log marginal likelihood ("evidence") of Bayesian linear regression from the features to each target
column (one-hot classes, or the 0/1 column of each label), with the prior precision alpha and the noise precision
beta set by MacKay's fixed-point iteration, divided by the number of images and averaged over the columns: how
well a linear model on these features explains the labels, with its complexity paid for. Written here from the
paper's equations (its reference code carries no licence); tests/test_ranking_scores.py checks it against the
closed-form Gaussian marginal likelihood computed with a log-determinant.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch
from scipy import stats
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import StratifiedKFold
from threadpoolctl import threadpool_limits

from transferlab.data.folds import multilabel_folds
from transferlab.models.linear_probe import C_GRID, PATH_ITERATIONS, PATH_TOLERANCE, select_by_cv
from transferlab.models.multilabel_metrics import average_precision

ITERATIONS, TOLERANCE = 100, 1e-5  # the fixed point settles in ~10 steps on real features


def targets_matrix(labels: np.ndarray, num_classes: Optional[int] = None) -> np.ndarray:
    """[N, K] float targets: one-hot rows of class indices [N], or multi-hot rows [N, K] as they are."""
    labels = np.asarray(labels)
    if labels.ndim == 2:
        return labels.astype(np.float64)
    classes = int(num_classes if num_classes is not None else labels.max() + 1)
    return np.eye(classes, dtype=np.float64)[labels.astype(np.int64)]


def fit_evidence(features: np.ndarray, target: np.ndarray) -> tuple[float, float, float]:
    """(evidence, alpha, beta) of one target column: the log marginal likelihood of Bayesian linear regression
    target ~ N(features @ w, 1/beta), w ~ N(0, I/alpha), at the alpha and beta that maximise it.

    Computed in the singular basis of the features, so D > N (a few hundred photos, 1,280 features) costs what
    N does: with sigma_i the squared singular values and z = U^T y, the posterior mean's norm, the residual and
    log|A| (A = alpha I + beta F^T F) are sums over i."""
    f = np.asarray(features, dtype=np.float64)
    y = np.asarray(target, dtype=np.float64)
    n, d = f.shape
    u, singular, _ = np.linalg.svd(f, full_matrices=False)
    sigma = singular**2
    z = u.T @ y
    outside = max(float(y @ y - z @ z), 0.0)  # the part of y no feature direction reaches
    alpha, beta = 1.0, 1.0
    for _ in range(ITERATIONS):
        ratio = alpha / beta
        gamma = float(np.sum(sigma / (sigma + ratio)))
        mean_norm = float(np.sum(sigma * z**2 / (sigma + ratio) ** 2))
        residual = float(np.sum((ratio * z / (sigma + ratio)) ** 2)) + outside
        alpha, beta = gamma / max(mean_norm, 1e-12), max(n - gamma, 1e-12) / max(residual, 1e-12)
        if abs(alpha / beta - ratio) / ratio < TOLERANCE:
            break
    ratio = alpha / beta
    mean_norm = float(np.sum(sigma * z**2 / (sigma + ratio) ** 2))
    residual = float(np.sum((ratio * z / (sigma + ratio)) ** 2)) + outside
    log_det = float(np.sum(np.log(alpha + beta * sigma))) + (d - len(sigma)) * math.log(alpha)
    evidence = (
        n / 2 * math.log(beta) + d / 2 * math.log(alpha) - n / 2 * math.log(2 * math.pi) - beta / 2 * residual - alpha / 2 * mean_norm - log_det / 2
    )
    return evidence, alpha, beta


def logme(features: np.ndarray, labels: np.ndarray, num_classes: Optional[int] = None) -> float:
    """LogME: the evidence per image, averaged over the target columns (classes, or labels); higher is better.
    Comparable between backbones on the same images and labels, not across data sets."""
    f = np.asarray(features, dtype=np.float64)
    y = targets_matrix(labels, num_classes)
    columns = [k for k in range(y.shape[1]) if 0 < y[:, k].sum() < len(y)]  # a constant column says nothing
    return float(np.mean([fit_evidence(f, y[:, k])[0] / len(f) for k in columns])) if columns else math.nan


def agreement(scores: Sequence[float], reference: Sequence[float]) -> tuple[float, int]:
    """(Kendall's tau-b between a cheap score and the reference over the backbones, how many backbones): 1 = the
    same order, 0 = unrelated; nan with fewer than 3 backbones or a constant column."""
    pairs = [(s, r) for s, r in zip(scores, reference) if s is not None and r is not None and math.isfinite(s) and math.isfinite(r)]
    if len(pairs) < 3:
        return math.nan, len(pairs)
    x, y = zip(*pairs)
    if len(set(x)) < 2 or len(set(y)) < 2:
        return math.nan, len(pairs)
    return float(stats.kendalltau(x, y).statistic), len(pairs)


@dataclass
class ProbeCV:
    """The convex probe's cross-validated figures on one backbone's features: the out-of-fold logits of every
    image (from the fold that did not train on it), each outer fold's score (accuracy, or mAP for label sets) and C."""

    logits: np.ndarray
    fold_scores: list[float]
    cs: list[float]


def outer_folds(labels: np.ndarray, folds: int, seed: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """(train, held-out) index pairs, stratified by class (or across labels, iterative stratification); the same
    for every backbone scored on these images, so their per-fold scores pair up."""
    if labels.ndim == 2:
        return multilabel_folds(labels.round().astype(np.int64), folds, seed)
    splitter = StratifiedKFold(n_splits=folds, shuffle=True, random_state=seed % 2**32)
    return [(np.asarray(a), np.asarray(b)) for a, b in splitter.split(np.zeros(len(labels)), labels)]


def fold_score(logits: np.ndarray, labels: np.ndarray) -> float:
    """Accuracy of class logits, or the mAP of label logits against multi-hot rows."""
    if labels.ndim == 2:
        ap = average_precision(1 / (1 + np.exp(-logits)), labels)
        return float(np.nanmean(ap)) if np.isfinite(ap).any() else math.nan
    return float((logits.argmax(axis=1) == labels).mean())


def pool_coordinates(features: np.ndarray) -> np.ndarray:
    """The features in an orthonormal basis of the span of all the images' rows ([N, r], r <= N): every probe
    fitted on a subset of these images has its weights in that span and an L2 penalty that rotations keep, so its
    logits are the same, while each fit's own row-space step (linear_probe.row_space) works on r columns, not D."""
    f = np.asarray(features, dtype=np.float64)
    if f.shape[0] >= f.shape[1]:
        return f
    u, singular, _ = np.linalg.svd(f, full_matrices=False)
    keep = singular > singular.max() * 1e-10
    return np.ascontiguousarray(u[:, keep] * singular[keep])


def _class_logits(model: LogisticRegression, x: np.ndarray) -> np.ndarray:
    """[N, K] logits; a binary model's one score d becomes [0, d] (softmax of it = the model's sigmoid)."""
    scores = model.decision_function(x)
    return np.stack([np.zeros_like(scores), scores], axis=1) if scores.ndim == 1 else scores


def _fit(model: LogisticRegression, x: np.ndarray, y: np.ndarray) -> LogisticRegression:
    with warnings.catch_warnings():  # lbfgs at the largest C of the grid on separable data stops at max_iter
        warnings.simplefilter("ignore", ConvergenceWarning)
        return model.fit(x, y)


def select_c(x: np.ndarray, y: np.ndarray, folds: int, seed: int, grid: Sequence[float] = C_GRID) -> float:
    """The C of finetune.select_c=cv (models.linear_probe.select_by_cv): stratified inner folds, every C of the grid
    warm-started from the previous one, the best pooled held-out accuracy, ties to the lower NLL. Solved by
    scikit-learn's lbfgs on the same objective (C x summed cross-entropy + ||W||^2 / 2): for a few hundred images its
    numpy loop is ~10x faster than the torch one, and a ranking fits 5 x 5 x 11 heads per backbone."""
    grid = sorted(grid)
    k = max(2, min(folds, int(np.bincount(y).min())))
    held = np.full((len(grid), len(y), int(y.max()) + 1), -1e9)  # a class absent from an inner training part: never predicted
    for train, test in StratifiedKFold(n_splits=k, shuffle=True, random_state=seed % 2**32).split(x, y):
        model = LogisticRegression(C=grid[0], max_iter=PATH_ITERATIONS, tol=PATH_TOLERANCE, warm_start=True)
        for i, c in enumerate(grid):
            model.set_params(C=c)
            held[i][np.ix_(test, np.unique(y[train]))] = _class_logits(_fit(model, x[train], y[train]), x[test])
    results = []
    for i in range(len(grid)):
        logits = held[i] - held[i].max(axis=1, keepdims=True)
        nll = float(-np.mean(logits[np.arange(len(y)), y] - np.log(np.exp(logits).sum(axis=1))))
        results.append((float((held[i].argmax(axis=1) == y).mean()), -nll))
    return grid[max(range(len(grid)), key=lambda i: results[i])]


def probe_cross_validation(
    features: np.ndarray, labels: np.ndarray, num_classes: int, splits: Sequence[tuple[np.ndarray, np.ndarray]], c_folds: int, seed: int
) -> ProbeCV:
    """Nested cross-validation of the L-BFGS probe (the objective finetune.head_solver=lbfgs trains): in each outer
    fold C is chosen by `c_folds` inner folds of the training part only, so the held-out fold never takes part in
    choosing it and the out-of-fold score is not tuned on the images it is measured on. Label sets (multi-hot rows)
    go through models.linear_probe's one-vs-rest fit."""
    x = pool_coordinates(features)
    logits = np.zeros((len(labels), num_classes))
    scores, cs = [], []
    with threadpool_limits(limits=1):  # hundreds of tiny fits: BLAS threads cost more than they do (15x slower measured under load)
        for train, held in splits:
            c, logits[held] = held_out_logits(x, labels, num_classes, train, held, c_folds, seed)
            scores.append(fold_score(logits[held], labels[held]))
            cs.append(c)
    return ProbeCV(logits, scores, cs)


def held_out_logits(
    x: np.ndarray, labels: np.ndarray, num_classes: int, train: np.ndarray, held: np.ndarray, c_folds: int, seed: int
) -> tuple[float, np.ndarray]:
    """One outer fold: (C chosen by inner folds of `train`, the refitted probe's logits on `held`)."""
    if labels.ndim == 2:
        fit = select_by_cv((torch.from_numpy(x[train]), torch.from_numpy(labels[train]).double()), num_classes, False, None, c_folds, seed)
        return fit.c, (torch.from_numpy(x[held]) @ fit.weight.double().T + fit.bias.double()).numpy()
    c = select_c(x[train], labels[train], c_folds, seed)
    model = _fit(LogisticRegression(C=c, max_iter=PATH_ITERATIONS, tol=PATH_TOLERANCE), x[train], labels[train])
    found = np.full((len(held), num_classes), -1e9)  # a class absent from the training part is never predicted
    found[:, model.classes_] = _class_logits(model, x[held])
    return c, found
