"""`hydra.sweeper.workers=N`: N processes pull trials from one Optuna study, so a slow trial holds no other.

Why: with workers=1 the sweeper launches `n_jobs` trials as one Hydra batch and waits for the slowest before it
asks for more (hydra #3091; the maintainers' advice is several single-job workers sharing one study). Here each
worker loops on its own: ask the study for a trial, run the trial's Hydra job in the worker's process (its own job
folder `<sweep dir>/<trial number>`, job.json, the pruning callback: as under a launcher), tell the study how it
ended, ask again. The asking happens under a file lock in the sweep folder, so N workers never start more than
`n_trials` between them. All they share is the storage and the sweep folder.

How workers start: with the basic launcher (the default) as N local processes (`python -m` this module, the worker
pickled with cloudpickle as submitit does); with hydra/launcher=local or slurm as N submitit jobs built from the
launcher's settings: on SLURM one job array of N tasks (`array_parallelism` caps how many run at once), each running
trials until the study has enough, so its `timeout_min` must cover several trials.

A worker stops when done (complete or pruned, over every run of the study) plus running trials reach `n_trials`,
or when this run's failed trials reach `max_failures`, or after SAME_ERROR_STOP failures in a row with one
error; counted from the storage, so every worker reaches the same decision.

A worker killed during a trial (OOM killer, a lost SLURM node, a kill): its trial stays RUNNING and the others stop
short of it. When all workers have ended, the sweep records that trial's job as failed (job.json: the summary
lists it, the command exits 1); re-running the command applies the study's rule for interrupted trials: the trial is
marked failed and its parameters run again first (OptunaStudy._retry_interrupted). Not Optuna's heartbeat with
RetryFailedTrialCallback: optuna 5.1's JournalStorage does not implement heartbeats (only RDBStorage does), and a
rule that needs a database server would not serve the file-based default.
"""

from __future__ import annotations

import logging
import os
import socket
import subprocess
import sys
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Optional

from omegaconf import DictConfig, OmegaConf, open_dict

from transferlab.callbacks.optuna_pruning import open_storage
from transferlab.core.errors import ConfigError, one_line
from transferlab.sweeps.optuna_trials import DONE_STATES, SAME_ERROR_STOP, WORKER_LOST, count, tell_result, trial_overrides
from transferlab.sweeps.records import ERROR_FILE, read_job_record, write_job_record

log = logging.getLogger(__name__)

ASK_LOCK = ".optuna.ask.lock"  # held while a worker decides whether to ask and asks
PAYLOAD = ".optuna_worker.pkl"  # the pickled worker, for local processes (removed when they end)


def stop_reason(study: Any, settings: dict[str, Any], run_id: str) -> tuple[bool, Optional[str]]:
    """(stop asking, why when it is a failure) from the storage: the same answer in every worker."""
    from optuna.trial import TrialState

    trials = study.get_trials(deepcopy=False)
    n_trials = int(settings["n_trials"])
    running = sum(t.state == TrialState.RUNNING for t in trials)
    if count(study, *DONE_STATES) + running >= n_trials:
        return True, None
    ours = sorted((t for t in trials if t.user_attrs.get("run") == run_id and t.state.is_finished()), key=lambda t: t.datetime_complete)
    failed = sum(t.state == TrialState.FAIL for t in ours)
    max_failures = n_trials if settings.get("max_failures") is None else int(settings["max_failures"])
    if failed >= max_failures:
        return True, f"stopping the study: {failed} trials failed in this run (hydra.sweeper.max_failures={max_failures})"
    last = ours[-SAME_ERROR_STOP:]
    errors = {t.user_attrs.get("error") for t in last}
    if len(last) == SAME_ERROR_STOP and all(t.state == TrialState.FAIL for t in last) and len(errors) == 1 and None not in errors:
        return True, (
            f"stopping the study: {SAME_ERROR_STOP} trials in a row failed with the same error, "
            f"a problem of the setup rather than of the parameters: {errors.pop()}"
        )
    return False, None


