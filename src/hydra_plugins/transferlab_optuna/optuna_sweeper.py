"""The Hydra side of transferlab's Optuna sweeper; the study itself is transferlab.sweeps.optuna_study.

Hydra only loads sweepers from the `hydra_plugins` namespace package, and imports every module in it at each
start, so this file stays small and imports Optuna only when a sweep runs.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any, Optional

from hydra.core.plugins import Plugins
from hydra.plugins.sweeper import Sweeper
from hydra.types import HydraContext, TaskFunction
from omegaconf import DictConfig, OmegaConf


class OptunaSweeper(Sweeper):
    def __init__(self, **settings: Any) -> None:
        self.config: Optional[DictConfig] = None  # settings are read from config.hydra.sweeper, where ${seed} resolves

    def setup(self, *, hydra_context: HydraContext, task_function: TaskFunction, config: DictConfig) -> None:
        self.hydra_context, self.config, self.task_function = hydra_context, config, task_function  # workers run jobs themselves
        self.settings = config.hydra.sweeper  # conf/hydra/sweeper/optuna.yaml documents each key
        self.launcher = Plugins.instance().instantiate_launcher(hydra_context=hydra_context, task_function=task_function, config=config)

    def sweep(self, arguments: list[str]) -> Any:
        from transferlab.core.errors import TransferlabError, one_line
        from transferlab.sweeps.optuna_study import OptunaStudy

        assert self.config is not None and self.hydra_context is not None
        sweep_dir = Path(self.config.hydra.sweep.dir)
        sweep_dir.mkdir(parents=True, exist_ok=True)
        OmegaConf.save(self.config, sweep_dir / "multirun.yaml")
        context = {"config": self.config, "hydra_context": self.hydra_context, "task_function": self.task_function}
        study = OptunaStudy(self.settings, sweep_dir, self.launcher, self.hydra_context.config_loader, self.validate_batch_is_legal, **context)
        try:
            return study.run(arguments)
        except TransferlabError as exc:  # a bad search space, a sweep folder in use: one line, exit 2
            print(f"error: {one_line(exc)}", file=sys.stderr, flush=True)
            sys.exit(2)
