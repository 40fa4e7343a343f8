"""The fine-tuning recipe (EMA, mixup / cutmix, label smoothing, policies, layer decay, warm-up), test-time
augmentation and the learning-rate finder: each on real runs where it matters."""

from __future__ import annotations

import math

import pytest
import torch

from conftest import FAST, read_metrics, run
from transferlab.models.classifier import load_checkpoint
from transferlab.models.optimization import WarmupCosine, parameter_groups
from transferlab.models.regularization import batch_mixer
from transferlab.models.tta import averaged_logits, views

pytestmark = pytest.mark.shared


def test_ema_weights_differ_from_the_raw_ones_and_are_the_ones_saved_and_loaded(tiny_folder, tmp_path):
    run(
        "train",
        "data=image_folder",
        f"data.root={tiny_folder}",
        "finetune=full",
        "finetune.ema_decay=0.9",
        "trainer.max_epochs=2",
        f"hydra.run.dir={tmp_path}",
        *FAST,
    )
    checkpoint = torch.load(tmp_path / "checkpoints" / "best.ckpt", weights_only=True, map_location="cpu")
    averaged, raw = checkpoint["state_dict"], checkpoint["current_model_state"]
    moved = [k for k in averaged if averaged[k].is_floating_point() and not torch.equal(averaged[k], raw[k])]
    assert "head.1.weight" in moved and any(k.startswith("backbone.") for k in moved)
    model, _ = load_checkpoint(tmp_path / "checkpoints" / "best.ckpt")
    loaded = model.state_dict()
    assert all(torch.equal(loaded[k], averaged[k]) for k in moved)  # eval, predict and export get the average
    assert read_metrics(tmp_path)["test/acc"] >= 0.0


def test_mixup_and_cutmix_touch_training_batches_only(tiny_folder, tmp_path):
    from faults import MixerSpy

    MixerSpy.calls.clear()
    MixerSpy.batches.clear()
    run(
        "train",
        "data=image_folder",
        f"data.root={tiny_folder}",
        "finetune=full",
        "finetune.mixup=0.4",
        "finetune.cutmix=1.0",
        "finetune.label_smoothing=0.1",
        "trainer.max_epochs=2",
        "+callbacks.spy._target_=faults.MixerSpy",
        f"hydra.run.dir={tmp_path}",
        *FAST,
    )
    assert MixerSpy.batches["train"] >= 2 and MixerSpy.batches["validate"] >= 1 and MixerSpy.batches["test"] >= 1
    assert MixerSpy.calls == ["train"] * MixerSpy.batches["train"]  # once per training batch, never in val / test


def test_batch_mixer_gives_soft_labels_that_sum_to_one():
    torch.manual_seed(0)
    mixer = batch_mixer(0.4, 1.0, num_classes=3)
    assert mixer is not None and batch_mixer(0, None, 3) is None
    images, labels = torch.rand(8, 3, 16, 16), torch.randint(0, 3, (8,))
    mixed, soft = mixer(images, labels)
    assert mixed.shape == images.shape and soft.shape == (8, 3)
    assert torch.allclose(soft.sum(dim=1), torch.ones(8)) and not torch.equal(mixed, images)


def test_hflip_tta_of_a_symmetric_image_equals_the_plain_prediction(species_run):
    model, _ = load_checkpoint(species_run / "checkpoints" / "best.ckpt")
    from PIL import Image

    from conftest import pet_photos

    photo = next(iter(pet_photos(True, 1)))
    image = model.backbone.preprocessing.eval_transform()(Image.open(photo).convert("RGB"))[None]
    symmetric = (image + image.flip(-1)) / 2
    with torch.inference_mode():
        plain = model(symmetric).softmax(dim=-1)
        flipped = averaged_logits(model, symmetric, "hflip").softmax(dim=-1)
        five = averaged_logits(model, image, "five_crop").softmax(dim=-1)
    assert torch.allclose(plain, flipped, atol=1e-5)
    assert len(views(image, "five_crop")) == 6 and torch.allclose(five.sum(dim=-1), torch.ones(1))
    with pytest.raises(ValueError, match="tta="):
        views(image, "rotate")


