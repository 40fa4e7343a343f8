"""finetune=lora: low-rank adapters (LoRA, Hu et al. 2021) in a frozen backbone, by peft's `inject_adapter_in_model`.

- Targets (`finetune.lora.target_modules=auto`): the layers where a rank-r adapter is small next to the layer it
  adapts. A ViT is its Linear layers (attention `qkv` / `proj`, MLP `fc1` / `fc2`); a CNN its 1x1 convolutions
  (a LoRA on a depthwise convolution has more parameters than the convolution); a CNN whose 1x1 convolutions hold
  under half of its dense weights (ResNet-18, VGG) all its ungrouped convolutions. Only layers whose adapter
  merges exactly are adaptable: Linear and plain ungrouped Conv2d (not a conv subclass that pads or standardises
  its weight in forward, not the out_proj nn.MultiheadAttention reads directly).
- Everything of the backbone but the adapters is frozen, BatchNorm statistics included: the classifier keeps the
  backbone in eval mode, only the adapters' dropout follows train / eval (`train_adapters_only`).
- A checkpoint of a base that can be rebuilt (weights bundled, imagenet, a file) holds only the adapters, the head
  and the base's description {name, source, weights, sha256}; `restore_base` puts the base back (Lightning's reload
  of the best checkpoint, resuming, `load_checkpoint`) after checking its hash. A `weights=none` base is random and
  cannot be rebuilt from its name: it is stored whole, and the record says so.
- `merge` folds each adapter into its layer (W + B A alpha / r) and puts the plain layer back: an exported package
  is a plain model whose hyper-parameters say `finetune.lora.merged: true` (nothing is injected when it is rebuilt).
"""

from __future__ import annotations

import hashlib
import logging
import math
import re
from collections.abc import Callable, Mapping
from typing import Any, Optional, TypeVar

import torch
from torch import nn

from transferlab.core.errors import ConfigError, DataError, close_matches, one_line, require_packages

log = logging.getLogger(__name__)

CHECKPOINT_KEY = "transferlab_lora"  # the checkpoint's record of the base (and whether it is stored)
BACKBONE = "backbone."  # where the base's tensors live in the classifier's state_dict
ADAPTER = "lora_"  # peft's name of every adapter module (lora_A, lora_B, lora_dropout, ...)
Model = TypeVar("Model", bound=nn.Module)


def settings(finetune: Mapping[str, Any]) -> Optional[Mapping[str, Any]]:
    """finetune.lora when adapters are to be injected: mode=lora and not already merged into the weights."""
    if finetune.get("mode") != "lora":
        return None
    found = finetune.get("lora")
    if not isinstance(found, Mapping):
        raise ConfigError("finetune.lora: finetune.mode=lora needs the adapter's r, alpha, dropout and target_modules; use finetune=lora")
    return None if found.get("merged") else found


# -- which layers --------------------------------------------------------------------------------------
def adaptable_layers(body: nn.Module) -> dict[str, nn.Module]:
    """Layers whose adapter merges exactly into their weight: Linear, and plain ungrouped Conv2d."""
    read_directly = {f"{name}.out_proj" if name else "out_proj" for name, m in body.named_modules() if isinstance(m, nn.MultiheadAttention)}
    return {
        name: m
        for name, m in body.named_modules()
        if name not in read_directly and (isinstance(m, nn.Linear) or (type(m) is nn.Conv2d and m.groups == 1))
    }


def _fans(layer: nn.Module) -> tuple[int, int]:
    if isinstance(layer, nn.Linear):
        return layer.in_features, layer.out_features
    assert isinstance(layer, nn.Conv2d)
    return layer.in_channels * math.prod(layer.kernel_size), layer.out_channels


def auto_targets(body: nn.Module, r: int) -> list[str]:
    """Layers where a rank-r adapter is smaller than the layer: the Linear and 1x1 ones, or every dense one when
    those hold under half of the dense weights."""
    worth = {n: m for n, m in adaptable_layers(body).items() if r * sum(_fans(m)) < math.prod(_fans(m))}
    pointwise = [n for n, m in worth.items() if isinstance(m, nn.Linear) or getattr(m, "kernel_size", None) == (1, 1)]
    size = {n: math.prod(_fans(m)) for n, m in worth.items()}
    return pointwise if 2 * sum(size[n] for n in pointwise) >= sum(size.values()) else list(worth)


def _matches(pattern: str, name: str) -> bool:
    """peft's rule: a plain name matches a module of that name or ending in `.name`; anything else is a regex that
    must match the whole module name."""
    if re.fullmatch(r"[\w.]+", pattern):
        return name == pattern or name.endswith("." + pattern)
    try:
        return re.fullmatch(pattern, name) is not None
    except re.error as exc:
        raise ConfigError(f"finetune.lora.target_modules: {pattern!r} is neither a module name nor a valid regex ({exc})") from None


