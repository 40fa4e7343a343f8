"""What this process is part of: a Hydra sweep (and which Optuna trial), which rank of a distributed run.

Low-level on purpose: loggers, error reporting, config printing and sweep bookkeeping all ask these questions,
and none of them may import the commands or the sweep machinery to do so.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode


def in_sweep() -> bool:
    """True inside a job of a Hydra multirun (grid or Optuna), False for a single run or outside Hydra."""
    return HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN


def is_global_zero() -> bool:
    """Rank 0 of a distributed run, or a single process (SLURM multi-task jobs run each job once per rank)."""
    from lightning.pytorch.utilities import rank_zero_only

    return getattr(rank_zero_only, "rank", 0) == 0


def trial_number(hydra_cfg: Any) -> Optional[int]:
    """The Optuna trial this job runs, when transferlab's Optuna sweeper launched it."""
    number = (hydra_cfg.get("sweeper") or {}).get("trial_number")
    return None if number is None else int(number)


def sweep_identity() -> Optional[tuple[str, str]]:
    """(group, run name) of this job when it is part of a multirun: the sweep folder, the job's overrides."""
    if not in_sweep():
        return None
    hydra_cfg = HydraConfig.get()
    sweep_dir = Path(hydra_cfg.sweep.dir)
    group = f"{sweep_dir.parent.name}/{sweep_dir.name}" if sweep_dir.parent.name not in ("", ".") else sweep_dir.name
    return group, f"{hydra_cfg.job.num}: {hydra_cfg.job.override_dirname or 'defaults'}"[:120]
