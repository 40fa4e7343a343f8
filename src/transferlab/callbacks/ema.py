"""finetune.ema_decay=d: an exponential moving average of the weights (timm's ModelEmaV3, Lightning's
WeightAveraging), updated after every optimiser step. The averaged weights are the ones validated (so checkpoint
selection judges them), saved in every checkpoint's `state_dict` (the raw ones ride along as
`current_model_state`, for resuming), calibrated, tested and exported; after fit the model holds them.

The decay warms up as timm's does, min(d, (1 + n) / (10 + n)) after n updates, so that a short run on a small
dataset (a few hundred steps) averages its recent weights instead of staying near the pretrained start.
"""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import WeightAveraging

from transferlab.core.errors import ConfigError


def warmed_up_decay(decay: float, updates: torch.Tensor) -> torch.Tensor:
    """A tensor, on the average's device: no GPU -> CPU sync per parameter and step."""
    updates = updates.double()
    return ((1.0 + updates) / (10.0 + updates)).clamp(max=decay)


class WeightEMA(WeightAveraging):
    def __init__(self, decay: float) -> None:
        if not 0.0 < float(decay) < 1.0:
            raise ConfigError(f"finetune.ema_decay: expected a decay in (0, 1) such as 0.999, or null for no EMA; got {decay}")
        self.decay = float(decay)

        def average(averaged: torch.Tensor, current: torch.Tensor, updates: torch.Tensor) -> torch.Tensor:
            if not averaged.is_floating_point():
                return current  # integer buffers: the latest
            d = warmed_up_decay(self.decay, updates).to(averaged.dtype)
            # The average of a weight that never moved is that weight, to the bit (a*d + a*(1-d) can be off by an ulp):
            # frozen weights (finetune=lora's base, a frozen backbone) stay bit-identical.
            return torch.where(averaged == current, current, averaged * d + current * (1.0 - d))

        super().__init__(use_buffers=True, avg_fn=average)

    def should_update(self, step_idx: int | None = None, epoch_idx: int | None = None) -> bool:
        return step_idx is not None  # every optimiser step

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        """After fit the model holds the averaged weights (on_train_end copied them): later validate/test passes
        load checkpoints whose state_dict is the average, and must neither swap nor restore the raw weights."""
        if stage == "fit":
            self._average_model = None

    def on_load_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]) -> None:
        if self._average_model is not None:  # resuming a fit: raw weights back into the model, the average restored
            super().on_load_checkpoint(trainer, pl_module, checkpoint)
