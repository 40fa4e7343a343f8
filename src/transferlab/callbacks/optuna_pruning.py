"""Report a metric to this job's Optuna trial after every validation, and stop the job when the pruner says so.

Also the one place that opens an Optuna storage (the sweeper's study uses the same settings).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Optional

import lightning.pytorch as pl


def open_storage(url: str) -> Any:
    """An Optuna storage from the sweeper's URL: `journal:<file>` (JournalStorage on a file, for worker processes
    and file systems without working fcntl locks; the sweeper passes the file absolute, a relative one here is
    relative to the working directory) or a database URL (SQLite waits for a busy file instead of failing)."""
    import optuna

    if url.startswith("journal:"):
        from optuna.storages.journal import JournalFileBackend

        # the default lock (a symlink) is safe on NFS, and one left by a killed process is broken after 30 s
        return optuna.storages.JournalStorage(JournalFileBackend(str(Path(url[len("journal:") :]).expanduser())))
    engine_kwargs = {"connect_args": {"timeout": 120}} if url.startswith("sqlite") else None  # parallel jobs wait, not fail
    return optuna.storages.RDBStorage(url, engine_kwargs=engine_kwargs)


class OptunaPruning(pl.Callback):
    """Rank 0 talks to the study; every rank gets its decision, so a DDP job stops on all ranks together.

    (optuna-integration's PyTorchLightningPruningCallback needs one more package and reads the decision from
    the storage on every rank; this one is a broadcast.)
    """

    def __init__(self, storage: str, study_name: str, trial_number: int, pruner: Any, monitor: str) -> None:
        """`pruner`: the sweep's optuna pruner (a study loaded without one would use Optuna's default)."""
        self.storage, self.study_name, self.trial_number, self.monitor = storage, study_name, trial_number, monitor
        self.pruner, self._trial = pruner, None  # type: Any, Any

    def _load_trial(self) -> Any:
        import optuna

        storage = open_storage(self.storage)
        study = optuna.load_study(study_name=self.study_name, storage=storage, pruner=self.pruner)
        trial_id = storage.get_trial_id_from_study_id_trial_number(storage.get_study_id_from_name(self.study_name), self.trial_number)
        return optuna.trial.Trial(study, trial_id)

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.sanity_checking or trainer.state.fn != "fit":  # not the selected checkpoint's validation after fit
            return
        epoch, prune, metric = trainer.current_epoch, False, trainer.callback_metrics.get(self.monitor)
        value = float(metric) if metric is not None else math.nan
        if trainer.is_global_zero and math.isfinite(value):
            trial = self._trial = self._trial or self._load_trial()
            trial.report(value, step=epoch)
            prune = trial.should_prune()
        if trainer.world_size > 1:
            prune = trainer.strategy.broadcast(prune, src=0)
        if prune:
            import optuna

            raise optuna.TrialPruned(f"pruned after epoch {epoch}: {self.monitor} = {value:.4g}")


def pruning_callbacks() -> list[OptunaPruning]:
    """[OptunaPruning] when this job is a trial of transferlab's Optuna sweeper (with a pruner), else []."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.utils import instantiate

    if not HydraConfig.initialized():
        return []
    sweeper = HydraConfig.get().sweeper
    number: Optional[int] = sweeper.get("trial_number")
    if number is None or not sweeper.get("pruner") or not sweeper.get("storage"):
        return []
    return [OptunaPruning(sweeper.storage, sweeper.study_name, int(number), instantiate(sweeper.pruner), sweeper.pruning_metric)]
