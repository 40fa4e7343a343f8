"""logger=mlflow against a real `mlflow server` (sqlite backend, artefacts proxied, a free port on 127.0.0.1) that
this module starts and stops: runs, metric histories and artefacts read back with MlflowClient, one experiment
per sweep, and the run's page in the MLflow UI in headless Chromium."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import FAST, chromium_driver, free_port, needs_browser, run, run_cli, wait_for_http

pytest.importorskip("mlflow")


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory):
    root = tmp_path_factory.mktemp("mlflow")
    port = free_port()
    cmd = [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", f"sqlite:///{root / 'db.sqlite'}"]
    cmd += ["--artifacts-destination", str(root / "artifacts"), "--host", "127.0.0.1", "--port", str(port), "--workers", "1"]
    log = root / "server.log"
    proc = subprocess.Popen(cmd, stdout=open(log, "w"), stderr=subprocess.STDOUT, cwd=root)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_for_http(f"{url}/health", proc, log, timeout=180)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()


@pytest.fixture(scope="module")
def tracked_run(mlflow_server, tiny_folder, tmp_path_factory):
    out = tmp_path_factory.mktemp("tracked") / "run"
    args = ["data=image_folder", f"data.root={tiny_folder}", "trainer.max_epochs=3", "finetune.head_solver=sgd", "tags=[mlflow,e2e]", *FAST]
    run("train", *args, "logger=mlflow", f"logger.mlflow.tracking_uri={mlflow_server}", f"hydra.run.dir={out}")
    return out


def test_the_run_its_history_and_artefacts_read_back(mlflow_server, tracked_run, tmp_path):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(mlflow_server)
    experiment = client.get_experiment_by_name("train")
    (found,) = [r for r in client.search_runs([experiment.experiment_id]) if r.info.run_name == tracked_run.name]
    assert found.data.params["optimizer/lr"] and found.data.params["finetune/mode"] == "frozen"
    assert found.data.tags["transferlab.tags"] == "mlflow,e2e" and found.data.tags["transferlab.task"] == "train"
    history = client.get_metric_history(found.info.run_id, "val/acc")
    assert len(history) == 3 + 1 and all(0 <= m.value <= 1 for m in history)  # one point per epoch, and metrics.json's at the end
    local = json.loads((tracked_run / "metrics.json").read_text())
    assert found.data.metrics["test/acc"] == pytest.approx(local["test/acc"])
    names = {a.path for a in client.list_artifacts(found.info.run_id)} | {a.path for a in client.list_artifacts(found.info.run_id, "checkpoints")}
    assert {"metrics.json", "confusion_matrix.png", "reliability_diagram.png", "report.html", "checkpoints/best.ckpt"} <= names
    copy = Path(client.download_artifacts(found.info.run_id, "metrics.json", str(tmp_path)))
    assert json.loads(copy.read_text()) == local
    best = Path(client.download_artifacts(found.info.run_id, "checkpoints/best.ckpt", str(tmp_path)))
    assert best.read_bytes() == (tracked_run / "checkpoints" / "best.ckpt").read_bytes()  # the calibrated one


def test_every_key_of_metrics_json_reaches_mlflow_for_the_default_probe(mlflow_server, tiny_folder, tmp_path):
    """The L-BFGS probe's val/* come from its inner folds after fit, calibration's record after that: all reach the server."""
    from mlflow.tracking import MlflowClient

    out = tmp_path / "probe"
    run(
        "train",
        "data=image_folder",
        f"data.root={tiny_folder}",
        *FAST,
        "logger=mlflow",
        f"logger.mlflow.tracking_uri={mlflow_server}",
        f"hydra.run.dir={out}",
    )
    client = MlflowClient(mlflow_server)
    (found,) = [r for r in client.search_runs([client.get_experiment_by_name("train").experiment_id]) if r.info.run_name == out.name]
    local = json.loads((out / "metrics.json").read_text())
    assert local["selection/protocol"] == "probe_inner_cv" and "val/acc" in local
    for key, value in local.items():
        if isinstance(value, bool) or isinstance(value, (int, float)):
            assert found.data.metrics[key] == pytest.approx(float(value)), key
        elif isinstance(value, list):
            assert [found.data.metrics[f"{key}_low"], found.data.metrics[f"{key}_high"]] == pytest.approx(value), key
        elif value is not None:
            assert found.data.params[f"metrics.json/{key}"] == str(value), key


def test_a_sweep_is_one_experiment_with_a_run_per_job(mlflow_server, tiny_folder, tmp_path):
    from mlflow.tracking import MlflowClient

    sweep = tmp_path / "multiruns" / "sweep1"
    args = ["data=image_folder", f"data.root={tiny_folder}", "trainer.max_epochs=1", "finetune.head_solver=sgd", *FAST]
    run_cli(
        "train", "-m", "optimizer.lr=1e-3,3e-3", "logger=mlflow", f"logger.mlflow.tracking_uri={mlflow_server}", f"hydra.sweep.dir={sweep}", *args
    )
    client = MlflowClient(mlflow_server)
    experiment = client.get_experiment_by_name("train/multiruns/sweep1")
    runs = client.search_runs([experiment.experiment_id])
    by_job = {r.info.run_name[:3]: r for r in runs}  # "<job>: <its overrides>", as W&B names them
    assert sorted(by_job) == ["0: ", "1: "] and by_job["0: "].data.params["optimizer/lr"] == "0.001"
    assert by_job["1: "].data.params["optimizer/lr"] == "0.003" and all(r.info.status == "FINISHED" for r in runs)
    assert all(r.data.tags["transferlab.sweep"] == "multiruns/sweep1" for r in runs)


def test_the_default_is_a_local_store_under_the_log_folder(tiny_folder, tmp_path):
    from mlflow.tracking import MlflowClient

    logs = tmp_path / "logs"
    args = ["data=image_folder", f"data.root={tiny_folder}", "trainer.max_epochs=1", "finetune.head_solver=sgd", *FAST]
    run("train", *args, "logger=mlflow", f"paths.log_dir={logs}", f"hydra.run.dir={tmp_path / 'run'}")
    client = MlflowClient(f"sqlite:///{logs / 'mlflow.db'}")
    (found,) = client.search_runs([client.get_experiment_by_name("train").experiment_id])
    assert found.info.run_name == "run" and "val/acc" in found.data.metrics
    assert (logs / "mlartifacts").is_dir() and {a.path for a in client.list_artifacts(found.info.run_id)} >= {"metrics.json"}


@needs_browser
def test_the_run_page_in_the_mlflow_ui_shows_val_acc(mlflow_server, tracked_run):
    from mlflow.tracking import MlflowClient
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    client = MlflowClient(mlflow_server)
    experiment = client.get_experiment_by_name("train")
    (found,) = [r for r in client.search_runs([experiment.experiment_id]) if r.info.run_name == tracked_run.name]
    with chromium_driver() as driver:
        driver.get(f"{mlflow_server}/#/experiments/{experiment.experiment_id}/runs/{found.info.run_id}")
        WebDriverWait(driver, 90).until(lambda d: "val/acc" in d.find_element(By.TAG_NAME, "body").text)
        assert tracked_run.name in driver.find_element(By.TAG_NAME, "body").text
