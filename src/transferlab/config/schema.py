"""The shape of every command's config: which keys exist and what type each holds. Never a default value.

Default values live in one place, the YAML under conf/ (each file documents its keys); these schemas only say
what a key may hold, and `config.validation` checks a composed config against them before a command does any
work. A field may be left out of the YAML only when its type admits None. Nodes that Hydra instantiates
(datamodule, optimizer, scheduler, Trainer, loggers, callbacks) are `Target`s: they are checked against the
signature of the class they name, so upgrading Lightning or torch never needs an edit here.
tests/test_config_schema.py composes every command and every option and fails when YAML and schema disagree.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Optional, Union

from transferlab.insight.ideal import IdealSettings


class Target(dict):
    """A node with `_target_`: its keys and values are checked against the signature of what it instantiates."""


class Targets(dict):
    """A node of named `Target`s (loggers, callbacks); a value of null switches one off."""


@dataclass
class Backbone:
    name: str  # a name in one of the registered sources (transferlab.models.sources)
    source: str  # auto or a registered source name
    weights: str  # imagenet | none | bundled | a state_dict / safetensors path
    input_size: Optional[int]
    crop_pct: Optional[float]  # replaces the pretrained centre-crop fraction
    members: Optional[list[str]]  # name=ensemble only


@dataclass
class Finetune:
    mode: Literal["frozen", "full", "gradual"]
    head_dropout: float
    backbone_lr_factor: float
    unfreeze_at_epoch: Optional[int]
    head_solver: Optional[Literal["sgd", "lbfgs"]]  # frozen only
    select_c: Optional[Literal["cv", "val"]]  # head_solver=lbfgs
    c_folds: Optional[int]
    standardize: Optional[bool]
    label_smoothing: Optional[float]  # the fine-tuning recipe (full / gradual)
    mixup: Optional[float]
    cutmix: Optional[float]
    ema_decay: Optional[float]
    layer_decay: Optional[float]


@dataclass
class FeatureCache:
    enabled: bool
    storage: Literal["disk", "memory"]
    augmented_views: int
    batch_size: Union[int, Literal["auto"]]
    shard_images: int


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
    folds: Optional[int]
    refit: bool


@dataclass
class Tune:
    lr_find: bool


@dataclass
class Interpret:
    enabled: bool
    top_losses: int
    cam_method: Literal["gradcam", "gradcam++", "scorecam"]
    most_confused: int
    embedding: Literal["tsne", "pca", "none"]
    max_points: int


@dataclass
class Train:
    task_name: str
    tags: list[str]
    seed: int
    ckpt_path: Optional[str]
    optimized_metric: Optional[str]
    calibration: Literal["temperature", "none"]
    tta: Literal["none", "hflip", "five_crop"]  # test-time augmentation (models.tta)
    cv: CrossValidation
    tune: Tune
    data: Target
    backbone: Backbone
    finetune: Finetune
    trainer: Target  # before optimizer and scheduler, whose values refer to it (T_max: ${trainer.max_epochs})
    optimizer: Target
    scheduler: Optional[Target]  # {} = a constant learning rate
    performance: Performance
    logger: Targets
    callbacks: Targets
    interpret: Interpret
    paths: Paths


@dataclass
class EvalData:
    """Keys given here replace the ones stored in the checkpoint (any key of the dataset's own config)."""

    root: Optional[str]
    batch_size: Optional[int]
    num_workers: Optional[Union[int, Literal["auto"]]]


@dataclass
class Eval:
    task_name: str
    tags: list[str]
    ckpt_path: str
    tta: Literal["none", "hflip", "five_crop"]  # test-time augmentation (models.tta)
    data: EvalData
    trainer: Target
    logger: Targets
    callbacks: Optional[Targets]
    interpret: Interpret
    paths: Paths


@dataclass
class Predict:
    task_name: str
    ckpt_path: str  # a checkpoint or a model package folder
    input: str
    output: str
    topk: int
    tta: Literal["none", "hflip", "five_crop"]  # test-time augmentation (models.tta)
    runtime: Literal["torch", "onnx"]  # deploy.runtime
    precision: Literal["auto", "32-true", "bf16-mixed", "16-mixed"]
    channels_last: Union[bool, Literal["auto"]]
    threads: Optional[int]
    batch_size: int
    num_workers: Union[int, Literal["auto"]]
    device: str
    paths: Paths


@dataclass
class Export:
    task_name: str
    ckpt_path: str
    output: str
    format: Literal["onnx", "torchscript", "all"]
    opset: int
    paths: Paths


@dataclass
class Serve:
    task_name: str
    ckpt_path: str
    host: str
    port: int
    runtime: Literal["torch", "onnx"]
    precision: Literal["auto", "32-true", "bf16-mixed", "16-mixed"]
    channels_last: Union[bool, Literal["auto"]]
    threads: Optional[int]
    tta: Literal["none", "hflip", "five_crop"]
    device: str
    topk: int
    max_batch: int  # concurrent requests' images batched into one forward pass
    batch_wait_ms: float
    max_images: int
    max_request_mb: float
    paths: Paths


@dataclass
class Visualize(IdealSettings):
    task_name: str
    ckpt_path: Optional[str]
    target: Union[str, int]
    heldout_backbone: Optional[str]
    device: str
    backbone: Backbone
    paths: Paths


@dataclass
class Attack:
    task_name: str
    ckpt_path: Optional[str]
    input: str
    target: Union[str, int]
    eps: Union[str, float, int]
    crop: Optional[list[int]]
    steps: int
    step_size: Optional[Union[str, float, int]]
    random_start: bool
    stop_prob: Optional[float]
    transfer_backbone: Optional[str]
    amplify: Optional[float]
    device: str
    seed: int
    backbone: Backbone
    paths: Paths


@dataclass
class Explain:
    task_name: str
    ckpt_path: Optional[str]
    input: str
    target: Optional[Union[str, int]]
    method: Literal["gradcam", "gradcam++", "scorecam"]
    target_layer: Optional[str]
    image_weight: float
    batch_size: int
    device: str
    backbone: Backbone
    paths: Paths


@dataclass
class AuditDuplicates:
    threshold: float  # cosine similarity of pooled features
    hash_distance: int  # perceptual-hash bits (of 64)
    hash_min_similarity: float
    neighbours: int


@dataclass
class Audit:
    task_name: str
    seed: int
    folds: int
    device: str
    precision: str
    feature_cache: bool
    duplicates: AuditDuplicates
    outlier_z: float
    write_exclude: list[str]  # label_issues | duplicates | outliers
    max_rows: int
    splits: Optional[str]  # a run's splits.csv, run folder, checkpoint or package
    data: Target
    backbone: Backbone
    paths: Paths


@dataclass
class Report:
    """transferlab-report's arguments (argparse, not Hydra), checked the same way."""

    sweep_dir: str
    metric: Optional[str]
    direction: Optional[Literal["maximize", "minimize"]]
    no_html: bool


# Top-level keys beyond the schema are allowed (`+note=...` on the command line: Hydra already insists on the +);
# inside a group node every key must be known, so a mistyped `+data.batchsize` is caught.
OPEN_NODES: frozenset[type] = frozenset({Train, Eval, Predict, Visualize, Attack, Audit, Explain, Export, Serve, EvalData})

COMMANDS: dict[str, type] = {
    "train": Train,
    "eval": Eval,
    "predict": Predict,
    "visualize": Visualize,
    "attack": Attack,
    "audit": Audit,
    "explain": Explain,
    "export": Export,
    "serve": Serve,
    "report": Report,
}

# Values that are ours, not the instantiated class's, and are resolved before the class sees them:
# (class path, parameter) -> accepted values besides what its annotation allows.
OUR_VALUES: dict[tuple[str, str], tuple[object, ...]] = {
    ("lightning.pytorch.Trainer", "precision"): ("auto",),  # training.performance.resolve_precision
    ("lightning.pytorch.loggers.wandb.WandbLogger", "offline"): ("auto",),  # training.loggers.resolve_logger_config
}
