"""finetune.head_solver=lbfgs: the frozen probe's head solved in one convex, full-batch fit on the cached features
(models.linear_probe) before the first training step, its L2 strength C chosen by inner cross-validation over every
training image (finetune.select_c=cv, then refitted on all of them) or on the validation split (select_c=val).

The epoch that follows runs no optimiser step (the model's training_step returns nothing once the head is solved),
so checkpointing, calibration and the test run as for a head trained by epochs. With select_c=cv the run has no
validation split (training.fit gives it to training); the inner folds' held-out logits stand in for it.
"""

from __future__ import annotations

import logging
from typing import Any, Optional

import lightning.pytorch as pl
import numpy as np
import torch

from transferlab.core.errors import ConfigError
from transferlab.models.classifier import as_classifier
from transferlab.models.linear_probe import C_GRID, ProbeFit, select_by_cv, select_on_val

log = logging.getLogger(__name__)


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
    return torch.from_numpy(np.concatenate(rows)), torch.tensor(labels), torch.tensor(images)


class LinearProbeSolver(pl.Callback):
    def __init__(self, *, standardize: bool, select: str = "cv", folds: int = 5, seed: int = 0, c: Optional[float] = None) -> None:
        """`c`: a fixed L2 strength (the refit after a cross-validation with select_c=val: the folds' median)."""
        if select not in ("cv", "val"):
            raise ConfigError(f"finetune.select_c={select!r}: use cv (inner cross-validation) or val (the validation split)")
        self.standardize, self.select, self.folds, self.seed, self.c = standardize, select, folds, seed, c
        self.fit: Optional[ProbeFit] = None

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        model = as_classifier(pl_module)
        datamodule = trainer.datamodule  # type: ignore[attr-defined]
        if "train" not in datamodule.feature_sets:
            raise ConfigError(
                "finetune.head_solver=lbfgs (the default probe) needs the frozen-feature cache: set performance.feature_cache.enabled=true, "
                "or finetune.head_solver=sgd to train the head by epochs on images"
            )
        x, y, images = feature_matrix(datamodule.feature_sets["train"])
        weights = model.loss_weights.cpu() if model.loss_weights is not None else None
        classes = len(model.class_names)
        grid = (self.c,) if self.c is not None else C_GRID
        if self.select == "cv":
            self.fit = select_by_cv((x, y), classes, self.standardize, weights, self.folds, self.seed, images, grid)
            where = f"by {self.folds}-fold cross-validation over the {int(images.max()) + 1} training images"
        else:
            val = feature_matrix(datamodule.feature_sets["val"])[:2] if "val" in datamodule.feature_sets else (x[:0], y[:0])
            self.fit = select_on_val((x, y), val, classes, self.standardize, weights, grid)
            where = f"on {len(val[1])} validation images"
        self.c = self.fit.c
        linear = model.head[-1]
        assert isinstance(linear, torch.nn.Linear)
        with torch.no_grad():
            linear.weight.copy_(self.fit.weight.to(linear.weight))
            linear.bias.copy_(self.fit.bias.to(linear.bias))
        model.head_solved = True
        log.info("Linear probe (L-BFGS): C = %.3g chosen %s from %d values; %d training rows", self.c, where, len(self.fit.search), len(y))
