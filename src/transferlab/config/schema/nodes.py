"""The nodes commands share (group options, paths, the `_target_` nodes) with their types and declared ranges."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Any, Literal, Optional, Union

from transferlab.core.bounds import COUNT, SEED, Bounds, Params


class Target(dict):
    """A node with `_target_`: its keys and values are checked against the signature of what it instantiates."""


class Targets(dict):
    """A node of named `Target`s (loggers, callbacks); a value of null switches one off."""


Count = Annotated[int, COUNT]
Seed = Annotated[int, SEED]
Threads = Optional[Annotated[int, Bounds(ge=1, note="null: every usable core")]]
Workers = Union[Annotated[int, Bounds(ge=0)], Literal["auto"]]
Tta = Literal["none", "hflip", "five_crop"]  # test-time augmentation (models.tta)
Precision = Literal["auto", "32-true", "bf16-mixed", "16-mixed"]

# `_target_` nodes: the types come from the class's signature, the ranges of our keys are declared here.
DataNode = Annotated[Target, Params(batch_size=COUNT, shots=Bounds(ge=1, noun="a number of training images per class"))]
OptimizerNode = Annotated[
    Target,
    Params(lr=Bounds(gt=0, example="1e-3"), weight_decay=Bounds(ge=0), momentum=Bounds(ge=0, lt=1)),
]
TrainerNode = Annotated[
    Target,
    Params(
        max_epochs=Bounds(ge=1, also=(-1,), note="-1: no limit"),
        accumulate_grad_batches=COUNT,
        gradient_clip_val=Bounds(ge=0),
    ),
]


@dataclass
class Backbone:
    name: str  # a name in one of the registered sources (transferlab.models.sources)
    source: str  # auto or a registered source name
    weights: str  # pretrained (= imagenet) | none | bundled | a state_dict / safetensors path
    input_size: Optional[Annotated[int, Bounds(ge=16, noun="a size in pixels", note="null: the backbone's own")]]
    crop_pct: Optional[float]  # replaces the pretrained centre-crop fraction
    members: Optional[list[str]]  # name=ensemble only
    pool: Optional[Literal["auto", "cls", "mean", "cls_mean", "avg"]]  # how features are pooled (models.pooling); null = auto
    model_args: Optional[dict[str, Any]]  # keyword arguments of timm.create_model (img_size, patch_size, depth, reg_tokens, ...)


@dataclass
class Lora:
    r: Annotated[int, Bounds(ge=1, noun="a rank")]
    alpha: Annotated[float, Bounds(gt=0)]
    dropout: Annotated[float, Bounds(ge=0, lt=1, noun="a probability")]
    target_modules: Union[Literal["auto"], list[str], str]  # auto = per family (models.lora); names, suffixes or a regex


@dataclass
class Finetune:
    mode: Literal["frozen", "full", "gradual", "lora", "distill"]
    head_dropout: Annotated[float, Bounds(ge=0, lt=1, noun="a probability")]
    backbone_lr_factor: Annotated[float, Bounds(ge=0, note="the backbone's lr = optimizer.lr x this")]
    unfreeze_at_epoch: Optional[Annotated[int, Bounds(ge=0, noun="an epoch number")]]
    head_solver: Optional[Literal["sgd", "lbfgs", "knn", "prototype"]]  # frozen only
    select_c: Optional[Literal["cv", "val"]]  # head_solver=lbfgs
    c_folds: Optional[Annotated[int, Bounds(ge=2, note="inner folds that choose the probe's C")]]
    standardize: Optional[bool]
    label_smoothing: Optional[float]  # the fine-tuning recipe (full / gradual)
    mixup: Optional[float]
    cutmix: Optional[float]
    ema_decay: Optional[float]
    layer_decay: Optional[float]
    lora: Optional[Lora]  # mode=lora (finetune=lora)
    loss: Optional[Literal["auto", "ce", "bce", "asl"]]  # models.tasks: auto = ce (single-label) | bce (multi-label)
    asl_gamma_neg: Optional[Annotated[float, Bounds(ge=0)]]
    asl_gamma_pos: Optional[Annotated[float, Bounds(ge=0)]]
    asl_clip: Optional[Annotated[float, Bounds(ge=0, lt=1)]]
    teacher: Optional[str]  # mode=distill: a checkpoint or model package (callbacks.distill_cache)
    student: Optional[Literal["frozen", "full"]]  # mode=distill: how the student trains (frozen only, so far: config.validation)
    temperature: Optional[Annotated[float, Bounds(gt=0, note="the teacher's and student's logits are divided by it")]]  # mode=distill
    kd_weight: Optional[Annotated[float, Bounds(ge=0)]]  # mode=distill: the soft term's weight
    ce_weight: Optional[Annotated[float, Bounds(ge=0)]]  # mode=distill: the labels' weight


@dataclass
class FeatureCache:
    enabled: bool
    storage: Literal["disk", "memory"]
    augmented_views: Annotated[int, Bounds(ge=0)]
    batch_size: Union[Count, Literal["auto"]]
    shard_images: Count


@dataclass
class Performance:
    channels_last: Union[bool, Literal["auto"]]
    compile: Union[bool, Literal["auto"]]
    feature_cache: FeatureCache


@dataclass
class Paths:
    data_dir: str
    cache_dir: Optional[str]
    log_dir: str
    output_dir: str


@dataclass
class CrossValidation:
    folds: Optional[Annotated[int, Bounds(ge=2, note="folds; null: one split", example="5")]]
    refit: bool


@dataclass
class Tune:
    lr_find: bool


@dataclass
class Interpret:
    enabled: bool
    top_losses: int
    cam_method: Literal["auto", "gradcam", "gradcam++", "hirescam", "scorecam"]
    most_confused: int
    embedding: Literal["tsne", "pca", "none"]
    max_points: int


@dataclass
class EvalData:
    """Keys given here replace the ones stored in the checkpoint (any key of the dataset's own config)."""

    root: Optional[str]
    batch_size: Optional[Count]
    num_workers: Optional[Workers]


@dataclass
class AuditDuplicates:
    threshold: float  # cosine similarity of pooled features
    hash_distance: int  # perceptual-hash bits (of 64)
    hash_min_similarity: float
    neighbours: int
