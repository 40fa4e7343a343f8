"""One fit of a run (a plain run, one cross-validation fold, or the refit after it): build the model and the Trainer,
fit, validate and calibrate the selected checkpoint, test it, write the run folder."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Optional

import lightning.pytorch as pl
from lightning.pytorch.callbacks import EarlyStopping, ModelCheckpoint
from omegaconf import DictConfig, OmegaConf, open_dict

from transferlab.callbacks.checkpoints import LastCheckpoint
from transferlab.callbacks.ema import WeightEMA
from transferlab.callbacks.feature_cache import FeatureCache
from transferlab.callbacks.linear_probe import LinearProbeSolver
from transferlab.callbacks.optuna_pruning import pruning_callbacks
from transferlab.callbacks.unfreeze import GradualUnfreeze
from transferlab.core.context import is_global_zero
from transferlab.core.errors import ConfigError
from transferlab.core.files import to_float_dict, write_json
from transferlab.core.redaction import redact
from transferlab.data.base import ImageClassificationDataModule
from transferlab.data.stored_splits import FILE as SPLITS_FILE
from transferlab.data.stored_splits import write_csv
from transferlab.models.backbone import Backbone
from transferlab.models.classifier import TransferClassifier
from transferlab.models.evaluation import Calibration
from transferlab.training.artifacts import announce_skipped, test_and_report
from transferlab.training.builders import build_trainer, container, instantiate_group, log_run_config
from transferlab.training.calibration import held_out_metrics, set_calibration, validate_and_calibrate
from transferlab.training.loggers import finish_loggers, log_final_metrics, resolve_logger_config
from transferlab.training.lr_find import find_learning_rate
from transferlab.training.performance import apply_performance

log = logging.getLogger(__name__)


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


def solver_free(cfg: DictConfig) -> bool:
    return cfg.finetune.get("head_solver") != "lbfgs"


def probe_solver(cfg: DictConfig, c: Optional[float]) -> Optional[LinearProbeSolver]:
    """finetune.head_solver=lbfgs (frozen only): the convex probe, with its C chosen as finetune.select_c says."""
    finetune = cfg.finetune
    if solver_free(cfg):
        return None
    select = str(finetune.get("select_c", "cv"))
    fixed = c if select == "val" else None  # a refit after select_c=val folds takes their median C; cv chooses its own
    return LinearProbeSolver(
        standardize=bool(finetune.standardize), select=select, folds=int(finetune.get("c_folds", 5)), seed=int(cfg.data.split_seed), c=fixed
    )


def tune_learning_rate(cfg: DictConfig, trainer: pl.Trainer, model: TransferClassifier, datamodule: Any, skip: bool) -> dict[str, float]:
    """tune.lr_find=true: the finder's suggestion becomes the run's lr (not for the L-BFGS probe, nor on resume)."""
    if not cfg.get("tune") or not cfg.tune.lr_find:
        return {}
    if skip:
        log.warning("tune.lr_find: skipped (the L-BFGS probe has no learning rate; a resumed run keeps its own)")
        return {}
    suggestion = find_learning_rate(trainer, model, datamodule, Path(cfg.paths.output_dir))
    return {"tune/lr": suggestion} if suggestion is not None else {}


def selection_protocol(inner_cv: bool, refit: bool, has_val: bool) -> str:
    """What val/* (and val/acc_best, the default sweep objective) were measured on: sweeps rank only jobs that agree."""
    if inner_cv:
        return "probe_inner_cv"  # the probe's inner K-fold held-out figures over training + validation images
    if refit or not has_val:
        return "none"
    return "validation_split"


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
    refit: Optional[tuple[int, Calibration]] = None,
    prune: bool = True,
    cache: Optional[FeatureCache] = None,
    probe_c: Optional[float] = None,
    interpret: bool = True,
) -> tuple[dict[str, Any], TransferClassifier]:
    """Fit in cfg.paths.output_dir; returns (metrics.json's values, the model). With `refit` = (epochs, calibration)
    there is no validation: train that many epochs (the schedule as configured), take that calibration, save
    checkpoints/best.ckpt, and test it if the data has a test split. `interpret`: after the test (not in CV folds).
    The split it fits and tests on is stored: OUT/splits.csv and inside every checkpoint (data.stored_splits)."""
    out_dir = Path(cfg.paths.output_dir)
    resolve_logger_config(cfg.get("logger"), run_name=out_dir.name, task_name=str(cfg.task_name), tags=list(cfg.get("tags") or []))
    model = build_model(cfg, backbone, datamodule)
    callbacks = instantiate_group(cfg.callbacks, "callbacks") + apply_performance(cfg, model, datamodule, precision_note, cache)
    if prune:
        callbacks += pruning_callbacks()  # a trial of an Optuna sweep
    model.tta = str(cfg.get("tta") or "none")
    if model.tta != "none":  # test-time views need the test images, not their cached features
        for callback in callbacks:
            if isinstance(callback, FeatureCache):
                callback.skip_splits.add("test")
    if cfg.finetune.get("ema_decay") and solver_free(cfg):
        callbacks.append(WeightEMA(float(cfg.finetune.ema_decay)))
    if cfg.finetune.mode == "gradual":
        callbacks.append(GradualUnfreeze(cfg.finetune.unfreeze_at_epoch, cfg.finetune.backbone_lr_factor))
    trainer_cfg: Any = OmegaConf.merge(cfg.trainer, {})
    solver = probe_solver(cfg, probe_c)
    inner_cv = solver is not None and solver.select == "cv"
    if inner_cv:  # the probe's C comes from folds of the training images: the validation images train too
        datamodule.setup("fit")
        splits = datamodule.splits
        if splits.get("val"):
            merged = {"train": splits["train"] + splits["val"], "val": [], "test": splits.get("test", [])}
            datamodule.use_splits(merged, announce=False)
            log.info(
                "Linear probe: C by inner folds, so the %d validation images train too (train %d, test %d)",
                len(splits["val"]),
                len(merged["train"]),
                len(merged["test"]),
            )
    if solver is not None and solver.select == "val" and solver.c is None and not datamodule.splits.get("val"):
        raise ConfigError(
            "finetune.select_c=val: this run has no validation images to choose C on (data.val_fraction or the split left none); "
            "use finetune.select_c=cv (inner cross-validation over the training images) or raise data.val_fraction"
        )
    model.split_table = datamodule.split_table()
    if is_global_zero():
        write_csv(out_dir / SPLITS_FILE, model.split_table)
    saved_here = refit is not None or solver is not None  # no epoch selects a checkpoint: this function saves it
    if saved_here:
        callbacks = [c for c in callbacks if not isinstance(c, (ModelCheckpoint, EarlyStopping))]
        with open_dict(trainer_cfg):
            trainer_cfg.num_sanity_val_steps = 0
            if refit is not None or inner_cv:  # nothing to validate on (select_c=val validates after fit)
                trainer_cfg.limit_val_batches = 0
            if refit is not None and solver is None:
                trainer_cfg.max_epochs = refit[0]
    if solver is not None:  # the head is solved on fit start; no training loop runs (none under DDP either)
        callbacks.append(solver)
        with open_dict(trainer_cfg):
            trainer_cfg.max_epochs, trainer_cfg.limit_train_batches = 1, 0
    loggers = instantiate_group(cfg.logger, "logger")
    trainer = build_trainer(trainer_cfg, callbacks, loggers)
    log_run_config(loggers, cfg)
    announce_skipped(datamodule, out_dir)

    tuned = tune_learning_rate(cfg, trainer, model, datamodule, solver is not None or bool(ckpt_path))
    trainer.fit(model, datamodule=datamodule, ckpt_path=ckpt_path, weights_only=True if ckpt_path else None)
    best = selected_checkpoint(trainer)
    extra: dict[str, Any] = {**to_float_dict({k: v for k, v in trainer.callback_metrics.items() if k.startswith("val/")}), **tuned}
    if saved_here:
        best = str(out_dir / "checkpoints" / "best.ckpt")
        if refit is not None:
            model.temperature.fill_(refit[1].temperature)
            model.calibration = refit[1].record()
            model.hparams["run"] = {**model.hparams["run"], "refit": True}
        trainer.save_checkpoint(best, weights_only=True)
        trainer.save_checkpoint(str(out_dir / "checkpoints" / "last.ckpt"), weights_only=True)
    if inner_cv:  # the held-out figures and the temperature come from the probe's inner folds
        assert solver is not None and solver.fit is not None and solver.fit.held_out is not None
        raw, labels = solver.fit.held_out
        found, calibration = held_out_metrics(raw, labels, datamodule.class_names, str(cfg.calibration), "held-out training images (inner folds)")
        set_calibration(trainer, model, best, calibration)
        extra.update(found, **calibration.metrics(), **{"val/acc_best": found["val/acc"]})
    elif refit is not None:
        extra.update(refit[1].metrics())
    else:
        extra.update(validate_and_calibrate(trainer, model, datamodule, best, str(cfg.calibration)))
    extra["selection/protocol"] = selection_protocol(inner_cv, refit is not None, bool(datamodule.splits.get("val")))
    extra.update(best_checkpoint=best, epochs=trainer.current_epoch)
    if solver is not None:
        extra["probe/C"] = solver.c
    if datamodule.splits.get("test"):
        settings = cfg.get("interpret") if interpret else None
        extra = test_and_report(trainer, model, datamodule, out_dir, best, extra, seed=int(cfg.seed), interpret=settings)
    else:  # nothing to test on: metrics.json keeps the validation figures
        if is_global_zero():
            write_json(out_dir / "metrics.json", extra)
        log_final_metrics(trainer.loggers, extra, step=trainer.global_step)
    if refit is None:  # a refit's loggers also receive the cross-validation summary (training.cross_validation)
        finish_loggers(trainer.loggers)
    return extra, model
