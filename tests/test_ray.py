"""hydra/launcher=ray on a real Ray cluster: a head and one worker node on 127.0.0.1, started by this module (`ray
start --block`, stopped by their pids, never `ray stop`, which would stop every Ray on the machine). Two jobs of a grid
run as Ray tasks and the sweep's summary reads them; a job that raises and a job whose worker is killed are recorded
as failed and the sweep goes on. Tiny images, 1 epoch, frozen backbone. Without Ray installed the cluster tests skip
(TRANSFERLAB_REQUIRE_CLUSTER=1: they fail); the config and settings tests need no Ray."""

from __future__ import annotations

import csv
import importlib.util
import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import NamedTuple

import pytest

from conftest import FAST, cli_env, free_port, read_metrics, run_cli

NO_USAGE_STATS = {"RAY_USAGE_STATS_ENABLED": "0"}  # Ray reports usage to a public host unless told not to


def job_dirs(sweep: Path) -> list[Path]:
    return sorted((p for p in sweep.iterdir() if (p / "job.json").is_file()), key=lambda p: int(p.name))


def job_record(job: Path) -> dict:
    return json.loads((job / "job.json").read_text())


def summary_rows(sweep: Path) -> dict[str, dict]:
    return {r["job"]: r for r in csv.DictReader(open(sweep / "summary.csv"))}


def ray_or_skip() -> None:
    if importlib.util.find_spec("ray") is None:
        message = "ray is not installed: pip install 'transferlab[cluster]'"
        if os.environ.get("TRANSFERLAB_REQUIRE_CLUSTER"):
            pytest.fail(message)
        pytest.skip(message)


def start_node(args: list[str], log: Path, env: dict[str, str], timeout: float = 120) -> subprocess.Popen:
    """`ray start ... --block`: the node's processes live as long as this one; it is up when it says it blocks."""
    proc = subprocess.Popen(
        [str(Path(sys.executable).parent / "ray"), "start", *args, "--block"], stdout=open(log, "w"), stderr=subprocess.STDOUT, env=env
    )
    deadline = time.monotonic() + timeout
    while "will now block" not in log.read_text():
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            raise AssertionError(f"ray start failed:\n{log.read_text()[-3000:]}")
        time.sleep(0.5)
    return proc


class Cluster(NamedTuple):
    address: str  # host:port of the head
    env: dict[str, str]  # what its commands add to the environment (cli_env): its token, no usage statistics


@pytest.fixture(scope="module")
def ray_cluster() -> Iterator[Cluster]:
    """A head (2 CPUs) with one worker node (1 CPU), both on 127.0.0.1, in a private temp dir, with token
    authentication and a token of its own (newer Ray turns token authentication on by default once ~/.ray/auth_token
    exists; an explicit mode and token keep the test independent of that file)."""
    ray_or_skip()
    temp = Path(tempfile.mkdtemp(prefix="tlray-", dir="/tmp"))  # short: Ray's socket paths must fit 107 bytes
    extra = {**NO_USAGE_STATS, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(32)}
    env = cli_env(**extra)  # the tests folder on PYTHONPATH: the fault-injection callback in the jobs
    port = free_port()
    common = ["--node-ip-address=127.0.0.1", "--disable-usage-stats"]
    nodes = []
    try:
        head = ["--head", f"--port={port}", "--num-cpus=2", "--include-dashboard=false", f"--temp-dir={temp}"]
        head += [f"--ray-client-server-port={free_port()}", f"--dashboard-agent-listen-port={free_port()}"]
        nodes.append(start_node([*head, *common], temp / "head.log", env))
        worker = [f"--address=127.0.0.1:{port}", "--num-cpus=1", f"--dashboard-agent-listen-port={free_port()}"]
        nodes.append(start_node([*worker, *common], temp / "worker.log", env))
        yield Cluster(f"127.0.0.1:{port}", extra)
    finally:
        for node in reversed(nodes):  # SIGTERM: `ray start --block` stops the processes it started
            node.terminate()
            try:
                node.wait(timeout=60)
            except subprocess.TimeoutExpired:
                node.kill()
        shutil.rmtree(temp, ignore_errors=True)


