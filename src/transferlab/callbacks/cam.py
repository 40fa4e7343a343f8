"""callbacks=cam: class activation maps of a fixed set of validation images while the model trains.

Each time: one PNG per image (the map of the true class and of the predicted one over the model's input crop),
to <run>/cams/<when>/ and to every logger, so a run shows whether the model learns to look at the animal or at
the background. A frozen backbone's maps still change: the head decides which channels count.
"""

from __future__ import annotations

import logging
from pathlib import Path

import lightning.pytorch as pl
import torch

from transferlab.callbacks.feature_maps import val_image_paths
from transferlab.core.plotting import log_images, pyplot, save_figure
from transferlab.insight.cam import CamExplainer, overlay, target_layer
from transferlab.insight.pixels import inspecting, load_pixels, trained_classifier
from transferlab.models.classifier import as_classifier

log = logging.getLogger(__name__)


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
                truth = [int(labels[str(files[i])]) for i in chosen]
                predicted = [int(p.argmax()) for p in probs]
                maps_true, maps_pred = explainer(pixels, truth), explainer(pixels, predicted)
            finally:
                explainer.close()
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