class TrialWorker:
    """One worker's loop, with what Hydra needs to run jobs in the worker's process (pickled into it)."""

    def __init__(self, study: Any, space: dict[str, Any], fixed: list[str], url: str, run_id: str) -> None:
        """`study`: the OptunaStudy of the sweep (its settings, sweep folder and Hydra job context are copied)."""
        from hydra.core.singleton import Singleton

        self.settings: dict[str, Any] = OmegaConf.to_container(study.cfg, resolve=True)  # type: ignore[assignment]
        self.sweep_dir, self.space, self.fixed, self.url, self.run_id = Path(study.sweep_dir).resolve(), space, fixed, url, run_id
        self.config: DictConfig = study.job["config"]
        self.hydra_context, self.task_function = study.job["hydra_context"], study.job["task_function"]
        self.singleton_state = Singleton.get_state()
        self.parent: Optional[int] = None  # a local worker process: the sweep's pid, to stop asking when it is gone

    def __call__(self, index: int) -> int:
        """Run trials until the study needs no more; the number this worker ran. `index` varies the sampler's seed,
        so that N workers with one `seed` do not draw the same parameters."""
        import optuna
        from filelock import FileLock
        from hydra.core.singleton import Singleton
        from hydra.core.utils import configure_log, setup_globals
        from hydra.utils import instantiate

        Singleton.set_state(self.singleton_state)
        setup_globals()
        configure_log(self.config.hydra.hydra_logging, self.config.hydra.verbose)
        sampler = dict(self.settings["sampler"] or {})
        if sampler.get("seed") is not None:
            sampler["seed"] = int(sampler["seed"]) + index
        pruner = instantiate(self.settings["pruner"]) if self.settings.get("pruner") else None
        study = optuna.load_study(study_name=self.settings["study_name"], storage=open_storage(self.url), sampler=instantiate(sampler), pruner=pruner)
        lock, ran, me = FileLock(str(self.sweep_dir / ASK_LOCK)), 0, f"{index}@{socket.gethostname()}:{os.getpid()}"
        why: Optional[str] = None
        while True:
            if self.parent is not None and os.getppid() != self.parent:
                why = "the sweep process is gone: this worker asks for no more trials (re-run the command to resume)"
                break
            with lock:
                stop, why = stop_reason(study, self.settings, self.run_id)
                if stop:
                    break
                trial = study.ask(self.space)
                trial.set_user_attr("run", self.run_id)
                trial.set_user_attr("worker", me)
            log.info("worker %s: trial %d", me, trial.number)
            self._run(study, trial)
            ran += 1
        if why:
            log.error("%s", why)
        log.info("worker %s: done, %d trial(s) run", me, ran)
        return ran

    def _run(self, study: Any, trial: Any) -> None:
        """The trial's job as a Hydra launcher runs it (run_job: job folder, .hydra/, callbacks), then tell."""
        from hydra.core.utils import configure_log, run_job
        from optuna.trial import TrialState

        try:
            config = self.hydra_context.config_loader.load_sweep_config(
                self.config, trial_overrides(self.fixed, trial.params, trial.number, self.url)
            )
            with open_dict(config):
                config.hydra.job.id, config.hydra.job.num = str(trial.number), trial.number
        except Exception as exc:  # noqa: BLE001 - a job that cannot compose is a failed trial, the study goes on
            trial.set_user_attr("error", one_line(exc)[:1000])
            study.tell(trial, state=TrialState.FAIL)
            log.error("trial %d failed: %s", trial.number, one_line(exc))
            return
        try:
            ret = run_job(
                hydra_context=self.hydra_context,
                task_function=self.task_function,
                config=config,
                job_dir_key="hydra.sweep.dir",
                job_subdir_key="hydra.sweep.subdir",
            )
        finally:
            configure_log(self.config.hydra.hydra_logging, self.config.hydra.verbose)  # the worker's own lines again
        tell_result(study, trial, ret, int(self.settings["n_trials"]))


def _sample(space: dict[str, Any]) -> dict[str, Any]:
    """One point of the space (each parameter's first choice or low end): to check that the jobs' configs compose."""
    return {k: d.choices[0] if hasattr(d, "choices") else d.low for k, d in space.items()}


