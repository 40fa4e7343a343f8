"""Heads for little data (issue 33): finetune.head_solver=knn (weighted cosine k-NN, k by leave-one-out) and
=prototype (nearest normalised class mean as a fixed linear head), and the probe's few-image rule.

The arithmetic first, on synthetic features (exact on separable data; leave-one-out never lets an image or one of
its views vote for itself; the closed forms against brute force), then real runs: the shared species task under
5-fold cross-validation against the L-BFGS probe on the same folds, a knn and a prototype model through export,
predict (torch and onnx) and serve against eval, and data.shots=2 / 1 runs that state the probe's fallback."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from conftest import FAST, PETS_ARGS, read_metrics, run
from transferlab.models.few_shot_heads import (
    KNN_FIXED_K,
    KNNHead,
    L2Normalize,
    knn_leave_one_out,
    prototype_leave_one_out,
    prototype_weights,
    vote_logits,
)
from transferlab.models.linear_probe import FIXED_C, choose_c


def clusters(classes: int, per_class: int, dim: int = 32, spread: float = 0.05, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Tight clusters around random directions (cosine-separable), each class `per_class` rows."""
    generator = torch.Generator().manual_seed(seed)
    centres = torch.randn(classes, dim, generator=generator)
    labels = torch.arange(classes).repeat_interleave(per_class)
    return centres[labels] + spread * torch.randn(len(labels), dim, generator=generator), labels


def knn_head(features: torch.Tensor, labels: torch.Tensor, classes: int, k: int, multilabel: bool = False) -> KNNHead:
    head = KNNHead(features.shape[1], classes, multilabel)
    head.fill(features, labels.float() if multilabel else F.one_hot(labels, classes).float(), k)
    return head


def prototype_head(features: torch.Tensor, labels: torch.Tensor, classes: int) -> torch.nn.Sequential:
    head = torch.nn.Sequential(L2Normalize(), torch.nn.Linear(features.shape[1], classes))
    with torch.no_grad():
        head[1].weight.copy_(prototype_weights(features, labels, classes))
        head[1].bias.zero_()
    return head


# -- the arithmetic ---------------------------------------------------------------------------------------------
def test_knn_and_prototype_are_exact_on_separable_features():
    x, y = clusters(5, 12)
    test_x, test_y = clusters(5, 6, seed=0)  # the same centres (same seed), new noise
    test_x = test_x + 0.05 * torch.randn(test_x.shape, generator=torch.Generator().manual_seed(1))
    chosen = knn_leave_one_out(x, y)
    assert chosen.score == 1.0 and chosen.held_out.shape == (60, 5) and bool((chosen.held_out.argmax(1) == y).all())
    assert [row["k"] for row in chosen.search] == [1, 3, 5, 7, 9, 15, 21] and all(row["loo_acc"] == 1.0 for row in chosen.search)
    assert chosen.k == 21  # every k is exact; ties go to the lower NLL (more votes: surer shares)
    with torch.no_grad():
        assert bool((knn_head(x, y, 5, chosen.k)(test_x).argmax(1) == test_y).all())
        assert bool((prototype_head(x, y, 5)(test_x).argmax(1) == test_y).all())
    assert bool((prototype_leave_one_out(x, y, 5).argmax(1) == y).all())


def test_leave_one_out_never_lets_an_image_or_its_views_vote_for_itself():
    """Random labels on random features: an image that found itself (or a cached view of itself) would be right
    every time; left out honestly, 1-NN is at chance (1/3)."""
    generator = torch.Generator().manual_seed(3)
    x, y = torch.randn(150, 64, generator=generator), torch.randint(0, 3, (150,), generator=generator)
    assert knn_leave_one_out(x, y, ks=[1]).score < 0.45
    with torch.no_grad():
        assert float((knn_head(x, y, 3, 1)(x).argmax(1) == y).float().mean()) == 1.0  # what a leak would give
    views = x.repeat_interleave(2, dim=0) + 1e-3 * torch.randn(300, 64, generator=generator)  # two views per image
    groups, labels = torch.arange(150).repeat_interleave(2), y.repeat_interleave(2)
    grouped = knn_leave_one_out(views, labels, ks=[1], groups=groups)
    assert grouped.held_out.shape == (150, 3) and grouped.score < 0.45  # one row per image, its twin view excluded
    assert knn_leave_one_out(views, labels, ks=[1]).score > 0.95  # without groups the twin votes: the leak the groups stop


