"""Optuna search over Hydra jobs (`hparams_search=<preset>`, conf/hydra/sweeper/optuna.yaml).

Why our own sweeper and not hydra-optuna-sweeper: its last release pins optuna < 3, and it cannot do what a
long search needs: a failed or NaN trial raises out of the sweep, an interrupted study is not resumed, and
jobs never see their trial, so nothing can be pruned. This one keeps Hydra's plugin interface (any launcher:
basic, local, SLURM) and its search-space syntax, and drives a maintained Optuna by ask/tell:

- storage: SQLite in the sweep folder unless `storage` names another database or `journal:<file>` (Optuna's
  JournalStorage on a file; a relative file is in the sweep folder); the same command resumes;
- `workers=1`: trials are launched `n_jobs` at a time through the Hydra launcher; `workers=N`: N processes each
  pull one trial at a time from the study (transferlab.sweeps.optuna_workers), so a slow trial holds no other;
  with no `storage` they share `journal:<sweep dir>/optuna.journal`, and SQLite is refused (see storage_url);
- a trial whose job was killed (RUNNING in the storage when the sweep starts) is marked failed and its
  parameters are run again first;
- each job reports `pruning_metric` per epoch to its trial and stops when the pruner says so (PRUNED);
- a job that failed or returned NaN is a FAIL trial; the study goes on (up to `max_failures`).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Optional

from omegaconf import DictConfig, OmegaConf

from transferlab.callbacks.optuna_pruning import open_storage
from transferlab.core.errors import ConfigError
from transferlab.sweeps.optuna_trials import DONE_STATES, SAME_ERROR_STOP, WORKER_LOST, count, search_space, storage_url, tell_result, trial_overrides
from transferlab.sweeps.optuna_workers import run_study_workers
from transferlab.sweeps.records import read_job_record, write_job_record

log = logging.getLogger(__name__)


class OptunaStudy:
    """One study, run batch by batch through a Hydra launcher until `n_trials` are complete or pruned."""

    def __init__(self, sweeper_cfg: DictConfig, sweep_dir: Path, launcher: Any, config_loader: Any, validate: Any, **job: Any) -> None:
        """`job`: config, hydra_context, task_function: what worker processes need to run jobs themselves."""
        self.cfg, self.sweep_dir, self.launcher, self.config_loader, self.validate = sweeper_cfg, sweep_dir, launcher, config_loader, validate
        self.job = job

    def run(self, arguments: Sequence[str]) -> Any:
        import optuna
        from filelock import FileLock, Timeout
        from hydra.utils import instantiate

        space, fixed = search_space(self.cfg.params, arguments, self.config_loader)
        workers = self.cfg.get("workers", 1)
        if not isinstance(workers, int) or isinstance(workers, bool) or workers < 1:
            raise ConfigError(f"hydra.sweeper.workers: expected a whole number >= 1 (1 = trials in batches of n_jobs), got {workers!r}")
        if workers > 1 and int(self.cfg.n_jobs) > 1:
            raise ConfigError(
                f"hydra.sweeper.n_jobs={self.cfg.n_jobs} with hydra.sweeper.workers={workers}: choose one; "
                "workers each run one trial at a time (n_jobs is the batch size of workers=1)"
            )
        self.sweep_dir.mkdir(parents=True, exist_ok=True)
        try:
            lock = FileLock(str(self.sweep_dir / ".optuna.lock")).acquire(timeout=0)
        except Timeout:
            raise ConfigError(
                f"hydra.sweep.dir: another Optuna sweep is running in {self.sweep_dir}; wait for it or choose another hydra.sweep.dir"
            ) from None
        with lock:
            url = storage_url(self.cfg.storage, self.sweep_dir, workers)
            storage = open_storage(url)
            study = optuna.create_study(
                study_name=self.cfg.study_name,
                storage=storage,
                load_if_exists=True,
                direction=self.cfg.direction,
                sampler=instantiate(self.cfg.sampler),
                pruner=instantiate(self.cfg.pruner) if self.cfg.get("pruner") else None,
            )
            self._retry_interrupted(study, storage)
            if workers > 1:
                run_study_workers(self, study, space, fixed, url, workers)
            else:
                self._loop(study, space, fixed, url)
            return self._write_results(study, url)

    def _retry_interrupted(self, study: Any, storage: Any) -> None:
        """RUNNING at start means its job was killed (with the sweep, or its worker alone): mark it failed and run its
        parameters again, first. (No other process runs this study now: the sweep folder's lock says so.)"""
        from optuna.trial import TrialState

        study_id = storage.get_study_id_from_name(study.study_name)
        for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
            trial_id = storage.get_trial_id_from_study_id_trial_number(study_id, trial.number)
            storage.set_trial_user_attr(trial_id, "error", "interrupted: its job was killed; its parameters run again")
            storage.set_trial_state_values(trial_id, TrialState.FAIL)
            study.enqueue_trial(trial.params, user_attrs={"retry_of": trial.number})
            self._mark_interrupted(trial.number)
            log.warning("trial %d was interrupted: marked failed, its parameters run again", trial.number)

    def _mark_interrupted(self, number: int) -> None:
        for path in self.sweep_dir.glob("**/job.json"):
            record = read_job_record(path.parent)
            lost = record.get("status") == "running" or record.get("error_type") == WORKER_LOST
            if record.get("trial") == number and lost:
                note = {"status": "interrupted", "error": "killed during the trial; its parameters ran again"}
                write_job_record(path.parent, {**record, **note})

    def _loop(self, study: Any, space: dict[str, Any], fixed: list[str], url: str) -> None:
        from optuna.trial import TrialState

        n_trials, n_jobs = int(self.cfg.n_trials), max(1, int(self.cfg.n_jobs))
        max_failures = int(self.cfg.max_failures) if self.cfg.get("max_failures") is not None else n_trials
        failures, errors = 0, list[Optional[str]]()
        while (done := count(study, *DONE_STATES)) < n_trials:
            if failures >= max_failures:
                log.error("stopping the study: %d trials failed in this run (hydra.sweeper.max_failures=%d)", failures, max_failures)
                return
            if len(errors) >= SAME_ERROR_STOP and errors[-1] and len(set(errors[-SAME_ERROR_STOP:])) == 1:
                log.error(
                    "stopping the study: %d trials in a row failed with the same error, a problem of the setup rather than of the parameters: %s",
                    SAME_ERROR_STOP,
                    errors[-1],
                )
                return
            trials = [study.ask(space) for _ in range(min(n_jobs, n_trials - done))]
            batch = [trial_overrides(fixed, t.params, t.number, url) for t in trials]
            try:
                self.validate(batch)  # the jobs' configs compose (a search-space key that does not exist stops here)
            except Exception:
                for trial in trials:
                    study.tell(trial, state=TrialState.FAIL)
                raise
            returns = self.launcher.launch(batch, initial_job_idx=trials[0].number)
            for trial, ret in zip(trials, returns):
                state, error = tell_result(study, trial, ret, int(self.cfg.n_trials))
                failures += state == "FAIL"
                errors.append(error if state == "FAIL" else None)

    def _write_results(self, study: Any, url: str) -> dict[str, Any]:
        results: dict[str, Any] = {
            "study_name": study.study_name,
            "storage": url,
            "direction": self.cfg.direction,
            "trials": {s.lower(): count(study, s) for s in ("COMPLETE", "PRUNED", "FAIL")},
        }
        if results["trials"]["complete"]:
            best = study.best_trial
            results.update(best_trial=best.number, best_value=best.value, best_params=best.params, best_job_dir=best.user_attrs.get("job_dir"))
        OmegaConf.save(OmegaConf.create(results), self.sweep_dir / "optimization_results.yaml")
        log.info("Optuna study %s: %s", study.study_name, results)
        return results
