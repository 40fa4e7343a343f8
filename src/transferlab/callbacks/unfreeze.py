"""finetune=gradual: train the head on a frozen backbone, then let the backbone join at a lower learning rate."""

from __future__ import annotations

import logging

import lightning.pytorch as pl
from lightning.pytorch.callbacks import BaseFinetuning
from torch.optim import Optimizer

from transferlab.models.classifier import as_classifier

log = logging.getLogger(__name__)


class GradualUnfreeze(BaseFinetuning):
    """Like Lightning's BackboneFinetuning, but the frozen phase is a true linear probe (BatchNorm statistics
    untouched; Lightning's `freeze` would switch BatchNorm to batch statistics), and resuming after the
    unfreeze epoch restores the unfrozen state."""

    def __init__(self, unfreeze_at_epoch: int, backbone_lr_factor: float) -> None:
        super().__init__()
        self.unfreeze_at_epoch = int(unfreeze_at_epoch)
        self.backbone_lr_factor = float(backbone_lr_factor)

    def freeze_before_training(self, pl_module: pl.LightningModule) -> None:
        as_classifier(pl_module).freeze_backbone()

    def finetune_function(self, pl_module: pl.LightningModule, epoch: int, optimizer: Optimizer) -> None:
        classifier = as_classifier(pl_module)
        if epoch < self.unfreeze_at_epoch or not classifier.backbone_frozen:
            return
        classifier.unfreeze_backbone()
        known = {id(p) for group in optimizer.param_groups for p in group["params"]}
        new = [p for p in classifier.backbone.parameters() if id(p) not in known]
        if new:  # on resume the group was already restored from the checkpoint
            lr = optimizer.param_groups[0]["lr"] * self.backbone_lr_factor
            optimizer.add_param_group({"params": new, "lr": lr})
            log.info("Epoch %d: backbone unfrozen, learning rate %.2e", epoch, lr)

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        super().on_train_epoch_start(trainer, pl_module)
        # Schedulers keep one base lr per param group: teach them about the group added above.
        for config in trainer.lr_scheduler_configs:
            scheduler = config.scheduler
            base_lrs = getattr(scheduler, "base_lrs", None)
            groups = scheduler.optimizer.param_groups
            if base_lrs is not None and len(base_lrs) < len(groups):
                for group in groups[len(base_lrs) :]:
                    group.setdefault("initial_lr", group["lr"])
                    base_lrs.append(group["initial_lr"])
