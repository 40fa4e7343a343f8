"""What runs inside the Ray worker: one job of the sweep, exactly as Hydra's own launchers run it.

The worker is a fresh process per job (the launcher asks Ray for `max_calls=1`): Hydra's global state (`Singleton`
state, resolvers) is restored from the sweep command, the job runs through Hydra's `run_job` (which writes
`.hydra/`, sets up the job's log and calls the task; transferlab's task records `job.json` itself and never raises
for a failed job), and the process exits after it, so nothing (CUDA memory, DDP patches, W&B) leaks into the next.
Hydra imports this module at every start (plugin discovery): nothing heavy at the top.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Optional

from hydra.core.hydra_config import HydraConfig
from hydra.core.singleton import Singleton
from hydra.core.utils import JobReturn, run_job, setup_globals
from hydra.types import HydraContext, TaskFunction
from omegaconf import DictConfig, OmegaConf, open_dict


def now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def job_dir(sweep_config: DictConfig) -> Path:
    """<sweep dir>/<subdir> of a job, as Hydra's run_job computes it (relative paths: from the sweep command's cwd)."""
    out = Path(str(OmegaConf.select(sweep_config, "hydra.sweep.dir"))) / str(OmegaConf.select(sweep_config, "hydra.sweep.subdir"))
    return out if out.is_absolute() else Path(str(sweep_config.hydra.runtime.cwd)) / out


def mark_failed(sweep_config: DictConfig, error: str, error_type: str, detail: Optional[str] = None) -> dict[str, Any]:
    """Record a job that ended without recording it itself (killed, lost, timed out) as failed in `<job>/job.json`,
    keeping what the job wrote when it started (host, pid, start time); a job that already ended keeps its record."""
    from transferlab.core.context import trial_number
    from transferlab.sweeps.records import ERROR_FILE, read_job_record, write_job_record

    out = job_dir(sweep_config)
    hydra_cfg = sweep_config.hydra
    started = {"job": hydra_cfg.job.num, "trial": trial_number(hydra_cfg), "overrides": list(hydra_cfg.overrides.task)}
    record = {**started, **read_job_record(out)}
    if record.get("status") in ("completed", "failed", "pruned"):
        return record
    record.update(status="failed", error=error, error_type=error_type, finished=now(), value=None)
    out.mkdir(parents=True, exist_ok=True)
    write_job_record(out, record)
    if detail:
        (out / ERROR_FILE).write_text(detail)
    return record


def start_watchdog(sweep_config: DictConfig, timeout_min: float) -> None:
    """After `timeout_min` minutes the job is recorded as failed and its worker killed (SIGKILL: a training loop
    cannot be interrupted cleanly from another thread); the launcher sees a dead worker and the sweep goes on."""

    def expire() -> None:
        error = f"ran longer than hydra.launcher.timeout_min={timeout_min:g} and was stopped"
        mark_failed(sweep_config, error, "Timeout")
        print(f"transferlab ray launcher: job {sweep_config.hydra.job.num} {error}", file=sys.stderr, flush=True)
        os.kill(os.getpid(), signal.SIGKILL)

    timer = threading.Timer(timeout_min * 60, expire)
    timer.daemon = True
    timer.start()


def run_in_worker(
    hydra_context: HydraContext,
    task_function: TaskFunction,
    singleton_state: dict[Any, Any],
    sweep_config: DictConfig,
    timeout_min: Optional[float],
) -> JobReturn:
    """The Ray task: one job of the sweep. Runs in the sweep command's working directory when this node has it
    (relative paths in the config, `logs/`, mean the same as with the local launcher)."""
    import ray

    setup_globals()
    Singleton.set_state(singleton_state)
    cwd = str(sweep_config.hydra.runtime.cwd)
    if os.path.isdir(cwd):
        os.chdir(cwd)
    with open_dict(sweep_config):
        sweep_config.hydra.job.id = ray.get_runtime_context().get_task_id()  # what SLURM_JOB_ID is to submitit
    HydraConfig.instance().set_config(sweep_config)
    if timeout_min:
        start_watchdog(sweep_config, float(timeout_min))
    return run_job(
        hydra_context=hydra_context,
        task_function=task_function,
        config=sweep_config,
        job_dir_key="hydra.sweep.dir",
        job_subdir_key="hydra.sweep.subdir",
    )
