"""How the cost of a frozen run grows with the data set: 1k / 4k / 16k realistic photos, one fresh training process each.

    python scripts/scale.py                      # 1000, 4000, 16000 images (about 25 min on 2 CPU cores)
    python scripts/scale.py --quick              # 1000 only (1.5-4 min on 2 CPU cores; tests/test_scale.py runs --sizes 100)
    python scripts/scale.py --sizes 1000,2000 --work /tmp/scale --out scale.json --check

For each size, scripts/synthetic_photos.py makes an image folder of that many cat / dog JPEGs from the shared
Oxford-IIIT Pet photos (random crops, flips, sizes and JPEG qualities) in a temporary work folder (removed at the
end unless --work is given), and `transferlab-train data=image_folder finetune=frozen trainer.max_epochs=1` runs
on it in a fresh process with a fresh feature cache. Prints a markdown table and writes --out (JSON): per size the
wall time, img/s, feature-cache fill speed, peak RSS, cache and data set size on disk and test accuracy; the
log-log slopes of time over images (`slope_time`, target <= 1.1; `slope_fill`, the fill alone); the growth of peak
RSS per 1000 images and the formula behind it (`rss_formula`).

Peak RSS: the training process reports its own high-water mark (getrusage RUSAGE_SELF: the kernel's VmHWM, so no
short peak is missed, as sampling /proc would) and, separately, the largest one of its DataLoader workers
(RUSAGE_CHILDREN, after they are joined). The two are not added up: forked workers share the parent's pages
copy-on-write, and RSS counts a shared page in every process that maps it, so a sum would count the model and the
interpreter once per worker. What grows with the number of images lives in the training process (the head's
feature matrix); a worker decodes one batch at a time whatever the data set's size.

Wall time includes the fixed costs (interpreter start, imports, model load: several seconds), so at small sizes
the time slope is below 1; `slope_fill` is the backbone pass alone. The photos are in the page cache when the run
reads them (they were just written), as they would be on a second epoch. On a machine that other jobs share, set
OMP_NUM_THREADS=1 (the test suite does, per xdist worker): with 2 torch threads on 2 busy cores the L-BFGS probe
was measured 7-10x slower, its threads waiting for each other; `hardware` records the setting and `load_average`
the machine's load. Test accuracy is a sanity check only: variants of one photo land on both sides of the split,
which makes it optimistic.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Optional

from synthetic_photos import build_photos  # scripts/ is on sys.path when this file runs

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("TRANSFERLAB_SHARED", REPO.parent / "shared")) / "data"
DEFAULT_SIZES = (1000, 4000, 16000)
TARGET_SLOPE_TIME = 1.1
FEATURE_DIM = 1280  # tf_efficientnet_lite0 (the default backbone): pooled features, float32
MB = 1e6
TRAIN_SHARE = 0.85  # finetune.select_c=cv: the head is fitted on train + val, 1 - data.test_fraction of the images
# Bytes per training feature value while models.linear_probe.select_by_cv runs (finetune.head_solver=lbfgs, the default):
# 4 the gathered float32 matrix + 4 the mapped shard pages it read + 4 a fold's float32 train/held-out copies + 8 their
# float64 copies (the identity standardiser) + 6.4 x @ basis (float64, the 80 % of a fold that fits). 27 B measured.
PROBE_BYTES_PER_VALUE = 26.4

# `transferlab-train` in this very process, then its own and its largest reaped child's peak RSS (bytes) as JSON.
CHILD = """
import gc, json, resource, sys
report, sys.argv = sys.argv[1], ["transferlab-train", *sys.argv[2:]]
from transferlab.cli.train import main
try:
    main()
finally:
    gc.collect()  # persistent DataLoader iterators: freed here, their workers joined, so RUSAGE_CHILDREN counts them
    peaks = {who: resource.getrusage(getattr(resource, "RUSAGE_" + who.upper())).ru_maxrss * 1024 for who in ("self", "children")}
    with open(report, "w") as fh:
        json.dump(peaks, fh)
"""


def folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file()) if folder.is_dir() else 0


def slope(xs: list[float], ys: list[float]) -> Optional[float]:
    """Least-squares slope of ys over xs; None with fewer than two distinct xs."""
    if len(set(xs)) < 2:
        return None
    mean_x, mean_y = sum(xs) / len(xs), sum(ys) / len(ys)
    return sum((x - mean_x) * (y - mean_y) for x, y in zip(xs, ys)) / sum((x - mean_x) ** 2 for x in xs)


def log_slope(xs: list[float], ys: list[Optional[float]]) -> Optional[float]:
    pairs = [(x, y) for x, y in zip(xs, ys) if y is not None and y > 0]
    return slope([math.log(x) for x, _ in pairs], [math.log(y) for _, y in pairs])


def fill_speed(stats: dict[str, Any]) -> tuple[int, Optional[float]]:
    """(images computed, seconds) of the feature-cache fill from <run>/feature_cache.json: the splits' own `seconds`
    where the cache records them, else the cache's setup time per stage (`seconds_fit`, ...: the fill and its set-up)."""
    splits = [value for value in stats.values() if isinstance(value, dict) and "computed" in value]
    computed = sum(int(split["computed"]) for split in splits)
    if splits and all("seconds" in split for split in splits):
        return computed, sum(float(split["seconds"]) for split in splits)
    stage_seconds = [float(value) for key, value in stats.items() if key.startswith("seconds_")]
    return computed, sum(stage_seconds) if stage_seconds else None


