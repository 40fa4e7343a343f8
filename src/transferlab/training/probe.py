"""finetune.head_solver=lbfgs: the frozen probe's head solved in one convex, full-batch fit on the cached features
(models.linear_probe), its L2 strength C chosen by inner cross-validation over every training image
(finetune.select_c=cv, then refitted on all of them) or on the validation split (select_c=val).

A plain step of the run (training.fit): it takes the cached features and returns the fit; no optimiser step is taken,
so checkpointing, calibration and the test run as for a head trained by epochs. With select_c=cv the run has no
validation split (training.fit gives it to training); the inner folds' held-out logits stand in for it.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Optional

import numpy as np
import torch
from omegaconf import DictConfig

from transferlab.core.errors import ConfigError
from transferlab.models.classifier import TransferClassifier
from transferlab.models.linear_probe import C_GRID, ProbeFit, select_by_cv, select_on_val

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ProbeSettings:
    """finetune.standardize / select_c / c_folds, data.split_seed; `c`: a fixed C (the refit after select_c=val folds)."""

    standardize: bool
    select: str  # cv | val (the schema allows no other value)
    folds: int
    seed: int
    c: Optional[float] = None


def probe_settings(cfg: DictConfig, refit_c: Optional[float]) -> Optional[ProbeSettings]:
    """The probe's settings when finetune.head_solver=lbfgs (frozen only), else None."""
    finetune = cfg.finetune
    if finetune.get("head_solver") != "lbfgs":  # fine-tuning configs have no head solver: the head trains by epochs
        return None
    select = str(finetune.select_c)
    fixed = refit_c if select == "val" else None  # a refit after select_c=val folds takes their median C; cv chooses its own
    return ProbeSettings(standardize=bool(finetune.standardize), select=select, folds=int(finetune.c_folds), seed=int(cfg.data.split_seed), c=fixed)


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


def solve_probe(model: TransferClassifier, feature_sets: dict[str, Any], settings: ProbeSettings) -> ProbeFit:
    """Fit the head on the training split's cached features, choose C as `settings` say, write the head's weights."""
    if "train" not in feature_sets:
        raise ConfigError(
            "finetune.head_solver=lbfgs (the default probe) needs the frozen-feature cache: set performance.feature_cache.enabled=true, "
            "or finetune.head_solver=sgd to train the head by epochs on images"
        )
    if model.task.multilabel and str(model.hparams["finetune"].get("loss") or "auto") == "asl":
        raise ConfigError(
            "finetune.loss=asl: the lbfgs probe is a convex logistic fit (one-vs-rest, binary cross-entropy); "
            "train the head by epochs with finetune.head_solver=sgd to use the asymmetric loss"
        )
    x, y, images = feature_matrix(feature_sets["train"])
    weights = torch.tensor(model.hparams["loss_weights"], dtype=torch.float32) if model.hparams.get("loss_weights") else None
    classes = len(model.class_names)
    grid = (settings.c,) if settings.c is not None else C_GRID
    if settings.select == "cv":
        fit = select_by_cv((x, y), classes, settings.standardize, weights, settings.folds, settings.seed, images, grid)
        where = f"by {settings.folds}-fold cross-validation over the {int(images.max()) + 1} training images"
    else:
        val = feature_matrix(feature_sets["val"])[:2] if "val" in feature_sets else (x[:0], y[:0])
        fit = select_on_val((x, y), val, classes, settings.standardize, weights, grid)
        where = f"on {len(val[1])} validation images"
    linear = model.head[-1]
    assert isinstance(linear, torch.nn.Linear)
    with torch.no_grad():
        linear.weight.copy_(fit.weight.to(linear.weight))
        linear.bias.copy_(fit.bias.to(linear.bias))
    log.info("Linear probe (L-BFGS): C = %.3g chosen %s from %d values; %d training rows", fit.c, where, len(fit.search), len(y))
    return fit
