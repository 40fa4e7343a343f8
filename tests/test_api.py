"""transferlab.api: the commands from Python, with the same configs; the results equal the CLI's."""

from __future__ import annotations

import csv
import json
import re
from pathlib import Path

import pytest
from PIL import Image

from conftest import FAST, cli_env, read_metrics, run, run_cli
from transferlab import api
from transferlab.core.errors import ConfigError

ARGS = ["data=image_folder", "trainer.max_epochs=2", "finetune.head_solver=sgd", "seed=3", *FAST]


def test_train_returns_the_metrics_the_cli_writes(tiny_folder, tmp_path):
    overrides = [f"data.root={tiny_folder}", *ARGS]
    result = api.train(overrides, run_dir=tmp_path / "api")
    run_cli("train", *overrides, f"hydra.run.dir={tmp_path / 'cli'}")
    cli = read_metrics(tmp_path / "cli")
    assert result.run_dir == tmp_path / "api" and result.best_checkpoint == tmp_path / "api" / "checkpoints" / "best.ckpt"
    for key in ("val/acc", "test/acc", "test/acc_ci95", "epochs"):
        assert result.metrics[key] == cli[key], key
    for key in ("val/loss", "test/nll"):
        assert result.metrics[key] == pytest.approx(cli[key], abs=1e-6), key

    evaluated = api.evaluate(result.best_checkpoint, run_dir=tmp_path / "eval")
    assert evaluated.metrics["test/acc"] == result.metrics["test/acc"] and evaluated.best_checkpoint is None

    model = api.load(result.best_checkpoint)
    files = sorted(tiny_folder.rglob("*.jpg"))[::3]
    run("predict", f"ckpt_path={result.best_checkpoint}", f"input={tiny_folder}", f"output={tmp_path / 'p.csv'}", f"hydra.run.dir={tmp_path / 'p'}")
    by_cli = {row["path"]: row for row in csv.DictReader(open(tmp_path / "p.csv"))}
    from_files = model.predict(files, topk=2)
    from_pil = model.predict([Image.open(f) for f in files], topk=2)
    for file, a, b in zip(files, from_files, from_pil):
        assert a.label == by_cli[str(file)]["label"] and a.prob == pytest.approx(float(by_cli[str(file)]["score"]), abs=1e-5)
        assert b.label == a.label and b.prob == pytest.approx(a.prob, abs=0.02)  # Pillow's decoder, not libjpeg-turbo's
        assert [label for label, _ in a.top] == sorted(model.class_names, key=lambda c: -dict(a.top)[c])
    assert api.predict(result.best_checkpoint, files[0])[0].label == from_files[0].label


def test_errors_are_raised_not_printed(tiny_folder, tmp_path):
    with pytest.raises(ConfigError, match="optimizer.lr: expected a number > 0"):
        api.train([f"data.root={tiny_folder}", *ARGS, "optimizer.lr=-1"], run_dir=tmp_path / "bad")


def normalised_log(run_dir: Path, secret: str) -> list[str]:
    """The job log's lines without time stamps and timings, with the run folder and its cache folder replaced;
    asserts the secret (in the cache folder's name) is masked wherever the log names that folder."""
    text = (run_dir / "train.log").read_text()
    assert secret not in text and f"{run_dir}-cache-***" in text
    text = text.replace(f"{run_dir}-cache-***", "<cache>").replace(str(run_dir), "<run>")
    lines = [re.sub(r"^\[[^\]]*\]", "", line) for line in text.splitlines() if line.strip()]
    return [re.sub(r"\d+(\.\d+)? (s|img/s)\b", "<time>", line) for line in lines]


