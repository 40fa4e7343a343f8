"""Jobs of a multirun: each records how it ended in its own folder, a failed job never stops the sweep.

`<job>/job.json` says running / completed / failed / pruned (with the error's one line, the overrides, host,
times); `<job>/error.txt` keeps the traceback of a failure. When the sweep ends, `sweeps.summary.SweepSummary`
(a Hydra callback, conf/hydra/default.yaml) writes the sweep's summary and report and prints what failed, and
the command exits 1 if any job did.
"""

from __future__ import annotations

import logging
import math
import os
import socket
import sys
import time
import traceback
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig
from omegaconf.errors import OmegaConfBaseException

from transferlab.core.context import is_global_zero, trial_number
from transferlab.core.errors import TransferlabError, one_line
from transferlab.sweeps.records import ERROR_FILE, write_job_record

log = logging.getLogger(__name__)


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def _failure(exc: BaseException) -> tuple[str, str]:
    """(status, one-line reason) of a job that raised."""
    if type(exc).__name__ == "TrialPruned":
        return "pruned", one_line(exc) or "pruned by the Optuna pruner"
    if isinstance(exc, SystemExit):
        return "failed", f"exited with code {exc.code}"
    if isinstance(exc, (TransferlabError, OmegaConfBaseException)):
        return "failed", one_line(exc)
    return "failed", f"{type(exc).__name__}: {one_line(exc)}"[:1000]


def _finish_wandb(exit_code: int) -> None:
    """Close the job's W&B run (a failed job's with exit code 1), so that the next job gets its own."""
    wandb = sys.modules.get("wandb")
    if wandb is not None and getattr(wandb, "run", None) is not None:
        wandb.finish(exit_code=exit_code)


def run_sweep_job(task: Callable[[DictConfig], Any], cfg: DictConfig) -> Any:
    """Run one job of a multirun, record its outcome; return the task's value (None when it failed).
    (cli.app's Command.run restores the process state around it: the next job starts clean.)"""
    hydra_cfg = HydraConfig.get()
    out_dir = Path(hydra_cfg.runtime.output_dir)
    record: dict[str, Any] = {
        "status": "running",
        "job": hydra_cfg.job.num,
        "trial": trial_number(hydra_cfg),
        "overrides": list(hydra_cfg.overrides.task),
        "host": socket.gethostname(),
        "pid": os.getpid(),
        "started": _now(),
    }
    write = is_global_zero()
    if write:
        write_job_record(out_dir, record)
    start, value, error_text = time.monotonic(), None, None
    try:
        value = task(cfg)
    except KeyboardInterrupt:
        raise
    except BaseException as exc:  # noqa: BLE001 - a job's failure is recorded, the sweep goes on
        record["status"], record["error"] = _failure(exc)
        record["error_type"] = type(exc).__name__
        error_text = traceback.format_exc() if record["status"] == "failed" else None
        _finish_wandb(0 if record["status"] == "pruned" else 1)
    else:
        record["status"] = "completed"
        if isinstance(value, float) and not math.isfinite(value):
            record["status"], record["error"] = "failed", f"{cfg.get('optimized_metric')} is {value}"
            value = None
    record.update(finished=_now(), duration_s=round(time.monotonic() - start, 1), value=value)
    if write:
        write_job_record(out_dir, record)
        if error_text:
            (out_dir / ERROR_FILE).write_text(error_text)
    if record["status"] != "completed":
        report = log.info if record["status"] == "pruned" else log.error
        report("job %s %s: %s (%s)", hydra_cfg.job.num, record["status"], record.get("error"), out_dir)
    return value
