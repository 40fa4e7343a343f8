"""What replaced two patches of Lightning internals, on Lightning's public interfaces (docs/architecture.md):
a CSV logger that continues metrics.csv when a run resumes, and an evaluation sampler that shards without repeats."""

from __future__ import annotations

import csv

import torch

from transferlab.data.sampling import EvaluationShardSampler
from transferlab.training.loggers import ResumableCSVLogger


def rows(path) -> list[dict]:
    return list(csv.DictReader(open(path)))


def test_csv_logger_continues_a_resumed_run_and_widens_its_header(tmp_path):
    first = ResumableCSVLogger(save_dir=str(tmp_path), name="csv", version="")
    first.log_hyperparams({"lr": 0.1, "nested": {"a": 1}})
    first.log_metrics({"train/loss": torch.tensor(0.5), "epoch": 0}, step=0)
    first.finalize("success")
    again = ResumableCSVLogger(save_dir=str(tmp_path), name="csv", version="")  # a resumed run, same folder
    again.log_metrics({"train/loss": 0.4, "epoch": 1}, step=1)
    again.save()
    assert [(r["epoch"], r["train/loss"]) for r in rows(tmp_path / "csv" / "metrics.csv")] == [("0", "0.5"), ("1", "0.4")]
    again.log_metrics({"val/acc": 0.9, "epoch": 1}, step=2)  # a new column: earlier rows kept under the wider header
    again.finalize("success")
    table = rows(tmp_path / "csv" / "metrics.csv")
    assert list(table[0]) == ["epoch", "step", "train/loss", "val/acc"] and [r["val/acc"] for r in table] == ["", "", "0.9"]
    assert "lr: 0.1" in (tmp_path / "csv" / "hparams.yaml").read_text()
    assert again.log_dir == str(tmp_path / "csv") and again.name == "csv" and again.version == ""


def test_evaluation_shards_cover_every_image_exactly_once():
    data = list(range(71))
    shards = [list(EvaluationShardSampler(data, num_replicas=2, rank=r)) for r in (0, 1)]
    assert [len(s) for s in shards] == [36, 35] and sorted(shards[0] + shards[1]) == data
    assert len(EvaluationShardSampler(data, num_replicas=3, rank=2)) == 23
