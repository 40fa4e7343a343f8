"""Speed features that must not change results: frozen-feature cache, fast decoding, auto settings, the benchmark."""

from __future__ import annotations

import importlib
import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import (
    FAST,
    PETS,
    REPO,
    SPECIES_RUN,
    make_datamodule,
    pet_photos,
    read_metrics,
    read_splits,
    run,
    run_cli,
    run_mains,
)
from transferlab.core.hardware import choose_precision, default_workers, detect
from transferlab.data.features import FeatureStore, Inputs, describe, fingerprint, library_versions, weights_digest
from transferlab.data.images import decode_rgb, load_rgb
from transferlab.models.backbones import Backbone, create_backbone
from transferlab.models.classifier import load_checkpoint

# ----------------------------------------------------------------------------------------- decoding


def _pil_pixels(path: Path) -> torch.Tensor:
    return torch.from_numpy(np.array(load_rgb(path))).permute(2, 0, 1)


def test_fast_decode_gives_pillows_pixels_for_every_kind_of_file(tmp_path):
    src = pet_photos(True, 1)[0]
    with Image.open(src) as img:
        rgb = img.convert("RGB")
    files = {"plain.jpg": src}
    rgb.convert("L").save(tmp_path / "gray.jpg", quality=90)
    rgb.convert("CMYK").save(tmp_path / "cmyk.jpg", quality=90)
    rgba = rgb.convert("RGBA")
    rgba.putalpha(128)
    rgba.save(tmp_path / "alpha.png")
    rgb.convert("P").save(tmp_path / "palette.png")
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90 degrees clockwise to display
    rgb.save(tmp_path / "rotated.jpg", quality=90, exif=exif)
    for name in ("gray.jpg", "cmyk.jpg", "alpha.png", "palette.png", "rotated.jpg"):
        files[name] = tmp_path / name
    for name, path in files.items():
        ours, pillow = decode_rgb(path), _pil_pixels(path)
        assert ours.dtype == torch.uint8 and ours.shape == pillow.shape, name
        # Same libjpeg-turbo IDCT; CMYK conversion may differ by a level or two.
        assert (ours.int() - pillow.int()).abs().max() <= (8 if name == "cmyk.jpg" else 0), name
    assert decode_rgb(files["rotated.jpg"]).shape[1:] == (rgb.width, rgb.height)  # EXIF rotation applied


def test_large_jpegs_are_decoded_at_reduced_size_but_never_below_what_is_needed(tmp_path):
    big = tmp_path / "big.jpg"
    with Image.open(pet_photos(False, 1)[0]) as img:
        img.convert("RGB").resize((2000, 1500)).save(big, quality=90)
    reduced = decode_rgb(big, min_short_side=256)
    assert 256 <= min(reduced.shape[1:]) < 750 and reduced.shape[2] / reduced.shape[1] == pytest.approx(4 / 3, rel=0.01)
    assert decode_rgb(big).shape[1:] == (1500, 2000)


# ------------------------------------------------------------------------------------ auto settings


def test_auto_settings_follow_the_hardware():
    hw = detect()
    assert hw.cores >= 1 and hw.cpu_model
    assert choose_precision("auto", "cpu") == ("bf16-mixed" if hw.cpu_bf16 else "32-true")
    assert choose_precision("16-mixed", "cpu") == "16-mixed"
    assert 1 <= default_workers(1, gpu=False) <= max(1, hw.cores)
    assert default_workers(hw.cores * 4, gpu=False) == 1  # many processes share the cores


def test_run_log_says_what_was_chosen(tiny_folder, tmp_path):
    run("train", "data=image_folder", f"data.root={tiny_folder}", "trainer.max_epochs=1", f"hydra.run.dir={tmp_path}", *FAST)
    line = next(line for line in (tmp_path / "train.log").read_text().splitlines() if "Performance:" in line)
    expected = "bf16-mixed" if detect().cpu_bf16 else "32-true"
    assert f"precision {expected} (auto: CPU has" in line and "channels_last on (auto" in line and "feature cache on" in line
    saved = (tmp_path / "config.yaml").read_text()
    assert f"precision: {expected}" in saved  # the resolved value is what the run's config records


