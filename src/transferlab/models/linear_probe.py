"""The linear-probe protocol (CLIP, Radford et al. 2021, appendix A.3): a convex, full-batch multinomial logistic
regression on frozen features, solved by L-BFGS, with its L2 strength chosen on held-out images: by inner cross-validation over every training image (then refitted on
all of them, as scikit-learn's LogisticRegressionCV does) or on the validation split.

The objective is scikit-learn's `LogisticRegression(C=C)` (lbfgs, multinomial): C x the summed cross-entropy +
1/2 ||W||^2 (the bias is not penalised), so the two give the same head (tests/test_linear_probe.py).

Multi-label targets (multi-hot rows [N, K]) make it one-vs-rest: K binary logistic regressions, C x the summed binary
cross-entropy + 1/2 ||W||^2, separable by label, so one L-BFGS solves all K at once (scikit-learn's
OneVsRestClassifier(LogisticRegression(C=C)) gives the same heads); `class_weights` are then BCE's pos_weight.
C (one for every label) is chosen by the pooled out-of-fold mAP, on folds stratified across labels (data.folds).
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.model_selection import StratifiedKFold

from transferlab.data.folds import multilabel_folds
from transferlab.models.multilabel_metrics import average_precision


@dataclass
class Standardizer:
    """Per-feature mean and std of the training features (the probe's optional `standardize` step)."""

    mean: torch.Tensor
    std: torch.Tensor

    @classmethod
    def fit(cls, features: torch.Tensor) -> Standardizer:
        features = features.double()
        return cls(features.mean(dim=0), features.std(dim=0, unbiased=False).clamp_min(1e-12))

    def __call__(self, features: torch.Tensor) -> torch.Tensor:
        return (features.double() - self.mean) / self.std


def fit_logistic(
    features: torch.Tensor,
    labels: torch.Tensor,
    num_classes: int,
    c: float,
    class_weights: Optional[torch.Tensor] = None,
    max_iter: int = 1000,
    tolerance: float = 1e-10,
    start: Optional[tuple[torch.Tensor, torch.Tensor]] = None,
    basis: Optional[torch.Tensor] = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(weight [K, D], bias [K]) minimising C * sum(w_y CE) + ||W||^2 / 2, in float64, by L-BFGS with strong Wolfe
    steps; `class_weights` w as scikit-learn's `class_weight` (each image's loss times its class's weight). `basis`:
    row_space(features) when the caller fits the same features at several C (one SVD for the whole path)."""
    binary = labels.ndim == 2  # multi-hot rows: one-vs-rest
    x = features.detach().double().cpu()
    y = labels.detach().cpu().clone().double() if binary else labels.detach().long().cpu().clone()
    w = class_weights.double().cpu() if class_weights is not None else None
    basis = row_space(x) if basis is None else basis  # the minimiser's weights lie in the span of the training rows: solve there, exactly
    x = x @ basis
    weight = (start[0].double() @ basis if start else torch.zeros(num_classes, x.shape[1], dtype=torch.float64)).requires_grad_(True)
    bias = (start[1].double().clone() if start else torch.zeros(num_classes, dtype=torch.float64)).requires_grad_(True)
    scale = 1.0 / (c * len(y))  # the same minimiser, with a gradient whose size does not grow with C and N
    optimizer = torch.optim.LBFGS(
        [weight, bias],
        lr=1,
        max_iter=max_iter,
        tolerance_grad=tolerance,
        tolerance_change=tolerance**2,
        history_size=20,
        line_search_fn="strong_wolfe",
    )

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        logits = x @ weight.T + bias
        data = (
            F.binary_cross_entropy_with_logits(logits, y, pos_weight=w, reduction="sum")
            if binary
            else F.cross_entropy(logits, y, weight=w, reduction="sum")
        )
        loss = scale * (c * data + 0.5 * (weight**2).sum())
        loss.backward()
        return loss

    with torch.enable_grad():
        optimizer.step(closure)
    return weight.detach() @ basis.T, bias.detach()


def row_space(x: torch.Tensor) -> torch.Tensor:
    """An orthonormal basis [D, r] of the span of the rows of x. The gradient of the loss is (P - Y)^T x and the
    penalty is rotation-invariant, so the weights stay in this span: with fewer images than features (the usual
    few-shot probe) the fit runs in r <= N dimensions instead of D, with the same solution."""
    if x.shape[0] >= x.shape[1]:
        return torch.eye(x.shape[1], dtype=x.dtype)
    _, singular, vh = torch.linalg.svd(x, full_matrices=False)
    return vh[singular > singular.max() * 1e-10].T


C_GRID = tuple(float(c) for c in torch.logspace(-6, 4, 11).tolist())  # 10^-6 ... 10^4, one per decade


def _identity(dim: int) -> Standardizer:
    return Standardizer(torch.zeros(dim, dtype=torch.float64), torch.ones(dim, dtype=torch.float64))


def _path(
    train: tuple[torch.Tensor, torch.Tensor],
    x_held: torch.Tensor,
    num_classes: int,
    standardize: bool,
    class_weights: Optional[torch.Tensor],
    grid: Sequence[float],
) -> list[torch.Tensor]:
    """Held-out logits of the head fitted at each C of `grid` (ascending: each fit starts from the previous one)."""
    scaler = Standardizer.fit(train[0]) if standardize else _identity(train[0].shape[1])
    x_train, x_held = scaler(train[0]), scaler(x_held)
    found, previous, basis = [], None, row_space(x_train.double())  # the SVD each fit would repeat: once per path
    for c in grid:
        previous = fit_logistic(
            x_train, train[1], num_classes, c, class_weights, max_iter=PATH_ITERATIONS, tolerance=PATH_TOLERANCE, start=previous, basis=basis
        )
        found.append(x_held @ previous[0].T + previous[1])
    return found


PATH_ITERATIONS, PATH_TOLERANCE = 300, 1e-6  # per C: enough for the held-out accuracy to settle (measured)


@dataclass
class ProbeFit:
    """The fitted head as a linear layer on the raw features, its C, the search, and (inner CV) the held-out logits
    of every training image at that C, from the fold that did not fit on it: what the temperature is fitted on."""

    weight: torch.Tensor
    bias: torch.Tensor
    c: float
    search: list[dict[str, float]]
    held_out: Optional[tuple[torch.Tensor, torch.Tensor]] = None
    selection: str = ""  # how C was chosen (choose_c): cv<K> | fixed | val
    reason: str = ""  # why, when it is not the configured protocol


def _score(logits: torch.Tensor, labels: torch.Tensor) -> tuple[float, float]:
    """(accuracy, NLL): C is chosen by accuracy, ties broken by the lower NLL; multi-label: (mAP, mean BCE)."""
    if not len(labels):
        return 0.0, 0.0
    if labels.ndim == 2:
        ap = average_precision(logits.double().sigmoid().numpy(), labels.numpy())
        return float(np.nanmean(ap)) if np.isfinite(ap).any() else 0.0, float(F.binary_cross_entropy_with_logits(logits.double(), labels.double()))
    return float((logits.argmax(dim=-1) == labels).double().mean()), float(F.cross_entropy(logits, labels.long()))


def _final(
    train: tuple[torch.Tensor, torch.Tensor], num_classes: int, standardize: bool, class_weights: Optional[torch.Tensor], c: float
) -> tuple[torch.Tensor, torch.Tensor]:
    scaler = Standardizer.fit(train[0]) if standardize else _identity(train[0].shape[1])
    weight, bias = fit_logistic(scaler(train[0]), train[1], num_classes, c, class_weights, max_iter=PATH_ITERATIONS, tolerance=PATH_TOLERANCE)
    folded = weight / scaler.std  # standardisation folded in: the head works on the raw features
    return folded, bias - folded @ scaler.mean


def select_on_val(
    train: tuple[torch.Tensor, torch.Tensor],
    val: tuple[torch.Tensor, torch.Tensor],
    num_classes: int,
    standardize: bool,
    class_weights: Optional[torch.Tensor] = None,
    grid: Sequence[float] = C_GRID,
) -> ProbeFit:
    """The C with the best accuracy on the validation features (ties: lower NLL), fitted on the training ones."""
    score = "val_map" if val[1].ndim == 2 else "val_acc"
    rows = [
        dict(zip(("C", score, "val_nll"), (c, *_score(logits, val[1]))))
        for c, logits in zip(sorted(grid), _path(train, val[0], num_classes, standardize, class_weights, sorted(grid)))
    ]
    best = max(rows, key=lambda row: (row[score], -row["val_nll"]))
    return ProbeFit(*_final(train, num_classes, standardize, class_weights, best["C"]), best["C"], rows, selection="val")


def select_by_cv(
    train: tuple[torch.Tensor, torch.Tensor],
    num_classes: int,
    standardize: bool,
    class_weights: Optional[torch.Tensor] = None,
    folds: int = 5,
    seed: int = 0,
    groups: Optional[torch.Tensor] = None,
    grid: Sequence[float] = C_GRID,
) -> ProbeFit:
    """scikit-learn's LogisticRegressionCV protocol: stratified K-fold over the training features, the C with the
    best pooled out-of-fold accuracy (ties: lower NLL), refitted on all of them. `groups`: the image of each row
    (cached augmented views), so all views of an image fall in one fold and held-out logits are averaged per image."""
    x, y = train
    group = groups if groups is not None else torch.arange(len(y))
    images, first = torch.unique(group), dict[int, int]()
    for row, g in enumerate(group.tolist()):
        first.setdefault(g, row)
    image_labels = y[[first[int(g)] for g in images]]
    grid = sorted(grid)
    held = torch.zeros(len(grid), len(images), num_classes, dtype=torch.float64)
    position = {int(g): i for i, g in enumerate(images)}
    image_of_row = torch.tensor([position[int(g)] for g in group])
    k = fold_count(image_labels, folds)
    if image_labels.ndim == 2:  # multi-label: folds stratified across labels (iterative stratification)
        split = multilabel_folds(image_labels.numpy().round().astype(np.int64), k, seed)
    else:
        splitter = StratifiedKFold(n_splits=k, shuffle=True, random_state=seed)
        with warnings.catch_warnings():  # "the least populated class has only n members": handled by stratification
            warnings.simplefilter("ignore", UserWarning)
            split = list(splitter.split(images.numpy(), image_labels.numpy()))
    for _, held_images in split:
        held_rows = torch.isin(image_of_row, torch.from_numpy(held_images))
        paths = _path((x[~held_rows], y[~held_rows]), x[held_rows], num_classes, standardize, class_weights, grid)
        for i, logits in enumerate(paths):
            per_image = torch.zeros(len(images), num_classes, dtype=torch.float64).index_add_(0, image_of_row[held_rows], logits)
            counts = torch.bincount(image_of_row[held_rows], minlength=len(images)).clamp_min(1).double()
            held[i, held_images] = (per_image / counts[:, None])[held_images]
    score = "cv_map" if image_labels.ndim == 2 else "cv_acc"
    rows = [dict(zip(("C", score, "cv_nll"), (c, *_score(held[i], image_labels)))) for i, c in enumerate(grid)]
    best = max(range(len(grid)), key=lambda i: (rows[i][score], -rows[i]["cv_nll"]))
    weight, bias = _final(train, num_classes, standardize, class_weights, grid[best])
    return ProbeFit(weight, bias, grid[best], rows, (held[best].float(), image_labels), f"cv{k}")


def fold_count(image_labels: torch.Tensor, folds: int) -> int:
    """The folds select_by_cv makes: `folds`, at most the largest class's images (StratifiedKFold's limit; multi-label:
    the images), at least 2."""
    largest = len(image_labels) if image_labels.ndim == 2 else int(torch.bincount(image_labels.long()).max())
    return max(2, min(folds, largest))


def smallest_class(labels: torch.Tensor) -> int:
    """Images of the rarest class that has any (multi-hot rows: positives of the rarest label)."""
    counts = labels.round().long().sum(dim=0) if labels.ndim == 2 else torch.bincount(labels.long())
    present = counts[counts > 0]
    return int(present.min()) if len(present) else 0


FIXED_C = 1.0  # scikit-learn's LogisticRegression default: the C of a probe no held-out image can choose


def choose_c(
    train: tuple[torch.Tensor, torch.Tensor],
    num_classes: int,
    standardize: bool,
    class_weights: Optional[torch.Tensor] = None,
    folds: int = 5,
    seed: int = 0,
    groups: Optional[torch.Tensor] = None,
    grid: Sequence[float] = C_GRID,
) -> ProbeFit:
    """select_by_cv with its few-image rule, `reason` saying when it applied. A class with 2..folds-1 images still
    gets stratified folds, each of its images held out in a different fold with the others of its class left to
    train on (2 per class: 2 folds, each holding out one image of every class). Not exact leave-one-out: that refits
    every image at 11 C (30.6 s of CPU for 74 images, 2 per class of 37, against 0.8 s) and holds out an image whose
    class is then the rarest, so prior-driven (small C) fits score 0 and large C always wins (measured). A class with
    a single image would be missing from the fold that holds it out: C = FIXED_C, fitted on every image, and no
    held-out logits (the run keeps temperature 1). Multi-label data keeps its folds: a rare label's positives
    weigh little in the pooled mAP that chooses C."""
    group = groups if groups is not None else torch.arange(len(train[1]))
    _, first = np.unique(group.numpy(), return_index=True)
    per_image = train[1][torch.from_numpy(first)]
    fewest, multilabel = smallest_class(per_image), per_image.ndim == 2
    what = "the rarest label has {} positive" if multilabel else "the smallest class has {}"
    if fewest >= 2 or multilabel:
        fit = select_by_cv(train, num_classes, standardize, class_weights, folds, seed, groups, grid)
        if fewest < folds:
            fit.reason = (
                f"{what.format(fewest)} training images, fewer than finetune.c_folds={folds}: {fit.selection[2:]} stratified folds "
                f"hold each of them out once, the other {max(fewest - 1, 0)} training"
            )
        return fit
    reason = (
        f"a class has a single training image: no fold can hold it out and still train on its class, "
        f"so C = {FIXED_C:g} (scikit-learn's default) and no temperature (no held-out logits)"
    )
    weight, bias = _final(train, num_classes, standardize, class_weights, FIXED_C)
    return ProbeFit(weight, bias, FIXED_C, [], None, "fixed", reason)
