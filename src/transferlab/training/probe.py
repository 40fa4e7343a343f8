"""finetune.head_solver=lbfgs | knn | prototype: the frozen model's head solved in one step on the cached features.

- lbfgs (models.linear_probe): a convex logistic fit, its L2 strength C chosen by inner cross-validation over every
  training image (finetune.select_c=cv, then refitted on all of them) or on the validation split (select_c=val).
- knn, prototype (models.few_shot_heads): no weights to fit; k (knn) is chosen by exact leave-one-out over the
  training images (select_c=cv) or on the validation split (select_c=val), and the leave-one-out logits stand in
  for held-out images, as the probe's inner folds do.

A plain step of the run (training.fit): it takes the cached features and returns the fit; no optimiser step is taken,
so checkpointing, calibration and the test run as for a head trained by epochs. With select_c=cv the run has no
validation split (training.fit gives it to training); the held-out logits of the inner folds / leave-one-out stand in
for it. A class with a single training image leaves nothing to hold out: C (or k) takes a documented fixed value,
the model keeps temperature 1, and metrics.json says so (`probe/c_selection`, `head/selection` and their `_reason`).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any, Optional

import lightning.pytorch as pl
import numpy as np
import torch
from omegaconf import DictConfig
from torch import nn

from transferlab.core.errors import ConfigError
from transferlab.models.classifier import TransferClassifier
from transferlab.models.evaluation import choose_temperature
from transferlab.models.few_shot_heads import (
    KNN_FIXED_K,
    KNN_GRID,
    KNNHead,
    knn_leave_one_out,
    prototype_leave_one_out,
    prototype_weights,
    selection_score,
    targets_of,
)
from transferlab.models.linear_probe import C_GRID, choose_c, select_on_val, smallest_class
from transferlab.training.calibration import set_calibration
from transferlab.training.label_decisions import multilabel_held_out

log = logging.getLogger(__name__)
HEADS = {"lbfgs": "Linear probe", "knn": "k-NN head", "prototype": "Prototype head"}  # the solvers of this module (sgd trains by epochs)


@dataclass(frozen=True)
class ProbeSettings:
    """finetune.head_solver / standardize / select_c / c_folds, data.split_seed; `c`: a fixed C (the refit after
    select_c=val folds)."""

    standardize: bool
    select: str  # cv | val (the schema allows no other value)
    folds: int
    seed: int
    c: Optional[float] = None
    solver: str = "lbfgs"


@dataclass
class HeadFit:
    """What solving the head leaves: the held-out logits of the training images (inner folds, leave-one-out) and
    their labels, or None (select_c=val, a fixed value); metrics.json's keys about the solve."""

    held_out: Optional[tuple[torch.Tensor, torch.Tensor]]
    metrics: dict[str, Any] = field(default_factory=dict)


def probe_settings(cfg: DictConfig, refit_c: Optional[float]) -> Optional[ProbeSettings]:
    """The solver's settings when finetune.head_solver is lbfgs, knn or prototype (frozen only), else None."""
    finetune = cfg.finetune
    solver = finetune.get("head_solver")
    if solver not in HEADS:  # fine-tuning configs have no head solver: the head trains by epochs
        return None
    select = str(finetune.select_c)  # config.validation makes sure the YAML's values are there
    fixed = refit_c if select == "val" and solver == "lbfgs" else None  # a refit after select_c=val folds: their median C
    folds = int(finetune.c_folds) if finetune.get("c_folds") is not None else 0  # lbfgs with select_c=cv only
    return ProbeSettings(bool(finetune.standardize), select, folds, int(cfg.data.split_seed), fixed, str(solver))


def feature_matrix(dataset: Any) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(features [N, D], labels [N], image index [N]) of a cached-feature dataset; each cached augmented view is a
    row of its own, with its image's index."""
    rows, labels, images = [], [], []
    for image, ((array, row), label) in enumerate(zip(dataset.rows, dataset.labels)):
        value = np.asarray(array[row], dtype=np.float32)
        value = value if value.ndim == 2 else value[None]
        rows.append(value)
        labels += [label] * len(value)
        images += [image] * len(value)
    targets = torch.stack(labels) if labels and isinstance(labels[0], torch.Tensor) else torch.tensor(labels)  # multi-hot rows
    return torch.from_numpy(np.concatenate(rows)), targets, torch.tensor(images)


