"""Optuna search over Hydra jobs (`hparams_search=<preset>`, conf/hydra/sweeper/optuna.yaml).

Why our own sweeper and not hydra-optuna-sweeper: its last release pins optuna < 3, and it cannot do what a
long search needs: a failed or NaN trial raises out of the sweep, an interrupted study is not resumed, and
jobs never see their trial, so nothing can be pruned. This one keeps Hydra's plugin interface (any launcher:
basic, local, SLURM) and its search-space syntax, and drives a maintained Optuna by ask/tell:

- storage: SQLite in the sweep folder unless `storage` names another database; the same command resumes;
- a trial whose job was killed (RUNNING in the storage when the sweep starts) is marked failed and its
  parameters are run again first;
- each job reports `pruning_metric` per epoch to its trial and stops when the pruner says so (PRUNED);
- a job that failed or returned NaN is a FAIL trial; the study goes on (up to `max_failures`).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Optional

from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.override_parser.types import ChoiceSweep, IntervalSweep, Override, RangeSweep
from omegaconf import DictConfig, OmegaConf

from transferlab.callbacks.optuna_pruning import open_storage
from transferlab.core.errors import ConfigError, one_line
from transferlab.sweeps.ddp import quoted
from transferlab.sweeps.records import read_job_record, write_job_record

log = logging.getLogger(__name__)

DONE_STATES = ("COMPLETE", "PRUNED")
SAME_ERROR_STOP = 3  # this many failures in a row with one message: the setup is broken, not the parameters


def storage_url(storage: Optional[str], sweep_dir: str | Path) -> str:
    return storage or f"sqlite:///{Path(sweep_dir).resolve() / 'optuna.db'}"


def distribution(override: Override) -> Any:
    """Hydra sweep syntax -> Optuna distribution: choice(...), range(a,b[,step]), interval(a,b), tag(log, ...)."""
    from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

    value = override.value()
    if isinstance(value, ChoiceSweep):
        return CategoricalDistribution(list(override.sweep_string_iterator()))
    if isinstance(value, RangeSweep):
        start, stop, step = value.start, value.stop, value.step
        if isinstance(start, int) and isinstance(stop, int) and isinstance(step, int) and step > 0 and stop > start:
            return IntDistribution(start, start + (stop - start - 1) // step * step, step=step)  # exactly list(range(start, stop, step))
        values = list(override.sweep_iterator())
        if not values:
            raise ConfigError(f"hydra.sweeper.params.{override.key_or_group!s}: {override.input_line!s} is empty; range(a,b,step) stops before b")
        return CategoricalDistribution(values)  # type: ignore[arg-type]
    if isinstance(value, IntervalSweep):
        log_scale, low, high = "log" in value.tags, value.start, value.end
        if isinstance(low, int) and isinstance(high, int) and "float" not in value.tags:
            return IntDistribution(low, high, log=log_scale)
        return FloatDistribution(float(low or 0.0), float(high or 0.0), log=log_scale)
    raise ConfigError(
        f"hydra.sweeper.params.{override.key_or_group!s}: {override.input_line!s} is not a sweep; "
        "use choice(a,b), range(1,5), interval(1e-4,1e-1) or tag(log, interval(...))"
    )


def search_space(params: DictConfig | dict, arguments: Sequence[str], config_loader: Any) -> tuple[dict[str, Any], list[str]]:
    """(distributions by override key, fixed overrides): sweeps on the command line join the preset's `params`."""
    lines = [f"{key!s}={value}" for key, value in (params or {}).items()] + list(arguments)
    space: dict[str, Any] = {}
    fixed: list[str] = []
    for override in OverridesParser.create(config_loader=config_loader).parse_overrides(lines):
        if override.is_sweep_override():
            space[override.get_key_element()] = distribution(override)
        else:
            fixed.append(str(override.input_line))
    if not space:
        raise ConfigError(
            "hydra.sweeper.params: the search space is empty; list parameters in the hparams_search "
            "preset or sweep one on the command line, e.g. 'optimizer.lr=interval(1e-4,1e-1)'"
        )
    return space, fixed


def _as_override(key: str, value: Any) -> str:
    return f"{key}={value!r}" if isinstance(value, float) else f"{key}={value}"


