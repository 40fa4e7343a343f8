"""Side-by-side speed benchmark: transferlab against plain PyTorch loops, on the same data in one invocation.

    python scripts/benchmark.py            # full (under 20 min on 2 CPU cores)
    python scripts/benchmark.py --quick    # every key, smaller (under 3 min on 2 CPU cores; used by the tests)
    python scripts/benchmark.py --device cuda --sections finetune,precision,peak   # on a GPU machine

Prints a markdown table and writes benchmark.json. Its top-level keys are stable (other tooling reads them):
frozen_speedup, frozen_acc_baseline, frozen_acc_transferlab, finetune_overhead, bf16_speedup_resnet50_train,
bf16_speedup_lite0_train, decode_speedup, peak_fraction, probe_balanced_acc_sklearn, probe_balanced_acc_transferlab,
hardware, predict_vs_raw, predict_onnxruntime_img_s; the measurements behind them are under
`details`. Only ratios measured side by side in this one run are meaningful on a shared machine.
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
from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("TRANSFERLAB_SHARED", REPO.parent / "shared")) / "data"
SECTIONS = ("frozen", "finetune", "precision", "accuracy", "decode", "peak", "probe", "predict")
LITE0 = "tf_efficientnet_lite0"


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
    dm, _ = species_splits(root, work / "scan-cache", seed)
    lr = 1e-3  # conf/optimizer/adam.yaml's default, so both sides use the same learning rate
    baseline = baseline_frozen(dm, epochs, lr, device, seed)
    accelerator = "gpu" if device.type == "cuda" else "cpu"
    common = [
        f"data.root={root}",
        "data.task=species",
        "finetune=frozen",
        "finetune.head_solver=sgd",  # epochs of a head on cached features against the same epochs in a plain loop
        f"trainer.max_epochs={epochs}",
        f"seed={seed}",
        f"trainer.accelerator={accelerator}",
        "callbacks.progress_bar=null",
        "trainer.enable_progress_bar=false",
        f"paths.cache_dir={work / 'cache'}",
    ]
    cold = transferlab_run(common, work / "frozen-cold")
    warm = transferlab_run(common, work / "frozen-warm")
    return {
        "baseline": baseline,
        "transferlab": cold,
        "transferlab_warm_cache": warm,
        "epochs": epochs,
        "train_images": len(dm.splits["train"]),
        "val_images": len(dm.splits["val"]),
        "speedup": baseline["seconds"] / cold["seconds"],
        "speedup_warm_cache": baseline["seconds"] / warm["seconds"],
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
def decode_section(files: list[Path], rounds: int) -> dict[str, Any]:
    """decode + resize to 224 px on one core: a plain Pillow loop against transferlab's path (Lite0's eval geometry)."""
    from PIL import Image

    from transferlab.data.images import decode_rgb
    from transferlab.models.backbones import create_backbone

    prep = create_backbone(LITE0, weights="none").preprocessing
    geometry = prep.eval_transform().transforms[1:3]  # Resize(short side) + CenterCrop(224), uint8 in and out
    size = prep.decode_size()

    def pillow() -> None:
        for f in files:
            with Image.open(f) as img:
                out = img.convert("RGB").resize((224, 224))
            assert out.size == (224, 224)

    def ours() -> None:
        for f in files:
            out = geometry[1](geometry[0](decode_rgb(f, size)))
            assert out.shape[-2:] == (224, 224)

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        best = {"pillow": math.inf, "transferlab": math.inf}
        for _ in range(rounds):
            for label, fn in (("pillow", pillow), ("transferlab", ours)):
                t = time.perf_counter()
                fn()
                best[label] = min(best[label], time.perf_counter() - t)
    finally:
        torch.set_num_threads(threads)
    rates = {k: len(files) / v for k, v in best.items()}
    return {
        "images": len(files),
        "rounds": rounds,
        "pillow_img_s": rates["pillow"],
        "transferlab_img_s": rates["transferlab"],
        "speedup": rates["transferlab"] / rates["pillow"],
    }


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
    if "decode" in d:
        f = d["decode"]
        rows.append(
            f"| (d) decode + resize to 224, one core, {f['images']} JPEGs: img/s (Pillow loop vs ours) | "
            f"{f['pillow_img_s']:.0f} | {f['transferlab_img_s']:.0f} | **{f['speedup']:.2f}x** | >= 1.4x |"
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
    hw = result["hardware"]
    rows.append("")
    rows.append(
        f"Hardware: {hw['cpu_model']}, {hw['cores']} cores, flags {' '.join(hw['flags'])}; GPU {hw['gpu'] or 'none'}; "
        f"torch {hw['torch']}. Mode: {result['mode']}, {result['seconds']:.0f} s."
    )
    return "\n".join(rows)


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="smaller everything: every key in under 3 min on 2 cores")
    parser.add_argument("--data", type=Path, default=SHARED / "oxford-pets-sample", help="folder of Oxford-IIIT Pet photos")
    parser.add_argument("--out", type=Path, default=Path("benchmark.json"))
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda")
    parser.add_argument("--sections", default=",".join(SECTIONS), help=f"comma-separated subset of {','.join(SECTIONS)}")
    parser.add_argument("--compile", action="store_true", help="also measure accuracy with performance.compile=true (slow on CPU)")
    args = parser.parse_args(argv)
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
            details["decode"] = decode_section(files[:60] if quick else files, rounds=2 if quick else 3)
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
        "frozen_acc_baseline": pick(("frozen", "baseline", "val_acc")),
        "frozen_acc_transferlab": pick(("frozen", "transferlab", "val_acc")),
        "finetune_overhead": pick(("finetune", "overhead")),
        "bf16_speedup_resnet50_train": pick(("precision", "images_per_s", "resnet50/train", "bf16_speedup")),
        "bf16_speedup_lite0_train": pick(("precision", "images_per_s", f"{LITE0}/train", "bf16_speedup")),
        "decode_speedup": pick(("decode", "speedup")),
        "peak_fraction": peak["models"][peak["headline"]]["fraction"] if peak.get("headline") else None,
        "probe_balanced_acc_sklearn": pick(("probe", "species", "sklearn", "balanced_acc")),
        "probe_balanced_acc_transferlab": pick(("probe", "species", "transferlab", "balanced_acc")),
        "predict_vs_raw": pick(("predict", "predict_vs_raw")),
        "predict_onnxruntime_img_s": pick(("predict", "onnxruntime_img_s")),
        "hardware": detect().to_dict(),
        "mode": "quick" if quick else "full",
        "device": str(device),
        "seconds": time.perf_counter() - started,
        "details": details,
    }
    table = markdown(result)
    result["table"] = table
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2, default=str))
    print(table)
    print(f"\nwrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
