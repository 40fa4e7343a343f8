"""Feature maps, ideal-class images and attacks: the pieces, the two commands, and the callbacks in real runs."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

from conftest import FAST, REPO, SEED_IMAGES, SHARED, read_metrics, read_wandb_log, run, run_cli, run_mains
from transferlab.core.errors import ConfigError
from transferlab.data.preprocessing import Preprocessing
from transferlab.insight.attacks import fgsm, parse_eps, pgd, targeted_attack
from transferlab.insight.feature_maps import check_layers, pick_layers
from transferlab.insight.pixels import (
    PixelClassifier,
    build_pixel_classifier,
    load_pixels,
    quantize,
    save_png,
    second_opinion,
    to_pixels,
    total_variation,
)
from transferlab.models.backbones import create_backbone

DOG = SEED_IMAGES / "dog-from-unsplash.jpg"
LESSON_CROP = [200, 20, 600, 420]


@pytest.fixture(scope="module")
def lite0() -> PixelClassifier:
    return build_pixel_classifier({"name": "tf_efficientnet_lite0", "weights": "bundled"}, None)


def reread(path: Path) -> torch.Tensor:
    with Image.open(path) as img:
        return to_pixels(img)


# -- pieces ------------------------------------------------------------------------------------------------
def test_parse_eps_accepts_fractions_and_names_the_key():
    assert parse_eps("4/255") == pytest.approx(4 / 255) and parse_eps(0) == 0 and parse_eps("0.5") == 0.5
    with pytest.raises(ConfigError, match="eps: 'four' is not a number"):
        parse_eps("four")
    with pytest.raises(ConfigError, match=r"must lie in \[0, 1\]"):
        parse_eps("2")


@pytest.mark.shared
def test_total_variation_matches_the_reference_figure():
    flat = torch.full((3, 8, 8), 0.5)
    stripes = torch.zeros(3, 8, 8)
    stripes[..., ::2] = 1.0
    assert float(total_variation(flat)) == 0.0
    assert float(total_variation(stripes)) == pytest.approx(1.0)  # every horizontal neighbour differs by 1
    with Image.open(SEED_IMAGES / "ideal-cat.png") as img:  # the figure for the lesson's picture: 0.059
        assert float(total_variation(to_pixels(img))) == pytest.approx(0.059, abs=5e-4)


@pytest.mark.shared
def test_lesson_ideal_cat_is_no_cat_to_efficientnet(lite0):
    """The reference point the ideal-class check is measured against (issue: Lite0 gives it 0.002)."""
    with Image.open(SEED_IMAGES / "ideal-cat.png") as img:
        pixels = to_pixels(img.convert("RGB").resize((224, 224), Image.Resampling.BICUBIC))
    assert float(lite0.probabilities(pixels[None])[0, 284]) < 0.05


def test_save_png_is_exact_8_bit(tmp_path):
    pixels = torch.rand(3, 20, 30)
    back = save_png(pixels, tmp_path / "x.png")
    assert torch.equal(back, quantize(pixels)) and torch.equal(reread(tmp_path / "x.png"), back)


def test_targets_by_name_synonym_and_index(lite0):
    assert lite0.resolve_target("Siamese cat") == lite0.resolve_target("siamese") == lite0.resolve_target(284) == 284
    assert lite0.resolve_target("zebra") == 340 and lite0.class_names[284] == "Siamese cat"
    with pytest.raises(ConfigError, match=r"target: 'siamse cat' is not a class .*did you mean: Siamese cat"):
        lite0.resolve_target("siamse cat")
    with pytest.raises(ConfigError, match="out of range 0..999"):
        lite0.resolve_target(1000)


@pytest.mark.shared
def test_load_pixels_crop_and_geometry(lite0):
    x = load_pixels(DOG, lite0.preprocessing, crop=LESSON_CROP)
    assert x.shape == (3, 224, 224) and torch.equal(x, quantize(x))
    with pytest.raises(ConfigError, match=r"crop: \[0, 0, 900, 10\] must be \[left, top, right, bottom\] inside the 640x427 image"):
        load_pixels(DOG, lite0.preprocessing, crop=[0, 0, 900, 10])


@pytest.mark.parametrize(
    "name,weights,expected",
    [
        ("tf_efficientnet_lite0", "bundled", ["blocks.1", "blocks.2", "blocks.4", "bn2"]),
        ("resnet18", "none", ["layer1", "layer2", "layer3", "layer4"]),
        ("vgg16", "none", ["features.15", "features.22", "features.29", "features"]),
    ],
)
def test_feature_layers_picked_by_output_stride(name, weights, expected):
    body = create_backbone(name, weights=weights).body
    assert pick_layers(body, 224) == expected
    with pytest.raises(ConfigError, match=r"callbacks.feature_maps.layers: no layer 'layer9' in the backbone.*; top-level modules: "):
        check_layers(body, ["layer9"], "callbacks.feature_maps.layers")


def _linear_model(seed: int = 0) -> PixelClassifier:
    torch.manual_seed(seed)
    net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 8 * 8, 3))
    return PixelClassifier(net, Preprocessing(input_size=8), ["a", "b", "c"]).eval()


def test_untargeted_attacks_respect_the_bound_and_pgd_is_at_least_as_strong():
    model = _linear_model()
    x = torch.rand(64, 3, 8, 8)
    y = model(x).argmax(-1)
    for eps in (1 / 255, 8 / 255, 32 / 255):
        for adv in (fgsm(model, x, y, eps), pgd(model, x, y, eps, steps=10), pgd(model, x, y, eps, steps=10, random_start=True)):
            assert (adv - x).abs().max() <= eps + 1e-6 and adv.min() >= 0 and adv.max() <= 1
        fooled_fgsm = (model(fgsm(model, x, y, eps)).argmax(-1) != y).sum()
        fooled_pgd = (model(pgd(model, x, y, eps, steps=10)).argmax(-1) != y).sum()
        assert fooled_pgd >= fooled_fgsm
    assert torch.equal(pgd(model, x, y, 0.0), x) and torch.equal(fgsm(model, x, y, 0.0), x)


def test_targeted_attack_stays_on_the_8_bit_grid_inside_fractional_bounds():
    model = _linear_model(1)
    x = quantize(torch.rand(3, 8, 8))
    result = targeted_attack(model, x, target=2, eps=1.5 / 255, steps=20)
    change = (result.adversarial - x) * 255
    assert torch.allclose(change, change.round(), atol=1e-4) and change.abs().max() <= 1 + 1e-4  # 1.5 levels -> 1 level
    assert result.target_prob == pytest.approx(float(model.probabilities(result.adversarial[None])[0, 2]))


# -- the commands ------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_visualize_ideal_siamese_cat_is_a_cat_to_a_held_out_network(tmp_path):
    """Bundled Lite0 ImageNet head, 224 px, CPU, <= 512 steps; judged on the saved PNG and by Lite1."""
    run(
        "visualize",
        "backbone=tf_efficientnet_lite0",
        "target=Siamese cat",
        "steps=256",
        "tv_weight=3.0",
        "heldout_backbone=tf_efficientnet_lite1",
        f"hydra.run.dir={tmp_path}",
    )
    result = json.loads((tmp_path / "result.json").read_text())
    assert {"target", "target_index", "target_prob", "top5", "steps", "seconds", "total_variation", "heldout_prob"} <= set(result)
    assert result["target"] == "Siamese cat" and result["target_index"] == 284 and result["steps"] <= 512
    image = reread(tmp_path / "ideal.png")
    assert image.shape == (3, 224, 224)
    lite0 = build_pixel_classifier({"name": "tf_efficientnet_lite0", "weights": "bundled"}, None)
    prob = float(lite0.probabilities(image[None])[0, 284])
    assert prob == pytest.approx(result["target_prob"], abs=1e-5) and prob >= 0.99
    assert float(total_variation(image)) == pytest.approx(result["total_variation"], abs=1e-6) and result["total_variation"] <= 0.06
    lite1 = second_opinion("tf_efficientnet_lite1")
    resized = torch.nn.functional.interpolate(image[None], size=240, mode="bicubic", antialias=True).clamp(0, 1)
    assert float(lite1.probabilities(resized)[0, 284]) == pytest.approx(result["heldout_prob"], abs=1e-5)
    assert result["heldout_prob"] >= 0.3, result["heldout"]  # the stretch goal: a cat to a network that never saw it made
    assert result["top5"][0]["name"] == "Siamese cat" and len(result["top5"]) == 5


@pytest.mark.shared
def test_attack_turns_the_lessons_dog_into_a_cat_within_one_level(tmp_path, lite0):
    run(
        "attack",
        "backbone=tf_efficientnet_lite0",
        f"input={DOG}",
        "crop=[200,20,600,420]",
        "target=Siamese cat",
        "eps=1/255",
        f"hydra.run.dir={tmp_path}",
    )
    result = json.loads((tmp_path / "result.json").read_text())
    assert {"source_label", "source_prob", "target", "target_prob", "linf", "l2", "steps"} <= set(result)
    original = load_pixels(DOG, lite0.preprocessing, crop=LESSON_CROP)
    assert torch.equal(reread(tmp_path / "original.png"), original)
    adversarial = reread(tmp_path / "adversarial.png")
    assert (adversarial - original).abs().max() <= 1 / 255 + 1e-6 and result["linf"] <= 1 / 255 + 1e-6
    prob = float(lite0.probabilities(adversarial[None])[0, 284])
    assert prob >= 0.95 and prob == pytest.approx(result["target_prob"], abs=1e-5)
    assert result["source_label"] != "Siamese cat" and lite0.top(original, 1)[0][0] == result["source_label"]
    assert result["l2"] == pytest.approx(float((adversarial - original).norm()), abs=1e-4)
    difference = reread(tmp_path / "difference.png")
    assert difference.shape == original.shape and difference.std() > 0.1  # amplified: the bound fills the range


@pytest.mark.shared
def test_commands_reject_bad_input_with_one_line(tmp_path):
    cases = [
        (["attack", f"input={tmp_path}/missing.jpg", "target=zebra"], "error: input: ", "does not exist"),
        (["attack", f"input={DOG}", "target=zebra", "eps=1/0"], "error: eps: '1/0' is not a number", ""),
        (["attack", f"input={DOG}", "target=zebra", "crop=[0,0,5000,10]"], "error: crop: [0, 0, 5000, 10] must be", "640x427"),
        (["visualize", "target=zebraa"], "error: target: 'zebraa' is not a class", "did you mean: zebra"),
        (["visualize", "target=cat", "ckpt_path=/nonexistent.ckpt"], "error: ckpt_path: /nonexistent.ckpt is not a file", ""),
    ]
    outcomes = run_mains([(module, [*overrides, f"hydra.run.dir={tmp_path}/{module}"]) for (module, *overrides), _, _ in cases], tmp_path)
    for ((_, *overrides), start, part), proc in zip(cases, outcomes):
        last = proc["stderr"].strip().splitlines()[-1]
        assert proc["code"] == 2 and last.startswith(start) and part in last, (overrides, proc["stderr"][-2000:])


# -- the callbacks -----------------------------------------------------------------------------------------
def test_picture_callbacks_write_to_run_dir_tensorboard_and_wandb(tiny_folder, tmp_path):
    run_cli(  # a real process: W&B writes its offline run to disk when the process winds it up
        "train",
        "callbacks=[feature_maps,ideal_class,adversarial]",
        "logger=many",
        f"paths.log_dir={tmp_path / 'logs'}",  # the MLflow store of logger=many
        "data=image_folder",
        f"data.root={tiny_folder}",
        "trainer.max_epochs=1",
        "callbacks.feature_maps.num_images=2",
        "callbacks.ideal_class.steps=4",
        "callbacks.adversarial.eps=[0,4/255]",
        "callbacks.adversarial.pgd_steps=2",
        f"hydra.run.dir={tmp_path}",
        *FAST,
    )
    layers = ["blocks.1", "blocks.2", "blocks.4", "bn2"]  # the automatic pick for EfficientNet-Lite0
    grids = sorted(p.name for p in (tmp_path / "feature_maps" / "start").glob("*.png"))
    assert grids == sorted([f"{k:02d}_{layer}.png" for k in range(2) for layer in layers] + [f"{k:02d}_lesson_view.png" for k in range(2)])
    assert not (tmp_path / "feature_maps" / "end").exists()  # frozen: the maps cannot change, drawn once
    ideal = json.loads((tmp_path / "ideal_class" / "result.json").read_text())
    assert set(ideal["classes"]) == {"cat", "dog"} and len(list((tmp_path / "ideal_class").glob("*.png"))) == 2
    metrics = read_metrics(tmp_path)
    assert metrics["adv/fgsm_acc@eps=0/255"] == metrics["adv/pgd_acc@eps=0/255"] == pytest.approx(metrics["test/acc"])
    assert {"adv/fgsm_acc@eps=4/255", "adv/pgd_acc@eps=4/255"} <= set(metrics)
    assert (tmp_path / "adversarial" / "adversarial_accuracy.png").is_file()

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(tmp_path / "tensorboard"), size_guidance={"images": 0})
    events.Reload()
    images = set(events.Tags()["images"])
    for layer in layers:
        assert len([t for t in images if t.startswith(f"feature_maps/{layer}/")]) == 2, images
    assert {"ideal_class/cat", "ideal_class/dog", "adv/accuracy_vs_eps"} <= images

    records = read_wandb_log(next((tmp_path / "wandb").glob("offline-run-*/*.wandb")))
    logged = {}  # image key -> number of images (W&B stores an image list as nested keys: <key>/count, ...)
    for r in records:
        if r.WhichOneof("record_type") == "history":
            for item in r.history.item:
                if list(item.nested_key[-1:]) == ["count"]:
                    logged["/".join(item.nested_key[:-1])] = json.loads(item.value_json)
    assert {f"feature_maps/{layer}": 2 for layer in layers}.items() <= logged.items()
    assert logged.get("ideal_class") == 2 and logged.get("adv/accuracy_vs_eps") == 1
    media = list((tmp_path / "wandb").glob("offline-run-*/files/media/images/feature_maps/*.png"))
    assert len(media) == 2 * len(layers)


BAD_CALLBACK_SETTINGS = [
    (
        ["callbacks=feature_maps", "callbacks.feature_maps.layers=[blocks.9]"],
        "error: callbacks.feature_maps.layers: no layer 'blocks.9'",
        "top-level modules: conv_stem, bn1, blocks, conv_head, bn2",
    ),
    (
        ["callbacks=ideal_class", "callbacks.ideal_class.classes=[cot]"],
        "error: callbacks.ideal_class.classes: 'cot' is not a class",
        "did you mean: cat",
    ),
]


@pytest.fixture(scope="module")
def bad_callback_outcomes(tiny_folder, tmp_path_factory) -> tuple[Path, list[dict]]:
    base = tmp_path_factory.mktemp("bad_callbacks")
    return base, run_mains(
        [
            ("train", [*overrides, "data=image_folder", f"data.root={tiny_folder}", f"hydra.run.dir={base / str(i)}", *FAST])
            for i, (overrides, _, _) in enumerate(BAD_CALLBACK_SETTINGS)
        ],
        base,
    )


@pytest.mark.parametrize("case", range(len(BAD_CALLBACK_SETTINGS)), ids=["feature_maps layers", "ideal_class classes"])
def test_bad_picture_callback_settings_fail_at_start(bad_callback_outcomes, case):
    (base, outcomes), (_, start, part) = bad_callback_outcomes, BAD_CALLBACK_SETTINGS[case]
    proc = outcomes[case]
    last = proc["stderr"].strip().splitlines()[-1]
    assert proc["code"] == 2 and last.startswith(start) and part in last, proc["stderr"][-2000:]
    assert not (base / str(case) / "checkpoints").exists()  # nothing trained


@pytest.mark.slow
def test_adversarial_accuracy_on_the_species_classifier(species_run, tmp_path):
    """clean >= FGSM >= PGD at every eps (within one image), and PGD accuracy never rises with eps."""
    run(
        "eval",
        f"ckpt_path={species_run}/checkpoints/best.ckpt",
        "callbacks=adversarial",
        "callbacks.progress_bar=null",
        "callbacks.adversarial.max_images=32",
        "trainer.enable_progress_bar=false",
        f"hydra.run.dir={tmp_path}",
    )
    metrics = read_metrics(tmp_path)
    grid = ["0", "1", "2", "4", "8"]
    clean = metrics["adv/fgsm_acc@eps=0/255"]
    fgsm_acc = [metrics[f"adv/fgsm_acc@eps={k}/255"] for k in grid]
    pgd_acc = [metrics[f"adv/pgd_acc@eps={k}/255"] for k in grid]
    one = 1 / 32
    assert clean >= 0.9 and pgd_acc[0] == clean
    for f, p in zip(fgsm_acc, pgd_acc):
        assert clean + 1e-9 >= f - one and f >= p - one, (fgsm_acc, pgd_acc)
    assert all(b <= a + one for a, b in zip(pgd_acc, pgd_acc[1:])), pgd_acc
    assert pgd_acc[-1] < clean - 0.3  # 8/255 breaks an undefended classifier
    rows = (tmp_path / "adversarial" / "adversarial.csv").read_text().splitlines()
    assert rows[0] == "attack,eps,eps_255,accuracy,correct,images" and len(rows) == 11 and rows[1].endswith(",32")


@pytest.mark.shared
@pytest.mark.slow
def test_lesson_comparison_script_measures_both_sides(tmp_path):
    """scripts/lesson_comparison.py (the README's pictures), with few steps: our pictures + the table, lesson's not copied."""
    subprocess.run(
        [sys.executable, str(REPO / "scripts" / "lesson_comparison.py"), "--shared", str(SHARED.parent), "--out", str(tmp_path), "--steps", "8"],
        check=True,
        capture_output=True,
        text=True,
        timeout=900,
    )
    committed = sorted(p.name for p in tmp_path.glob("*.png"))
    assert committed == ["adversarial_dog_difference.png", "ideal_cat.png", "ideal_zebra.png"]
    assert sorted(p.name for p in (tmp_path / "side_by_side").glob("*.png")) == ["adversarial_dog.png", "ideal_cat.png", "ideal_zebra.png"]
    table = (tmp_path / "comparison.md").read_text().splitlines()
    assert len(table) == 8 and "| ideal Siamese cat | lesson (VGG-16) | 0.00" in table[2] and "| 0.059 |" in table[2]


@pytest.mark.shared
def test_visualize_and_attack_a_trained_checkpoint(species_run, tmp_path):
    """The same commands on a transferlab classifier: its own classes (cat, dog) instead of ImageNet's."""
    ckpt = f"ckpt_path={species_run}/checkpoints/best.ckpt"
    run("visualize", ckpt, "target=cat", "steps=32", f"hydra.run.dir={tmp_path / 'ideal'}")
    ideal = json.loads((tmp_path / "ideal" / "result.json").read_text())
    assert (ideal["target"], ideal["target_index"]) == ("cat", 0) and ideal["target_prob"] >= 0.9 and len(ideal["top5"]) == 2
    dog = next(p for p in sorted((SHARED / "oxford-pets-sample").glob("*.jpg")) if p.name[0].islower())
    run("attack", ckpt, f"input={dog}", "target=cat", "eps=2/255", "steps=50", f"hydra.run.dir={tmp_path / 'attack'}")
    attack = json.loads((tmp_path / "attack" / "result.json").read_text())
    assert attack["source_label"] == "dog" and attack["target"] == "cat" and attack["target_prob"] >= 0.9
    assert attack["linf"] <= 2 / 255 + 1e-6
