"""After fit: validate the selected checkpoint, and (calibration=temperature) fit its temperature on the validation set.

The temperature is written into best.ckpt (the `temperature` buffer of the state_dict), so the test that
follows, `transferlab-eval`, `transferlab-predict` and anything that loads the checkpoint later report and use
calibrated probabilities. metrics.json keeps the validation figures before and after (`val/ece_before_calibration`)
and how the temperature was chosen (`calibration/rule`, `calibration/held_out_errors`: models.evaluation's
choose_temperature, which does not sharpen on a held-out set with too few errors); the checkpoint keeps the same
record (`transferlab_calibration`), which export turns into `logits_are_calibrated`.
"""

from __future__ import annotations

import logging
from typing import Any, Optional

import lightning.pytorch as pl
import torch

from transferlab.core.safe_load import read_checkpoint
from transferlab.data.base import ImageClassificationDataModule
from transferlab.models.classifier import TransferClassifier, as_classifier
from transferlab.models.evaluation import Calibration, calibration_metrics, choose_temperature, classification_metrics
from transferlab.training.label_decisions import multilabel_held_out

log = logging.getLogger(__name__)
METHODS = ("temperature", "none")


def validate_and_calibrate(
    trainer: pl.Trainer,
    model: TransferClassifier,
    datamodule: ImageClassificationDataModule,
    ckpt_path: Optional[str],
    method: str,
    threshold: Any = "f1",
) -> dict[str, Any]:
    """val/* of the selected checkpoint (every metric, per class too), calibrated with `method` (multi-label: and
    its label thresholds chosen by `threshold`); returns them."""
    if not datamodule.splits.get("val"):
        log.warning("No validation images: the model is not calibrated (calibration needs held-out images)")
        none = torch.zeros(0, len(model.class_names))
        if model.task.multilabel:  # no temperatures; thresholds 0.5, or the fixed one
            calibration = multilabel_held_out(none, none, model.class_names, method, "", threshold)[1]
        else:
            calibration = choose_temperature(none, torch.zeros(0, dtype=torch.long), method)
        set_calibration(trainer, model, ckpt_path, calibration)
        return calibration.metrics()
    trainer.validate(model, datamodule=datamodule, ckpt_path=ckpt_path, weights_only=True if ckpt_path else None, verbose=False)
    module = as_classifier(trainer.lightning_module)
    raw, labels = module.plain_raw["val"], module.outputs["val"][1]
    found, calibration = held_out_metrics(
        raw, labels, module.class_names, method, "validation images", threshold, datamodule.ignore_mask(datamodule.splits["val"])
    )
    calibration.temperature = trainer.strategy.broadcast(calibration.temperature, src=0)
    set_calibration(trainer, module, ckpt_path, calibration)
    return {**found, **calibration.metrics()}


def held_out_metrics(
    raw: torch.Tensor, labels: torch.Tensor, class_names: list[str], method: str, what: str, threshold: Any = "f1", mask: Any = None
) -> tuple[dict[str, float], Calibration]:
    """val/* of the head's own logits on held-out images (per class too) and how they are calibrated
    (choose_temperature), with the calibrated ECE and NLL (the uncalibrated ones kept as *_before_calibration).
    Multi-label logits (labels [N, K]): training.label_decisions (a temperature and a threshold per label)."""
    if labels.ndim == 2:
        return multilabel_held_out(raw, labels, class_names, method, what, threshold, mask)
    found = {f"val/{k}": v for k, v in classification_metrics(raw, labels, class_names, per_class=True).items()}
    found["val/loss"] = found["val/nll"]  # of the selected checkpoint, not of the last epoch (cross-entropy = NLL)
    calibration = choose_temperature(raw, labels, method, what)
    if calibration.calibrated:
        after = calibration_metrics(raw / float(calibration.temperature), labels, len(class_names))  # type: ignore[arg-type]
        for key in ("ece", "nll"):
            found[f"val/{key}_before_calibration"], found[f"val/{key}"] = found[f"val/{key}"], after[key]
        log.info(
            "Calibration: temperature %.3f (%s; fit %.3f, %d wrong of %d %s); ECE %.4f -> %.4f, NLL %.4f -> %.4f",
            calibration.temperature,
            calibration.rule,
            calibration.fitted_temperature or 1.0,
            calibration.held_out_errors,
            calibration.held_out_images,
            what,
            found["val/ece_before_calibration"],
            found["val/ece"],
            found["val/nll_before_calibration"],
            found["val/nll"],
        )
    return found, calibration


def set_calibration(trainer: pl.Trainer, model: TransferClassifier, ckpt_path: Optional[str], calibration: Calibration) -> None:
    """In the model, and in the checkpoint file (rewritten atomically by the trainer's checkpoint IO, on rank 0)."""
    apply_calibration(model, calibration)
    if not ckpt_path:
        return
    if trainer.is_global_zero:
        checkpoint = read_checkpoint(ckpt_path)
        checkpoint["state_dict"]["temperature"] = model.temperature.detach().cpu().clone()
        checkpoint["transferlab_calibration"] = model.calibration
        if model.thresholds:
            checkpoint["transferlab_thresholds"] = dict(model.thresholds)
        trainer.strategy.checkpoint_io.save_checkpoint(checkpoint, ckpt_path)
    trainer.strategy.barrier("calibration")


def apply_calibration(model: TransferClassifier, calibration: Calibration) -> None:
    """The temperature (one per label for a multi-label model), its record and the label thresholds, in the model."""
    model.temperature.copy_(torch.as_tensor(calibration.temperature, dtype=model.temperature.dtype))
    model.calibration = calibration.record()
    if calibration.thresholds is not None:
        model.thresholds = dict(zip(model.class_names, calibration.thresholds))
