"""(b) Full fine-tuning: the steps of a minimal PyTorch loop against transferlab's LightningModule under Lightning with
the run defaults, the same model, batches, precision and layout: Lightning's overhead per step."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import torch

from .common import LITE0, Context, Row, Target, at, make_classifier, sync, tensor_batches, train_step


def raw_steps(model: Any, batches: list, warmup: int, device: torch.device, bf16: bool) -> float:
    """A minimal PyTorch loop over the same model and batches; seconds per step after `warmup` steps."""
    model.to(device).train()
    optimizer = model.configure_optimizers()
    started = 0.0
    for i, (x, y) in enumerate(batches):
        if i == warmup:
            sync(device)
            started = time.perf_counter()
        train_step(model, optimizer, x.to(device, non_blocking=True), y.to(device, non_blocking=True), device, bf16)
    sync(device)
    return (time.perf_counter() - started) / (len(batches) - warmup)


class _Batches:
    """An iterable of ready batches (a plain list would be read by Lightning as a list of dataloaders)."""

    def __init__(self, batches: list) -> None:
        self.batches = batches

    def __iter__(self) -> Any:
        return iter(self.batches)

    def __len__(self) -> int:
        return len(self.batches)


class _StepTimer:
    """Wall time from the first measured batch to the end of training (every cost of Lightning's loop included)."""

    def __init__(self, warmup: int, device: torch.device) -> None:
        import lightning.pytorch as pl

        outer = self

        class Timer(pl.Callback):
            def on_train_batch_start(self, trainer: Any, pl_module: Any, batch: Any, batch_idx: int) -> None:
                if batch_idx == warmup:
                    sync(device)
                    outer.started = time.perf_counter()

            def on_train_end(self, trainer: Any, pl_module: Any) -> None:
                sync(device)
                outer.ended = time.perf_counter()

        self.callback, self.started, self.ended = Timer(), 0.0, 0.0


def lightning_steps(model: Any, batches: list, warmup: int, device: torch.device, precision: str, work: Path) -> float:
    """transferlab's TransferClassifier under Lightning with the run defaults (CSV logger, metrics every step)."""
    import lightning.pytorch as pl

    from transferlab.training.loggers import ResumableCSVLogger

    timer = _StepTimer(warmup, device)
    trainer = pl.Trainer(
        accelerator="gpu" if device.type == "cuda" else "cpu",
        devices=1,
        precision=precision,
        max_epochs=1,
        limit_val_batches=0,
        num_sanity_val_steps=0,
        log_every_n_steps=10,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        logger=ResumableCSVLogger(save_dir=str(work), name="overhead", version=""),
        callbacks=[timer.callback],
    )
    trainer.fit(model, train_dataloaders=_Batches(batches))
    return (timer.ended - timer.started) / (len(batches) - warmup)


def finetune_section(
    files: list[Path],
    name: str,
    weights: str,
    batch: int,
    steps: int,
    warmup: int,
    rounds: int,
    device: torch.device,
    bf16: bool,
    channels_last: bool,
    work: Path,
) -> dict[str, Any]:
    from transferlab.models.backbones import create_backbone

    prep = create_backbone(name, weights="none").preprocessing
    pool = tensor_batches(files, prep, min(len(files), batch * (steps + warmup)))
    # The same batches for both sides, already where the model is: this measures the training step, not a loader.
    order = torch.arange(batch * (steps + warmup))
    batches = [(pool[idx % len(pool)].to(device), (idx % 2).to(device)) for idx in order.split(batch)]
    raw, ours = [], []
    for r in range(rounds):  # alternate, so drifts of a shared machine hit both sides alike
        for side in ("raw", "transferlab"):
            torch.manual_seed(r)
            model = make_classifier(name, weights, 2)
            model.configure_runtime(channels_last=channels_last)
            if side == "raw":
                raw.append(raw_steps(model, batches, warmup, device, bf16))
            else:
                ours.append(lightning_steps(model, batches, warmup, device, "bf16-mixed" if bf16 else "32-true", work))
    best_raw, best_ours = min(raw), min(ours)
    return {
        "model": name,
        "batch": batch,
        "steps": steps,
        "rounds": rounds,
        "precision": "bf16-mixed" if bf16 else "32-true",
        "channels_last": channels_last,
        "raw_step_s": raw,
        "transferlab_step_s": ours,
        "raw_img_s": batch / best_raw,
        "transferlab_img_s": batch / best_ours,
        "overhead": best_ours / best_raw,
    }


def run(ctx: Context) -> dict[str, Any]:
    """ResNet-50 at batch 256 on a GPU; Lite0 (bundled weights) at a CPU's batch."""
    name, batch = ("resnet50", 256) if ctx.gpu else (LITE0, 8 if ctx.quick else 32)
    steps, warmup, rounds = (30, 10, 2) if ctx.gpu else ((3, 1, 1) if ctx.quick else (6, 2, 2))
    weights = "none" if name == "resnet50" else "bundled"
    return finetune_section(ctx.files, name, weights, batch, steps, warmup, rounds, ctx.device, bf16=True, channels_last=True, work=ctx.work)


def rows(f: dict[str, Any]) -> list[Row]:
    return [
        Row(
            f"(b) full fine-tuning {f['model']} batch {f['batch']} {f['precision']}: img/s (raw loop vs Lightning)",
            f"{f['raw_img_s']:.1f}",
            f"{f['transferlab_img_s']:.1f}",
            f"{f['overhead']:.3f} (time/step)",
            Target("finetune_overhead", f["overhead"], "<= 1.05"),
        )
    ]


KEYS = {"finetune_overhead": at("overhead")}
