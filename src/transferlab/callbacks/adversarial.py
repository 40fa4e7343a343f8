"""callbacks=adversarial: test accuracy under FGSM and PGD for a grid of L-infinity bounds."""

from __future__ import annotations

import csv
import logging
import math
from fractions import Fraction
from pathlib import Path
from typing import Optional, Sequence

import lightning.pytorch as pl
import torch

from transferlab.core.errors import ConfigError
from transferlab.core.plotting import log_images, pyplot, save_figure
from transferlab.insight.attacks import fgsm_grid, parse_eps, pgd
from transferlab.insight.pixels import inspecting, trained_classifier
from transferlab.models.classifier import as_classifier

log = logging.getLogger(__name__)

ATTACKS = ("fgsm", "pgd")


def eps_label(eps: float) -> str:
    """`4/255` style, as the metric names use it."""
    k = Fraction(eps * 255).limit_denominator(100)
    return f"{k.numerator if k.denominator == 1 else float(k):g}/255"


class AdversarialEvaluation(pl.Callback):
    """After the test epoch: re-run the test images under each attack and ε; log `adv/<attack>_acc@eps=<k>/255`.

    Images are mapped back to pixels in [0, 1] (the loader's normalisation undone) and attacked there; under
    DDP each process attacks its own share and the counts are summed.
    """

    def __init__(
        self,
        *,
        dirpath: str,
        attacks: Sequence[str],
        eps: Sequence[str | float],
        pgd_steps: int,
        pgd_step_size: Optional[str | float],
        random_start: bool,
        max_images: Optional[int],
        seed: int,
    ) -> None:
        """`eps` and `pgd_step_size` accept fractions like 4/255; `max_images` caps the attacked test images.
        Values: conf/callbacks/adversarial.yaml."""
        unknown = [a for a in attacks if a not in ATTACKS]
        if unknown:
            raise ConfigError(f"callbacks.adversarial.attacks: unknown attack {unknown[0]!r}; choose from {', '.join(ATTACKS)}")
        self.dirpath, self.attacks = Path(dirpath), list(attacks)
        self.eps = sorted(parse_eps(e, "callbacks.adversarial.eps") for e in eps)
        self.pgd_steps, self.random_start, self.max_images, self.seed = pgd_steps, random_start, max_images, seed
        self.pgd_step_size = parse_eps(pgd_step_size, "callbacks.adversarial.pgd_step_size") if pgd_step_size is not None else None
        self.results: dict[str, float] = {}

    def _attack(self, name: str, model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, gen: torch.Generator) -> list[torch.Tensor]:
        """The attacked images at every eps of the grid (FGSM from one gradient, eps=0 the images themselves)."""
        if name == "fgsm":
            return fgsm_grid(model, x, y, self.eps)
        return [pgd(model, x, y, eps, self.pgd_steps, self.pgd_step_size, self.random_start, gen) for eps in self.eps]

    def on_test_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        classifier = as_classifier(pl_module)
        prep = classifier.backbone.preprocessing
        device = classifier.device
        mean = torch.tensor(prep.mean, device=device).view(1, 3, 1, 1)
        std = torch.tensor(prep.std, device=device).view(1, 3, 1, 1)
        datamodule = trainer.datamodule  # type: ignore[attr-defined]
        if hasattr(datamodule, "image_loader"):  # pixels, also when the test split's features are cached
            loader = datamodule.image_loader("test")
        else:
            loader = trainer.test_dataloaders
            loader = loader[0] if isinstance(loader, (list, tuple)) else loader
        budget = math.ceil(self.max_images / trainer.world_size) if self.max_images else None
        gen = torch.Generator().manual_seed(self.seed + trainer.global_rank)
        with torch.inference_mode(False), inspecting(pl_module):  # Lightning tests in inference mode; attacks need gradients
            correct = torch.zeros(len(self.attacks), len(self.eps), device=device)
            seen = torch.zeros(1, device=device)
            model = trained_classifier(classifier)
            for images, labels in loader:
                if budget is not None and seen.item() >= budget:
                    break
                take = len(labels) if budget is None else int(min(len(labels), budget - seen.item()))
                x = (images[:take].to(device).float() * std + mean).clamp(0, 1)
                y = labels[:take].to(device)
                with torch.no_grad():
                    clean = (model(x).argmax(-1) == y).sum()
                for a, attack in enumerate(self.attacks):
                    for e, (eps, adv) in enumerate(zip(self.eps, self._attack(attack, model, x, y, gen))):
                        with torch.no_grad():
                            correct[a, e] += clean if eps == 0 else (model(adv).argmax(-1) == y).sum()
                seen += take
        correct = trainer.strategy.reduce(correct, reduce_op="sum")
        seen = trainer.strategy.reduce(seen, reduce_op="sum")
        total = max(1.0, float(seen.item()))
        self.results = {
            f"adv/{attack}_acc@eps={eps_label(eps)}": float(correct[a, e]) / total
            for a, attack in enumerate(self.attacks)
            for e, eps in enumerate(self.eps)
        }
        for key, value in self.results.items():
            pl_module.log(key, value, sync_dist=False)
        if trainer.is_global_zero:
            self._write(trainer, int(total), correct.cpu())

    def _write(self, trainer: pl.Trainer, total: int, correct: torch.Tensor) -> None:
        plt = pyplot()
        self.dirpath.mkdir(parents=True, exist_ok=True)
        with open(self.dirpath / "adversarial.csv", "w", newline="") as fh:
            writer = csv.writer(fh)
            writer.writerow(["attack", "eps", "eps_255", "accuracy", "correct", "images"])
            for a, attack in enumerate(self.attacks):
                for e, eps in enumerate(self.eps):
                    writer.writerow([attack, f"{eps:.6f}", eps_label(eps), f"{float(correct[a, e]) / total:.4f}", int(correct[a, e]), total])
        fig, ax = plt.subplots(figsize=(5, 3.5))
        for a, attack in enumerate(self.attacks):
            ax.plot([e * 255 for e in self.eps], (correct[a] / total).tolist(), marker="o", label=attack.upper())
        ax.set_xlabel("ε (in 1/255 steps of pixel value)")
        ax.set_ylabel("test accuracy")
        ax.set_ylim(0, 1.02)
        ax.set_title(f"Accuracy under L∞ attacks ({total} test images)")
        ax.grid(alpha=0.3)
        ax.legend()
        path = save_figure(fig, self.dirpath / "adversarial_accuracy.png", dpi=110)
        log_images(trainer.loggers, "adv/accuracy_vs_eps", [path], step=trainer.global_step)
        log.info("Adversarial accuracy (%d images): %s", total, {k: round(v, 3) for k, v in self.results.items()})
