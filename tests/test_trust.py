"""Numbers that cannot lie at the edges: intervals with their coverage simulated, a jackknife of bounded memory,
calibration that does not sharpen on no evidence, test-time views and the temperature composed once, Optuna's
range as written, and a folder that changes between training and evaluation (its stored split)."""

from __future__ import annotations

import csv
import shutil
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import FAST, make_small_copy, pet_photos, read_metrics, read_splits, run
from transferlab.core.errors import DataError, exit_code
from transferlab.core.statistics import (
    class_metrics,
    confusion_matrix,
    fold_test_to_train,
    leave_one_out,
    mean_std_interval,
    metric_intervals,
)
from transferlab.models.evaluation import choose_temperature, mean_confidence


# -- intervals ------------------------------------------------------------------------------------------------
def test_22_of_22_right_gets_an_interval_that_admits_mistakes():
    labels = [0] * 7 + [1] * 15  # 7 cats, 15 dogs, all right
    found = metric_intervals(labels, labels, 2)
    assert found["acc"][1] == 1.0 and found["acc"][0] == pytest.approx(0.025 ** (1 / 22), abs=1e-9)  # Clopper-Pearson: 0.846
    assert found["acc"][0] <= 0.90
    for name in ("balanced_acc", "macro_f1"):  # Kish's size of the class mean, 19.1 images: a little wider than acc
        low, high = found[name]
        assert high == 1.0 and 0.80 < low < found["acc"][0], (name, found[name])


def population_metrics(weights: np.ndarray, recall: float) -> dict[str, float]:
    """acc, balanced_acc and macro_f1 of an infinite test set: class shares `weights`, every class right with
    probability `recall`, its errors spread evenly over the other classes."""
    k = len(weights)
    rates = np.full((k, k), (1 - recall) / (k - 1))
    np.fill_diagonal(rates, recall)
    cells = rates * weights[:, None]
    found = class_metrics(np.diagonal(cells), cells.sum(1), cells.sum(0))
    return {name: float(value) for name, value in found.items()}


def simulated_coverage(sizes: np.ndarray, recall: float, trials: int, rng: np.random.Generator) -> dict[str, float]:
    k = len(sizes)
    truth = population_metrics(sizes / sizes.sum(), recall)
    covered = dict.fromkeys(truth, 0)
    for _ in range(trials):
        labels, predicted = [], []
        for c, size in enumerate(sizes):
            right = rng.random(size) < recall
            wrong = (c + rng.integers(1, k, size)) % k  # any other class, evenly
            labels += [c] * int(size)
            predicted += np.where(right, c, wrong).tolist()
        for name, (low, high) in metric_intervals(labels, predicted, k).items():
            covered[name] += low - 1e-12 <= truth[name] <= high + 1e-12
    return {name: hits / trials for name, hits in covered.items()}


def exact_accuracy_coverage(n: int, p: float) -> float:
    """P(the accuracy interval of x right of n covers p), summed over every x: no simulation noise."""
    from scipy import stats

    covered = 0.0
    for x in range(n + 1):
        low, high = metric_intervals([0] * n, [0] * x + [1] * (n - x), 2)["acc"]
        covered += float(stats.binom.pmf(x, n, p)) * (low - 1e-12 <= p <= high + 1e-12)
    return covered


