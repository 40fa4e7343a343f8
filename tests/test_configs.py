"""Every option of every config group, and every experiment preset, composes, validates and instantiates."""

from __future__ import annotations

from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.core.hydra_config import HydraConfig
from hydra.utils import instantiate
from omegaconf import OmegaConf, open_dict

from transferlab.cli.app import group_options
from transferlab.config.paths import config_dir
from transferlab.config.validation import validate
from transferlab.core.errors import ConfigError
from transferlab.data.base import ImageClassificationDataModule
from transferlab.models.backbones import create_backbone
from transferlab.training.builders import instantiate_group
from transferlab.training.loggers import resolve_logger_config
from transferlab.training.performance import resolve_precision

CONF = Path(config_dir())
GROUPS = ["data", "backbone", "finetune", "optimizer", "scheduler", "trainer", "performance", "logger", "callbacks", "experiment", "hparams_search"]


def options(group: str) -> list[str]:
    return [o for o in group_options(CONF / group) if "/" not in o]


def compose_train(tmp_path: Path, *overrides: str, validated: bool = True):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose("train", overrides=[f"hydra.run.dir={tmp_path}", "data.root=/nonexistent", *overrides], return_hydra_config=True)
    with open_dict(cfg):
        cfg.hydra.runtime.output_dir = str(tmp_path)
    HydraConfig.instance().set_config(cfg)
    with open_dict(cfg):
        del cfg["hydra"]
    if validated:
        validate(cfg, "train")  # before the auto values are resolved, as the command does
    resolve_logger_config(cfg.logger, "test")
    resolve_precision(cfg)  # trainer.precision=auto -> what this machine runs fastest, as train() does
    return cfg


CASES = [(g, o) for g in GROUPS for o in options(g)]


def test_every_group_has_options():
    assert all(options(g) for g in GROUPS)
    assert {
        "pets_lite0_frozen",
        "cats_dogs_lite0_frozen",
        "cats_dogs_vgg16_frozen",
        "cats_dogs_vgg16_finetune",
        "cats_dogs_mobilenet_v2_frozen",
        "pets_resnet50_frozen",
        "pets_resnet50_finetune",
    } <= set(options("experiment"))


@pytest.mark.parametrize("group,option", CASES, ids=[f"{g}={o}" for g, o in CASES])
def test_option_composes_and_instantiates(tmp_path, group, option):
    overrides = [f"{group}={option}"]
    if (group, option) == ("backbone", "custom"):
        overrides.append("backbone.name=convnext_tiny")
    if (group, option) == ("data", "hf_dataset"):
        overrides.append("data.path=microsoft/cats_vs_dogs")
    cfg = compose_train(tmp_path, *overrides)

    datamodule = instantiate(cfg.data)
    assert isinstance(datamodule, ImageClassificationDataModule)
    # 112 px: a size every family takes (a multiple of 14 and 16 patches); vision transformers are built for it
    backbone = create_backbone(**{**OmegaConf.to_container(cfg.backbone, resolve=True), "weights": "none", "input_size": 112})
    assert backbone(torch.zeros(1, 3, 112, 112)).shape == (1, backbone.num_features)
    optimizer = instantiate(cfg.optimizer)(params=[torch.nn.Parameter(torch.zeros(1))])
    if cfg.scheduler.get("_target_"):
        at_run = {"total_steps": 100, "epochs": 10} if cfg.scheduler.get("interval") == "step" else {}  # from the trainer
        instantiate(cfg.scheduler)(optimizer=optimizer, **at_run)
    trainer_cfg = OmegaConf.merge(cfg.trainer, {"accelerator": "cpu"} if cfg.trainer.accelerator == "gpu" else {})
    if trainer_cfg.get("devices") == -1:
        trainer_cfg.devices = 2
    trainer = instantiate(
        trainer_cfg, callbacks=instantiate_group(cfg.callbacks, "callbacks"), logger=instantiate_group(cfg.logger, "logger") or False
    )
    assert isinstance(trainer, pl.Trainer)
    assert trainer.max_epochs == cfg.trainer.max_epochs


def test_backbone_presets_carry_their_preprocessing():
    resnet = create_backbone("resnet50", weights="none")
    assert (resnet.preprocessing.input_size, resnet.preprocessing.interpolation) == (224, "bilinear")
    assert resnet.num_features == 2048 and len(resnet.categories) == 1000
    vgg = create_backbone("vgg16", weights="none")
    assert vgg.num_features == 4096 and vgg.imagenet_head.out_features == 1000
    lite = create_backbone("tf_efficientnet_lite0", weights="none")
    assert (lite.preprocessing.interpolation, lite.preprocessing.mean, lite.preprocessing.crop_pct) == ("bicubic", (0.5, 0.5, 0.5), 0.875)
    assert create_backbone("tf_efficientnet_lite0", weights="none", input_size=96).preprocessing.input_size == 96


@pytest.mark.parametrize(
    "override,message",
    [
        ("data.batch_size=abc", "data.batch_size: expected int"),
        ("trainer.max_epochs=ten", "trainer.max_epochs: expected"),
        ("finetune.mode=freeze", "did you mean: frozen"),
        ("seed=abc", "seed: expected int"),
        ("+data.batchsize=8", "data.batchsize: unknown key (did you mean: batch_size"),
        ("+trainer.max_epoch=3", "did you mean: max_epochs"),
        ("finetune=gradual finetune.unfreeze_at_epoch=null", "finetune.unfreeze_at_epoch"),
    ],
)
def test_validation_names_the_key(tmp_path, override, message):
    cfg = compose_train(tmp_path, *override.split(), validated=False)
    with pytest.raises(ConfigError, match=None) as info:
        validate(cfg, "train")
    assert message in str(info.value)
    assert "\n" not in str(info.value)


# The lesson's pictures: presets for transferlab-visualize / transferlab-attack (experiments/lesson/).
LESSON_PRESETS = {"lesson/ideal_cat": "visualize", "lesson/ideal_zebra": "visualize", "lesson/adversarial_dog": "attack"}


def test_every_lesson_preset_is_known():
    found = {f"lesson/{p.stem}" for p in (CONF / "experiment" / "lesson").glob("*.yaml")}
    assert found == set(LESSON_PRESETS)


@pytest.mark.shared  # the attack preset names the lesson's dog photo in ../shared
@pytest.mark.parametrize("preset,command", sorted(LESSON_PRESETS.items()))
def test_lesson_presets_compose_for_their_command(tmp_path, preset, command):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose(command, overrides=[f"experiment={preset}", f"hydra.run.dir={tmp_path}"])
    assert cfg.target and cfg.backbone.weights == "bundled"
    if command == "attack":
        from transferlab.insight.attacks import parse_eps

        assert Path(cfg.input).is_file() and parse_eps(cfg.eps) == pytest.approx(1 / 255) and list(cfg.crop) == [200, 20, 600, 420]
    else:
        assert cfg.steps <= 512 and cfg.heldout_backbone == "tf_efficientnet_lite1"
