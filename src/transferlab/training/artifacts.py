"""Files a run leaves behind: resolved config, metrics.json, per-class accuracy, confusion matrix, skip list."""

from __future__ import annotations

import csv
import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.loggers import Logger
from lightning.pytorch.utilities import rank_zero_only
from omegaconf import DictConfig, OmegaConf
from rich.console import Console
from rich.syntax import Syntax
from rich.tree import Tree

from transferlab.core.context import in_sweep
from transferlab.core.files import to_float_dict, write_json
from transferlab.core.plotting import log_images, pyplot, save_figure
from transferlab.core.redaction import redact
from transferlab.data.base import ImageClassificationDataModule
from transferlab.models.classifier import TransferClassifier, as_classifier
from transferlab.training.loggers import finish_loggers

log = logging.getLogger(__name__)


def print_config_tree(cfg: DictConfig, save_to: Path | None = None) -> None:
    """Show the resolved config group by group, and save it as <run>/config.yaml.

    Jobs of a sweep only save it: the sweep's log shows each job's overrides, not 20 full trees.
    """
    values = redact(OmegaConf.to_container(cfg, resolve=True))  # credentials never reach the screen or the file
    if not in_sweep():
        tree = Tree("config", guide_style="dim")
        for key, value in values.items():
            text = OmegaConf.to_yaml(value) if isinstance(value, (dict, list)) else str(value)
            tree.add(f"[bold]{key}").add(Syntax(text, "yaml", theme="ansi_dark"))
        Console(stderr=False).print(tree)
    if save_to is not None:
        save_to.parent.mkdir(parents=True, exist_ok=True)
        save_to.write_text(OmegaConf.to_yaml(values))


def write_skipped(path: Path, skipped: Mapping[str, str]) -> None:
    """<run>/skipped_images.csv: every file the integrity scan refused, with the reason."""
    with open(path, "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["path", "reason"])
        writer.writerows(sorted(skipped.items()))


def write_test_report(out_dir: Path, class_names: list[str], confusion: torch.Tensor, loggers: list[Logger]) -> None:
    """per_class_accuracy.csv, confusion_matrix.csv and confusion_matrix.png; the picture also goes to loggers."""
    plt = pyplot()
    out_dir.mkdir(parents=True, exist_ok=True)
    counts = confusion.long().tolist()
    with open(out_dir / "confusion_matrix.csv", "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["true \\ predicted", *class_names])
        writer.writerows([name, *row] for name, row in zip(class_names, counts))
    with open(out_dir / "per_class_accuracy.csv", "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["class", "accuracy", "correct", "total"])
        for i, (name, row) in enumerate(zip(class_names, counts)):
            total = sum(row)
            writer.writerow([name, f"{row[i] / total:.4f}" if total else "", row[i], total])

    n = len(class_names)
    size = max(4.0, 0.28 * n + 2)
    fig, ax = plt.subplots(figsize=(size, size))
    ax.imshow(confusion.float().numpy(), cmap="Blues")
    ax.set_xticks(range(n), class_names, rotation=90, fontsize=7 if n > 10 else 9)
    ax.set_yticks(range(n), class_names, fontsize=7 if n > 10 else 9)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    if n <= 12:
        for i in range(n):
            for j in range(n):
                ax.text(j, i, counts[i][j], ha="center", va="center", fontsize=8)
    save_figure(fig, out_dir / "confusion_matrix.png", dpi=120)
    log_images(loggers, "test/confusion_matrix", [out_dir / "confusion_matrix.png"])


def test_and_report(
    trainer: pl.Trainer,
    model: TransferClassifier,
    datamodule: ImageClassificationDataModule,
    out_dir: Path,
    ckpt_path: str | None,
    extra: dict[str, Any],
) -> dict[str, Any]:
    """Test (the given checkpoint, or the model as it is), then write metrics.json and the test report."""
    trainer.test(model, datamodule=datamodule, ckpt_path=ckpt_path, weights_only=True if ckpt_path else None)
    metrics = {**extra, **to_float_dict({k: v for k, v in trainer.callback_metrics.items() if k.startswith(("test/", "adv/"))})}
    if trainer.is_global_zero:
        write_json(out_dir / "metrics.json", metrics)
        write_test_report(out_dir, model.class_names, as_classifier(trainer.lightning_module).test_confusion_matrix, trainer.loggers)
        if datamodule.skipped:
            write_skipped(out_dir / "skipped_images.csv", datamodule.skipped)
        log.info("Results in %s: %s", out_dir, {k: v for k, v in metrics.items() if k in ("val/acc", "test/acc", "test/acc_top3")})
    finish_loggers(trainer.loggers)
    return metrics


@rank_zero_only
def announce_skipped(datamodule: ImageClassificationDataModule, out_dir: Path) -> None:
    if datamodule.skipped:
        log.warning("%d file(s) skipped; list in %s", len(datamodule.skipped), out_dir / "skipped_images.csv")