def sweep_args(cluster: Cluster, tiny_folder: Path, sweep: Path) -> list[str]:
    return [
        "-m",
        "hydra/launcher=ray",
        f"hydra.launcher.address={cluster.address}",
        "data=image_folder",
        f"data.root={tiny_folder}",
        "trainer.max_epochs=1",
        "finetune=frozen",
        "finetune.head_solver=sgd",
        f"hydra.sweep.dir={sweep}",
        *FAST,
    ]


@pytest.mark.shared
def test_a_two_job_grid_runs_as_ray_tasks_and_the_summary_reads_them(tiny_folder, ray_cluster, tmp_path):
    import yaml

    sweep = tmp_path / "sweep"
    run_cli("train", *sweep_args(ray_cluster, tiny_folder, sweep), "optimizer.lr=1e-3,3e-3", env=cli_env(**ray_cluster.env))
    jobs = job_dirs(sweep)
    records = [job_record(j) for j in jobs]
    assert [r["status"] for r in records] == ["completed", "completed"]
    assert len({r["pid"] for r in records}) == 2 and all(read_metrics(j)["epochs"] == 1 for j in jobs)  # one worker process each
    for job in jobs:  # run by Ray: the worker set the job's id to its Ray task id (hex), not the launcher's placeholder
        job_id = yaml.safe_load((job / ".hydra" / "hydra.yaml").read_text())["hydra"]["job"]["id"]
        assert len(job_id) >= 32 and int(job_id, 16) >= 0, job_id
    rows = summary_rows(sweep)
    assert {k: (r["optimizer.lr"], r["status"]) for k, r in rows.items()} == {"0": ("0.001", "completed"), "1": ("0.003", "completed")}
    assert all(float(r["test/acc"]) == pytest.approx(read_metrics(sweep / k)["test/acc"]) for k, r in rows.items())


@pytest.mark.shared
def test_killed_and_failed_jobs_are_recorded_and_the_sweep_goes_on(tiny_folder, ray_cluster, tmp_path):
    """One job at a time (max_parallel=1). Job 0 waits at its first batch and its Ray worker is killed: lost, so the
    launcher records it (and Ray must not run it again: it would not wait the second time, and complete); job 1 raises
    (a config error, recorded by the job); job 2 starts after both and completes."""
    sweep, marker, go, log = tmp_path / "sweep", tmp_path / "paused.pid", tmp_path / "go", tmp_path / "sweep.log"
    pause = ["+callbacks.pause._target_=faults.PauseAt", "+callbacks.pause.epoch=0", "+callbacks.pause.batch=0", f"+callbacks.pause.marker={marker}"]
    args = [*sweep_args(ray_cluster, tiny_folder, sweep), "optimizer.lr=1e-3,bad,3e-3", "hydra.launcher.max_parallel=1", *pause]
    with open(log, "w") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "transferlab.train", *args, f"+callbacks.pause.resume_file={go}"],
            stdout=out,
            stderr=subprocess.STDOUT,
            env=cli_env(**ray_cluster.env),
        )
        deadline = time.monotonic() + 300
        while not marker.is_file() or not marker.read_text():
            assert proc.poll() is None and time.monotonic() < deadline, log.read_text()[-4000:]
            time.sleep(0.2)
        killed = int(marker.read_text())
        os.kill(killed, signal.SIGKILL)
        go.touch()  # from now on no job waits
        assert proc.wait(timeout=600) == 1, log.read_text()[-4000:]  # 1: some jobs failed
    records = {j.name: job_record(j) for j in job_dirs(sweep)}
    assert {k: r["status"] for k, r in records.items()} == {"0": "failed", "1": "failed", "2": "completed"}
    assert records["0"]["pid"] == killed and "Ray worker process died" in records["0"]["error"]  # the job's own start record, kept
    assert "optimizer.lr: expected a number > 0" in records["1"]["error"]
    assert records["2"]["started"] >= max(records["0"]["finished"], records["1"]["finished"]) and read_metrics(sweep / "2")["epochs"] == 1
    rows = summary_rows(sweep)
    assert [rows[k]["status"] for k in "012"] == ["failed", "failed", "completed"] and "worker process died" in rows["0"]["error"]
    output = " ".join(log.read_text().split())
    assert "1 job(s) failed (0): its Ray worker process died" in output and "1 job(s) failed (1): optimizer.lr" in output


