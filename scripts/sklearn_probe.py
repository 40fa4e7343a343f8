"""The best ten lines a user could write: scikit-learn's LogisticRegressionCV on transferlab's frozen features,
scored on the same stratified folds as `cv.folds=K` (data.folds, seeded by data.split_seed).

    python scripts/sklearn_probe.py --data-root ../shared/data/oxford-pets-sample --task breeds --backbone tf_efficientnet_lite0

Prints (and with --json writes) the out-of-fold accuracy and balanced accuracy with their intervals (core.statistics)
and the mean ± std over folds (Nadeau-Bengio corrected interval): the reference a transferlab run of the same task is compared with.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
from sklearn.linear_model import LogisticRegressionCV
from torch.utils.data import DataLoader

from transferlab.cli.train import command
from transferlab.core.statistics import fold_test_to_train, mean_std_interval, metric_intervals, point_metrics
from transferlab.data.feature_cache import compute_features
from transferlab.data.folds import fold_splits
from transferlab.models.backbones import create_backbone
from transferlab.training.builders import build_datamodule, container


def features_of(backbone_name: str, data_root: str, task: str, split_seed: int) -> tuple[np.ndarray, np.ndarray, list, list[str]]:
    """Pooled features of every non-test image, computed as transferlab computes them (preprocessing, decode)."""
    cfg = command.compose([f"data.root={data_root}", f"data.task={task}", f"data.split_seed={split_seed}", f"backbone={backbone_name}"], "unused")
    backbone = create_backbone(**container(cfg.backbone)).eval()
    datamodule = build_datamodule(container(cfg.data), backbone.preprocessing)
    pool = datamodule.pool
    loader = DataLoader(datamodule.samples_dataset(pool), batch_size=32, num_workers=0)
    features = compute_features(backbone, loader, torch.device("cpu"), contextlib.nullcontext, channels_last=True)
    return features, np.array([label for _, label in pool]), pool, datamodule.class_names


def probe(features: np.ndarray, labels: np.ndarray, pool: list, names: list[str], folds: int, seed: int, balanced: bool) -> dict:
    """Out-of-fold predictions of LogisticRegressionCV (its C chosen by inner 5-fold CV on each training part)."""
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


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data-root", required=True)
    parser.add_argument("--task", default="breeds", choices=["breeds", "species"])
    parser.add_argument("--backbone", default="tf_efficientnet_lite0")
    parser.add_argument("--folds", type=int, default=5)
    parser.add_argument("--seed", type=int, default=42, help="data.split_seed: the folds transferlab's cv.folds uses")
    parser.add_argument("--balanced", action="store_true", help='class_weight="balanced"')
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    started = time.perf_counter()
    features, labels, pool, names = features_of(args.backbone, args.data_root, args.task, args.seed)
    extracted = time.perf_counter() - started
    found = probe(features, labels, pool, names, args.folds, args.seed, args.balanced)
    found.update(backbone=args.backbone, task=args.task, folds=args.folds, seed=args.seed, images=len(labels), seconds_features=round(extracted, 1))
    print(json.dumps(found, indent=2))
    if args.json:
        args.json.write_text(json.dumps(found, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