class OptunaStudy:
    """One study, run batch by batch through a Hydra launcher until `n_trials` are complete or pruned."""

    def __init__(self, sweeper_cfg: DictConfig, sweep_dir: Path, launcher: Any, config_loader: Any, validate: Any) -> None:
        self.cfg, self.sweep_dir, self.launcher, self.config_loader, self.validate = sweeper_cfg, sweep_dir, launcher, config_loader, validate

    def run(self, arguments: Sequence[str]) -> Any:
        import optuna
        from filelock import FileLock, Timeout
        from hydra.utils import instantiate

        space, fixed = search_space(self.cfg.params, arguments, self.config_loader)
        self.sweep_dir.mkdir(parents=True, exist_ok=True)
        try:
            lock = FileLock(str(self.sweep_dir / ".optuna.lock")).acquire(timeout=0)
        except Timeout:
            raise ConfigError(
                f"hydra.sweep.dir: another Optuna sweep is running in {self.sweep_dir}; wait for it or choose another hydra.sweep.dir"
            ) from None
        with lock:
            url = storage_url(self.cfg.storage, self.sweep_dir)
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
            self._loop(study, space, fixed, url)
            return self._write_results(study, url)

    def _retry_interrupted(self, study: Any, storage: Any) -> None:
        """RUNNING at start means its job was killed with the sweep: mark it failed and run its parameters again."""
        from optuna.trial import TrialState

        study_id = storage.get_study_id_from_name(study.study_name)
        for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
            trial_id = storage.get_trial_id_from_study_id_trial_number(study_id, trial.number)
            storage.set_trial_state_values(trial_id, TrialState.FAIL)
            study.enqueue_trial(trial.params, user_attrs={"retry_of": trial.number})
            self._mark_interrupted(trial.number)
            log.warning("trial %d was interrupted: marked failed, its parameters run again", trial.number)

    def _mark_interrupted(self, number: int) -> None:
        for path in self.sweep_dir.glob("**/job.json"):
            record = read_job_record(path.parent)
            if record.get("trial") == number and record.get("status") == "running":
                note = {"status": "interrupted", "error": "killed with the sweep; its parameters ran again"}
                write_job_record(path.parent, {**record, **note})

    def _count(self, study: Any, *states: str) -> int:
        from optuna.trial import TrialState

        return len(study.get_trials(deepcopy=False, states=tuple(TrialState[s] for s in states)))

    def _loop(self, study: Any, space: dict[str, Any], fixed: list[str], url: str) -> None:
        from optuna.trial import TrialState

        n_trials, n_jobs = int(self.cfg.n_trials), max(1, int(self.cfg.n_jobs))
        max_failures = int(self.cfg.max_failures) if self.cfg.get("max_failures") is not None else n_trials
        failures, errors = 0, []  # type: int, list[Optional[str]]
        while (done := self._count(study, *DONE_STATES)) < n_trials:
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
            batch = [
                [
                    *fixed,
                    *(_as_override(k, v) for k, v in t.params.items()),
                    f"hydra.sweeper.trial_number={t.number}",
                    f"hydra.sweeper.storage={quoted(url)}",
                ]
                for t in trials
            ]
            try:
                self.validate(batch)  # the jobs' configs compose (a search-space key that does not exist stops here)
            except Exception:
                for trial in trials:
                    study.tell(trial, state=TrialState.FAIL)
                raise
            returns = self.launcher.launch(batch, initial_job_idx=trials[0].number)
            for trial, ret in zip(trials, returns):
                state, error = self._tell(study, trial, ret)
                failures += state == "FAIL"
                errors.append(error if state == "FAIL" else None)

    def _tell(self, study: Any, trial: Any, ret: Any) -> tuple[str, Optional[str]]:
        from optuna.trial import TrialState

        job_dir = Path(ret.hydra_cfg.hydra.runtime.output_dir)
        record = read_job_record(job_dir)
        trial.set_user_attr("job_dir", str(job_dir))
        try:
            value, error = ret.return_value, record.get("error")
        except Exception as exc:  # noqa: BLE001 - raised past run_sweep_job (the launcher lost the job)
            value, error = None, one_line(exc)
        if record.get("status") == "pruned":
            study.tell(trial, state=TrialState.PRUNED)
            state = "PRUNED"
        elif record.get("status") == "completed" and isinstance(value, (int, float)) and math.isfinite(value):
            study.tell(trial, float(value))
            state = "COMPLETE"
        else:
            error = error or f"returned {value}"
            trial.set_user_attr("error", error[:1000])
            study.tell(trial, state=TrialState.FAIL)
            state = "FAIL"
        done = self._count(study, *DONE_STATES)
        best = f"; best so far {study.best_value:.4g} (trial {study.best_trial.number})" if self._count(study, "COMPLETE") else ""
        log.info(
            "trial %d %s%s [%d/%d done]%s",
            trial.number,
            state.lower(),
            f": {value:.4g}" if state == "COMPLETE" else "",
            done,
            self.cfg.n_trials,
            best,
        )
        return state, error

    def _write_results(self, study: Any, url: str) -> dict[str, Any]:
        results: dict[str, Any] = {
            "study_name": study.study_name,
            "storage": url,
            "direction": self.cfg.direction,
            "trials": {s.lower(): self._count(study, s) for s in ("COMPLETE", "PRUNED", "FAIL")},
        }
        if results["trials"]["complete"]:
            best = study.best_trial
            results.update(best_trial=best.number, best_value=best.value, best_params=best.params, best_job_dir=best.user_attrs.get("job_dir"))
        OmegaConf.save(OmegaConf.create(results), self.sweep_dir / "optimization_results.yaml")
        log.info("Optuna study %s: %s", study.study_name, results)
        return results
