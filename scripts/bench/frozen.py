"""(a) The lesson's frozen-backbone loop against transferlab-train finetune=frozen (cold and warm feature cache), and
against runs with one speed setting alone: wall time to the same number of epochs, and the final val accuracy."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset

from .common import LITE0, Context, Row, Target, at, fmt, species_splits, transferlab_run

ALONE = {"cache": "feature cache", "bf16": "bf16-mixed", "workers": "data.num_workers=auto"}  # frozen runs with one speed setting


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


def run(ctx: Context) -> dict[str, Any]:
    return frozen_section(ctx.root, ctx.work, 2 if ctx.quick else 10, ctx.device, seed=42)


def rows(f: dict[str, Any]) -> list[Row]:
    base = f"{f['baseline']['seconds']:.1f}"
    accs = (f["transferlab"]["val_acc"], f["baseline"]["val_acc"])
    out = [
        Row(
            f"(a) frozen Lite0, species, {f['epochs']} epochs: wall s (cold cache)",
            base,
            f"{f['transferlab']['seconds']:.1f}",
            f"**{f['speedup']:.1f}x**",
            Target("frozen_speedup", f["speedup"], ">= 10", unit="x"),
        ),
        Row(
            "(a) same, cache reused by a second run: wall s", base, f"{f['transferlab_warm_cache']['seconds']:.1f}", f"{f['speedup_warm_cache']:.1f}x"
        ),
    ]
    for label, what in ALONE.items():
        alone = f["alone"][label]
        shown = (f"{alone['seconds']:.1f}", f"{f['speedup_alone'][label]:.1f}x") if alone else ("–", f["bf16_note"])
        out.append(Row(f"(a) same, {what} alone: wall s", base, *shown))
    out.append(
        Row(
            f"(a) final val accuracy ({f['val_images']} images)",
            fmt(accs[1], 3),
            fmt(accs[0], 3),
            target=Target("frozen_acc_vs_baseline", None if None in accs else accs[0] - accs[1], ">= -0.01", relative_to="baseline"),
        )
    )
    return out


KEYS = {
    "frozen_speedup": at("speedup"),
    "frozen_speedup_cache": at("speedup_alone", "cache"),
    "frozen_speedup_bf16": at("speedup_alone", "bf16"),
    "frozen_speedup_workers": at("speedup_alone", "workers"),
    "frozen_acc_baseline": at("baseline", "val_acc"),
    "frozen_acc_transferlab": at("transferlab", "val_acc"),
}
