"""transferlab-eval: test a checkpoint on the split it was trained with (or on data given here)."""

from __future__ import annotations

import logging
from pathlib import Path

import lightning.pytorch as pl
from omegaconf import DictConfig, OmegaConf

from transferlab.cli.app import Command
from transferlab.config.paths import config_dir
from transferlab.models.classifier import load_checkpoint
from transferlab.training.artifacts import print_config_tree, test_and_report
from transferlab.training.builders import build_datamodule, build_trainer, container, instantiate_group
from transferlab.training.loggers import resolve_logger_config

log = logging.getLogger(__name__)


def evaluate(cfg: DictConfig) -> dict:
    """Rebuild the run's test split (or the data given here) and test the checkpoint on it."""
    out_dir = Path(cfg.paths.output_dir)
    print_config_tree(cfg, save_to=out_dir / "config.yaml")
    model, hparams = load_checkpoint(cfg.ckpt_path)
    model.tta = str(cfg.get("tta") or "none")
    run = hparams.get("run") or {}
    pl.seed_everything(run.get("seed", 0), workers=True)
    overrides = {k: v for k, v in (container(cfg.data) or {}).items() if v is not None}
    data_cfg = {**keys_added_since(run["data"]), **run["data"], **overrides}
    datamodule = build_datamodule(data_cfg, model.backbone.preprocessing)
    if datamodule.class_names != model.class_names:
        log.warning("The data's classes %s differ from the checkpoint's %s", datamodule.class_names[:5], model.class_names[:5])
    trainer_cfg = OmegaConf.merge(cfg.trainer, {"precision": cfg.trainer.precision or run.get("precision") or "32-true"})
    assert isinstance(trainer_cfg, DictConfig)
    resolve_logger_config(cfg.get("logger"), run_name=out_dir.name, task_name=str(cfg.task_name), tags=list(cfg.get("tags") or []))
    trainer = build_trainer(
        trainer_cfg, callbacks=instantiate_group(cfg.get("callbacks"), "callbacks"), loggers=instantiate_group(cfg.logger, "logger")
    )
    if run.get("refit") and not datamodule.has_official_test and "root" not in overrides:
        log.warning("This checkpoint was refit on every image of its data (cv.refit): this test split was trained on; give data.root=<new images>")
    return test_and_report(
        trainer, model, datamodule, out_dir, None, {"checkpoint": str(cfg.ckpt_path)}, seed=int(run.get("seed", 0)), interpret=cfg.get("interpret")
    )


def keys_added_since(stored: dict) -> dict:
    """Dataset keys a checkpoint from an earlier release lacks (e.g. data.class_weights), at their YAML values."""
    base = OmegaConf.to_container(OmegaConf.load(Path(config_dir()) / "data" / "_base.yaml"))
    assert isinstance(base, dict)
    return {k: v for k, v in base.items() if k not in stored and not (isinstance(v, str) and "${" in v) and v != "???"}


command = Command("eval", evaluate)
main = command.main


if __name__ == "__main__":
    main()
