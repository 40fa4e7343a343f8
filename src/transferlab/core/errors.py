"""User-facing errors: one actionable line instead of a traceback; exit code 2 for the input, 1 for the machine.

The commands print them (transferlab.cli.exits); everything below the commands raises them.
"""

from __future__ import annotations

import difflib
import errno
from collections.abc import Iterable

from omegaconf.errors import OmegaConfBaseException


class TransferlabError(Exception):
    """A problem the user can fix (bad config, missing data, unreadable checkpoint)."""


class ConfigError(TransferlabError):
    """A configuration value is wrong; the message names the key."""


class DataError(TransferlabError):
    """The data cannot be found, downloaded or read; the message names the path."""


class TrainingDiverged(TransferlabError):
    """The loss became NaN or infinite: no point training on (a sweep records the job as failed)."""


class ResourceError(TransferlabError):
    """The machine ran out of something (disk, memory, a worker process): not the user's config, so exit 1."""

    exit_code = 1


class IncompatibleLibrary(ResourceError):
    """An installed library changed an internal that transferlab relies on (transferlab.core.compat): exit 1."""


class MissingPackage(ResourceError):
    """An optional dependency (an extra of the package) is not installed: the machine's set-up, so exit 1."""


def require_packages(purpose: str, extra: str, *modules: str) -> None:
    """Fail with one line naming the pip command when any of `modules` cannot be imported."""
    import importlib.util

    missing = [m for m in modules if importlib.util.find_spec(m) is None]
    if missing:
        raise MissingPackage(f"{purpose} needs {', '.join(missing)}: pip install 'transferlab[{extra}]'")


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


def disk_full(exc: BaseException | None) -> bool:
    """ENOSPC/EDQUOT, also when torch's zip writer reports it as a RuntimeError around the OSError."""
    for _ in range(16):  # along __cause__ / __context__, bounded
        if exc is None:
            return False
        if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT) or "No space left on device" in str(exc):
            return True
        exc = exc.__cause__ or exc.__context__
    return False


def explain_runtime_failure(exc: BaseException | None) -> TransferlabError | None:
    """Known failures of the machine, as one actionable line: a DataLoader worker that died, a full disk."""
    import re
    import signal

    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:  # the cause may sit under Lightning's or torch's wrappers
        seen.add(id(exc))
        if isinstance(exc, TransferlabError):
            return exc
        text = " ".join(str(exc).split())
        worker = re.search(r"DataLoader worker \(pids?\(?s?\)? ?([\d, ]+)\)? ?(?:is killed by signal: (.+?)\.|exited unexpectedly)", text)
        if worker:
            pid, sig = worker.group(1).strip(), worker.group(2)
            if sig:
                names = {signal.strsignal(s): s.name for s in signal.Signals if signal.strsignal(s)}
                how = f"was killed by {names.get(sig, sig)} ({sig})"
            else:
                how = "exited unexpectedly"
            hint = (
                "usually the out-of-memory killer: lower data.num_workers or data.batch_size, or turn off data.image_cache"
                if not sig or "Kill" in sig
                else "an image decoder or native library crashed in it: run with data.num_workers=0 to see where"
            )
            return ResourceError(f"data.num_workers: DataLoader worker (pid {pid}) {how}; {hint}")
        if disk_full(exc):
            filename = getattr(exc, "filename", None)
            where = f" writing {filename}" if filename else ""
            return ResourceError(
                f"paths.output_dir: no space left on the device{where}; free some space or point "
                f"hydra.run.dir / paths.output_dir at a larger disk, then resume with ckpt_path=last"
            )
        exc = exc.__cause__ or exc.__context__
    return None


def exit_code(exc: BaseException) -> int:
    """2 for a problem of the input (config, data, files), 1 for one of the machine or its installed libraries."""
    return getattr(exc, "exit_code", 2)


def add_note(exc: BaseException, text: str) -> None:
    """PEP 678's `exc.add_note(text)`, also on Python 3.10 (where `__notes__` is kept but not printed by Python):
    what an interrupted step leaves for the user travels on the exception (cli.exits prints it)."""
    setattr(exc, "__notes__", [*getattr(exc, "__notes__", ()), text])  # noqa: B010 - one spelling on every version
