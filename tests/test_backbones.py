"""Backbones: the bundled weights are really ImageNet-trained; any timm/torchvision name builds; bad names are caught."""

from __future__ import annotations

import pytest
import skimage.data
import torch
from PIL import Image

from conftest import PETS
from transferlab.core.errors import ConfigError
from transferlab.models.backbones import create_backbone

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
