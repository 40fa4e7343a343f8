"""(c) Precision and memory layout: images/s of a training step and of inference, fp32 against bf16-mixed +
channels_last (and, in the full run, each of the two alone), ResNet-50 and Lite0 on random input."""

from __future__ import annotations

import statistics
import time
from typing import Any

import torch
import torch.nn.functional as F

from .common import LITE0, Context, Row, Target, at, autocast, make_classifier, sync

HEADLINE = "resnet50/train"  # the row with a target


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


def run(ctx: Context) -> dict[str, Any]:
    variants = [("fp32", False, False), ("bf16+channels_last", True, True)]
    if not ctx.quick:
        variants += [("fp32+channels_last", False, True), ("bf16", True, False)]
    batch, steps, warmup = (256, 20, 5) if ctx.gpu else ((4, 2, 1) if ctx.quick else (32, 3, 1))
    return precision_section([("resnet50", "none"), (LITE0, "none")], batch, steps, warmup, ctx.device, variants)


def rows(f: dict[str, Any]) -> list[Row]:
    out = []
    for key, row in f["images_per_s"].items():
        others = ", ".join(f"{k} {v:.1f}" for k, v in row.items() if k not in ("fp32", "bf16+channels_last", "bf16_speedup"))
        out.append(
            Row(
                f"(c) {key} batch {f['batch']}: img/s fp32 vs bf16+channels_last ({others})",
                f"{row['fp32']:.1f}",
                f"{row['bf16+channels_last']:.1f}",
                f"**{row['bf16_speedup']:.2f}x**",
                Target("bf16_speedup_resnet50_train", row["bf16_speedup"], ">= 2.5", unit="x") if key == HEADLINE else None,
            )
        )
    return out


KEYS = {
    "bf16_speedup_resnet50_train": at("images_per_s", HEADLINE, "bf16_speedup"),
    "bf16_speedup_lite0_train": at("images_per_s", f"{LITE0}/train", "bf16_speedup"),
}
