"""Backbones: the bundled weights are really ImageNet-trained; any timm/torchvision name builds; bad names are caught."""

from __future__ import annotations

from typing import Optional

import pytest
import skimage.data
import torch
from PIL import Image

from conftest import PETS
from transferlab.core.errors import ConfigError
from transferlab.models.backbone import Backbone
from transferlab.models.backbones import create_backbone, resolve_source
from transferlab.models.classifier import TransferClassifier
from transferlab.models.sources import SOURCES, by_name

DOMESTIC_CATS = {281, 282, 283, 284, 285}  # tabby, tiger cat, Persian, Siamese, Egyptian cat


@pytest.fixture(scope="module")
def lite0():
    return create_backbone("tf_efficientnet_lite0", weights="bundled").eval()


def imagenet_top1(backbone, image: Image.Image) -> tuple[int, str, float]:
    x = backbone.preprocessing.eval_transform()(image)[None]
    with torch.inference_mode():
        probs = backbone.imagenet_logits(x).softmax(-1)[0]
    index = int(probs.argmax())
    return index, backbone.categories[index], float(probs[index])


@pytest.mark.shared
def test_bundled_lite0_names_a_siamese_cat(lite0):
    index, name, prob = imagenet_top1(lite0, Image.open(sorted(PETS.glob("Siamese_*.jpg"))[0]).convert("RGB"))
    assert index == 284 and name.startswith("Siamese cat") and prob > 0.5


@pytest.mark.shared
def test_bundled_lite2_names_a_siamese_cat():
    lite2 = create_backbone("tf_efficientnet_lite2", weights="bundled").eval()
    assert lite2.preprocessing.input_size == 260
    index, name, prob = imagenet_top1(lite2, Image.open(sorted(PETS.glob("Siamese_*.jpg"))[0]).convert("RGB"))
    assert index == 284 and name.startswith("Siamese cat") and prob > 0.5


def test_an_ensemble_concatenates_its_members_features_each_through_its_own_preprocessing(lite0):
    members = ["tf_efficientnet_lite0", "tf_efficientnet_lite1"]
    ensemble = create_backbone("ensemble", weights="bundled", members=members).eval()
    lite1 = create_backbone("tf_efficientnet_lite1", weights="bundled").eval()
    assert ensemble.num_features == 2560 and ensemble.preprocessing.input_size == max(
        lite0.preprocessing.resize_size, lite1.preprocessing.resize_size
    )
    image = Image.fromarray(skimage.data.chelsea())
    with torch.inference_mode():
        both = ensemble(ensemble.preprocessing.eval_transform()(image)[None])[0]
        own = [m(m.preprocessing.eval_transform()(image)[None])[0] for m in (lite0, lite1)]
    for part, reference in zip(both.split(1280), own):  # the same features, up to one extra resampling
        assert torch.nn.functional.cosine_similarity(part, reference, dim=0) > 0.98
    with pytest.raises(ConfigError, match="backbone.members"):
        create_backbone("ensemble", weights="bundled")


def test_bundled_lite0_sees_a_domestic_cat_in_chelsea(lite0):
    index, _, _ = imagenet_top1(lite0, Image.fromarray(skimage.data.chelsea()))
    assert index in DOMESTIC_CATS


def test_features_and_head_are_separate(lite0):
    feats = lite0(torch.zeros(2, 3, 96, 96))
    assert feats.shape == (2, 1280) and lite0.imagenet_head.out_features == 1000


@pytest.mark.parametrize("name,features", [("resnet18", 512), ("mobilenet_v3_large", 1280), ("convnext_atto", 320), ("efficientnet_b0", 1280)])
def test_any_library_name_builds(name, features):
    backbone = create_backbone(name, weights="none")
    assert backbone(torch.zeros(1, 3, 64, 64)).shape == (1, features)


def test_state_dict_path_loads_strictly(tmp_path):
    import torchvision

    model = torchvision.models.resnet18()
    torch.save(model.state_dict(), tmp_path / "r18.pt")
    backbone = create_backbone("resnet18", weights=str(tmp_path / "r18.pt"))
    assert torch.equal(backbone.body.conv1.weight, model.conv1.weight)
    torch.save({"nope": torch.zeros(1)}, tmp_path / "bad.pt")
    with pytest.raises(ConfigError, match="does not fit"):
        create_backbone("resnet18", weights=str(tmp_path / "bad.pt"))


