"""DDP inside Hydra jobs: one output folder per job (not per rank), and many DDP jobs in one sweep process.

Lightning starts the extra ranks of a DDP run by running the command again (`_SubprocessScriptLauncher`). With
Hydra it re-uses `sys.argv` and `hydra.run.dir`, which in a multirun re-launches the whole sweep (`-m a,b`) into
a new time-stamped folder per rank, and in a submitit/joblib worker is not our command at all. Its watchdog
also SIGKILLs the main process when a rank fails, which in a sweep kills every job still to come, and it leaves
LOCAL_RANK/WORLD_SIZE in `os.environ`, so the next job of the sweep believes it is already a child and waits for
peers that never come. The three fixes live here, behind one `install()`; the Lightning internals they patch
are declared (and checked) in transferlab.core.compat. Upstream: Lightning-AI/pytorch-lightning #11300,
facebookresearch/hydra #2070 (re-launching a multirun per rank); #16285 (SIGKILL of the main process).
"""

from __future__ import annotations

import contextlib
import functools
import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

from transferlab.core.compat import LIGHTNING_DDP_LAUNCH


def starts_rank_processes(trainer_cfg: Mapping[str, Any]) -> bool:
    """Whether Lightning will start the other ranks itself (DDP's subprocess launcher), by the trainer config."""
    strategy = str(trainer_cfg.get("strategy") or "auto")
    if "spawn" in strategy or "fork" in strategy:
        return False
    devices, nodes = trainer_cfg.get("devices"), trainer_cfg.get("num_nodes") or 1
    return "ddp" in strategy or devices not in (None, 1, "1", "auto") or int(nodes) > 1


def quoted(value: str) -> str:
    """A Hydra override value that survives any path (spaces, commas, `=`): single-quoted, escaped."""
    return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"


def rank_command(task_module: str, local_rank: int) -> tuple[Sequence[str], str]:
    """The command of DDP rank `local_rank` of the running Hydra job: `python -m <task_module>`, the same overrides,
    the same folder."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.utils import get_original_cwd

    hydra_cfg = HydraConfig.get()
    sweeper_overrides = [o for o in hydra_cfg.overrides.hydra if o.startswith("hydra.sweeper.")]  # e.g. the Optuna trial
    command = [
        sys.executable,
        "-m",
        task_module,
        *hydra_cfg.overrides.task,
        *sweeper_overrides,
        f"hydra.run.dir={quoted(hydra_cfg.runtime.output_dir)}",
        "hydra.mode=RUN",
        "hydra.output_subdir=null",
        f"hydra.job.name={hydra_cfg.job.name}_rank{local_rank}",
    ]
    return command, get_original_cwd()


def watch_ranks(child_processes: list[subprocess.Popen], period: float = 5.0) -> None:
    """Lightning's child-process watchdog, except that the host process is spared: when a rank exits with an error,
    the other ranks are terminated and the main rank's run ends with the process group's error (gloo at once; NCCL at
    its timeout), so a sweep goes on with its next job and a notebook or test process survives."""

    def watch() -> None:
        while True:
            codes = [proc.poll() for proc in child_processes]
            if any(code not in (None, 0) for code in codes):
                for proc in child_processes:
                    if proc.poll() is None:
                        proc.terminate()
                return
            if all(code == 0 for code in codes):
                return
            time.sleep(period)

    threading.Thread(target=watch, name="transferlab-rank-watchdog", daemon=True).start()


def install(task_module: str, spare_host: bool) -> None:
    """Route Lightning's DDP re-launch through `rank_command` for `task_module` (what `python -m` runs on the other
    ranks). `spare_host`: the process outlives the run (a sweep, a notebook, the tests), so a failed rank must not
    SIGKILL it (`watch_ranks`); a command-line single run keeps Lightning's own watchdog.

    Raises IncompatibleLibrary (one line, exit 1) when the installed Lightning changed what is patched here.
    """
    modules: list[Any] = [internal.resolve() for internal in LIGHTNING_DDP_LAUNCH]  # all checked before any is patched
    for module in modules:
        module._hydra_subprocess_cmd = functools.partial(rank_command, task_module)
        lightning_watchdog = getattr(module._launch_process_observer, "lightning_watchdog", module._launch_process_observer)
        if spare_host:
            watchdog: Any = functools.partial(watch_ranks)
            watchdog.lightning_watchdog = lightning_watchdog  # what a later install without spare_host restores
            module._launch_process_observer = watchdog
        else:
            module._launch_process_observer = lightning_watchdog


@contextlib.contextmanager
def isolated_process_state() -> Iterator[None]:
    """Run one job of a sweep so that the next starts clean: environment restored, process group closed."""
    environ = dict(os.environ)
    try:
        yield
    finally:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()
        for key in set(os.environ) - set(environ):
            del os.environ[key]
        os.environ.update(environ)
