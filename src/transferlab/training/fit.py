"""One fit of a run (a plain run, one cross-validation fold, or the refit after it) as a short sequence of named
steps, each taking and returning plain values (lightning-hydra-template's train.py is the model):

    plan the split -> build the model and the Trainer -> train by epochs | solve the probe | refit
    -> calibrate on held-out images -> test and report

The kind of fit is decided once, from the config (finetune.head_solver) and the caller (a refit passes `Refit`).
The split it fits and tests on is stored: OUT/splits.csv and inside every checkpoint (data.stored_splits).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import EarlyStopping, ModelCheckpoint
from omegaconf import DictConfig, OmegaConf, open_dict

from transferlab.callbacks.checkpoints import LastCheckpoint
from transferlab.callbacks.feature_cache import FeatureCache
from transferlab.core.context import is_global_zero
from transferlab.core.errors import ConfigError
from transferlab.core.files import to_float_dict, write_json
from transferlab.data.base import ImageClassificationDataModule
from transferlab.data.stored_splits import FILE as SPLITS_FILE
from transferlab.data.stored_splits import write_csv
from transferlab.models.backbone import Backbone
from transferlab.models.classifier import TransferClassifier
from transferlab.models.evaluation import Calibration
from transferlab.training.artifacts import announce_skipped, test_and_report
from transferlab.training.builders import build_trainer, fit_callbacks, instantiate_group, log_run_config, new_model
from transferlab.training.calibration import apply_calibration, held_out_metrics, set_calibration, validate_and_calibrate
from transferlab.training.loggers import finish_loggers, log_final_metrics, resolve_logger_config
from transferlab.training.lr_find import find_learning_rate
from transferlab.training.performance import check_distill
from transferlab.training.probe import HEADS, HeadFit, ProbeSettings, keep_uncalibrated, probe_settings, solve_probe

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Refit:
    """The fit after a cross-validation: no validation; `epochs` (the folds' median), their out-of-fold calibration
    and, for the probe with select_c=val, the folds' median C."""

    epochs: int
    calibration: Calibration
    probe_c: Optional[float] = None


@dataclass
class Fitted:
    """What a fit step leaves: the checkpoint to calibrate and test, epochs run and selected, held-out figures."""

    checkpoint: Optional[str]
    epochs: int
    selected_epochs: int
    metrics: dict[str, Any] = field(default_factory=dict)
    probe: Optional[HeadFit] = None


@dataclass
class FitResult:
    """metrics.json's values, the fitted model (its test outputs included) and the epochs up to its checkpoint."""

    metrics: dict[str, Any]
    model: TransferClassifier
    selected_epochs: int


def fit_and_test(
    cfg: DictConfig,
    backbone: Backbone,
    datamodule: ImageClassificationDataModule,
    precision_note: str,
    *,
    ckpt_path: Optional[str] = None,
    refit: Optional[Refit] = None,
    cache: Optional[FeatureCache] = None,
    fold: bool = False,
) -> FitResult:
    """Fit in cfg.paths.output_dir, calibrate, test if the data has a test split, write the run folder. `fold`: one
    fold of a cross-validation (no Optuna pruning, no interpretation); `cache`: a feature cache the folds share."""
    out_dir = Path(cfg.paths.output_dir)
    if cfg.finetune.mode == "distill":
        check_distill(cfg, cfg.performance.feature_cache)
    probe = probe_settings(cfg, refit.probe_c if refit else None)
    plan_split(datamodule, probe, refit)
    if probe is not None and cfg.get("tune") and cfg.tune.lr_find:
        log.warning("tune.lr_find: skipped (the %s head is solved, not trained: no learning rate)", probe.solver)
    model = new_model(cfg, backbone, datamodule)
    model.split_table = datamodule.split_table()
    model.metric_masks["val"] = datamodule.ignore_mask(datamodule.splits.get("val", []))  # VOC's difficult pairs: not counted
    if is_global_zero():
        write_csv(out_dir / SPLITS_FILE, model.split_table)
    trainer = build_fit_trainer(cfg, model, datamodule, precision_note, probe, refit, cache, prune=not fold and refit is None)
    if probe is not None:
        fitted = solve_the_probe(trainer, model, datamodule, probe, out_dir, str(cfg.calibration), refit, cfg.get("threshold", "f1"))
    elif refit is not None:
        fitted = refit_by_epochs(trainer, model, datamodule, refit, out_dir)
    else:
        fitted = train_by_epochs(cfg, trainer, model, datamodule, ckpt_path)
        fitted.metrics.update(validate_and_calibrate(trainer, model, datamodule, fitted.checkpoint, str(cfg.calibration), cfg.get("threshold", "f1")))
    metrics = {**fitted.metrics, "selection/protocol": selection_protocol(probe, refit, bool(datamodule.splits.get("val")))}
    metrics.update(best_checkpoint=fitted.checkpoint, epochs=fitted.epochs)
    if getattr(datamodule, "shots", None) is not None:  # a few-shot run (data.shots): what it trained on
        metrics.update({"data/shots": datamodule.shots, "data/train_images": len(datamodule.splits["train"])})
    if fitted.probe is not None:  # probe/C and how it was chosen; head/k, head/selection (knn, prototype)
        metrics.update(fitted.probe.metrics)
    metrics = test_and_write(cfg, trainer, model, datamodule, fitted.checkpoint, metrics, interpret=not fold)
    if refit is None:  # a refit's loggers also receive the cross-validation summary (training.cross_validation)
        finish_loggers(trainer.loggers)
    return FitResult(metrics, model, fitted.selected_epochs)


def plan_split(datamodule: ImageClassificationDataModule, probe: Optional[ProbeSettings], refit: Optional[Refit]) -> None:
    """A head solved with held-out logits from inside the training images (the probe's inner folds, knn / prototype
    leave-one-out) trains on the validation images too, except in a few-shot run (data.shots: exactly K training
    images per class); choosing on validation images needs some."""
    datamodule.setup("fit")
    splits = datamodule.splits
    shots = getattr(datamodule, "shots", None)
    if probe is not None and probe.select == "cv" and splits.get("val") and shots:
        log.info(
            "data.shots=%s: the %d validation images stay out of training (the head trains on exactly %s per class)", shots, len(splits["val"]), shots
        )
    elif probe is not None and probe.select == "cv" and splits.get("val"):
        merged = {"train": splits["train"] + splits["val"], "val": [], "test": splits.get("test", [])}
        datamodule.use_splits(merged, announce=False)
        log.info(
            "%s: %s, so the %d validation images train too (train %d, test %d)",
            HEADS[probe.solver],
            "C by inner folds" if probe.solver == "lbfgs" else "held-out logits by leave-one-out",
            len(splits["val"]),
            len(merged["train"]),
            len(merged["test"]),
        )
    if probe is not None and probe.select == "val" and refit is None and not datamodule.splits.get("val"):
        raise ConfigError(
            "finetune.select_c=val: this run has no validation images to choose on (data.val_fraction or the split left none); "
            "use finetune.select_c=cv (inner cross-validation / leave-one-out over the training images) or raise data.val_fraction"
        )


def build_fit_trainer(
    cfg: DictConfig,
    model: TransferClassifier,
    datamodule: ImageClassificationDataModule,
    precision_note: str,
    probe: Optional[ProbeSettings],
    refit: Optional[Refit],
    cache: Optional[FeatureCache],
    prune: bool,
) -> pl.Trainer:
    """The Trainer for this kind of fit. The probe's and the refit's checkpoint is chosen by no epoch (this module
    saves it); the probe's Trainer runs no batch: its fit only fills the feature cache (over every DDP rank)."""
    resolve_logger_config(cfg.get("logger"), run_name=Path(cfg.paths.output_dir).name, task_name=str(cfg.task_name), tags=list(cfg.get("tags") or []))
    callbacks = fit_callbacks(cfg, model, datamodule, precision_note, cache, prune, epochs_train_head=probe is None)
    trainer_cfg: Any = OmegaConf.merge(cfg.trainer, {})
    if probe is not None or refit is not None:
        callbacks = [c for c in callbacks if not isinstance(c, (ModelCheckpoint, EarlyStopping))]
        with open_dict(trainer_cfg):
            trainer_cfg.num_sanity_val_steps = 0
            if refit is not None or (probe is not None and probe.select == "cv"):  # nothing to validate on
                trainer_cfg.limit_val_batches = 0  # (select_c=val validates after the fit)
            if probe is not None:  # the fit only fills the feature cache
                trainer_cfg.max_epochs, trainer_cfg.limit_train_batches = 1, 0
            elif refit is not None:
                trainer_cfg.max_epochs = refit.epochs
    loggers = instantiate_group(cfg.logger, "logger")
    trainer = build_trainer(trainer_cfg, callbacks, loggers)
    log_run_config(loggers, cfg)
    announce_skipped(datamodule, Path(cfg.paths.output_dir))
    return trainer


def train_by_epochs(cfg: DictConfig, trainer: pl.Trainer, model: TransferClassifier, datamodule: Any, ckpt_path: Optional[str]) -> Fitted:
    """Epochs of the optimiser (tune.lr_find first when asked); the checkpoint ModelCheckpoint selected."""
    tuned = tune_learning_rate(cfg, trainer, model, datamodule, skip=bool(ckpt_path))
    trainer.fit(model, datamodule=datamodule, ckpt_path=ckpt_path, weights_only=True if ckpt_path else None)
    best = selected_checkpoint(trainer)
    selected = checkpoint_epochs(best, trainer.current_epoch) if best else trainer.current_epoch
    val = to_float_dict({k: v for k, v in trainer.callback_metrics.items() if k.startswith("val/")})
    return Fitted(best, trainer.current_epoch, selected, {**val, **tuned})


def refit_by_epochs(trainer: pl.Trainer, model: TransferClassifier, datamodule: Any, refit: Refit, out_dir: Path) -> Fitted:
    """The folds' median epochs on every non-test image, with their out-of-fold calibration; saved as best.ckpt."""
    trainer.fit(model, datamodule=datamodule)
    apply_refit_calibration(model, refit)
    best = save_fitted(trainer, out_dir)
    return Fitted(best, trainer.current_epoch, refit.epochs, refit.calibration.metrics())


def solve_the_probe(
    trainer: pl.Trainer,
    model: TransferClassifier,
    datamodule: Any,
    probe: ProbeSettings,
    out_dir: Path,
    method: str,
    refit: Optional[Refit],
    threshold: Any = "f1",
) -> Fitted:
    """Fill the feature cache (the Trainer's fit runs no batch), solve the head, save it, and calibrate it on the
    inner folds' / leave-one-out held-out logits (select_c=cv), the validation images (select_c=val) or the refit's
    out-of-fold ones; without any (a class of one image) it keeps temperature 1 and says why."""
    trainer.fit(model, datamodule=datamodule)
    fit = solve_probe(model, datamodule.feature_sets, probe, refit=refit is not None)
    if refit is not None:
        apply_refit_calibration(model, refit)
    best = save_fitted(trainer, out_dir)
    epochs = trainer.current_epoch  # 0: the loop ran no batch (metrics.json's `epochs`, as before the probe was a step)
    if refit is not None:
        return Fitted(best, epochs, refit.epochs, refit.calibration.metrics(), fit)
    if probe.select == "val":
        return Fitted(best, epochs, epochs + 1, validate_and_calibrate(trainer, model, datamodule, best, method, threshold), fit)
    if fit.held_out is None:  # a fixed C / k: nothing held out to calibrate on
        return Fitted(best, epochs, epochs + 1, keep_uncalibrated(trainer, model, best, method, threshold), fit)
    raw, labels = fit.held_out
    mask = datamodule.ignore_mask(datamodule.splits["train"])
    what = "held-out training images (" + ("inner folds" if probe.solver == "lbfgs" else "leave-one-out") + ")"
    found, calibration = held_out_metrics(raw, labels, datamodule.class_names, method, what, threshold, mask)
    set_calibration(trainer, model, best, calibration)
    best_key = {} if datamodule.multilabel else {"val/acc_best": found["val/acc"]}
    return Fitted(best, epochs, epochs + 1, {**found, **calibration.metrics(), **best_key}, fit)


def test_and_write(
    cfg: DictConfig, trainer: pl.Trainer, model: TransferClassifier, datamodule: Any, best: Optional[str], metrics: dict[str, Any], interpret: bool
) -> dict[str, Any]:
    """Test the checkpoint and write metrics.json and the reports; without a test split, metrics.json keeps the
    held-out figures."""
    out_dir = Path(cfg.paths.output_dir)
    if datamodule.splits.get("test"):
        settings = cfg.get("interpret") if interpret else None
        return test_and_report(trainer, model, datamodule, out_dir, best, metrics, seed=int(cfg.seed), interpret=settings)
    if is_global_zero():
        write_json(out_dir / "metrics.json", metrics)
    log_final_metrics(trainer.loggers, metrics, step=trainer.global_step)
    return metrics


def apply_refit_calibration(model: TransferClassifier, refit: Refit) -> None:
    apply_calibration(model, refit.calibration)
    model.hparams["run"] = {**model.hparams["run"], "refit": True}


def save_fitted(trainer: pl.Trainer, out_dir: Path) -> str:
    """checkpoints/best.ckpt (and last.ckpt) of a fit no epoch selects."""
    best = str(out_dir / "checkpoints" / "best.ckpt")
    trainer.save_checkpoint(best, weights_only=True)
    trainer.save_checkpoint(str(out_dir / "checkpoints" / "last.ckpt"), weights_only=True)
    return best


def tune_learning_rate(cfg: DictConfig, trainer: pl.Trainer, model: TransferClassifier, datamodule: Any, skip: bool) -> dict[str, float]:
    """tune.lr_find=true: the finder's suggestion becomes the run's lr (not on resume: a resumed run keeps its own)."""
    if not cfg.get("tune") or not cfg.tune.lr_find:
        return {}
    if skip:
        log.warning("tune.lr_find: skipped (a resumed run keeps its own learning rate)")
        return {}
    suggestion = find_learning_rate(trainer, model, datamodule, Path(cfg.paths.output_dir))
    return {"tune/lr": suggestion} if suggestion is not None else {}


def selection_protocol(probe: Optional[ProbeSettings], refit: Optional[Refit], has_val: bool) -> str:
    """What val/* (and val/acc_best, the default sweep objective) were measured on: sweeps rank only jobs that agree."""
    if probe is not None and probe.select == "cv" and refit is None:
        return "probe_inner_cv"  # held-out figures from inside training + validation: inner K folds (lbfgs), leave-one-out (knn, prototype)
    if refit is not None or not has_val:
        return "none"
    return "validation_split"


def selected_checkpoint(trainer: pl.Trainer) -> Optional[str]:
    every = trainer.callbacks  # type: ignore[attr-defined]  # ours and any Lightning added
    checkpoint = next((c for c in every if isinstance(c, ModelCheckpoint) and not isinstance(c, LastCheckpoint)), None)
    return checkpoint.best_model_path if checkpoint and checkpoint.best_model_path else None


def checkpoint_epochs(path: str, fallback: int) -> int:
    """Epochs trained up to a checkpoint: its `epoch` (0-based) + 1, read memory-mapped (the tensors stay on disk)."""
    saved = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    return int(saved.get("epoch", fallback - 1)) + 1
