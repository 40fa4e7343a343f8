"""Shared steps of the train and eval commands: build the pieces from config, test, write results."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from hydra.errors import InstantiationException
from hydra.utils import instantiate
from lightning.pytorch.loggers import Logger
from lightning.pytorch.utilities import rank_zero_only
from omegaconf import DictConfig, OmegaConf

from transferlab.checkpointing import AtomicCheckpointIO, read_checkpoint
from transferlab.data.base import ImageClassificationDataModule
from transferlab.errors import ConfigError, DataError, TransferlabError, one_line
from transferlab.loggers import finish_loggers, flat_hparams
from transferlab.models.classifier import TransferClassifier
from transferlab.redaction import redact
from transferlab.reporting import to_float_dict, write_json, write_skipped, write_test_report

log = logging.getLogger(__name__)


def container(node: Any) -> Any:
    """Plain, resolved Python containers (checkpoint-safe, picklable, loadable with weights_only=True)."""
    return OmegaConf.to_container(node, resolve=True) if isinstance(node, DictConfig) else node


def instantiate_config(node: DictConfig, **kwargs: Any) -> Any:
    """hydra.utils.instantiate, with the target's complaint about its arguments as a ConfigError naming the node."""
    try:
        return instantiate(node, **kwargs)
    except InstantiationException as exc:
        cause = exc.__cause__
        if isinstance(cause, TransferlabError):
            raise cause from None
        if isinstance(cause, (ValueError, TypeError)) or type(cause).__name__ == "MisconfigurationException":
            raise ConfigError(f"{node._get_full_key(None) or 'config'}: {one_line(cause)}") from exc
        raise


def instantiate_group(node: DictConfig | None) -> list[Any]:
    """Callbacks / loggers: every sub-node with a `_target_`, in config order."""
    return [instantiate_config(child) for child in (node or {}).values() if isinstance(child, DictConfig) and "_target_" in child]


def build_datamodule(data_cfg: dict[str, Any], preprocessing: Any) -> ImageClassificationDataModule:
    datamodule = instantiate_config(OmegaConf.create({"data": data_cfg}).data)
    datamodule.preprocessing = preprocessing
    datamodule.setup()
    return datamodule


def build_trainer(trainer_cfg: DictConfig, callbacks: list[pl.Callback], loggers: list[Logger]) -> pl.Trainer:
    """The Trainer from config; checkpoints are written atomically unless trainer.plugins says otherwise."""
    extra = {} if trainer_cfg.get("plugins") else {"plugins": [AtomicCheckpointIO()]}
    return instantiate_config(trainer_cfg, callbacks=callbacks, logger=loggers or False, **extra)


def log_run_config(loggers: list[Logger], cfg: DictConfig) -> None:
    values = redact(container(cfg))
    for lg in loggers:
        lg.log_hyperparams(flat_hparams(values) if type(lg).__name__ != "WandbLogger" else values)


def test_and_report(trainer: pl.Trainer, model: TransferClassifier, datamodule: ImageClassificationDataModule,
                    out_dir: Path, ckpt_path: str | None, extra: dict[str, Any]) -> dict[str, Any]:
    """Test (the given checkpoint, or the model as it is), then write metrics.json and the test report."""
    trainer.test(model, datamodule=datamodule, ckpt_path=ckpt_path, weights_only=True if ckpt_path else None)
    metrics = {**extra, **to_float_dict({k: v for k, v in trainer.callback_metrics.items() if k.startswith(("test/", "adv/"))})}
    if trainer.is_global_zero:
        write_json(out_dir / "metrics.json", metrics)
        write_test_report(out_dir, model.class_names, trainer.lightning_module.test_confusion_matrix, trainer.loggers)
        if datamodule.skipped:
            write_skipped(out_dir / "skipped_images.csv", datamodule.skipped)
        log.info("Results in %s: %s", out_dir, {k: v for k, v in metrics.items() if k in ("val/acc", "test/acc", "test/acc_top3")})
    finish_loggers(trainer.loggers)
    return metrics


@rank_zero_only
def announce_skipped(datamodule: ImageClassificationDataModule, out_dir: Path) -> None:
    if datamodule.skipped:
        log.warning("%d file(s) skipped; list in %s", len(datamodule.skipped), out_dir / "skipped_images.csv")


def resolve_device(name: str) -> torch.device:
    """`auto` = the first GPU when there is one; else what the user wrote (cpu, cuda, cuda:1, mps)."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def load_checkpoint(path: str | Path) -> tuple[TransferClassifier, dict[str, Any]]:
    """Rebuild a trained classifier without downloading anything: the weights come from the checkpoint."""
    ckpt = read_checkpoint(path)
    try:
        hparams = dict(ckpt["hyper_parameters"])
        hparams["class_names"], hparams["backbone"]["name"]  # noqa: B018 - what every transferlab checkpoint holds
    except (KeyError, TypeError) as exc:
        raise DataError(f"ckpt_path: {path} is not a transferlab checkpoint (no {exc} in its hyper_parameters)") from None
    hparams["backbone"] = {**hparams["backbone"], "weights": "none"}
    model = TransferClassifier(**hparams)
    model.load_state_dict(ckpt["state_dict"], strict=True)
    return model.eval(), hparams
