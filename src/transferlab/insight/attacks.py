"""L-infinity attacks in pixel space [0, 1] (normalisation lives inside the model): FGSM and PGD.

Untargeted attacks (evaluation) keep, per image, the first iterate that fooled the model, so "robust" means
no step of the attack ever changed the prediction. The targeted attack on one image works on the 8-bit grid:
its result is the file a person would save, and its target probability is measured on that file.
"""

from __future__ import annotations

import dataclasses
import time
from fractions import Fraction
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from transferlab.core.errors import ConfigError
from transferlab.insight.pixels import quantize


def parse_eps(value: str | float | int, key: str = "eps") -> float:
    """`4/255`, `0.0157` or `0`: a perturbation bound in pixel units."""
    try:
        eps = float(Fraction(str(value).strip()))
    except (ValueError, ZeroDivisionError):
        raise ConfigError(f"{key}: {value!r} is not a number or a fraction like 4/255") from None
    if not 0 <= eps <= 1:
        raise ConfigError(f"{key}: {value} must lie in [0, 1] (pixel units; 8/255 is a common bound)")
    return eps


def _gradient(model: nn.Module, x: torch.Tensor, labels: torch.Tensor, targeted: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(gradient of the loss to ascend, logits): away from `labels`, or towards them when targeted."""
    with torch.enable_grad():
        x = x.detach().requires_grad_(True)
        logits = model(x)
        loss = F.cross_entropy(logits, labels, reduction="sum")
        (grad,) = torch.autograd.grad(-loss if targeted else loss, x)
    return grad, logits.detach()


def fgsm(model: nn.Module, x: torch.Tensor, labels: torch.Tensor, eps: float, targeted: bool = False) -> torch.Tensor:
    """One signed-gradient step of size eps (Goodfellow et al. 2015)."""
    return fgsm_grid(model, x, labels, [eps], targeted)[0]


def fgsm_grid(model: nn.Module, x: torch.Tensor, labels: torch.Tensor, eps: Sequence[float], targeted: bool = False) -> list[torch.Tensor]:
    """FGSM at every bound in `eps` from one gradient: the step's direction does not depend on its size."""
    if all(e == 0 for e in eps):
        return [x.clone() for _ in eps]
    grad, _ = _gradient(model, x, labels, targeted)
    direction = grad.sign()
    return [x.clone() if e == 0 else (x + e * direction).clamp(0, 1).detach() for e in eps]


def pgd(
    model: nn.Module,
    x: torch.Tensor,
    labels: torch.Tensor,
    eps: float,
    steps: int = 10,
    step_size: Optional[float] = None,
    random_start: bool = False,
    generator: Optional[torch.Generator] = None,
) -> torch.Tensor:
    """Untargeted projected gradient descent (Madry et al. 2018); per image, the first fooling iterate wins.

    An image that is fooled is done: the next steps run on the images still classified right only, which gives
    the same result (the loss is a sum over images, the model in eval mode) for a fraction of the work at large eps.
    """
    if eps == 0 or steps <= 0:
        return x.clone()
    alpha = step_size if step_size is not None else 2.5 * eps / steps
    adv = x.clone()
    if random_start:
        noise = torch.rand(x.shape, generator=generator).to(x) * 2 - 1
        adv = (x + eps * noise).clamp(0, 1)
    best = adv.clone()
    active = torch.arange(len(x), device=x.device)  # not fooled by any iterate so far
    for _ in range(steps):
        if not len(active):
            break
        grad, logits = _gradient(model, adv[active], labels[active], targeted=False)
        fooled = logits.argmax(-1) != labels[active]
        best[active[fooled]] = adv[active[fooled]]
        active, grad = active[~fooled], grad[~fooled]
        step = adv[active] + alpha * grad.sign()
        adv[active] = torch.min(torch.max(step, x[active] - eps), x[active] + eps).clamp(0, 1).detach()
    best[active] = adv[active]  # the last iterate, whether it fools the model or not
    return best.detach()


@dataclasses.dataclass
class TargetedResult:
    adversarial: torch.Tensor  # [3, H, W] on the 8-bit grid, |adversarial - original| <= eps
    target_prob: float  # of the 8-bit image
    steps: int
    seconds: float


def targeted_attack(
    model: nn.Module,
    image: torch.Tensor,
    target: int,
    eps: float,
    steps: int = 200,
    step_size: Optional[float] = None,
    random_start: bool = False,
    stop_prob: Optional[float] = None,
    seed: int = 0,
) -> TargetedResult:
    """Targeted PGD on one 8-bit image: the 8-bit candidate with the highest target probability is kept.

    Every iterate is rounded to the 8-bit grid and projected again, so the bound holds for the saved file, not
    just for the float tensor that was optimised.
    """
    x = image[None]
    labels = torch.tensor([target], device=x.device)
    alpha = step_size if step_size is not None else max(eps / 4, 0.25 / 255)
    generator = torch.Generator().manual_seed(seed)
    adv = x.clone()
    if random_start and eps > 0:
        adv = (x + eps * (torch.rand(x.shape, generator=generator).to(x) * 2 - 1)).clamp(0, 1)
    lower, upper = (x - eps).clamp(0, 1), (x + eps).clamp(0, 1)
    # The 8-bit levels inside the bound (rounding x +- eps could step outside it).
    lower_q, upper_q = torch.ceil(lower * 255 - 1e-4) / 255, torch.floor(upper * 255 + 1e-4) / 255
    best, best_prob, start, step = quantize(x), -1.0, time.perf_counter(), 0
    for step in range(1, steps + 1):  # noqa: B007 - the steps taken are reported after the loop
        grad, _ = _gradient(model, adv, labels, targeted=True)
        adv = torch.min(torch.max(adv + alpha * grad.sign(), lower), upper).detach()
        candidate = torch.min(torch.max(quantize(adv), lower_q), upper_q)
        with torch.no_grad():
            prob = float(model(candidate).softmax(-1)[0, target])
        if prob > best_prob:
            best, best_prob = candidate, prob
        if stop_prob is not None and best_prob >= stop_prob:
            break
    return TargetedResult(best[0].detach(), best_prob, step, time.perf_counter() - start)
