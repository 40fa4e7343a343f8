"""Runs inside SLURM jobs (hydra/launcher=slurm): who handles the preemption/time-limit signal, and where a
requeued job resumes from.

One owner of the signal: submitit. Its job runner (submitit.core.job_environment.SlurmJobEnvironment) installs a
handler for SUBMITIT_PREEMPT_SIGNAL (SIGUSR2 by default; sbatch gets `--signal=USR2@<signal_delay_s>`): on the
signal, rank 0 asks the launcher's `checkpoint()` for the same job again (hydra-submitit-launcher returns a
DelayedSubmission of the job), runs `scontrol requeue <job>` while its time-out countdown (`max_num_timeout`) is not
spent, and raises SystemExit; past the countdown it raises UncompletedJobError, which the sweep records as the
job's failure. Lightning gets `SLURMEnvironment(auto_requeue=False)` (`slurm_plugins`), so it installs no handler
of its own (it would save `hpc_ckpt_<n>.ckpt` and requeue a second time on SIGUSR1) and still reads the ranks of
a multi-task job from SLURM's variables.

Two things are ours. The SystemExit of a requeued job must end the process at once (`end_process_on_requeue`,
SIGKILL to itself: no cleanup may run): let through, it would unwind into the sweep's job record ("failed: exited
with code -1") and submitit's result file, and the sweep would read that stale result instead of waiting for the
requeued run. And the requeued run resumes from the run's own newest checkpoint, the end-of-epoch last.ckpt
(`resume_after_requeue`: `ckpt_path: null` means `auto` once SLURM_RESTART_COUNT > 0), so the interrupted epoch
runs again from its start, exactly as `ckpt_path=auto` after a kill.

submitit counts a signal as a time-out (not a preemption) once the job ran min(80 %, all but 10 minutes) of
timeout_min: with timeout_min <= 10 every signal is a time-out and spends one of max_num_timeout.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
from types import FrameType
from typing import Any, Callable, Optional

log = logging.getLogger(__name__)


def in_slurm_job() -> bool:
    """Inside a task that srun started (what Lightning calls a SLURM environment), not an interactive allocation."""
    from lightning.fabric.plugins.environments import SLURMEnvironment

    return SLURMEnvironment.detect()


def restart_count() -> int:
    """How often SLURM requeued this job (0 on its first run, and outside SLURM)."""
    try:
        return int(os.environ.get("SLURM_RESTART_COUNT") or 0)
    except ValueError:
        return 0


def slurm_plugins() -> list[Any]:
    """Lightning's cluster environment for a SLURM task, without Lightning's own requeue handler (see the module)."""
    if not in_slurm_job():
        return []
    from lightning.fabric.plugins.environments import SLURMEnvironment

    return [SLURMEnvironment(auto_requeue=False)]


def resume_after_requeue(ckpt_path: Optional[str]) -> Optional[str]:
    """`ckpt_path` of this run: a requeued SLURM job with no ckpt_path of its own resumes (`auto`) from its run folder."""
    if ckpt_path in (None, "") and restart_count() > 0:
        log.info("SLURM requeued this job (restart %d): resuming from its newest checkpoint (ckpt_path=auto)", restart_count())
        return "auto"
    return ckpt_path


def _submitit_signal() -> Optional[signal.Signals]:
    """The signal submitit's job runner handles in this process, when this process is a submitit SLURM job."""
    if "submitit" not in sys.modules or not os.environ.get("SLURM_JOB_ID"):
        return None
    name = os.environ.get("SUBMITIT_PREEMPT_SIGNAL", "USR2")
    return getattr(signal, f"SIG{name}", None) or getattr(signal, name, None)


def end_process_on_requeue() -> None:
    """Wrap submitit's handler so that, once it has requeued the job, this process ends right there (SIGKILL to itself): the
    requeued run writes the job's record and result. Its other outcomes (not requeued: UncompletedJobError; ranks > 0:
    nothing) go on as submitit made them. Call inside the job, after submitit installed its handler.

    Only this process acts on the signal: SLURM signals every process of the job step, DataLoader workers included,
    and a forked worker inherits the handler; run there, submitit's handler would checkpoint and requeue from the
    worker too (seen: two processes writing submitit's pickle at once, the job recorded failed)."""
    signum = _submitit_signal()
    if signum is None:
        return
    handler = signal.getsignal(signum)
    if not callable(handler) or getattr(handler, "transferlab_wrapped", False):
        return
    submitit_handler: Callable[[int, Optional[FrameType]], Any] = handler
    owner = os.getpid()

    def handle(number: int, frame: Optional[FrameType]) -> None:
        if os.getpid() != owner:  # a forked child (DataLoader worker): the job's process handles it
            return
        try:
            submitit_handler(number, frame)
        except SystemExit:  # submitit requeued the job (job_environment.SignalHandler._exit)
            log.warning("SLURM job %s requeued: this run ends here, the requeued one resumes from its checkpoint", os.environ.get("SLURM_JOB_ID"))
            logging.shutdown()
            sys.stdout.flush()
            sys.stderr.flush()
            os.kill(os.getpid(), signal.SIGKILL)  # at once, as `scontrol requeue` is about to (no exit code is read)

    handle.transferlab_wrapped = True  # type: ignore[attr-defined]
    signal.signal(signum, handle)
