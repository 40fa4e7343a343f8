"""A real one-node SLURM cluster for a test module (scripts/slurm_local.sh), and what its jobs need from the tests.

`slurm_cluster` (module-scoped) starts munged, MariaDB, slurmdbd, slurmctld and slurmd with the script (installing
the Debian packages when they are missing), points SLURM's commands at its slurm.conf, and stops what it started
after the module. When the cluster cannot be had (not root, no apt, packages that do not install) the module's tests
are skipped, or fail when TRANSFERLAB_REQUIRE_CLUSTER is set (CI, where a skip would hide a broken launcher).

`PauseOnFirstRun` is the callback a job under test runs (the tests folder is on the jobs' PYTHONPATH, cli_env): it
holds the job's first run at a chosen batch, so a signal lands in the middle of an epoch; the requeued run passes.
"""

from __future__ import annotations

import os
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Optional

import lightning.pytorch as pl

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "scripts" / "slurm_local.sh"
CLUSTER_DIR = Path(os.environ.get("SLURM_LOCAL_DIR", "/tmp/transferlab-slurm"))  # not under pytest's tmp: daemons run as munge/mysql


class PauseOnFirstRun(pl.Callback):
    """At (epoch, batch) of the job's first run (SLURM_RESTART_COUNT unset or 0): write `marker` ("<pid> <job id>")
    and wait up to `timeout` seconds, for the signal the test sends; a requeued run goes straight on. `every_run`:
    pause in every run (a job that must outlive its time limit each time)."""

    def __init__(self, epoch: int, batch: int, marker: str, timeout: float = 600.0, every_run: bool = False) -> None:
        self.epoch, self.batch, self.marker, self.timeout, self.every_run = epoch, batch, marker, timeout, every_run

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int) -> None:
        restarts = int(os.environ.get("SLURM_RESTART_COUNT") or 0)
        if (trainer.current_epoch, batch_idx) != (self.epoch, self.batch) or (restarts and not self.every_run):
            return
        if trainer.is_global_zero:
            Path(f"{self.marker}.{restarts}").write_text(f"{os.getpid()} {os.environ.get('SLURM_JOB_ID', '')}")
        deadline = time.monotonic() + self.timeout
        while time.monotonic() < deadline:
            time.sleep(0.05)


def pause_args(epoch: int, batch: int, marker: Path, every_run: bool = False) -> list[str]:
    """The overrides that add PauseOnFirstRun to a job; its marker files are `<marker>.<restart count>`."""
    return [
        "+callbacks.pause._target_=slurm_cluster.PauseOnFirstRun",
        f"+callbacks.pause.epoch={epoch}",
        f"+callbacks.pause.batch={batch}",
        f"+callbacks.pause.marker={marker}",
        f"+callbacks.pause.every_run={str(every_run).lower()}",
    ]


def script(action: str, timeout: float = 900) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["bash", str(SCRIPT), action], capture_output=True, text=True, timeout=timeout, env={**os.environ, "SLURM_LOCAL_DIR": str(CLUSTER_DIR)}
    )


def slurm(*args: str, check: bool = True) -> str:
    """A SLURM client command (squeue, sacct, scancel, scontrol) against the test cluster; its stdout."""
    proc = subprocess.run(
        list(args), capture_output=True, text=True, timeout=60, env={**os.environ, "SLURM_CONF": str(CLUSTER_DIR / "etc" / "slurm.conf")}
    )
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(args)} exited {proc.returncode}: {proc.stderr.strip()}")
    return proc.stdout


def job_states(job_id: str) -> list[str]:
    """sacct's states of a job's allocations (one per run: a requeued job shows its earlier runs with --duplicates)."""
    out = slurm("sacct", "-n", "-X", "-D", "-P", "-o", "State", "-j", job_id)
    return [line.strip() for line in out.splitlines() if line.strip()]


def final_states(job_id: str, timeout: float = 60) -> list[str]:
    """job_states once the job's last run has ended: slurmdbd records the end a moment after the sweep (which waits
    for the job's result file, written before the process exits) has moved on."""
    deadline = time.monotonic() + timeout
    while (states := job_states(job_id)) and states[-1] in ("PENDING", "RUNNING", "COMPLETING", "REQUEUED") and time.monotonic() < deadline:
        time.sleep(0.5)
    return states


def wait_for_file(path: Path, timeout: float, why: str, logs: Optional[Path] = None) -> str:
    """The content of `path` once it exists; fails after `timeout` seconds with the tail of the job logs in `logs`."""
    deadline = time.monotonic() + timeout
    while not path.exists():
        if time.monotonic() > deadline:
            tails = "\n".join(f"--- {f}\n{f.read_text()[-2000:]}" for f in sorted((logs or path.parent).rglob("*_log.*")))
            raise AssertionError(f"{why}: {path} did not appear in {timeout:.0f}s\n{slurm('squeue', check=False)}\n{tails}")
        time.sleep(0.1)
    time.sleep(0.1)  # the writer's write_text has finished
    return path.read_text()


def _skip_or_fail(message: str) -> None:
    import pytest

    if os.environ.get("TRANSFERLAB_REQUIRE_CLUSTER"):
        pytest.fail(f"TRANSFERLAB_REQUIRE_CLUSTER is set and {message}")
    pytest.skip(message)


def _cluster() -> Iterator[Path]:
    if os.name != "posix" or not hasattr(os, "geteuid") or os.geteuid() != 0:
        _skip_or_fail("a local SLURM cluster needs root (scripts/slurm_local.sh installs packages and starts daemons)")
    already_up = script("status").returncode == 0
    started = time.monotonic()
    proc = script("start")
    if proc.returncode != 0:
        _skip_or_fail(f"scripts/slurm_local.sh start failed ({proc.returncode}): {(proc.stderr or proc.stdout).strip().splitlines()[-1:]}")
    print(f"SLURM cluster up in {time.monotonic() - started:.1f}s: {proc.stdout.strip()}")
    conf = str(CLUSTER_DIR / "etc" / "slurm.conf")
    previous = os.environ.get("SLURM_CONF")
    os.environ["SLURM_CONF"] = conf  # the sweeps' submitit (sbatch, sacct) and the jobs (scontrol requeue) use it
    try:
        yield CLUSTER_DIR
    finally:
        if previous is None:
            os.environ.pop("SLURM_CONF", None)
        else:
            os.environ["SLURM_CONF"] = previous
        if not already_up:  # a cluster someone else started stays up
            script("stop")


def slurm_cluster_fixture() -> Any:
    """The module-scoped fixture (built here so that importing this module into a job needs no pytest)."""
    import pytest

    return pytest.fixture(scope="module", name="slurm_cluster")(_cluster)
