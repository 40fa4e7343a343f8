"""Hydra's own configuration errors (unknown key, bad override syntax, missing config) as one line, exit code 2.

Hydra prints them over several lines with exit code 1, and has no hook to change that (upstream:
facebookresearch/hydra #3361, #3454); `report_config_errors_in_one_line` wraps its internal `run_and_report`,
guarded by transferlab.core.compat. HYDRA_FULL_ERROR=1 still gives Hydra's full traceback.
"""

from __future__ import annotations

import difflib
import functools
import os
import sys
from collections.abc import Callable
from typing import Any

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from transferlab.core.compat import HYDRA_ERROR_REPORTING
from transferlab.core.errors import close_matches, one_line


def _leaf_keys(node: Any, prefix: str = "") -> list[str]:
    """Every dotted key below node (`???` values included; interpolations are not resolved)."""
    values = OmegaConf.to_container(node, resolve=False, throw_on_missing=False) if isinstance(node, DictConfig) else node
    keys: list[str] = []
    for key, child in values.items() if isinstance(values, dict) else []:
        keys.append(f"{prefix}{key!s}")
        keys += _leaf_keys(child, f"{prefix}{key!s}.")
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
    return f"{full_key}: unknown key{hint}; {where}: {', '.join(sorted(siblings))}; to add a new key write +{given}"


def hydra_error_line(exc: BaseException, args: list[str]) -> str | None:
    """One line for Hydra's own config errors (mistyped key, bad override syntax, missing config); None otherwise."""
    from hydra.errors import ConfigCompositionException, MissingConfigException, OverrideParseException
    from omegaconf.errors import ConfigAttributeError, ConfigKeyError

    cause = exc.__cause__
    if (
        isinstance(exc, ConfigCompositionException)
        and isinstance(cause, (ConfigAttributeError, ConfigKeyError))
        and "not in struct" in str(cause)
        and getattr(cause, "full_key", None)
    ):
        return _unknown_key_line(cause, args)
    if isinstance(exc, OverrideParseException):
        from hydra.core.override_parser.overrides_parser import OverridesParser

        parser = OverridesParser.create()
        for arg in args:
            try:
                parser.parse_overrides([arg])
            except OverrideParseException:
                return (
                    f"{arg.partition('=')[0]}: expected key=value in Hydra's override syntax, got {arg!r} "
                    f"({str(exc).splitlines()[0]}); quote values with brackets, commas or spaces"
                )
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
    """Wrap Hydra's `run_and_report` (in both modules that call it) so that its config errors become our line."""
    hydra_utils, hydra_core = (internal.resolve() for internal in HYDRA_ERROR_REPORTING)
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
    hydra_utils.run_and_report = hydra_core.run_and_report = run_and_report  # type: ignore[attr-defined]
