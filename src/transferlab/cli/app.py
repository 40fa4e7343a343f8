"""A transferlab command: a Hydra app over conf/<name>.yaml whose config is validated before any work is done.

`Command(name, task)` gives each command the same life: mistyped group options and Hydra's own config errors
become one line (exit 2); the composed config is checked against the command's schema (config.validation);
credentials are masked in what the job writes; in a multirun each job records its outcome and the sweep goes
on. `Command.run_in_process` runs the same validated task from Python (the tests, notebooks), with Hydra's
compose API instead of its command line.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import hydra
from omegaconf import DictConfig, open_dict

from transferlab.cli.exits import fail, user_errors_exit
from transferlab.cli.hydra_errors import report_config_errors_in_one_line
from transferlab.config.paths import config_dir
from transferlab.config.validation import validate
from transferlab.core import redaction
from transferlab.core.context import in_sweep
from transferlab.core.errors import IncompatibleLibrary, close_matches
from transferlab.sweeps import ddp, summary
from transferlab.sweeps.jobs import run_sweep_job


def group_options(group_dir: Path) -> list[str]:
    """The options of a config group; files whose name starts with `_` are building blocks (data/_base.yaml)."""
    return sorted(p.relative_to(group_dir).with_suffix("").as_posix() for p in group_dir.rglob("*.yaml") if not p.name.startswith("_"))


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
        options = group_options(conf / group)
        for choice in value.strip("[]").split(","):  # group=a, sweep group=a,b, list group=[a,b]
            choice = choice.strip()
            if choice not in options:
                print(
                    f"error: {group}={choice}: no such option in conf/{group}{close_matches(choice, options)}; options: {', '.join(options)}",
                    file=sys.stderr,
                )
                sys.exit(2)


def protect_secrets() -> None:
    """Mask credentials in this job's log handlers, in sys.argv and in the command line saved in <run>/.hydra/."""
    from hydra.core.hydra_config import HydraConfig

    redaction.install_log_redaction()
    sys.argv[:] = redaction.redact(sys.argv)  # W&B records the command line; Hydra has parsed it already
    hydra_cfg = HydraConfig.get()
    if hydra_cfg.output_subdir:
        redaction.scrub_files(Path(hydra_cfg.runtime.output_dir) / hydra_cfg.output_subdir)


class Command:
    """One command: `name` is its config (conf/<name>.yaml) and its schema (config.schema.COMMANDS)."""

    def __init__(self, name: str, task: Callable[[DictConfig], Any]) -> None:
        self.name, self.task = name, task
        module = task.__module__
        if module == "__main__":  # `python -m transferlab.cli.train`
            spec = getattr(sys.modules["__main__"], "__spec__", None)
            module = spec.name if spec else f"transferlab.cli.{name}"
        self.module = module  # what DDP ranks > 0 run (`python -m <module>`)

    def run(self, cfg: DictConfig) -> Any:
        """Validate, then do the work; errors are raised (ConfigError, DataError, ...)."""
        validate(cfg, self.name)
        return self.task(cfg)

    def _app(self, cfg: DictConfig) -> Any:
        if "trainer" in cfg and ddp.starts_rank_processes(cfg.trainer):
            ddp.install(self.module)  # here, not in main(): submitit runs jobs in fresh processes
        protect_secrets()
        checked = user_errors_exit(self.run)
        return run_sweep_job(checked, cfg) if in_sweep() else checked(cfg)

    def main(self) -> Any:
        """The console script / `python -m` entry point."""
        check_group_choices(sys.argv[1:])
        try:
            report_config_errors_in_one_line()
        except IncompatibleLibrary as exc:
            fail(exc)
        guarded = user_errors_exit(self._app)

        def app(cfg: DictConfig) -> Any:
            return guarded(cfg)

        app.__module__ = self.module  # Hydra names the job (hydra.job.name) after the task function's module
        hydra_main = hydra.main(version_base="1.3", config_path=config_dir(), config_name=self.name)(app)
        result = hydra_main()
        if summary.failed_jobs_of_last_sweep:
            sys.exit(1)
        return result

    def compose(self, overrides: Sequence[str], output_dir: str | Path) -> DictConfig:
        """The config Hydra would give a single run with these overrides, writing to output_dir."""
        from hydra import compose, initialize_config_dir
        from hydra.core.hydra_config import HydraConfig

        with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
            cfg = compose(self.name, overrides=[*overrides, f"hydra.run.dir={output_dir}"], return_hydra_config=True)
        with open_dict(cfg):
            cfg.hydra.runtime.output_dir = str(Path(output_dir).resolve())
        HydraConfig.instance().set_config(cfg)  # `${hydra:runtime.output_dir}`, in_sweep() and the job name resolve
        with open_dict(cfg):
            del cfg["hydra"]
        return cfg

    def run_in_process(self, overrides: Sequence[str], output_dir: str | Path) -> Any:
        """compose + run in this Python process; the job's log also goes to <output_dir>/<name>.log, as with Hydra."""
        cfg = self.compose(overrides, output_dir)
        Path(output_dir).mkdir(parents=True, exist_ok=True)
        handler = logging.FileHandler(Path(output_dir) / f"{cfg.task_name}.log")
        handler.setFormatter(logging.Formatter("[%(asctime)s][%(name)s][%(levelname)s] - %(message)s"))
        root = logging.getLogger()
        root.addHandler(handler)
        level = root.level
        root.setLevel(min(level, logging.INFO) if level else logging.INFO)
        try:
            return self.run(cfg)
        finally:
            root.removeHandler(handler)
            root.setLevel(level)
            handler.close()
