"""callbacks=feature_maps: activations of a few layers for a fixed set of validation images, as pictures."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Optional, Sequence

import lightning.pytorch as pl
import torch

from transferlab.core.errors import DataError
from transferlab.core.plotting import log_images
from transferlab.insight.feature_maps import (
    capture,
    check_layers,
    pick_layers,
    render_channels,
    render_lesson_view,
)
from transferlab.insight.pixels import inspecting, load_pixels
from transferlab.models.classifier import as_classifier

log = logging.getLogger(__name__)


def val_image_paths(trainer: pl.Trainer) -> list[Path]:
    """Held-out files of the run's datamodule: `splits["val"]`, or the test split where the run has no validation
    split (the L-BFGS probe with finetune.select_c=cv trains on it)."""
    datamodule = trainer.datamodule  # type: ignore[attr-defined]
    splits = getattr(datamodule, "splits", None) or {}
    held_out = splits.get("val") or splits.get("test")
    if not held_out:
        raise DataError("callbacks: this datamodule exposes no validation or test files (splits['val'/'test']); the picture callbacks need them")
    return [Path(path) for path, _ in held_out]


class FeatureMaps(pl.Callback):
    """PNGs of the most active channels per layer, per image, and the lesson's view of the last block."""

    def __init__(
        self,
        *,
        dirpath: str,
        num_images: int,
        layers: Optional[Sequence[str]],
        strides: Sequence[int],
        channels: int,
        at_start: bool,
        every_n_epochs: int,
        at_end: bool,
        seed: int,
    ) -> None:
        """`layers`: module names inside the backbone (null = one per output stride in `strides`);
        when: before training (`at_start`), every n epochs, after training (`at_end`; skipped when frozen).
        Values: conf/callbacks/feature_maps.yaml."""
        self.dirpath, self.num_images, self.layers = Path(dirpath), num_images, list(layers or [])
        self.strides, self.channels, self.seed = tuple(strides), channels, seed
        self.at_start, self.every_n_epochs, self.at_end = at_start, every_n_epochs, at_end

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        backbone = as_classifier(pl_module).backbone
        body = backbone.body
        if self.layers:
            check_layers(body, self.layers, "callbacks.feature_maps.layers")
        else:
            self.layers = pick_layers(body, backbone.preprocessing.input_size, self.strides)
        log.info("Feature maps of layers %s", ", ".join(self.layers))

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.at_start:
            self.render(trainer, pl_module, "start")

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.every_n_epochs > 0 and (trainer.current_epoch + 1) % self.every_n_epochs == 0 and not as_classifier(pl_module).backbone_frozen:
            self.render(trainer, pl_module, f"epoch_{trainer.current_epoch:03d}")

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.at_end and (as_classifier(pl_module).mode != "frozen" or not self.at_start):  # a frozen backbone's maps never change
            self.render(trainer, pl_module, "end")

    def render(self, trainer: pl.Trainer, pl_module: pl.LightningModule, when: str) -> list[Path]:
        if not trainer.is_global_zero:
            return []
        paths = val_image_paths(trainer)
        chosen = sorted(torch.randperm(len(paths), generator=torch.Generator().manual_seed(self.seed))[: self.num_images].tolist())
        backbone = as_classifier(pl_module).backbone
        prep = backbone.preprocessing
        pixels = torch.stack([load_pixels(paths[i], prep) for i in chosen])
        mean, std = torch.tensor(prep.mean).view(1, 3, 1, 1), torch.tensor(prep.std).view(1, 3, 1, 1)
        with inspecting(pl_module):
            acts = capture(backbone.body, ((pixels - mean) / std).to(pl_module.device), self.layers)
        out = self.dirpath / when
        written = []
        for layer in self.layers:
            files = [
                render_channels(pixels[k], acts[layer][k], f"{paths[i].name} · {layer}", out / f"{k:02d}_{layer}.png", self.channels)
                for k, i in enumerate(chosen)
            ]
            log_images(trainer.loggers, f"feature_maps/{layer}", files, step=trainer.global_step, captions=[paths[i].name for i in chosen])
            written += files
        last = self.layers[-1]
        lesson = [render_lesson_view(acts[last][k], f"{paths[i].name} · {last}", out / f"{k:02d}_lesson_view.png") for k, i in enumerate(chosen)]
        log.info("Feature maps (%s): %d pictures in %s", when, len(written) + len(lesson), out)
        return written
