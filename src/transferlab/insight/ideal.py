""" "Ideal class" images: optimise an input so a classifier names a target class.

Cross-entropy towards the target plus a total-variation penalty, as in the lesson, made robust the way feature
visualisation work does it (Olah et al., Distill 2017): every step scores a batch of randomly jittered, scaled
and rotated views, and the image can be parameterised in a decorrelated-colour Fourier basis, which favours
the low frequencies that other networks also see. The result is judged on its saved 8-bit PNG.
"""

from __future__ import annotations

import dataclasses
import math
import time
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import nn

from transferlab.core.settings import IdealSettings
from transferlab.insight.pixels import PixelClassifier, quantize, total_variation

# Lucid's square root of ImageNet's colour covariance: decorrelated channels -> RGB.
_COLOR_SQRT = torch.tensor([[0.26, 0.09, 0.02], [0.27, 0.00, -0.05], [0.27, -0.09, 0.03]])
_COLOR_SQRT = _COLOR_SQRT / _COLOR_SQRT.norm(dim=0).max()


class ImageParam(nn.Module):
    """An image [1, 3, S, S] in (0, 1) from free parameters: pixels, or a scaled Fourier spectrum."""

    scale: torch.Tensor

    def __init__(self, size: int, parameterization: str, decorrelate: bool, decay_power: float, generator: torch.Generator) -> None:
        super().__init__()
        if parameterization not in ("fourier", "pixel"):
            raise ValueError(f"parameterization: expected fourier or pixel, got {parameterization!r}")
        self.size, self.fourier, self.decorrelate = size, parameterization == "fourier", decorrelate
        if self.fourier:
            fy = torch.fft.fftfreq(size)[:, None]
            fx = torch.fft.rfftfreq(size)[None, :]
            freqs = (fx**2 + fy**2).sqrt()
            self.register_buffer("scale", 1.0 / freqs.clamp(min=1.0 / size) ** decay_power)
            self.spectrum = nn.Parameter(0.01 * torch.randn(1, 3, size, size // 2 + 1, 2, generator=generator))
        else:
            self.pixels = nn.Parameter(0.01 * torch.randn(1, 3, size, size, generator=generator))

    def forward(self) -> torch.Tensor:
        if self.fourier:
            spectrum = torch.view_as_complex(self.spectrum) * self.scale
            image = torch.fft.irfft2(spectrum, s=(self.size, self.size), norm="ortho") / 4.0
        else:
            image = self.pixels
        if self.decorrelate:
            image = torch.einsum("ij,bjhw->bihw", _COLOR_SQRT.to(image), image)
        return torch.sigmoid(image)


def random_views(image: torch.Tensor, n: int, jitter: int, scale: float, rotate: float, generator: torch.Generator) -> torch.Tensor:
    """n views of one image: the image itself, then random shift / scale / rotation (reflect padding)."""
    if n <= 1:
        return image
    size = image.shape[-1]
    k = n - 1
    angle = (torch.rand(k, generator=generator) * 2 - 1) * math.radians(rotate)
    factor = 1 + (torch.rand(k, generator=generator) * 2 - 1) * scale
    shift = (torch.rand(k, 2, generator=generator) * 2 - 1) * (2 * jitter / size)
    cos, sin = torch.cos(angle) / factor, torch.sin(angle) / factor
    theta = torch.stack([torch.stack([cos, -sin, shift[:, 0]], 1), torch.stack([sin, cos, shift[:, 1]], 1)], 1).to(image)
    grid = F.affine_grid(theta, [k, 3, size, size], align_corners=False)
    moved = F.grid_sample(image.expand(k, -1, -1, -1), grid, mode="bilinear", padding_mode="reflection", align_corners=False)
    return torch.cat([image, moved])


@dataclasses.dataclass
class IdealResult:
    image: torch.Tensor  # [3, S, S], on the 8-bit grid
    target_prob: float  # of the 8-bit image
    steps: int
    seconds: float
    history: list[tuple[int, float, float]]  # (step, target prob of the 8-bit image, TV)


def ideal_image(
    model: PixelClassifier, target: int, settings: IdealSettings, progress: Optional[Callable[[int, float, float], None]] = None
) -> IdealResult:
    """Optimise an image of the model's input size towards class `target`."""
    generator = torch.Generator().manual_seed(settings.seed)
    device = next(model.parameters()).device
    param = ImageParam(model.input_size, settings.parameterization, settings.decorrelate, settings.decay_power, generator).to(device)
    optimizer = torch.optim.Adam(param.parameters(), lr=settings.lr)
    labels = torch.full((max(1, settings.views),), target, device=device)
    history: list[tuple[int, float, float]] = []
    start = time.perf_counter()
    step = 0
    for step in range(1, settings.steps + 1):
        image = param()
        views = random_views(image, settings.views, settings.jitter, settings.scale, settings.rotate, generator)
        loss = F.cross_entropy(model(views), labels) + settings.tv_weight * total_variation(image)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if step % 16 == 0 or step == settings.steps:
            with torch.no_grad():
                final = quantize(param())
                prob = float(model.probabilities(final)[0, target])
                tv = float(total_variation(final))
            history.append((step, prob, tv))
            if progress is not None:
                progress(step, prob, tv)
            if settings.stop_prob is not None and prob >= settings.stop_prob:
                break
    with torch.no_grad():
        final = quantize(param())[0]
        prob = float(model.probabilities(final[None])[0, target])
    return IdealResult(final.cpu(), prob, step, time.perf_counter() - start, history)
