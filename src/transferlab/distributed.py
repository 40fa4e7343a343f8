"""DDP inside Hydra jobs: one output folder per job (not per rank), and many DDP jobs in one sweep process.

Lightning starts the extra ranks of a DDP run by running the command again (`_SubprocessScriptLauncher`). With
Hydra it re-uses `sys.argv` and `hydra.run.dir`, which in a multirun re-launches the whole sweep (`-m a,b`) into
a new time-stamped folder per rank, and in a submitit/joblib worker is not our command at all. Its watchdog
also SIGKILLs the main process when a rank fails, which in a sweep kills every job still to come, and it leaves
LOCAL_RANK/WORLD_SIZE in `os.environ`, so the next job of the sweep believes it is already a child and waits for
peers that never come. The three fixes live here, behind one `install()`; Lightning's names are checked there.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
from collections.abc import Iterator, Sequence

log = logging.getLogger(__name__)

_LIGHTNING_LAUNCHERS = ("lightning.fabric.strategies.launchers.subprocess_script",
                        "lightning.pytorch.strategies.launchers.subprocess_script")
_task_module = "transferlab.train"


def quoted(value: str) -> str:
    """A Hydra override value that survives any path (spaces, commas, `=`): single-quoted, escaped."""
    return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"


def rank_command(local_rank: int) -> tuple[Sequence[str], str]:
    """The command of DDP rank `local_rank` of the running Hydra job: same task, same overrides, same folder."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.utils import get_original_cwd

    hydra_cfg = HydraConfig.get()
    sweeper_overrides = [o for o in hydra_cfg.overrides.hydra if o.startswith("hydra.sweeper.")]  # e.g. the Optuna trial
    command = [sys.executable, "-m", _task_module, *hydra_cfg.overrides.task, *sweeper_overrides,
               f"hydra.run.dir={quoted(hydra_cfg.runtime.output_dir)}", "hydra.mode=RUN", "hydra.output_subdir=null",
               f"hydra.job.name={hydra_cfg.job.name}_rank{local_rank}"]
    return command, get_original_cwd()


def _observer_for_sweeps(original):  # noqa: ANN001, ANN202
    """Lightning's child-process watchdog, except that inside a sweep job it does not kill the sweep's process.

    A failed rank then ends its job with an error (gloo at once; NCCL at its timeout) and the sweep goes on.
    """

    def launch(child_processes: list) -> None:
        from transferlab.sweep import in_sweep

        if not in_sweep():
            return original(child_processes)
        module = sys.modules[_LIGHTNING_LAUNCHERS[0]]

        class SweepSafeObserver(module._ChildProcessObserver):
            def _terminate_all(self) -> None:
                for proc in self._child_processes:
                    if proc.poll() is None:
                        proc.send_signal(self._termination_signal)

        SweepSafeObserver(main_pid=os.getpid(), child_processes=child_processes).start()

    return launch


def install(task_module: str) -> None:
    """Route Lightning's DDP re-launch through `rank_command` for the task run by this process."""
    global _task_module
    import importlib

    _task_module = task_module
    for name in _LIGHTNING_LAUNCHERS:
        module = importlib.import_module(name)
        if not all(hasattr(module, attr) for attr in ("_hydra_subprocess_cmd", "_launch_process_observer")):
            log.warning("%s changed: DDP inside multirun jobs may write one folder per rank", name)
            continue
        module._hydra_subprocess_cmd = rank_command
        if not getattr(module._launch_process_observer, "_transferlab", False):
            module._launch_process_observer = _observer_for_sweeps(module._launch_process_observer)
            module._launch_process_observer._transferlab = True


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
