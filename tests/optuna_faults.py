"""Test-only callbacks for parallel Optuna studies: a trial that is slow on purpose, a trial that hangs until killed.

Keyed by the job's trial number (hydra.sweeper.trial_number), so that which trial is slow does not depend on the
sampler; the job itself is real, the test kills its process with a real signal.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Optional

import lightning.pytorch as pl


def _trial() -> Optional[int]:
    from hydra.core.hydra_config import HydraConfig

    number = HydraConfig.get().sweeper.get("trial_number")
    return None if number is None else int(number)


def _completed_trials() -> int:
    """COMPLETE trials in this job's study, read from its storage as the sweeper's workers write it."""
    import optuna
    from hydra.core.hydra_config import HydraConfig

    from transferlab.callbacks.optuna_pruning import open_storage

    sweeper = HydraConfig.get().sweeper
    study = optuna.load_study(study_name=sweeper.study_name, storage=open_storage(sweeper.storage))
    return len(study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,)))


class SlowTrial(pl.Callback):
    """Trial `slow` waits, before it trains, until `wait_for` other trials of its study are complete (or `timeout`
    s: if they cannot finish while it runs, it goes on late and the test's timestamps show it). Trial `hang` writes
    its pid to `marker` and waits to be killed."""

    def __init__(self, slow: int, wait_for: int, hang: Optional[int] = None, marker: Optional[str] = None, timeout: float = 60.0) -> None:
        self.slow, self.wait_for, self.hang, self.marker, self.timeout = slow, wait_for, hang, marker, timeout

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        number, deadline = _trial(), time.monotonic() + self.timeout
        if number == self.hang and self.marker:
            Path(self.marker + ".tmp").write_text(str(os.getpid()))
            os.replace(self.marker + ".tmp", self.marker)  # the test reads a whole pid
            while time.monotonic() < deadline + 240:
                time.sleep(0.1)
        if number == self.slow:
            while _completed_trials() < self.wait_for and time.monotonic() < deadline:
                time.sleep(0.2)


def study_trials(sweep: Path) -> list:
    """The trials of a `hparams_search=lite0_frozen` study kept in <sweep>/optuna.journal (workers > 1)."""
    import optuna

    from transferlab.callbacks.optuna_pruning import open_storage

    storage = open_storage(f"journal:{sweep / 'optuna.journal'}")
    return optuna.load_study(study_name="lite0_frozen", storage=storage).get_trials(deepcopy=False)
