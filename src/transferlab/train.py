"""transferlab-train: fit a classifier on a pretrained backbone, test its best checkpoint, write metrics.json."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import lightning.pytorch as pl
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.utilities import rank_zero_only
from omegaconf import DictConfig

from transferlab.callbacks.optuna_pruning import pruning_callbacks
from transferlab.checkpointing import LastCheckpoint, resume_checkpoint
from transferlab.cli import hydra_command
from transferlab.errors import user_errors_exit
from transferlab.loggers import resolve_logger_config
from transferlab.models.backbones import create_backbone
from transferlab.models.classifier import TransferClassifier
from transferlab.models.finetune import GradualUnfreeze
from transferlab.performance import apply_performance, resolve_precision
from transferlab.redaction import redact
from transferlab.pipeline import (announce_skipped, build_datamodule, build_trainer, container, instantiate_group,
                                  log_run_config, test_and_report)
from transferlab.reporting import print_config_tree, to_float_dict
from transferlab.schema import validate_train_config


@user_errors_exit
def train(cfg: DictConfig) -> Optional[float]:
    out_dir = Path(cfg.paths.output_dir)
    resolve_logger_config(cfg.get("logger"), run_name=out_dir.name)
    precision_note = resolve_precision(cfg)
    validate_train_config(cfg)
    if rank_zero_only.rank == 0:
        print_config_tree(cfg, save_to=out_dir / "config.yaml")
    ckpt_path = resume_checkpoint(cfg.get("ckpt_path"), out_dir)
    pl.seed_everything(cfg.seed, workers=True)

    backbone = create_backbone(**container(cfg.backbone))
    data_cfg = container(cfg.data)
    datamodule = build_datamodule(data_cfg, backbone.preprocessing)
    model = TransferClassifier(  # hyper-parameters go into every checkpoint: credentials masked
        backbone=redact(container(cfg.backbone)), class_names=datamodule.class_names, finetune=redact(container(cfg.finetune)),
        optimizer=redact(container(cfg.optimizer)), scheduler=redact(container(cfg.scheduler)),
        run=redact({"data": data_cfg, "seed": cfg.seed, "precision": str(cfg.trainer.get("precision"))}),
        prebuilt_backbone=backbone,
    )

    callbacks = instantiate_group(cfg.get("callbacks")) + apply_performance(cfg, model, datamodule, precision_note)
    callbacks += pruning_callbacks()  # a trial of an Optuna sweep
    if cfg.finetune.mode == "gradual":
        callbacks.append(GradualUnfreeze(cfg.finetune.unfreeze_at_epoch, cfg.finetune.backbone_lr_factor))
    loggers = instantiate_group(cfg.get("logger"))
    trainer = build_trainer(cfg.trainer, callbacks, loggers)
    log_run_config(loggers, cfg)
    announce_skipped(datamodule, out_dir)

    trainer.fit(model, datamodule=datamodule, ckpt_path=ckpt_path, weights_only=True if ckpt_path else None)
    fit_metrics = {k: v for k, v in trainer.callback_metrics.items() if k.startswith("val/")}
    checkpoint = next((c for c in trainer.callbacks if isinstance(c, ModelCheckpoint) and not isinstance(c, LastCheckpoint)), None)
    best = checkpoint.best_model_path if checkpoint and checkpoint.best_model_path else None
    extra = {**to_float_dict(fit_metrics), "best_checkpoint": best, "epochs": trainer.current_epoch}
    metrics = test_and_report(trainer, model, datamodule, out_dir, best, extra)
    return metrics.get(cfg.get("optimized_metric")) if cfg.get("optimized_metric") else None


main = hydra_command("train", train)


if __name__ == "__main__":
    main()
