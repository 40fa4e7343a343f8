"""The `performance` config group and the `auto` values elsewhere, turned into settings for this run.

One line in the run log says what was chosen and why, e.g.
`Performance: precision bf16-mixed (auto: CPU has avx512_bf16), channels_last on (auto: convolutional
backbone), compile off, data.num_workers 1 (auto: 2 cores), feature cache on (disk, 0 augmented views)`.
"""

from __future__ import annotations

import logging
from typing import Any, Optional

import lightning.pytorch as pl
from omegaconf import DictConfig, open_dict

from transferlab.callbacks.feature_cache import FeatureCache
from transferlab.core.hardware import choose_flag, choose_precision, detect, on_gpu
from transferlab.models.backbone import is_convolutional
from transferlab.models.classifier import TransferClassifier
from transferlab.models.pooling import layout_of

log = logging.getLogger(__name__)


def resolve_precision(cfg: DictConfig) -> str:
    """Replace trainer.precision=auto by the hardware's fastest choice (before the config is validated and saved)."""
    requested = cfg.trainer.get("precision")
    chosen = choose_precision(requested, cfg.trainer.get("accelerator"))
    if str(requested) == "auto":
        hw = detect()
        why = (
            f"GPU {hw.gpu}"
            if on_gpu(cfg.trainer.get("accelerator"))
            else "CPU has " + (", ".join(f for f in hw.flags if "bf16" in f) or "no bf16 instructions")
        )
        with open_dict(cfg):
            cfg.trainer.precision = chosen
        return f"precision {chosen} (auto: {why})"
    return f"precision {chosen}"


def layout_words(body: Any, conv: bool) -> str:
    """Why channels_last is on or off: a token model (ViT, Swin) keeps its tokens in a layout NHWC does not help."""
    if layout_of(body).kind != "conv":
        return f"a token model ({type(body).__name__}): NHWC does not speed up attention"
    return "convolutional backbone" if conv else "no convolutions in the backbone"


def apply_performance(
    cfg: DictConfig, model: TransferClassifier, datamodule: Any, precision_note: str, cache: Optional[FeatureCache] = None
) -> list[pl.Callback]:
    """Configure the model's layout/compilation, return the callbacks that speed the run up, log the choices.
    `cache`: a feature cache to reuse (the folds of a cross-validation share one, memory storage too)."""
    perf = cfg.performance
    conv = is_convolutional(model.backbone)
    channels_last = choose_flag("performance.channels_last", perf.channels_last, auto=conv)
    compile_backbone = choose_flag("performance.compile", perf.compile, auto=False)
    model.configure_runtime(channels_last=channels_last, compile=compile_backbone)
    notes = [
        precision_note,
        f"channels_last {'on' if channels_last else 'off'}"
        + (f" (auto: {layout_words(model.backbone.body, conv)})" if str(perf.channels_last) == "auto" else ""),
        f"compile {'on' if compile_backbone else 'off'}",
    ]
    workers = datamodule.workers()
    notes.append(f"data.num_workers {workers}" + (f" (auto: {detect().cores} cores)" if datamodule.num_workers == "auto" else ""))
    if getattr(datamodule, "decode", "cpu") == "gpu":
        notes.append("data.decode gpu (JPEGs decoded on the training device)")
    callbacks: list[pl.Callback] = []
    cache = cache or feature_cache(cfg, perf.feature_cache)
    if cache is not None:
        callbacks.append(cache)
        notes.append(f"feature cache on ({cache.root or 'memory'}, {cache.views} augmented views)")
        if not cache.views and augments(datamodule.augment):
            notes.append(
                "data.augment unused with cached eval-transform features (performance.feature_cache.augmented_views=K caches K augmented views)"
            )
    elif cfg.finetune.mode == "frozen":
        notes.append("feature cache off")
    log.info("Performance: %s", ", ".join(notes))
    return callbacks


def feature_cache(cfg: DictConfig, settings: Any) -> Optional[FeatureCache]:
    if cfg.finetune.mode != "frozen" or not settings.enabled:
        return None
    return FeatureCache(
        storage=settings.storage,
        cache_dir=cfg.paths.cache_dir,
        augmented_views=int(settings.augmented_views),
        seed=int(cfg.seed),
        batch_size=settings.batch_size,
        shard_images=int(settings.shard_images),
    )


def augments(augment: Any) -> bool:
    """Whether data.augment changes the training images at all (random crops, flips, jitter, a policy)."""
    found = dict(augment or {})
    return float(found.get("scale_min", 1.0)) < 1.0 or any(v and v != "none" for k, v in found.items() if k != "scale_min")
