"""How sure a number is: bootstrap intervals, class-aware metrics, temperature scaling, cross-validation, class
balance, and the sweep report's paired verdicts. Pure statistics first (no data), then real runs on the shared photos."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from sklearn.metrics import balanced_accuracy_score, f1_score

from conftest import PETS, SPECIES_RUN, read_metrics, read_splits, run
from transferlab.core.errors import DataError
from transferlab.core.statistics import mean_std_interval, paired_bootstrap, point_metrics, unpaired_bootstrap
from transferlab.data.sampling import EpochBalancedSampler, balanced_loss_weights
from transferlab.models.evaluation import calibration_metrics, fit_temperature


# -- statistics, no data -----------------------------------------------------------------------------------------
def test_point_metrics_are_scikit_learns():
    rng = np.random.default_rng(1)
    labels = rng.integers(0, 5, 300)
    predicted = np.where(rng.random(300) < 0.7, labels, rng.integers(0, 5, 300))
    found = point_metrics(labels, predicted, 5)
    assert found["acc"] == pytest.approx(float(np.mean(labels == predicted)))
    assert found["balanced_acc"] == pytest.approx(balanced_accuracy_score(labels, predicted))
    assert found["macro_f1"] == pytest.approx(f1_score(labels, predicted, average="macro"))


def test_paired_bootstrap_separates_a_real_difference_from_noise():
    rng = np.random.default_rng(2)
    good = rng.random(200) < 0.9
    bad = rng.random(200) < 0.6
    assert paired_bootstrap(good, bad, seed=0).verdict() == "worse"
    assert paired_bootstrap(good, good, seed=0).p_value == 1.0
    assert unpaired_bootstrap(good, bad, seed=0).verdict() == "worse"
    nearly = good.copy()
    nearly[:2] = ~nearly[:2]  # two images out of 200 differ
    assert paired_bootstrap(good, nearly, seed=0).verdict() == "indistinguishable"
    mean, std, (low, high) = mean_std_interval([0.9, 0.92, 0.88, 0.95, 0.91])
    assert mean == pytest.approx(0.912) and std == pytest.approx(np.std([0.9, 0.92, 0.88, 0.95, 0.91], ddof=1)) and low < mean < high


def test_temperature_undoes_a_known_overconfidence():
    torch.manual_seed(0)
    labels = torch.randint(0, 3, (400,))
    logits = torch.randn(400, 3)
    logits[torch.arange(400), labels] += 2.0
    t_plain, t_sharp = fit_temperature(logits, labels), fit_temperature(logits * 5, labels)
    assert t_sharp / t_plain == pytest.approx(5, rel=0.05)
    assert calibration_metrics(logits * 5 / t_sharp, labels, 3)["ece"] < calibration_metrics(logits * 5, labels, 3)["ece"] / 2


def test_balanced_sampler_draws_every_class_equally_and_is_a_function_of_seed_and_epoch():
    labels = [0] * 20 + [1] * 180
    sampler = EpochBalancedSampler(labels, seed=3)
    sampler.set_epoch(4)
    drawn = [labels[i] for i in sampler]
    assert len(drawn) == 200 and 0.4 < drawn.count(0) / 200 < 0.6
    again = EpochBalancedSampler(labels, seed=3)
    again.set_epoch(4)
    first = list(again)
    sampler.set_epoch(4)
    assert list(sampler) == first
    sampler.set_epoch(5)
    assert list(sampler) != first
    assert balanced_loss_weights(labels, 2) == pytest.approx([200 / 40, 200 / 360])


# -- real runs on the shared photos ----------------------------------------------------------------------------
@pytest.mark.shared
def test_cross_validation_predicts_every_image_once_and_its_refit_can_be_tested(species_run, tmp_path):
    out = tmp_path / "cv"
    result = run("train", *SPECIES_RUN, "cv.folds=3", "cv.refit=true", f"hydra.run.dir={out}")
    summary = json.loads((out / "cv_summary.json").read_text())
    assert len(summary["folds"]) == 3 and {"mean", "std", "ci95"} <= set(summary)
    for key, mean in summary["mean"].items():
        assert mean == pytest.approx(np.mean([fold[key] for fold in summary["folds"]])), key
        low, high = summary["ci95"][key]
        assert low <= mean <= high
    assert summary["mean"]["test/acc"] >= 0.95
    with open(out / "oof_predictions.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    with open(species_run / "test_predictions.csv", newline="") as fh:
        assert list(rows[0]) == next(csv.reader(fh))  # the same columns as test_predictions.csv
    paths = [r["path"] for r in rows]
    assert len(paths) == len(set(paths)) == len(list(PETS.glob("*.jpg")))  # every image, once
    for k in range(3):
        fold = out / f"fold_{k}"
        assert {"metrics.json", "test_predictions.csv", "config.yaml", "reliability_diagram.png"} <= {p.name for p in fold.iterdir()}
        with open(fold / "test_predictions.csv", newline="") as fh:
            held_out = {r["path"] for r in csv.DictReader(fh)}
        assert held_out <= set(paths)
    metrics = read_metrics(out)
    assert result == pytest.approx(summary["mean"]["val/acc_best"])  # what a sweeper optimises: the CV mean
    assert metrics["test/acc"] == pytest.approx(sum(r["label"] == r["predicted"] for r in rows) / len(rows))
    assert len(metrics["test/acc_ci95"]) == 2 and metrics["cv/folds"] == 3

    assert summary["intervals"]["folds"].startswith("Nadeau-Bengio")  # the folds' training sets overlap

    checkpoint = torch.load(out / "checkpoints" / "best.ckpt", weights_only=True, map_location="cpu")
    assert float(checkpoint["state_dict"]["temperature"]) == pytest.approx(metrics["calibration/temperature"])
    assert metrics["calibration/rule"] in ("fitted", "capped_at_laplace_accuracy") and metrics["selection/protocol"] == "cv3_mean_of_validation_split"
    assert set(read_splits(out).values()) == {"train"}  # the refit trained on every image: nothing left to test it on here
    assert all((out / f"fold_{k}" / "splits.csv").is_file() for k in range(3))
    with pytest.raises(DataError, match="none of this checkpoint's 0 stored test file"):
        run("eval", f"ckpt_path={out / 'checkpoints' / 'best.ckpt'}", f"hydra.run.dir={tmp_path / 'eval'}")


@pytest.mark.shared
def test_an_overconfident_head_is_calibrated_and_predict_keeps_its_labels(tmp_path):
    """Breeds (37 classes, val errors to calibrate on): the head's logits x 5, then temperature scaling."""
    import lightning.pytorch as pl

    from transferlab.models.classifier import load_checkpoint
    from transferlab.training.builders import build_datamodule
    from transferlab.training.calibration import validate_and_calibrate

    trained = tmp_path / "breeds"
    breeds = [o for o in SPECIES_RUN if not o.startswith(("data.task=", "data.class_weights="))]
    run("train", *breeds, "data.task=breeds", "calibration=none", f"hydra.run.dir={trained}")
    plain = trained / "checkpoints" / "best.ckpt"
    checkpoint = torch.load(plain, weights_only=True, map_location="cpu")
    for key in ("head.1.weight", "head.1.bias"):
        checkpoint["state_dict"][key] = checkpoint["state_dict"][key] * 5
    sharp = tmp_path / "sharp.ckpt"
    torch.save(checkpoint, sharp)
    shutil.copy(sharp, tmp_path / "sharp_uncalibrated.ckpt")

    model, hparams = load_checkpoint(sharp)
    datamodule = build_datamodule(hparams["run"]["data"], model.backbone.preprocessing)
    trainer = pl.Trainer(logger=False, enable_progress_bar=False, enable_model_summary=False, accelerator="cpu")
    found = validate_and_calibrate(trainer, model, datamodule, str(sharp), "temperature")
    assert found["val/ece"] < found["val/ece_before_calibration"] and found["calibration/temperature"] > 1  # softened

    photos = tmp_path / "photos"
    photos.mkdir()
    for src in sorted(PETS.glob("*.jpg"))[::12]:  # 31 photos over all breeds
        shutil.copy(src, photos / src.name)
    predictions = {}
    for name in ("sharp_uncalibrated", "sharp"):
        output = tmp_path / f"{name}.csv"
        run("predict", f"ckpt_path={tmp_path / (name + '.ckpt')}", f"input={photos}", f"output={output}", f"hydra.run.dir={tmp_path / name}")
        with open(output, newline="") as fh:
            predictions[name] = {r["path"]: r for r in csv.DictReader(fh)}
    before, after = predictions["sharp_uncalibrated"], predictions["sharp"]
    assert all(before[p]["label"] == after[p]["label"] for p in before)  # a temperature never changes the winner
    assert np.mean([float(after[p]["score"]) for p in after]) < np.mean([float(before[p]["score"]) for p in before]) - 0.01