def test_safetensors_and_prefixed_state_dicts_give_the_same_imagenet_logits(tmp_path):
    """A hub-style model.safetensors, a .pth, a DDP (`module.`) and a Hugging Face TimmWrapper (`timm_model.`) copy of
    the same weights: the same ImageNet logits as the model they came from."""
    import timm
    from safetensors.torch import save_file

    torch.manual_seed(0)
    source = timm.create_model("resnet18", pretrained=False).eval()
    state = {k: v.contiguous() for k, v in source.state_dict().items()}
    save_file(state, str(tmp_path / "model.safetensors"))
    torch.save(state, tmp_path / "weights.pth")
    save_file({f"timm_model.{k}": v for k, v in state.items()}, str(tmp_path / "hf.safetensors"))
    torch.save({"state_dict": {f"module.{k}": v for k, v in state.items()}, "epoch": 3}, tmp_path / "ddp.bin")
    x = torch.randn(2, 3, 96, 96)
    with torch.inference_mode():
        expected = source(x)
        for name in ("model.safetensors", "weights.pth", "hf.safetensors", "ddp.bin"):
            backbone = create_backbone("resnet18", weights=str(tmp_path / name), source="timm").eval()
            assert torch.equal(backbone.imagenet_logits(x), expected), name
    (tmp_path / "broken.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{oops")
    with pytest.raises(ConfigError, match="broken.safetensors is not a readable safetensors file"):
        create_backbone("resnet18", weights=str(tmp_path / "broken.safetensors"), source="timm")
    save_file({k: v for k, v in state.items() if not k.startswith("fc.")}, str(tmp_path / "headless.safetensors"))
    with pytest.raises(ConfigError, match="does not fit ResNet: it lacks 2 of its .* tensors .e.g. fc.bias, fc.weight"):
        create_backbone("resnet18", weights=str(tmp_path / "headless.safetensors"), source="timm")


def test_unknown_backbone_suggests_close_names():
    with pytest.raises(ConfigError, match=r"unknown backbone 'resnt50'.*did you mean: .*resnet50"):
        create_backbone("resnt50")


def test_bundled_only_where_shipped():
    with pytest.raises(ConfigError, match="only tf_efficientnet_lite0"):
        create_backbone("resnet50", weights="bundled")


# -- every registered source, with small random models (timm's tests/test_models.py is the model) -------------------
# Small models of each source: random weights (weights=none) where the source builds any name, the shipped weights
# where that is what the source is. (source, model name, input size or None for the model's own: fixed-size ViTs).
# A source registered without an entry here fails test_every_source_has_small_models.
SMALL_MODELS: dict[str, list[tuple[str, Optional[int]]]] = {
    "torchvision": [("resnet18", 64), ("mobilenet_v3_small", 64), ("shufflenet_v2_x0_5", 64)],
    "timm": [("resnet18", 64), ("convnext_atto", 64), ("mobilenetv3_small_050", 64), ("vit_tiny_patch16_224", None), ("deit_tiny_patch16_224", None)],
    "bundled": [("tf_efficientnet_lite0", 64), ("tf_efficientnet_lite1", 64), ("tf_efficientnet_lite2", 64)],
}
WITHOUT_BATCHNORM = {"convnext_atto", "vit_tiny_patch16_224", "deit_tiny_patch16_224"}  # LayerNorm models
# Known contract breaks, each to be fixed in src/ (strict: the case fails once it passes, so the mark goes with the fix).
KNOWN_BREAKS: dict[tuple[str, str], str] = {}  # (source, model) -> why it is expected to fail; empty: none known
SOURCE_CASES = [
    pytest.param(
        source,
        name,
        size,
        id=f"{source}-{name}",
        marks=[pytest.mark.xfail(strict=True, reason=KNOWN_BREAKS[source, name])] if (source, name) in KNOWN_BREAKS else [],
    )
    for source in sorted(SOURCES)
    for name, size in SMALL_MODELS.get(source, [("<none listed>", None)])
]


def build_small(source: str, name: str, input_size: Optional[int]) -> Backbone:
    """The model as `backbone.source=<source> backbone.name=<name>` builds it, offline."""
    chosen = SOURCES[source]
    weights = chosen.selected_by_weights or "none"
    built = create_backbone(name, weights=weights, source="auto" if chosen.selected_by_weights else source, input_size=input_size)
    assert resolve_source(name, "auto" if chosen.selected_by_weights else source, weights) is chosen
    return built


