"""hydra/launcher=slurm through a real one-node SLURM cluster (scripts/slurm_local.sh, tests/slurm_cluster.py): jobs
submitted with sbatch, DDP across two SLURM tasks, a preempted job that is requeued and resumes to the uninterrupted
result, a job past its time limit requeued once then recorded failed, failures that do not stop the sweep, and
parallel Optuna workers as one job array. (Every test that uses the cluster lives in this module: one module runs on
one xdist worker, so no other module can stop the cluster under it.)

Nothing is mocked: submitit writes the sbatch scripts and reads the states with sacct (slurmdbd), SLURM sends the
signals, `scontrol requeue` puts the job back. Who handles the signal: submitit (transferlab.training.slurm).
"""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import FAST, cli_env, deterministic_run, read_metrics, run, run_cli
from optuna_faults import study_trials
from slurm_cluster import final_states, pause_args, slurm, slurm_cluster_fixture, wait_for_file

pytestmark = pytest.mark.shared

slurm_cluster = slurm_cluster_fixture()

# What every job asks of the one-node cluster (2 CPUs on CI): one CPU, 1 GB, no GPU, the default partition.
SLURM = ["hydra/launcher=slurm", "hydra.launcher.cpus_per_task=1", "hydra.launcher.mem_gb=1", "hydra.launcher.gpus_per_node=0"]
FROZEN = ["data=image_folder", "finetune.head_solver=sgd", "trainer.max_epochs=1", *FAST]
# The kill-and-resume test's run (tests/test_crash_safety.py): full fine-tuning, dropout, a DataLoader worker,
# deterministic; 3 epochs here, preempted in the middle of the third.
DETERMINISTIC = deterministic_run(epochs=3)
COMPARED = ["val/acc", "val/acc_best", "val/loss", "test/acc", "test/loss"]
SWEEP_TIMEOUT = 600  # an upper bound for a hang (a loaded 2-core CI), not a speed check


def job_record(job: Path) -> dict:
    return json.loads((job / "job.json").read_text())


def summary_rows(sweep: Path) -> list[dict]:
    return list(csv.DictReader(open(sweep / "summary.csv")))


def prediction_rows(run_dir: Path) -> list[list[str]]:
    return [row.split(",") for row in (run_dir / "test_predictions.csv").read_text().splitlines()]


def slurm_job_ids(sweep: Path) -> list[str]:
    """The SLURM job ids submitit used, from the folders it writes per job (.submitit/<job id>/)."""
    return sorted(p.name for p in (sweep / ".submitit").iterdir() if p.is_dir())


def start_sweep(*overrides: str, log: Path) -> subprocess.Popen:
    """`transferlab-train -m` on the cluster, in the background (a test signals its job meanwhile)."""
    with open(log, "w") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "transferlab.train", "-m", *SLURM, *overrides],
            stdout=out,
            stderr=subprocess.STDOUT,
            env=cli_env(),
            start_new_session=True,
        )


def finish(proc: subprocess.Popen, log: Path) -> str:
    """Wait for a background sweep; its output. A hang kills it (and cancels its jobs) and fails the test."""
    try:
        proc.wait(SWEEP_TIMEOUT)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        slurm("scancel", "--user=root", check=False)
        raise AssertionError(f"the sweep did not end in {SWEEP_TIMEOUT}s\n{slurm('squeue', check=False)}\n{log.read_text()[-4000:]}") from None
    return log.read_text()


# -- a grid sweep, with one failing job -----------------------------------------------------------------------
@pytest.fixture(scope="module")
def grid(slurm_cluster, tiny_folder, tmp_path_factory) -> tuple[Path, subprocess.CompletedProcess]:
    """Three jobs: `bad`, which the job's config check rejects (first: it frees its CPU soon), and two learning rates
    that train."""
    sweep = tmp_path_factory.mktemp("slurm_grid") / "sweep"
    proc = run_cli(
        "train",
        "-m",
        *SLURM,
        "optimizer.lr=bad,1e-3,3e-3",
        f"data.root={tiny_folder}",
        *FROZEN,
        f"hydra.sweep.dir={sweep}",
        check=False,
        timeout=SWEEP_TIMEOUT,
    )
    return sweep, proc


def test_grid_sweep_jobs_run_as_slurm_jobs_and_the_summary_reads_them(grid):
    sweep, proc = grid
    jobs = [sweep / str(n) for n in (1, 2)]
    (array,) = {i.split("_")[0] for i in slurm_job_ids(sweep)}  # one job array, a task per job
    assert [final_states(f"{array}_{n}") for n in range(3)] == [["COMPLETED"]] * 3  # sacct: each job ran once, to its end
    assert slurm("sacct", "-n", "-X", "-P", "-o", "JobName", "-j", array).split() == ["train"] * 3
    script = next((sweep / ".submitit").glob("*/*_submission.sh")).read_text()
    assert "#SBATCH --cpus-per-task=1" in script and "#SBATCH --mem=1GB" in script and "--partition" not in script  # the default partition
    records = [job_record(j) for j in jobs]
    assert [r["status"] for r in records] == ["completed", "completed"] and records[0]["pid"] != records[1]["pid"]
    # One owner of the requeue signal: Lightning, whose info lines reach the job log, installed no handler of its own.
    train_log = (sweep / "1" / "train.log").read_text()
    assert "GPU available: False" in train_log and "SLURM auto-requeueing enabled" not in train_log
    rows = {r["job"]: r for r in summary_rows(sweep)}
    for job in jobs:
        assert rows[job.name]["status"] == "completed" and read_metrics(job)["epochs"] == 1
        assert float(rows[job.name]["test/acc"]) == pytest.approx(read_metrics(job)["test/acc"])
    assert "3 jobs: 2 completed, 1 failed" in (sweep / "summary.md").read_text()