def _described(body: nn.Module, names: list[str]) -> str:
    first = body.get_submodule(names[0])
    kind = f"a Conv2d with groups={first.groups}" if isinstance(first, nn.Conv2d) and first.groups > 1 else f"a {type(first).__name__}"
    return f"{names[0]}: {kind}" + (f", and {len(names) - 1} more" if len(names) > 1 else "")


def named_targets(body: nn.Module, wanted: Any, model: str) -> list[str]:
    """The adaptable layers each given name (or regex) matches; one that matches none fails with one line."""
    layers, chosen = adaptable_layers(body), []
    leaves = sorted({name.rsplit(".", 1)[-1] for name in layers})
    for pattern in [wanted] if isinstance(wanted, str) else list(wanted):
        hit = [name for name, _ in body.named_modules() if name and _matches(str(pattern), name)]
        usable = [name for name in hit if name in layers]
        if not usable:
            what = f"only layers of {model} no adapter merges into ({_described(body, hit)})" if hit else f"no module of {model}"
            raise ConfigError(
                f"finetune.lora.target_modules: {pattern!r} matches {what}{close_matches(str(pattern), leaves)}; "
                f"use auto or names of its Linear / ungrouped Conv2d layers such as {', '.join(leaves[:6])}"
            )
        if len(usable) < len(hit):
            log.warning(
                "finetune.lora.target_modules: %r also matches %d layers no adapter can merge into (skipped)", pattern, len(hit) - len(usable)
            )
        chosen += [name for name in usable if name not in chosen]
    return chosen


# -- injecting, training, merging ----------------------------------------------------------------------
def lora_layers(module: nn.Module) -> list[nn.Module]:
    """peft's LoRA layers inside `module` (none where peft is not installed: nothing can have been injected)."""
    try:
        from peft.tuners.lora import LoraLayer
    except ImportError:
        return []
    return [m for m in module.modules() if isinstance(m, LoraLayer)]


def attach(backbone: nn.Module, finetune: Mapping[str, Any]) -> list[str]:
    """Inject the adapters of finetune.lora into backbone.body and freeze everything else of the backbone; returns
    the adapted layers' names (none when the mode is not lora, or the adapters are merged already)."""
    found = settings(finetune)
    if found is None:
        return []
    require_packages("finetune=lora", "lora", "peft")
    from peft import LoraConfig, inject_adapter_in_model

    body, model, r = backbone.get_submodule("body"), str(getattr(backbone, "name", "the backbone")), int(found["r"])
    wanted = found.get("target_modules", "auto")
    targets = auto_targets(body, r) if wanted == "auto" else named_targets(body, wanted, model)
    if not targets:
        raise ConfigError(f"finetune.lora.target_modules: {model} has no Linear or ungrouped Conv2d layer to adapt; use finetune=full")
    pattern = "|".join(re.escape(name) for name in targets)
    config = LoraConfig(
        r=r,
        lora_alpha=float(found["alpha"]),  # type: ignore[arg-type]  # peft says int; alpha / r takes any number
        lora_dropout=float(found["dropout"]),
        target_modules=f"(?:{pattern})",
        bias="none",
    )
    inject_adapter_in_model(config, body)
    backbone.requires_grad_(False)
    layers: list[Any] = lora_layers(body)  # peft LoraLayer modules
    for layer in layers:
        for name, part in layer.named_children():
            part.requires_grad_(name.startswith(ADAPTER) and name != "lora_dropout")
        # Under autocast the adapter runs in the autocast dtype like its layer; peft's cast of the input to the adapter
        # weights' float32 would copy every adapted layer's input (time and memory) for the same result. (Outside
        # autocast input and weights share their dtype and nothing is cast either way.)
        layer.cast_input_dtype_enabled = False
    if len(layers) != len(targets):
        raise RuntimeError(f"peft adapted {len(layers)} layers of {model}, {len(targets)} were chosen; report the peft version")
    train_adapters_only(backbone, True)  # Lightning keeps each module's mode as it finds it: the base starts in eval
    trainable, total = sum(p.numel() for p in backbone.parameters() if p.requires_grad), sum(p.numel() for p in backbone.parameters())
    log.info(
        "LoRA r=%d alpha %g on %d layers of %s: %d adapter parameters train, %d frozen",
        r,
        found["alpha"],
        len(targets),
        model,
        trainable,
        total - trainable,
    )
    return targets


def train_adapters_only(backbone: nn.Module, mode: bool) -> None:
    """The frozen base in eval mode (BatchNorm statistics fixed, its dropout off); the adapters' dropout in `mode`."""
    backbone.eval()
    for layer in lora_layers(backbone):
        for name, part in layer.named_children():
            if name.startswith(ADAPTER):
                part.train(mode)


