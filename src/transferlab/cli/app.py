"""A transferlab command: a Hydra app over conf/<name>.yaml whose config is validated before any work is done.

Every way in runs the same job, `Command.run(cfg)`: the command line (`Command.main`, inside Hydra's job),
`transferlab.api` and the tests (`Command.run_in_process`, which composes the config with Hydra's compose API and
writes the job's log and `.hydra/` files as Hydra does). The job installs Lightning's DDP relaunch when the trainer
starts rank processes, masks credentials in the job's log handlers and files, records the job's outcome in a
multirun (a failed job never stops the sweep), validates the config against the command's schema, runs the task
and leaves the process as it found it (environment, process group). Errors are raised; only the command line turns
them into one line and an exit code (2 = input, 1 = machine), and Hydra's own config errors too.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import hydra
from omegaconf import DictConfig, OmegaConf, open_dict

from transferlab.cli.exits import fail, user_errors_exit
from transferlab.cli.hydra_errors import report_config_errors_in_one_line
from transferlab.config.paths import config_dir
from transferlab.config.validation import validate
from transferlab.core import redaction
from transferlab.core.context import in_sweep
from transferlab.core.errors import IncompatibleLibrary, close_matches
from transferlab.sweeps import ddp
from transferlab.sweeps.jobs import run_sweep_job

JOB_LOG_FORMAT = "[%(asctime)s][%(name)s][%(levelname)s] - %(message)s"  # conf/hydra/job_logging's file format


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


def protect_secrets(cfg: DictConfig) -> None:
    """Mask credentials (the environment's, and secret-named config keys such as `api_key`) in this job's log
    handlers, in sys.argv and in the config and command line saved in <run>/.hydra/."""
    from hydra.core.hydra_config import HydraConfig

    extra = redaction.config_secrets(OmegaConf.to_container(cfg, resolve=False))
    redaction.install_log_redaction(extra)
    sys.argv[:] = redaction.redact(sys.argv, redaction.secret_values(extra))  # W&B records the command line
    hydra_cfg = HydraConfig.get()
    if hydra_cfg.output_subdir:
        redaction.scrub_files(Path(hydra_cfg.runtime.output_dir) / hydra_cfg.output_subdir, extra=extra)


def route_library_logs_to_the_job_log() -> None:
    """Lightning's messages in the job's log whichever way the job was started, and on the console once.

    Imported before any root handler exists (the command line, before Hydra sets up logging), Lightning gives
    `lightning.pytorch` / `lightning.fabric` console handlers of their own and stops their propagation, so their lines
    would never reach `<run>/<task_name>.log`; `lightning` itself has a third console handler. Their lines now
    propagate to the root logger (the job log); Lightning's own console handlers go where the root already prints to
    a console (Hydra's job logging), and `lightning`'s always (it would print each line a second time)."""
    root_console = any(type(h) is logging.StreamHandler for h in logging.getLogger().handlers)
    routed = False
    for name in ("lightning.pytorch", "lightning.fabric"):
        library = logging.getLogger(name)
        if not library.propagate:
            if root_console:
                for handler in [h for h in library.handlers if type(h) is logging.StreamHandler]:
                    library.removeHandler(handler)
            library.propagate = routed = True
    if routed:
        top = logging.getLogger("lightning")
        for handler in [h for h in top.handlers if type(h) is logging.StreamHandler]:
            top.removeHandler(handler)


class Command:
    """One command: `name` is its config (conf/<name>.yaml) and its schema (config.schema.COMMANDS)."""

    def __init__(self, name: str, task: Callable[[DictConfig], Any]) -> None:
        self.name, self.task = name, task
        module = task.__module__
        if module == "__main__":  # `python -m transferlab.cli.train`
            spec = getattr(sys.modules["__main__"], "__spec__", None)
            module = spec.name if spec else f"transferlab.cli.{name}"
        self.module = module  # what DDP ranks > 0 run (`python -m <module>`)

    def run(self, cfg: DictConfig, *, host_outlives_run: bool = False) -> Any:
        """The job, the same for every way in (see the module docstring); errors are raised (ConfigError, ...).

        `host_outlives_run`: the process goes on after this run (a notebook, the tests): a failed DDP rank then ends
        the run with an error instead of Lightning's SIGKILL of the main process (as inside a sweep)."""
        if "trainer" in cfg and ddp.starts_rank_processes(cfg.trainer):
            ddp.install(self.module, spare_host=host_outlives_run or in_sweep())
        route_library_logs_to_the_job_log()
        protect_secrets(cfg)
        with ddp.isolated_process_state():
            return run_sweep_job(self._validated, cfg) if in_sweep() else self._validated(cfg)

    def _validated(self, cfg: DictConfig) -> Any:
        validate(cfg, self.name)
        return self.task(cfg)

    def main(self) -> Any:
        """The console script / `python -m` entry point: the job inside Hydra, its errors as one line and an exit code."""
        check_group_choices(sys.argv[1:])
        try:
            report_config_errors_in_one_line()
        except IncompatibleLibrary as exc:
            fail(exc)
        guarded = user_errors_exit(self.run)

        def app(cfg: DictConfig) -> Any:
            return guarded(cfg)

        app.__module__ = self.module  # Hydra names the job (hydra.job.name) after the task function's module
        hydra_main = hydra.main(version_base="1.3", config_path=config_dir(), config_name=self.name)(app)
        return hydra_main()  # a multirun with failed jobs exits 1 from its summary (sweeps.summary.SweepSummary)

    def compose(self, overrides: Sequence[str], output_dir: str | Path) -> DictConfig:
        """The config Hydra would give a single run with these overrides, writing to output_dir; Hydra's own part
        (`hydra.*`) is set as the current HydraConfig, as inside a Hydra job."""
        from hydra import compose, initialize_config_dir
        from hydra.core.hydra_config import HydraConfig

        with initialize_config_dir(config_dir=config_dir(), version_base="1.3", job_name=self.module.rsplit(".", 1)[-1]):
            cfg = compose(self.name, overrides=[*overrides, f"hydra.run.dir={output_dir}"], return_hydra_config=True)
        with open_dict(cfg):
            cfg.hydra.runtime.output_dir = str(Path(output_dir).resolve())
        HydraConfig.instance().set_config(cfg)  # `${hydra:runtime.output_dir}`, in_sweep(), the job name, DDP's rank command
        with open_dict(cfg):
            del cfg["hydra"]
        return cfg

    def run_in_process(self, overrides: Sequence[str], output_dir: str | Path) -> Any:
        """compose + `run` in this Python process, with what Hydra's job adds around it: `<output_dir>/.hydra/`
        (config.yaml, hydra.yaml, overrides.yaml) and the job's log in `<output_dir>/<task_name>.log`."""
        from hydra.core.hydra_config import HydraConfig

        out = Path(output_dir)
        cfg = self.compose(overrides, out)
        hydra_cfg = HydraConfig.get()
        saved = out / str(hydra_cfg.output_subdir) if hydra_cfg.output_subdir else None
        if saved is not None:  # what Hydra's run_job saves before the task (hydra.core.utils)
            saved.mkdir(parents=True, exist_ok=True)
            OmegaConf.save(cfg, saved / "config.yaml", resolve=False)
            OmegaConf.save(OmegaConf.create({"hydra": hydra_cfg}), saved / "hydra.yaml", resolve=False)
            OmegaConf.save(OmegaConf.create(list(hydra_cfg.overrides.task)), saved / "overrides.yaml", resolve=False)
        handler = logging.FileHandler(out / f"{cfg.get('task_name', self.name)}.log")  # conf/hydra/default.yaml
        handler.setFormatter(logging.Formatter(JOB_LOG_FORMAT))
        root = logging.getLogger()
        root.addHandler(handler)
        level = root.level
        root.setLevel(min(level, logging.INFO) if level else logging.INFO)
        try:
            return self.run(cfg, host_outlives_run=True)
        finally:
            root.removeHandler(handler)
            root.setLevel(level)
            handler.close()
