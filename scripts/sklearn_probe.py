"""The best ten lines a user could write: scikit-learn's LogisticRegressionCV on transferlab's frozen features,
scored on the same stratified folds as `cv.folds=K` (data.folds, seeded by data.split_seed).

    python scripts/sklearn_probe.py --data-root ../shared/data/oxford-pets-sample --task breeds --backbone tf_efficientnet_lite0

Prints (and with --json writes) the out-of-fold accuracy and balanced accuracy with their intervals (core.statistics)
and the mean ± std over folds (Nadeau-Bengio corrected interval): the reference a transferlab run of the same task is compared with.
The code is bench/probe.py's (the benchmark's probe section runs the same functions).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

# Python puts a script's own folder first on sys.path: the bench package beside this file, from any working directory.
# features_of and probe stay importable from here (scripts/calibration_study.py uses features_of).
from bench.probe import features_of, probe

__all__ = ["features_of", "probe", "main"]


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
