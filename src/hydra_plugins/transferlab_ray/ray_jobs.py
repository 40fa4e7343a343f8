"""The sweep command's side of `hydra/launcher=ray`: compose each job's config, run the jobs as Ray tasks (at most
`max_parallel` at once), collect their JobReturns in order.

A job that fails records itself (transferlab's run_sweep_job) and returns normally. A job whose worker is lost
(killed, out of memory, timed out, a node gone) cannot: its `job.json` is written here, as failed with Ray's
reason, and its JobReturn says COMPLETED with no value, as for any failed job of a transferlab sweep, so that
Hydra's grid sweeper goes on, the Optuna sweeper records a failed trial and the sweep's summary lists it.
Imported only when a sweep launches (Ray is an optional extra: `pip install 'transferlab[cluster]'`).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from hydra.core.singleton import Singleton
from hydra.core.utils import JobReturn, JobStatus, configure_log, filter_overrides, setup_globals
from hydra.types import HydraContext, TaskFunction
from omegaconf import DictConfig, open_dict

from .ray_cluster import connect, number, task_options
from .ray_worker import job_dir, mark_failed, run_in_worker

log = logging.getLogger(__name__)


def launch_on_ray(
    settings: dict[str, Any],
    config: DictConfig,
    hydra_context: HydraContext,
    task_function: TaskFunction,
    job_overrides: Sequence[Sequence[str]],
    initial_job_idx: int,
) -> list[JobReturn]:
    """One batch of the sweep; raises TransferlabError (one line) for a bad setting or a missing package."""
    from transferlab.core.errors import require_packages

    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")  # Ray reports usage to a public host unless told not to
    require_packages("hydra/launcher=ray", "cluster", "ray")
    import ray

    setup_globals()
    configure_log(config.hydra.hydra_logging, config.hydra.verbose)
    options = task_options(settings)  # checks the settings before any cluster is started or joined
    timeout_min = number(settings, "timeout_min") or None
    limit = int(number(settings, "max_parallel")) or len(job_overrides)
    sweep_dir = Path(str(config.hydra.sweep.dir))
    sweep_dir.mkdir(parents=True, exist_ok=True)
    if "mode" in config.hydra.sweep:
        os.chmod(sweep_dir, mode=int(str(config.hydra.sweep.mode), 8))
    where = connect(settings)
    log.info("Ray launcher: %d job(s) on %s, sweep output dir: %s", len(job_overrides), where, sweep_dir)

    configs = []
    for num, overrides in enumerate(job_overrides, start=initial_job_idx):
        log.info("\t#%d : %s", num, " ".join(filter_overrides(overrides)))
        sweep_config = hydra_context.config_loader.load_sweep_config(config, list(overrides))
        with open_dict(sweep_config):
            sweep_config.hydra.job.id = f"job_id_for_{num}"  # the worker sets Ray's task id
            sweep_config.hydra.job.num = num
        configs.append(sweep_config)

    task = ray.remote(**options)(run_in_worker)  # max_calls is only taken here, not by .options()
    shared = [ray.put(hydra_context), ray.put(task_function), ray.put(Singleton.get_state())]  # stored once, not per job
    return run_all(task, shared, configs, timeout_min, limit)


def run_all(task: Any, shared: list[Any], configs: list[DictConfig], timeout_min: Any, limit: int) -> list[JobReturn]:
    """Submit the jobs, `limit` in flight, and wait for each; Ctrl-C cancels the jobs still running."""
    import ray

    results: dict[int, JobReturn] = {}
    pending: dict[Any, int] = {}
    waiting = list(range(len(configs)))
    try:
        while waiting or pending:
            while waiting and len(pending) < limit:
                index = waiting.pop(0)
                pending[task.remote(*shared, configs[index], timeout_min)] = index
            done, _ = ray.wait(list(pending), num_returns=1)
            for ref in done:
                index = pending.pop(ref)
                results[index] = collect(ref, configs[index])
    except KeyboardInterrupt:
        for ref in pending:
            ray.cancel(ref, force=True)
        raise
    return [results[i] for i in range(len(configs))]


def collect(ref: Any, sweep_config: DictConfig) -> JobReturn:
    """The job's JobReturn, or, when Ray lost the job, a failed record written here and a JobReturn for it."""
    import ray

    try:
        return ray.get(ref)
    except ray.exceptions.RayError as exc:
        return lost_job(sweep_config, exc)


def lost_reason(exc: BaseException) -> str:
    """Ray's error as one line that says what happened to the job."""
    import ray

    from transferlab.core.errors import one_line

    if isinstance(exc, ray.exceptions.WorkerCrashedError):
        return "its Ray worker process died (killed, out of memory or crashed; see the sweep command's output)"
    if isinstance(exc, ray.exceptions.NodeDiedError):
        return f"the Ray node running it died: {one_line(exc)}"[:1000]
    if isinstance(exc, ray.exceptions.TaskCancelledError):
        return "its Ray task was cancelled"
    cause = getattr(exc, "cause", None)  # RayTaskError: raised in the worker outside the job (e.g. an import)
    if isinstance(cause, BaseException):
        return f"{type(cause).__name__} in the Ray worker: {one_line(cause)}"[:1000]
    return f"{type(exc).__name__}: {one_line(exc)}"[:1000]


def lost_job(sweep_config: DictConfig, exc: BaseException) -> JobReturn:
    out = job_dir(sweep_config)
    record = mark_failed(sweep_config, lost_reason(exc), type(exc).__name__, detail=str(exc))
    log.error("job %s failed: %s (%s)", sweep_config.hydra.job.num, record.get("error"), out)
    with open_dict(sweep_config):
        sweep_config.hydra.runtime.output_dir = str(out)  # where the Optuna sweeper reads the job's record
    ret = JobReturn(
        overrides=list(sweep_config.hydra.overrides.task),
        cfg=sweep_config,
        hydra_cfg=sweep_config,
        working_dir=str(sweep_config.hydra.runtime.cwd),
        task_name=str(sweep_config.hydra.job.name),
        status=JobStatus.COMPLETED,  # as transferlab's failed jobs: the failure is in job.json, the sweep goes on
    )
    ret.return_value = None
    return ret
