"""cv.folds=K: K fits on stratified folds (data.folds), each a normal run folder `<run>/fold_<k>/`, then a summary.

`<run>/cv_summary.json`: every fold's metrics, their mean, std and 95 % interval (Nadeau-Bengio's corrected
resampled t: the folds' training sets overlap); the out-of-fold figures (every image predicted once, by the fold
that did not train on it) with their intervals (core.statistics).
`<run>/oof_predictions.csv`: those predictions, in test_predictions.csv's columns. `<run>/metrics.json`: val/*
are the fold means (what a sweep optimises), test/* the out-of-fold figures, or with cv.refit=true and an
official test list, the refit model's test. cv.refit=true fits once more on every non-test image for the median
of the folds' selected epoch counts, with the temperature fitted on the out-of-fold logits (as scikit-learn's
CalibratedClassifierCV(ensemble=False) does), and saves it as `<run>/checkpoints/best.ckpt`. `<run>/splits.csv`
(and the refit's checkpoint) store the run's split: every image outside the official test list `train`;
`<run>/fold_<k>/splits.csv` each fold's own.
"""

from __future__ import annotations

import copy
import logging
import math
import re
import statistics
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import numpy as np
import torch
from omegaconf import DictConfig, open_dict

from transferlab.core.context import is_global_zero
from transferlab.core.errors import ConfigError
from transferlab.core.files import write_json
from transferlab.core.statistics import INTERVAL_METHODS, fold_test_to_train, mean_std_interval, metric_intervals
from transferlab.data.base import ImageClassificationDataModule
from transferlab.data.folds import fold_splits
from transferlab.data.labels import multi_hot
from transferlab.data.stored_splits import FILE as SPLITS_FILE
from transferlab.data.stored_splits import build_table, write_csv
from transferlab.models.backbone import Backbone
from transferlab.models.distillation import effective_mode
from transferlab.models.evaluation import choose_temperature, classification_metrics
from transferlab.training.artifacts import print_config_tree, summary_line, write_predictions
from transferlab.training.builders import instantiate_group
from transferlab.training.fit import Refit, fit_and_test
from transferlab.training.label_decisions import multilabel_held_out
from transferlab.training.loggers import finish_loggers, log_final_metrics, log_run_files, resolve_logger_config
from transferlab.training.multilabel_files import out_of_fold_figures, write_label_predictions
from transferlab.training.performance import feature_cache
from transferlab.training.run_report import write_report

log = logging.getLogger(__name__)
SUMMARY, OOF = "cv_summary.json", "oof_predictions.csv"


def in_folder(cfg: DictConfig, folder: Path) -> DictConfig:
    """The run's config writing to `folder` (checkpoints, loggers and metrics follow paths.output_dir)."""
    moved = copy.deepcopy(cfg)
    with open_dict(moved):
        moved.paths.output_dir = str(folder)
    return moved


