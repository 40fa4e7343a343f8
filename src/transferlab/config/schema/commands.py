"""Every command's config: which keys exist, the type each holds and the range it must lie in. Never a default value.

The node types the commands share (group options, paths, `_target_` nodes) are in config.schema.nodes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Any, Literal, Optional, Union

from transferlab.config.schema.nodes import (
    AuditDuplicates,
    Backbone,
    Count,
    CrossValidation,
    DataNode,
    EvalData,
    Finetune,
    Interpret,
    OptimizerNode,
    Paths,
    Performance,
    Precision,
    Seed,
    Target,
    Targets,
    Threads,
    TrainerNode,
    Tta,
    Tune,
    Workers,
)
from transferlab.core.bounds import PROBABILITY, Bounds
from transferlab.core.settings import IdealSettings

# predict / serve: the training precisions (runtime=torch) and int8 (runtime=onnx: a package's model.int8.onnx)
RuntimePrecision = Union[Precision, Literal["int8"]]
ExportFormat = Literal["onnx", "torchscript", "executorch", "all"]  # all: onnx + torchscript


@dataclass
class Train:
    task_name: str
    tags: list[str]
    seed: Seed
    ckpt_path: Optional[str]
    optimized_metric: Optional[str]
    calibration: Literal["temperature", "none"]
    threshold: Union[Literal["f1"], Annotated[float, Bounds(gt=0, lt=1, noun="a probability", example="0.5")]]  # multi-label decisions
    tta: Tta
    cv: CrossValidation
    tune: Tune
    data: DataNode
    backbone: Backbone
    finetune: Finetune
    trainer: TrainerNode  # before optimizer and scheduler, whose values refer to it (T_max: ${trainer.max_epochs})
    optimizer: OptimizerNode
    scheduler: Optional[Target]  # {} = a constant learning rate
    performance: Performance
    logger: Targets
    callbacks: Targets
    interpret: Interpret
    paths: Paths


@dataclass
class Eval:
    task_name: str
    tags: list[str]
    ckpt_path: str
    tta: Tta
    data: EvalData
    trainer: TrainerNode
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
    topk: Count
    tta: Tta
    runtime: Literal["torch", "onnx"]  # deploy.runtime
    precision: RuntimePrecision
    channels_last: Union[bool, Literal["auto"]]
    threads: Threads
    batch_size: Count
    num_workers: Workers
    device: str
    paths: Paths


@dataclass
class Export:
    task_name: str
    ckpt_path: str
    output: str
    format: Union[ExportFormat, list[ExportFormat]]  # the members of a list: checked by deploy.export.wanted_formats
    opset: Annotated[int, Bounds(ge=13, le=23, noun="an ONNX opset", example="18")]
    quantize: Literal["none", "int8"]
    min_int8_agreement: Annotated[float, Bounds(ge=0, le=1, noun="a fraction of images", example="0.98")]
    int8_calibration_images: Annotated[int, Bounds(ge=1, note="training images", example="64")]
    data_root: Optional[str]
    paths: Paths


@dataclass
class Serve:
    task_name: str
    ckpt_path: str
    host: str
    port: Annotated[int, Bounds(ge=0, le=65535, noun="a TCP port", note="0: any free port")]
    runtime: Literal["torch", "onnx"]
    precision: RuntimePrecision
    channels_last: Union[bool, Literal["auto"]]
    threads: Threads
    tta: Tta
    device: str
    topk: Count
    max_batch: Annotated[int, Bounds(ge=1, note="images per forward pass")]  # concurrent requests' images batched together
    batch_wait_ms: Annotated[float, Bounds(ge=0, noun="milliseconds")]
    max_images: Annotated[int, Bounds(ge=1, note="images per request")]
    max_request_mb: Annotated[float, Bounds(gt=0, noun="a size in MB")]
    upload_timeout_s: Annotated[float, Bounds(gt=0, noun="seconds")]
    max_image_pixels: Annotated[int, Bounds(ge=1, noun="a number of pixels")]
    max_request_pixels: Annotated[int, Bounds(ge=1, noun="a number of pixels")]
    decode_workers: Annotated[int, Bounds(ge=1, note="images decoded at once")]
    queue_size: Annotated[int, Bounds(ge=1, note="images admitted and not answered yet")]
    api_key: Optional[str]
    api_keys_file: Optional[str]
    cors_origins: list[str]
    ssl_certfile: Optional[str]
    ssl_keyfile: Optional[str]
    rate_limit: Optional[Annotated[float, Bounds(gt=0, note="requests per minute per client address")]]
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
    steps: Annotated[int, Bounds(ge=1, note="optimisation steps")]
    step_size: Optional[Union[str, float, int]]
    random_start: bool
    stop_prob: Optional[Annotated[float, PROBABILITY]]
    transfer_backbone: Optional[str]
    amplify: Optional[float]
    device: str
    seed: Seed
    backbone: Backbone
    paths: Paths


@dataclass
class Explain:
    task_name: str
    ckpt_path: Optional[str]
    input: str
    target: Optional[Union[str, int]]
    method: Literal["auto", "gradcam", "gradcam++", "hirescam", "scorecam"]
    target_layer: Optional[str]
    image_weight: float
    batch_size: Count
    device: str
    backbone: Backbone
    paths: Paths


@dataclass
class Audit:
    task_name: str
    seed: Seed
    folds: int
    device: str
    precision: str
    feature_cache: bool
    duplicates: AuditDuplicates
    outlier_z: float
    write_exclude: list[str]  # label_issues | duplicates | outliers
    max_rows: int
    splits: Optional[str]  # a run's splits.csv, run folder, checkpoint or package
    data: DataNode
    backbone: Backbone
    paths: Paths


@dataclass
class Rank:
    task_name: str
    seed: Seed
    backbones: list[Union[str, dict[str, Any]]]  # backbone config names or mappings of backbone keys
    folds: Annotated[int, Bounds(ge=2, note="outer folds of the probe's cross-validated accuracy")]
    c_folds: Annotated[int, Bounds(ge=2, note="inner folds choosing the probe's C")]
    alpha: Annotated[float, Bounds(gt=0, lt=1, noun="a significance level", example="0.05")]
    device: str
    precision: Precision
    data: DataNode
    performance: Performance
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
OPEN_NODES: frozenset[type] = frozenset({Train, Eval, Predict, Visualize, Attack, Audit, Explain, Export, Serve, Rank, EvalData})

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
    "rank": Rank,
    "report": Report,
}

# Values that are ours, not the instantiated class's, and are resolved before the class sees them:
# (class path, parameter) -> accepted values besides what its annotation allows.
OUR_VALUES: dict[tuple[str, str], tuple[object, ...]] = {
    ("lightning.pytorch.Trainer", "precision"): ("auto",),  # training.performance.resolve_precision
    ("lightning.pytorch.loggers.wandb.WandbLogger", "offline"): ("auto",),  # training.loggers.resolve_logger_config
}