@pytest.mark.parametrize("multilabel", [False, True])
def test_leave_one_out_logits_equal_a_refit_without_the_image(multilabel):
    """knn_leave_one_out and the prototype's closed form against the heads rebuilt on every other image (and view)."""
    generator = torch.Generator().manual_seed(5)
    images, classes = 24, 4
    x = torch.randn(images * 2, 16, generator=generator)
    groups = torch.arange(images).repeat_interleave(2)
    per_image = (torch.rand(images, classes, generator=generator) < 0.4).float() if multilabel else torch.arange(images) % classes
    y = per_image[groups]
    knn = knn_leave_one_out(x, y, ks=[1, 3, 5], groups=groups)
    held_prototype = prototype_leave_one_out(x, y, classes, groups)
    for image in range(images):
        keep, rows = groups != image, groups == image
        with torch.no_grad():
            expected = knn_head(x[keep], y[keep], classes, knn.k, multilabel)(x[rows]).mean(0)
            assert torch.allclose(knn.held_out[image], expected, atol=1e-4), image
            expected = prototype_head(x[keep], y[keep], classes)(x[rows]).mean(0)
            assert torch.allclose(held_prototype[image], expected, atol=1e-3), image
    if multilabel:
        assert set(knn.search[0]) == {"k", "loo_map", "loo_nll"} and 0 <= knn.score <= 1


def test_vote_logits_are_smoothed_shares_that_softmax_gives_back():
    share = torch.tensor([[1.0, 0.0, 0.0], [0.5, 0.5, 0.0]])
    probs = vote_logits(share, 5, multilabel=False).softmax(-1)
    third = 1 / 3  # one pseudo-vote spread over the three classes
    assert torch.allclose(probs[0], torch.tensor([5 + third, third, third]) / 6) and torch.allclose(probs.sum(-1), torch.ones(2))
    assert torch.allclose(vote_logits(share, 5, multilabel=True).sigmoid()[0], torch.tensor([5.5, 0.5, 0.5]) / 6)  # per label: 0.5 + 0.5


def test_an_empty_knn_head_takes_the_shapes_of_the_state_it_loads():
    x, y = clusters(3, 4)
    trained = knn_head(x, y, 3, 3)
    rebuilt = KNNHead(32, 3, multilabel=False)
    rebuilt.load_state_dict(trained.state_dict())
    assert rebuilt.bank.shape == (12, 32) and rebuilt.neighbours == 3
    with torch.no_grad():
        assert torch.equal(rebuilt(x), trained(x))


def test_the_probes_few_image_rule_is_stated():
    x, y = clusters(3, 2)  # two images per class, fewer than the 5 folds
    fit = choose_c((x, y), 3, standardize=False, folds=5, seed=0)
    assert fit.selection == "cv2" and fit.held_out is not None and "smallest class has 2 training images" in fit.reason
    assert choose_c(clusters(3, 6), 3, standardize=False, folds=5, seed=0).reason == ""  # enough: no fallback
    single = choose_c(clusters(3, 1), 3, standardize=False, folds=5, seed=0)
    assert single.selection == "fixed" and single.c == FIXED_C and single.held_out is None and "single training image" in single.reason


# -- real runs --------------------------------------------------------------------------------------------------
SPECIES = ["data=oxford_pets", "data.task=species", "data.num_workers=0", "interpret.enabled=false", *PETS_ARGS]


def correct_by_path(run_dir: Path) -> dict[str, bool]:
    with open(run_dir / "oof_predictions.csv", newline="") as fh:
        return {row["path"]: row["label"] == row["predicted"] for row in csv.DictReader(fh)}


