"""Class activation maps (transferlab-explain, callbacks=cam) and the interpretation of a run (top losses, most-confused
pairs, embedding map, report.html): files and columns, and whether the maps point at what decides the class."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import FAST, PETS, SEED_IMAGES, chromium_render, needs_browser, pet_photos, require_shared, run
from transferlab.core.errors import ConfigError

pytestmark = pytest.mark.shared

IMAGENET_LITE0 = {"name": "tf_efficientnet_lite0", "weights": "bundled", "source": "timm"}


def read_rows(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def test_explain_cli_writes_maps_over_the_input_crop(species_run, tmp_path):
    require_shared()
    photos = tmp_path / "photos"
    photos.mkdir()
    for src in pet_photos(True, 2) + pet_photos(False, 2):
        (photos / src.name).symlink_to(src)
    (photos / "notes.txt").write_text("not an image")
    out = tmp_path / "out"
    run("explain", f"ckpt_path={species_run / 'checkpoints' / 'best.ckpt'}", f"input={photos}", f"hydra.run.dir={out}")
    rows = read_rows(out / "explain.csv")
    assert list(rows[0]) == ["path", "target", "prob"] and len(rows) == 4
    for row in rows:
        stem = Path(row["path"]).stem
        cam = np.load(out / f"{stem}_cam.npy")
        assert cam.dtype == np.float32 and cam.shape == (224, 224) and 0 <= cam.min() and cam.max() <= 1 and cam.max() > 0.5
        assert (out / f"{stem}_cam.png").is_file()
        assert row["target"] == ("cat" if stem[0].isupper() else "dog") and float(row["prob"]) > 0.5  # the predicted class
    assert read_rows(out / "skipped_images.csv")[0]["path"] == str(photos / "notes.txt")


def test_a_wrong_target_layer_fails_at_start_listing_valid_ones(tmp_path):
    with pytest.raises(ConfigError, match=r"target_layer: 'layer4' is not a layer with a spatial output .*valid: .*bn2"):
        run("explain", f"input={SEED_IMAGES / 'dog-from-unsplash.jpg'}", "target_layer=layer4", f"hydra.run.dir={tmp_path}")
    with pytest.raises(ConfigError, match=r"target: 'Zebra cat' is not a class"):
        run("explain", f"input={SEED_IMAGES / 'dog-from-unsplash.jpg'}", "target=Zebra cat", f"hydra.run.dir={tmp_path}")


@pytest.mark.parametrize("method", ["gradcam++", "scorecam"])
def test_other_methods_on_a_backbones_imagenet_head(method, tmp_path):
    require_shared()
    run(
        "explain",
        f"input={SEED_IMAGES / 'dog-from-unsplash.jpg'}",
        f"method={method}",
        "target=Italian greyhound",
        "backbone.input_size=96",  # Score-CAM scores one masked copy per channel (1,280 here)
        "batch_size=64",
        f"hydra.run.dir={tmp_path}",
    )
    cam = np.load(tmp_path / "dog-from-unsplash_cam.npy")
    assert cam.shape == (96, 96) and cam.std() > 0.05
    assert read_rows(tmp_path / "explain.csv")[0]["target"] == "Italian greyhound"


def _random_blocks(shape: tuple[int, int], fraction: float, cell: int, rng: np.random.Generator) -> np.ndarray:
    """keep-mask with `fraction` of the (cell x cell) blocks removed: the random baseline at the map's own resolution."""
    rows, cols = shape[0] // cell, shape[1] // cell
    removed = np.zeros(rows * cols, dtype=bool)
    removed[rng.permutation(rows * cols)[: round(fraction * rows * cols)]] = True
    return ~np.kron(removed.reshape(rows, cols), np.ones((cell, cell), dtype=bool))


