"""Every experiment preset runs: one batch of its command, in this process, offline, on a generated image folder.

The presets are listed from conf/experiment/ itself (a link to experiments/, subfolders included), so a new preset
is smoke-tested without an edit here; the command each one is for (train, visualize, attack) is the one whose config
it composes and validates with. What keeps it to one batch and offline, and nothing else, is overridden:
one training batch of one epoch (`+trainer.limit_train_batches=1`; see ONE_BATCH for why not fast_dev_run), 64 px inputs, `backbone.weights=none` where the
weights would be downloaded, a generated folder where the data would be, `cv.folds=null`, two optimisation steps for
the pictures. The preset's own backbone, fine-tuning mode, head solver, data module and task, callbacks and
calibration stay as it chose them, and each run must leave what the preset's documented result is read from.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf, open_dict
from PIL import Image

from canvases import write_voc_folder
from conftest import read_metrics
from transferlab import api
from transferlab.config.paths import config_dir
from transferlab.config.validation import validate

CONF = Path(config_dir())
PRESET_DIR = CONF / "experiment"
PRESETS = sorted(p.relative_to(PRESET_DIR).with_suffix("").as_posix() for p in PRESET_DIR.rglob("*.yaml"))

# A few breeds of each species, named as Oxford-IIIT Pet names its photos (capitalised = a cat breed).
PET_BREEDS = ("Abyssinian", "Bengal", "beagle", "pug")
PER_CLASS = 8
SIZE = 64
# One training batch per epoch, one epoch; the (few) validation and test images all evaluated. Not Lightning's
# `+trainer.fast_dev_run=1`: it switches checkpointing off, so an epoch-trained head's run selects no best.ckpt
# (training/fit.py, selected_checkpoint() is None) and tests weights nobody selected; nor `limit_test_batches`:
# the test report wants a prediction for every test image (training/artifacts.py raises "8 predictions for 28 images").
ONE_BATCH = [
    "+trainer.limit_train_batches=1",
    "data.num_workers=0",
    "data.batch_size=8",
    "callbacks.progress_bar=null",
    "trainer.enable_progress_bar=false",
]
PICTURE_STEPS = 2  # visualize / attack: optimisation steps


def _command_names() -> list[str]:
    """The commands that take `experiment=<preset>`: those whose conf/<command>.yaml has the group in its defaults."""
    found = []
    for path in sorted(CONF.glob("*.yaml")):
        defaults = OmegaConf.to_container(OmegaConf.load(path)).get("defaults") or []
        if any(isinstance(d, dict) and "experiment" in d for d in defaults):
            found.append(path.stem)
    return found


COMMANDS = _command_names()


def _image(rng: np.random.Generator, colour: tuple[int, int, int]) -> Image.Image:
    """A noisy patch of one colour per class: a valid JPEG the whole pipeline decodes, no photo needed."""
    pixels = np.clip(np.asarray(colour, np.float32) + rng.normal(0, 40, (SIZE, SIZE, 3)), 0, 255).astype(np.uint8)
    return Image.fromarray(pixels)


@pytest.fixture(scope="module")
def generated(tmp_path_factory) -> dict[str, Path]:
    """One generated folder per layout the data modules read: Oxford-IIIT Pet's flat `Breed_N.jpg` files,
    Cats-vs-Dogs' PetImages/Cat and PetImages/Dog, image_folder's one folder per class; and a photo to attack."""
    root, rng = tmp_path_factory.mktemp("generated"), np.random.default_rng(0)
    colours = [(200, 60, 60), (60, 200, 60), (60, 60, 200), (200, 200, 60)]
    folders = {"pets": root / "pets", "cats_dogs": root / "cats_dogs", "image_folder": root / "image_folder"}
    folders["pets"].mkdir()
    for breed, colour in zip(PET_BREEDS, colours):
        for i in range(PER_CLASS):
            image = _image(rng, colour)
            image.save(folders["pets"] / f"{breed}_{i + 1}.jpg", quality=90)
            species = "Cat" if breed[0].isupper() else "Dog"
            for folder in (folders["cats_dogs"] / "PetImages" / species, folders["image_folder"] / species.lower()):
                folder.mkdir(parents=True, exist_ok=True)
                image.save(folder / f"{breed}_{i + 1}.jpg", quality=90)
    photo = root / "photo.jpg"
    Image.fromarray(rng.integers(0, 256, (480, 640, 3), dtype=np.uint8)).save(photo, quality=90)
    return {**folders, "photo": photo, "voc2007": write_voc_folder(root / "voc")}


@pytest.fixture(autouse=True)
def _restored_process_state() -> Iterator[None]:
    """api.train / api.run change process-wide state (deterministic mode, environment, Hydra's config): undone
    after each preset, as conftest.run does, so the presets cannot leak into each other or the suite."""
    environ, deterministic = dict(os.environ), torch.are_deterministic_algorithms_enabled()
    yield
    torch.use_deterministic_algorithms(deterministic)
    os.environ.clear()
    os.environ.update(environ)
    HydraConfig.instance().cfg = None  # type: ignore[assignment]


def composed(command: str, preset: str, out: Path, *overrides: str) -> DictConfig:
    """The preset's config for `command`, as the command composes it (hydra node removed), validated."""
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose(command, overrides=[f"experiment={preset}", f"hydra.run.dir={out}", *overrides], return_hydra_config=True)
    with open_dict(cfg):
        cfg.hydra.runtime.output_dir = str(out)
    HydraConfig.instance().set_config(cfg)
    with open_dict(cfg):
        del cfg["hydra"]
    validate(cfg, command)
    return cfg


def own_keys(command: str, out: Path) -> set[str]:
    """The top-level keys of the command's own config (no preset)."""
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return set(compose(command, overrides=[f"hydra.run.dir={out}"]))


def command_of(preset: str, out: Path) -> str:
    """The one command the preset is for: its config composes and validates with the preset, and has every top-level
    key the preset sets (validation lets unknown top-level keys through, so `target:` alone does not rule out train)."""
    keys = set(OmegaConf.load(PRESET_DIR / f"{preset}.yaml")) - {"defaults"}
    accepted = []
    for command in COMMANDS:
        if not keys <= own_keys(command, out):
            continue
        composed(command, preset, out)  # raises: the preset does not compose or validate for its own command
        accepted.append(command)
    assert len(accepted) == 1, f"experiment={preset} (keys {sorted(keys)}) fits {accepted or 'none'} of {COMMANDS}; a preset is for one command"
    return accepted[0]


def preset_choice(preset: str, group: str) -> str | None:
    """The option the preset file itself picks for a group (`override /backbone: vgg16`), read from the file."""
    defaults = OmegaConf.to_container(OmegaConf.load(PRESET_DIR / f"{preset}.yaml")).get("defaults") or []
    return next((d[f"override /{group}"] for d in defaults if isinstance(d, dict) and f"override /{group}" in d), None)


def offline_weights(weights: str) -> bool:
    return weights in ("bundled", "none") or Path(weights).expanduser().is_file()


def data_overrides(cfg: DictConfig, generated: dict[str, Path]) -> list[str]:
    """The generated folder where the preset's data would be downloaded (its data module and task kept)."""
    root, downloads = Path(str(cfg.data.root)).resolve(), Path(str(cfg.paths.data_dir)).resolve()
    if root.exists() and downloads not in (root, *root.parents):
        return []  # data that ships offline (quickstart: the photos inside the package), not a download folder that
        # another test of this worker may have left (empty) under paths.data_dir
    layout = {
        "transferlab.data.oxford_pets.OxfordPetsDataModule": "pets",
        "transferlab.data.cats_dogs.CatsDogsDataModule": "cats_dogs",
        "transferlab.data.image_folder.ImageFolderDataModule": "image_folder",
        "transferlab.data.voc2007.Voc2007DataModule": "voc2007",
    }.get(cfg.data._target_)
    assert layout, f"no generated folder for {cfg.data._target_}: add its layout to tests/test_presets.py"
    return [f"data.root={generated[layout]}", "data.download=false"]


def train_overrides(cfg: DictConfig, generated: dict[str, Path]) -> list[str]:
    # gradual: the epoch after the unfreeze too, so the backbone trains for one batch
    epochs = int(cfg.finetune.unfreeze_at_epoch) + 1 if cfg.finetune.mode == "gradual" else 1
    overrides = [*ONE_BATCH, f"trainer.max_epochs={epochs}", "cv.folds=null", "interpret.enabled=false", *data_overrides(cfg, generated)]
    if cfg.backbone.input_size is None or cfg.backbone.input_size > SIZE:
        overrides.append(f"backbone.input_size={SIZE}")
    if not offline_weights(str(cfg.backbone.weights)):
        overrides.append("backbone.weights=none")
    if cfg.finetune.get("head_solver") == "lbfgs" and cfg.finetune.get("select_c") == "cv":
        overrides.append("finetune.c_folds=2")  # the inner cross-validation kept, with the fewest folds
    callbacks = cfg.callbacks
    if callbacks.get("ideal_class"):
        overrides += ["callbacks.ideal_class.steps=2", "callbacks.ideal_class.views=1"]
    if callbacks.get("adversarial"):
        overrides += ["callbacks.adversarial.pgd_steps=1", "callbacks.adversarial.max_images=4"]
    if callbacks.get("feature_maps"):
        overrides.append("callbacks.feature_maps.num_images=1")
    return overrides


def expected_metrics(cfg: DictConfig, classes: int) -> set[str]:
    """What the presets' documented results are read from, for this config."""
    if cfg.data.get("task") == "multilabel":
        return {"val/map", "test/map", "test/map_ci95", "test/f1_micro", "test/f1_macro", "test/ece", "test/nll", "epochs"}
    keys = {"val/acc", "test/acc", "test/acc_ci95", "test/balanced_acc", "test/ece", "test/nll", "epochs"}
    if classes > 3:
        keys.add("test/acc_top3")
    if cfg.calibration == "temperature":
        keys.add("calibration/temperature")
    adversarial = cfg.callbacks.get("adversarial")
    if adversarial:
        from transferlab.callbacks.adversarial import eps_label
        from transferlab.insight.attacks import parse_eps

        keys |= {f"adv/{a}_acc@eps={eps_label(parse_eps(e))}" for a in adversarial.attacks for e in adversarial.eps}
    return keys


def check_train(preset: str, cfg: DictConfig, result: api.Result) -> None:
    ran = OmegaConf.load(result.run_dir / "config.yaml")
    backbone, finetune = preset_choice(preset, "backbone"), preset_choice(preset, "finetune")
    if backbone:
        assert ran.backbone.name == OmegaConf.load(CONF / "backbone" / f"{backbone}.yaml").name
    if finetune:
        assert ran.finetune.mode == OmegaConf.load(CONF / "finetune" / f"{finetune}.yaml").get("mode", ran.finetune.mode)
    assert ran.data._target_ == cfg.data._target_ and ran.data.get("task") == cfg.data.get("task")
    assert result.best_checkpoint is not None and result.best_checkpoint.is_file()
    hparams = torch.load(result.best_checkpoint, map_location="cpu", weights_only=False)["hyper_parameters"]
    classes = len(hparams["class_names"])
    expected = {"species": 2, "breeds": len(PET_BREEDS)}.get(str(cfg.data.get("task")), classes)
    assert classes == expected, hparams["class_names"]
    metrics = read_metrics(result.run_dir)
    missing = expected_metrics(cfg, classes) - set(metrics)
    assert not missing, f"{preset}: metrics.json lacks {sorted(missing)}"
    assert 0.0 <= metrics["test/map" if cfg.data.get("task") == "multilabel" else "test/acc"] <= 1.0
    for name in ("ideal_class", "feature_maps"):
        node = cfg.callbacks.get(name)
        if node:
            assert any(Path(str(node.dirpath).replace(str(cfg.paths.output_dir), str(result.run_dir))).rglob("*.png")), name


def check_picture(command: str, preset: str, summary: dict[str, Any], out: Path) -> None:
    preset_cfg = OmegaConf.load(PRESET_DIR / f"{preset}.yaml")
    assert summary["target"].startswith(str(preset_cfg.target)) and 1 <= summary["steps"] <= PICTURE_STEPS
    assert 0.0 <= summary["target_prob"] <= 1.0
    if command == "visualize":
        assert (out / "ideal.png").is_file()
        if preset_cfg.get("heldout_backbone"):
            assert 0.0 <= summary["heldout_prob"] <= 1.0
    else:
        from transferlab.insight.attacks import parse_eps

        assert (out / "adversarial.png").is_file() and summary["linf"] <= parse_eps(str(preset_cfg.eps)) + 1e-6
        if preset_cfg.get("transfer_backbone"):
            assert isinstance(summary["transfer"]["fooled"], bool)


def test_presets_are_listed_from_the_folder():
    """Every file in conf/experiment/ is a preset Hydra can select (a `.yml` would be invisible to it)."""
    files = [p for p in PRESET_DIR.rglob("*") if p.is_file() and not p.name.startswith(".")]
    assert files and all(p.suffix == ".yaml" for p in files), [p for p in files if p.suffix != ".yaml"]
    assert len(PRESETS) == len(files) and any("/" in p for p in PRESETS)  # subfolders (lesson/) included
    assert COMMANDS and "train" in COMMANDS


@pytest.mark.parametrize("preset", PRESETS)
def test_preset_runs_one_batch(preset, generated, tmp_path):
    command = command_of(preset, tmp_path / "compose")
    cfg = composed(command, preset, tmp_path / "compose")
    out = tmp_path / "run"
    if command == "train":
        result = api.train([f"experiment={preset}", *train_overrides(cfg, generated)], run_dir=out)
        check_train(preset, cfg, result)
        return
    overrides = [f"experiment={preset}", f"steps={PICTURE_STEPS}"]
    if not offline_weights(str(cfg.backbone.weights)):
        overrides.append("backbone.weights=none")
    if command == "attack" and not Path(str(cfg.input)).is_file():
        overrides.append(f"input={generated['photo']}")
    summary = api.run(command, overrides, run_dir=out)
    check_picture(command, preset, summary, out)
