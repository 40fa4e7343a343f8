"""Files a run leaves behind: resolved config, metrics.json (with intervals), test_predictions.csv, per-class accuracy,
confusion matrix, reliability diagram, skip list."""

from __future__ import annotations

import csv
import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Optional

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
from transferlab.core.statistics import metric_intervals, proportion_interval
from transferlab.data.base import ImageClassificationDataModule
from transferlab.data.images import Sample
from transferlab.data.labels import class_index
from transferlab.models.classifier import TransferClassifier, as_classifier
from transferlab.models.evaluation import calibration_metrics, reliability_bins
from transferlab.training.loggers import log_final_metrics, log_run_files
from transferlab.training.multilabel_files import PER_LABEL, multilabel_test, write_per_label
from transferlab.training.run_report import interpret_run, write_report

log = logging.getLogger(__name__)


def print_config_tree(cfg: DictConfig, save_to: Path | None = None, show: bool = True) -> None:
    """Show the resolved config group by group, and save it as <run>/config.yaml.

    Jobs of a sweep only save it: the sweep's log shows each job's overrides, not 20 full trees.
    """
    values = redact(OmegaConf.to_container(cfg, resolve=True))  # credentials never reach the screen or the file
    if show and not in_sweep():
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


def write_predictions(path: Path, samples: list[Sample], class_names: list[str], probs: torch.Tensor) -> None:
    """One row per image: path, label, predicted, prob_<class>... (what interpretation, audits and significance read)."""
    if len(samples) != len(probs):
        raise RuntimeError(f"{len(probs)} predictions for {len(samples)} images: the evaluation lost or repeated images")
    with open(path, "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["path", "label", "predicted", *(f"prob_{name}" for name in class_names)])
        for (image, label), row in zip(samples, probs.tolist()):
            best = max(range(len(row)), key=row.__getitem__)
            writer.writerow([str(image), class_names[class_index(label)], class_names[best], *(f"{p:.6f}" for p in row)])


def write_reliability_diagram(path: Path, probs: torch.Tensor, labels: torch.Tensor, before: torch.Tensor | None, loggers: list[Logger]) -> None:
    """Confidence against accuracy per bin (15 bins, as the ECE), after and (dashed) before calibration."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(4.6, 4.2))
    ax.plot([0, 1], [0, 1], color="#999", linewidth=1, label="perfectly calibrated")
    for name, values, style in (("before calibration", before, "--"), ("calibrated", probs, "-")):
        if values is None:
            continue
        points = [(c, a) for c, a, n in reliability_bins(values, labels) if n]
        ece = calibration_metrics(values.log(), labels, values.shape[1])["ece"]
        ax.plot(*zip(*points), style, marker="o", label=f"{name} (ECE {ece:.3f})")
    ax.set_xlabel("confidence (top-1 probability)")
    ax.set_ylabel(f"accuracy ({len(labels)} test images)")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    save_figure(fig, path, dpi=120)
    log_images(loggers, "test/reliability_diagram", [path])


def test_and_report(
    trainer: pl.Trainer,
    model: TransferClassifier,
    datamodule: ImageClassificationDataModule,
    out_dir: Path,
    ckpt_path: str | None,
    extra: dict[str, Any],
    seed: int,
    interpret: Optional[Mapping[str, Any]] = None,
) -> dict[str, Any]:
    """Test (the given checkpoint, or the model as it is), then write metrics.json (with intervals: core.statistics),
    test_predictions.csv, the test report, the interpretation (`interpret`: conf/interpret/, seeded with `seed`) and
    report.html. Every key of metrics.json goes to the loggers too; the caller finishes them."""
    model.metric_masks["test"] = datamodule.ignore_mask(datamodule.splits["test"])  # Pascal VOC's difficult, else None
    trainer.test(model, datamodule=datamodule, ckpt_path=ckpt_path, weights_only=True if ckpt_path else None)
    metrics = {**extra, **to_float_dict({k: v for k, v in trainer.callback_metrics.items() if k.startswith(("test/", "adv/"))})}
    tested = as_classifier(trainer.lightning_module)
    logits, labels = tested.outputs["test"]
    uncalibrated = tested.uncalibrated["test"]  # the same views, without the temperature (models.tta.combine_views)
    if tested.task.multilabel:
        thresholds = [tested.thresholds.get(name, 0.5) for name in tested.class_names]
        found = multilabel_test(
            out_dir, datamodule.splits["test"], tested.class_names, logits, uncalibrated, labels, thresholds,
            tested.metric_masks["test"], seed, trainer.is_global_zero, trainer.loggers,
        )  # fmt: skip
        metrics.update(found)
        probs = logits.sigmoid()
    else:
        probs = logits.softmax(dim=-1)
        before = uncalibrated.softmax(dim=-1) if float(tested.temperature) != 1.0 else None
        if before is not None:
            metrics.update({f"test/{k}_before_calibration": v for k, v in calibration_metrics(uncalibrated, labels, len(tested.class_names)).items()})
        metrics.update(test_intervals(probs, labels))
    if trainer.is_global_zero:
        write_json(out_dir / "metrics.json", metrics)
        if tested.task.multilabel:
            write_per_label(out_dir / PER_LABEL, metrics, tested.class_names, thresholds)
        else:
            write_predictions(out_dir / "test_predictions.csv", datamodule.splits["test"], tested.class_names, probs)
            write_test_report(out_dir, tested.class_names, tested.test_confusion_matrix, trainer.loggers)
            write_reliability_diagram(out_dir / "reliability_diagram.png", probs, labels, before, trainer.loggers)
        if datamodule.skipped:
            write_skipped(out_dir / "skipped_images.csv", datamodule.skipped)
        if interpret and interpret.get("enabled"):
            interpret_run(out_dir, tested, datamodule, probs, interpret, seed)
        write_report(out_dir, metrics, f"Run report: {out_dir.name}")
        log.info("Results in %s: %s (report.html)", out_dir, summary_line(metrics))
    log_final_metrics(trainer.loggers, metrics, step=trainer.global_step)
    log_run_files(trainer.loggers, out_dir)
    return metrics


def test_intervals(probs: torch.Tensor, labels: torch.Tensor) -> dict[str, list[float]]:
    """test/<metric>_ci95 for acc, balanced_acc, macro_f1 and (more than 3 classes) acc_top3: core.statistics."""
    found = {
        f"test/{name}_ci95": interval for name, interval in metric_intervals(labels.tolist(), probs.argmax(dim=-1).tolist(), probs.shape[1]).items()
    }
    if probs.shape[1] > 3 and len(labels):
        hits = int((probs.topk(3, dim=-1).indices == labels[:, None]).any(dim=-1).sum())
        found["test/acc_top3_ci95"] = proportion_interval(hits, len(labels))
    return found


@rank_zero_only
def announce_skipped(datamodule: ImageClassificationDataModule, out_dir: Path) -> None:
    if datamodule.skipped:
        log.warning("%d file(s) skipped; list in %s", len(datamodule.skipped), out_dir / "skipped_images.csv")


def summary_line(metrics: dict[str, Any]) -> str:
    """`test/acc 0.919 [0.865, 0.973], test/balanced_acc ...`: the headline figures, each with its interval."""
    parts = []
    for key in (
        "val/acc",
        "val/map",
        "test/acc",
        "test/balanced_acc",
        "test/macro_f1",
        "test/acc_top3",
        "test/map",
        "test/f1_micro",
        "test/f1_macro",
        "test/ece",
    ):
        value, interval = metrics.get(key), metrics.get(f"{key}_ci95")
        if isinstance(value, (int, float)):
            parts.append(f"{key} {value:.3f}" + (f" [{interval[0]:.3f}, {interval[1]:.3f}]" if interval else ""))
    return ", ".join(parts)
