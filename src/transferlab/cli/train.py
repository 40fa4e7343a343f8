"""transferlab-train: fit a classifier on a pretrained backbone (or cross-validate it), test the selected checkpoint,
write metrics.json."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import lightning.pytorch as pl
from omegaconf import DictConfig

from transferlab.cli.app import Command
from transferlab.core.context import is_global_zero
from transferlab.data.labels import task_metric
from transferlab.models.backbones import create_backbone
from transferlab.training.artifacts import print_config_tree
from transferlab.training.builders import build_datamodule, container
from transferlab.training.checkpointing import resume_checkpoint
from transferlab.training.cross_validation import cross_validate
from transferlab.training.fit import fit_and_test
from transferlab.training.performance import resolve_precision
from transferlab.training.slurm import end_process_on_requeue, resume_after_requeue


def train(cfg: DictConfig) -> Optional[float]:
    """Fit (or cross-validate), test, write the run folder; return the optimised metric (for sweepers)."""
    out_dir = Path(cfg.paths.output_dir)
    precision_note = resolve_precision(cfg)
    if is_global_zero():
        print_config_tree(cfg, save_to=out_dir / "config.yaml")
    end_process_on_requeue()  # a SLURM job: submitit owns the requeue signal (training.slurm)
    ckpt_path = None if cfg.cv.folds else resume_checkpoint(resume_after_requeue(cfg.ckpt_path), out_dir)
    pl.seed_everything(cfg.seed, workers=True)
    backbone = create_backbone(**container(cfg.backbone))
    datamodule = build_datamodule(container(cfg.data), backbone.preprocessing)
    if cfg.cv.folds:
        metrics = cross_validate(cfg, backbone, datamodule, precision_note)
    else:
        metrics = fit_and_test(cfg, backbone, datamodule, precision_note, ckpt_path=ckpt_path).metrics
    objective = task_metric(cfg.optimized_metric, datamodule.multilabel)  # val/acc_best stands for val/map there
    return metrics.get(objective) if objective else None


command = Command("train", train)
main = command.main

if __name__ == "__main__":
    main()
