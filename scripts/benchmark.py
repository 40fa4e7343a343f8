"""Side-by-side speed benchmark: transferlab against plain PyTorch loops, on the same data in one invocation.

    python scripts/benchmark.py            # full (under 30 min on 2 CPU cores; the fill section alone ~15 of them)
    python scripts/benchmark.py --quick    # every key, smaller (under 4 min on 2 CPU cores; used by the tests)
    python scripts/benchmark.py --device cuda --sections finetune,precision,peak   # on a GPU machine
    python scripts/benchmark.py --check    # ... and exit 1 when a target is missed
    python scripts/benchmark.py --check --from benchmark.json   # only evaluate the targets of an earlier run

Prints a markdown table and writes benchmark.json. Its top-level keys are stable (other tooling reads them):
frozen_speedup, frozen_speedup_cache, frozen_speedup_bf16, frozen_speedup_workers, frozen_acc_baseline,
frozen_acc_transferlab, finetune_overhead, bf16_speedup_resnet50_train, bf16_speedup_lite0_train, decode_speedup,
decode_draft_speedup, peak_fraction, probe_balanced_acc_sklearn, probe_balanced_acc_transferlab, hardware,
predict_vs_raw, predict_onnxruntime_img_s, fill_vs_raw, fill_img_s, fill_raw_img_s, targets; the measurements
behind them are under `details`. `frozen_speedup` is the lesson loop's wall time over transferlab-train's with
every speed setting; the `_cache` / `_bf16` / `_workers` ones turn on that setting alone (None where the device
has no bf16). `decode_speedup` compares the same output (Lite0's eval resize + crop) from a Pillow loop and from
our full decode; `decode_draft_speedup` our reduced (draft) decode on large JPEGs against the same Pillow loop.
`fill_vs_raw` is transferlab's feature-cache fill img/s over a raw PyTorch loop's (scripts/fill_bench.py).
`targets` holds {key: {value, target, met}} for every measured row with a target. Only ratios measured side by
side in this one run are meaningful on a shared machine.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Optional

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("TRANSFERLAB_SHARED", REPO.parent / "shared")) / "data"
SECTIONS = ("frozen", "finetune", "precision", "accuracy", "decode", "peak", "probe", "predict", "fill")
LITE0 = "tf_efficientnet_lite0"
ALONE = {"cache": "feature cache", "bf16": "bf16-mixed", "workers": "data.num_workers=auto"}  # frozen runs with one speed setting
# Like-for-like decode (the same output), one core of the 2-core EPYC with the machine shared: our full decode 1.67-2.18x
# a Pillow loop on the shared photos; our draft decode 2.33-2.98x on the photos upscaled to 1200 px (where our full
# decode measured 2.39-2.57x). The targets leave room for other CPUs and a busier machine.
DECODE_TARGET, DECODE_DRAFT_TARGET = 1.5, 2.0


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def autocast(device: torch.device, bf16: bool) -> contextlib.AbstractContextManager:
    return torch.autocast(device.type, dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()


# ------------------------------------------------------------------------------------------- data
def subset_folder(source: Path, per_breed: Optional[int], into: Path) -> Path:
    """The shared sample, or `per_breed` photos of each breed (symlinks: nothing is copied)."""
    if per_breed is None:
        return source
    into.mkdir(parents=True, exist_ok=True)
    seen: dict[str, int] = {}
    for path in sorted(source.glob("*.jpg")):
        breed = path.stem.rsplit("_", 1)[0]
        if seen.get(breed, 0) < per_breed:
            seen[breed] = seen.get(breed, 0) + 1
            (into / path.name).symlink_to(path.resolve())
    return into


def species_splits(root: Path, cache_dir: Path, seed: int) -> tuple[Any, list[str]]:
    """The split transferlab-train makes for data.task=species with the default fractions and this seed."""
    from hydra.utils import instantiate

    from transferlab.cli.train import command
    from transferlab.models.backbones import create_backbone

    cfg = command.compose(
        [f"data.root={root}", "data.task=species", f"seed={seed}", "data.download=false", f"paths.cache_dir={cache_dir}"], cache_dir / "unused-run"
    )
    dm = instantiate(cfg.data)
    dm.preprocessing = create_backbone(LITE0, weights="bundled").preprocessing
    dm.setup()
    return dm, dm.class_names


def tensor_batches(files: list[Path], prep: Any, count: int) -> torch.Tensor:
    """`count` preprocessed images from the files, decoded once: training-step benchmarks exclude decoding."""
    from transferlab.data.images import decode_rgb

    transform = prep.eval_transform()
    return torch.stack([transform(decode_rgb(f)) for f in files[:count]])


# ------------------------------------------------------------------------------------ (a) frozen
class _PilDataset(Dataset):
    """The lesson's way: Pillow decode in the loop's own process, the backbone's eval transform."""

    def __init__(self, samples: list, transform: Any) -> None:
        self.samples, self.transform = samples, transform

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        from PIL import Image

        path, label = self.samples[i]
        with Image.open(path) as img:
            return self.transform(img.convert("RGB")), label


