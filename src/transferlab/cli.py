"""The command-line entry points: Hydra apps over conf/; config mistakes reported in one line, exit code 2."""

from __future__ import annotations

import difflib
import functools
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import hydra
from omegaconf import DictConfig
from omegaconf.errors import OmegaConfBaseException

from transferlab import distributed, redaction, sweep
from transferlab.config_paths import config_dir
from transferlab.errors import close_matches, one_line


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


def _leaf_keys(node: Any, prefix: str = "") -> list[str]:
    from omegaconf import DictConfig

    keys = []
    for key in node.keys() if isinstance(node, DictConfig) else []:
        keys.append(f"{prefix}{key}")
        child = node._get_node(key)
        if isinstance(child, DictConfig):
            keys += _leaf_keys(child, f"{prefix}{key}.")
    return keys


def _unknown_key_line(cause: Any, args: list[str]) -> str:
    """`data.batchsize=8`: the key, close matches among its siblings (or anywhere in the config), how to add it."""
    full_key = str(cause.full_key)
    parent, leaf = cause.parent_node, full_key.rsplit(".", 1)[-1]
    siblings = [str(k) for k in parent.keys() if k != "hydra"] if parent is not None else []
    hint = close_matches(leaf, siblings)
    if not hint and parent is not None:  # `max_epochs=3` at the root: look for the name deeper down
        everywhere = _leaf_keys(parent._get_root())
        by_leaf = {k.rsplit(".", 1)[-1]: k for k in everywhere}
        found = difflib.get_close_matches(leaf, list(by_leaf), n=3, cutoff=0.75)
        hint = f" (did you mean: {', '.join(by_leaf[f] for f in found)}?)" if found else ""
    given = next((a for a in args if a.partition("=")[0] == full_key), full_key)
    where = f"keys of {full_key.rsplit('.', 1)[0]}" if "." in full_key else "top-level keys"
    return (f"{full_key}: unknown key{hint}; {where}: {', '.join(sorted(siblings))}; "
            f"to add a new key write +{given}")


def hydra_error_line(exc: BaseException, args: list[str]) -> str | None:
    """One line for Hydra's own config errors (mistyped key, bad override syntax, missing config); None otherwise."""
    from hydra.errors import ConfigCompositionException, MissingConfigException, OverrideParseException
    from omegaconf.errors import ConfigAttributeError, ConfigKeyError

    cause = exc.__cause__
    if isinstance(exc, ConfigCompositionException) and isinstance(cause, (ConfigAttributeError, ConfigKeyError)) \
            and "not in struct" in str(cause) and getattr(cause, "full_key", None):
        return _unknown_key_line(cause, args)
    if isinstance(exc, OverrideParseException):
        from hydra.core.override_parser.overrides_parser import OverridesParser

        parser = OverridesParser.create()
        for arg in args:
            try:
                parser.parse_overrides([arg])
            except OverrideParseException:
                return (f"{arg.partition('=')[0]}: expected key=value in Hydra's override syntax, got {arg!r} "
                        f"({str(exc).splitlines()[0]}); quote values with brackets, commas or spaces")
        return f"command line: {str(exc).splitlines()[0]}"
    if isinstance(exc, (ConfigCompositionException, MissingConfigException, OmegaConfBaseException)):
        text = one_line(exc)
        if isinstance(cause, OmegaConfBaseException):
            text += f": {one_line(cause)}"
        return text
    return None


def _reraise(exc: BaseException) -> Any:
    raise exc


def report_config_errors_in_one_line() -> None:
    """Hydra prints its own config errors (unknown key, bad override syntax) over several lines with exit code 1;
    ours are one line with close matches and exit code 2. HYDRA_FULL_ERROR=1 still gives Hydra's full traceback.

    Hydra has no hook for this, so its `run_and_report` (hydra._internal, stable across 1.x) is wrapped here.
    """
    import hydra._internal.hydra as hydra_core
    import hydra._internal.utils as hydra_utils

    original = hydra_utils.run_and_report
    if getattr(original, "transferlab", False):
        return

    def run_and_report(func: Callable[[], Any]) -> Any:
        try:
            return func()
        except Exception as exc:  # noqa: BLE001 - unknown errors go to Hydra's reporting unchanged
            line = None if os.environ.get("HYDRA_FULL_ERROR") == "1" else hydra_error_line(exc, sys.argv[1:])
            if line is None:
                return original(functools.partial(_reraise, exc))
            print(f"error: {line}", file=sys.stderr, flush=True)
            sys.exit(2)

    run_and_report.transferlab = True  # type: ignore[attr-defined]
    hydra_utils.run_and_report = hydra_core.run_and_report = run_and_report


def protect_secrets() -> None:
    """Mask credentials in this job's log handlers, in sys.argv and in the command line saved in <run>/.hydra/."""
    from hydra.core.hydra_config import HydraConfig

    redaction.install_log_redaction()
    sys.argv[:] = redaction.redact(sys.argv)  # W&B records the command line; Hydra has parsed it already
    hydra_cfg = HydraConfig.get()
    if hydra_cfg.output_subdir:
        redaction.scrub_files(Path(hydra_cfg.runtime.output_dir) / hydra_cfg.output_subdir)


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
        protect_secrets()
        return sweep.run_sweep_job(task, cfg) if sweep.in_sweep() else task(cfg)

    hydra_main = hydra.main(version_base="1.3", config_path=config_dir(), config_name=config_name)(app)

    def main() -> Any:
        check_group_choices(sys.argv[1:])
        report_config_errors_in_one_line()
        result = hydra_main()
        if sweep.failed_jobs_of_last_sweep:
            sys.exit(1)
        return result

    main.__doc__ = task.__doc__
    return main