def cross_validate(cfg: DictConfig, backbone: Backbone, datamodule: ImageClassificationDataModule, precision_note: str) -> dict[str, Any]:
    run_dir, folds = Path(cfg.paths.output_dir), int(cfg.cv.folds)
    if cfg.ckpt_path:
        raise ConfigError("ckpt_path: a cross-validation (cv.folds) always starts its folds afresh; remove ckpt_path")
    official_test = list(datamodule.splits["test"]) if datamodule.has_official_test else []
    pool, names = list(datamodule.pool), datamodule.class_names
    splits = fold_splits(pool, names, folds, datamodule.split_seed, datamodule.val_fraction)
    pristine = copy.deepcopy(backbone) if effective_mode(cfg.finetune) != "frozen" else None  # fine-tuning changes the backbone
    row = {str(path): i for i, (path, _) in enumerate(pool)}
    oof_logits = torch.zeros(len(pool), len(names))
    raw_logits = torch.zeros(len(pool), len(names))
    oof_cuts = np.full((len(pool), len(names)), 0.5)  # multi-label: each fold's thresholds on its out-of-fold images
    fold_metrics, fold_results, epochs = [], [], []
    cache = feature_cache(cfg, cfg.performance.feature_cache)  # one for all folds: each image's features computed once
    for k, fold in enumerate(splits):
        fold_cfg = in_folder(cfg, run_dir / f"fold_{k}")
        log.info("Cross-validation: fold %d of %d (%s)", k + 1, folds, fold_cfg.paths.output_dir)
        if is_global_zero():
            print_config_tree(fold_cfg, save_to=run_dir / f"fold_{k}" / "config.yaml", show=False)
        datamodule.use_splits(fold)
        pl.seed_everything(cfg.seed, workers=True)  # every fold starts from the same random state
        fold_backbone = copy.deepcopy(pristine) if pristine is not None else backbone
        fitted = fit_and_test(fold_cfg, fold_backbone, datamodule, precision_note, cache=cache, fold=True)
        metrics, model = fitted.metrics, fitted.model
        logits, _ = model.outputs["test"]
        where = [row[str(path)] for path, _ in fold["test"]]
        oof_logits[where], raw_logits[where] = logits, model.plain_raw["test"]
        oof_cuts[where] = [model.thresholds.get(name, 0.5) for name in names]
        fold_metrics.append({key: value for key, value in metrics.items() if isinstance(value, (int, float)) and not isinstance(value, bool)})
        fold_results.append(metrics)
        epochs.append(fitted.selected_epochs)

    mask = datamodule.ignore_mask(pool)
    if datamodule.multilabel:
        labels = torch.from_numpy(multi_hot([label for _, label in pool], len(names))).float()
        oof = out_of_fold_figures(oof_logits, labels, names, oof_cuts, mask, int(cfg.seed))
    else:
        labels = torch.tensor([label for _, label in pool])
        oof = dict(classification_metrics(oof_logits, labels, names, per_class=True))
        intervals = metric_intervals(labels.tolist(), oof_logits.argmax(dim=-1).tolist(), len(names))
        oof.update({f"{name}_ci95": interval for name, interval in intervals.items()})
    summary = summarise(fold_metrics, folds)
    summary.update(k=folds, split_seed=datamodule.split_seed, selected_epochs=epochs, oof=oof, images=len(pool))
    summary["intervals"] = {"folds": FOLD_INTERVAL, "oof": INTERVAL_METHODS}
    result: dict[str, Any] = {key: value for key, value in summary["mean"].items() if key.startswith("val/")}
    result.update({f"{key}_std": value for key, value in summary["std"].items() if key.startswith("val/")})
    result.update({f"test/{key}": value for key, value in oof.items()})
    result.update({f"oof/{key}": value for key, value in oof.items()})
    result.update({"cv/folds": folds, "cv/images": len(pool)})
    protocols = sorted({str(m) for m in (f.get("selection/protocol") for f in fold_results) if m})
    result["selection/protocol"] = f"cv{folds}_mean_of_{'+'.join(protocols) or 'none'}"
    loggers = None

    if cfg.cv.refit:
        refit_epochs = int(round(statistics.median(epochs)))
        if datamodule.multilabel:  # a temperature and a threshold per label, on the out-of-fold logits
            calibration = multilabel_held_out(
                raw_logits, labels, names, str(cfg.calibration), "out-of-fold images", cfg.get("threshold", "f1"), mask
            )[1]
        else:
            calibration = choose_temperature(raw_logits, labels, str(cfg.calibration), "out-of-fold images")
        log.info(
            "Refit on all %d non-test images: %d epochs (median selected by the folds), temperature %s (%s)",
            len(pool),
            refit_epochs,
            calibration.temperature if isinstance(calibration.temperature, list) else f"{calibration.temperature:.3f}",
            calibration.rule,
        )
        datamodule.use_splits({"train": pool, "val": [], "test": official_test})
        pl.seed_everything(cfg.seed, workers=True)
        refit_backbone = copy.deepcopy(pristine) if pristine is not None else backbone
        chosen = [m["probe/C"] for m in fold_metrics if "probe/C" in m]  # the L-BFGS probe's L2 strength per fold
        probe_c = float(statistics.median(chosen)) if chosen else None
        refitted = fit_and_test(cfg, refit_backbone, datamodule, precision_note, refit=Refit(refit_epochs, calibration, probe_c), cache=cache)
        refit, loggers = refitted.metrics, refitted.model.trainer.loggers
        summary["refit"] = {key: value for key, value in refit.items() if not key.startswith("val/")}
        if official_test:  # the refit model's test on the official list replaces the out-of-fold figures
            result.update({key: value for key, value in refit.items() if key.startswith("test/")})
        result.update({key: value for key, value in refit.items() if not key.startswith(("val/", "test/", "selection/"))})
        result["cv/refit_epochs"] = refit_epochs
    if is_global_zero():
        if not cfg.cv.refit:  # the refit writes its own (the same table)
            write_csv(run_dir / SPLITS_FILE, build_table(datamodule.root, {"train": pool, "test": official_test}, datamodule.cache_dir))
        if datamodule.multilabel:
            write_label_predictions(run_dir / OOF, pool, names, oof_logits.sigmoid(), oof_cuts)
        else:
            write_predictions(run_dir / OOF, pool, names, oof_logits.softmax(dim=-1))
        write_json(run_dir / SUMMARY, summary)
        write_json(run_dir / "metrics.json", result)
        write_report(run_dir, result, f"Run report: {run_dir.name} ({folds}-fold cross-validation, out-of-fold test figures)")
        log.info(
            "Cross-validation (%d folds) in %s: %s",
            folds,
            run_dir,
            fold_line(summary, "val/map" if datamodule.multilabel else "val/acc") + "; out-of-fold " + summary_line(result),
        )
    if loggers is None:  # no refit: the summary gets a logger run of its own, named after the run folder
        resolve_logger_config(cfg.get("logger"), run_name=run_dir.name, task_name=str(cfg.task_name), tags=list(cfg.get("tags") or []))
        loggers = instantiate_group(cfg.logger, "logger")
    log_final_metrics(loggers, result, step=0)
    log_run_files(loggers, run_dir)  # metrics.json is now the summary
    finish_loggers(loggers)
    return result