def baseline_frozen(dm: Any, epochs: int, lr: float, device: torch.device, seed: int) -> dict[str, float]:
    """A plain loop: frozen backbone recomputed for every batch, batch 16, no workers, fp32, Adam on a linear head."""
    from transferlab.models.backbones import create_backbone

    torch.manual_seed(seed)
    started = time.perf_counter()
    backbone = create_backbone(LITE0, weights="bundled").eval().to(device)
    head = nn.Linear(backbone.num_features, len(dm.class_names)).to(device)
    optimizer = torch.optim.Adam(head.parameters(), lr=lr)
    transform = backbone.preprocessing.eval_transform()
    train = DataLoader(_PilDataset(dm.splits["train"], transform), batch_size=16, shuffle=True)
    val = DataLoader(_PilDataset(dm.splits["val"], transform), batch_size=16)
    accuracy = 0.0
    for _ in range(epochs):
        head.train()
        for x, y in train:
            with torch.no_grad():
                features = backbone(x.to(device))
            loss = F.cross_entropy(head(features), y.to(device))
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        head.eval()
        correct = total = 0
        with torch.no_grad():
            for x, y in val:
                correct += int((head(backbone(x.to(device))).argmax(-1).cpu() == y).sum())
                total += len(y)
        accuracy = correct / total
    return {"seconds": time.perf_counter() - started, "val_acc": accuracy}


def transferlab_run(overrides: list[str], out_dir: Path) -> dict[str, Any]:
    """transferlab-train in this process (Hydra's compose API), timed from the validated config to metrics.json."""
    from transferlab.cli.train import command

    cfg = command.compose(overrides, out_dir)
    started = time.perf_counter()
    command.run(cfg)
    seconds = time.perf_counter() - started
    metrics = json.loads((out_dir / "metrics.json").read_text())
    cache = out_dir / "feature_cache.json"
    return {
        "seconds": seconds,
        "val_acc": metrics.get("val/acc"),
        "test_acc": metrics.get("test/acc"),
        "feature_cache": json.loads(cache.read_text()) if cache.is_file() else None,
    }


def frozen_section(root: Path, work: Path, epochs: int, device: torch.device, seed: int) -> dict[str, Any]:
    """The lesson loop against transferlab-train with every speed setting (cold, then warm cache), and with each alone."""
    from transferlab.core.hardware import detect

    dm, _ = species_splits(root, work / "scan-cache", seed)
    lr = 1e-3  # conf/optimizer/adam.yaml's default, so both sides use the same learning rate
    baseline = baseline_frozen(dm, epochs, lr, device, seed)
    accelerator = "gpu" if device.type == "cuda" else "cpu"
    common = [
        f"data.root={root}",
        "data.task=species",
        "finetune=frozen",
        "finetune.head_solver=sgd",  # epochs of a head (cached features or not) against the same epochs in a plain loop
        f"trainer.max_epochs={epochs}",
        f"seed={seed}",
        f"trainer.accelerator={accelerator}",
        "callbacks.progress_bar=null",
        "trainer.enable_progress_bar=false",
        "data.augment.scale_min=1.0",  # the lesson loop trains on the eval transform; so do the runs without the cache
        "data.augment.hflip=false",
    ]
    cold = transferlab_run(common + [f"paths.cache_dir={work / 'cache'}"], work / "frozen-cold")
    warm = transferlab_run(common + [f"paths.cache_dir={work / 'cache'}"], work / "frozen-warm")
    hw = detect()
    has_bf16 = hw.gpu_bf16 if device.type == "cuda" else hw.cpu_bf16
    # One speed setting on, the other two as in the lesson loop (channels_last stays auto in every run).
    settings: dict[str, Optional[list[str]]] = {
        "cache": ["performance.feature_cache.enabled=true", "trainer.precision=32-true", "data.num_workers=0"],
        "bf16": ["performance.feature_cache.enabled=false", "trainer.precision=bf16-mixed", "data.num_workers=0"] if has_bf16 else None,
        "workers": ["performance.feature_cache.enabled=false", "trainer.precision=32-true", "data.num_workers=auto"],
    }
    alone: dict[str, Any] = {}
    for label, extra in settings.items():  # a fresh cache dir each: every run pays the integrity scan, as the cold run does
        alone[label] = (
            None if extra is None else transferlab_run(common + extra + [f"paths.cache_dir={work / f'cache-{label}'}"], work / f"frozen-{label}")
        )
    return {
        "baseline": baseline,
        "transferlab": cold,
        "transferlab_warm_cache": warm,
        "alone": alone,
        "alone_overrides": settings,
        "bf16_note": None if has_bf16 else "bf16 alone skipped: no native bf16 on this device",
        "epochs": epochs,
        "train_images": len(dm.splits["train"]),
        "val_images": len(dm.splits["val"]),
        "speedup": baseline["seconds"] / cold["seconds"],
        "speedup_warm_cache": baseline["seconds"] / warm["seconds"],
        "speedup_alone": {label: None if run is None else baseline["seconds"] / run["seconds"] for label, run in alone.items()},
    }


