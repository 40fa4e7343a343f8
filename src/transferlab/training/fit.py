"""One fit of a run (a plain run, one cross-validation fold, or the refit after it): build the model and the Trainer,
fit, validate and calibrate the selected checkpoint, test it, write the run folder."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import lightning.pytorch as pl
from lightning.pytorch.callbacks import EarlyStopping, ModelCheckpoint
from omegaconf import DictConfig, OmegaConf, open_dict

from transferlab.callbacks.checkpoints import LastCheckpoint
from transferlab.callbacks.feature_cache import FeatureCache
from transferlab.callbacks.optuna_pruning import pruning_callbacks
from transferlab.callbacks.unfreeze import GradualUnfreeze
from transferlab.core.files import to_float_dict
from transferlab.core.redaction import redact
from transferlab.data.base import ImageClassificationDataModule
from transferlab.models.backbone import Backbone
from transferlab.models.classifier import TransferClassifier
from transferlab.training.artifacts import announce_skipped, test_and_report
from transferlab.training.builders import build_trainer, container, instantiate_group, log_run_config
from transferlab.training.calibration import validate_and_calibrate
from transferlab.training.loggers import resolve_logger_config
from transferlab.training.performance import apply_performance


def build_model(cfg: DictConfig, backbone: Backbone, datamodule: ImageClassificationDataModule) -> TransferClassifier:
    """Hyper-parameters go into every checkpoint: credentials masked."""
    return TransferClassifier(
        backbone=redact(container(cfg.backbone)),
        class_names=datamodule.class_names,
        finetune=redact(container(cfg.finetune)),
        optimizer=redact(container(cfg.optimizer)),
        scheduler=redact(container(cfg.scheduler)),
        run=redact({"data": container(cfg.data), "seed": cfg.seed, "precision": str(cfg.trainer.get("precision"))}),
        loss_weights=datamodule.loss_weights(),
        prebuilt_backbone=backbone,
    )


def selected_checkpoint(trainer: pl.Trainer) -> Optional[str]:
    every = trainer.callbacks  # type: ignore[attr-defined]  # ours and any Lightning added
    checkpoint = next((c for c in every if isinstance(c, ModelCheckpoint) and not isinstance(c, LastCheckpoint)), None)
    return checkpoint.best_model_path if checkpoint and checkpoint.best_model_path else None


def fit_and_test(
    cfg: DictConfig,
    backbone: Backbone,
    datamodule: ImageClassificationDataModule,
    precision_note: str,
    ckpt_path: Optional[str] = None,
    refit: Optional[tuple[int, float]] = None,
    prune: bool = True,
    cache: Optional[FeatureCache] = None,
) -> tuple[dict[str, Any], TransferClassifier]:
    """Fit in cfg.paths.output_dir; returns (metrics.json's values, the model). With `refit` = (epochs, temperature)
    there is no validation: train that many epochs (the schedule as configured), take that temperature, save
    checkpoints/best.ckpt, and test it if the data has a test split."""
    out_dir = Path(cfg.paths.output_dir)
    resolve_logger_config(cfg.get("logger"), run_name=out_dir.name)
    model = build_model(cfg, backbone, datamodule)
    callbacks = instantiate_group(cfg.callbacks, "callbacks") + apply_performance(cfg, model, datamodule, precision_note, cache)
    if prune:
        callbacks += pruning_callbacks()  # a trial of an Optuna sweep
    if cfg.finetune.mode == "gradual":
        callbacks.append(GradualUnfreeze(cfg.finetune.unfreeze_at_epoch, cfg.finetune.backbone_lr_factor))
    trainer_cfg: Any = cfg.trainer
    if refit is not None:  # nothing to validate on: no selection by val/acc, a fixed number of epochs
        callbacks = [c for c in callbacks if not isinstance(c, (ModelCheckpoint, EarlyStopping))]
        trainer_cfg = OmegaConf.merge(cfg.trainer, {})
        with open_dict(trainer_cfg):
            trainer_cfg.max_epochs, trainer_cfg.limit_val_batches, trainer_cfg.num_sanity_val_steps = refit[0], 0, 0
    loggers = instantiate_group(cfg.logger, "logger")
    trainer = build_trainer(trainer_cfg, callbacks, loggers)
    log_run_config(loggers, cfg)
    announce_skipped(datamodule, out_dir)

    trainer.fit(model, datamodule=datamodule, ckpt_path=ckpt_path, weights_only=True if ckpt_path else None)
    best = selected_checkpoint(trainer)
    extra: dict[str, Any] = {**to_float_dict({k: v for k, v in trainer.callback_metrics.items() if k.startswith("val/")})}
    if refit is not None:
        best = str(out_dir / "checkpoints" / "best.ckpt")
        model.temperature.fill_(refit[1])
        model.hparams["run"] = {**model.hparams["run"], "refit": True}  # eval warns: no held-out split of its own
        trainer.save_checkpoint(best, weights_only=True)
        extra["calibration/temperature"] = refit[1]
    else:
        extra.update(validate_and_calibrate(trainer, model, datamodule, best, str(cfg.calibration)))
    extra.update(best_checkpoint=best, epochs=trainer.current_epoch)
    if not datamodule.splits.get("test"):
        return extra, model
    return test_and_report(trainer, model, datamodule, out_dir, best, extra, seed=int(cfg.seed)), model