def solve_probe(model: TransferClassifier, feature_sets: dict[str, Any], settings: ProbeSettings, refit: bool = False) -> HeadFit:
    """Solve the head on the training split's cached features as `settings` say and write it into the model.
    `refit`: the fit after a cross-validation (no validation split: knn chooses k by leave-one-out)."""
    if "train" not in feature_sets:
        raise ConfigError(
            f"finetune.head_solver={settings.solver} needs the frozen-feature cache: set performance.feature_cache.enabled=true, "
            "or finetune.head_solver=sgd to train the head by epochs on images"
        )
    if model.task.multilabel and str(model.hparams["finetune"].get("loss") or "auto") == "asl":
        raise ConfigError(
            "finetune.loss=asl: the lbfgs probe is a convex logistic fit (one-vs-rest, binary cross-entropy); "
            "train the head by epochs with finetune.head_solver=sgd to use the asymmetric loss"
        )
    x, y, images = feature_matrix(feature_sets["train"])
    val = feature_matrix(feature_sets["val"])[:2] if settings.select == "val" and "val" in feature_sets and not refit else None
    if settings.solver == "knn":
        return solve_knn(model, x, y, images, val)
    if settings.solver == "prototype":
        return solve_prototype(model, x, y, images, val)
    return solve_lbfgs(model, x, y, images, settings, val)


def solve_lbfgs(model: TransferClassifier, x: torch.Tensor, y: torch.Tensor, images: torch.Tensor, settings: ProbeSettings, val: Any) -> HeadFit:
    weights = torch.tensor(model.hparams["loss_weights"], dtype=torch.float32) if model.hparams.get("loss_weights") else None
    classes = len(model.class_names)
    grid = (settings.c,) if settings.c is not None else C_GRID
    if settings.select == "cv":
        fit = choose_c((x, y), classes, settings.standardize, weights, settings.folds, settings.seed, images, grid)
        where = f"by {fit.selection[2:]}-fold cross-validation over the {int(images.max()) + 1} training images"
        where = "fixed (no held-out images)" if fit.selection == "fixed" else where
    else:
        val = val if val is not None else (x[:0], y[:0])
        fit = select_on_val((x, y), val, classes, settings.standardize, weights, grid)
        where = f"on {len(val[1])} validation images"
    linear = last_linear(model.head)
    with torch.no_grad():
        linear.weight.copy_(fit.weight.to(linear.weight))
        linear.bias.copy_(fit.bias.to(linear.bias))
    log.info("Linear probe (L-BFGS): C = %.3g chosen %s from %d values; %d training rows", fit.c, where, len(fit.search), len(y))
    if fit.reason:
        log.warning("Linear probe: C %s: %s", "fixed" if fit.selection == "fixed" else f"by {fit.selection}", fit.reason)
    found = {"probe/C": fit.c, "probe/c_selection": fit.selection, "probe/c_selection_reason": fit.reason or "as configured"}
    return HeadFit(fit.held_out, found)


def last_linear(head: nn.Module) -> nn.Linear:
    """The Linear a solver writes: the last layer of the probe's and the prototype's Sequential head."""
    linear = head[-1] if isinstance(head, nn.Sequential) else head
    assert isinstance(linear, nn.Linear)
    return linear


def held_out_possible(labels: torch.Tensor, images: torch.Tensor) -> bool:
    """Whether leave-one-out leaves every held-out image's class something to match: every class has 2 or more
    training images (multi-label data always: a label with one positive weighs little in the mAP and temperatures)."""
    return labels.ndim == 2 or smallest_class(_per_image_labels(labels, images)) >= 2