def test_the_api_runs_the_cli_job_same_metrics_same_redacted_log(tiny_folder, tmp_path, monkeypatch):
    """One job, two ways in: the same overrides with a credential in them (here in the cache folder's name, which
    the log prints) give the same metrics.json (to 1e-6), the same job log with the credential masked, and the
    same masked `.hydra/overrides.yaml`."""
    secret = "tl-s3cret-0123456789"
    monkeypatch.setenv("TRANSFERLAB_TEST_TOKEN", secret)
    overrides = [f"data.root={tiny_folder}", *ARGS, "tags=[parity]"]
    api.train([*overrides, f"paths.cache_dir={tmp_path / 'api'}-cache-{secret}"], run_dir=tmp_path / "api")
    cli_cache = f"paths.cache_dir={tmp_path / 'cli'}-cache-{secret}"
    run_cli("train", *overrides, cli_cache, f"hydra.run.dir={tmp_path / 'cli'}", env=cli_env(TRANSFERLAB_TEST_TOKEN=secret))
    by_api, by_cli = read_metrics(tmp_path / "api"), read_metrics(tmp_path / "cli")
    assert set(by_api) == set(by_cli)
    for key, value in by_cli.items():
        if isinstance(value, float):
            assert by_api[key] == pytest.approx(value, abs=1e-6), key
        elif key != "best_checkpoint":
            assert by_api[key] == value, key
    assert normalised_log(tmp_path / "api", secret) == normalised_log(tmp_path / "cli", secret)
    for run_dir in (tmp_path / "api", tmp_path / "cli"):
        saved = (run_dir / ".hydra" / "overrides.yaml").read_text()
        assert secret not in saved and f"{run_dir}-cache-***" in saved


def test_the_api_starts_ddp_ranks_through_the_cli_relaunch(tiny_folder, tmp_path):
    """api.train with trainer=ddp_cpu: this process is rank 0, rank 1 is `python -m transferlab.cli.train` with the
    same overrides in the same folder (the relaunch the command line uses); both fill their share of the cache,
    and the process is left as it was (no process group, no rank variables) for the next run."""
    import os

    import torch.distributed as dist

    rank_variables = ("LOCAL_RANK", "NODE_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
    assert not set(rank_variables) & set(os.environ)
    out = tmp_path / "ddp"
    fresh_cache = f"paths.cache_dir={tmp_path / 'cache'}"  # so that both ranks have features to compute
    api.train([f"data.root={tiny_folder}", "data=image_folder", "trainer=ddp_cpu", "trainer.max_epochs=1", fresh_cache, *FAST], run_dir=out)
    log = (out / "train.log").read_text()
    assert "GLOBAL_RANK: 1, MEMBER: 2/2" in log and "GLOBAL_RANK: 0, MEMBER: 1/2" in log
    stats = json.loads((out / "feature_cache.json").read_text())
    shards = {p.name.rsplit("-", 1)[1] for p in Path(stats["train"]["store"]).glob("*.npy")}
    assert {"r0.npy", "r1.npy"} <= shards  # both ranks computed their share
    assert not dist.is_initialized() and not set(rank_variables) & set(os.environ)
    single = api.evaluate(out / "checkpoints" / "best.ckpt", ["data.num_workers=0", "trainer.enable_progress_bar=false"], run_dir=tmp_path / "eval")
    assert single.metrics["test/acc"] == pytest.approx(read_metrics(out)["test/acc"], abs=1e-6)


def test_the_api_defaults_are_the_commands_own():
    """api.load's documented defaults are conf/predict.yaml's values (the YAML is the one source), and a bad one is
    refused by the same schema as the command line's, before any model is read."""
    import inspect

    from omegaconf import OmegaConf

    from transferlab.config.paths import config_dir

    predict = OmegaConf.load(Path(config_dir()) / "predict.yaml")
    defaults = {k: p.default for k, p in inspect.signature(api.load).parameters.items() if p.default is not inspect.Parameter.empty}
    assert defaults == {k: predict[k] for k in defaults} and set(defaults) == {"runtime", "device", "precision", "tta"}
    with pytest.raises(ConfigError, match="runtime"):
        api.load("/nonexistent.ckpt", runtime="tf")