def test_tta_runs_in_eval_and_predict(species_run, tiny_folder, tmp_path):
    import csv

    ckpt = species_run / "checkpoints" / "best.ckpt"
    plain = read_metrics(species_run)
    found = run("eval", f"ckpt_path={ckpt}", "tta=hflip", "logger=none", f"hydra.run.dir={tmp_path / 'eval'}")
    assert found["test/acc"] >= plain["test/acc"] - 0.05  # the same model, two views per image
    out = tmp_path / "predictions.csv"
    run("predict", f"ckpt_path={ckpt}", f"input={tiny_folder}", f"output={out}", "tta=five_crop", f"hydra.run.dir={tmp_path / 'predict'}")
    rows = list(csv.DictReader(out.open()))
    assert len(rows) == 16 and sum(row["label"] == row["path"].split("/")[-2] for row in rows) >= 13


def test_lr_finder_writes_its_plot_and_sets_the_lr(tiny_folder, tmp_path):
    run(
        "train",
        "data=image_folder",
        f"data.root={tiny_folder}",
        "finetune.head_solver=sgd",
        "tune.lr_find=true",
        "trainer.max_epochs=1",
        f"hydra.run.dir={tmp_path}",
        *FAST,
    )
    metrics = read_metrics(tmp_path)
    assert (tmp_path / "lr_find.png").stat().st_size > 1000
    checkpoint = torch.load(tmp_path / "checkpoints" / "best.ckpt", weights_only=True, map_location="cpu")
    used = checkpoint["hyper_parameters"]["optimizer"]["lr"]
    assert used == pytest.approx(metrics["tune/lr"]) and used != pytest.approx(1e-3)  # the suggestion, not adam.yaml's


def test_warmup_cosine_warms_up_then_decays_every_group_alike():
    params = [torch.nn.Parameter(torch.zeros(1)), torch.nn.Parameter(torch.zeros(1))]
    optimizer = torch.optim.SGD([{"params": [params[0]], "lr": 1.0}, {"params": [params[1]], "lr": 0.1}])
    schedule = WarmupCosine(optimizer, total_steps=100, epochs=10, interval="step", warmup_epochs=1, warmup_start=0.01, min_ratio=0.01)
    seen = []
    for _ in range(100):
        seen.append([g["lr"] for g in optimizer.param_groups])
        optimizer.step()
        schedule.step()
    assert seen[0][0] == pytest.approx(0.01) and seen[10][0] == pytest.approx(1.0)
    assert all(b <= a + 1e-12 for a, b in zip([s[0] for s in seen[10:]], [s[0] for s in seen[11:]]))
    assert seen[99][0] == pytest.approx(0.01 + 0.99 * 0.5 * (1 + math.cos(math.pi * 89 / 90)))
    assert all(s[1] == pytest.approx(s[0] * 0.1) for s in seen)


def test_layer_decay_gives_lower_layers_smaller_learning_rates():
    from transferlab.models.backbones import create_backbone

    body = create_backbone("tf_efficientnet_lite0", weights="none", source="timm").body
    head = torch.nn.Linear(1280, 2)
    hparams = {"optimizer": {"lr": 1e-3, "weight_decay": 0.05}, "finetune": {"backbone_lr_factor": 0.5, "layer_decay": 0.8}}
    groups = parameter_groups(head, body, hparams, backbone_trains=True)
    assert groups[0]["lr"] == 1e-3
    by_name = {id(p): n for n, p in body.named_parameters()}
    lr_of = {by_name[id(p)]: g["lr"] for g in groups[1:] for p in g["params"]}
    assert len(lr_of) == sum(1 for p in body.parameters())  # every backbone parameter once
    assert lr_of["conv_stem.weight"] < lr_of["blocks.3.0.conv_pw.weight"] < lr_of["conv_head.weight"] == pytest.approx(5e-4)
    assert any(g.get("weight_decay") == 0.0 for g in groups[1:])  # norms and biases: no weight decay
    flat = parameter_groups(head, body, {**hparams, "finetune": {"backbone_lr_factor": 0.5, "layer_decay": None}}, backbone_trains=True)
    assert len(flat) == 2 and flat[1]["lr"] == 5e-4


@pytest.mark.parametrize("policy", ["randaugment", "trivialaugment", "autoaugment"])
def test_augmentation_policies_run_on_bicubic_backbones(policy):
    from PIL import Image

    from conftest import pet_photos
    from transferlab.data.preprocessing import Preprocessing

    prep = Preprocessing(input_size=64, interpolation="bicubic")
    photo = next(iter(pet_photos(False, 1)))
    out = prep.train_transform({"scale_min": 0.5, "hflip": True, "policy": policy})(Image.open(photo).convert("RGB"))
    assert out.shape == (3, 64, 64) and out.dtype == torch.float32
