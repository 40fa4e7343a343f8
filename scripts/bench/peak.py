"""(e) How close to the machine's peak: model FLOPs x images/s (from the precision section) against the bf16 and fp32
matmul GFLOP/s measured in the same run."""

from __future__ import annotations

import time
from typing import Any, Optional

import torch

from .common import Context, Row, make_classifier, sync


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


def run(ctx: Context) -> dict[str, Any]:
    """After the precision section (the table's `needs`): its images/s are what the FLOPs multiply."""
    return peak_section(ctx.details["precision"], ctx.device, ctx.quick)


def rows(f: dict[str, Any]) -> list[Row]:
    if not f.get("headline"):
        return []
    head = f["models"][f["headline"]]
    return [
        Row(
            f"(e) {f['headline']}: achieved GFLOP/s vs bf16 matmul GFLOP/s",
            f"{f['matmul_gflops']['bf16']:.0f}",
            f"{head['achieved_gflops']:.0f}",
            f"**{head['fraction']:.2f}** of peak",
        )
    ]


def headline_fraction(f: Optional[dict[str, Any]]) -> Optional[float]:
    return f["models"][f["headline"]]["fraction"] if f and f.get("headline") else None


KEYS = {"peak_fraction": headline_fraction}