@pytest.mark.parametrize("classes", [2, 37])
def test_intervals_cover_the_truth_at_least_93_percent_of_the_time(classes):
    """Two classes 1:2 (the sample's cats and dogs) and 37 equal ones; n test images, true recall p in every class.
    Accuracy's coverage is computed exactly; balanced accuracy's and macro-F1's are simulated."""
    rng = np.random.default_rng(classes)
    worst = {}
    for n in (10, 22, 74, 400):
        if n < 2 * classes:
            continue
        sizes = np.array([n // 3, n - n // 3]) if classes == 2 else np.full(classes, n // classes)
        for p in (0.5, 0.9, 0.99, 1.0):
            worst[(n, p, "acc")] = exact_accuracy_coverage(n, p)
            for name, coverage in simulated_coverage(sizes, p, 400 if classes == 2 else 200, rng).items():
                if name != "acc":
                    worst[(n, p, name)] = coverage
    assert min(value for (_, _, name), value in worst.items() if name == "acc") >= 0.95  # Clopper-Pearson: exact
    assert min(worst.values()) >= 0.93, sorted(worst.items(), key=lambda item: item[1])[:5]


def test_the_jackknife_is_exact_and_small_for_a_cub_sized_test_set():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 6, 40)
    predicted = np.where(rng.random(40) < 0.7, labels, rng.integers(0, 6, 40))
    values, counts = leave_one_out(confusion_matrix(labels, predicted, 6))
    brute = {}  # leave out each image in turn
    for i in range(40):
        keep = np.arange(40) != i
        found = class_metrics(*_counts(confusion_matrix(labels[keep], predicted[keep], 6)))
        brute.setdefault((labels[i], predicted[i]), {k: float(v) for k, v in found.items()})
    cells = sorted(brute)
    assert counts.sum() == 40 and len(counts) == len(cells)
    for name in ("acc", "balanced_acc", "macro_f1"):
        assert values[name] == pytest.approx([brute[c][name] for c in cells])

    n, k = 5794, 200  # CUB-200's test set
    labels = rng.integers(0, k, n)
    predicted = np.where(rng.random(n) < 0.6, labels, rng.integers(0, k, n))  # ~2,300 distinct error cells
    tracemalloc.start()
    try:
        found = metric_intervals(labels, predicted, k)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 200e6, f"{peak / 1e6:.0f} MB"
    assert all(0.55 < low < high < 0.68 for low, high in found.values()), found


def _counts(confusion: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    return np.diagonal(confusion), confusion.sum(1), confusion.sum(0)


def test_fold_intervals_account_for_overlapping_training_sets():
    folds = [0.91, 0.88, 0.93, 0.90, 0.86]
    mean, std, (low, high) = mean_std_interval(folds, fold_test_to_train(5))
    _, _, (plain_low, plain_high) = mean_std_interval(folds)
    assert mean == pytest.approx(np.mean(folds)) and std == pytest.approx(np.std(folds, ddof=1))
    assert (high - low) / (plain_high - plain_low) == pytest.approx(np.sqrt((1 / 5 + 1 / 4) / (1 / 5)))  # Nadeau-Bengio: 1.5x


# -- calibration at the edges ---------------------------------------------------------------------------------
def test_a_perfect_held_out_set_cannot_buy_more_confidence_than_laplace_allows():
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(80, 3, generator=generator) * 30  # a confident network
    labels = logits.argmax(dim=-1)  # and every held-out image right
    kept = choose_temperature(logits, labels, "temperature")
    assert kept.fitted_temperature is not None and kept.fitted_temperature < 0.6  # the NLL alone wants ever more certainty
    assert kept.rule == "capped_at_laplace_accuracy" and kept.held_out_errors == 0 and kept.calibrated
    assert kept.fitted_temperature < kept.temperature <= 1.0  # sharpened only up to the cap
    assert mean_confidence(logits, kept.temperature) == pytest.approx(81 / 82, abs=1e-6)  # (right + 1) / (images + 2)
    assert kept.metrics()["calibration/held_out_errors"] == 0 and kept.metrics()["calibration/rule"] == "capped_at_laplace_accuracy"
    already = choose_temperature(logits * 10, labels, "temperature")  # more confident than the cap at T = 1: kept at 1
    assert already.temperature == 1.0 and already.rule == "capped_at_laplace_accuracy"

    noisy = labels.clone()
    noisy[:20] = (noisy[:20] + 1) % 3  # 20 errors: an underconfident network may sharpen to its fit
    fitted = choose_temperature(logits / 100, noisy, "temperature")
    assert fitted.rule == "fitted" and fitted.temperature < 1.0 and fitted.temperature == fitted.fitted_temperature
    confident = choose_temperature(logits, _few_errors(labels, 3), "temperature")
    assert confident.rule == "fitted" and confident.temperature > 1.0  # softening is never limited
    none = choose_temperature(logits, labels, "none")
    assert none.temperature == 1.0 and none.rule == "none" and not none.calibrated
    empty = choose_temperature(logits[:0], labels[:0], "temperature")
    assert empty.rule == "no_held_out_images" and not empty.calibrated


def _few_errors(labels: torch.Tensor, count: int) -> torch.Tensor:
    changed = labels.clone()
    changed[:count] = (changed[:count] + 1) % 3
    return changed


# -- test-time views and the temperature ----------------------------------------------------------------------
@pytest.mark.shared
def test_tta_probabilities_are_softmax_of_raw_logits_over_t_averaged_over_views(species_run):
    from transferlab.deploy.runtime import load_runtime
    from transferlab.models.classifier import load_checkpoint
    from transferlab.models.tta import views

    ckpt = species_run / "checkpoints" / "best.ckpt"
    model, _ = load_checkpoint(ckpt)
    model.temperature.fill_(2.5)
    images = torch.randn(3, 3, 224, 224, generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        raw = [model(view) for view in views(images, "hflip")]
        expected = torch.stack([(r / 2.5).softmax(-1) for r in raw]).mean(0)
        uncalibrated = torch.stack([r.softmax(-1) for r in raw]).mean(0)
        evaluated = model.evaluate(images, "hflip")
    assert evaluated[:, 0].softmax(-1) == pytest.approx(expected, abs=1e-6)
    assert evaluated[:, 1].softmax(-1) == pytest.approx(uncalibrated, abs=1e-6)  # "before calibration": no T multiplied back
    assert evaluated[:, 2] == pytest.approx(raw[0], abs=1e-5)  # what a temperature is fitted on
    predictor = load_runtime(str(ckpt), runtime="torch", device="auto", precision="32-true", channels_last=False, tta="hflip", threads=None)
    predictor.model.temperature.fill_(2.5)
    assert predictor.probabilities(images) == pytest.approx(expected, abs=1e-5)  # predict and serve: the same composition


# -- Optuna ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("line", ["x=range(1,10,4)", "x=range(1,9,4)", "x=range(0,3)", "x=range(2,12,5)"])
def test_optuna_range_is_exactly_pythons(line):
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from optuna.distributions import IntDistribution

    from transferlab.sweeps.optuna_trials import distribution

    override = OverridesParser.create().parse_overrides([line])[0]
    found = distribution(override)
    assert isinstance(found, IntDistribution)
    start, stop, *step = (int(v) for v in line[len("x=range(") : -1].split(","))
    assert list(range(found.low, found.high + 1, found.step)) == list(range(start, stop, *step))


# -- a folder that changes after training ---------------------------------------------------------------------
FOLDER = ["data=image_folder", "data.test_fraction=0.25", *FAST]


@pytest.fixture(scope="module")
def changing_folder(tmp_path_factory) -> dict:
    """36 cats and 36 dogs (64 px), a run on them, then 30 cats added and 10 dogs deleted (3 of them stored test files)."""
    base = tmp_path_factory.mktemp("changing")
    root = base / "images"
    cats, dogs = pet_photos(True, 66), pet_photos(False, 36)
    for label, photos in (("cat", cats[:36]), ("dog", dogs)):
        for src in photos:
            make_small_copy(src, root / label / src.name, 64)
    first = base / "first"
    run("train", "data=image_folder", f"data.root={root}", f"hydra.run.dir={first}", *FOLDER)
    stored = read_splits(first)
    for src in cats[36:]:
        make_small_copy(src, root / "cat" / src.name, 64)
    dog_tests = sorted(p for p, s in stored.items() if s == "test" and p.startswith("dog/"))
    dog_trains = sorted(p for p, s in stored.items() if s == "train" and p.startswith("dog/"))
    assert len(dog_tests) >= 4, stored
    deleted = dog_tests[:3] + dog_trains[:7]
    for name in deleted:
        (root / name).unlink()
    return {"root": root, "first": first, "stored": stored, "deleted": deleted, "added": [f"cat/{p.name}" for p in cats[36:]], "base": base}


@pytest.mark.shared
def test_the_split_is_stored_in_the_run_and_its_checkpoint(changing_folder):
    from transferlab.core.files import sha256_of

    first = changing_folder["first"]
    with open(first / "splits.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == 72 and {r["split"] for r in rows} == {"train", "test"}  # the probe's inner CV trains on val too
    checkpoint = torch.load(first / "checkpoints" / "best.ckpt", weights_only=True, map_location="cpu")
    table = checkpoint["transferlab_splits"]
    assert [[r["path"], r["split"], int(r["size"]), r["sha256"]] for r in rows] == table["rows"]
    kept = [r for r in rows if r["path"] not in changing_folder["deleted"]]
    assert all(sha256_of(changing_folder["root"] / r["path"]) == r["sha256"] for r in kept)
    with open(first / "test_predictions.csv", newline="") as fh:
        tested = {Path(r["path"]).relative_to(changing_folder["root"]).as_posix() for r in csv.DictReader(fh)}
    assert tested == {r["path"] for r in rows if r["split"] == "test"}
    from transferlab.data.stored_splits import assignment
    from transferlab.models.package import load_split_table

    # what transferlab-audit splits=... reads: the run folder, its splits.csv or its checkpoint, the same assignment
    sources = (first, first / "splits.csv", first / "checkpoints" / "last.ckpt")
    assert all(assignment(load_split_table(source)) == {r["path"]: r["split"] for r in rows} for source in sources)
    with pytest.raises(DataError, match="holds no stored split"):
        load_split_table(first / "config.yaml")


@pytest.mark.shared
def test_eval_tests_exactly_the_stored_test_files_that_survive(changing_folder):
    root, first, stored = changing_folder["root"], changing_folder["first"], changing_folder["stored"]
    out = changing_folder["base"] / "eval"
    run("eval", f"ckpt_path={first / 'checkpoints' / 'best.ckpt'}", f"hydra.run.dir={out}")
    with open(out / "test_predictions.csv", newline="") as fh:
        tested = {Path(r["path"]).relative_to(root).as_posix() for r in csv.DictReader(fh)}
    surviving = {p for p, s in stored.items() if s == "test" and p not in changing_folder["deleted"]}
    assert tested == surviving  # none of the 30 added cats, whatever their hash; every surviving test file
    log = (out / "eval.log").read_text()
    assert "3 stored test file(s) are gone or unusable" in log and "30 image(s) added since training are not tested" in log


@pytest.mark.shared
def test_a_stored_test_file_with_other_bytes_stops_eval_with_exit_2(changing_folder):
    root, stored = changing_folder["root"], changing_folder["stored"]
    victim = root / next(p for p, s in sorted(stored.items()) if s == "test" and p not in changing_folder["deleted"])
    original = victim.read_bytes()
    try:
        shutil.copy(root / next(p for p, s in sorted(stored.items()) if s == "train" and p.startswith("cat/")), victim)
        with pytest.raises(DataError) as caught:
            run("eval", f"ckpt_path={changing_folder['first'] / 'checkpoints' / 'best.ckpt'}", f"hydra.run.dir={changing_folder['base'] / 'bad'}")
        assert exit_code(caught.value) == 2 and str(victim) in str(caught.value) and "\n" not in str(caught.value)
    finally:
        victim.write_bytes(original)


@pytest.mark.shared
def test_retraining_keeps_every_file_in_its_split_with_or_without_exclusions(changing_folder):
    root, base, stored = changing_folder["root"], changing_folder["base"], changing_folder["stored"]
    again = base / "again"
    run("train", f"data.root={root}", f"hydra.run.dir={again}", *FOLDER)
    after = read_splits(again)
    assert all(after[p] == s for p, s in stored.items() if p in after)  # 30 files added, 10 deleted: nothing else moved
    excluded = sorted(after)[::11][:5]
    listing = base / "exclude.txt"
    listing.write_text("# flagged\n" + "".join(f"{p}\n" for p in excluded))
    cleaned = base / "cleaned"
    run("train", f"data.root={root}", f"data.exclude={listing}", f"hydra.run.dir={cleaned}", *FOLDER)
    assert read_splits(cleaned) == {p: s for p, s in after.items() if p not in excluded}


@pytest.mark.shared
def test_eval_on_other_data_leaves_out_copies_of_training_files(changing_folder):
    root, base, stored = changing_folder["root"], changing_folder["base"], changing_folder["stored"]
    other = base / "other"
    trained = [p for p, s in sorted(stored.items()) if s == "train" and p not in changing_folder["deleted"]]
    trained = [p for p in trained if p.startswith("cat/")][:6] + [p for p in trained if p.startswith("dog/")][:6]
    for i, name in enumerate(trained):  # the same bytes under new names
        (other / name.split("/")[0]).mkdir(parents=True, exist_ok=True)
        shutil.copy(root / name, other / name.split("/")[0] / f"copy_{i}.jpg")
    for name in changing_folder["added"][:10]:
        shutil.copy(root / name, other / name)
    out = base / "eval_other"
    run("eval", f"ckpt_path={changing_folder['first'] / 'checkpoints' / 'best.ckpt'}", f"data.root={other}", f"hydra.run.dir={out}")
    with open(out / "test_predictions.csv", newline="") as fh:
        tested = {Path(r["path"]).relative_to(other).as_posix() for r in csv.DictReader(fh)}
    assert tested == set(changing_folder["added"][:10])  # every image there but the 12 copies of training images
    assert f"12 image(s) under {other} have the same bytes" in (out / "eval.log").read_text()


@pytest.mark.shared
def test_select_c_val_without_validation_images_exits_2(tiny_folder, tmp_path):
    with pytest.raises(Exception) as caught:
        run(
            "train",
            "data=image_folder",
            f"data.root={tiny_folder}",
            "finetune.select_c=val",
            "data.val_fraction=0",
            f"hydra.run.dir={tmp_path}",
            *FAST,
        )
    assert exit_code(caught.value) == 2 and "finetune.select_c=val" in str(caught.value) and "select_c=cv" in str(caught.value)


@pytest.mark.shared
def test_calibration_none_is_not_called_calibrated_and_the_default_is(changing_folder, tmp_path):
    import json

    root = changing_folder["root"]
    plain = tmp_path / "plain"
    run("train", f"data.root={root}", "calibration=none", f"hydra.run.dir={plain}", *FOLDER)
    metrics = read_metrics(plain)
    assert metrics["calibration/rule"] == "none" and metrics["calibration/temperature"] == 1.0
    for run_dir, expected in ((plain, False), (changing_folder["first"], True)):
        package = tmp_path / f"package_{run_dir.name}"
        run(
            "export",
            f"ckpt_path={run_dir / 'checkpoints' / 'best.ckpt'}",
            "format=torchscript",
            f"output={package}",
            f"hydra.run.dir={tmp_path / 'x'}",
        )
        config = json.loads((package / "config.json").read_text())
        assert config["logits_are_calibrated"] is expected, config["calibration"]
        assert (package / "splits.csv").read_text() == (run_dir / "splits.csv").read_text()
    default = read_metrics(changing_folder["first"])
    assert default["calibration/rule"] in ("fitted", "capped_at_laplace_accuracy") and default["selection/protocol"] == "probe_inner_cv"
    assert default["calibration/held_out_images"] == sum(s != "test" for s in changing_folder["stored"].values())  # the inner folds