@pytest.mark.shared
def test_sweep_report_flags_a_broken_job_and_not_two_seeds(tmp_path):
    """Three real runs laid out as a sweep (job.json + overrides), then the report: lr=1e-6 is worse, seeds are not."""
    from transferlab.sweeps.records import write_job_record
    from transferlab.sweeps.summary import write_report

    sweep = tmp_path / "sweep"
    jobs = [["seed=1"], ["seed=2"], ["seed=1", "optimizer.lr=1e-6"]]
    for number, overrides in enumerate(jobs):
        job = sweep / str(number)
        common = [o for o in SPECIES_RUN if not o.startswith(("seed=", "optimizer.lr="))]
        run("train", *common, "optimizer.lr=3e-3", "data.split_seed=1", *overrides, f"hydra.run.dir={job}")
        (job / ".hydra").mkdir(exist_ok=True)
        (job / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump([*overrides, *([] if len(overrides) > 1 else ["optimizer.lr=3e-3"])]))
        write_job_record(job, {"status": "completed", "job": number, "overrides": overrides})
    write_report(sweep, html=True)
    rows = {r["job"]: r for r in csv.DictReader(open(sweep / "summary.csv"))}
    broken = rows["2"]
    assert broken["vs_best"].startswith("worse") and float(broken["p_vs_best"]) < 0.01, broken
    seeds = [r for name, r in rows.items() if name != "2"]
    assert {r["vs_best"].split(" ")[0] for r in seeds} == {"best", "indistinguishable"}, seeds
    assert json.loads(rows["0"]["test/acc_ci95"])[0] <= float(rows["0"]["test/acc"])
    markdown = (sweep / "summary.md").read_text()
    assert "Repeated seeds" in markdown and "± " in markdown and "(n=2)" in markdown
    assert "indistinguishable" in (sweep / "report.html").read_text()


