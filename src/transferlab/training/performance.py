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

from transferlab.callbacks.distill_cache import DistillCache
from transferlab.callbacks.feature_cache import FeatureCache
from transferlab.core.errors import ConfigError
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
        teacher = f", teacher logits of {cache.teacher_path}" if isinstance(cache, DistillCache) else ""
        notes.append(f"feature cache on ({cache.root or 'memory'}, {cache.views} augmented views{teacher})")
        if not cache.views and augments(datamodule.augment):
            notes.append(
                "data.augment unused with cached eval-transform features (performance.feature_cache.augmented_views=K caches K augmented views)"
            )
    elif cfg.finetune.mode in ("frozen", "distill"):
        notes.append("feature cache off")
    log.info("Performance: %s", ", ".join(notes))
    return callbacks


def feature_cache(cfg: DictConfig, settings: Any) -> Optional[FeatureCache]:
    """The run's feature cache (frozen backbones); finetune=distill's also caches the teacher's logits (callbacks.distill_cache)."""
    if cfg.finetune.mode == "distill":
        check_distill(cfg, settings)
    if cfg.finetune.mode not in ("frozen", "distill") or not settings.enabled:
        return None
    values = dict(
        storage=settings.storage,
        cache_dir=cfg.paths.cache_dir,
        augmented_views=int(settings.augmented_views),
        seed=int(cfg.seed),
        batch_size=settings.batch_size,
        shard_images=int(settings.shard_images),
    )
    if cfg.finetune.mode == "distill":
        return DistillCache(teacher=str(cfg.finetune.teacher), **values)  # config.validation checked that it exists
    return FeatureCache(**values)


def augments(augment: Any) -> bool:
    """Whether data.augment changes the training images at all (random crops, flips, jitter, a policy)."""
    found = dict(augment or {})
    return float(found.get("scale_min", 1.0)) < 1.0 or any(v and v != "none" for k, v in found.items() if k != "scale_min")


def check_distill(cfg: DictConfig, settings: Any) -> None:
    """finetune=distill's rules (a teacher file that is not there: config.validation): one line, exit 2, before any
    training (training.fit and cross_validation call it first). They are not in config.validation because a teacher
    is a value only the user gives: every composed config of conf/ (tests/test_config_schema.py) leaves it null.
    The student is frozen and its head trains by epochs on cached features: what the cached teacher logits pair with."""
    finetune, task = cfg.finetune, str(cfg.data.get("task"))
    if not finetune.get("teacher"):  # a missing file: config.validation, before any work
        raise ConfigError("finetune.teacher: finetune=distill needs a teacher: finetune.teacher=<a checkpoint or a model package folder>")
    if finetune.get("student") != "frozen":
        raise ConfigError(
            f"finetune.student={finetune.get('student')}: not supported; finetune=distill trains a frozen student's head (student=frozen)"
        )
    if finetune.get("head_solver") != "sgd":
        raise ConfigError(f"finetune.head_solver={finetune.get('head_solver')}: finetune=distill trains the head by epochs on soft labels: use sgd")
    if not settings.enabled:
        raise ConfigError("performance.feature_cache.enabled=false: finetune=distill trains on cached student features and teacher logits")
    if task == "multilabel":
        raise ConfigError("data.task=multilabel: finetune=distill is single-label only (softmax knowledge distillation)")
    for key in ("temperature", "kd_weight", "ce_weight"):  # their ranges: the schema (config.schema.nodes.Finetune)
        if finetune.get(key) is None:
            raise ConfigError(f"finetune.{key}: finetune=distill needs a number here, got null")
    if not finetune.kd_weight and not finetune.ce_weight:
        raise ConfigError("finetune.kd_weight, finetune.ce_weight: both 0 leaves no loss to train")