# --------------------------------------------------------------------------- (b) fine-tuning overhead
def make_classifier(name: str, weights: str, classes: int) -> Any:
    from transferlab.models.classifier import TransferClassifier

    return TransferClassifier(
        backbone={"name": name, "weights": weights},
        class_names=[f"c{i}" for i in range(classes)],
        finetune={"mode": "full", "backbone_lr_factor": 0.1, "head_dropout": 0.0},
        optimizer={"_target_": "torch.optim.Adam", "_partial_": True, "lr": 1e-4},
        scheduler=None,
    )


def raw_steps(model: Any, batches: list, warmup: int, device: torch.device, bf16: bool) -> float:
    """A minimal PyTorch loop over the same model and batches; seconds per step after `warmup` steps."""
    model.to(device).train()
    optimizer = model.configure_optimizers()
    started = 0.0
    for i, (x, y) in enumerate(batches):
        if i == warmup:
            sync(device)
            started = time.perf_counter()
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        with autocast(device, bf16):
            logits = model(x)
        loss = F.cross_entropy(logits.float(), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    sync(device)
    return (time.perf_counter() - started) / (len(batches) - warmup)


class _Batches:
    """An iterable of ready batches (a plain list would be read by Lightning as a list of dataloaders)."""

    def __init__(self, batches: list) -> None:
        self.batches = batches

    def __iter__(self) -> Any:
        return iter(self.batches)

    def __len__(self) -> int:
        return len(self.batches)


class _StepTimer:
    """Wall time from the first measured batch to the end of training (every cost of Lightning's loop included)."""

    def __init__(self, warmup: int, device: torch.device) -> None:
        import lightning.pytorch as pl

        outer = self

        class Timer(pl.Callback):
            def on_train_batch_start(self, trainer: Any, pl_module: Any, batch: Any, batch_idx: int) -> None:
                if batch_idx == warmup:
                    sync(device)
                    outer.started = time.perf_counter()

            def on_train_end(self, trainer: Any, pl_module: Any) -> None:
                sync(device)
                outer.ended = time.perf_counter()

        self.callback, self.started, self.ended = Timer(), 0.0, 0.0


def lightning_steps(model: Any, batches: list, warmup: int, device: torch.device, precision: str, work: Path) -> float:
    """transferlab's TransferClassifier under Lightning with the run defaults (CSV logger, metrics every step)."""
    import lightning.pytorch as pl

    from transferlab.training.loggers import ResumableCSVLogger

    timer = _StepTimer(warmup, device)
    trainer = pl.Trainer(
        accelerator="gpu" if device.type == "cuda" else "cpu",
        devices=1,
        precision=precision,
        max_epochs=1,
        limit_val_batches=0,
        num_sanity_val_steps=0,
        log_every_n_steps=10,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        logger=ResumableCSVLogger(save_dir=str(work), name="overhead", version=""),
        callbacks=[timer.callback],
    )
    trainer.fit(model, train_dataloaders=_Batches(batches))
    return (timer.ended - timer.started) / (len(batches) - warmup)


def finetune_section(
    files: list[Path],
    name: str,
    weights: str,
    batch: int,
    steps: int,
    warmup: int,
    rounds: int,
    device: torch.device,
    bf16: bool,
    channels_last: bool,
    work: Path,
) -> dict[str, Any]:
    from transferlab.models.backbones import create_backbone

    prep = create_backbone(name, weights="none").preprocessing
    pool = tensor_batches(files, prep, min(len(files), batch * (steps + warmup)))
    # The same batches for both sides, already where the model is: this measures the training step, not a loader.
    order = torch.arange(batch * (steps + warmup))
    batches = [(pool[idx % len(pool)].to(device), (idx % 2).to(device)) for idx in order.split(batch)]
    raw, ours = [], []
    for r in range(rounds):  # alternate, so drifts of a shared machine hit both sides alike
        for side in ("raw", "transferlab"):
            torch.manual_seed(r)
            model = make_classifier(name, weights, 2)
            model.configure_runtime(channels_last=channels_last)
            if side == "raw":
                raw.append(raw_steps(model, batches, warmup, device, bf16))
            else:
                ours.append(lightning_steps(model, batches, warmup, device, "bf16-mixed" if bf16 else "32-true", work))
    best_raw, best_ours = min(raw), min(ours)
    return {
        "model": name,
        "batch": batch,
        "steps": steps,
        "rounds": rounds,
        "precision": "bf16-mixed" if bf16 else "32-true",
        "channels_last": channels_last,
        "raw_step_s": raw,
        "transferlab_step_s": ours,
        "raw_img_s": batch / best_raw,
        "transferlab_img_s": batch / best_ours,
        "overhead": best_ours / best_raw,
    }


# ------------------------------------------------------------------------------ (c) precision/layout
def throughput(
    name: str, weights: str, batch: int, steps: int, warmup: int, device: torch.device, bf16: bool, channels_last: bool, train: bool
) -> float:
    """Images/s of a train step (forward, backward, Adam) or of inference, in one precision and layout."""
    torch.manual_seed(0)
    model = make_classifier(name, weights, 10).to(device)
    model.configure_runtime(channels_last=channels_last)
    x = torch.randn(batch, 3, 224, 224, device=device)
    y = torch.randint(0, 10, (batch,), device=device)
    optimizer = model.configure_optimizers() if train else None
    model.train(train)
    timings = []
    for i in range(warmup + steps):
        sync(device)
        t = time.perf_counter()
        if train:
            with autocast(device, bf16):
                loss = F.cross_entropy(model(x).float(), y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        else:
            with torch.inference_mode(), autocast(device, bf16):
                model(x)
        sync(device)
        if i >= warmup:
            timings.append(time.perf_counter() - t)
    return batch / statistics.median(timings)


def precision_section(
    models: list[tuple[str, str]], batch: int, steps: int, warmup: int, device: torch.device, variants: list[tuple[str, bool, bool]]
) -> dict[str, Any]:
    results: dict[str, Any] = {}
    for name, weights in models:
        for mode in ("train", "inference"):
            row = {label: throughput(name, weights, batch, steps, warmup, device, bf16, cl, mode == "train") for label, bf16, cl in variants}
            row["bf16_speedup"] = row["bf16+channels_last"] / row["fp32"]
            results[f"{name}/{mode}"] = row
    return {"batch": batch, "steps": steps, "images_per_s": results}


# -------------------------------------------------------------------- accuracy of the speed settings
def accuracy_section(root: Path, work: Path, device: torch.device, epochs: int, compile_too: bool) -> dict[str, Any]:
    """Frozen Lite0 on the breeds task: test accuracy per speed setting (each a transferlab-train run)."""
    accelerator = "gpu" if device.type == "cuda" else "cpu"
    common = [
        f"data.root={root}",
        "data.task=breeds",
        "finetune=frozen",
        "finetune.head_solver=sgd",  # the speed settings change the epochs' arithmetic; the convex probe has none
        "optimizer.lr=3e-3",
        f"trainer.max_epochs={epochs}",
        "seed=42",
        f"trainer.accelerator={accelerator}",
        "callbacks.progress_bar=null",
        "trainer.enable_progress_bar=false",
    ]
    settings = {
        "fp32": ["trainer.precision=32-true", "performance.channels_last=false"],
        "fp32+channels_last": ["trainer.precision=32-true", "performance.channels_last=true"],
        "bf16-mixed+channels_last": ["trainer.precision=bf16-mixed", "performance.channels_last=true"],
        "fp32, no feature cache": [
            "trainer.precision=32-true",
            "performance.feature_cache.enabled=false",
            "data.augment.scale_min=1.0",
            "data.augment.hflip=false",
        ],
    }
    if compile_too:
        settings["bf16-mixed+compile"] = ["trainer.precision=bf16-mixed", "performance.compile=true"]
    out = {}
    for label, extra in settings.items():  # each with its own feature cache, so each computes its own features
        run = transferlab_run(common + extra + [f"paths.cache_dir={work / f'acc-cache-{len(out)}'}"], work / f"acc-{len(out)}")
        out[label] = {"test_acc": run["test_acc"], "val_acc": run["val_acc"], "seconds": run["seconds"]}
    return {"task": "breeds", "epochs": epochs, "runs": out}


# ------------------------------------------------------------------- (f) the best ten lines a user could write
def probe_section(root: Path, work: Path, tasks: tuple[str, ...], folds: int, seed: int) -> dict[str, Any]:
    """scikit-learn's LogisticRegressionCV(class_weight="balanced") on transferlab's frozen Lite0 features
    (scripts/sklearn_probe.py) against `transferlab-train data.task=T cv.folds=K` with no other flag, on the
    same stratified folds: out-of-fold accuracy and balanced accuracy of both."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from sklearn_probe import features_of, probe

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


# ---------------------------------------------------------------------------------------- (d) decode
def pillow_eval_geometry(prep: Any) -> Callable[[Path], torch.Tensor]:
    """A plain Pillow loop's file -> uint8 CHW tensor, with exactly the eval transform's resize, interpolation and crop."""
    import numpy as np
    from PIL import Image
    from torchvision.transforms.functional import pil_modes_mapping

    resize, crop = prep.eval_transform().transforms[1:3]
    short, (crop_h, crop_w) = resize.size[0], crop.size
    mode = pil_modes_mapping[resize.interpolation]

    def load(path: Path) -> torch.Tensor:
        with Image.open(path) as img:
            rgb = img.convert("RGB")
        w, h = rgb.size
        size = (short, int(short * h / w)) if w <= h else (int(short * w / h), short)  # torchvision's rounding of the long side
        rgb = rgb.resize(size, mode)
        left, top = int(round((size[0] - crop_w) / 2.0)), int(round((size[1] - crop_h) / 2.0))
        return torch.from_numpy(np.array(rgb.crop((left, top, left + crop_w, top + crop_h)))).permute(2, 0, 1)

    return load


def large_photos(files: list[Path], count: int, long_side: int, into: Path) -> list[Path]:
    """`count` of the photos (spread over the breeds) upscaled to `long_side` px: big enough for the draft path."""
    from PIL import Image

    into.mkdir(parents=True, exist_ok=True)
    out = []
    for f in files[:: max(1, len(files) // count)][:count]:
        with Image.open(f) as img:
            rgb = img.convert("RGB")
        scale = long_side / max(rgb.size)
        target = into / f.name
        rgb.resize((round(rgb.width * scale), round(rgb.height * scale)), Image.Resampling.LANCZOS).save(target, quality=90)
        out.append(target)
    return out


def decode_rows(files: list[Path], rounds: int, compare: int = 8) -> dict[str, Any]:
    """One core, the same output: a Pillow loop against our full decode (d1) and our draft decode (d2), both + Resize + CenterCrop."""
    from PIL import Image

    from transferlab.data.images import decode_rgb
    from transferlab.models.backbones import create_backbone

    prep = create_backbone(LITE0, weights="none").preprocessing
    resize, crop = prep.eval_transform().transforms[1:3]  # uint8 in and out
    size = prep.decode_size()
    loaders: dict[str, Callable[[Path], torch.Tensor]] = {
        "pillow": pillow_eval_geometry(prep),
        "transferlab": lambda f: crop(resize(decode_rgb(f))),
        "transferlab_draft": lambda f: crop(resize(decode_rgb(f, size))),
    }
    difference: dict[str, list[float]] = {"transferlab": [], "transferlab_draft": []}
    for i, f in enumerate(files):  # every output has Pillow's shape; the first few are compared pixel by pixel
        reference = loaders["pillow"](f)
        for label in difference:
            image = loaders[label](f)
            assert image.shape == reference.shape == (3, *crop.size), (f.name, label, tuple(image.shape), tuple(reference.shape))
            if i < compare:
                difference[label].append(float((image.int() - reference.int()).abs().float().mean()))
    short_sides = []
    for f in files:
        with Image.open(f) as img:
            short_sides.append(min(img.size))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        best = dict.fromkeys(loaders, math.inf)
        for _ in range(rounds):  # alternate, so drifts of a shared machine hit every loop alike
            for label, load in loaders.items():
                t = time.perf_counter()
                for f in files:
                    load(f)
                best[label] = min(best[label], time.perf_counter() - t)
    finally:
        torch.set_num_threads(threads)
    rates = {k: len(files) / v for k, v in best.items()}
    return {
        "images": len(files),
        "median_short_side": statistics.median(short_sides),
        "draft_eligible": sum(side >= 2 * size for side in short_sides),  # images._draft_decode's condition (JPEGs)
        "rounds": rounds,
        "output": [3, *crop.size],
        "resize": int(resize.size[0]),
        "interpolation": resize.interpolation.value,
        "pillow_img_s": rates["pillow"],
        "transferlab_img_s": rates["transferlab"],
        "transferlab_draft_img_s": rates["transferlab_draft"],
        "speedup": rates["transferlab"] / rates["pillow"],
        "draft_speedup": rates["transferlab_draft"] / rates["pillow"],
        "compared": len(difference["transferlab"]),
        "mean_abs_diff": statistics.mean(difference["transferlab"]),
        "mean_abs_diff_draft": statistics.mean(difference["transferlab_draft"]),
    }


def decode_section(files: list[Path], large: int, rounds: int, work: Path) -> dict[str, Any]:
    """The rows on the shared photos (~500x375: too small for the draft path) and on `large` of them upscaled to 1200 px."""
    return {"photos": decode_rows(files, rounds), "large": decode_rows(large_photos(files, large, 1200, work / "large"), rounds)}


# ------------------------------------------------------------------------------------- (e) peak
def matmul_flops(device: torch.device, dtype: torch.dtype, n: int, repeats: int) -> float:
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(2):
        a @ b
    sync(device)
    t = time.perf_counter()
    for _ in range(repeats):
        a @ b
    sync(device)
    return 2 * n**3 * repeats / (time.perf_counter() - t)


def forward_flops(name: str) -> float:
    from torch.utils.flop_counter import FlopCounterMode

    model = make_classifier(name, "none", 10).eval()
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(torch.randn(1, 3, 224, 224))
    return float(counter.get_total_flops())


def peak_section(precision: dict[str, Any], device: torch.device, quick: bool) -> dict[str, Any]:
    n = 8192 if device.type == "cuda" else (1024 if quick else 2048)
    peaks = {
        "bf16": matmul_flops(device, torch.bfloat16, n, 10 if device.type == "cuda" else 3),
        "fp32": matmul_flops(device, torch.float32, n, 10 if device.type == "cuda" else 3),
    }
    out: dict[str, Any] = {"matmul_n": n, "matmul_gflops": {k: v / 1e9 for k, v in peaks.items()}, "models": {}}
    for key, row in precision["images_per_s"].items():
        name, mode = key.split("/")
        flops = forward_flops(name) * (3 if mode == "train" else 1)  # backward ~ twice the forward
        for variant, dtype in (("bf16+channels_last", "bf16"), ("fp32", "fp32")):
            achieved = flops * row[variant]
            out["models"][f"{key}/{variant}"] = {
                "gflop_per_image": flops / 1e9,
                "achieved_gflops": achieved / 1e9,
                "fraction": achieved / peaks[dtype],
            }
    best_key = "resnet50/train/bf16+channels_last"
    out["headline"] = best_key if best_key in out["models"] else next(iter(out["models"]), None)
    return out


# ------------------------------------------------------------------------------------------ report
def fmt(value: Any, digits: int = 2) -> str:
    return "–" if value is None else (f"{value:.{digits}f}" if isinstance(value, float) else str(value))


def markdown(result: dict[str, Any]) -> str:
    d = result["details"]
    rows = ["| measurement | baseline | transferlab | ratio | target |", "|---|---|---|---|---|"]
    if "frozen" in d:
        f = d["frozen"]
        rows.append(
            f"| (a) frozen Lite0, species, {f['epochs']} epochs: wall s (cold cache) | {f['baseline']['seconds']:.1f} | "
            f"{f['transferlab']['seconds']:.1f} | **{f['speedup']:.1f}x** | >= 10x |"
        )
        rows.append(
            f"| (a) same, cache reused by a second run: wall s | {f['baseline']['seconds']:.1f} | "
            f"{f['transferlab_warm_cache']['seconds']:.1f} | {f['speedup_warm_cache']:.1f}x | |"
        )
        for label, what in ALONE.items():
            run = f["alone"][label]
            rows.append(
                f"| (a) same, {what} alone: wall s | {f['baseline']['seconds']:.1f} | "
                + (f"{run['seconds']:.1f} | {f['speedup_alone'][label]:.1f}x | |" if run else f"– | {f['bf16_note']} | |")
            )
        rows.append(
            f"| (a) final val accuracy ({f['val_images']} images) | {f['baseline']['val_acc']:.3f} | "
            f"{f['transferlab']['val_acc']:.3f} | | >= baseline - 0.01 |"
        )
    if "finetune" in d:
        f = d["finetune"]
        rows.append(
            f"| (b) full fine-tuning {f['model']} batch {f['batch']} {f['precision']}: img/s (raw loop vs Lightning) | "
            f"{f['raw_img_s']:.1f} | {f['transferlab_img_s']:.1f} | {f['overhead']:.3f} (time/step) | <= 1.05 |"
        )
    if "precision" in d:
        for key, row in d["precision"]["images_per_s"].items():
            others = ", ".join(f"{k} {v:.1f}" for k, v in row.items() if k not in ("fp32", "bf16+channels_last", "bf16_speedup"))
            rows.append(
                f"| (c) {key} batch {d['precision']['batch']}: img/s fp32 vs bf16+channels_last ({others}) | "
                f"{row['fp32']:.1f} | {row['bf16+channels_last']:.1f} | **{row['bf16_speedup']:.2f}x** | "
                f"{'>= 2.5x' if key == 'resnet50/train' else ''} |"
            )
    if "accuracy" in d:
        for label, run in d["accuracy"]["runs"].items():
            rows.append(
                f"| (c) frozen Lite0 breeds {d['accuracy']['epochs']} ep, {label}: test acc | | {fmt(run['test_acc'], 3)} | "
                f"{run['seconds']:.0f} s | |"
            )
    for label, f in d.get("decode", {}).items():
        what = f"{f['images']} {'shared' if label == 'photos' else 'upscaled'} JPEGs (median short side {f['median_short_side']:.0f} px)"
        same = f"Lite0's eval geometry: short side {f['resize']} {f['interpolation']}, centre crop {f['output'][1]}, uint8"
        rows.append(
            f"| (d1) decode to {same}, one core, {what}: img/s (Pillow loop vs ours, full decode; mean abs diff "
            f"{f['mean_abs_diff']:.3f} grey levels) | {f['pillow_img_s']:.0f} | {f['transferlab_img_s']:.0f} | **{f['speedup']:.2f}x** | "
            f"{f'>= {DECODE_TARGET}x' if label == 'photos' else ''} |"
        )
        rows.append(
            f"| (d2) same, ours with the draft path ({f['draft_eligible']} of {f['images']} large enough; mean abs diff "
            f"{f['mean_abs_diff_draft']:.3f}) | {f['pillow_img_s']:.0f} | {f['transferlab_draft_img_s']:.0f} | "
            f"**{f['draft_speedup']:.2f}x** | {f'>= {DECODE_DRAFT_TARGET}x' if label == 'large' else ''} |"
        )
    if "peak" in d and d["peak"].get("headline"):
        f = d["peak"]
        head = f["models"][f["headline"]]
        rows.append(
            f"| (e) {f['headline']}: achieved GFLOP/s vs bf16 matmul GFLOP/s | {f['matmul_gflops']['bf16']:.0f} | "
            f"{head['achieved_gflops']:.0f} | **{head['fraction']:.2f}** of peak | |"
        )
    for task, f in d.get("probe", {}).items():
        for key in ("acc", "balanced_acc"):
            rows.append(
                f"| (f) {task}, {f['folds']}-fold out-of-fold {key}: scikit-learn LogisticRegressionCV vs transferlab-train defaults | "
                f"{f['sklearn'][key]:.3f} | {f['transferlab'][key]:.3f} | {f['transferlab'][key] - f['sklearn'][key]:+.3f} | >= -0.005 |"
            )
    if "predict" in d:
        f = d["predict"]
        rows.append(
            f"| (g) label {f['images']} JPEGs, Lite0 batch {f['batch']} {f['precision']}, {f['workers']} worker(s): img/s (raw loop vs "
            f"transferlab-predict; onnxruntime {f['onnxruntime_img_s']:.1f}, fp32 without workers {f['fp32_no_workers_img_s']:.1f}) | {f['raw_img_s']:.1f} | {f['transferlab_img_s']:.1f} | "
            f"**{f['predict_vs_raw']:.2f}** | >= 0.8 |"
        )
    if "fill" in d:
        f = d["fill"]
        tried = ", ".join(f"{w}: {v:.1f}" for w, v in f["raw_img_s_by_workers"].items())
        rows.append(
            f"| (h) feature-cache fill, {f['images']} JPEGs, Lite0 batch {f['batch']} {f['precision']}: img/s (raw loop, best of workers "
            f"{tried}, vs transferlab-train frozen, {f['transferlab_workers']} worker(s)) | {f['raw_img_s']:.1f} | {fmt(f['transferlab_img_s'], 1)} | "
            f"**{fmt(f['fill_vs_raw'])}** | >= 0.9 |"
        )
    hw = result["hardware"]
    rows.append("")
    rows.append(
        f"Hardware: {hw['cpu_model']}, {hw['cores']} cores, flags {' '.join(hw['flags'])}; GPU {hw['gpu'] or 'none'}; "
        f"torch {hw['torch']}. Mode: {result['mode']}, {result['seconds']:.0f} s."
    )
    return "\n".join(rows)


def meets(value: Optional[float], target: str) -> bool:
    """Whether a value satisfies a target written as `>= X` or `<= X`; an unmeasured value (None) never does."""
    op, bound = target.split()
    if value is None or not math.isfinite(value):
        return False
    return value >= float(bound) if op == ">=" else value <= float(bound)


def targets(result: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """{key: {value, target, met}} for every measured row that has a target (the sections that ran)."""
    d = result["details"]
    wanted: dict[str, tuple[Optional[float], str]] = {}
    if "frozen" in d:
        wanted["frozen_speedup"] = (result["frozen_speedup"], ">= 10")
        accs = (result["frozen_acc_transferlab"], result["frozen_acc_baseline"])
        wanted["frozen_acc_vs_baseline"] = (None if None in accs else accs[0] - accs[1], ">= -0.01")
    if "finetune" in d:
        wanted["finetune_overhead"] = (result["finetune_overhead"], "<= 1.05")
    if result["bf16_speedup_resnet50_train"] is not None:
        wanted["bf16_speedup_resnet50_train"] = (result["bf16_speedup_resnet50_train"], ">= 2.5")
    if "decode" in d:
        wanted["decode_speedup"] = (result["decode_speedup"], f">= {DECODE_TARGET}")
        wanted["decode_draft_speedup"] = (result["decode_draft_speedup"], f">= {DECODE_DRAFT_TARGET}")
    for task, f in d.get("probe", {}).items():
        wanted[f"probe_{task}_balanced_acc_difference"] = (f["transferlab"]["balanced_acc"] - f["sklearn"]["balanced_acc"], ">= -0.005")
    if "predict" in d:
        wanted["predict_vs_raw"] = (result["predict_vs_raw"], ">= 0.8")
    if "fill" in d:
        wanted["fill_vs_raw"] = (result["fill_vs_raw"], ">= 0.9")
    return {key: {"value": value, "target": target, "met": meets(value, target)} for key, (value, target) in wanted.items()}


def check(entries: dict[str, dict[str, Any]]) -> int:
    """--check: one line per missed target (re-evaluated from its value), exit status 1 if any, else 0."""
    missed = [(key, e) for key, e in entries.items() if not meets(e["value"], e["target"])]
    for key, e in missed:
        print(f"target missed: {key} = {fmt(e['value'], 3)}, target {e['target']}")
    print(f"{len(entries) - len(missed)} of {len(entries)} targets met")
    return 1 if missed else 0


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="smaller everything: every key in under 4 min on 2 cores")
    parser.add_argument("--data", type=Path, default=SHARED / "oxford-pets-sample", help="folder of Oxford-IIIT Pet photos")
    parser.add_argument("--out", type=Path, default=Path("benchmark.json"))
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda")
    parser.add_argument("--sections", default=",".join(SECTIONS), help=f"comma-separated subset of {','.join(SECTIONS)}")
    parser.add_argument("--compile", action="store_true", help="also measure accuracy with performance.compile=true (slow on CPU)")
    parser.add_argument("--check", action="store_true", help="exit 1 when a target is missed (each missed one printed on a line)")
    parser.add_argument("--from", dest="source", type=Path, help="with --check: evaluate this benchmark JSON's targets, run nothing")
    args = parser.parse_args(argv)
    if args.source is not None:
        if not args.check:
            parser.error("--from needs --check")
        return check(json.loads(args.source.read_text())["targets"])
    sections = [s for s in args.sections.split(",") if s]
    unknown = [s for s in sections if s not in SECTIONS]
    if unknown:
        parser.error(f"--sections: unknown {unknown}; choose from {', '.join(SECTIONS)}")
    if not args.data.is_dir():
        print(f"error: --data: {args.data} is not a folder; point it at the Oxford-IIIT Pet sample", file=sys.stderr)
        return 2

    import logging

    from transferlab.core.hardware import detect, resolve_device

    logging.basicConfig(level=logging.WARNING)
    for name in ("lightning.pytorch", "lightning.fabric", "transferlab"):
        logging.getLogger(name).setLevel(logging.WARNING)

    device = resolve_device(args.device)
    gpu = device.type == "cuda"
    started = time.perf_counter()
    work = Path(tempfile.mkdtemp(prefix="transferlab-bench-"))
    quick = args.quick
    details: dict[str, Any] = {}
    try:
        root = subset_folder(args.data, 3 if quick else None, work / "subset")
        files = sorted(root.glob("*.jpg"))
        if "decode" in sections:
            details["decode"] = decode_section(files[:60] if quick else files, 12 if quick else 60, rounds=2 if quick else 3, work=work)
        if "frozen" in sections:
            details["frozen"] = frozen_section(root, work, 2 if quick else 10, device, seed=42)
        if "finetune" in sections:
            name, batch = ("resnet50", 256) if gpu else (LITE0, 8 if quick else 32)
            steps, warmup, rounds = (30, 10, 2) if gpu else ((3, 1, 1) if quick else (6, 2, 2))
            details["finetune"] = finetune_section(
                files,
                name,
                "none" if name == "resnet50" else "bundled",
                batch,
                steps,
                warmup,
                rounds,
                device,
                bf16=True,
                channels_last=True,
                work=work,
            )
        if "precision" in sections or "peak" in sections:
            variants = [("fp32", False, False), ("bf16+channels_last", True, True)]
            if not quick:
                variants += [("fp32+channels_last", False, True), ("bf16", True, False)]
            batch, steps, warmup = (256, 20, 5) if gpu else ((4, 2, 1) if quick else (32, 3, 1))
            details["precision"] = precision_section([("resnet50", "none"), (LITE0, "none")], batch, steps, warmup, device, variants)
        if "accuracy" in sections and not quick:
            details["accuracy"] = accuracy_section(root, work, device, 10, args.compile)
        if "peak" in sections:
            details["peak"] = peak_section(details["precision"], device, quick)
        if "predict" in sections:
            from predict_bench import predict_section  # scripts/ is on sys.path when this file runs

            details["predict"] = predict_section(files[:48] if quick else files, work, rounds=1 if quick else 2, batch=16 if quick else 32)
        if "probe" in sections:
            details["probe"] = probe_section(root, work, ("species",) if quick else ("species", "breeds"), 3 if quick else 5, seed=42)
        if "fill" in sections:
            from fill_bench import fill_section

            details["fill"] = fill_section(args.data, 300 if quick else 8000, work, rounds=1 if quick else 3)
    finally:
        shutil.rmtree(work, ignore_errors=True)

    def pick(path: tuple[str, ...]) -> Any:
        node: Any = details
        for part in path:
            if not isinstance(node, dict) or part not in node:
                return None
            node = node[part]
        return node

    peak = details.get("peak") or {}
    result = {
        "frozen_speedup": pick(("frozen", "speedup")),
        "frozen_speedup_cache": pick(("frozen", "speedup_alone", "cache")),
        "frozen_speedup_bf16": pick(("frozen", "speedup_alone", "bf16")),
        "frozen_speedup_workers": pick(("frozen", "speedup_alone", "workers")),
        "frozen_acc_baseline": pick(("frozen", "baseline", "val_acc")),
        "frozen_acc_transferlab": pick(("frozen", "transferlab", "val_acc")),
        "finetune_overhead": pick(("finetune", "overhead")),
        "bf16_speedup_resnet50_train": pick(("precision", "images_per_s", "resnet50/train", "bf16_speedup")),
        "bf16_speedup_lite0_train": pick(("precision", "images_per_s", f"{LITE0}/train", "bf16_speedup")),
        "decode_speedup": pick(("decode", "photos", "speedup")),
        "decode_draft_speedup": pick(("decode", "large", "draft_speedup")),
        "peak_fraction": peak["models"][peak["headline"]]["fraction"] if peak.get("headline") else None,
        "probe_balanced_acc_sklearn": pick(("probe", "species", "sklearn", "balanced_acc")),
        "probe_balanced_acc_transferlab": pick(("probe", "species", "transferlab", "balanced_acc")),
        "predict_vs_raw": pick(("predict", "predict_vs_raw")),
        "predict_onnxruntime_img_s": pick(("predict", "onnxruntime_img_s")),
        "fill_vs_raw": pick(("fill", "fill_vs_raw")),
        "fill_img_s": pick(("fill", "transferlab_img_s")),
        "fill_raw_img_s": pick(("fill", "raw_img_s")),
        "hardware": detect().to_dict(),
        "mode": "quick" if quick else "full",
        "device": str(device),
        "seconds": time.perf_counter() - started,
        "details": details,
    }
    result["targets"] = targets(result)
    table = markdown(result)
    result["table"] = table
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2, default=str))
    print(table)
    print(f"\nwrote {args.out}")
    return check(result["targets"]) if args.check else 0


if __name__ == "__main__":
    sys.exit(main())
