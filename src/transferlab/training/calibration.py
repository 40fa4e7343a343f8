"""After fit: validate the selected checkpoint, and (calibration=temperature) fit its temperature on the validation set.

The temperature is written into best.ckpt (the `temperature` buffer of the state_dict), so the test that
follows, `transferlab-eval`, `transferlab-predict` and anything that loads the checkpoint later report and use
calibrated probabilities. metrics.json keeps the validation figures before and after (`val/ece_before_calibration`).
"""

from __future__ import annotations

import logging
from typing import Optional

import lightning.pytorch as pl
import torch

from transferlab.core.safe_load import read_checkpoint
from transferlab.data.base import ImageClassificationDataModule
from transferlab.models.classifier import TransferClassifier, as_classifier
from transferlab.models.evaluation import calibration_metrics, classification_metrics, fit_temperature

log = logging.getLogger(__name__)
METHODS = ("temperature", "none")


def validate_and_calibrate(
    trainer: pl.Trainer, model: TransferClassifier, datamodule: ImageClassificationDataModule, ckpt_path: Optional[str], method: str
) -> dict[str, float]:
    """val/* of the selected checkpoint (every metric, per class too), calibrated with `method`; returns them."""
    if not datamodule.splits.get("val"):
        log.warning("No validation images: the model is not calibrated (calibration needs held-out images)")
        return {"calibration/temperature": float(model.temperature)}
    trainer.validate(model, datamodule=datamodule, ckpt_path=ckpt_path, weights_only=True if ckpt_path else None, verbose=False)
    module = as_classifier(trainer.lightning_module)
    logits, labels = module.outputs["val"]
    found, temperature = held_out_metrics(logits * float(module.temperature), labels, module.class_names, method, "validation images")
    temperature = float(trainer.strategy.broadcast(temperature, src=0))
    set_temperature(trainer, module, ckpt_path, temperature)
    found["calibration/temperature"] = temperature
    return found


def held_out_metrics(raw: torch.Tensor, labels: torch.Tensor, class_names: list[str], method: str, what: str) -> tuple[dict[str, float], float]:
    """val/* of the head's own logits on held-out images (per class too) and, with method=temperature, the
    temperature fitted on them, with the calibrated ECE and NLL (the uncalibrated ones kept as *_before_calibration)."""
    found = {f"val/{k}": v for k, v in classification_metrics(raw, labels, class_names, per_class=True).items()}
    found["val/loss"] = found["val/nll"]  # of the selected checkpoint, not of the last epoch (cross-entropy = NLL)
    temperature = 1.0
    if method == "temperature":
        temperature = fit_temperature(raw, labels)
        after = calibration_metrics(raw / temperature, labels, len(class_names))
        for key in ("ece", "nll"):
            found[f"val/{key}_before_calibration"], found[f"val/{key}"] = found[f"val/{key}"], after[key]
        log.info(
            "Calibration: temperature %.3f fitted on %d %s; ECE %.4f -> %.4f, NLL %.4f -> %.4f",
            temperature,
            len(labels),
            what,
            found["val/ece_before_calibration"],
            found["val/ece"],
            found["val/nll_before_calibration"],
            found["val/nll"],
        )
    return found, temperature


def set_temperature(trainer: pl.Trainer, model: TransferClassifier, ckpt_path: Optional[str], temperature: float) -> None:
    """In the model, and in the checkpoint file (rewritten atomically by the trainer's checkpoint IO, on rank 0)."""
    model.temperature.fill_(temperature)
    if not ckpt_path:
        return
    if trainer.is_global_zero:
        checkpoint = read_checkpoint(ckpt_path)
        checkpoint["state_dict"]["temperature"] = torch.tensor(temperature)
        trainer.strategy.checkpoint_io.save_checkpoint(checkpoint, ckpt_path)
    trainer.strategy.barrier("calibration")