def test_a_failing_slurm_job_is_recorded_and_the_sweep_goes_on(grid):
    sweep, proc = grid
    assert proc.returncode == 1, proc.stderr[-3000:]  # the sweep ran to its end; exit 1 says a job failed
    error = "optimizer.lr: expected a number > 0, e.g. optimizer.lr=1e-3, got 'bad'"
    assert f"1 job(s) failed (0): {error}" in " ".join(proc.stderr.split())
    assert job_record(sweep / "0")["status"] == "failed" and job_record(sweep / "0")["error"] == error
    assert {r["job"]: r["status"] for r in summary_rows(sweep)} == {"0": "failed", "1": "completed", "2": "completed"}


# -- DDP across two SLURM tasks -------------------------------------------------------------------------------
def test_ddp_over_two_slurm_tasks_predicts_as_one_process(slurm_cluster, tiny_folder, tmp_path):
    """tasks_per_node=2: srun starts both ranks, Lightning reads them from SLURM's variables (no launcher of its
    own); 4 images a rank per step against one process with 8: the same test images, at most one prediction off."""
    sweep, log = tmp_path / "sweep", tmp_path / "ddp.log"
    common = [f"data.root={tiny_folder}", "data=image_folder", "finetune.head_solver=sgd", "trainer.max_epochs=2", "trainer.precision=32-true", *FAST]
    proc = start_sweep(
        "hydra.launcher.tasks_per_node=2",
        "trainer=ddp_cpu",
        "data.batch_size=4",
        *common,
        f"hydra.sweep.dir={sweep}",
        "hydra.launcher.mem_gb=2",
        log=log,
    )
    run("train", *common, f"hydra.run.dir={tmp_path / 'one'}")  # the one-process reference, while the job runs
    output = finish(proc, log)
    assert proc.returncode == 0, output[-4000:]
    (job_id,) = slurm_job_ids(sweep)
    task_logs = [(sweep / ".submitit" / job_id / f"{job_id}_{task}_log.out").read_text() for task in (0, 1)]
    assert "GLOBAL_RANK: 0, MEMBER: 1/2" in task_logs[0] and "GLOBAL_RANK: 1, MEMBER: 2/2" in task_logs[1]  # one rank per SLURM task
    assert "#SBATCH --ntasks-per-node=2" in (sweep / ".submitit" / job_id / f"{job_id}_submission.sh").read_text()
    job, one = sweep / "0", tmp_path / "one"
    assert sorted(p.name for p in sweep.iterdir() if p.is_dir() and not p.name.startswith(".")) == ["0"]
    assert job_record(job)["status"] == "completed" and read_metrics(job)["epochs"] == 2
    ddp_rows, one_rows = prediction_rows(job), prediction_rows(one)
    assert len(ddp_rows) > 2 and [r[:2] for r in ddp_rows] == [r[:2] for r in one_rows]  # the same images and labels, in order
    assert sum(a[2] != b[2] for a, b in zip(ddp_rows, one_rows)) <= 1
    n_test = len(ddp_rows) - 1
    assert read_metrics(job)["test/acc"] == pytest.approx(read_metrics(one)["test/acc"], abs=1 / n_test + 1e-6)


