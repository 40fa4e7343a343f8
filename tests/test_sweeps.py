"""Sweeps end to end: grid multiruns, Optuna studies that survive failures and a kill, launchers, DDP in a
sweep, two DDP "nodes" on loopback, and the sweep report in a real browser. Real photos, bundled Lite0, 1 epoch."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import (
    FAST,
    PETS_ARGS,
    chromium_render,
    free_port,
    needs_browser,
    read_metrics,
    read_splits,
    read_wandb_log,
    run,
    run_cli,
    run_mains,
)

pytestmark = pytest.mark.shared

SPECIES = ["data=oxford_pets", "data.task=species", "trainer.max_epochs=1", *PETS_ARGS]


def job_dirs(sweep: Path) -> list[Path]:
    return sorted((p for p in sweep.iterdir() if (p / ".hydra").is_dir()), key=lambda p: int(p.name))


def job_record(job: Path) -> dict:
    return json.loads((job / "job.json").read_text())


def summary_rows(sweep: Path) -> list[dict]:
    return list(csv.DictReader(open(sweep / "summary.csv")))


def overrides_of(job: Path) -> dict[str, str]:
    import yaml

    return dict(o.split("=", 1) for o in yaml.safe_load((job / ".hydra" / "overrides.yaml").read_text()))


# -- grid ---------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def grid_sweep(tmp_path_factory) -> Path:
    sweep = tmp_path_factory.mktemp("grid") / "sweep"
    run_cli("train", "-m", "optimizer.lr=1e-3,3e-3", "optimizer=adam,sgd", f"hydra.sweep.dir={sweep}", *SPECIES)
    return sweep


def test_grid_sweep_writes_one_dir_per_job_and_a_summary_row_each(grid_sweep):
    jobs = job_dirs(grid_sweep)
    assert [j.name for j in jobs] == ["0", "1", "2", "3"]
    assert all(job_record(j)["status"] == "completed" for j in jobs)
    rows = {r["job"]: r for r in summary_rows(grid_sweep)}
    assert len(rows) == 4
    seen = set()
    for job in jobs:
        row, overrides, metrics = rows[job.name], overrides_of(job), read_metrics(job)
        assert row["optimizer.lr"] == overrides["optimizer.lr"] and row["optimizer"] == overrides["optimizer"]
        assert row["status"] == "completed"
        for key in ("val/acc_best", "test/acc", "val/loss"):
            assert float(row[key]) == pytest.approx(metrics[key]), key
        if row["optimizer"] == "adam":
            assert metrics["test/acc"] >= 0.9  # cats vs dogs from Lite0 features: right after one epoch
        seen.add((row["optimizer.lr"], row["optimizer"]))
    assert seen == {(lr, o) for lr in ("0.001", "0.003") for o in ("adam", "sgd")}
    ranked = [float(r["val/acc_best"]) for r in summary_rows(grid_sweep)]
    assert ranked == sorted(ranked, reverse=True)  # sorted by the optimised metric
    # The job called best is one whose val/acc_best, read from its own metrics.json, is the highest (ties: any of them).
    (best,) = [r["job"] for r in summary_rows(grid_sweep) if r["vs_best"] == "best"]
    assert read_metrics(grid_sweep / best)["val/acc_best"] == max(read_metrics(j)["val/acc_best"] for j in jobs)
    assert '<tr class="best"><td>' + best + "</td>" in (grid_sweep / "report.html").read_text().replace("\n", "")
    markdown = (grid_sweep / "summary.md").read_text()
    assert "4 jobs: 4 completed" in markdown and "| optimizer.lr | optimizer | status |" in markdown


def test_report_command_rebuilds_the_summary(grid_sweep, tmp_path):
    for name in ("summary.csv", "summary.md", "report.html"):
        (grid_sweep / name).unlink()
    good, bad = run_mains([("report", [str(grid_sweep)]), ("report", [str(tmp_path)])], tmp_path)  # the real main(), one process
    assert good["code"] == 0, good["stderr"]
    assert len(summary_rows(grid_sweep)) == 4 and (grid_sweep / "report.html").is_file()
    assert bad["code"] == 2 and bad["stderr"].strip().startswith("error:") and "no job folders" in bad["stderr"]


@needs_browser
def test_report_html_renders_in_headless_chromium(grid_sweep, tmp_path):
    import numpy as np
    from PIL import Image

    page = grid_sweep / "report.html"
    html = page.read_text()
    assert "http://" not in html and "https://" not in html and "<script" not in html  # self-contained
    assert "top losses, with the map of the predicted class" in html  # the best run's interpretation
    console, widths = chromium_render(page, tmp_path / "report.png")
    assert not [m for m in console if m["level"] in ("SEVERE", "WARNING")], console
    # metric vs parameters, learning curves, the best run's confusion matrix: every picture decoded
    assert len(widths) >= 3 and all(w > 0 for w in widths), widths
    pixels = np.asarray(Image.open(tmp_path / "report.png").convert("L"), dtype=np.float32)
    assert pixels.std() > 20 and (pixels < 128).mean() > 0.01  # not a blank page


# -- failures -------------------------------------------------------------------------------------------------
def test_failing_jobs_are_recorded_and_the_sweep_goes_on(tmp_path):
    sweep = tmp_path / "sweep"
    # inf: Adam turns the head into NaN (a diverged run); "bad": a value the config check rejects
    proc = run_cli("train", "-m", "optimizer.lr=3e-3,inf,bad", f"hydra.sweep.dir={sweep}", *SPECIES, check=False)
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert "1 job(s) failed (1): train/loss is nan" in " ".join(proc.stderr.split())
    assert "1 job(s) failed (2): optimizer.lr: expected a number > 0, e.g. optimizer.lr=1e-3, got 'bad'" in " ".join(proc.stderr.split())
    records = [job_record(j) for j in job_dirs(sweep)]
    assert [r["status"] for r in records] == ["completed", "failed", "failed"]
    assert read_metrics(sweep / "0")["test/acc"] >= 0.9
    assert "diverged" in records[1]["error"] and "Traceback" in (sweep / "1" / "error.txt").read_text()
    rows = {r["job"]: r for r in summary_rows(sweep)}
    assert rows["0"]["status"] == "completed" and rows["1"]["status"] == "failed" and "diverged" in rows["1"]["error"]
    markdown = (sweep / "summary.md").read_text()
    assert "## Failures" in markdown and "job 1 (optimizer.lr=inf): train/loss is nan" in markdown
    assert "train/loss is nan" in (sweep / "report.html").read_text()


# -- Optuna ---------------------------------------------------------------------------------------------------
OPTUNA = ["hparams_search=lite0_frozen", "hydra.sweeper.n_trials=3", *SPECIES]


def study_trials(sweep: Path, name: str = "lite0_frozen") -> list:
    import optuna

    return optuna.load_study(study_name=name, storage=f"sqlite:///{sweep / 'optuna.db'}").get_trials(deepcopy=False)


def train_command(*overrides: str) -> list[str]:
    return [sys.executable, "-m", "transferlab.train", *overrides]


def test_optuna_study_killed_after_two_trials_resumes_to_exactly_three(tmp_path):
    sweep = tmp_path / "study"
    args = train_command(*OPTUNA, f"hydra.sweep.dir={sweep}")
    log = open(tmp_path / "first.log", "w")
    first = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.monotonic() + 600
    while not (sweep / "2" / "job.json").is_file():  # the third trial has started: the first two are told
        assert first.poll() is None and time.monotonic() < deadline, (tmp_path / "first.log").read_text()[-3000:]
        time.sleep(0.1)
    os.killpg(first.pid, signal.SIGKILL)
    first.wait()
    states = [t.state.name for t in study_trials(sweep)]
    assert states == ["COMPLETE", "COMPLETE", "RUNNING"]

    second = subprocess.run(args, capture_output=True, text=True, timeout=600)
    assert second.returncode == 0, second.stderr[-3000:]
    trials = study_trials(sweep)
    assert [t.state.name for t in trials].count("COMPLETE") == 3
    interrupted = trials[2]
    assert interrupted.state.name == "FAIL"
    rerun = next(t for t in trials[3:] if t.user_attrs.get("retry_of") == 2)  # the killed trial's parameters, again
    assert rerun.state.name == "COMPLETE" and rerun.params == interrupted.params
    assert job_record(sweep / "2")["status"] == "interrupted"
    results = (sweep / "optimization_results.yaml").read_text()
    assert "complete: 3" in results and "best_params" in results
    assert [r["status"] for r in summary_rows(sweep)].count("completed") == 3


def test_optuna_marks_nan_trials_failed_and_prunes_from_val_acc(tmp_path):
    sweep = tmp_path / "study"
    # A space where one value always diverges; RandomSampler(seed=5) draws inf, 3e-3, 3e-3.
    proc = run_cli(
        "train",
        *OPTUNA,
        f"hydra.sweep.dir={sweep}",
        "hydra.sweeper.n_trials=2",
        "hydra.sweeper.pruner=null",
        "hydra.sweeper.sampler._target_=optuna.samplers.RandomSampler",
        "~hydra.sweeper.sampler.n_startup_trials",
        "hydra.sweeper.sampler.seed=5",
        "hydra.sweeper.params={optimizer.lr:'choice(3e-3,inf)'}",
        check=False,
    )
    trials = study_trials(sweep)
    assert proc.returncode == 1, proc.stderr[-3000:]  # the sweep ran to its end; exit 1 says a job failed
    assert [t.state.name for t in trials].count("COMPLETE") == 2
    failed = [t for t in trials if t.state.name == "FAIL"]
    assert len(failed) == 1 and failed[0].params["optimizer.lr"] == "inf" and "diverged" in failed[0].user_attrs["error"]

    pruned = tmp_path / "pruned"
    # ThresholdPruner(lower=2): no accuracy reaches 2, so every trial is pruned at its first report (epoch 0 of 3).
    run_cli(
        "train",
        *OPTUNA,
        f"hydra.sweep.dir={pruned}",
        "hydra.sweeper.n_trials=2",
        "trainer.max_epochs=3",
        "hydra.sweeper.pruner._target_=optuna.pruners.ThresholdPruner",
        "~hydra.sweeper.pruner.n_startup_trials",
        "hydra.sweeper.pruner.n_warmup_steps=0",
        "+hydra.sweeper.pruner.lower=2.0",
    )
    trials = study_trials(pruned)
    assert [t.state.name for t in trials] == ["PRUNED", "PRUNED"]
    assert all(list(t.intermediate_values) == [0] for t in trials)
    assert all(job_record(j)["status"] == "pruned" for j in job_dirs(pruned))
    # the report shows how far a pruned trial got (from its CSV log: it never wrote metrics.json)
    assert all(
        r["status"] == "pruned" and float(r["val/acc"]) == pytest.approx(t.intermediate_values[0])
        for r, t in zip(sorted(summary_rows(pruned), key=lambda r: r["job"]), trials)
    )


# -- launchers and DDP ----------------------------------------------------------------------------------------
def test_local_launcher_runs_a_two_job_sweep_in_separate_processes(tiny_folder, tmp_path):
    sweep = tmp_path / "sweep"
    run_cli(
        "train",
        "-m",
        "hydra/launcher=local",
        "optimizer.lr=1e-3,3e-3",
        "data=image_folder",
        f"data.root={tiny_folder}",
        "trainer.max_epochs=1",
        f"hydra.sweep.dir={sweep}",
        "finetune.head_solver=sgd",
        *FAST,
    )
    records = [job_record(j) for j in job_dirs(sweep)]
    assert [r["status"] for r in records] == ["completed", "completed"]
    assert len({r["pid"] for r in records}) == 2 and all(read_metrics(j)["epochs"] == 1 for j in job_dirs(sweep))
    assert list((sweep / ".submitit").iterdir())  # submitit's own per-job logs


def test_slurm_launcher_config_composes_for_ddp_jobs(tmp_path):
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    from transferlab.config.paths import config_dir

    with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
        cfg = compose(
            "train",
            overrides=[
                "hydra/launcher=slurm",
                "trainer=ddp",
                "trainer.devices=4",
                "hydra.launcher.gpus_per_node=4",
                "hydra.launcher.tasks_per_node=4",
                "hydra.launcher.partition=gpu",
            ],
            return_hydra_config=True,
        )
    launcher = OmegaConf.to_container(cfg.hydra.launcher)
    assert launcher["_target_"].endswith("SlurmLauncher")
    assert (launcher["gpus_per_node"], launcher["tasks_per_node"], launcher["partition"]) == (4, 4, "gpu")


@pytest.mark.slow
def test_multirun_with_ddp_writes_one_dir_and_one_wandb_run_per_job(tiny_folder, tmp_path):
    sweep = tmp_path / "sweep"
    proc = run_cli(
        "train",
        "-m",
        "trainer=ddp_cpu",
        "optimizer.lr=1e-3,3e-3",
        "logger=wandb",
        "tags=[sweep,ddp]",
        "data=image_folder",
        f"data.root={tiny_folder}",
        "trainer.max_epochs=1",
        "trainer.precision=32-true",
        f"hydra.sweep.dir={sweep}",
        *FAST,
        cwd=tmp_path,
    )
    assert sorted(p.name for p in sweep.iterdir() if p.is_dir()) == ["0", "1"]  # no folder per rank
    assert not (tmp_path / "logs").exists() and not (tmp_path / "outputs").exists()  # ranks > 0 wrote nowhere else
    assert (proc.stdout + proc.stderr).count("GLOBAL_RANK: 1, MEMBER: 2/2") == 2  # each job ran 2 processes
    for job in job_dirs(sweep):
        assert (job / "train.log").read_text().count("Data: 2 classes") == 2  # both ranks logged into the job's folder
        runs = list((job / "wandb").glob("offline-run-*/*.wandb"))
        assert len(runs) == 1, runs  # one W&B run per job, from rank 0 only
        records = read_wandb_log(runs[0])
        run = next(r.run for r in records if r.WhichOneof("record_type") == "run")
        assert run.run_group == f"{sweep.parent.name}/{sweep.name}" and run.job_type == "train"
        assert list(run.tags) == ["sweep", "ddp"] and run.display_name.startswith(f"{job.name}: ")
        assert any(r.WhichOneof("record_type") == "exit" for r in records)  # finished
        assert job_record(job)["status"] == "completed"
        # Rank 0 wrote the whole test split's predictions (both ranks' shares gathered), and test/acc is over them.
        rows = list(csv.DictReader(open(job / "test_predictions.csv", newline="")))
        assert len(rows) == list(read_splits(job).values()).count("test") >= 2
        assert read_metrics(job)["test/acc"] == pytest.approx(sum(r["label"] == r["predicted"] for r in rows) / len(rows))


@pytest.mark.slow
def test_two_nodes_on_loopback_match_one_process(tmp_path):
    """torchrun on each "node" (here: two on 127.0.0.1), one process each, gloo; 32 images a node per step equals
    one process with 64, so the test accuracy must agree within one image."""
    out, port = tmp_path / "two_nodes", free_port()
    torchrun = Path(sys.executable).parent / "torchrun"
    common = ["trainer=ddp_cpu", "trainer.devices=1", "trainer.num_nodes=2", f"hydra.run.dir={out}", "optimizer.lr=3e-3", *SPECIES]
    nodes = [
        subprocess.Popen(
            [
                str(torchrun),
                "--nnodes=2",
                "--nproc-per-node=1",
                f"--node-rank={rank}",
                "--master-addr=127.0.0.1",
                f"--master-port={port}",
                "-m",
                "transferlab.train",
                *common,
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for rank in (0, 1)
    ]
    logs = [node.communicate(timeout=900)[0] for node in nodes]
    assert [n.returncode for n in nodes] == [0, 0], "\n".join(log[-3000:] for log in logs)
    assert "GLOBAL_RANK: 1, MEMBER: 2/2" in logs[1] and "All distributed processes registered. Starting with 2 processes" in logs[0]
    run("train", "data.batch_size=64", f"hydra.run.dir={tmp_path / 'one'}", "optimizer.lr=3e-3", *SPECIES)
    two, one = read_metrics(out), read_metrics(tmp_path / "one")
    assert two["test/acc"] == pytest.approx(one["test/acc"], abs=1 / 74 + 1e-6)
    assert two["test/acc"] >= 0.85 and not list(out.glob("metrics*.json"))[1:]