def test_an_address_nobody_answers_at_is_one_line_and_exit_2(tmp_path, monkeypatch, capsys):
    """In this process (no CLI start): the launcher's own contract, one `error:` line and exit 2, before Ray retries."""
    from hydra import compose, initialize_config_dir

    from hydra_plugins.transferlab_ray import ray_jobs
    from hydra_plugins.transferlab_ray.ray_launcher import RayLauncher
    from transferlab.config.paths import config_dir

    ray_or_skip()
    port = free_port()
    with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
        cfg = compose("train", overrides=[f"hydra.sweep.dir={tmp_path / 'sweep'}"], return_hydra_config=True)
    monkeypatch.setattr(ray_jobs, "configure_log", lambda *args: None)  # leave this process's logging alone
    launcher = RayLauncher(address=f"127.0.0.1:{port}")
    launcher.setup(hydra_context=object(), task_function=print, config=cfg)
    with pytest.raises(SystemExit) as exit_info:
        launcher.launch([["optimizer.lr=1e-3"]], initial_job_idx=0)
    err = capsys.readouterr().err.strip()
    assert exit_info.value.code == 2 and len(err.splitlines()) == 1, err
    assert err.startswith("error: hydra.launcher.address=") and f"no Ray cluster answers at 127.0.0.1:{port}" in err and "address=null" in err


def test_ray_launcher_config_composes_and_builds_without_importing_ray(tmp_path):
    from hydra import compose, initialize_config_dir
    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    from transferlab.config.paths import config_dir

    overrides = ["hydra/launcher=ray", "hydra.launcher.address=10.0.0.5:6379", "hydra.launcher.num_gpus=2", "trainer=ddp", "trainer.devices=2"]
    with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
        cfg = compose("train", overrides=overrides, return_hydra_config=True)
    launcher = OmegaConf.to_container(cfg.hydra.launcher)
    assert launcher["_target_"] == "hydra_plugins.transferlab_ray.ray_launcher.RayLauncher"
    assert (launcher["address"], launcher["num_gpus"], launcher["num_cpus"]) == ("10.0.0.5:6379", 2, 1)
    assert launcher["env_vars"]["RAY_USAGE_STATS_ENABLED"] == "0" and cfg.hydra.sweeper.max_batch_size is None
    with pytest.MonkeyPatch.context() as patch:
        patch.setitem(sys.modules, "ray", None)  # `import ray` fails: Hydra builds the launcher at every multirun, Ray waits for launch
        built = instantiate(cfg.hydra.launcher)
    assert type(built).__name__ == "RayLauncher" and built.settings["address"] == "10.0.0.5:6379"


def test_each_job_gets_the_forwarded_environment_but_no_secret_by_pattern(monkeypatch):
    from hydra_plugins.transferlab_ray.ray_cluster import task_options

    monkeypatch.setenv("TRANSFERLAB_PROGRESS", "plain")
    monkeypatch.setenv("TRANSFERLAB_API_KEY", "secret-value")
    monkeypatch.setenv("WANDB_API_KEY", "another-secret")
    settings = {"num_cpus": 2, "forward_env": ["TRANSFERLAB_*", "WANDB_*"], "env_vars": {"A": 1}, "runtime_env": {"env_vars": {"B": "2"}}}
    options = task_options(settings)
    env = options["runtime_env"]["env_vars"]
    assert env["TRANSFERLAB_PROGRESS"] == "plain" and (env["A"], env["B"]) == ("1", "2")
    assert "TRANSFERLAB_API_KEY" not in env and "WANDB_API_KEY" not in env
    assert "WANDB_API_KEY" in task_options({**settings, "forward_env": ["WANDB_API_KEY"]})["runtime_env"]["env_vars"]  # named exactly
    assert (options["max_retries"], options["max_calls"], options["num_cpus"]) == (0, 1, 2.0)  # a lost job is not run twice
