"""Speed features that must not change results: frozen-feature cache, fast decoding, auto settings, the benchmark."""

from __future__ import annotations

import json
import math
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
from transferlab.data.feature_cache import (
    FeatureStore,
    fingerprint,
    weights_digest,
)
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


def test_fingerprint_changes_with_weights_and_transform():
    backbone = create_backbone("tf_efficientnet_lite0", weights="none")
    base = {"backbone": backbone.name, "weights": weights_digest(backbone.body), "transform": repr(backbone.preprocessing.eval_transform())}
    with torch.no_grad():
        next(backbone.body.parameters()).add_(1e-6)
    assert fingerprint(**{**base, "weights": weights_digest(backbone.body)}) != fingerprint(**base)
    assert fingerprint(**{**base, "transform": repr(backbone.preprocessing.resized(200).eval_transform())}) != fingerprint(**base)
    assert fingerprint(**base) == fingerprint(**dict(base))


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
    assert read_metrics(tmp_path / "cached")["test/acc"] == read_metrics(tmp_path / "uncached")["test/acc"]


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
    assert abs(ddp["test/acc"] - single["test/acc"]) <= 1 / 81 + 1e-6
    assert 0.05 < ddp["calibration/temperature"] < 20 and ddp["val/ece"] <= ddp["val/ece_before_calibration"]
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


@pytest.mark.shared  # the benchmark trains on the shared photos
def test_benchmark_quick_writes_every_key(tmp_path):
    script = str(REPO / "scripts" / "benchmark.py")
    out = tmp_path / "benchmark.json"
    proc = subprocess.run([sys.executable, script, "--quick", "--out", str(out)], capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-4000:]
    result = json.loads(out.read_text())
    keys = [
        "frozen_speedup",
        "frozen_speedup_cache",
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
    ]
    if result["hardware"]["cpu_bf16"]:
        keys.append("frozen_speedup_bf16")
    else:
        assert result["frozen_speedup_bf16"] is None  # skipped, with a note in the table
    for key in keys:
        assert isinstance(result[key], float) and math.isfinite(result[key]) and result[key] > 0, key
    assert 0 <= result["frozen_acc_baseline"] <= 1 and 0 <= result["frozen_acc_transferlab"] <= 1
    assert {"cpu_model", "cores", "flags", "gpu"} <= set(result["hardware"])
    for row in (
        "| (a) frozen Lite0",
        "| (a) same, feature cache alone",
        "| (a) same, bf16-mixed alone",
        "| (a) same, data.num_workers=auto alone",
        "| (d1) decode",
        "| (d2) same, ours with the draft path",
        "| (f) species",
        "| (g) label",
        "| (h) feature-cache fill",
    ):
        assert row in proc.stdout, row
    assert result["probe_balanced_acc_transferlab"] >= result["probe_balanced_acc_sklearn"] - 0.05  # 111 photos, 3 folds

    # Every row with a target is in `targets`; quick mode's small samples need not meet them.
    targets = result["targets"]
    assert {
        "frozen_speedup",
        "frozen_acc_vs_baseline",
        "finetune_overhead",
        "bf16_speedup_resnet50_train",
        "decode_speedup",
        "decode_draft_speedup",
        "probe_species_balanced_acc_difference",
        "predict_vs_raw",
        "fill_vs_raw",
    } <= set(targets)
    for key, entry in targets.items():
        assert set(entry) == {"value", "target", "met"} and isinstance(entry["met"], bool), key
        op, bound = entry["target"].split()
        assert op in (">=", "<=") and math.isfinite(float(bound)) and isinstance(entry["value"], float), key

    def check(doctored: dict) -> subprocess.CompletedProcess:
        path = tmp_path / "doctored.json"
        path.write_text(json.dumps({**result, "targets": doctored}))
        return subprocess.run([sys.executable, script, "--check", "--from", str(path)], capture_output=True, text=True, timeout=120)

    met = {key: {**entry, "value": float(entry["target"].split()[1])} for key, entry in targets.items()}  # each exactly on its bound
    passed = check(met)
    assert passed.returncode == 0, passed.stdout + passed.stderr
    failed = check({**met, "fill_vs_raw": {**met["fill_vs_raw"], "value": 0.5}})
    assert failed.returncode == 1, failed.stdout + failed.stderr
    assert [line for line in failed.stdout.splitlines() if line.startswith("target missed")] == ["target missed: fill_vs_raw = 0.500, target >= 0.9"]
