"""The Hydra side of transferlab's Ray launcher; the cluster work is in ray_jobs.py.

Why our own and not PyPI's hydra-ray-launcher 1.2.2: its local launcher cannot join a running Ray 2.x cluster (it
always passes `object_store_memory` to `ray.init`, which Ray 2.x refuses when connecting), it lets Ray retry a job
whose worker died (up to 3 times) and aborts the whole sweep when a task is lost, has no timeout, and pins
`cloudpickle<3` (a downgrade for submitit, joblib and mlflow here) and boto3. This one keeps Hydra's interface and
transferlab's sweep contract: every job ends with a `job.json`, a failed or lost job never stops the sweep.

Hydra imports this module at every start (plugin discovery), so it stays small and imports Ray only in `launch`.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from typing import Any, Optional

from hydra.core.utils import JobReturn
from hydra.plugins.launcher import Launcher
from hydra.types import HydraContext, TaskFunction
from omegaconf import DictConfig, OmegaConf


class RayLauncher(Launcher):
    """Runs each job of a multirun as one Ray task (one fresh worker process per job) on `address`."""

    def __init__(self, **settings: Any) -> None:
        # plain containers: the settings travel to the driver's Ray calls, never to the workers
        self.settings: dict[str, Any] = {k: OmegaConf.to_container(v, resolve=True) if OmegaConf.is_config(v) else v for k, v in settings.items()}
        self.config: Optional[DictConfig] = None
        self.hydra_context: Optional[HydraContext] = None
        self.task_function: Optional[TaskFunction] = None

    def setup(self, *, hydra_context: HydraContext, task_function: TaskFunction, config: DictConfig) -> None:
        self.config, self.hydra_context, self.task_function = config, hydra_context, task_function

    def launch(self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int) -> Sequence[JobReturn]:
        """Run the batch on the cluster and return one JobReturn per job, in order (the grid and Optuna sweepers
        call this once per batch). A bad address or missing package: one line on stderr, exit 2 (input) or 1."""
        from transferlab.core.errors import TransferlabError, exit_code, one_line

        from .ray_jobs import launch_on_ray

        assert self.config is not None and self.hydra_context is not None and self.task_function is not None
        try:
            return launch_on_ray(self.settings, self.config, self.hydra_context, self.task_function, job_overrides, initial_job_idx)
        except TransferlabError as exc:
            print(f"error: {one_line(exc)}", file=sys.stderr, flush=True)
            sys.exit(exit_code(exc))
