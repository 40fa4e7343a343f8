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
import os
import sys
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

from transferlab.core.compat import LIGHTNING_DDP_LAUNCH
from transferlab.core.context import in_sweep

_task_module = "transferlab.cli.train"


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


def rank_command(local_rank: int) -> tuple[Sequence[str], str]:
    """The command of DDP rank `local_rank` of the running Hydra job: same task, same overrides, same folder."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.utils import get_original_cwd

    hydra_cfg = HydraConfig.get()
    sweeper_overrides = [o for o in hydra_cfg.overrides.hydra if o.startswith("hydra.sweeper.")]  # e.g. the Optuna trial
    command = [
        sys.executable,
        "-m",
        _task_module,
        *hydra_cfg.overrides.task,
        *sweeper_overrides,
        f"hydra.run.dir={quoted(hydra_cfg.runtime.output_dir)}",
        "hydra.mode=RUN",
        "hydra.output_subdir=null",
        f"hydra.job.name={hydra_cfg.job.name}_rank{local_rank}",
    ]
    return command, get_original_cwd()


def _observer_for_sweeps(original):  # noqa: ANN001, ANN202
    """Lightning's child-process watchdog, except that inside a sweep job it does not kill the sweep's process.

    A failed rank then ends its job with an error (gloo at once; NCCL at its timeout) and the sweep goes on.
    """

    def launch(child_processes: list) -> None:
        if not in_sweep():
            return original(child_processes)
        module: Any = sys.modules[LIGHTNING_DDP_LAUNCH[0].module]

        class SweepSafeObserver(module._ChildProcessObserver):
            def _terminate_all(self) -> None:
                for proc in self._child_processes:
                    if proc.poll() is None:
                        proc.send_signal(self._termination_signal)

        SweepSafeObserver(main_pid=os.getpid(), child_processes=child_processes).start()

    return launch


def install(task_module: str) -> None:
    """Route Lightning's DDP re-launch through `rank_command` for the task run by this process.

    Raises IncompatibleLibrary (one line, exit 1) when the installed Lightning changed what is patched here.
    """
    global _task_module
    _task_module = task_module
    modules: list[Any] = [internal.resolve() for internal in LIGHTNING_DDP_LAUNCH]  # all checked before any is patched
    for module in modules:
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
