"""The command-line entry points: Hydra apps over conf/, with mistyped group options caught first."""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import hydra
from omegaconf import DictConfig

from transferlab import distributed, sweep
from transferlab.config_paths import config_dir
from transferlab.errors import close_matches


def check_group_choices(args: list[str]) -> None:
    """`backbone=resnt50` (a config group option that does not exist): one line, close matches, exit 2.

    Hydra reports this itself, over many lines and with exit code 1; this check runs before it, for plain
    `group=option`, sweep `group=a,b`, list `group=[a,b]` and nested `group=sub/option` arguments.
    """
    conf = Path(config_dir())
    for arg in args:
        name, sep, value = arg.partition("=")
        group = name.lstrip("+")
        if not sep or name.startswith(("~", "hydra")) or not (conf / group).is_dir() or value in ("null", "") or "(" in value:
            continue
        options = sorted(p.relative_to(conf / group).with_suffix("").as_posix() for p in (conf / group).rglob("*.yaml"))
        for choice in value.strip("[]").split(","):  # group=a, sweep group=a,b, list group=[a,b]
            choice = choice.strip()
            if choice not in options:
                print(f"error: {group}={choice}: no such option in conf/{group}{close_matches(choice, options)}; "
                      f"options: {', '.join(options)}", file=sys.stderr)
                sys.exit(2)


def hydra_command(config_name: str, task: Callable[[DictConfig], Any]) -> Callable[[], Any]:
    """`main()` for a console script / `python -m`: check group choices, then run `task` as a Hydra app.

    In a multirun each job runs through `run_sweep_job` (its failure is recorded, the sweep goes on); the
    command then exits 1 when any job failed.
    """

    module = task.__module__
    if module == "__main__":  # `python -m transferlab.train`
        spec = getattr(sys.modules["__main__"], "__spec__", None)
        module = spec.name if spec else f"transferlab.{config_name}"

    @functools.wraps(task)
    def app(cfg: DictConfig) -> Any:
        distributed.install(module)  # here, not in main(): submitit runs jobs in fresh processes
        return sweep.run_sweep_job(task, cfg) if sweep.in_sweep() else task(cfg)

    hydra_main = hydra.main(version_base="1.3", config_path=config_dir(), config_name=config_name)(app)

    def main() -> Any:
        check_group_choices(sys.argv[1:])
        result = hydra_main()
        if sweep.failed_jobs_of_last_sweep:
            sys.exit(1)
        return result

    main.__doc__ = task.__doc__
    return main
