"""Does the calibration rule hold on images the model never saw? Outer cross-validation of the default probe.

    python scripts/calibration_study.py --data-root ../shared/data/oxford-pets-sample --out calibration_study.json

For each task (species, breeds) and outer split seed, 5 outer folds (data.folds, as cv.folds=5 uses them): the
default L-BFGS probe is fitted on the other 4 folds with C chosen by inner 5-fold CV, exactly as a run does, and
its temperature is chosen from the inner folds' held-out logits; the outer fold's images, which neither the probe
nor the temperature saw, then measure the calibrated probabilities (ECE, 15 bins, and NLL, pooled over all images).
Rules compared: the earlier rule (the fitted temperature whatever the errors), no sharpening below 3, 10 or 30
held-out errors, the default (models.evaluation.choose_temperature: sharpening capped where the mean held-out
confidence reaches Laplace's (right + 1) / (images + 2)) and no temperature at all (T = 1).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch

from sklearn_probe import features_of  # scripts/ is on sys.path when this runs as a script
from transferlab.data.folds import fold_splits
from transferlab.models.evaluation import calibration_metrics, choose_temperature, fit_temperature
from transferlab.models.linear_probe import select_by_cv

RULES = {"T=1 (none)": None, "earlier (the fit)": 0, "min_errors=3": 3, "min_errors=10": 10, "min_errors=30": 30, "laplace cap": "laplace"}


def temperature(raw: torch.Tensor, labels: torch.Tensor, rule: int | str | None) -> float:
    if rule is None:
        return 1.0
    if rule == "laplace":
        return choose_temperature(raw, labels, "temperature").temperature
    fitted = fit_temperature(raw, labels)
    errors = int((raw.argmax(-1) != labels).sum())
    return 1.0 if fitted < 1.0 and errors < int(rule) else fitted


FEATURES: dict[tuple, tuple] = {}


def study(data_root: str, task: str, seed: int, backbone: str) -> dict:
    if (task, seed) not in FEATURES:
        FEATURES[(task, seed)] = features_of(backbone, data_root, task, seed)
    features, labels, pool, names = FEATURES[(task, seed)]
    x, y = torch.from_numpy(features).float(), torch.from_numpy(labels).long()
    row = {str(path): i for i, (path, _) in enumerate(pool)}
    logits = torch.zeros(len(y), len(names))
    chosen: dict[str, torch.Tensor] = {rule: torch.zeros(len(y)) for rule in RULES}
    folds = []
    for fold in fold_splits(pool, names, 5, seed, val_fraction=0.0):
        train = torch.tensor([row[str(p)] for p, _ in fold["train"] + fold["val"]])
        test = torch.tensor([row[str(p)] for p, _ in fold["test"]])
        fit = select_by_cv((x[train], y[train]), len(names), False, None, 5, seed)
        assert fit.held_out is not None
        held_logits, held_labels = fit.held_out
        logits[test] = x[test] @ fit.weight.float().T + fit.bias.float()
        for rule, min_errors in RULES.items():
            chosen[rule][test] = temperature(held_logits, held_labels, min_errors)
        folds.append({"held_out_errors": int((held_logits.argmax(-1) != held_labels).sum()), "fitted_T": fit_temperature(held_logits, held_labels)})
    found = {"task": task, "seed": seed, "images": len(y), "oof_errors": int((logits.argmax(-1) != y).sum()), "folds": folds, "rules": {}}
    for rule in RULES:
        scaled = logits / chosen[rule][:, None]
        found["rules"][rule] = {**calibration_metrics(scaled, y, len(names)), "temperatures": sorted({round(float(t), 3) for t in chosen[rule]})}
    return found


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data-root", required=True)
    parser.add_argument("--backbone", default="tf_efficientnet_lite0")
    parser.add_argument("--seeds", type=int, nargs="+", default=[42, 1, 2])
    parser.add_argument("--tasks", nargs="+", default=["species", "breeds"])
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    started = time.perf_counter()
    results = [study(args.data_root, task, seed, args.backbone) for task in args.tasks for seed in args.seeds]
    print(f"{len(results)} studies in {time.perf_counter() - started:.0f} s; the default rule: models.evaluation.choose_temperature")
    for result in results:
        print(
            f"{result['task']:8} seed {result['seed']:>2}: {result['oof_errors']} out-of-fold errors of {result['images']}; held-out errors per fold "
            f"{[f['held_out_errors'] for f in result['folds']]}, fitted T {[round(f['fitted_T'], 2) for f in result['folds']]}"
        )
        for rule, values in result["rules"].items():
            print(f"    {rule:26} ECE {values['ece']:.4f}  NLL {values['nll']:.4f}  T {values['temperatures']}")
    mean = {rule: {m: float(np.mean([r["rules"][rule][m] for r in results])) for m in ("ece", "nll")} for rule in RULES}
    print("mean over tasks and seeds:", json.dumps(mean, indent=1))
    if args.out:
        args.out.write_text(
            json.dumps({"results": results, "mean": mean}, indent=2, default=lambda v: None if isinstance(v, float) and math.isnan(v) else v) + "\n"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
