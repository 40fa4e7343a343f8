"""User-facing errors: one actionable line and exit code 2 instead of a traceback."""

from __future__ import annotations

import difflib
import functools
import os
import sys
from collections.abc import Callable, Iterable
from typing import Any, TypeVar

from omegaconf.errors import OmegaConfBaseException

F = TypeVar("F", bound=Callable[..., Any])


class TransferlabError(Exception):
    """A problem the user can fix (bad config, missing data, unreadable checkpoint)."""


class ConfigError(TransferlabError):
    """A configuration value is wrong; the message names the key."""


class DataError(TransferlabError):
    """The data cannot be found, downloaded or read; the message names the path."""


class TrainingDiverged(TransferlabError):
    """The loss became NaN or infinite: no point training on (a sweep records the job as failed)."""


def close_matches(word: str, candidates: Iterable[str], n: int = 3) -> str:
    """' (did you mean: a, b?)' or '' — appended to messages about mistyped names."""
    matches = difflib.get_close_matches(word, list(candidates), n=n, cutoff=0.6)
    return f" (did you mean: {', '.join(matches)}?)" if matches else ""


def one_line(exc: BaseException) -> str:
    """The error as one line: OmegaConf errors with their key, others with whitespace folded."""
    if isinstance(exc, OmegaConfBaseException):
        key = getattr(exc, "full_key", None)
        msg = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        return f"{key}: {msg}" if key and key not in msg else msg
    return " ".join(str(exc).split())


def _in_sweep() -> bool:
    from transferlab.sweep import in_sweep

    return in_sweep()


def user_errors_exit(func: F) -> F:
    """Turn TransferlabError / OmegaConf errors into `error: <one line>` and exit code 2.

    HYDRA_FULL_ERROR=1 keeps the traceback, as Hydra does for its own errors.
    """

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return func(*args, **kwargs)
        except (TransferlabError, OmegaConfBaseException) as exc:
            if os.environ.get("HYDRA_FULL_ERROR") == "1" or _in_sweep():
                raise  # a sweep records the failure in the job's folder and goes on with the next job
            print(f"error: {one_line(exc)}", file=sys.stderr, flush=True)
            sys.exit(2)

    return wrapper  # type: ignore[return-value]