BAD_PERFORMANCE_SETTINGS = [
    ("performance.channels_last=maybe", "performance.channels_last: expected"),
    ("performance.feature_cache.storage=ram", "performance.feature_cache.storage: expected"),
    ("+performance.feature_cache.augmented_view=2", "performance.feature_cache.augmented_view: unknown key (did you mean: augmented_views?)"),
    ("data.num_workers=many", "data.num_workers: expected auto or a whole number"),
]


@pytest.fixture(scope="module")
def bad_performance_outcomes(tiny_folder, tmp_path_factory) -> list[dict]:
    base = tmp_path_factory.mktemp("bad_performance")
    return run_mains(
        [
            ("train", ["data=image_folder", f"data.root={tiny_folder}", f"hydra.run.dir={base / str(i)}", *FAST, override])
            for i, (override, _) in enumerate(BAD_PERFORMANCE_SETTINGS)
        ],
        base,
    )


@pytest.mark.parametrize("case", range(len(BAD_PERFORMANCE_SETTINGS)), ids=[o for o, _ in BAD_PERFORMANCE_SETTINGS])
def test_bad_performance_settings_exit_2_with_one_line(bad_performance_outcomes, case):
    expected, proc = BAD_PERFORMANCE_SETTINGS[case][1], bad_performance_outcomes[case]
    assert proc["code"] == 2, proc["stderr"][-2000:]
    errors = [line for line in proc["stderr"].splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and expected in errors[0], proc["stderr"][-2000:]


# ------------------------------------------------------------------------------------ feature cache


def test_store_keeps_rows_across_instances_and_ignores_half_written_shards(tmp_path):
    keys = [f"img{i}" for i in range(5)]
    rows = np.random.default_rng(0).standard_normal((5, 8)).astype(np.float32)
    store = FeatureStore(tmp_path, "k1")
    store.add(keys[:3], rows[:3], "a")
    (tmp_path / "k1" / "broken.keys.json").write_text(json.dumps(["img3"]))  # its .npy never arrived
    again = FeatureStore(tmp_path, "k1")
    assert again.missing(keys) == ["img3", "img4"]
    again.add(keys[3:], rows[3:], "b")
    got = np.stack([array[row] for array, row in FeatureStore(tmp_path, "k1").rows(keys)])
    np.testing.assert_array_equal(got, rows)
    assert FeatureStore(tmp_path, "k2").missing(keys) == keys


def test_fingerprint_changes_with_every_part_and_not_with_their_order():
    """Each part describe() reports, changed alone, gives another store; the same parts in any order the same one."""
    backbone = create_backbone("tf_efficientnet_lite0", weights="none")
    prep = backbone.preprocessing
    versions = library_versions()
    base = describe(backbone, Inputs(prep.eval_transform(), prep.decode_size(), views=2, seed=7), "32-true", weights_digest(backbone.body), versions)
    with torch.no_grad():
        next(backbone.body.parameters()).add_(1e-6)
    changed = {
        "backbone": "resnet18",
        "source": f"not-{base['source']}",
        "weights_sha256": weights_digest(backbone.body),  # one weight moved by 1e-6
        "transform": repr(prep.resized(200).eval_transform()),
        "decode_size": base["decode_size"] + 1,
        "precision": "bf16-mixed",
        "views": 3,
        "seed": 8,
        "versions": {**versions, "torch": f"{versions['torch']}.post1"},
    }
    assert set(changed) == set(base)  # every part is varied here (a part added to describe() fails this until it is)
    keys = [fingerprint(**base)] + [fingerprint(**{**base, part: value}) for part, value in changed.items()]
    assert len(set(keys)) == len(keys) and all(re.fullmatch("[0-9a-f]{24}", key) for key in keys)
    reordered = {part: base[part] for part in reversed(list(base))} | {"versions": dict(reversed(list(versions.items())))}
    assert list(reordered) != list(base) and fingerprint(**reordered) == keys[0]

    def with_seed(views: int, seed: int) -> str:
        return fingerprint(**describe(backbone, Inputs(prep.eval_transform(), prep.decode_size(), views, seed), "32-true", "d", versions))

    assert with_seed(0, 1) == with_seed(0, 2)  # no augmented views: the seed draws nothing, the same store
    assert with_seed(2, 1) != with_seed(2, 2)


def _train_in_process(overrides: list[str], out: Path) -> dict:
    run("train", *overrides, f"hydra.run.dir={out}")
    return json.loads((out / "feature_cache.json").read_text())


def test_cache_is_reused_and_invalidated_by_backbone_weights_and_transform(tiny_folder, tmp_path, monkeypatch):
    calls = {"n": 0}
    forward = Backbone.forward

    def counting(self, images):
        calls["n"] += 1
        return forward(self, images)

    monkeypatch.setattr(Backbone, "forward", counting)
    weights_file = tmp_path / "lite0_changed.pt"
    import timm

    from transferlab.models.sources.bundled import load_bundled

    model = timm.create_model("tf_efficientnet_lite0")
    load_bundled("tf_efficientnet_lite0", model)
    with torch.no_grad():
        model.conv_stem.weight.mul_(1.01)
    torch.save(model.state_dict(), weights_file)

    base = ["data=image_folder", f"data.root={tiny_folder}", "trainer.max_epochs=1", f"paths.cache_dir={tmp_path / 'cache'}", "logger=none", *FAST]
    base.append("interpret.enabled=false")  # the interpretation runs the backbone for its maps, after the test

    def train_once(name: str, *extra: str) -> tuple[int, dict]:
        calls["n"] = 0
        stats = _train_in_process([*base, *extra], tmp_path / name)
        return calls["n"], stats

    def computed(stats: dict) -> int:
        return sum(v["computed"] for k, v in stats.items() if isinstance(v, dict))

    n, first = train_once("first")
    assert n > 0 and computed(first) == 16 and first["train"]["reused"] == 0
    n, second = train_once("second")
    assert n == 0 and computed(second) == 0  # fit and test from the cache: the backbone never ran
    for label, extra in {
        "eval transform": ["backbone.input_size=72"],
        "weights": [f"backbone.weights={weights_file}"],
        "backbone": ["backbone=resnet18", "backbone.weights=none"],
    }.items():
        n, stats = train_once(label.replace(" ", "_"), *extra)
        assert n > 0 and computed(stats) == 16, label
        assert stats["train"]["store"] != first["train"]["store"], label
    n, again = train_once("again")  # the original setting's store is still there
    assert n == 0 and again["train"]["store"] == first["train"]["store"]
    n, views = train_once("views", "performance.feature_cache.augmented_views=3")
    array = np.load(next(Path(views["train"]["store"]).glob("train-*.npy")))
    assert views["train"]["views"] == 3 and array.shape[1] == 3 and not np.allclose(array[:, 0], array[:, 1])
    n, views_again = train_once("views_again", "performance.feature_cache.augmented_views=3")
    assert n == 0 and views_again["train"]["store"] == views["train"]["store"]


@pytest.mark.shared
def test_cached_and_uncached_frozen_training_give_the_same_head(tmp_path):
    """fp32, no augmentation: the head sees the same features in the same order either way."""
    common = [
        f"data.root={PETS}",
        "data.task=species",
        "trainer.max_epochs=2",
        "finetune.head_solver=sgd",  # epochs of a head: the same either way
        "trainer.precision=32-true",
        "backbone.input_size=128",
        "data.augment.scale_min=1.0",
        "data.augment.hflip=false",
        "seed=3",
        "callbacks.progress_bar=null",
        "trainer.enable_progress_bar=false",
        f"paths.cache_dir={tmp_path / 'cache'}",
    ]
    run("train", *common, f"hydra.run.dir={tmp_path / 'cached'}")
    run("train", *common, "performance.feature_cache.enabled=false", f"hydra.run.dir={tmp_path / 'uncached'}")
    assert json.loads((tmp_path / "cached" / "feature_cache.json").read_text())["train"]["computed"] > 0
    assert not (tmp_path / "uncached" / "feature_cache.json").exists()
    cached, _ = load_checkpoint(tmp_path / "cached" / "checkpoints" / "last.ckpt")
    uncached, _ = load_checkpoint(tmp_path / "uncached" / "checkpoints" / "last.ckpt")
    prep = cached.backbone.preprocessing
    images = torch.stack([prep.eval_transform()(decode_rgb(p, prep.decode_size())) for p in sorted(PETS.glob("*.jpg"))[::5]])
    with torch.no_grad():
        features = cached.backbone(images)
        p_cached, p_uncached = cached.head(features).softmax(-1), uncached.head(features).softmax(-1)
    assert (p_cached - p_uncached).abs().max().item() <= 1e-5
    assert read_metrics(tmp_path / "cached")["test/acc"] == read_metrics(tmp_path / "uncached")["test/acc"] >= 0.9  # 0.96 at 128 px


@pytest.mark.shared
def test_ddp_with_cache_matches_one_process(species_run, tmp_path):
    """Two gloo processes fill a fresh cache together (each its share), train, and test as one process did."""
    out = tmp_path / "ddp"
    run_cli(
        "train",
        *SPECIES_RUN,
        "trainer=ddp_cpu",
        "data.batch_size=16",
        "data.num_workers=0",
        f"paths.cache_dir={tmp_path / 'cache'}",
        f"hydra.run.dir={out}",
    )
    stats = json.loads((out / "feature_cache.json").read_text())
    splits = list(read_splits(out).values())
    assert stats["train"]["computed"] == splits.count("train") and stats["test"]["computed"] == splits.count("test") > 0
    store = Path(stats["train"]["store"])
    assert {p.name.rsplit("-", 1)[1] for p in store.glob("*.npy")} == {"r0.npy", "r1.npy"}  # both ranks computed
    ddp, single = read_metrics(out), read_metrics(species_run)
    # every image's prediction gathered from both ranks in dataset order; the heads differ a little (under class
    # weights, the mean of two ranks' weighted losses is not the weighted loss of their joint batch), so one
    # borderline photo of the 81 may go the other way
    assert abs(ddp["test/acc"] - single["test/acc"]) <= 1 / 81 + 1e-6 and ddp["test/acc"] >= 0.95  # cats vs dogs: 0.99 and 1.0
    # The temperature is chosen on the val logits of both ranks (every val image of the split), broadcast, and written
    # into best.ckpt; it lowers the held-out NLL. With no val error it is the one whose mean confidence is Laplace's
    # (n + 1) / (n + 2), so every calibrated val confidence sits in bins of accuracy 1 and the ECE is 1 / (n + 2): half
    # the images (one rank's) would give 1 / 27 instead of 1 / 51.
    n_val = splits.count("val")
    checkpoint = torch.load(out / "checkpoints" / "best.ckpt", weights_only=True, map_location="cpu")
    assert ddp["calibration/held_out_images"] == n_val > 0
    assert checkpoint["state_dict"]["temperature"].item() == pytest.approx(ddp["calibration/temperature"])
    assert ddp["val/nll"] < ddp["val/nll_before_calibration"] and ddp["val/ece"] <= ddp["val/ece_before_calibration"]
    if ddp["calibration/held_out_errors"] == 0:  # so far every run got the 49 val photos right
        assert ddp["calibration/rule"] == "capped_at_laplace_accuracy" and ddp["val/ece"] == pytest.approx(1 / (n_val + 2), rel=1e-4)
    ddp_rows = [r.split(",")[:3] for r in (out / "test_predictions.csv").read_text().splitlines()]
    single_rows = [r.split(",")[:3] for r in (species_run / "test_predictions.csv").read_text().splitlines()]
    assert [r[:2] for r in ddp_rows] == [r[:2] for r in single_rows]  # the same images and labels, in the same order
    assert sum(a != b for a, b in zip(ddp_rows, single_rows)) <= 1


def test_ddp_memory_cache_exchanges_shares_through_the_process_group(tiny_folder, tmp_path):
    """storage=memory under DDP: each rank computes half and receives the other half; an uncached one-process
    eval of the checkpoint then finds the same test accuracy, so the exchanged features were the right ones."""
    out = tmp_path / "ddp"
    run_cli(
        "train",
        "data=image_folder",
        f"data.root={tiny_folder}",
        "trainer=ddp_cpu",
        "trainer.max_epochs=2",
        "performance.feature_cache.storage=memory",
        f"hydra.run.dir={out}",
        *FAST,
    )
    stats = json.loads((out / "feature_cache.json").read_text())
    assert stats["train"]["store"] == "memory" and stats["train"]["computed"] == stats["train"]["images"] > 0
    run(
        "eval",
        f"ckpt_path={out / 'checkpoints' / 'best.ckpt'}",
        f"hydra.run.dir={tmp_path / 'eval'}",
        "trainer.enable_progress_bar=false",
        "data.num_workers=0",
    )
    assert read_metrics(out)["test/acc"] == pytest.approx(read_metrics(tmp_path / "eval")["test/acc"], abs=1e-6)


def test_resume_reuses_the_cache(tiny_folder, tmp_path):
    common = [
        "data=image_folder",
        f"data.root={tiny_folder}",
        f"hydra.run.dir={tmp_path}",
        f"paths.cache_dir={tmp_path / 'c'}",
        "finetune.head_solver=sgd",
        *FAST,
    ]
    run("train", "trainer.max_epochs=1", *common)
    run("train", "trainer.max_epochs=2", "ckpt_path=last", *common)
    stats = json.loads((tmp_path / "feature_cache.json").read_text())
    assert stats["train"]["computed"] == 0 and stats["train"]["reused"] > 0 and read_metrics(tmp_path)["epochs"] == 2


def test_image_cache_gives_the_same_eval_inputs(tiny_folder):
    prep = create_backbone("tf_efficientnet_lite0", weights="none").preprocessing.resized(64)
    plain, cached = (make_datamodule("image_folder", root=str(tiny_folder), image_cache=flag, num_workers=0) for flag in (False, True))
    for dm in (plain, cached):
        dm.preprocessing = prep
        dm.setup()
    a, b = plain.image_dataset("val"), cached.image_dataset("val")
    assert b.decoded is not None and len(b.decoded) == len(a)
    for i in range(len(a)):
        assert torch.allclose(a[i][0], b[i][0], atol=0.05), i  # decoded once at the resize size, then the same geometry


# ------------------------------------------------------------------------------------------ benchmark

BENCHMARK = REPO / "scripts" / "benchmark.py"
STABLE_KEYS = [  # benchmark.json's top-level measurement keys (other tooling reads them)
    "frozen_speedup",
    "frozen_speedup_cache",
    "frozen_speedup_bf16",
    "frozen_speedup_workers",
    "frozen_acc_baseline",
    "frozen_acc_transferlab",
    "finetune_overhead",
    "bf16_speedup_resnet50_train",
    "bf16_speedup_lite0_train",
    "decode_speedup",
    "decode_draft_speedup",
    "peak_fraction",
    "probe_balanced_acc_sklearn",
    "probe_balanced_acc_transferlab",
    "predict_vs_raw",
    "predict_onnxruntime_img_s",
    "fill_vs_raw",
    "fill_img_s",
    "fill_raw_img_s",
    "int8_size_ratio_lite0",
    "int8_latency_ratio_lite0",
    "pte_int8_size_ratio_lite0",
    "pte_int8_latency_ratio_lite0",
]


@pytest.fixture(scope="module")
def bench():
    """scripts/bench, the benchmark's sections (imported as benchmark.py imports it: from the folder beside it)."""
    with pytest.MonkeyPatch.context() as patch:
        patch.syspath_prepend(str(REPO / "scripts"))
        return importlib.import_module("bench")


def _fake_details() -> dict:
    """Every section's details in the shapes a run writes, with the full CPU run's figures (docs/speed.md), one
    target missed (finetune_overhead 1.2) and one value unmeasured (the fill's, None)."""

    def run(seconds: float, acc: float | None = None) -> dict:
        return {"seconds": seconds, "val_acc": acc, "test_acc": acc, "feature_cache": None}

    def decode(images: int, side: float, eligible: int, ours: float, draft: float) -> dict:
        return {
            "images": images,
            "median_short_side": side,
            "draft_eligible": eligible,
            "output": [3, 224, 224],
            "resize": 256,
            "interpolation": "bicubic",
            "pillow_img_s": 313.0,
            "transferlab_img_s": ours,
            "transferlab_draft_img_s": draft,
            "speedup": ours / 313.0,
            "draft_speedup": draft / 313.0,
            "mean_abs_diff": 0.4,
            "mean_abs_diff_draft": 1.1,
        }

    def probe(images: int, sklearn: float, ours: float) -> dict:
        return {
            "folds": 5,
            "images": images,
            "sklearn": {"acc": sklearn + 0.01, "balanced_acc": sklearn, "seconds": 9.0},
            "transferlab": {"acc": ours + 0.01, "balanced_acc": ours, "seconds": 30.0},
        }

    return {
        "frozen": {
            "baseline": {"seconds": 92.6, "val_acc": 0.98},
            "transferlab": run(8.0, 0.975),
            "transferlab_warm_cache": run(1.3, 0.975),
            "alone": {"cache": run(20.0), "bf16": None, "workers": run(60.0)},
            "bf16_note": "bf16 alone skipped: no native bf16 on this device",
            "epochs": 10,
            "train_images": 259,
            "val_images": 55,
            "speedup": 92.6 / 8.0,
            "speedup_warm_cache": 92.6 / 1.3,
            "speedup_alone": {"cache": 92.6 / 20.0, "bf16": None, "workers": 92.6 / 60.0},
        },
        "finetune": {
            "model": "tf_efficientnet_lite0",
            "batch": 32,
            "precision": "bf16-mixed",
            "raw_img_s": 21.0,
            "transferlab_img_s": 17.5,
            "overhead": 1.2,
        },
        "precision": {
            "batch": 32,
            "steps": 3,
            "images_per_s": {
                "resnet50/train": {"fp32": 3.4, "bf16+channels_last": 11.5, "fp32+channels_last": 4.6, "bf16_speedup": 11.5 / 3.4},
                "tf_efficientnet_lite0/train": {"fp32": 8.2, "bf16+channels_last": 19.8, "bf16_speedup": 19.8 / 8.2},
            },
        },
        "accuracy": {"task": "breeds", "epochs": 10, "runs": {"fp32": {"test_acc": 0.837, "val_acc": 0.8, "seconds": 21.0}}},
        "decode": {"photos": decode(370, 375.0, 0, 585.0, 590.0), "large": decode(60, 900.0, 60, 380.0, 800.0)},
        "peak": {
            "matmul_gflops": {"bf16": 360.0, "fp32": 120.0},
            "headline": "resnet50/train/bf16+channels_last",
            "models": {"resnet50/train/bf16+channels_last": {"gflop_per_image": 12.3, "achieved_gflops": 283.0, "fraction": 283.0 / 360.0}},
        },
        "probe": {"species": probe(284, 0.95, 0.96), "breeds": probe(284, 0.80, 0.79)},
        "predict": {
            "images": 370,
            "batch": 32,
            "precision": "bf16-mixed",
            "workers": 1,
            "onnxruntime_img_s": 75.4,
            "fp32_no_workers_img_s": 40.0,
            "raw_img_s": 74.4,
            "transferlab_img_s": 79.1,
            "predict_vs_raw": 79.1 / 74.4,
        },
        "fill": {
            "images": 8000,
            "batch": 16,
            "precision": "bf16-mixed",
            "raw_img_s_by_workers": {"0": 90.6, "1": 95.2, "2": 107.1},
            "raw_img_s": 107.1,
            "transferlab_workers": 0,
            "transferlab_img_s": None,
            "fill_vs_raw": None,
        },
    }


# key: (the start of the one table row that shows it, the bound in `targets`, the row's target cell, the value in
# _fake_details, met)
FAKE_TARGETS = {
    "frozen_speedup": ("| (a) frozen Lite0, species, 10 epochs", ">= 10", ">= 10x", 92.6 / 8.0, True),
    "frozen_acc_vs_baseline": ("| (a) final val accuracy (55 images) | 0.980 | 0.975 |", ">= -0.01", ">= baseline - 0.01", 0.975 - 0.98, True),
    "finetune_overhead": ("| (b) full fine-tuning tf_efficientnet_lite0 batch 32", "<= 1.05", "<= 1.05", 1.2, False),
    "bf16_speedup_resnet50_train": ("| (c) resnet50/train batch 32", ">= 2.5", ">= 2.5x", 11.5 / 3.4, True),
    "decode_speedup": (
        "| (d1) decode to Lite0's eval geometry: short side 256 bicubic, centre crop 224, uint8, one core, 370 shared",
        ">= 1.5",
        ">= 1.5x",
        585 / 313,
        True,
    ),
    "decode_draft_speedup": ("| (d2) same, ours with the draft path (60 of 60 large enough", ">= 2.0", ">= 2.0x", 800 / 313, True),
    "probe_species_balanced_acc_difference": ("| (f) species, 5-fold out-of-fold balanced_acc", ">= -0.005", ">= -0.005", 0.96 - 0.95, True),
    "probe_breeds_balanced_acc_difference": ("| (f) breeds, 5-fold out-of-fold balanced_acc", ">= -0.005", ">= -0.005", 0.79 - 0.80, False),
    "predict_vs_raw": ("| (g) label 370 JPEGs, Lite0 batch 32 bf16-mixed, 1 worker(s)", ">= 0.8", ">= 0.8", 79.1 / 74.4, True),
    "fill_vs_raw": ("| (h) feature-cache fill, 8000 JPEGs", ">= 0.9", ">= 0.9", None, False),  # unmeasured: never met
}


def test_section_table_makes_the_markdown_and_the_targets_from_one_declaration(bench):
    details = _fake_details()
    result = {
        **bench.summary(details),
        "hardware": {"cpu_model": "EPYC", "cores": 2, "flags": ["avx512_bf16"], "gpu": None, "torch": "2.14.1"},
        "mode": "full",
        "seconds": 454.0,
        "details": details,
    }
    table = bench.markdown(result).splitlines()
    targets = bench.targets(details)
    assert list(targets) == list(FAKE_TARGETS)
    for key, (row, bound, cell, value, met) in FAKE_TARGETS.items():
        entry = targets[key]
        assert entry["target"] == bound and entry["met"] is met and entry["value"] == (None if value is None else pytest.approx(value)), key
        shown = [line for line in table if line.startswith(row)]
        assert len(shown) == 1 and shown[0].endswith(f"| {cell} |"), (key, shown)
    # every row with a target cell is one of `targets`, and no other row has one
    with_target = [line for line in table if line.startswith("| (") and line.split("|")[-2].strip()]
    assert len(with_target) == len(targets), with_target
    for label in (
        "| (a) same, cache reused by a second run: wall s | 92.6 | 1.3 | 71.2x | |",
        "| (a) same, feature cache alone: wall s | 92.6 | 20.0 | 4.6x | |",
        "| (a) same, bf16-mixed alone: wall s | 92.6 | – | bf16 alone skipped: no native bf16 on this device | |",
        "| (a) same, data.num_workers=auto alone: wall s | 92.6 | 60.0 | 1.5x | |",
        "| (c) frozen Lite0 breeds 10 ep, fp32: test acc | | 0.837 | 21 s | |",
        "| (e) resnet50/train/bf16+channels_last: achieved GFLOP/s vs bf16 matmul GFLOP/s | 360 | 283 | **0.79** of peak | |",
        "| (f) species, 5-fold out-of-fold acc: scikit-learn LogisticRegressionCV vs transferlab-train defaults | 0.960 | 0.970 | +0.010 | |",
        "| (h) feature-cache fill, 8000 JPEGs, Lite0 batch 16 bf16-mixed: img/s (raw loop, best of workers 0: 90.6, 1: 95.2, 2: 107.1, "
        "vs transferlab-train frozen, 0 worker(s)) | 107.1 | – | **–** | >= 0.9 |",
    ):
        assert label in table, label
    assert table[:2] == ["| measurement | baseline | transferlab | ratio | target |", "|---|---|---|---|---|"]
    assert table[-1] == "Hardware: EPYC, 2 cores, flags avx512_bf16; GPU none; torch 2.14.1. Mode: full, 454 s."

    # the stable top-level keys, read from the details; None for what did not run
    keys = bench.summary(details)
    assert list(keys) == STABLE_KEYS
    expected = {
        "frozen_speedup": 92.6 / 8.0,
        "frozen_speedup_cache": 92.6 / 20.0,
        "frozen_speedup_bf16": None,
        "frozen_acc_baseline": 0.98,
        "frozen_acc_transferlab": 0.975,
        "bf16_speedup_lite0_train": 19.8 / 8.2,
        "decode_draft_speedup": 800 / 313,
        "peak_fraction": 283 / 360,
        "probe_balanced_acc_sklearn": 0.95,
        "probe_balanced_acc_transferlab": 0.96,
        "predict_onnxruntime_img_s": 75.4,
        "fill_img_s": None,
        "fill_raw_img_s": 107.1,
    }
    for key, value in expected.items():
        assert keys[key] == (None if value is None else pytest.approx(value)), key
    assert set(bench.summary({}).values()) == {None}
    only = {name: details[name] for name in ("decode", "fill")}  # sections that did not run have no rows and no targets
    assert list(bench.targets(only)) == ["decode_speedup", "decode_draft_speedup", "fill_vs_raw"]
    assert sum(line.startswith("| (") for line in bench.markdown({**result, "details": only}).splitlines()) == 5


def _run_script(script: str, *args: str, cwd: Path) -> subprocess.CompletedProcess:
    """A script of scripts/ as a user runs it, from another working directory."""
    return subprocess.run([sys.executable, str(REPO / "scripts" / script), *args], capture_output=True, text=True, timeout=120, cwd=cwd)


def test_check_from_an_earlier_json_judges_each_target(bench, tmp_path):
    targets = bench.targets(_fake_details())
    met = {key: {**entry, "value": float(entry["target"].split()[1])} for key, entry in targets.items()}  # each exactly on its bound

    def check(doctored: dict) -> subprocess.CompletedProcess:
        path = tmp_path / "doctored.json"
        path.write_text(json.dumps({"targets": doctored}))
        return _run_script("benchmark.py", "--check", "--from", str(path), cwd=tmp_path)

    passed = check(met)
    assert passed.returncode == 0 and passed.stdout.splitlines() == [f"{len(met)} of {len(met)} targets met"], passed.stdout + passed.stderr
    failed = check({**met, "fill_vs_raw": {**met["fill_vs_raw"], "value": 0.5}, "finetune_overhead": {**met["finetune_overhead"], "value": None}})
    assert failed.returncode == 1, failed.stdout + failed.stderr
    assert [line for line in failed.stdout.splitlines() if line.startswith("target missed")] == [
        "target missed: finetune_overhead = –, target <= 1.05",
        "target missed: fill_vs_raw = 0.500, target >= 0.9",
    ]
    usage = _run_script("fill_bench.py", "--from", str(tmp_path / "doctored.json"), cwd=tmp_path)  # the one-section wrapper
    assert usage.returncode == 2 and "--from needs --check" in usage.stderr.splitlines()[-1], usage.stderr


@pytest.mark.shared
def test_decode_section_gives_pillows_output(bench, tmp_path):
    """The decode section on a few shared photos, as the benchmark runs it: the same output as the Pillow loop (to
    a grey level on average), the draft path taken only where the JPEG is large enough, and its targets filled."""
    from bench import decode

    details = {"decode": decode.decode_section(pet_photos(False, 6), large=2, rounds=1, work=tmp_path)}
    photos, large = details["decode"]["photos"], details["decode"]["large"]
    assert photos["images"] == 6 and large["images"] == 2 and photos["output"] == large["output"] == [3, 224, 224]
    assert photos["draft_eligible"] == 0 and large["draft_eligible"] == 2  # ~500x375 photos; the same upscaled to 1200 px
    assert photos["mean_abs_diff"] <= 1.0 and photos["mean_abs_diff_draft"] == photos["mean_abs_diff"]  # no draft: the same decode
    assert large["mean_abs_diff"] <= 1.0 and large["mean_abs_diff_draft"] <= 3.0  # reduced decode, then the same resize
    assert photos["speedup"] == pytest.approx(photos["transferlab_img_s"] / photos["pillow_img_s"])
    targets = bench.targets(details)
    assert targets["decode_speedup"]["value"] == photos["speedup"] and targets["decode_draft_speedup"]["value"] == large["draft_speedup"]
    assert bench.summary(details)["decode_draft_speedup"] == large["draft_speedup"]
