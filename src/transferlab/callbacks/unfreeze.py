"""finetune=gradual: train the head on a frozen backbone, then let the backbone join at a lower learning rate.

The same run on one process and under DDP (Lightning #20340: DDP registers, when it wraps the model, only the
parameters that require gradients, so a backbone unfrozen later is never synchronised). Here nothing about the
optimiser or DDP's graph changes at the unfreeze:

- the backbone's parameter group is in the optimiser from the first step (models.optimization), at
  optimizer.lr x backbone_lr_factor, scheduled with the head's;
- until `unfreeze_at_epoch` the backbone is in eval mode (BatchNorm statistics and dropout as pretrained) and its
  parameters get no gradient: on one process it runs under no_grad (cheap); under DDP its parameters require
  gradients from the start and stay in the graph, and their gradients are dropped before each optimiser step.
  An optimiser skips a parameter without a gradient: no step, no weight decay, no momentum or Adam state (the
  zero learning rate of #20340's workaround, without the state a zero learning rate still accumulates);
- at the start of the unfreeze epoch (or of any later epoch a run resumes at) the backbone trains.
"""

from __future__ import annotations

import logging

import lightning.pytorch as pl
from torch.optim import Optimizer

from transferlab.models.classifier import as_classifier

log = logging.getLogger(__name__)


class GradualUnfreeze(pl.Callback):
    def __init__(self, unfreeze_at_epoch: int, backbone_lr_factor: float) -> None:
        super().__init__()
        self.unfreeze_at_epoch = int(unfreeze_at_epoch)
        self.backbone_lr_factor = float(backbone_lr_factor)  # applied by models.optimization; logged here

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        """Before the strategy wraps the model: under DDP the frozen backbone keeps its place in the graph."""
        classifier = as_classifier(pl_module)
        if stage == "fit" and classifier.backbone_frozen:
            classifier.backbone_graph_when_frozen = trainer.world_size > 1
            classifier.backbone.body.requires_grad_(classifier.backbone_graph_when_frozen)

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        classifier = as_classifier(pl_module)
        if trainer.current_epoch >= self.unfreeze_at_epoch and classifier.backbone_frozen:
            classifier.unfreeze_backbone()
            lr = trainer.optimizers[0].param_groups[0]["lr"] * self.backbone_lr_factor if trainer.optimizers else float("nan")
            log.info("Epoch %d: backbone unfrozen, learning rate %.2e", trainer.current_epoch, lr)

    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: Optimizer) -> None:
        classifier = as_classifier(pl_module)
        if classifier.backbone_frozen and classifier.backbone_graph_when_frozen:
            for parameter in classifier.backbone.parameters():
                parameter.grad = None  # after DDP's all-reduce: the optimiser skips them (see the module docstring)
