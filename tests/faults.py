"""Fault-injection helpers for the crash tests: a callback that stops training at a chosen batch.

The run itself is never faked: the test kills the process (or one of its DataLoader workers) with a real signal
while it waits here, so the kill lands in the middle of an epoch, at a known place.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any, Optional

import lightning.pytorch as pl
import torch


class PauseAt(pl.Callback):
    """At (epoch, batch): write `marker` (this pid) and wait until `resume_file` exists (or forever)."""

    def __init__(self, epoch: int, batch: int, marker: str, resume_file: Optional[str] = None, timeout: float = 300.0) -> None:
        self.epoch, self.batch, self.marker, self.resume_file, self.timeout = epoch, batch, marker, resume_file, timeout

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int) -> None:
        if (trainer.current_epoch, batch_idx) != (self.epoch, self.batch):
            return
        Path(self.marker).write_text(str(os.getpid()))
        deadline = time.monotonic() + self.timeout
        while time.monotonic() < deadline and not (self.resume_file and Path(self.resume_file).exists()):
            time.sleep(0.05)


class MixerSpy(pl.Callback):
    """Records the Trainer stage of every call of the model's mixup / cutmix (`calls`, class-level: in-process runs)."""

    calls: list[str] = []
    batches: dict[str, int] = {}

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        mixer = pl_module.mixer  # type: ignore[attr-defined]
        assert mixer is not None, "the run has no mixup / cutmix"

        class Spy(torch.nn.Module):
            def forward(self, images: Any, labels: Any) -> Any:
                MixerSpy.calls.append(trainer.state.stage.value if trainer.state.stage else "none")
                return mixer(images, labels)

        pl_module.mixer = Spy()  # type: ignore[attr-defined]

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int) -> None:
        MixerSpy.batches["train"] = MixerSpy.batches.get("train", 0) + 1

    def on_validation_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int, dataloader_idx: int = 0
    ) -> None:
        MixerSpy.batches["validate"] = MixerSpy.batches.get("validate", 0) + 1

    def on_test_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> None:
        MixerSpy.batches["test"] = MixerSpy.batches.get("test", 0) + 1