RATES = re.compile(
    r"/(acc|acc_best|acc_top3|balanced_acc|macro_f1|ece|map|f1_micro|f1_macro|precision_micro|recall_micro|precision_macro|recall_macro|subset_acc|hamming_loss)"
    r"(_before_calibration)?$|/(precision|recall|acc_class|ap|f1|ece)/"
)
LOSSES = re.compile(r"/(nll|loss)(_before_calibration)?$")
FOLD_INTERVAL = "Nadeau-Bengio corrected resampled t over the folds (variance (1/K + 1/(K-1)) s^2: their training sets overlap)"


def summarise(fold_metrics: list[dict[str, float]], folds: int) -> dict[str, Any]:
    """{folds, mean, std, ci95}: the metrics every fold has, each with its mean, sample std and corrected interval."""
    keys = [key for key in fold_metrics[0] if all(key in m and m[key] is not None and math.isfinite(m[key]) for m in fold_metrics)]
    found: dict[str, Any] = {"folds": fold_metrics, "mean": {}, "std": {}, "ci95": {}}
    for key in keys:
        mean, std, interval = mean_std_interval([m[key] for m in fold_metrics], fold_test_to_train(folds))
        if RATES.search(key) or LOSSES.search(key):  # a rate stays in [0, 1], a loss above 0, whatever the t-interval says
            interval = [max(0.0, interval[0]), min(1.0, interval[1]) if RATES.search(key) else interval[1]]
        found["mean"][key], found["std"][key], found["ci95"][key] = mean, std, interval
    return found


def fold_line(summary: dict[str, Any], key: str) -> str:
    if key not in summary["mean"]:
        return ""
    low, high = summary["ci95"][key]
    return f"{key} {summary['mean'][key]:.3f} ± {summary['std'][key]:.3f} over {len(summary['folds'])} folds (95 % [{low:.3f}, {high:.3f}], corrected for overlap)"