@pytest.mark.shared
def test_on_species_knn_and_prototype_are_no_worse_than_the_probe_on_the_same_folds(tmp_path):
    """5-fold cross-validation of the three heads with their default selection (the probe's C by inner 5-fold CV,
    knn's k and both temperatures by leave-one-out, over each fold's training + validation images) on the same folds,
    then a paired bootstrap of per-image out-of-fold correctness: new head - probe."""
    from transferlab.core.statistics import paired_bootstrap

    correct = {}
    for solver in ("lbfgs", "knn", "prototype"):
        out = tmp_path / solver
        run("train", *SPECIES, f"finetune.head_solver={solver}", "cv.folds=5", "seed=1", f"hydra.run.dir={out}")
        correct[solver] = correct_by_path(out)
        metrics, fold = read_metrics(out), read_metrics(out / "fold_0")
        print(f"{solver}: out-of-fold acc {metrics['test/acc']:.4f} {metrics['test/acc_ci95']}, fold mean val/acc {metrics['val/acc']:.4f}")
        assert metrics["selection/protocol"] == "cv5_mean_of_probe_inner_cv"  # the three rank together in a sweep
        assert fold.get("probe/c_selection", fold.get("head/selection")) == ("cv5" if solver == "lbfgs" else "leave_one_out")
    assert len(correct["lbfgs"]) == 370 and correct["knn"].keys() == correct["lbfgs"].keys() == correct["prototype"].keys()
    paths = sorted(correct["lbfgs"])
    probe = [correct["lbfgs"][p] for p in paths]
    assert np.mean(probe) >= 0.97  # the probe on cats vs dogs: 0.99-1.0 measured
    for solver in ("knn", "prototype"):
        comparison = paired_bootstrap(probe, [correct[solver][p] for p in paths], seed=0)
        print(f"{solver} - probe: {comparison.difference:+.4f} {comparison.ci95} (p = {comparison.p_value:.3f})")
        # Measured (bf16 Lite0 features, 2 CPU cores): the probe 370 of 370, knn 370 (+0.000 [0, 0]), the prototype 367
        # (-0.008 [-0.019, 0.000], p = 0.11): at the edge, a 4th error of the prototype alone would exclude 0.
        assert comparison.ci95[1] >= 0.0, (solver, comparison)  # the interval includes 0 or favours the new head
        assert np.mean([correct[solver][p] for p in paths]) >= 0.97


def labels_of(csv_file: Path, column: str) -> dict[str, str]:
    with open(csv_file, newline="") as fh:
        return {Path(row["path"]).name: row[column] for row in csv.DictReader(fh)}


@pytest.mark.shared
@pytest.mark.parametrize("solver", ["knn", "prototype"])
def test_a_knn_or_prototype_model_exports_predicts_and_serves_the_labels_eval_gives(tiny_folder, tmp_path, solver):
    """A float32 run (features, ONNX and predict agree to 1e-5: no near-tie can flip between runtimes), exported as a
    package; predict with torch and onnxruntime and an in-process server answer each test image with eval's label."""
    pytest.importorskip("onnxruntime")
    from fastapi.testclient import TestClient

    from transferlab.deploy.admission import Budgets
    from transferlab.deploy.runtime import load_runtime
    from transferlab.deploy.server import ServeSettings, create_app

    train = tmp_path / "train"
    common = ["data=image_folder", f"data.root={tiny_folder}", "trainer.precision=32-true", "interpret.enabled=false", *FAST]
    run("train", *common, f"finetune.head_solver={solver}", "data.val_fraction=0.25", "data.test_fraction=0.3", f"hydra.run.dir={train}")
    assert read_metrics(train)["head/selection"] == "leave_one_out"
    ckpt, package = train / "checkpoints" / "best.ckpt", tmp_path / "package"
    config = run("export", f"ckpt_path={ckpt}", f"output={package}", "format=onnx", f"hydra.run.dir={tmp_path / 'export'}")
    assert config["formats"]["onnx"]["max_abs_diff"] <= 1e-4 and config["hyper_parameters"]["finetune"]["head_solver"] == solver
    run("eval", f"ckpt_path={package}", "interpret.enabled=false", f"hydra.run.dir={tmp_path / 'eval'}")
    expected = labels_of(tmp_path / "eval" / "test_predictions.csv", "predicted")
    assert expected == labels_of(train / "test_predictions.csv", "predicted") and len(expected) >= 3  # eval of the package = the run's test
    photos = tmp_path / "photos"
    photos.mkdir()
    for path in tiny_folder.rglob("*.jpg"):
        if path.name in expected:
            (photos / path.name).write_bytes(path.read_bytes())
    for runtime in ("torch", "onnx"):
        out = tmp_path / f"{runtime}.csv"
        run(
            "predict",
            f"ckpt_path={package}",
            f"input={photos}",
            f"output={out}",
            f"runtime={runtime}",
            "precision=32-true",
            f"hydra.run.dir={tmp_path / runtime}",
        )
        assert labels_of(out, "label") == expected, runtime
    settings = ServeSettings(5, 16, 5.0, 16, 20 * 2**20, 120.0, Budgets(25_000_000, 100_000_000, 2, 64), (), (), None)
    predictor = load_runtime(str(package), "torch", "cpu", "32-true", "auto", "none", None)
    with TestClient(create_app(predictor, settings)) as client:
        files = [("file", (name, (photos / name).read_bytes(), "image/jpeg")) for name in sorted(expected)]
        answer = client.post("/predict", files=files)
        assert answer.status_code == 200, answer.text
        served = {result["file"]: result["predictions"][0]["label"] for result in answer.json()["results"]}
    assert served == expected