def train_overrides(root: Path, cache: Path, run_dir: Path) -> list[str]:
    return [
        "data=image_folder",
        f"data.root={root}",
        "finetune=frozen",
        "trainer.max_epochs=1",
        f"paths.cache_dir={cache}",
        f"hydra.run.dir={run_dir}",
        "logger=csv",
        "callbacks.progress_bar=null",
        "trainer.enable_progress_bar=false",
        "interpret.enabled=false",
    ]


def measure(source: Path, images: int, work: Path, seed: int) -> dict[str, Any]:
    """Build `images` photos, train once in a fresh process on a fresh cache; what it cost."""
    started = time.perf_counter()
    root = build_photos(source, images, work / f"photos-{images}", seed=seed)
    build_seconds = time.perf_counter() - started
    cache, run_dir = work / f"cache-{images}", work / f"run-{images}"
    for stale in (cache, run_dir):
        shutil.rmtree(stale, ignore_errors=True)  # a reused --work folder: the fill is measured from empty
    run_dir.mkdir(parents=True)
    log, peaks_file = work / f"train-{images}.log", run_dir / "peak_rss.json"
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    with open(log, "w") as out:
        started = time.perf_counter()
        proc = subprocess.run(
            [sys.executable, "-c", CHILD, str(peaks_file), *train_overrides(root, cache, run_dir)],
            cwd=work,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
        wall = time.perf_counter() - started
    if proc.returncode != 0:
        tail = "\n".join(log.read_text(errors="replace").splitlines()[-40:])
        raise RuntimeError(f"training on {images} images exited {proc.returncode}; the end of {log}:\n{tail}")
    peaks = json.loads(peaks_file.read_text())
    fill_stats = json.loads((run_dir / "feature_cache.json").read_text())
    fill_images, fill_seconds = fill_speed(fill_stats)
    metrics = json.loads((run_dir / "metrics.json").read_text())
    return {
        "images": images,
        "wall_seconds": round(wall, 2),
        "images_per_second": round(images / wall, 2),
        "fill_images": fill_images,
        "fill_seconds": round(fill_seconds, 2) if fill_seconds else None,
        "fill_images_per_second": round(fill_images / fill_seconds, 2) if fill_seconds else None,
        "peak_rss_mb": round(peaks["self"] / MB, 1),
        "worker_peak_rss_mb": round(peaks["children"] / MB, 1),
        "cache_bytes": folder_bytes(cache / "features"),
        "dataset_bytes": folder_bytes(root),
        "test_acc": metrics.get("test/acc"),
        "build_seconds": round(build_seconds, 2),
        "feature_cache": fill_stats,
        "dataset_dir": str(root),
        "log": str(log),
    }


def rss_formula(sizes: list[dict[str, Any]], rss_slope_mb_per_image: Optional[float]) -> str:
    """Peak RSS as the larger of its two phases, with the bytes per image counted from the code and the measured fit."""
    probe_mb_per_1k = PROBE_BYTES_PER_VALUE * TRAIN_SHARE * FEATURE_DIM * 1000 / MB
    model = (
        f"peak RSS = max(fill, probe). fill ~ B + one backbone batch's activations (performance.feature_cache.batch_size "
        f"images; independent of N). probe ~ B + N_train x D x 4 B x {PROBE_BYTES_PER_VALUE / 4:.1f}, N_train = {TRAIN_SHARE} N "
        f"(train + val fit the head), D = {FEATURE_DIM} (Lite0 features, float32): the L-BFGS head gathers the training "
        "features into one float32 matrix, touches the mapped shard pages, and each inner CV fold adds float32 and "
        f"float64 copies, {PROBE_BYTES_PER_VALUE} B per feature value ({probe_mb_per_1k:.0f} MB per 1000 images). Cached "
        "features are memory-mapped .npy shards (np.load(mmap_mode='r')) and images are decoded a batch at a time in the "
        "DataLoader workers: no whole-data-set image tensor; the head solver's matrix is the one whole-data-set array."
    )
    if rss_slope_mb_per_image is None:
        only = sizes[0]
        return f"{model} Measured: {only['peak_rss_mb']} MB at {only['images']} images (one size: no slope)."
    mean_images = sum(s["images"] for s in sizes) / len(sizes)
    base = sum(s["peak_rss_mb"] for s in sizes) / len(sizes) - rss_slope_mb_per_image * mean_images
    return (
        f"{model} Measured (least squares over {len(sizes)} sizes): {base:.0f} MB + "
        f"{rss_slope_mb_per_image * 1000:.1f} MB per 1000 images = N x D x 4 B x {rss_slope_mb_per_image * MB / (FEATURE_DIM * 4):.1f}."
    )


def table(result: dict[str, Any]) -> str:
    def cell(value: Any, digits: int = 1) -> str:
        return "-" if value is None else f"{value:.{digits}f}"

    rows = [
        "| images | wall s | img/s | fill img/s | peak RSS MB | worker RSS MB | cache MB | dataset MB | test acc |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for s in result["sizes"]:
        rows.append(
            f"| {s['images']} | {cell(s['wall_seconds'])} | {cell(s['images_per_second'])} | {cell(s['fill_images_per_second'])} | "
            f"{cell(s['peak_rss_mb'], 0)} | {cell(s['worker_peak_rss_mb'], 0)} | {cell(s['cache_bytes'] / MB)} | "
            f"{cell(s['dataset_bytes'] / MB)} | {cell(s['test_acc'], 3)} |"
        )
    rows += [
        "",
        f"slope of log(wall s) over log(images): {cell(result['slope_time'], 3)} (target <= {TARGET_SLOPE_TIME}); "
        f"of the fill alone: {cell(result['slope_fill'], 3)}; peak RSS: {cell(result['rss_mb_per_1k_images'])} MB per 1000 images.",
        f"RSS: {result['rss_formula']}",
        f"Hardware: {result['hardware']['cpu_model']}, {result['hardware']['cores']} cores; GPU {result['hardware']['gpu'] or 'none'}. "
        f"{result['seconds']:.0f} s in all.",
    ]
    return "\n".join(rows)


def parse_sizes(text: str) -> list[int]:
    try:
        sizes = sorted({int(part) for part in text.split(",") if part.strip()})
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated image counts, got {text!r}") from None
    if not sizes or sizes[0] < 100:
        raise argparse.ArgumentTypeError(f"expected image counts of at least 100 (val and test need photos of both classes), got {text!r}")
    return sizes


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=parse_sizes, default=list(DEFAULT_SIZES), help="comma-separated image counts (default 1000,4000,16000)")
    parser.add_argument("--quick", action="store_true", help="1000 images only")
    parser.add_argument("--out", type=Path, default=Path("scale.json"))
    parser.add_argument("--work", type=Path, help="keep the photos, caches, runs and logs here (default: a temporary folder, removed)")
    parser.add_argument("--data", type=Path, default=SHARED / "oxford-pets-sample", help="folder of Oxford-IIIT Pet photos")
    parser.add_argument("--seed", type=int, default=0, help="seed of the synthetic photos")
    parser.add_argument("--check", action="store_true", help=f"exit 1 when slope_time > {TARGET_SLOPE_TIME}")
    args = parser.parse_args(argv)
    if not args.data.is_dir():
        print(f"error: --data: {args.data} is not a folder; point it at the Oxford-IIIT Pet sample", file=sys.stderr)
        return 2
    work = args.work.resolve() if args.work else Path(tempfile.mkdtemp(prefix="transferlab-scale-"))
    if work == REPO or REPO in work.parents:
        print(f"error: --work: {work} is inside the repository; generated data must not be committed", file=sys.stderr)
        return 2
    work.mkdir(parents=True, exist_ok=True)
    sizes = [1000] if args.quick else args.sizes
    started, load_at_start = time.perf_counter(), [round(x, 2) for x in os.getloadavg()]
    try:
        measured = [measure(args.data, images, work, args.seed) for images in sizes]
    except RuntimeError as exc:  # a training run failed: the end of its log is in the message
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except ValueError as exc:  # build_photos refused the folder (inside the repository or shared/)
        print(f"error: {exc}", file=sys.stderr)
        return 2
    finally:
        if args.work is None:
            shutil.rmtree(work, ignore_errors=True)

    from transferlab.core.hardware import detect  # after the builds: their worker processes fork without torch loaded

    counts = [float(s["images"]) for s in measured]
    rss_slope = slope(counts, [s["peak_rss_mb"] for s in measured])
    result: dict[str, Any] = {
        "sizes": measured,
        "slope_time": log_slope(counts, [s["wall_seconds"] for s in measured]),
        "slope_fill": log_slope(counts, [s["fill_seconds"] for s in measured]),
        "rss_mb_per_1k_images": rss_slope * 1000 if rss_slope is not None else None,
        "rss_formula": rss_formula(measured, rss_slope),
        "targets": {"slope_time": TARGET_SLOPE_TIME},
        "hardware": {**detect().to_dict(), "python": platform.python_version(), "omp_num_threads": os.environ.get("OMP_NUM_THREADS")},
        "load_average": {"start": load_at_start, "end": [round(x, 2) for x in os.getloadavg()]},
        "seconds": round(time.perf_counter() - started, 1),
    }
    args.out.write_text(json.dumps(result, indent=2))
    print(table(result))
    if args.check and result["slope_time"] is not None and result["slope_time"] > TARGET_SLOPE_TIME:
        print(f"error: slope_time {result['slope_time']:.3f} > {TARGET_SLOPE_TIME}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