def library_preprocessing(source: str, name: str) -> tuple[tuple[float, ...], tuple[float, ...], int, str]:
    """(mean, std, input size, interpolation) as the library itself publishes them for this model."""
    if source == "torchvision":
        import torchvision

        t = torchvision.models.get_model_weights(name).DEFAULT.transforms()
        return tuple(t.mean), tuple(t.std), int(t.crop_size[0]), t.interpolation.value
    import timm

    cfg = timm.models.get_pretrained_cfg(name)  # bundled: timm's architecture, so timm's preprocessing
    return tuple(cfg.mean), tuple(cfg.std), int(cfg.input_size[-1]), cfg.interpolation


def test_every_source_has_small_models():
    """A new source (one file in models/sources/ and a register call) needs its small models listed above."""
    assert set(SOURCES) == set(SMALL_MODELS), f"sources without small models here: {sorted(set(SOURCES) - set(SMALL_MODELS))}"
    assert all(key == source.name and source.names() for key, source in SOURCES.items())


def test_distinct_sources_have_distinct_names():
    names = [source.name for source in SOURCES.values()]
    assert len(set(names)) == len(names) and all(names)
    selectors = [s.selected_by_weights for s in SOURCES.values() if s.selected_by_weights]
    assert len(set(selectors)) == len(selectors) and not {"imagenet", "none"} & set(selectors)
    assert [s.name for s in by_name()] == sorted(
        (s.name for s in SOURCES.values() if not s.selected_by_weights), key=lambda n: SOURCES[n].auto_priority
    )


@pytest.mark.parametrize("source,name,input_size", SOURCE_CASES)
def test_source_builds_a_backbone_that_keeps_the_contract(source, name, input_size):
    assert source in SMALL_MODELS, f"no small models listed for source {source!r} in SMALL_MODELS"
    torch.manual_seed(0)
    backbone = build_small(source, name, input_size).eval()
    assert backbone.name == name and backbone.source in SOURCES and not SOURCES[backbone.source].selected_by_weights

    # the preprocessing it carries: the library's own for this model, the input size replaced when asked
    mean, std, size, interpolation = library_preprocessing(source, name)
    prep = backbone.preprocessing
    assert prep.mean == pytest.approx(mean) and prep.std == pytest.approx(std) and prep.interpolation == interpolation
    assert prep.input_size == (input_size or size) and 0 < prep.crop_pct <= 1 and all(s > 0 for s in prep.std)
    pixels = prep.eval_transform()(Image.fromarray(skimage.data.chelsea()))
    assert pixels.shape == (3, prep.input_size, prep.input_size) and pixels.dtype == torch.float32

    # features: [N, num_features], the same twice for the same input, the ImageNet head on top of them
    images = torch.randn(2, 3, prep.input_size, prep.input_size)
    with torch.inference_mode():
        features, again = backbone(images), backbone(images)
        assert features.shape == (2, backbone.num_features) and torch.isfinite(features).all()
        assert torch.equal(features, again)
        if backbone.imagenet_head is not None:
            assert backbone.imagenet_logits(images).shape == (2, backbone.imagenet_head.out_features)
    if backbone.categories is not None:
        assert len(backbone.categories) == backbone.imagenet_head.out_features == 1000

    # frozen: no gradients into the backbone, and its BatchNorm layers stay in eval mode (statistics untouched)
    model = TransferClassifier(
        backbone={"name": name, "weights": "none"},
        class_names=["a", "b"],
        finetune={"mode": "frozen", "head_dropout": 0.0},
        optimizer={"_target_": "torch.optim.SGD", "_partial_": True, "lr": 0.1},
        prebuilt_backbone=backbone,
    ).train()
    norms = [m for m in backbone.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    before = [m.running_mean.clone() for m in norms]
    assert model.backbone_frozen and not any(p.requires_grad for p in backbone.parameters())
    assert all(p.requires_grad for p in model.head.parameters())
    assert not any(m.training for m in backbone.modules()) and model.head.training
    model(images).sum().backward()
    assert all(p.grad is None for p in backbone.parameters()) and all(p.grad is not None for p in model.head.parameters())
    assert all(torch.equal(m.running_mean, b) for m, b in zip(norms, before))
    assert bool(norms) == (name not in WITHOUT_BATCHNORM), f"{name}: BatchNorm layers {len(norms)}"
