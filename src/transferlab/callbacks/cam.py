"""callbacks=cam: class activation maps of a fixed set of validation images while the model trains.

Each time: one PNG per image (the map of the true class and of the predicted one over the model's input crop),
to <run>/cams/<when>/ and to every logger, so a run shows whether the model learns to look at the animal or at
the background. A frozen backbone's maps still change: the head decides which channels count.

A multi-label run has a panel per label that the image holds or the model predicts (probability at or over the
label's threshold; 0.5 until thresholds are chosen after training), most probable first, at most MAX_PANELS;
an image with neither gets its most probable label. Each label has its own logit and so its own map.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch

from transferlab.callbacks.feature_maps import val_image_paths
from transferlab.core.plotting import log_images, pyplot, save_figure
from transferlab.data.labels import label_set
from transferlab.insight.cam import CamExplainer, overlay, target_layer
from transferlab.insight.pixels import PixelClassifier, inspecting, load_pixels, trained_classifier
from transferlab.models.classifier import as_classifier

log = logging.getLogger(__name__)

MAX_PANELS = 4  # labels drawn per image of a multi-label run


def label_panels(model: PixelClassifier, truth: tuple[int, ...], probs: torch.Tensor) -> list[tuple[int, str]]:
    """(label, what it is: true / predicted / true, predicted) of one image of a multi-label run, most probable first."""
    predicted = set(model.predicted(probs))
    shown = sorted(set(truth) | predicted, key=lambda k: -float(probs[k]))[:MAX_PANELS] or [int(probs.argmax())]
    return [(k, ", ".join(w for w, on in (("true", k in truth), ("predicted", k in predicted)) if on) or "top") for k in shown]


class ClassActivationMaps(pl.Callback):
    def __init__(self, *, dirpath: str, num_images: int, method: str, target_layer: str | None, every_n_epochs: int, at_end: bool, seed: int) -> None:
        """Values: conf/callbacks/cam.yaml. `every_n_epochs` 0 = only at the end."""
        self.dirpath, self.num_images, self.method, self.layer = Path(dirpath), num_images, method, target_layer
        self.every_n_epochs, self.at_end, self.seed = every_n_epochs, at_end, seed

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage == "fit":
            backbone = as_classifier(pl_module).backbone
            self.layer = target_layer(backbone, backbone.preprocessing.input_size, self.layer, "callbacks.cam.target_layer")

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.every_n_epochs > 0 and (trainer.current_epoch + 1) % self.every_n_epochs == 0:
            self.render(trainer, pl_module, f"epoch_{trainer.current_epoch:03d}")

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.at_end:
            self.render(trainer, pl_module, "end")

    def render(self, trainer: pl.Trainer, pl_module: pl.LightningModule, when: str) -> list[Path]:
        if not trainer.is_global_zero:
            return []
        classifier = as_classifier(pl_module)
        files = val_image_paths(trainer)
        labels = dict((str(p), y) for p, y in trainer.datamodule.splits.get("val") or trainer.datamodule.splits["test"])  # type: ignore[attr-defined]
        chosen = sorted(torch.randperm(len(files), generator=torch.Generator().manual_seed(self.seed))[: self.num_images].tolist())
        prep = classifier.backbone.preprocessing
        pixels = torch.stack([load_pixels(files[i], prep) for i in chosen]).to(pl_module.device)
        written = []
        with inspecting(pl_module):
            model = trained_classifier(classifier)
            explainer = CamExplainer(model, classifier.backbone.body, str(self.layer), self.method)
            self.method = explainer.method  # auto, resolved for this backbone
            try:
                probs = model.probabilities(pixels).cpu()
                if model.multilabel:
                    panels = [label_panels(model, label_set(labels[str(files[i])]), p) for i, p in zip(chosen, probs)]
                    flat = [(k, label) for k, shown in enumerate(panels) for label, _ in shown]
                    maps = explainer(pixels[[k for k, _ in flat]], [label for _, label in flat])
                else:
                    truth = [int(labels[str(files[i])]) for i in chosen]
                    predicted = [int(p.argmax()) for p in probs]
                    maps_true, maps_pred = explainer(pixels, truth), explainer(pixels, predicted)
            finally:
                explainer.close()
        if model.multilabel:
            written = self.draw_labels(classifier.class_names, [files[i] for i in chosen], pixels, probs, panels, maps, when)
            log_images(trainer.loggers, "cam", written, step=trainer.global_step, captions=[files[i].name for i in chosen])
            log.info("Class activation maps (%s): %d pictures in %s", when, len(written), self.dirpath / when)
            return written
        plt = pyplot()
        names = classifier.class_names
        for k, i in enumerate(chosen):
            fig, axes = plt.subplots(1, 2, figsize=(6, 3.3))
            for ax, cam, cls in ((axes[0], maps_true[k], truth[k]), (axes[1], maps_pred[k], predicted[k])):
                ax.imshow(overlay(pixels[k], cam))
                ax.set_title(f"{'true' if ax is axes[0] else 'predicted'}: {names[cls]} ({float(probs[k, cls]):.2f})", fontsize=8)
                ax.axis("off")
            fig.suptitle(f"{files[i].name} · {self.method} · {self.layer}", fontsize=8)
            written.append(save_figure(fig, self.dirpath / when / f"{k:02d}_{files[i].stem}.png", dpi=100))
        log_images(trainer.loggers, "cam", written, step=trainer.global_step, captions=[files[i].name for i in chosen])
        log.info("Class activation maps (%s): %d pictures in %s", when, len(written), self.dirpath / when)
        return written

    def draw_labels(
        self,
        names: list[str],
        files: list[Path],
        pixels: torch.Tensor,
        probs: torch.Tensor,
        panels: list[list[tuple[int, str]]],
        maps: Any,
        when: str,
    ) -> list[Path]:
        """One PNG per image of a multi-label run: a panel per label of `panels`, maps in that order."""
        plt = pyplot()
        written, position = [], 0
        for k, (file, shown) in enumerate(zip(files, panels)):
            fig, axes = plt.subplots(1, len(shown), figsize=(3 * len(shown), 3.3), squeeze=False)
            for ax, (label, what) in zip(axes[0], shown):
                ax.imshow(overlay(pixels[k], maps[position]))
                ax.set_title(f"{what}: {names[label][:20]} ({float(probs[k, label]):.2f})", fontsize=8)
                ax.axis("off")
                position += 1
            fig.suptitle(f"{file.name} · {self.method} · {self.layer}", fontsize=8)
            written.append(save_figure(fig, self.dirpath / when / f"{k:02d}_{file.stem}.png", dpi=100))
        return written
