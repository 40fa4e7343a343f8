"""transferlab-eval: test a checkpoint on the test files it stored (or on data given here).

On the run's own data (no `data.root=`, or the same folder) the test images are exactly the checkpoint's stored test
files that still exist: files added since training are never tested, missing ones are counted, and a stored test
file whose bytes changed stops the command (exit 2). On other data (`data.root=<folder>`) every usable image there is
tested, except any file whose bytes equal one the model was fitted or selected on (so the same dataset in another
place is tested on its test files and any new ones). Checkpoints from before stored splits get their test split
rebuilt the way it was made then (seeded, stratified), with a warning.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Optional

import lightning.pytorch as pl
from omegaconf import DictConfig, OmegaConf

from transferlab.cli.app import Command
from transferlab.config.paths import config_dir
from transferlab.core.errors import DataError
from transferlab.data.base import ImageClassificationDataModule
from transferlab.data.splits import legacy_splits, split_key
from transferlab.data.stored_splits import counts, stored_test, without_seen_files
from transferlab.models.classifier import load_checkpoint
from transferlab.training.artifacts import print_config_tree, test_and_report
from transferlab.training.builders import build_datamodule, build_trainer, container, instantiate_group
from transferlab.training.loggers import finish_loggers, resolve_logger_config

log = logging.getLogger(__name__)


def evaluate(cfg: DictConfig) -> dict:
    """Test the checkpoint on its stored test files (or on the data given here)."""
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
    choose_test_images(model.split_table, datamodule, own_data="root" not in overrides or same_folder(model.split_table, datamodule.root))
    metrics = test_and_report(
        trainer, model, datamodule, out_dir, None, {"checkpoint": str(cfg.ckpt_path)}, seed=int(run.get("seed", 0)), interpret=cfg.get("interpret")
    )
    finish_loggers(trainer.loggers)
    return metrics


def same_folder(table: Optional[dict], root: Path) -> bool:
    return bool(table and table.get("root") and Path(table["root"]) == root.expanduser().resolve())


def choose_test_images(table: Optional[dict], datamodule: ImageClassificationDataModule, own_data: bool) -> None:
    """The datamodule's test split becomes what this checkpoint may honestly be tested on (see the module docstring)."""
    root, cache = datamodule.root, datamodule.cache_dir
    if table is None:
        if own_data and not datamodule.has_official_test:
            log.warning(
                "This checkpoint stores no split (it predates stored splits): its test split is rebuilt by the seeded, stratified rule of then"
            )
            datamodule.use_splits(legacy_splits(datamodule.pool, datamodule.val_fraction, datamodule.test_fraction, datamodule.split_seed))
        elif not own_data:
            log.warning("This checkpoint stores no split: files of %s that it was trained on cannot be recognised and left out", root)
            datamodule.use_splits({"train": [], "val": [], "test": list(datamodule.usable)})
        return
    if own_data:
        test, missing = stored_test(table, root, datamodule.usable, cache)
        known = {row[0] for row in table["rows"]}
        added = sum(1 for path, _ in datamodule.usable if split_key(path, root) not in known)
        if not test:
            raise DataError(
                f"ckpt_path: none of this checkpoint's {counts(table)['test']} stored test file(s) is under {root} (a cv.refit model trains on every "
                f"image outside an official test list); test it on other images: data.root=<folder>"
            )
        log.info(
            "Testing the checkpoint's %d stored test file(s) that still exist; %d image(s) added since training are not tested", len(test), added
        )
        if missing:
            log.warning("%d stored test file(s) are gone or unusable now and are not tested, e.g. %s", len(missing), ", ".join(missing[:3]))
        datamodule.use_splits({"train": [], "val": [], "test": test})
        return
    kept, dropped = without_seen_files(table, datamodule.usable, root, cache)
    if dropped:
        log.warning("%d image(s) under %s have the same bytes as an image this model was fitted or selected on: left out", dropped, root)
    log.info("Testing all %d usable image(s) under %s that the model was not fitted or selected on", len(kept), root)
    datamodule.use_splits({"train": [], "val": [], "test": kept})


def keys_added_since(stored: dict) -> dict:
    """Dataset keys a checkpoint from an earlier release lacks (e.g. data.class_weights), at their YAML values."""
    base = OmegaConf.to_container(OmegaConf.load(Path(config_dir()) / "data" / "_base.yaml"))
    assert isinstance(base, dict)
    added = {k: v for k, v in base.items() if k not in stored and not (isinstance(v, str) and "${" in v) and v != "???"}
    return {**added, "shots_seed": 0} if "shots_seed" not in stored else added  # no data.shots then: nothing is drawn


command = Command("eval", evaluate)
main = command.main


if __name__ == "__main__":
    main()