# -- preemption and time limits -------------------------------------------------------------------------------
@pytest.mark.slow
def test_preempted_job_is_requeued_and_resumes_to_the_uninterrupted_result(slurm_cluster, tiny_folder, tmp_path):
    """SIGUSR2 (submitit's signal) in epoch 2, batch 2: submitit requeues the job, the process ends, the requeued run
    resumes from the end-of-epoch-1 last.ckpt and runs epoch 2 again from its start, as if never interrupted."""
    common = [f"data.root={tiny_folder}", *DETERMINISTIC]
    sweep, marker, log = tmp_path / "sweep", tmp_path / "paused", tmp_path / "sweep.log"
    proc = start_sweep(*common, f"hydra.sweep.dir={sweep}", *pause_args(2, 2, marker), "hydra.launcher.mem_gb=2", log=log)
    run_cli("train", *common, f"hydra.run.dir={tmp_path / 'reference'}")  # uninterrupted, while the job runs
    pid, job_id = wait_for_file(Path(f"{marker}.0"), 300, "the job never reached epoch 2, batch 2", sweep).split()
    slurm("scancel", "--signal=USR2", job_id)
    output = finish(proc, log)
    assert proc.returncode == 0, output[-4000:]

    job, expected = sweep / "0", read_metrics(tmp_path / "reference")
    assert final_states(job_id) == ["REQUEUED", "COMPLETED"]  # sacct keeps the interrupted run
    assert not Path(f"{marker}.1").exists()  # the requeued run went past the pause (SLURM_RESTART_COUNT=1)
    train_log = (job / "train.log").read_text()
    assert "Caught signal SIGUSR2" in train_log and f"ckpt_path=auto: resuming from {job / 'checkpoints' / 'last.ckpt'}" in train_log
    assert not list(job.rglob("hpc_ckpt*")) and "SLURM auto-requeueing enabled" not in train_log  # Lightning's handler stayed off
    got = read_metrics(job)
    assert got["epochs"] == expected["epochs"] == 3
    for key in COMPARED:
        assert got[key] == pytest.approx(expected[key], abs=1e-6), (key, got[key], expected[key])
    val = [r for r in csv.DictReader(open(job / "csv" / "metrics.csv")) if r["val/acc"]]
    assert [r["epoch"] for r in val] == ["0", "1", "2"]  # the half-done epoch 2 ran once, from its start
    ref_rows, got_rows = prediction_rows(tmp_path / "reference"), prediction_rows(job)
    assert [r[:3] for r in got_rows] == [r[:3] for r in ref_rows]
    assert all(abs(float(a) - float(b)) <= 1e-5 for g, r in zip(got_rows[1:], ref_rows[1:]) for a, b in zip(g[3:], r[3:]))
    assert job_record(job)["status"] == "completed" and summary_rows(sweep)[0]["status"] == "completed"


@pytest.mark.slow
def test_job_past_its_time_limit_is_requeued_once_then_recorded_failed(slurm_cluster, tiny_folder, tmp_path):
    """timeout_min=1 with max_num_timeout=1: each run waits in epoch 0 for SLURM's SIGUSR2, sent signal_delay_s=20
    before the limit (SLURM checks limits every 30 s and sends it up to 30 s early: 10 to 40 s into the run, after the
    job's handler is in place and well before the kill at 60 s). The first run is requeued; the second is out of
    time-outs: submitit raises, the job is recorded failed, and the sweep says so."""
    sweep, marker, log = tmp_path / "sweep", tmp_path / "paused", tmp_path / "sweep.log"
    limits = ["hydra.launcher.timeout_min=1", "hydra.launcher.max_num_timeout=1", "hydra.launcher.signal_delay_s=20"]
    proc = start_sweep(*limits, f"data.root={tiny_folder}", *FROZEN, f"hydra.sweep.dir={sweep}", *pause_args(0, 0, marker, every_run=True), log=log)
    output = finish(proc, log)
    assert proc.returncode == 1, output[-4000:]
    error = "UncompletedJobError: Job not requeued because: timed-out too many times."
    assert f"1 job(s) failed (0): {error}" in " ".join(output.split())
    (job_id,) = {i.split("_")[0] for i in slurm_job_ids(sweep)}
    assert final_states(job_id) == ["REQUEUED", "COMPLETED"]  # two runs: requeued once; the second ended by recording its failure
    record = job_record(sweep / "0")
    assert record["status"] == "failed" and record["error"] == error
    (row,) = summary_rows(sweep)
    assert row["status"] == "failed" and row["error"] == error


def test_workers_on_slurm_are_one_job_array(slurm_cluster, tiny_folder, tmp_path):
    sweep = tmp_path / "study"
    args = [
        sys.executable,
        "-m",
        "transferlab.train",
        "hparams_search=lite0_frozen",
        "hydra/launcher=slurm",
        "hydra.launcher.cpus_per_task=1",
        "hydra.launcher.mem_gb=1",
        "hydra.launcher.gpus_per_node=0",
        "hydra.sweeper.n_trials=3",
        "hydra.sweeper.workers=2",
        "trainer.max_epochs=1",
        "data=image_folder",
        f"data.root={tiny_folder}",
        f"hydra.sweep.dir={sweep}",
        *FAST,
    ]
    try:
        proc = subprocess.run(args, capture_output=True, text=True, env=cli_env(), timeout=600)
    except subprocess.TimeoutExpired:
        slurm("scancel", "--user=root", check=False)
        raise
    assert proc.returncode == 0, proc.stderr[-3000:]
    (submission,) = (sweep / ".submitit").glob("*/*_submission.sh")
    assert "#SBATCH --array=0-1" in submission.read_text()  # two workers: one array of two SLURM jobs
    array = submission.name.split("_")[0]
    assert {p.name for p in (sweep / ".submitit").iterdir() if p.name.startswith(array + "_")} >= {f"{array}_0", f"{array}_1"}
    trials = study_trials(sweep)
    assert [t.number for t in trials] == [0, 1, 2] and all(t.state.name == "COMPLETE" for t in trials)
    assert {t.user_attrs["worker"].split("@")[0] for t in trials} <= {"0", "1"}
    assert [json.loads((sweep / str(n) / "job.json").read_text())["status"] for n in range(3)] == ["completed"] * 3
