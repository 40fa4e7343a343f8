"""(f) The best ten lines a user could write: scikit-learn's LogisticRegressionCV(class_weight="balanced") on
transferlab's frozen Lite0 features, scored on the same stratified folds as `cv.folds=K` (data.folds, seeded by
data.split_seed), against `transferlab-train data.task=T cv.folds=K` with no other flag: out-of-fold accuracy and
balanced accuracy of both. scripts/sklearn_probe.py is the command line of the scikit-learn side alone."""

from __future__ import annotations

import contextlib
import json
import time
from pathlib import Path
from typing import Any

import numpy as np

from .common import LITE0, Context, Row, Target, at, transferlab_run


def features_of(backbone_name: str, data_root: str, task: str, split_seed: int) -> tuple[np.ndarray, np.ndarray, list, list[str]]:
    """Pooled features of every non-test image, computed as transferlab computes them (preprocessing, decode)."""
    import torch
    from torch.utils.data import DataLoader

    from transferlab.cli.train import command
    from transferlab.data.features import compute_features
    from transferlab.models.backbones import create_backbone
    from transferlab.training.builders import build_datamodule, container

    cfg = command.compose([f"data.root={data_root}", f"data.task={task}", f"data.split_seed={split_seed}", f"backbone={backbone_name}"], "unused")
    backbone = create_backbone(**container(cfg.backbone)).eval()
    datamodule = build_datamodule(container(cfg.data), backbone.preprocessing)
    pool = datamodule.pool
    loader = DataLoader(datamodule.samples_dataset(pool), batch_size=32, num_workers=0)
    features = compute_features(backbone, loader, torch.device("cpu"), contextlib.nullcontext, channels_last=True)
    return features, np.array([label for _, label in pool]), pool, datamodule.class_names


def probe(features: np.ndarray, labels: np.ndarray, pool: list, names: list[str], folds: int, seed: int, balanced: bool) -> dict:
    """Out-of-fold predictions of LogisticRegressionCV (its C chosen by inner 5-fold CV on each training part)."""
    from sklearn.linear_model import LogisticRegressionCV

    from transferlab.core.statistics import fold_test_to_train, mean_std_interval, metric_intervals, point_metrics
    from transferlab.data.folds import fold_splits

    predicted = np.zeros(len(labels), dtype=np.int64)
    per_fold = []
    row = {str(path): i for i, (path, _) in enumerate(pool)}
    for fold in fold_splits(pool, names, folds, seed, val_fraction=0.0):
        train = [row[str(p)] for p, _ in fold["train"] + fold["val"]]
        test = [row[str(p)] for p, _ in fold["test"]]
        model = LogisticRegressionCV(Cs=10, cv=5, max_iter=5000, class_weight="balanced" if balanced else None)
        model.fit(features[train], labels[train])
        predicted[test] = model.predict(features[test])
        per_fold.append(point_metrics(labels[test], predicted[test], len(names)))
    pooled = point_metrics(labels, predicted, len(names))
    intervals = metric_intervals(labels, predicted, len(names))
    found = {f"oof/{k}": v for k, v in pooled.items()} | {f"oof/{k}_ci95": v for k, v in intervals.items()}
    for key in ("acc", "balanced_acc"):
        mean, std, interval = mean_std_interval([m[key] for m in per_fold], fold_test_to_train(folds))
        found[f"folds/{key}_mean"], found[f"folds/{key}_std"], found[f"folds/{key}_ci95"] = mean, std, interval
    return found


def probe_section(root: Path, work: Path, tasks: tuple[str, ...], folds: int, seed: int) -> dict[str, Any]:
    """Both sides on the same stratified folds, per task."""
    out: dict[str, Any] = {}
    for task in tasks:
        started = time.perf_counter()
        features, labels, pool, names = features_of(LITE0, str(root), task, seed)
        reference = probe(features, labels, pool, names, folds, seed, balanced=True)
        sklearn_seconds = time.perf_counter() - started
        common = [
            f"data.root={root}",
            f"data.task={task}",
            f"cv.folds={folds}",
            f"seed={seed}",
            "callbacks.progress_bar=null",
            "trainer.enable_progress_bar=false",
        ]
        ours = transferlab_run(common + [f"paths.cache_dir={work / 'probe-cache'}"], work / f"probe-{task}")
        metrics = json.loads((work / f"probe-{task}" / "metrics.json").read_text())
        out[task] = {
            "folds": folds,
            "images": len(labels),
            "sklearn": {"acc": reference["oof/acc"], "balanced_acc": reference["oof/balanced_acc"], "seconds": sklearn_seconds},
            "transferlab": {"acc": metrics["test/acc"], "balanced_acc": metrics["test/balanced_acc"], "seconds": ours["seconds"]},
        }
        out[task]["difference"] = out[task]["transferlab"]["balanced_acc"] - out[task]["sklearn"]["balanced_acc"]
    return out


def run(ctx: Context) -> dict[str, Any]:
    return probe_section(ctx.root, ctx.work, ("species",) if ctx.quick else ("species", "breeds"), 3 if ctx.quick else 5, seed=42)


def rows(d: dict[str, Any]) -> list[Row]:
    """Accuracy and balanced accuracy per task; the target is on the balanced one (class_weight="balanced" on both sides)."""
    out = []
    for task, f in d.items():
        for key in ("acc", "balanced_acc"):
            difference = f["transferlab"][key] - f["sklearn"][key]
            target = Target(f"probe_{task}_balanced_acc_difference", difference, ">= -0.005") if key == "balanced_acc" else None
            out.append(
                Row(
                    f"(f) {task}, {f['folds']}-fold out-of-fold {key}: scikit-learn LogisticRegressionCV vs transferlab-train defaults",
                    f"{f['sklearn'][key]:.3f}",
                    f"{f['transferlab'][key]:.3f}",
                    f"{difference:+.3f}",
                    target,
                )
            )
    return out


KEYS = {
    "probe_balanced_acc_sklearn": at("species", "sklearn", "balanced_acc"),
    "probe_balanced_acc_transferlab": at("species", "transferlab", "balanced_acc"),
}
