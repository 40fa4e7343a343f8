"""tune.lr_find=true: Lightning's learning-rate finder (fastai's lr_find, Smith 2015) before fit. It trains from
the run's starting weights for a short exponential sweep of learning rates, restores those weights, and its
suggestion (the steepest fall of the smoothed loss) becomes optimizer.lr; `<run>/lr_find.png` shows the curve."""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any, Optional

import lightning.pytorch as pl
from lightning.pytorch.tuner import Tuner

from transferlab.core.plotting import pyplot, save_figure
from transferlab.models.classifier import TransferClassifier

log = logging.getLogger(__name__)
PLOT = "lr_find.png"


def find_learning_rate(
    trainer: pl.Trainer, model: TransferClassifier, datamodule: Any, out_dir: Path, min_lr: float = 1e-6, max_lr: float = 1.0, steps: int = 100
) -> Optional[float]:
    """Run the finder, save its plot, set the model's optimizer.lr to the suggestion (kept as is when the sweep
    gives none); returns the suggestion."""
    epochs = trainer.fit_loop.max_epochs
    trainer.fit_loop.max_epochs = max(epochs or 1, steps)  # the sweep's steps, not the run's epochs, bound it (small data: few steps per epoch)
    try:
        finder = Tuner(trainer).lr_find(model, datamodule=datamodule, min_lr=min_lr, max_lr=max_lr, num_training=steps, update_attr=False)
    finally:
        trainer.fit_loop.max_epochs = epochs
    suggestion = finder.suggestion() if finder is not None else None
    configured = float(model.hparams["optimizer"]["lr"])
    if finder is not None and trainer.is_global_zero:
        pyplot()
        figure = finder.plot(suggest=suggestion is not None)
        assert figure is not None
        figure.axes[0].set_title(f"lr_find: suggestion {suggestion:.3g}" if suggestion else "lr_find: no suggestion")
        save_figure(figure, out_dir / PLOT)
    if suggestion is None or not math.isfinite(suggestion):
        log.warning("lr_find gave no suggestion (too few steps or a flat loss): optimizer.lr stays %g", configured)
        return None
    model.hparams["optimizer"] = {**model.hparams["optimizer"], "lr": float(suggestion)}
    log.info("lr_find: optimizer.lr %g -> %.3g (the steepest descent of the loss; plot in %s)", configured, suggestion, out_dir / PLOT)
    return float(suggestion)
