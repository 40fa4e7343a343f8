"""transferlab.api: the commands from Python, with the same configs; the results equal the CLI's."""

from __future__ import annotations

import csv

import pytest
from PIL import Image

from conftest import FAST, read_metrics, run, run_cli
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