def test_cam_is_faithful_removing_its_top_pixels_hurts_more_than_random_ones():
    """Deletion check over 13 sample photos (ImageNet head, its predicted class): mean-filling the 20 % highest-CAM
    pixels lowers the probability more than mean-filling 20 % of the pixels at random. The random pixels are drawn as
    blocks of the map's cell (32 px): single scattered pixels are high-frequency noise that no photo has, and hurt
    every class (measured: 0.30 mean drop, against 0.22 for the CAM's region and 0.05 for random blocks)."""
    from transferlab.insight.cam import CamExplainer, body_of, masked, target_layer
    from transferlab.insight.pixels import build_pixel_classifier, load_pixels

    require_shared()
    model = build_pixel_classifier(IMAGENET_LITE0, None)
    body = body_of(model)
    photos = sorted(PETS.glob("*.jpg"))[::30][:13]
    pixels = torch.stack([load_pixels(p, model.preprocessing) for p in photos])
    probs = model.probabilities(pixels)
    targets = probs.argmax(dim=1).tolist()
    explainer = CamExplainer(model, body, target_layer(body, model.input_size, None), "gradcam")
    maps = explainer(pixels, targets)
    explainer.close()
    rows = torch.arange(len(photos))
    base = probs[rows, targets]
    cam_removed = torch.stack([masked(pixels[i], maps[i] < np.quantile(maps[i], 0.8)) for i in range(len(photos))])
    cam_drop = float((base - model.probabilities(cam_removed)[rows, targets]).mean())
    random_drops = []
    for draw in range(5):
        rng = np.random.default_rng(draw)
        removed = torch.stack([masked(pixels[i], _random_blocks(maps[i].shape, 0.2, 32, rng)) for i in range(len(photos))])
        random_drops.append(float((base - model.probabilities(removed)[rows, targets]).mean()))
    assert cam_drop > max(random_drops), (cam_drop, random_drops)


