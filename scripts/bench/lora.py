"""(i) LoRA against full fine-tuning of the same backbone, side by side: trainable parameters, peak memory of the
training step and seconds per step, for Lite0 (bundled weights, its 1x1 convolutions adapted) and a ViT (weights=none:
the cost does not depend on the weights; attention qkv / proj and MLP fc1 / fc2 adapted).

Each side runs in a fresh process (multiprocessing spawn), so its peak memory is its own: on a GPU the allocator's
peak (torch.cuda.max_memory_allocated, which the model's weights are part of), on a CPU the process's peak resident
set (sampled) above what it held before the first step (the model and the batch): activations, gradients, optimiser
state. A minimal loop (forward, cross-entropy, backward, optimiser step) over the same
preloaded batches: this measures the step, not a loader.
"""

from __future__ import annotations

import multiprocessing
import resource
import threading
import time
from typing import Any

import torch

from .common import LITE0, Context, Row, sync, train_step

LORA = {"r": 8, "alpha": 16, "dropout": 0.05, "target_modules": "auto"}  # conf/finetune/lora.yaml's
FACTOR = {"full": 0.1, "lora": 1.0}  # finetune.backbone_lr_factor of conf/finetune/full.yaml and lora.yaml


def classifier(name: str, weights: str, mode: str, size: int) -> Any:
    from transferlab.models.classifier import TransferClassifier

    return TransferClassifier(
        backbone={"name": name, "weights": weights, "source": "timm", "input_size": size},
        class_names=["cat", "dog"],
        finetune={"mode": mode, "backbone_lr_factor": FACTOR[mode], "head_dropout": 0.0, "lora": LORA if mode == "lora" else None},
        optimizer={"_target_": "torch.optim.AdamW", "_partial_": True, "lr": 1e-3, "weight_decay": 0.01},
        scheduler=None,
    )


def resident_mb() -> float:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * resource.getpagesize() / 2**20


class PeakResident:
    """The largest resident set seen (sampled every 2 ms by a thread) while the block runs, in MB."""

    def __enter__(self) -> PeakResident:
        self.peak, self.done = resident_mb(), threading.Event()
        self.thread = threading.Thread(target=self.sample, daemon=True)
        self.thread.start()
        return self

    def sample(self) -> None:
        while not self.done.wait(0.002):
            self.peak = max(self.peak, resident_mb())

    def __exit__(self, *exc: Any) -> None:
        self.done.set()
        self.thread.join()
        self.peak = max(self.peak, resident_mb())


def one_side(name: str, weights: str, mode: str, size: int, batch: int, steps: int, warmup: int, device_name: str, bf16: bool) -> dict[str, Any]:
    """In its own process: build, then `warmup` + `steps` training steps; seconds per step and the peak memory."""
    device = torch.device(device_name)
    torch.manual_seed(0)
    model = classifier(name, weights, mode, size)
    model.configure_runtime(channels_last=name == LITE0)  # as channels_last=auto chooses: convolutional backbones only
    model.to(device).train()
    optimizer = model.configure_optimizers()
    images = torch.randn(batch, 3, size, size, device=device)
    labels = torch.arange(batch, device=device) % 2
    trainable = sum(p.numel() for group in optimizer.param_groups for p in group["params"])  # what the optimiser updates
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    before, times = resident_mb(), []
    with PeakResident() as resident:
        for i in range(warmup + steps):
            sync(device)
            started = time.perf_counter()
            train_step(model, optimizer, images, labels, device, bf16)
            sync(device)
            if i >= warmup:
                times.append(time.perf_counter() - started)
    peak = torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else resident.peak - before
    return {
        "trainable": trainable,
        "parameters": sum(p.numel() for p in model.parameters()),
        "step_s": sorted(times)[len(times) // 2],
        "peak_mb": peak,
        "peak_kind": "cuda max_memory_allocated" if device.type == "cuda" else "peak RSS above the RSS before the first step",
    }


def compare(name: str, weights: str, size: int, batch: int, steps: int, warmup: int, device: torch.device, bf16: bool) -> dict[str, Any]:
    spawn = multiprocessing.get_context("spawn")
    found: dict[str, Any] = {"model": name, "weights": weights, "input_size": size, "batch": batch, "steps": steps}
    found["precision"] = "bf16-mixed" if bf16 else "32-true"
    with spawn.Pool(1, maxtasksperchild=1) as pool:
        for mode in ("full", "lora"):
            found[mode] = pool.apply(one_side, (name, weights, mode, size, batch, steps, warmup, str(device), bf16))
    full, lora = found["full"], found["lora"]
    found["trainable_fraction"] = lora["trainable"] / full["trainable"]
    found["step_speedup"] = full["step_s"] / lora["step_s"]
    found["peak_fraction"] = lora["peak_mb"] / full["peak_mb"] if full["peak_mb"] > 0 else None
    return found


def run(ctx: Context) -> dict[str, Any]:
    """Lite0 at 224 px and a ViT (ViT-B/16 on a GPU, ViT-Ti/16 on a CPU) at 224 px, bf16-mixed."""
    batch, steps, warmup = (64, 20, 5) if ctx.gpu else ((8, 3, 1) if ctx.quick else (16, 5, 2))
    vit = "vit_base_patch16_224" if ctx.gpu else "vit_tiny_patch16_224"
    return {
        "lite0": compare(LITE0, "bundled", 224, batch, steps, warmup, ctx.device, bf16=True),
        "vit": compare(vit, "none", 224, batch, steps, warmup, ctx.device, bf16=True),
    }


def rows(f: dict[str, Any]) -> list[Row]:
    found = []
    for key in ("lite0", "vit"):
        c = f[key]
        what = f"(i) {c['model']} batch {c['batch']} {c['precision']}, full fine-tuning vs LoRA r={LORA['r']}"
        found += [
            Row(f"{what}: trainable parameters", f"{c['full']['trainable']:,}", f"{c['lora']['trainable']:,}", f"{c['trainable_fraction']:.3f}"),
            Row(f"{what}: s/step", f"{c['full']['step_s']:.3f}", f"{c['lora']['step_s']:.3f}", f"{c['step_speedup']:.2f}x faster"),
            Row(
                f"{what}: peak MB ({c['lora']['peak_kind']})",
                f"{c['full']['peak_mb']:.0f}",
                f"{c['lora']['peak_mb']:.0f}",
                "–" if c["peak_fraction"] is None else f"{c['peak_fraction']:.2f}",
            ),
        ]
    return found


KEYS: dict[str, Any] = {}  # details only: benchmark.json's top-level keys stay as they were
