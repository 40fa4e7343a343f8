"""callbacks=feature_maps: activations of a few layers for a fixed set of validation images, as pictures."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Optional, Sequence

import lightning.pytorch as pl
import torch

from transferlab.errors import DataError
from transferlab.insight.feature_maps import (
    DEFAULT_STRIDES,
    capture,
    check_layers,
    pick_layers,
    render_channels,
    render_lesson_view,
)
from transferlab.insight.pixels import inspecting, load_pixels
from transferlab.reporting import log_images

log = logging.getLogger(__name__)


def val_image_paths(trainer: pl.Trainer) -> list[Path]:
    """The validation files of the run's datamodule (`splits["val"]`: (path, label) pairs)."""
    datamodule = trainer.datamodule
    splits = getattr(datamodule, "splits", None) or {}
    if not splits.get("val"):
        raise DataError("callbacks: this datamodule exposes no validation files (splits['val']); the picture callbacks need them")
    return [Path(path) for path, _ in splits["val"]]


class FeatureMaps(pl.Callback):
    """PNGs of the most active channels per layer, per image, and the lesson's view of the last block."""

    def __init__(self, dirpath: str, num_images: int = 4, layers: Optional[Sequence[str]] = None,
                 strides: Sequence[int] = DEFAULT_STRIDES, channels: int = 16, at_start: bool = True,
                 every_n_epochs: int = 0, at_end: bool = True, seed: int = 0) -> None:
        """`layers`: module names inside the backbone (null = one per output stride in `strides`);
        when: before training (`at_start`), every n epochs, after training (`at_end`; skipped when frozen)."""
        self.dirpath, self.num_images, self.layers = Path(dirpath), num_images, list(layers or [])
        self.strides, self.channels, self.seed = tuple(strides), channels, seed
        self.at_start, self.every_n_epochs, self.at_end = at_start, every_n_epochs, at_end

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        body = pl_module.backbone.body
        if self.layers:
            check_layers(body, self.layers, "callbacks.feature_maps.layers")
        else:
            self.layers = pick_layers(body, pl_module.backbone.preprocessing.input_size, self.strides)
        log.info("Feature maps of layers %s", ", ".join(self.layers))

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.at_start:
            self.render(trainer, pl_module, "start")

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.every_n_epochs > 0 and (trainer.current_epoch + 1) % self.every_n_epochs == 0 and not pl_module.backbone_frozen:
            self.render(trainer, pl_module, f"epoch_{trainer.current_epoch:03d}")

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.at_end and (pl_module.mode != "frozen" or not self.at_start):  # a frozen backbone's maps never change
            self.render(trainer, pl_module, "end")

    def render(self, trainer: pl.Trainer, pl_module: pl.LightningModule, when: str) -> list[Path]:
        if not trainer.is_global_zero:
            return []
        paths = val_image_paths(trainer)
        chosen = sorted(torch.randperm(len(paths), generator=torch.Generator().manual_seed(self.seed))[: self.num_images].tolist())
        prep = pl_module.backbone.preprocessing
        pixels = torch.stack([load_pixels(paths[i], prep) for i in chosen])
        mean, std = torch.tensor(prep.mean).view(1, 3, 1, 1), torch.tensor(prep.std).view(1, 3, 1, 1)
        with inspecting(pl_module):
            acts = capture(pl_module.backbone.body, ((pixels - mean) / std).to(pl_module.device), self.layers)
        out = self.dirpath / when
        written = []
        for layer in self.layers:
            files = [render_channels(pixels[k], acts[layer][k], f"{paths[i].name} · {layer}", out / f"{k:02d}_{layer}.png", self.channels)
                     for k, i in enumerate(chosen)]
            log_images(trainer.loggers, f"feature_maps/{layer}", files, step=trainer.global_step, captions=[paths[i].name for i in chosen])
            written += files
        last = self.layers[-1]
        lesson = [render_lesson_view(acts[last][k], f"{paths[i].name} · {last}", out / f"{k:02d}_lesson_view.png") for k, i in enumerate(chosen)]
        log.info("Feature maps (%s): %d pictures in %s", when, len(written) + len(lesson), out)
        return written