def merge(model: nn.Module) -> int:
    """Fold every adapter of model.backbone.body into its layer and put the plain layer back (peft's public
    merge / get_base_layer); the hyper-parameters then say the weights are merged. Returns the layers merged."""
    body = model.get_submodule("backbone.body")
    adapted = {id(m) for m in lora_layers(body)}
    layers: dict[str, Any] = {name: m for name, m in body.named_modules() if id(m) in adapted}
    for name, layer in layers.items():
        layer.merge(safe_merge=True)  # NaN-checked
        parent, _, child = name.rpartition(".")
        setattr(body.get_submodule(parent) if parent else body, child, layer.get_base_layer())
    if hasattr(body, "peft_config"):  # what inject_adapter_in_model leaves on the model
        del body.peft_config
    hparams = getattr(model, "hparams", None)
    if layers and hparams is not None:
        finetune = dict(hparams["finetune"])
        finetune["lora"] = {**finetune["lora"], "merged": True}
        hparams["finetune"] = finetune
    return len(layers)


# -- checkpoints ---------------------------------------------------------------------------------------
def is_base(key: str) -> bool:
    return key.startswith(BACKBONE) and f".{ADAPTER}" not in key


def base_sha256(state: Mapping[str, torch.Tensor]) -> str:
    """sha256 over the base's tensors (names as in the plain model, dtype, shape, bytes), independent of which
    layers carry adapters."""
    digest = hashlib.sha256()
    plain = {key.replace(".base_layer.", "."): value for key, value in state.items() if is_base(key)}
    for key in sorted(plain):
        tensor = plain[key].detach().cpu().contiguous()
        digest.update(f"{key}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def _float_dtype(state: Mapping[str, torch.Tensor]) -> str:
    return next((str(v.dtype).removeprefix("torch.") for k, v in state.items() if is_base(k) and v.is_floating_point()), "float32")


def shrink_checkpoint(finetune: Mapping[str, Any], backbone_spec: Mapping[str, Any], checkpoint: dict[str, Any]) -> None:
    """A LoRA run's checkpoint: the base's record, and (rebuildable base) its tensors dropped from the state_dict and
    from the weight EMA's raw copy."""
    if finetune.get("mode") != "lora" or not any(f".{ADAPTER}" in key for key in checkpoint["state_dict"]):
        return
    state, weights = checkpoint["state_dict"], str(backbone_spec.get("weights"))
    record: dict[str, Any] = {k: backbone_spec.get(k) for k in ("name", "source", "weights")}
    record.update(sha256=base_sha256(state), dtype=_float_dtype(state), tensors=sum(map(is_base, state)))
    if weights == "none":
        record.update(stored="whole", why="backbone.weights=none: a random base cannot be rebuilt from its name")
    else:
        record["stored"] = "adapter_and_head"
        for key in ("state_dict", "current_model_state"):
            if isinstance(checkpoint.get(key), dict):
                checkpoint[key] = {k: v for k, v in checkpoint[key].items() if not is_base(k)}
    checkpoint[CHECKPOINT_KEY] = record


def restore_base(model: nn.Module, checkpoint: dict[str, Any], key: str = "ckpt_path") -> None:
    """Put the live model's base back into an adapter-only checkpoint, after checking it is the base it was trained
    on (its sha256, in the dtype the checkpoint was saved in)."""
    record = checkpoint.get(CHECKPOINT_KEY) or {}
    if record.get("stored") != "adapter_and_head":
        return
    dtype = getattr(torch, str(record.get("dtype", "float32")))
    base = {k: (v.to(dtype) if v.is_floating_point() else v) for k, v in model.state_dict().items() if is_base(k)}
    found = base_sha256(base)
    if found != record.get("sha256"):
        raise DataError(
            f"{key}: this LoRA checkpoint was trained on {record.get('name')} (backbone.weights={record.get('weights')}) with sha256 "
            f"{str(record.get('sha256'))[:12]}, but that base now has {found[:12]}: its weights changed; restore them, or use a full checkpoint"
        )
    for part in ("state_dict", "current_model_state"):
        if isinstance(checkpoint.get(part), dict):
            checkpoint[part] = {**base, **checkpoint[part]}


def rebuild(build: Callable[..., Model], hparams: dict[str, Any], checkpoint: dict[str, Any], key: str = "ckpt_path") -> Model:
    """The checkpoint's classifier: a random base (weights=none) that the state_dict fills, or, for an adapter-only
    LoRA checkpoint, its base rebuilt from the recorded weights, checked and put into the checkpoint."""
    record = checkpoint.get(CHECKPOINT_KEY) or {}
    adapter_only = record.get("stored") == "adapter_and_head"
    hparams["backbone"] = {**hparams["backbone"], "weights": record["weights"] if adapter_only else "none"}
    try:
        model = build(**hparams)
    except (ConfigError, OSError, RuntimeError) as exc:
        if not adapter_only:
            raise
        raise DataError(
            f"{key}: this LoRA checkpoint holds its adapters and head only, and its base {record.get('name')} "
            f"(backbone.weights={record.get('weights')}) could not be rebuilt: {one_line(exc)}"
        ) from exc
    restore_base(model, checkpoint, key)
    return model
