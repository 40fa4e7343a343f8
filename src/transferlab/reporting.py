"""Files a run leaves behind: resolved config, metrics.json, per-class accuracy, confusion matrix, skip list."""

from __future__ import annotations

import csv
import json
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.loggers import Logger
from omegaconf import DictConfig, OmegaConf
from rich.console import Console
from rich.syntax import Syntax
from rich.tree import Tree

from transferlab.redaction import redact


def print_config_tree(cfg: DictConfig, save_to: Path | None = None) -> None:
    """Show the resolved config group by group, and save it as <run>/config.yaml.

    Jobs of a sweep only save it: the sweep's log shows each job's overrides, not 20 full trees.
    """
    from transferlab.sweep import in_sweep

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


def to_float_dict(metrics: Mapping[str, Any]) -> dict[str, float]:
    out = {}
    for key, value in metrics.items():
        number = float(value.item() if isinstance(value, torch.Tensor) else value)
        out[key] = number if math.isfinite(number) else None
    return out


def write_json(path: Path, values: Mapping[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(values, indent=2, sort_keys=True) + "\n")


def write_skipped(path: Path, skipped: Mapping[str, str]) -> None:
    """<run>/skipped_images.csv: every file the integrity scan refused, with the reason."""
    with open(path, "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["path", "reason"])
        writer.writerows(sorted(skipped.items()))


def pyplot() -> Any:
    """matplotlib.pyplot on the file-only Agg backend (runs without a display, in workers and on servers)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig: Any, path: Path, dpi: int = 100) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=dpi)
    pyplot().close(fig)
    return path


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


def log_images(loggers: list[Logger], tag: str, paths: list[Path], step: int = 0, captions: list[str] | None = None) -> None:
    """PNG files to every logger that shows pictures: TensorBoard (one image per tag) and W&B (one key, a list)."""
    import numpy as np
    from PIL import Image

    for lg in loggers:
        kind = type(lg).__name__
        if kind == "TensorBoardLogger":
            for i, path in enumerate(paths):
                with Image.open(path) as img:
                    array = np.asarray(img.convert("RGB"))
                name = f"{tag}/{captions[i]}" if captions else (f"{tag}/{i}" if len(paths) > 1 else tag)
                lg.experiment.add_image(name, array, global_step=step, dataformats="HWC")
        elif kind == "WandbLogger":
            lg.log_image(tag, [str(p) for p in paths], **({"caption": captions} if captions else {}))
