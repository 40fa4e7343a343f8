"""Parallel Optuna workers (`hydra.sweeper.workers=N`, transferlab.sweeps.optuna_workers): a slow trial holds no
other, every trial runs once in its own job folder, a killed worker's trial is retried when the command is re-run,
and pruning reaches the study through the shared journal file. Tiny images, 1 epoch, frozen backbone."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import FAST, cli_env
from optuna_faults import study_trials

SLOW, HANG = 0, 1  # trial numbers: 0 waits until 4 others are complete, 1 hangs until the test kills its worker


def job_record(job: Path) -> dict:
    return json.loads((job / "job.json").read_text())


def test_storage_url_journal_paths_and_sqlite_with_workers(tmp_path):
    from transferlab.core.errors import ConfigError
    from transferlab.sweeps.optuna_trials import storage_url

    sweep = tmp_path / "sweep"
    assert storage_url(None, sweep) == f"sqlite:///{sweep / 'optuna.db'}"  # workers=1: as before
    assert storage_url(None, sweep, workers=3) == f"journal:{sweep / 'optuna.journal'}"
    assert storage_url("journal:studies/a.journal", sweep, workers=3) == f"journal:{sweep / 'studies' / 'a.journal'}"
    assert storage_url(f"journal:{tmp_path / 'b.journal'}", sweep) == f"journal:{tmp_path / 'b.journal'}"
    (sweep / "optuna.journal").touch()
    assert storage_url(None, sweep) == f"journal:{sweep / 'optuna.journal'}"  # a study begun with workers resumes with 1
    with pytest.raises(ConfigError, match="SQLite is not safe for 3 worker processes.*journal:<file>"):
        storage_url("sqlite:///x.db", sweep, workers=3)
    (sweep / "optuna.journal").unlink()
    (sweep / "optuna.db").touch()
    with pytest.raises(ConfigError, match="hydra.sweeper.workers=1"):
        storage_url(None, sweep, workers=2)  # this sweep's study is in SQLite: not silently a new journal study
    with pytest.raises(ConfigError, match="names no file"):
        storage_url("journal:", sweep)


@pytest.mark.shared
def test_three_workers_pass_a_slow_trial_and_resume_after_one_is_killed(tiny_folder, tmp_path):
    sweep, marker = tmp_path / "study", tmp_path / "hang.pid"
    args = [
        sys.executable,
        "-m",
        "transferlab.train",
        "hparams_search=lite0_frozen",
        "hydra.sweeper.n_trials=6",
        "hydra.sweeper.workers=3",
        "trainer.max_epochs=1",
        "data=image_folder",
        f"data.root={tiny_folder}",
        f"hydra.sweep.dir={sweep}",
        *FAST,
        "+callbacks.slow._target_=optuna_faults.SlowTrial",
        f"+callbacks.slow.slow={SLOW}",
        "+callbacks.slow.wait_for=4",
        f"+callbacks.slow.hang={HANG}",
        f"+callbacks.slow.marker={marker}",
    ]
    log = open(tmp_path / "first.log", "w")
    first = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, env=cli_env(), start_new_session=True)
    try:
        deadline = time.monotonic() + 300
        while not marker.is_file():
            assert first.poll() is None and time.monotonic() < deadline, (tmp_path / "first.log").read_text()[-3000:]
            time.sleep(0.1)
        pid = int(marker.read_text())
        assert pid != first.pid  # the trial runs in a worker process, not in the sweep's
        os.kill(pid, signal.SIGKILL)
        assert first.wait(timeout=300) == 1, (tmp_path / "first.log").read_text()[-3000:]  # the lost trial is a failure of the run
    finally:
        if first.poll() is None:
            os.killpg(first.pid, signal.SIGKILL)
    trials = study_trials(sweep)
    assert [t.state.name for t in trials] == ["COMPLETE", "RUNNING", "COMPLETE", "COMPLETE", "COMPLETE", "COMPLETE"]
    slow, others = trials[SLOW], trials[2:]
    # the four others were asked, run and told while the slow trial ran: nothing waited for it
    assert all(slow.datetime_start < t.datetime_start and t.datetime_complete < slow.datetime_complete for t in others)
    pids = [job_record(sweep / str(n))["pid"] for n in range(6)]
    assert len(set(pids)) == 3 and pids[HANG] == pid and first.pid not in pids  # three worker processes
    assert all(list(t.intermediate_values) == [0] for t in trials if t.state.name == "COMPLETE")  # pruning callbacks reported
    lost = job_record(sweep / str(HANG))
    assert lost["status"] == "failed" and "re-run the same command" in lost["error"]
    assert not (sweep / "optuna.db").exists()  # workers share a journal file, not SQLite

    # The same command again, with a pruner that prunes at the first report: the killed trial's parameters run
    # again (first, as a new trial), pruned by the worker's job through the journal, and the study is done.
    pruner = [
        "hydra.sweeper.pruner._target_=optuna.pruners.ThresholdPruner",
        "~hydra.sweeper.pruner.n_startup_trials",
        "hydra.sweeper.pruner.n_warmup_steps=0",
        "+hydra.sweeper.pruner.lower=2.0",
    ]
    second = subprocess.run([*args, *pruner], capture_output=True, text=True, env=cli_env(), timeout=300)
    assert second.returncode == 0, second.stderr[-3000:]
    trials = study_trials(sweep)
    assert [t.number for t in trials] == list(range(7))
    assert [t.state.name for t in trials] == ["COMPLETE", "FAIL", "COMPLETE", "COMPLETE", "COMPLETE", "COMPLETE", "PRUNED"]
    assert trials[HANG].user_attrs["error"].startswith("interrupted")
    retry = trials[6]
    assert retry.user_attrs["retry_of"] == HANG and retry.params == trials[HANG].params and list(retry.intermediate_values) == [0]
    jobs = sorted((p for p in sweep.iterdir() if (p / ".hydra").is_dir()), key=lambda p: int(p.name))
    assert [j.name for j in jobs] == [str(n) for n in range(7)]  # one job folder per trial, named by its number
    records = [job_record(j) for j in jobs]
    assert [r["trial"] for r in records] == list(range(7))
    assert [r["status"] for r in records] == ["completed", "interrupted", *["completed"] * 4, "pruned"]
    results = (sweep / "optimization_results.yaml").read_text()
    assert "complete: 5" in results and "pruned: 1" in results
    assert len((sweep / "summary.csv").read_text().strip().splitlines()) == 1 + 7  # the summary saw every job