SINGLE = "a class has a single training image: leaving it out leaves its class nothing to match, so no held-out logits"


def solve_knn(model: TransferClassifier, x: torch.Tensor, y: torch.Tensor, images: torch.Tensor, val: Any) -> HeadFit:
    """The bank is every training row; k by leave-one-out (select_c=cv) or on the validation features."""
    head = model.head
    assert isinstance(head, KNNHead)
    classes, held, search = len(model.class_names), None, []
    targets = targets_of(y, classes)
    if val is not None and len(val[1]):
        for k in sorted({min(k, len(x)) for k in KNN_GRID}):
            head.fill(x, targets, k)
            with torch.no_grad():
                score, nll = selection_score(head(val[0].to(head.bank.device)).cpu(), val[1])
            search.append({"k": k, "val_score": score, "val_nll": nll})
        best = max(search, key=lambda row: (row["val_score"], -row["val_nll"], -row["k"]))  # ties: lower NLL, smaller k
        k, selection, reason, score = int(best["k"]), "val", f"on {len(val[1])} validation images", best["val_score"]
    elif held_out_possible(y, images):
        chosen = knn_leave_one_out(x, y, groups=images, num_classes=classes)
        held = (chosen.held_out, _per_image_labels(y, images))
        k, selection, reason, score, search = chosen.k, "leave_one_out", "as configured", chosen.score, chosen.search
    else:
        k, selection, reason, score = min(KNN_FIXED_K, len(x)), "fixed", f"{SINGLE}: k = min({KNN_FIXED_K}, images), temperature 1", None
    head.fill(x, targets, k)
    log.info(
        "k-NN head: k = %d (%s) over a bank of %d training rows%s", k, selection, len(x), f"; held-out score {score:.4f}" if score is not None else ""
    )
    if selection == "fixed":
        log.warning("k-NN head: k fixed: %s", reason)
    return HeadFit(held, {"head/k": k, "head/bank_rows": len(x), "head/selection": selection, "head/selection_reason": reason})


def solve_prototype(model: TransferClassifier, x: torch.Tensor, y: torch.Tensor, images: torch.Tensor, val: Any) -> HeadFit:
    """The class means as a fixed linear head; its leave-one-out logits in closed form (select_c=cv)."""
    linear = last_linear(model.head)
    classes = len(model.class_names)
    with torch.no_grad():
        linear.weight.copy_(prototype_weights(x, y, classes).to(linear.weight))
        linear.bias.zero_()
    held, selection, reason = None, "val", "calibrated on the validation images"
    if val is None:
        if held_out_possible(y, images):
            held, selection, reason = (prototype_leave_one_out(x, y, classes, images), _per_image_labels(y, images)), "leave_one_out", "as configured"
        else:
            selection, reason = "fixed", f"{SINGLE}: temperature 1"
            log.warning("Prototype head: %s", reason)
    log.info("Prototype head: %d class means of %d normalised training rows (%s)", classes, len(x), selection)
    return HeadFit(held, {"head/selection": selection, "head/selection_reason": reason})


def _per_image_labels(y: torch.Tensor, images: torch.Tensor) -> torch.Tensor:
    """Each image's label in sorted image order (the order of the held-out rows)."""
    _, first = np.unique(images.numpy(), return_index=True)
    return y[torch.from_numpy(first)]


def keep_uncalibrated(trainer: pl.Trainer, model: TransferClassifier, best: str, method: str, threshold: Any) -> dict[str, Any]:
    """Temperature 1 (multi-label: thresholds 0.5, or the fixed one), recorded as `no_held_out_images`."""
    log.warning("No held-out logits (a class has a single training image): the model is not calibrated (temperature 1)")
    none = torch.zeros(0, len(model.class_names))
    if model.task.multilabel:
        calibration = multilabel_held_out(none, none, model.class_names, method, "", threshold)[1]
    else:
        calibration = choose_temperature(none, torch.zeros(0, dtype=torch.long), method)
    set_calibration(trainer, model, best, calibration)
    return calibration.metrics()