def test_fold_assignment_is_stratified_and_seeded():
    from transferlab.data.folds import fold_splits

    pool = [(Path(f"{i}.jpg"), int(i % 3 == 0)) for i in range(60)]
    splits = fold_splits(pool, ["a", "b"], 4, seed=5, val_fraction=0.15)
    held_out = [s for fold in splits for s in fold["test"]]
    assert sorted(held_out) == sorted(pool)  # every image out-of-fold once
    for fold in splits:
        assert not {p for p, _ in fold["test"]} & {p for p, _ in fold["train"] + fold["val"]}
        assert sum(label for _, label in fold["test"]) == 5  # 20 of class b over 4 folds
    assert fold_splits(pool, ["a", "b"], 4, seed=5, val_fraction=0.15) == splits
    from transferlab.core.errors import ConfigError

    with pytest.raises(ConfigError, match="cv.folds"):
        fold_splits(pool, ["a", "b"], 30, seed=5, val_fraction=0.15)


@pytest.mark.shared
def test_a_checkpoint_from_before_calibration_and_class_weights_still_evaluates(species_run, tmp_path):
    checkpoint = torch.load(species_run / "checkpoints" / "best.ckpt", weights_only=True, map_location="cpu")
    del checkpoint["state_dict"]["temperature"]
    for key in ("class_weights", "sampler"):
        del checkpoint["hyper_parameters"]["run"]["data"][key]
    del checkpoint["hyper_parameters"]["loss_weights"]
    old = tmp_path / "old.ckpt"
    torch.save(checkpoint, old)
    run("eval", f"ckpt_path={old}", f"hydra.run.dir={tmp_path / 'eval'}")
    metrics = read_metrics(tmp_path / "eval")
    assert metrics["test/acc"] == read_metrics(species_run)["test/acc"] and "test/ece_before_calibration" not in metrics
    del checkpoint["transferlab_splits"]  # from before stored splits: the test split is rebuilt by the rule of then
    torch.save(checkpoint, old)
    run("eval", f"ckpt_path={old}", f"hydra.run.dir={tmp_path / 'legacy'}")
    from transferlab.data.splits import legacy_splits

    pool = sorted((p, "dog" if p.name[0].islower() else "cat") for p in PETS.glob("*.jpg"))
    pool = [(p, ["cat", "dog"].index(y)) for p, y in pool]
    with open(tmp_path / "legacy" / "test_predictions.csv", newline="") as fh:
        tested = {row["path"] for row in csv.DictReader(fh)}
    assert tested == {str(p) for p, _ in legacy_splits(pool, 0.15, 0.2, 1)["test"]}
    assert "predates stored splits" in (tmp_path / "legacy" / "eval.log").read_text()


