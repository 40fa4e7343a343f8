"""The ranges a config value must lie in, for every command that has the key (checked after the types, config.validation)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

# Values in range, for every command that has the key: key -> (test, expected form). Checked after the types.
LIMITS: dict[str, tuple[Callable[[Any], bool], str]] = {
    "seed": (lambda v: 0 <= v < 2**32, "an integer in [0, 2**32)"),
    "data.batch_size": (lambda v: v >= 1, "an integer >= 1"),
    "optimizer.lr": (lambda v: v > 0, "a number > 0, e.g. optimizer.lr=1e-3"),
    "optimizer.weight_decay": (lambda v: v >= 0, "a number >= 0"),
    "optimizer.momentum": (lambda v: 0 <= v < 1, "a number in [0, 1)"),
    "trainer.max_epochs": (lambda v: v >= 1 or v == -1, "an integer >= 1 (or -1 for no limit)"),
    "cv.folds": (lambda v: v >= 2, "null (one split) or K >= 2 folds, e.g. cv.folds=5"),
    "trainer.accumulate_grad_batches": (lambda v: v >= 1, "an integer >= 1"),
    "trainer.gradient_clip_val": (lambda v: v >= 0, "a number >= 0 or null"),
    "finetune.head_dropout": (lambda v: 0 <= v < 1, "a probability in [0, 1)"),
    "finetune.backbone_lr_factor": (lambda v: v >= 0, "a number >= 0 (the backbone's lr = optimizer.lr x this)"),
    "finetune.unfreeze_at_epoch": (lambda v: v >= 0, "an epoch number >= 0"),
    "finetune.c_folds": (lambda v: v >= 2, "an integer >= 2 (inner folds that choose the probe's C)"),
    "backbone.input_size": (lambda v: v >= 16, "a size in pixels >= 16, or null for the backbone's own"),
    "performance.feature_cache.batch_size": (lambda v: v >= 1, "an integer >= 1"),
    "performance.feature_cache.augmented_views": (lambda v: v >= 0, "an integer >= 0"),
    "performance.feature_cache.shard_images": (lambda v: v >= 1, "an integer >= 1"),
    "steps": (lambda v: v >= 1, "an integer >= 1 (optimisation steps)"),
    "views": (lambda v: v >= 1, "an integer >= 1"),
    "stop_prob": (lambda v: 0 < v <= 1, "a probability in (0, 1], or null"),
    "topk": (lambda v: v >= 1, "an integer >= 1"),
    "batch_size": (lambda v: v >= 1, "an integer >= 1"),
    "num_workers": (lambda v: v >= 0, "an integer >= 0 or auto"),
    "threads": (lambda v: v >= 1, "an integer >= 1, or null for every usable core"),
    "opset": (lambda v: 13 <= v <= 23, "an ONNX opset in [13, 23], e.g. opset=18"),
    "port": (lambda v: 0 <= v <= 65535, "a TCP port in [0, 65535] (0 = any free port)"),
    "max_batch": (lambda v: v >= 1, "an integer >= 1 (images per forward pass)"),
    "max_images": (lambda v: v >= 1, "an integer >= 1 (images per request)"),
    "max_request_mb": (lambda v: v > 0, "a size in MB > 0"),
    "batch_wait_ms": (lambda v: v >= 0, "milliseconds >= 0"),
}
