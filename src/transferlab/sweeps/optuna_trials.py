"""What both ways of running a study share (transferlab.sweeps.optuna_study: batches through the Hydra launcher;
transferlab.sweeps.optuna_workers: worker processes pulling trials): the storage URL, the search space in Hydra's
sweep syntax, each trial's overrides, and how a finished job is told to its trial."""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Optional

from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.override_parser.types import ChoiceSweep, IntervalSweep, Override, RangeSweep
from omegaconf import DictConfig

from transferlab.core.errors import ConfigError, one_line
from transferlab.sweeps.ddp import quoted
from transferlab.sweeps.records import read_job_record

log = logging.getLogger("transferlab.sweeps.optuna_study")  # one logger name for the study's lines, as before

DONE_STATES = ("COMPLETE", "PRUNED")
SAME_ERROR_STOP = 3  # this many failures in a row with one message: the setup is broken, not the parameters


WORKER_LOST = "WorkerLost"  # job.json error_type of a trial whose worker process ended during it


def storage_url(storage: Optional[str], sweep_dir: str | Path, workers: int = 1) -> str:
    """The study's storage URL, absolute, as every worker and job opens it (callbacks.optuna_pruning.open_storage).

    `journal:<file>` relative to the sweep folder, where the study belongs (the same command finds it again, whatever
    the working directory of the command or of a SLURM job). No `storage`: the sweep folder's study file if there
    is one (a study started with workers resumes with workers=1 and back), else SQLite for one process at a time
    and a journal file for workers. SQLite is refused for workers: N processes writing one SQLite file fail with
    "database is locked" under load and its locking is broken on the network file systems SLURM jobs share."""
    folder = Path(sweep_dir).resolve()
    if storage is None:
        journal, database = folder / "optuna.journal", folder / "optuna.db"
        if journal.exists() or (workers > 1 and not database.exists()):
            return f"journal:{journal}"
        if workers > 1:
            raise ConfigError(
                f"hydra.sweeper.workers={workers}: this sweep's study is in {database} (SQLite, not safe for worker processes); "
                "resume it with hydra.sweeper.workers=1, or start the parallel study in another hydra.sweep.dir"
            )
        return f"sqlite:///{database}"
    if storage.startswith("journal:"):
        if not storage[len("journal:") :].strip():
            raise ConfigError("hydra.sweeper.storage=journal: names no file; e.g. hydra.sweeper.storage=journal:optuna.journal")
        path = folder / Path(storage[len("journal:") :]).expanduser()
        path.parent.mkdir(parents=True, exist_ok=True)
        return f"journal:{path}"
    if workers > 1 and storage.startswith("sqlite"):
        raise ConfigError(
            f"hydra.sweeper.storage={storage}: SQLite is not safe for {workers} worker processes (hydra.sweeper.workers); "
            "use hydra.sweeper.storage=journal:<file> (or null: journal:optuna.journal in the sweep folder), "
            "a server database (postgresql://...), or hydra.sweeper.workers=1"
        )
    return storage


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


def trial_overrides(fixed: Sequence[str], params: dict[str, Any], number: int, url: str) -> list[str]:
    """The overrides of one trial's job: the fixed ones, its parameters, which trial it is and where its study is."""
    return [*fixed, *(_as_override(k, v) for k, v in params.items()), f"hydra.sweeper.trial_number={number}", f"hydra.sweeper.storage={quoted(url)}"]


def count(study: Any, *states: str) -> int:
    from optuna.trial import TrialState

    return len(study.get_trials(deepcopy=False, states=tuple(TrialState[s] for s in states)))


def tell_result(study: Any, trial: Any, ret: Any, n_trials: int) -> tuple[str, Optional[str]]:
    """Tell the study how a trial's job ended (from its job.json and return value): (state, error of a failure)."""
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
    done = count(study, *DONE_STATES)
    best = f"; best so far {study.best_value:.4g} (trial {study.best_trial.number})" if count(study, "COMPLETE") else ""
    shown = f": {value:.4g}" if state == "COMPLETE" else ""
    log.info("trial %d %s%s [%d/%d done]%s", trial.number, state.lower(), shown, done, n_trials, best)
    return state, error
