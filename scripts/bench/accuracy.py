"""(c) What the speed settings do to accuracy: frozen Lite0 on the breeds task, one transferlab-train run per setting
(fp32, channels_last, bf16-mixed, no feature cache; compile with --compile), each with its own feature cache."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import torch

from .common import Context, Row, fmt, transferlab_run


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


def run(ctx: Context) -> Optional[dict[str, Any]]:
    """Not in --quick: 4 runs of 10 epochs on the breeds task are what the quick mode leaves out."""
    return None if ctx.quick else accuracy_section(ctx.root, ctx.work, ctx.device, 10, ctx.compile)


def rows(f: dict[str, Any]) -> list[Row]:
    return [
        Row(f"(c) frozen Lite0 breeds {f['epochs']} ep, {label}: test acc", "", fmt(run["test_acc"], 3), f"{run['seconds']:.0f} s")
        for label, run in f["runs"].items()
    ]


KEYS: dict[str, Any] = {}
