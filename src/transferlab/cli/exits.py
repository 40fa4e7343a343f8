"""How a command ends when something is wrong: `error: <one line>` on stderr and an exit code, no traceback.

Exit code 2: the input (config, data, files) is wrong and the line says what to change; 1: the machine or
its installation failed (full disk, killed worker, an incompatible library). HYDRA_FULL_ERROR=1 keeps the
traceback, as Hydra does for its own errors. Inside a sweep errors are raised on, so that the sweep records
the failed job in its folder and goes on with the next.
"""

from __future__ import annotations

import functools
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, NoReturn, TypeVar

from omegaconf.errors import OmegaConfBaseException

from transferlab.core.context import in_sweep
from transferlab.core.errors import TransferlabError, exit_code, explain_runtime_failure, one_line
from transferlab.core.redaction import redact

F = TypeVar("F", bound=Callable[..., Any])


def fail(exc: BaseException) -> NoReturn:
    """Print the error's one line (credentials masked) and exit with its code."""
    print(f"error: {redact(one_line(exc))}", file=sys.stderr, flush=True)
    sys.exit(exit_code(exc))


INTERRUPTED = 130  # 128 + SIGINT, what a shell expects of a program stopped with Ctrl-C


def interruption_notes(stopped: BaseException) -> list[str]:
    """What the interrupted code left for the user (`exc.add_note(...)`, e.g. the features the cache kept), on the
    KeyboardInterrupt itself or on the exceptions it led to (Lightning turns it into SystemExit)."""
    notes: list[str] = []
    seen: BaseException | None = stopped
    while seen is not None and len(notes) < 20:
        notes += [n for n in getattr(seen, "__notes__", ()) if n not in notes]
        seen = seen.__context__ or seen.__cause__
    return notes


def interrupted(stopped: BaseException) -> NoReturn:
    """Ctrl-C: one line saying what was kept and how to go on, exit 130 (no traceback)."""
    kept, resume = "nothing was written yet", ""
    try:
        from hydra.core.hydra_config import HydraConfig

        out = Path(HydraConfig.get().runtime.output_dir)
        if out.is_dir() and any(out.iterdir()):
            kept = f"what was written is in {out}"
        if (out / "checkpoints" / "last.ckpt").is_file():
            resume = f"; resume with: transferlab-train <the same arguments> hydra.run.dir={out} ckpt_path=auto"
    except (ImportError, ValueError):  # no Hydra job (a library call)
        pass
    kept = "; ".join([*interruption_notes(stopped), kept])
    print(f"interrupted (Ctrl-C): {kept}{resume}", file=sys.stderr, flush=True)
    sys.exit(INTERRUPTED)


def user_errors_exit(func: F) -> F:
    """Turn TransferlabError / OmegaConf errors, and known failures of the machine, into `fail(...)`; Ctrl-C
    into `interrupted()`, also where Lightning caught it first (its `sys.exit(1)` raised while handling it)."""

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return func(*args, **kwargs)
        except KeyboardInterrupt as stopped:
            if in_sweep():
                raise
            interrupted(stopped)
        except SystemExit as leaving:
            if isinstance(leaving.__context__, KeyboardInterrupt) and leaving.code != INTERRUPTED and not in_sweep():
                interrupted(leaving)
            raise
        except Exception as raised:  # noqa: BLE001 - sorted below; anything unknown is re-raised unchanged
            exc = raised if isinstance(raised, (TransferlabError, OmegaConfBaseException)) else explain_runtime_failure(raised)
            if exc is None or os.environ.get("HYDRA_FULL_ERROR") == "1" or in_sweep():
                raise
            fail(exc)

    return wrapper  # type: ignore[return-value]
