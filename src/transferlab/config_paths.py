"""Find conf/ whether transferlab runs from a source checkout (editable install) or a wheel."""

from __future__ import annotations

import sys
from pathlib import Path

from transferlab.errors import close_matches

_PACKAGE_DIR = Path(__file__).resolve().parent


def config_dir() -> str:
    """The Hydra config directory: <repo>/conf in a checkout, <site-packages>/transferlab/conf in a wheel.

    In a checkout conf/experiment links to <repo>/experiments; the wheel copies the presets there.
    """
    for candidate in (_PACKAGE_DIR.parents[1] / "conf", _PACKAGE_DIR / "conf"):
        if (candidate / "train.yaml").is_file():
            return str(candidate)
    raise FileNotFoundError(f"transferlab's conf/ directory was not found next to {_PACKAGE_DIR}; reinstall transferlab")


def check_group_choices(args: list[str]) -> None:
    """`backbone=resnt50` (a config group option that does not exist): one line, close matches, exit 2.

    Hydra reports this itself, over many lines and with exit code 1; this check runs before it, for plain
    `group=option` and sweep `group=a,b` arguments.
    """
    conf = Path(config_dir())
    for arg in args:
        name, sep, value = arg.partition("=")
        group = name.lstrip("+")
        if not sep or name.startswith(("~", "hydra")) or not (conf / group).is_dir() or value in ("null", "") or "(" in value:
            continue
        options = sorted(p.stem for p in (conf / group).glob("*.yaml"))
        for choice in value.split(","):
            if choice not in options:
                print(f"error: {group}={choice}: no such option in conf/{group}{close_matches(choice, options)}; "
                      f"options: {', '.join(options)}", file=sys.stderr)
                sys.exit(2)