def run_study_workers(study: Any, optuna_study: Any, space: dict[str, Any], fixed: list[str], url: str, workers: int) -> None:
    """Start `workers` processes on the study (the OptunaStudy `study`, Optuna's `optuna_study`), wait for them all,
    then record the trials that lost their worker."""
    from optuna.trial import TrialState

    left = int(study.cfg.n_trials) - count(optuna_study, *DONE_STATES)
    if left <= 0:
        return
    workers = min(workers, left)  # a worker more would start (a minute of imports on a busy host) to find nothing to do
    study.validate([trial_overrides(fixed, _sample(space), 0, url)])  # a search-space key that does not exist stops here
    run_id = uuid.uuid4().hex
    worker = TrialWorker(study, space, fixed, url, run_id)
    kind = getattr(study.launcher, "_EXECUTOR", None)
    log.info("Optuna study %s: %d workers (%s), storage %s", study.cfg.study_name, workers, kind or "local processes", url)
    lost: list[str] = []
    if kind in ("local", "slurm"):
        lost = _submitit_workers(worker, workers, study.launcher, kind)
    elif workers == 1:  # one trial left: run it here, as the basic launcher runs its jobs (no process to start)
        worker(0)
    else:
        lost = _process_workers(worker, workers, study.sweep_dir)
    for line in lost:
        log.error("%s", line)
    for trial in optuna_study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        if trial.user_attrs.get("run") == run_id:
            _record_lost(Path(study.sweep_dir), trial.number)


def _record_lost(sweep_dir: Path, number: int) -> None:
    """A trial still RUNNING after its run's workers ended: its job.json says failed, until a re-run retries it."""
    error = "its worker process ended during the trial; re-run the same command to run its parameters again"
    log.error("trial %d: %s", number, error)
    for path in sweep_dir.glob("**/job.json"):
        record = read_job_record(path.parent)
        if record.get("trial") == number and record.get("status") == "running":
            write_job_record(path.parent, {**record, "status": "failed", "error": error, "error_type": WORKER_LOST})
            (path.parent / ERROR_FILE).write_text(f"{error}\n(worker {record.get('host')}:{record.get('pid')})\n")


def _process_workers(worker: TrialWorker, n: int, sweep_dir: Path) -> list[str]:
    """N local processes (`python -m transferlab.sweeps.optuna_workers <payload> <index>`); one line per abnormal end."""
    import cloudpickle

    worker.parent = os.getpid()
    payload = Path(sweep_dir) / PAYLOAD
    with os.fdopen(os.open(payload, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), "wb") as file:  # the config may hold credentials
        file.write(cloudpickle.dumps(worker))
    procs = [subprocess.Popen([sys.executable, "-m", "transferlab.sweeps.optuna_workers", str(payload), str(i)]) for i in range(n)]
    try:
        codes = [p.wait() for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.terminate()
        payload.unlink(missing_ok=True)
    return [f"worker {i} (pid {p.pid}) ended with exit code {code}" for i, (p, code) in enumerate(zip(procs, codes)) if code]


def _submitit_workers(worker: TrialWorker, n: int, launcher: Any, kind: str) -> list[str]:
    """N submitit jobs from the launcher's settings (as hydra_submitit_launcher builds its executor); on SLURM one
    array. A DDP job over several SLURM tasks would run the worker once per task, each asking for trials: refused."""
    import submitit

    from hydra_plugins.hydra_submitit_launcher.config import BaseQueueConf

    params = dict(launcher.params)
    if int(params.get("tasks_per_node") or 1) > 1 or int(params.get("nodes") or 1) > 1:
        raise ConfigError(
            "hydra.sweeper.workers with hydra.launcher.tasks_per_node or nodes > 1: each task would run its own worker; "
            "use hydra.sweeper.workers=1 with hydra.sweeper.n_jobs for multi-task jobs"
        )
    init: dict[str, Any] = {"folder": params.pop("submitit_folder")}
    if "max_num_timeout" in params:
        init[f"{kind}_max_num_timeout"] = params.pop("max_num_timeout")
    executor = submitit.AutoExecutor(cluster=kind, **init)
    base = set(OmegaConf.structured(BaseQueueConf).keys())
    executor.update_parameters(**{k if k in base else f"{kind}_{k}": v for k, v in params.items()})
    jobs = executor.map_array(worker, list(range(n)))
    lost = []
    for i, job in enumerate(jobs):
        try:
            job.results()
        except Exception as exc:  # noqa: BLE001 - a lost worker; its trial is recorded after all have ended
            lost.append(f"worker {i} (job {job.job_id}) ended: {one_line(exc)[:300]}")
    return lost


def main(argv: Sequence[str]) -> None:
    """A local worker process: argv = [payload file, worker index]."""
    import cloudpickle

    worker = cloudpickle.loads(Path(argv[0]).read_bytes())
    worker(int(argv[1]))


if __name__ == "__main__":
    main(sys.argv[1:])
