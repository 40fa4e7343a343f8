"""Settings dataclasses shared by a command's config schema (config.schema) and the code that uses them.

They live below both so that `config` imports no feature package: the schema of transferlab-visualize extends
`IdealSettings`, and insight.ideal optimises with it. No defaults here: the values are in the YAML.
"""

from __future__ import annotations

import dataclasses
from typing import Annotated, Literal, Optional

from transferlab.core.bounds import COUNT, PROBABILITY, SEED, Bounds


@dataclasses.dataclass
class IdealSettings:
    """How an ideal image is optimised. No defaults: the values are in conf/visualize.yaml (the command) and
    conf/callbacks/ideal_class.yaml (the callback), each documented there."""

    steps: Annotated[int, Bounds(ge=1, note="optimisation steps")]
    lr: float
    tv_weight: float
    views: Annotated[int, COUNT]  # augmented copies scored per step (transformation robustness)
    jitter: int  # max shift in pixels
    scale: float  # scale factor in [1 - scale, 1 + scale]
    rotate: float  # degrees, +-
    parameterization: Literal["fourier", "pixel"]
    decorrelate: bool  # optimise in decorrelated colour space
    decay_power: float  # Fourier amplitude ~ 1 / f^decay_power
    stop_prob: Optional[Annotated[float, PROBABILITY]]  # stop early once the 8-bit image reaches this target probability
    seed: Annotated[int, SEED]
