"""Building the pieces of a run from its config: datamodule, model, Trainer, callbacks and loggers (train and eval)."""

from __future__ import annotations

import logging
import warnings
from typing import Any

import lightning.pytorch as pl
from hydra.errors import InstantiationException
from hydra.utils import instantiate
from lightning.pytorch.callbacks import EarlyStopping, ModelCheckpoint
from lightning.pytorch.loggers import Logger
from omegaconf import DictConfig, OmegaConf

from transferlab.callbacks.ema import WeightEMA
from transferlab.callbacks.feature_cache import FeatureCache
from transferlab.callbacks.optuna_pruning import pruning_callbacks
from transferlab.callbacks.unfreeze import GradualUnfreeze
from transferlab.core.errors import ConfigError, TransferlabError, one_line
from transferlab.core.redaction import redact
from transferlab.data.base import ImageClassificationDataModule
from transferlab.data.labels import task_metric
from transferlab.models.classifier import TransferClassifier
from transferlab.training.checkpointing import AtomicCheckpointIO
from transferlab.training.loggers import flat_hparams
from transferlab.training.performance import apply_performance
from transferlab.training.slurm import slurm_plugins


def container(node: Any) -> Any:
    """Plain, resolved Python containers (checkpoint-safe, picklable, loadable with weights_only=True)."""
    return OmegaConf.to_container(node, resolve=True) if isinstance(node, DictConfig) else node


def instantiate_config(node: DictConfig, key: str, **kwargs: Any) -> Any:
    """hydra.utils.instantiate, with the target's complaint about its arguments as a ConfigError naming `key`."""
    try:
        return instantiate(node, **kwargs)
    except InstantiationException as exc:
        cause = exc.__cause__
        if isinstance(cause, TransferlabError):
            raise cause from None
        if cause is not None and (isinstance(cause, (ValueError, TypeError)) or type(cause).__name__ == "MisconfigurationException"):
            raise ConfigError(f"{key}: {one_line(cause)}") from exc
        raise


def instantiate_group(node: DictConfig | None, key: str) -> list[Any]:
    """Callbacks / loggers: every sub-node with a `_target_`, in config order."""
    return [
        instantiate_config(child, f"{key}.{name!s}") for name, child in (node or {}).items() if isinstance(child, DictConfig) and "_target_" in child
    ]


def build_datamodule(data_cfg: dict[str, Any], preprocessing: Any) -> ImageClassificationDataModule:
    datamodule = instantiate_config(OmegaConf.create(data_cfg), "data")
    datamodule.preprocessing = preprocessing
    datamodule.setup()
    return datamodule


class _NoAdvertisements(logging.Filter):
    """Lightning 2.6 logs "💡 Tip: ... litlogger / litmodels" (cloud-service adverts) on every run; users asked not to."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("💡 Tip:")


def silence_advertisements() -> None:
    """Also Lightning's "`srun` is available but not used ... prepend srun" on every run of a machine with SLURM: here
    jobs reach SLURM through hydra/launcher=slurm (submitit runs them under srun), so that advice only misleads."""
    from lightning.fabric.utilities.warnings import PossibleUserWarning

    warnings.filterwarnings("ignore", message="The `srun` command is available on your system but is not used", category=PossibleUserWarning)
    for name in ("lightning.pytorch.utilities.rank_zero", "lightning.fabric.utilities.rank_zero"):
        logger = logging.getLogger(name)
        if not any(isinstance(f, _NoAdvertisements) for f in logger.filters):
            logger.addFilter(_NoAdvertisements())


def build_trainer(trainer_cfg: DictConfig, callbacks: list[pl.Callback], loggers: list[Logger]) -> pl.Trainer:
    """The Trainer from config; checkpoints are written atomically unless trainer.plugins says otherwise. In a SLURM
    task Lightning gets SLURMEnvironment(auto_requeue=False): submitit owns the requeue signal (training.slurm)."""
    silence_advertisements()
    extra = {} if trainer_cfg.get("plugins") else {"plugins": [AtomicCheckpointIO(), *slurm_plugins()]}
    return instantiate_config(trainer_cfg, "trainer", callbacks=callbacks, logger=loggers or False, **extra)


def log_run_config(loggers: list[Logger], cfg: DictConfig) -> None:
    values = redact(container(cfg))
    for lg in loggers:
        lg.log_hyperparams(flat_hparams(values) if type(lg).__name__ != "WandbLogger" else values)


def new_model(cfg: DictConfig, backbone: Any, datamodule: ImageClassificationDataModule) -> TransferClassifier:
    """The classifier of a run; its hyper-parameters go into every checkpoint, credentials masked."""
    return TransferClassifier(
        backbone=redact({**container(cfg.backbone), **({"name": backbone.name} if getattr(backbone, "tag", None) else {})}),  # the weight tag
        class_names=datamodule.class_names,
        finetune=redact(container(cfg.finetune)),
        optimizer=redact(container(cfg.optimizer)),
        scheduler=redact(container(cfg.scheduler)),
        run=redact({"data": container(cfg.data), "seed": cfg.seed, "precision": str(cfg.trainer.get("precision"))}),
        loss_weights=datamodule.loss_weights(),
        prebuilt_backbone=backbone,
        task="multilabel" if datamodule.multilabel else "single",
    )


def fit_callbacks(
    cfg: DictConfig, model: TransferClassifier, datamodule: Any, precision_note: str, cache: Any, prune: bool, epochs_train_head: bool
) -> list[pl.Callback]:
    """The config's callbacks, the speed settings' (the feature cache), Optuna's pruning in a trial, weight EMA
    and gradual unfreezing when the head trains by epochs. Test-time augmentation needs the test images' pixels,
    so the feature cache leaves the test split to them."""
    callbacks = instantiate_group(cfg.callbacks, "callbacks") + apply_performance(cfg, model, datamodule, precision_note, cache)
    for callback in callbacks:  # a multi-label run selects and stops on val/map (data.labels.task_metric)
        if isinstance(callback, (ModelCheckpoint, EarlyStopping)) and callback.monitor:
            callback.monitor = task_metric(callback.monitor, datamodule.multilabel)
    if prune:
        callbacks += pruning_callbacks()  # a trial of an Optuna sweep
    model.tta = str(cfg.get("tta") or "none")
    if model.tta != "none":
        for callback in callbacks:
            if isinstance(callback, FeatureCache):
                callback.skip_splits.add("test")
    if cfg.finetune.get("ema_decay") and epochs_train_head:
        callbacks.append(WeightEMA(float(cfg.finetune.ema_decay)))
    if cfg.finetune.mode == "gradual":
        callbacks.append(GradualUnfreeze(cfg.finetune.unfreeze_at_epoch, cfg.finetune.backbone_lr_factor))
    return callbacks