@pytest.mark.shared
def test_the_probes_fallback_with_two_or_one_training_images_per_class_is_stated_in_metrics(tmp_path):
    """data.shots=2: C by 2 stratified folds (leave-one-out for each class), stated; data.shots=1: no fold can hold an
    image out, so C and k take their documented fixed values and the models keep temperature 1, stated."""
    for shots, solver in ((2, "lbfgs"), (1, "lbfgs"), (1, "knn")):
        out = tmp_path / f"{solver}{shots}"
        run("train", *SPECIES, f"finetune.head_solver={solver}", f"data.shots={shots}", "data.split_seed=0", f"hydra.run.dir={out}")
        metrics, log = read_metrics(out), (out / "train.log").read_text()
        assert "validation images stay out of training" in log  # data.shots: never merged into training
        if solver == "lbfgs" and shots == 2:
            assert metrics["probe/c_selection"] == "cv2" and "smallest class has 2 training images" in metrics["probe/c_selection_reason"]
            assert metrics["calibration/held_out_images"] == 4
        elif solver == "lbfgs":
            assert (
                metrics["probe/c_selection"] == "fixed"
                and metrics["probe/C"] == FIXED_C
                and "single training image" in metrics["probe/c_selection_reason"]
            )
        else:
            assert metrics["head/selection"] == "fixed" and metrics["head/k"] == min(KNN_FIXED_K, 2)
        if shots == 1:
            assert metrics["calibration/rule"] == "no_held_out_images" and metrics["calibration/temperature"] == 1.0
            assert "not calibrated (temperature 1)" in log
        assert metrics["test/balanced_acc"] > 0.6, (solver, shots, metrics["test/balanced_acc"])  # from 1-2 photos a class: 0.74 measured at 1


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["finetune.head_solver=knn", "performance.feature_cache.enabled=false"], "finetune.head_solver=knn: needs finetune=frozen and"),
        (["finetune=full", "+finetune.head_solver=prototype"], "finetune.head_solver=prototype: needs finetune=frozen and"),
        (["finetune.head_solver=prototype", "finetune.loss=asl"], "finetune.loss=asl: head_solver=prototype has no loss to train"),
    ],
)
def test_what_the_heads_cannot_do_is_refused_in_one_line_before_any_work(tmp_path, overrides, message):
    from transferlab.core.errors import ConfigError

    with pytest.raises(ConfigError) as refused:
        run("train", "data=image_folder", f"data.root={tmp_path}", *overrides, f"hydra.run.dir={tmp_path / 'run'}")
    assert str(refused.value).startswith(message) and "\n" not in str(refused.value)
