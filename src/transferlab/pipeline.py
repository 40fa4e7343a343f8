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

from transferlab.data.base import ImageClassificationDataModule
from transferlab.errors import DataError, TransferlabError
from transferlab.loggers import finish_loggers, flat_hparams
from transferlab.models.classifier import TransferClassifier
from transferlab.reporting import to_float_dict, write_json, write_skipped, write_test_report

log = logging.getLogger(__name__)


def container(node: Any) -> Any:
    """Plain, resolved Python containers (checkpoint-safe, picklable, loadable with weights_only=True)."""
    return OmegaConf.to_container(node, resolve=True) if isinstance(node, DictConfig) else node


def instantiate_group(node: DictConfig | None) -> list[Any]:
    """Callbacks / loggers: every sub-node with a `_target_`, in config order."""
    return [instantiate(child) for child in (node or {}).values() if isinstance(child, DictConfig) and "_target_" in child]


def build_datamodule(data_cfg: dict[str, Any], preprocessing: Any) -> ImageClassificationDataModule:
    try:
        datamodule = instantiate(data_cfg)
    except InstantiationException as exc:  # our own one-line errors, not Hydra's wrapper around them
        if isinstance(exc.__cause__, TransferlabError):
            raise exc.__cause__ from None
        raise
    datamodule.preprocessing = preprocessing
    datamodule.setup()
    return datamodule


def build_trainer(trainer_cfg: DictConfig, callbacks: list[pl.Callback], loggers: list[Logger]) -> pl.Trainer:
    return instantiate(trainer_cfg, callbacks=callbacks, logger=loggers or False)


def log_run_config(loggers: list[Logger], cfg: DictConfig) -> None:
    values = container(cfg)
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
    file = Path(path).expanduser()
    if not file.is_file():
        raise DataError(f"ckpt_path: {file} is not a file; give the path of a best.ckpt / last.ckpt")
    try:
        ckpt = torch.load(file, map_location="cpu", weights_only=True)
        hparams = dict(ckpt["hyper_parameters"])
    except Exception as exc:  # noqa: BLE001
        raise DataError(f"ckpt_path: {file} is not a transferlab checkpoint ({type(exc).__name__}: {str(exc).splitlines()[0]})") from exc
    hparams["backbone"] = {**hparams["backbone"], "weights": "none"}
    model = TransferClassifier(**hparams)
    model.load_state_dict(ckpt["state_dict"], strict=True)
    return model.eval(), hparams
