"""The optimiser's parameter groups and learning-rate schedule of a TransferClassifier.

- The head trains at optimizer.lr; a training backbone at lr x finetune.backbone_lr_factor, and with
  finetune.layer_decay=d (layer-wise lr decay, BEiT / timm / MMPretrain) each backbone layer at that x d^(depth
  from the top), so the early, general layers move least. timm backbones are split into layers by their own
  group_matcher (timm.optim.param_groups_layer_decay, which also exempts biases and norms from weight decay); any
  other backbone by its top-level modules, in order.
- Only parameters that require gradients join a group: with finetune=lora the backbone's are its adapters alone
  (models.lora freezes the rest), so the adapters are the backbone group, at lr x backbone_lr_factor.
- finetune=gradual: the backbone's group is there from the first step, though its parameters get no gradient until
  the unfreeze epoch (callbacks.unfreeze). An optimiser skips a parameter without a gradient (no step, no weight
  decay, no momentum), so the groups, the schedule and the optimiser state never change shape: the same run on one
  process and under DDP, where the parameters must be in the graph from the start (Lightning #20340).
- A scheduler node with `interval: step` (conf/scheduler/warmup_cosine.yaml) is stepped every optimiser step and is
  given the run's total step count; any other steps once per epoch.
"""

from __future__ import annotations

import math
from typing import Any, Optional

import torch
from torch import nn


def layer_groups(body: nn.Module, lr: float, layer_decay: float, weight_decay: Optional[float], every: bool = False) -> list[dict[str, Any]]:
    """Parameter groups of the trainable backbone parameters (`every`: all of them), the top layer at `lr`, each one
    below x layer_decay."""
    if hasattr(body, "group_matcher"):
        from timm.optim import param_groups_layer_decay

        groups = param_groups_layer_decay(body, weight_decay=weight_decay or 0.0, layer_decay=layer_decay)
        found = []
        for group in groups:
            params = [p for p in group["params"] if p.requires_grad or every]
            if params:
                entry = {"params": params, "lr": lr * float(group.get("lr_scale", 1.0))}
                if weight_decay is not None:
                    entry["weight_decay"] = group["weight_decay"]
                found.append(entry)
        return found
    layers = [[p for p in child.parameters() if p.requires_grad or every] for child in body.children()]
    layers = [params for params in layers if params]
    return [{"params": params, "lr": lr * layer_decay ** (len(layers) - 1 - depth)} for depth, params in enumerate(layers)]


def parameter_groups(head: nn.Module, backbone_body: nn.Module, hparams: dict[str, Any], backbone_trains: bool) -> list[dict[str, Any]]:
    base_lr = float(hparams["optimizer"]["lr"])
    groups: list[dict[str, Any]] = [{"params": [p for p in head.parameters() if p.requires_grad], "lr": base_lr}]
    if not backbone_trains:
        return groups
    finetune = hparams["finetune"]
    every = finetune.get("mode") == "gradual"  # frozen until the unfreeze epoch, but in the optimiser from the start
    backbone_lr = base_lr * float(finetune["backbone_lr_factor"])
    decay = finetune.get("layer_decay")
    if decay is not None and float(decay) < 1.0:
        return groups + layer_groups(backbone_body, backbone_lr, float(decay), hparams["optimizer"].get("weight_decay"), every)
    return groups + [{"params": [p for p in backbone_body.parameters() if p.requires_grad or every], "lr": backbone_lr}]


def optimizers_and_schedule(head: nn.Module, body: nn.Module, hparams: dict[str, Any], backbone_trains: bool, trainer: Any) -> Any:
    """Lightning's configure_optimizers value: the optimiser over `parameter_groups`, and the scheduler (a scheduler
    with `interval: step` is stepped per optimiser step and told the run's total steps)."""
    from hydra.utils import instantiate

    optimizer = instantiate(dict(hparams["optimizer"]))(params=parameter_groups(head, body, hparams, backbone_trains=backbone_trains))
    sched_cfg = dict(hparams["scheduler"] or {})
    if not sched_cfg.get("_target_"):
        return optimizer
    interval = str(sched_cfg.get("interval", "epoch"))
    if interval == "step":
        steps, epochs = int(trainer.estimated_stepping_batches), int(trainer.max_epochs or 1)
        scheduler = instantiate(sched_cfg)(optimizer=optimizer, total_steps=steps, epochs=epochs)
    else:
        scheduler = instantiate(sched_cfg)(optimizer=optimizer)
    return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": interval, "monitor": "val/loss"}}


class WarmupCosine(torch.optim.lr_scheduler.LRScheduler):
    """Per step: linear warm-up from warmup_start x lr over `warmup_epochs`, then cosine decay to min_ratio x lr at
    the last step. One factor for every group (head, backbone, decayed layers keep their ratios)."""

    supplied_at_run = ("total_steps", "epochs")  # by TransferClassifier.configure_optimizers, from the trainer

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        total_steps: int,
        epochs: int,
        *,
        interval: str,
        warmup_epochs: float,
        warmup_start: float,
        min_ratio: float,
    ) -> None:
        """Values from conf/scheduler/warmup_cosine.yaml; `interval` must be step (stepped per optimiser step)."""
        if interval != "step":
            raise ValueError(f"scheduler.interval={interval!r}: WarmupCosine is stepped per optimiser step; set it to step")
        self.total_steps = max(1, int(total_steps))
        self.warmup = int(round(self.total_steps * min(max(float(warmup_epochs), 0.0), epochs) / max(epochs, 1)))
        self.warmup_start, self.min_ratio = float(warmup_start), float(min_ratio)
        super().__init__(optimizer)

    def factor(self, step: int) -> float:
        if step < self.warmup:
            return self.warmup_start + (1.0 - self.warmup_start) * step / self.warmup
        progress = min(1.0, (step - self.warmup) / max(1, self.total_steps - self.warmup))
        return self.min_ratio + (1.0 - self.min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))

    def get_lr(self) -> list[float]:  # type: ignore[override]
        return [float(base) * self.factor(self.last_epoch) for base in self.base_lrs]