@pytest.mark.shared
def test_folds_share_one_feature_cache_even_in_memory(tiny_folder, tmp_path):
    from conftest import FAST

    run(
        "train",
        "data=image_folder",
        f"data.root={tiny_folder}",
        "cv.folds=2",
        "trainer.max_epochs=1",
        "performance.feature_cache.storage=memory",
        f"hydra.run.dir={tmp_path}",
        *FAST,
    )
    first, second = (json.loads((tmp_path / f"fold_{k}" / "feature_cache.json").read_text()) for k in (0, 1))
    assert "val" not in first  # the L-BFGS probe chooses C by inner folds: a fold's val images train too
    assert sum(first[s]["computed"] for s in ("train", "test")) == 16  # every image once, in fold 0
    assert sum(second[s]["computed"] for s in ("train", "test")) == 0 and second["test"]["reused"] == 8


@pytest.mark.shared
def test_cross_validation_with_ddp_predicts_every_image_once(tiny_folder, tmp_path):
    """Two gloo processes through every fold and the refit: one set of fold folders, every image once out-of-fold.
    In process: this process is rank 0 and rank 1 is the command line's relaunch (cli.app's Command.run)."""
    from conftest import FAST, run

    out = tmp_path / "ddp"
    run(
        "train",
        "data=image_folder",
        f"data.root={tiny_folder}",
        "trainer=ddp_cpu",
        "cv.folds=2",
        "cv.refit=true",
        "trainer.max_epochs=1",
        f"hydra.run.dir={out}",
        *FAST,
    )
    summary = json.loads((out / "cv_summary.json").read_text())
    assert len(summary["folds"]) == 2 and summary["images"] == 16
    with open(out / "oof_predictions.csv", newline="") as fh:
        paths = [r["path"] for r in csv.DictReader(fh)]
    assert len(paths) == len(set(paths)) == 16
    assert sorted(p.name for p in out.iterdir() if p.name.startswith("fold_")) == ["fold_0", "fold_1"]
    checkpoint = torch.load(out / "checkpoints" / "best.ckpt", weights_only=True, map_location="cpu")
    assert float(checkpoint["state_dict"]["temperature"]) == pytest.approx(read_metrics(out)["calibration/temperature"])
