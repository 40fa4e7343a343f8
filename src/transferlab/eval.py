"""transferlab-eval: test a checkpoint on the split it was trained with (or on data given here)."""

from __future__ import annotations

import logging
from pathlib import Path

import lightning.pytorch as pl
from omegaconf import DictConfig, OmegaConf

from transferlab.cli import hydra_command
from transferlab.errors import user_errors_exit
from transferlab.pipeline import build_datamodule, build_trainer, container, instantiate_group, load_checkpoint, test_and_report
from transferlab.reporting import print_config_tree

log = logging.getLogger(__name__)


@user_errors_exit
def evaluate(cfg: DictConfig) -> dict:
    out_dir = Path(cfg.paths.output_dir)
    print_config_tree(cfg, save_to=out_dir / "config.yaml")
    model, hparams = load_checkpoint(cfg.ckpt_path)
    run = hparams.get("run") or {}
    pl.seed_everything(run.get("seed", 0), workers=True)
    overrides = {k: v for k, v in (container(cfg.get("data")) or {}).items() if v is not None}
    data_cfg = {**run["data"], **overrides}
    datamodule = build_datamodule(data_cfg, model.backbone.preprocessing)
    if datamodule.class_names != model.class_names:
        log.warning("The data's classes %s differ from the checkpoint's %s", datamodule.class_names[:5], model.class_names[:5])
    trainer_cfg = OmegaConf.merge(cfg.trainer, {"precision": cfg.trainer.precision or run.get("precision") or "32-true"})
    trainer = build_trainer(trainer_cfg, callbacks=instantiate_group(cfg.get("callbacks")), loggers=instantiate_group(cfg.get("logger")))
    return test_and_report(trainer, model, datamodule, out_dir, None, {"checkpoint": str(cfg.ckpt_path)})


main = hydra_command("eval", evaluate)


if __name__ == "__main__":
    main()
