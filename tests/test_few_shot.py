"""Few-shot learning curves (issue 33): `data.shots=K` keeps K training images per class, drawn with data.shots_seed,
validation and test untouched; a sweep over data.shots gets `few_shot_curve.csv` and its picture in the report.
The draw and the report's arithmetic first (no training), then real runs on the shared photos (bundled Lite0, frozen,
the feature cache on disk so the grid reuses the first run's features)."""

from __future__ import annotations

import csv
import json
import logging
from pathlib import Path

import pytest
import yaml

from conftest import PETS, PETS_ARGS, make_datamodule, read_metrics, read_splits, run, run_cli

# Cats vs dogs on the shared sample, one split for every run (data.split_seed=0): the seeds move only the K images.
# PETS_ARGS (224 px, bf16): the features other tests of the session cached are reused.
COMMON = ["data=oxford_pets", "data.task=species", "data.split_seed=0", "data.num_workers=0", "interpret.enabled=false", *PETS_ARGS]


def species(path: str) -> str:
    return "cat" if Path(path).name[0].isupper() else "dog"


def read_rows(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


# -- the draw -------------------------------------------------------------------------------------------------
def test_shots_accepts_a_count_all_or_null_and_refuses_the_rest_in_one_line():
    from transferlab.core.errors import ConfigError
    from transferlab.data.shots import parse_shots

    assert [parse_shots(v) for v in (1, 8, "3", "all", None)] == [1, 8, 3, None, None]
    for bad in (0, -2, "two", 1.5, True, "1e2"):
        with pytest.raises(ConfigError, match=r"^data.shots: expected a whole number >= 1") as raised:
            parse_shots(bad)
        assert "\n" not in str(raised.value)


def test_the_draw_is_seeded_nested_and_keeps_small_classes_whole():
    from transferlab.data.shots import keep_shots

    train = [(Path(f"c{label}/{i}.jpg"), label) for label, n in ((0, 12), (1, 9), (2, 2)) for i in range(n)]
    two = keep_shots(train, 2, seed=7, key_of=str)
    assert set(keep_shots(list(reversed(train)), 2, seed=7, key_of=str)) == set(two)  # the listing order does not matter
    assert set(keep_shots(train, 2, seed=8, key_of=str)) != set(two)  # another seed, other images
    assert [sum(1 for _, y in two if y == c) for c in range(3)] == [2, 2, 2]
    one, four = keep_shots(train, 1, 7, str), keep_shots(train, 4, 7, str)
    assert set(one) <= set(two) <= set(four)  # nested: more shots add images, never swap them
    assert [sum(1 for _, y in four if y == c) for c in range(3)] == [4, 4, 2]  # class 2 has only 2: both kept


def test_multilabel_draw_holds_at_least_k_images_of_every_label():
    from transferlab.data.shots import keep_shots

    labels = [(0,), (0, 1), (1,), (2,), (0, 2), (), (0,), (0,), (1, 2), (0,), (3,), (0, 1)]
    train = [(Path(f"{i}.jpg"), label) for i, label in enumerate(labels)]
    for shots in (1, 2):
        kept = keep_shots(train, shots, seed=0, key_of=str)
        held = {label: sum(1 for _, ls in kept if label in ls) for label in range(4)}
        assert all(held[label] >= min(shots, sum(1 for ls in labels if label in ls)) for label in range(4)), held
        assert not any(ls == () for _, ls in kept)  # an image with no label is no shot of any
    assert len(keep_shots(train, 1, 0, str)) < len(train)


@pytest.mark.shared
def test_shots_cut_only_the_training_split(tmp_path, caplog):
    values = dict(root=str(PETS), task="species", download=False, cache_dir=str(tmp_path), split_seed=0, shots_seed=1)
    full = make_datamodule("oxford_pets", **values, shots=None)
    full.setup()
    with caplog.at_level(logging.INFO, logger="transferlab.data.shots"):
        few = make_datamodule("oxford_pets", **values, shots=2)
        few.setup()
    assert few.shots == 2 and full.shots is None and make_datamodule("oxford_pets", **values, shots="all").shots is None
    assert few.splits["val"] == full.splits["val"] and few.splits["test"] == full.splits["test"]
    assert set(few.splits["train"]) <= set(full.splits["train"]) and sorted(y for _, y in few.splits["train"]) == [0, 0, 1, 1]
    line = f"data.shots=2: 2 training images per class (4 of {len(full.splits['train'])} kept; val {len(full.splits['val'])} and test {len(full.splits['test'])} untouched)"
    assert line in caplog.text


# -- real runs ----------------------------------------------------------------------------------------------------
@pytest.mark.shared
def test_shots_2_trains_the_probe_on_exactly_two_images_per_class(tmp_path):
    out = tmp_path / "shots2"
    run("train", *COMMON, "seed=1", "data.shots=2", "finetune.head_solver=lbfgs", f"hydra.run.dir={out}")  # C by inner folds (the default)
    splits = read_splits(out)
    train = [p for p, s in splits.items() if s == "train"]
    assert sorted(species(p) for p in train) == ["cat", "cat", "dog", "dog"]
    full = make_datamodule(
        "oxford_pets", root=str(PETS), task="species", download=False, cache_dir=str(tmp_path), split_seed=0, shots=None, shots_seed=1
    )
    full.setup()
    for split in ("val", "test"):  # the same images a run without data.shots validates and tests on
        assert sorted(p for p, s in splits.items() if s == split) == sorted(Path(p).name for p, _ in full.splits[split])
    assert len(splits) == 4 + len(full.splits["val"]) + len(full.splits["test"])  # the images left out are not in splits.csv
    log = (out / "train.log").read_text()
    assert "data.shots=2: 2 training images per class" in log and "4 training rows" in log  # what the probe was fitted on
    assert "validation images train too" not in log  # the probe does not merge validation images into a K-shot set
    metrics = read_metrics(out)
    assert metrics["test/acc"] > 0.6  # two photos of each species already separate them on Lite0 features


@pytest.mark.shared
def test_shots_refuses_bad_values_and_cross_validation(tmp_path):
    from transferlab.core.errors import ConfigError

    with pytest.raises(ConfigError, match=r"data.shots: expected"):
        run("train", *COMMON, "data.shots=0", f"hydra.run.dir={tmp_path / 'zero'}")
    with pytest.raises(ConfigError, match=r"data.shots=2 with cv.folds=3: .* seeds instead"):
        run("train", *COMMON, "data.shots=2", "cv.folds=3", f"hydra.run.dir={tmp_path / 'cv'}")


def write_job(folder: Path, overrides: list[str], metrics: dict, train: int, test: list[str]) -> None:
    (folder / ".hydra").mkdir(parents=True)
    (folder / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump(overrides))
    (folder / "job.json").write_text(json.dumps({"status": "completed", "overrides": overrides}))
    (folder / "metrics.json").write_text(json.dumps({"val/acc_best": 0.5, **metrics}))
    rows = [[f"t{i}.jpg", "train", 1, "x"] for i in range(train)] + [[p, "test", 1, "x"] for p in test]
    with open(folder / "splits.csv", "w", newline="") as fh:
        csv.writer(fh).writerows([["path", "split", "size", "sha256"], *rows])


def test_curve_arithmetic_series_and_one_seed_without_interval(tmp_path):
    """A laid-out sweep (no training): two heads x shots 1,4,null x seeds; one point has a single seed."""
    from transferlab.core.statistics import mean_std_interval
    from transferlab.sweeps.summary import write_report

    sweep, job = tmp_path / "sweep", 0
    accuracy = {("lbfgs", "1"): [0.6, 0.7, 0.65], ("lbfgs", "4"): [0.8, 0.85, 0.9], ("lbfgs", "null"): [0.95, 0.96, 0.97]}
    accuracy |= {("sgd", "1"): [0.5], ("sgd", "4"): [0.7, 0.72, 0.8], ("sgd", "null"): [0.9, 0.93, 0.94]}
    for (head, shots), values in accuracy.items():
        for seed, value in enumerate(values, start=1):
            train = 100 if shots == "null" else 2 * int(shots)
            overrides = [f"finetune.head_solver={head}", f"data.shots={shots}", f"seed={seed}", "data.split_seed=0"]
            write_job(sweep / str(job), overrides, {"test/acc": value}, train, ["a.jpg", "b.jpg"])
            job += 1
    write_report(sweep, html=True)
    rows = read_rows(sweep / "few_shot_curve.csv")
    assert list(rows[0]) == ["series", "shots", "runs", "metric", "mean", "ci95_low", "ci95_high", "train_images"]
    assert [(r["series"], r["shots"], r["runs"]) for r in rows] == [
        (f"finetune.head_solver={h}", s, n) for h in ("lbfgs", "sgd") for s, n in (("1", "3" if h == "lbfgs" else "1"), ("4", "3"), ("all", "3"))
    ]
    point = rows[1]
    mean, _, (low, high) = mean_std_interval([0.8, 0.85, 0.9])
    assert (
        float(point["mean"]) == pytest.approx(mean)
        and float(point["ci95_low"]) == pytest.approx(low)
        and float(point["ci95_high"]) == pytest.approx(high)
    )
    assert point["train_images"] == "8" and rows[2]["train_images"] == "100" and point["metric"] == "test/acc"
    lonely = rows[3]
    assert lonely["runs"] == "1" and lonely["ci95_low"] == lonely["ci95_high"] == ""
    markdown = (sweep / "summary.md").read_text()
    assert "## Few-shot curve: test/acc" in markdown and "one run: no interval" in markdown
    assert "Every job was tested on the same test images" in markdown
    page = (sweep / "report.html").read_text()
    assert 'alt="few-shot curve"' in page and page.count("data:image/png;base64,") >= 2


# -- the grid -------------------------------------------------------------------------------------------------
@pytest.mark.shared
def test_few_shot_grid_report_has_one_point_per_shot_count_with_an_interval(tmp_path):
    sweep = tmp_path / "sweep"
    grid = ["data.shots=1,2,all", "seed=1,2", "trainer.max_epochs=2", "optimizer.lr=3e-3"]  # the head by epochs (sgd): fast
    run_cli("train", "-m", *grid, *COMMON, f"hydra.sweep.dir={sweep}")
    jobs = sorted((p for p in sweep.iterdir() if (p / ".hydra").is_dir()), key=lambda p: int(p.name))
    assert len(jobs) == 6 and all(json.loads((j / "job.json").read_text())["status"] == "completed" for j in jobs)
    tested = {frozenset(p for p, s in read_splits(j).items() if s == "test") for j in jobs}
    assert len(tested) == 1  # data.split_seed pinned: every point is measured on the same test images
    trained = {j.name: sorted(species(p) for p, s in read_splits(j).items() if s == "train") for j in jobs}
    rows = {r["shots"]: r for r in read_rows(sweep / "few_shot_curve.csv")}
    assert list(rows) == ["1", "2", "all"]
    for row in rows.values():
        assert row["runs"] == "2" and row["metric"] == "test/acc" and row["series"] == "defaults"
        low, mean, high = float(row["ci95_low"]), float(row["mean"]), float(row["ci95_high"])
        assert row["ci95_low"] and row["ci95_high"] and low <= mean <= high  # two seeds: wide (t = 12.7 at 1 degree of freedom)
    assert rows["1"]["train_images"] == "2" and rows["2"]["train_images"] == "4" and int(rows["all"]["train_images"]) > 200
    assert sorted(len(t) for t in trained.values()) == [2, 2, 4, 4, int(rows["all"]["train_images"]), int(rows["all"]["train_images"])]
    assert float(rows["1"]["mean"]) < float(rows["all"]["mean"])  # one photo per species is worse than all of them
    page = (sweep / "report.html").read_text()
    assert "Few-shot curve: test/acc against training images per class" in page and 'alt="few-shot curve"' in page
    assert "Few-shot curve" in (sweep / "summary.md").read_text()
    (sweep / "few_shot_curve.csv").unlink()  # transferlab-report rebuilds it, in this process
    from transferlab.cli.report import main

    assert main([str(sweep), "--no-html"]) == 0
    assert {r["shots"] for r in read_rows(sweep / "few_shot_curve.csv")} == {"1", "2", "all"}
