"""How the data audit's searches grow with the number of images: seconds and peak memory per stage.

    python scripts/audit_scale.py --images 1000 4000 25000

Features are synthetic (class clusters in 1,280 dimensions, like EfficientNet-Lite0's pooled features, with planted
near-copies), written to a memory-mapped .npy in a temporary folder, so the figures are those of the audit's own
code on a dataset of that size without decoding 25,000 photos. Each size runs in a fresh process, so its peak
resident memory (ru_maxrss) is its own. Stages: the out-of-fold probe (5 folds, 11 values of C), cleanlab, the
blocked neighbour search, the perceptual-hash search (random 64-bit hashes), outliers.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np


def synthetic_features(path: Path, n: int, dim: int, classes: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((classes, dim)).astype(np.float32) * 0.35
    labels = rng.integers(0, classes, n)
    out = np.lib.format.open_memmap(path, mode="w+", dtype=np.float32, shape=(n, dim))
    for start in range(0, n, 4096):
        stop = min(n, start + 4096)
        out[start:stop] = np.maximum(0, centres[labels[start:stop]] + rng.standard_normal((stop - start, dim)).astype(np.float32))
    copies = rng.choice(n, 2 * max(1, n // 1000), replace=False)
    out[copies[1::2]] = out[copies[0::2]] * 1.01  # one near-copy per 1,000 images
    out.flush()
    return np.load(path, mmap_mode="r"), labels


def one_size(n: int) -> dict:
    from transferlab.insight.duplicates import find_duplicates, hash_neighbours, nearest_neighbours
    from transferlab.insight.label_issues import find_label_issues, find_outliers, out_of_fold_probabilities

    timings: dict[str, float] = {}
    with tempfile.TemporaryDirectory() as tmp:
        features, labels = synthetic_features(Path(tmp) / "features.npy", n, 1280, 2, seed=0)
        t = time.perf_counter()
        oof = out_of_fold_probabilities(features, labels, 2, 5, 0)
        timings["probe_s"] = time.perf_counter() - t
        t = time.perf_counter()
        find_label_issues(labels, oof.probs)
        timings["cleanlab_s"] = time.perf_counter() - t
        t = time.perf_counter()
        neighbours = nearest_neighbours(features, 10)
        timings["neighbours_s"] = time.perf_counter() - t
        t = time.perf_counter()
        hashes = np.random.default_rng(1).integers(0, 2**63, n, dtype=np.uint64)
        hash_neighbours(hashes, 10)
        pairs = find_duplicates(features, neighbours, hashes, 0.95, 10, 0.8)
        timings["duplicates_s"] = time.perf_counter() - t
        t = time.perf_counter()
        find_outliers(features, labels, 2, neighbours[0], 3.5)
        timings["outliers_s"] = time.perf_counter() - t
    peak_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {
        "images": n,
        **{k: round(v, 2) for k, v in timings.items()},
        "pairs_planted": max(1, n // 1000),
        "pairs_found": len(pairs),
        "peak_rss_mib": round(peak_mib),
        "feature_mib": round(n * 1280 * 4 / 2**20),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, nargs="+", default=[1000, 4000, 25000])
    parser.add_argument("--one", type=int, help=argparse.SUPPRESS)  # the child process of one size
    args = parser.parse_args()
    if args.one:
        print(json.dumps(one_size(args.one)))
        return
    rows = []
    for n in args.images:
        out = subprocess.run([sys.executable, __file__, "--one", str(n)], capture_output=True, text=True, check=True).stdout
        rows.append(json.loads(out.strip().splitlines()[-1]))
        print(json.dumps(rows[-1]), flush=True)
    if len(rows) > 1:
        total = [sum(v for k, v in r.items() if k.endswith("_s")) for r in rows]
        slope = np.polyfit(np.log([r["images"] for r in rows]), np.log(total), 1)[0]
        print(f"log-log slope of total seconds over images: {slope:.2f}; peak RSS {rows[0]['peak_rss_mib']} -> {rows[-1]['peak_rss_mib']} MiB")


if __name__ == "__main__":
    main()