def test_cam_mass_falls_on_the_cat_half_of_a_composite(species_run):
    """Left half a cat photo, right half a plain texture: the checkpoint's cat-class Grad-CAM mass lies on the left."""
    from transferlab.insight.cam import CamExplainer, body_of, target_layer
    from transferlab.insight.pixels import build_pixel_classifier, load_pixels

    model = build_pixel_classifier(None, str(species_run / "checkpoints" / "best.ckpt"))
    body = body_of(model)
    size = model.input_size
    rng = np.random.default_rng(1)
    explainer = CamExplainer(model, body, target_layer(body, size, None), "gradcam")
    shares = []
    for photo in pet_photos(True, 4):
        cat = load_pixels(photo, model.preprocessing)
        image = torch.empty(3, size, size)
        image[:, :, : size // 2] = torch.nn.functional.interpolate(cat[None], size=(size, size // 2), mode="bilinear", antialias=True)[0]
        image[:, :, size // 2 :] = (0.5 + 0.08 * torch.from_numpy(rng.standard_normal((3, size, size - size // 2)))).clamp(0, 1).float()
        cam = explainer(image[None], [model.class_names.index("cat")])[0]
        shares.append(float(cam[:, : size // 2].sum() / cam.sum()))
    explainer.close()
    assert min(shares) >= 0.7, shares


def test_cam_callback_draws_maps_every_epoch_and_at_the_end(tiny_folder, tmp_path):
    run(
        "train",
        "data=image_folder",
        f"data.root={tiny_folder}",
        "callbacks=cam",
        "callbacks.cam.num_images=2",
        "finetune.head_solver=sgd",
        "trainer.max_epochs=2",
        "logger=tensorboard",
        "interpret.enabled=false",
        *FAST,
        f"hydra.run.dir={tmp_path}",
    )
    for when in ("epoch_000", "epoch_001", "end"):
        assert len(list((tmp_path / "cams" / when).glob("*.png"))) == 2, when
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(next(tmp_path.rglob("events.out.tfevents.*")).parent), size_guidance={"images": 0})
    events.Reload()
    assert any(tag.startswith("cam") for tag in events.Tags()["images"]), events.Tags()["images"]
    assert not (tmp_path / "top_losses.png").exists() and (tmp_path / "report.html").is_file()  # interpret.enabled=false


# -- the interpretation of a run ---------------------------------------------------------------------------
def test_a_run_explains_its_errors(species_run):
    for name in ("top_losses.png", "most_confused.csv", "embedding_map.png", "report.html"):
        assert (species_run / name).is_file(), name
    predictions = read_rows(species_run / "test_predictions.csv")
    errors: dict[tuple[str, str], int] = {}
    for row in predictions:
        if row["label"] != row["predicted"]:
            errors[(row["label"], row["predicted"])] = errors.get((row["label"], row["predicted"]), 0) + 1
    confused = read_rows(species_run / "most_confused.csv")
    assert {(r["true"], r["predicted"]): int(r["count"]) for r in confused} == errors  # two classes: every error pair
    assert (species_run / "most_confused.png").is_file() == bool(errors)


def test_top_losses_and_confusions_are_ranked_from_the_probabilities():
    from transferlab.insight.interpretation import most_confused, top_losses

    labels = np.array([0, 1, 2, 1, 0])
    probs = np.array([[0.9, 0.05, 0.05], [0.7, 0.2, 0.1], [0.1, 0.1, 0.8], [0.6, 0.3, 0.1], [0.2, 0.1, 0.7]])
    assert top_losses(labels, probs, 3) == [1, 4, 3]  # p(true) 0.2, 0.2 (ties keep their order), then 0.3
    assert most_confused(labels, probs.argmax(axis=1), ["a", "b", "c"], 5) == [("b", "a", 2), ("a", "c", 1)]


@needs_browser
def test_run_report_renders_in_headless_chromium(species_run, tmp_path):
    page = species_run / "report.html"
    html = page.read_text()
    assert "http://" not in html and "https://" not in html and "<script" not in html
    assert "test/balanced_acc" in html and "95 % interval" in html
    console, widths = chromium_render(page, tmp_path / "report.png")
    assert not [m for m in console if m["level"] in ("SEVERE", "WARNING")], console
    assert len(widths) >= 4 and all(w > 0 for w in widths), widths  # confusion, reliability, top losses, embedding map


def test_without_the_insight_extra_maps_fail_in_one_line_and_the_gallery_shows_plain_images(monkeypatch, tmp_path, caplog):
    """pytorch-grad-cam absent (sys.modules[name] = None is how Python marks a module as not importable)."""
    from transferlab.core.errors import MissingPackage
    from transferlab.insight.interpretation import render_top_losses
    from transferlab.insight.pixels import build_pixel_classifier

    require_shared()
    monkeypatch.setitem(__import__("sys").modules, "pytorch_grad_cam", None)
    with pytest.raises(
        MissingPackage, match=r"method=gradcam \(class activation maps\) needs pytorch_grad_cam: pip install 'transferlab\[insight\]'"
    ):
        run("explain", f"input={SEED_IMAGES / 'dog-from-unsplash.jpg'}", f"hydra.run.dir={tmp_path / 'explain'}")
    model = build_pixel_classifier({**IMAGENET_LITE0, "input_size": 64}, None)
    photos = pet_photos(False, 2)
    probs = np.full((2, len(model.class_names)), 1 / len(model.class_names))
    with caplog.at_level("WARNING"):
        out = render_top_losses(model, photos, np.array([0, 1]), probs, [0, 1], "gradcam", tmp_path / "top_losses.png")
    assert out is not None and out.is_file() and "Top losses without class activation maps" in caplog.text


def test_target_layer_is_the_last_convolutional_stage_of_any_family():
    from transferlab.insight.cam import target_layer
    from transferlab.models.backbones import create_backbone

    for name, source, expected in (("resnet18", "torchvision", "layer4"), ("vgg16", "torchvision", "features"), ("resnet18", "timm", "layer4")):
        body = create_backbone(name, weights="none", source=source).body
        assert target_layer(body, 64, None) == expected, name
    # token models: the patch tokens entering the last block (its output's patch tokens never reach a class token)
    vit = create_backbone("vit_tiny_patch16_224", weights="none", source="timm").body
    assert target_layer(vit, 224, None) == "blocks.11.norm1"
    swin = create_backbone("swin_tiny_patch4_window7_224", weights="none", source="timm").body
    assert target_layer(swin, 224, None) == "layers.3"  # the last stage's tokens, channels-last [1, 7, 7, 768]
    with pytest.raises(
        ConfigError,
        match=r"'blocks.11.attn.k_norm' is not a layer with one token per patch .*did you mean: .*blocks.11.norm1.*valid: .*blocks.11, blocks, norm",
    ):
        target_layer(vit, 224, "blocks.11.attn.k_norm")
