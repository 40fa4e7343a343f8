"""callbacks=ideal_class: at the end of fit, one "ideal" image per class of the trained classifier."""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Literal, Optional, Sequence

import lightning.pytorch as pl
import torch

from transferlab.core.files import write_json
from transferlab.core.plotting import log_images
from transferlab.insight.ideal import IdealSettings, ideal_image
from transferlab.insight.pixels import inspecting, save_png, total_variation, trained_classifier
from transferlab.models.classifier import as_classifier

log = logging.getLogger(__name__)


class IdealClassImages(pl.Callback):
    """Optimises an input image per class (see `transferlab.insight.ideal`) and logs the pictures."""

    def __init__(
        self,
        *,
        dirpath: str,
        classes: Optional[Sequence[str]],
        max_classes: int,
        steps: int,
        lr: float,
        tv_weight: float,
        views: int,
        jitter: int,
        scale: float,
        rotate: float,
        parameterization: Literal["fourier", "pixel"],
        decorrelate: bool,
        decay_power: float,
        stop_prob: Optional[float],
        seed: int,
    ) -> None:
        """`classes`: names to draw (null = the first `max_classes` classes); the rest as in transferlab-visualize
        (values: conf/callbacks/ideal_class.yaml)."""
        self.dirpath, self.classes, self.max_classes = Path(dirpath), list(classes or []), max_classes
        given = locals()  # every IdealSettings field is a parameter above, by the same name
        self.settings = IdealSettings(**{f.name: given[f.name] for f in dataclasses.fields(IdealSettings)})

    def targets(self, pl_module: pl.LightningModule) -> list[int]:
        model = trained_classifier(as_classifier(pl_module))
        chosen = [model.resolve_target(c, "callbacks.ideal_class.classes") for c in self.classes]
        return chosen or list(range(min(self.max_classes, len(model.class_names))))

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage == "fit":
            self.targets(pl_module)  # a mistyped class name fails before training, not after it

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not trainer.is_global_zero:
            return
        model, targets = trained_classifier(as_classifier(pl_module)), self.targets(pl_module)
        files, summary = [], {}
        with inspecting(pl_module), torch.inference_mode(False):
            for index in targets:
                name = model.class_names[index]
                result = ideal_image(model, index, self.settings)
                path = self.dirpath / f"{index:03d}_{name}.png"
                saved = save_png(result.image, path)
                summary[name] = {
                    "target_index": index,
                    "target_prob": float(model.probabilities(saved[None])[0, index]),
                    "total_variation": float(total_variation(saved)),
                    "steps": result.steps,
                    "seconds": round(result.seconds, 2),
                }
                files.append(path)
        write_json(self.dirpath / "result.json", {"settings": dataclasses.asdict(self.settings), "classes": summary})
        log_images(trainer.loggers, "ideal_class", files, step=trainer.global_step, captions=[model.class_names[i] for i in targets])
        log.info("Ideal-class images in %s: %s", self.dirpath, {k: round(v["target_prob"], 3) for k, v in summary.items()})
