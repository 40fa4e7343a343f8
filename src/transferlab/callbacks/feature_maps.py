"""callbacks=feature_maps: activations of a few layers for a fixed set of validation images, as pictures.

A CNN gets its most active channels per output stride. A token model (ViT, DINOv2, CLIP, Swin) gets the same
pictures of evenly spaced blocks' patch tokens put back on the patch grid, plus per block the patches coloured by
their first principal components, and the class token's attention over the patches (last block, averaged over
heads; `attention_rollout`: rolled out over every block)."""

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
from transferlab.insight.tokens import (
    check_token_layers,
    class_attention,
    layout_of,
    on_grid,
    render_attention,
    render_components,
    token_blocks,
)
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
        attention_rollout: bool,
    ) -> None:
        """`layers`: module names inside the backbone (null = one per output stride in `strides`; a token model: as
        many evenly spaced blocks); when: before training (`at_start`), every n epochs, after training (`at_end`;
        skipped when frozen). Values: conf/callbacks/feature_maps.yaml."""
        self.attention_rollout = attention_rollout
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
            if layout_of(body).kind != "conv":
                check_token_layers(body, backbone.preprocessing.input_size, self.layers, "callbacks.feature_maps.layers")
        elif layout_of(body).kind != "conv":
            self.layers = token_blocks(body, backbone.preprocessing.input_size, len(self.strides))
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
        layout, images = layout_of(backbone.body), ((pixels - mean) / std).to(pl_module.device)
        with inspecting(pl_module):
            acts = capture(backbone.body, images, self.layers)
            attention = class_attention(backbone.body, images, self.attention_rollout)
        acts = {layer: on_grid(value, layout, *pixels.shape[-2:]) for layer, value in acts.items()}
        out = self.dirpath / when
        written = []
        for layer in self.layers:
            if acts[layer].ndim != 4:
                log.warning("Feature maps: %s gives %s, not one map or token per patch; skipped", layer, list(acts[layer].shape))
                continue
            files = [
                render_channels(pixels[k], acts[layer][k], f"{paths[i].name} · {layer}", out / f"{k:02d}_{layer}.png", self.channels)
                for k, i in enumerate(chosen)
            ]
            captions = [paths[i].name for i in chosen]
            if layout.kind != "conv":
                files += [
                    render_components(pixels[k], acts[layer][k], f"{paths[i].name} · {layer}", out / f"{k:02d}_{layer}_pca.png")
                    for k, i in enumerate(chosen)
                ]
                captions += [f"{paths[i].name} (principal components)" for i in chosen]
            log_images(trainer.loggers, f"feature_maps/{layer}", files, step=trainer.global_step, captions=captions)
            written += files
        if attention is None and layout.kind == "tokens":
            log.info(
                "Feature maps: no attention maps for %s (no class token, or attention that is not timm's plain Attention)",
                type(backbone.body).__name__,
            )
        if attention is not None:
            kind = "rolled out over every block" if self.attention_rollout else "last block"
            written += [
                render_attention(
                    pixels[k], attention[k], f"{paths[i].name} · class-token attention, {kind}, mean of heads", out / f"{k:02d}_attention.png"
                )
                for k, i in enumerate(chosen)
            ]
        last = self.layers[-1]
        lesson = [render_lesson_view(acts[last][k], f"{paths[i].name} · {last}", out / f"{k:02d}_lesson_view.png") for k, i in enumerate(chosen)]
        log.info("Feature maps (%s): %d pictures in %s", when, len(written) + len(lesson), out)
        return written
