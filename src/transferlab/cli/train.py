"""transferlab-train: fit a classifier on a pretrained backbone, test its best checkpoint, write metrics.json."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import lightning.pytorch as pl
from lightning.pytorch.callbacks import ModelCheckpoint
from omegaconf import DictConfig

from transferlab.callbacks.checkpoints import LastCheckpoint
from transferlab.callbacks.optuna_pruning import pruning_callbacks
from transferlab.callbacks.unfreeze import GradualUnfreeze
from transferlab.cli.app import Command
from transferlab.core.context import is_global_zero
from transferlab.core.files import to_float_dict
from transferlab.core.redaction import redact
from transferlab.models.backbones import create_backbone
from transferlab.models.classifier import TransferClassifier
from transferlab.training.artifacts import announce_skipped, print_config_tree, test_and_report
from transferlab.training.builders import build_datamodule, build_trainer, container, instantiate_group, log_run_config
from transferlab.training.checkpointing import resume_checkpoint
from transferlab.training.loggers import resolve_logger_config
from transferlab.training.performance import apply_performance, resolve_precision


def train(cfg: DictConfig) -> Optional[float]:
    """Fit, test the best checkpoint, write the run folder; return the optimised metric (for sweepers)."""
    out_dir = Path(cfg.paths.output_dir)
    resolve_logger_config(cfg.get("logger"), run_name=out_dir.name)
    precision_note = resolve_precision(cfg)
    if is_global_zero():
        print_config_tree(cfg, save_to=out_dir / "config.yaml")
    ckpt_path = resume_checkpoint(cfg.ckpt_path, out_dir)
    pl.seed_everything(cfg.seed, workers=True)

    backbone = create_backbone(**container(cfg.backbone))
    data_cfg = container(cfg.data)
    datamodule = build_datamodule(data_cfg, backbone.preprocessing)
    model = TransferClassifier(  # hyper-parameters go into every checkpoint: credentials masked
        backbone=redact(container(cfg.backbone)),
        class_names=datamodule.class_names,
        finetune=redact(container(cfg.finetune)),
        optimizer=redact(container(cfg.optimizer)),
        scheduler=redact(container(cfg.scheduler)),
        run=redact({"data": data_cfg, "seed": cfg.seed, "precision": str(cfg.trainer.get("precision"))}),
        prebuilt_backbone=backbone,
    )

    callbacks = instantiate_group(cfg.callbacks, "callbacks") + apply_performance(cfg, model, datamodule, precision_note)
    callbacks += pruning_callbacks()  # a trial of an Optuna sweep
    if cfg.finetune.mode == "gradual":
        callbacks.append(GradualUnfreeze(cfg.finetune.unfreeze_at_epoch, cfg.finetune.backbone_lr_factor))
    loggers = instantiate_group(cfg.logger, "logger")
    trainer = build_trainer(cfg.trainer, callbacks, loggers)
    log_run_config(loggers, cfg)
    announce_skipped(datamodule, out_dir)

    trainer.fit(model, datamodule=datamodule, ckpt_path=ckpt_path, weights_only=True if ckpt_path else None)
    fit_metrics = {k: v for k, v in trainer.callback_metrics.items() if k.startswith("val/")}
    every = trainer.callbacks  # type: ignore[attr-defined]  # ours and any Lightning added
    checkpoint = next((c for c in every if isinstance(c, ModelCheckpoint) and not isinstance(c, LastCheckpoint)), None)
    best = checkpoint.best_model_path if checkpoint and checkpoint.best_model_path else None
    extra = {**to_float_dict(fit_metrics), "best_checkpoint": best, "epochs": trainer.current_epoch}
    metrics = test_and_report(trainer, model, datamodule, out_dir, best, extra)
    return metrics.get(cfg.optimized_metric) if cfg.optimized_metric else None


command = Command("train", train)
main = command.main

if __name__ == "__main__":
    main()
