"""transferlab-rank (issue 33): LogME against the closed-form evidence, the paired test and the recommendation rule
(no images), then the command on the shared photos: bundled Lite0 and Lite1, Lite0 with random weights as a control,
and a candidate that cannot be built; a second run computes no feature, and a frozen training run of the
recommended backbone reads the features the ranking cached."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import numpy as np
import pytest
from scipy.stats import multivariate_normal

from conftest import PETS, read_metrics, run

COLUMNS = [
    "backbone", "weights", "probe_acc", "probe_acc_ci95_low", "probe_acc_ci95_high", "knn_acc", "logme", "prior_top1",
    "p_vs_best", "recommended", "feature_seconds", "images_per_second", "parameters", "feature_dim", "model_mb", "error",
]  # fmt: skip
SCORES = ("probe_acc", "knn_acc", "logme")


def test_logme_is_the_log_marginal_likelihood_at_the_fitted_precisions_and_prefers_informative_features():
    from transferlab.models.transferability import fit_evidence, logme

    rng = np.random.default_rng(0)
    features = rng.normal(size=(40, 60))  # more features than images, as with a few hundred photos
    target = features[:, 0] * 2 + rng.normal(size=40) * 0.5
    evidence, alpha, beta = fit_evidence(features, target)
    covariance = features @ features.T / alpha + np.eye(40) / beta  # y ~ N(0, F F^T / alpha + I / beta)
    sign, log_det = np.linalg.slogdet(covariance)
    closed_form = -0.5 * (40 * math.log(2 * math.pi) + log_det + target @ np.linalg.solve(covariance, target))
    assert sign > 0 and evidence == pytest.approx(closed_form, rel=1e-9)
    assert closed_form == pytest.approx(multivariate_normal(np.zeros(40), covariance).logpdf(target), rel=1e-9)
    # alpha and beta maximise it: moving either lowers the evidence
    for a, b in ((alpha * 1.5, beta), (alpha / 1.5, beta), (alpha, beta * 1.5), (alpha, beta / 1.5)):
        moved = features @ features.T / a + np.eye(40) / b
        assert multivariate_normal(np.zeros(40), moved).logpdf(target) < closed_form

    labels = rng.integers(0, 3, size=200)
    informative = rng.normal(size=(200, 30)) + np.eye(3)[labels] @ rng.normal(size=(3, 30)) * 2
    noise = rng.normal(size=(200, 30))
    assert logme(informative, labels) > logme(noise, labels) + 0.1


def test_the_corrected_paired_t_test_over_folds():
    from transferlab.core.statistics import corrected_paired_t, fold_test_to_train

    same = [0.9, 0.92, 0.88, 0.91, 0.9]
    assert corrected_paired_t(same, same, fold_test_to_train(5)) == (0.0, 1.0)
    worse = [s - 0.3 + 0.01 * i for i, s in enumerate(same)]
    difference, p = corrected_paired_t(same, worse, fold_test_to_train(5))
    assert difference == pytest.approx(-0.28) and p < 0.001
    noisy = [0.91, 0.9, 0.89, 0.92, 0.88]  # the same mean, differences both ways
    assert corrected_paired_t(same, noisy, fold_test_to_train(5))[1] > 0.5
    # the correction widens the plain paired t-test: overlapping training sets are not independent evidence
    plain = corrected_paired_t(same, [s - 0.01 + 0.01 * (i % 2) for i, s in enumerate(same)], 0.0)[1]
    corrected = corrected_paired_t(same, [s - 0.01 + 0.01 * (i % 2) for i, s in enumerate(same)], fold_test_to_train(5))[1]
    assert corrected > plain


def scored(name: str, folds: list[float], prior: float | None, parameters: int):
    from transferlab.training.ranking import Scored

    return Scored({"backbone": name, "weights": "w", "probe_acc": float(np.mean(folds)), "prior_top1": prior, "parameters": parameters}, folds)


def test_the_recommendation_takes_the_highest_prior_among_candidates_not_significantly_worse_then_the_fewest_parameters():
    from transferlab.training.ranking import Scored, recommend

    best = scored("ensemble", [0.95, 0.96, 0.94, 0.95, 0.97], None, 12_000_000)  # the best probe, no known prior
    close = scored("lite2", [0.94, 0.96, 0.95, 0.94, 0.96], 0.775, 5_000_000)  # indistinguishable, the highest prior
    small = scored("lite0", [0.95, 0.95, 0.94, 0.95, 0.96], 0.748, 3_000_000)  # indistinguishable, lower prior
    weak = scored("random", [0.6, 0.62, 0.58, 0.61, 0.6], 0.9, 1_000_000)  # a (made-up) high prior cannot rescue it
    failed = Scored({"backbone": "broken", "weights": "w", "error": "OSError: no file"})
    rows = [best, close, small, weak, failed]
    assert recommend(rows, 5, 0.05) == 1
    assert [r.row["recommended"] for r in rows] == [False, True, False, False, False]
    assert rows[0].row["p_vs_best"] == 1.0 and rows[3].row["p_vs_best"] < 0.05 and rows[1].row["p_vs_best"] >= 0.05
    assert rows[4].row["p_vs_best"] is None
    twin = scored("lite2-small", [0.94, 0.96, 0.95, 0.94, 0.96], 0.775, 4_000_000)  # the same prior: fewer parameters win
    assert recommend([best, close, twin], 5, 0.05) == 2
    assert recommend([failed], 5, 0.05) is None


def test_candidates_are_config_names_or_mappings_and_a_wrong_one_is_a_row_with_the_reason(tmp_path):
    from transferlab.config.paths import config_dir
    from transferlab.core.errors import ConfigError
    from transferlab.training.ranking import resolve_candidates

    found = resolve_candidates(
        ["resnet50", {"name": "tf_efficientnet_lite0", "weights": "none"}, {"name": "convnext_tiny"}, "tf_efficientnet_lite9"], Path(config_dir())
    )
    assert [c.overrides for c in found[:3]] == [
        ["backbone=resnet50"],
        ["backbone=tf_efficientnet_lite0", "backbone.weights=none"],
        ["backbone=custom", "backbone.name=convnext_tiny"],
    ]
    assert found[0].settings["source"] == "torchvision" and found[1].settings["source"] == "timm" and found[2].settings["weights"] == "pretrained"
    assert "did you mean" in found[3].error and "tf_efficientnet_lite0" in found[3].error
    with pytest.raises(ConfigError, match="weigths"):
        resolve_candidates([{"name": "resnet50", "weigths": "none"}], Path(config_dir()))


def read_ranking(folder: Path) -> list[dict[str, str]]:
    with open(folder / "ranking.csv", newline="") as fh:
        reader = csv.DictReader(fh)
        assert reader.fieldnames == COLUMNS
        return list(reader)


@pytest.mark.slow
@pytest.mark.shared
def test_rank_on_the_shared_photos_puts_the_random_control_last_reuses_its_features_and_feeds_training(tmp_path):
    data = ["data=oxford_pets", f"data.root={PETS}", "data.task=species", "data.download=false", "data.num_workers=0"]
    candidates = "backbones=[tf_efficientnet_lite0,tf_efficientnet_lite1,{name: tf_efficientnet_lite0, weights: none},{name: tf_efficientnet_lite0, weights: /no/such/weights.pth}]"
    args = [*data, candidates, "folds=3", "c_folds=3", "precision=bf16-mixed"]  # bf16: the features other tests cached
    first = run("rank", *args, f"hydra.run.dir={tmp_path / 'first'}")
    rows = read_ranking(tmp_path / "first")
    lite0, lite1, control, broken = rows
    assert [r["weights"] for r in rows] == ["bundled", "bundled", "none", "/no/such/weights.pth"]
    for row in (lite0, lite1, control):
        assert row["error"] == "" and all(row[k] != "" for k in COLUMNS if k not in ("error", "prior_top1", "images_per_second"))
    for score in SCORES:  # the random control is last by every score
        assert float(control[score]) < min(float(lite0[score]), float(lite1[score])), score
    assert float(lite0["probe_acc"]) > 0.95 and float(control["probe_acc"]) < 0.85  # cats vs dogs, 1:2
    assert float(lite0["probe_acc_ci95_low"]) < float(lite0["probe_acc"]) <= float(lite0["probe_acc_ci95_high"]) <= 1
    assert float(control["p_vs_best"]) < 0.05
    assert (lite0["prior_top1"], lite1["prior_top1"], control["prior_top1"]) == ("0.7483", "0.7664", "")
    assert broken["error"].startswith("ConfigError: backbone.weights") and broken["probe_acc"] == ""
    assert [r["recommended"] for r in rows].count("true") == 1 and control["recommended"] == "false"
    assert (lite0["feature_dim"], lite1["feature_dim"]) == ("1280", "1280") and 3e6 < int(lite0["parameters"]) < int(lite1["parameters"])
    chosen = next(r for r in rows if r["recommended"] == "true")
    assert first["recommended"] == chosen["backbone"] and f"backbone={chosen['backbone']}" in first["train_command"]
    assert first["agreement"]["knn_acc"]["backbones"] == 3
    page = (tmp_path / "first" / "ranking.html").read_text()
    assert "data:image/png;base64," in page and "Recommended: " in page and "http://" not in page and "https://" not in page
    assert "| backbone | weights | probe_acc |" in (tmp_path / "first" / "ranking.md").read_text()

    second = run("rank", *args, f"hydra.run.dir={tmp_path / 'second'}")
    assert second["features_computed"] == 0  # every candidate's features came from the cache
    again = read_ranking(tmp_path / "second")
    for before, after in zip(rows[:3], again[:3]):
        assert after["images_per_second"] == before["images_per_second"] != ""  # the throughput recorded when computed
        assert {k: after[k] for k in SCORES} == {k: before[k] for k in SCORES}
    assert json.loads((tmp_path / "second" / "ranking.json").read_text())["rows"][0]["backbone"] == "tf_efficientnet_lite0"

    # A frozen training run of Lite1 on the same photos computes none of its features again.
    train = tmp_path / "train"
    run("train", *data, "backbone=tf_efficientnet_lite1", "trainer.precision=bf16-mixed", "interpret.enabled=false", f"hydra.run.dir={train}")
    cache = json.loads((train / "feature_cache.json").read_text())
    assert cache["train"]["computed"] == 0 and cache["test"]["computed"] == 0 and cache["train"]["reused"] > 0
    assert read_metrics(train)["test/acc"] > 0.9
