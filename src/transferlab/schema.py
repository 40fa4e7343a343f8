"""Start-up validation of the composed config: typos and wrong types fail before any data is read.

Our own groups (backbone, finetune, the run's top-level keys) have dataclass schemas. Every node with a
`_target_` (datamodule, optimizer, scheduler, Trainer, loggers, callbacks) is checked against the signature
of the class it instantiates, so a Lightning or torch upgrade never needs a schema edit here.
"""

from __future__ import annotations

import dataclasses
import inspect
import types
import typing
from collections.abc import Callable, Mapping
from typing import Any, Literal, Optional, Union

from hydra.utils import get_object
from omegaconf import DictConfig, OmegaConf

from transferlab.errors import ConfigError, close_matches
from transferlab.hardware import choose_precision

FINETUNE_MODES = ("frozen", "full", "gradual")


@dataclasses.dataclass
class BackboneSchema:
    name: str
    source: str = "auto"
    weights: str = "imagenet"
    input_size: Optional[int] = None


@dataclasses.dataclass
class FinetuneSchema:
    mode: str = "frozen"
    head_dropout: float = 0.0
    backbone_lr_factor: float = 0.1
    unfreeze_at_epoch: Optional[int] = None


@dataclasses.dataclass
class PerformanceSchema:
    channels_last: Union[bool, Literal["auto"]] = "auto"
    compile: Union[bool, Literal["auto"]] = False
    feature_cache: dict = dataclasses.field(default_factory=dict)


@dataclasses.dataclass
class FeatureCacheSchema:
    enabled: bool = True
    storage: Literal["disk", "memory"] = "disk"
    augmented_views: int = 0
    batch_size: int = 64


@dataclasses.dataclass
class RunSchema:
    task_name: str
    seed: int
    tags: list[str] = dataclasses.field(default_factory=list)
    ckpt_path: Optional[str] = None
    optimized_metric: Optional[str] = None


def _describe(value: Any) -> str:
    return f"{value!r} ({type(value).__name__})"


def _matches(value: Any, annotation: Any) -> bool | None:
    """True/False when the annotation is simple enough to check, None when it is not."""
    if annotation is Any or annotation is inspect.Parameter.empty:
        return None
    origin = typing.get_origin(annotation)
    if origin is Literal:
        return value in typing.get_args(annotation) or str(value) in map(str, typing.get_args(annotation))
    if origin in (typing.Union, types.UnionType):
        results = [_matches(value, arg) for arg in typing.get_args(annotation)]
        if any(r is None for r in results):
            return None
        return any(results)
    if annotation is type(None):
        return value is None
    if annotation is bool:
        return isinstance(value, bool)
    if annotation is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if annotation is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if annotation is str:
        return isinstance(value, str)
    if origin in (list, tuple, typing.Sequence) or annotation in (list, tuple):
        return isinstance(value, (list, tuple))
    if origin in (dict, Mapping) or annotation is dict:
        return isinstance(value, Mapping)
    return None


def _literals(annotation: Any) -> list[Any]:
    """Every Literal value inside an annotation (through Optional/Union)."""
    if typing.get_origin(annotation) is Literal:
        return list(typing.get_args(annotation))
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        return [v for arg in typing.get_args(annotation) for v in _literals(arg)]
    return []


def _type_name(annotation: Any) -> str:
    """A readable expected form: `one of 32-true, bf16-mixed, ...`, `int or null`, `list`."""
    origin = typing.get_origin(annotation)
    if origin is Literal:
        return "one of " + ", ".join(str(a) for a in typing.get_args(annotation))
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(annotation)
        literals = [a for arg in args if typing.get_origin(arg) is Literal for a in typing.get_args(arg)]
        others = [_type_name(arg) for arg in args if typing.get_origin(arg) is not Literal and arg is not type(None)]
        parts = ([f"one of {', '.join(dict.fromkeys(map(str, literals)))}"] if literals else []) + others
        return " or ".join(parts) + (" or null" if type(None) in args else "")
    return getattr(annotation, "__name__", str(annotation).replace("typing.", ""))


def _join(key: str, name: str) -> str:
    return f"{key}.{name}" if key else name


def check_fields(key: str, values: Mapping[str, Any], params: Mapping[str, Any], open_ended: bool) -> None:
    """Unknown keys (with close matches) and values whose type contradicts the annotation."""
    for name, value in values.items():
        if name.startswith("_"):
            continue
        if name not in params:
            if open_ended:
                continue
            raise ConfigError(
                f"{_join(key, name)}: unknown key{close_matches(name, params)}; valid keys: {', '.join(sorted(params))}"
            )
        ok = _matches(value, params[name])
        if ok is False:
            choices = [str(a) for a in _literals(params[name])]
            hint = close_matches(value, choices) if isinstance(value, str) else ""
            raise ConfigError(f"{_join(key, name)}: expected {_type_name(params[name])}, got {_describe(value)}{hint}")


def check_dataclass(key: str, values: Mapping[str, Any], schema: type) -> None:
    hints = typing.get_type_hints(schema)
    fields = {f.name: hints[f.name] for f in dataclasses.fields(schema)}
    for f in dataclasses.fields(schema):
        if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING and f.name not in values:
            raise ConfigError(f"{_join(key, f.name)}: required value is missing")
    check_fields(key, values, fields, open_ended=False)


def _signature_params(func: Any) -> tuple[dict[str, Any], bool, Optional[str]]:
    """(annotated parameters, accepts **kwargs, first parameter name) of one function."""
    signature = inspect.signature(func)
    try:
        hints = typing.get_type_hints(func)
    except Exception:  # noqa: BLE001 - unresolvable forward references: check names only
        hints = {}
    names = [n for n in signature.parameters if n != "self"]
    params = {
        name: hints.get(name, p.annotation)
        for name, p in signature.parameters.items()
        if name != "self" and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)
    }
    open_ended = any(p.kind == p.VAR_KEYWORD for p in signature.parameters.values())
    return params, open_ended, names[0] if names else None


def check_target(key: str, node: Mapping[str, Any]) -> None:
    """Check a `_target_` node against the signature of what it instantiates (following **kwargs to base classes)."""
    target = node.get("_target_")
    try:
        obj = get_object(target)
    except Exception:
        raise ConfigError(f"{key}._target_: cannot import {target!r}; check the spelling or install its package") from None
    try:
        if inspect.isclass(obj):
            params, open_ended, first = {}, True, None
            for klass in inspect.getmro(obj):
                if not open_ended or klass is object or "__init__" not in vars(klass):
                    continue
                own, open_ended, own_first = _signature_params(klass.__init__)
                first = first or own_first
                params = {**own, **params}
        else:
            params, open_ended, first = _signature_params(obj)
    except (TypeError, ValueError):
        return
    if node.get("_partial_") and first:
        params.pop(first, None)  # supplied at call time: optimizer params / scheduler optimizer
    check_fields(key, node, params, open_ended)


def _check_targets(key: str, node: Any) -> None:
    if isinstance(node, Mapping):
        if "_target_" in node:
            check_target(key, node)
        else:
            for name, child in node.items():
                _check_targets(f"{key}.{name}", child)


def _missing_keys(node: Any, prefix: str = "") -> list[str]:
    """Full keys of every `???` value."""
    found = []
    for key in node.keys() if isinstance(node, DictConfig) else []:
        full = f"{prefix}{key}"
        if OmegaConf.is_missing(node, key):
            found.append(full)
        elif isinstance(node._get_node(key), DictConfig):
            found += _missing_keys(node[key], f"{full}.")
    return found


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


# Values every run needs in range: key -> (test, expected form). Checked after the types.
LIMITS: dict[str, tuple[Callable[[Any], bool], str]] = {
    "seed": (lambda v: 0 <= v < 2**32, "an integer in [0, 2**32)"),
    "data.batch_size": (lambda v: v >= 1, "an integer >= 1"),
    "optimizer.lr": (lambda v: v > 0, "a number > 0, e.g. optimizer.lr=1e-3"),
    "optimizer.weight_decay": (lambda v: v >= 0, "a number >= 0"),
    "optimizer.momentum": (lambda v: 0 <= v < 1, "a number in [0, 1)"),
    "trainer.max_epochs": (lambda v: v >= 1 or v == -1, "an integer >= 1 (or -1 for no limit)"),
    "trainer.accumulate_grad_batches": (lambda v: v >= 1, "an integer >= 1"),
    "trainer.gradient_clip_val": (lambda v: v >= 0, "a number >= 0 or null"),
    "finetune.head_dropout": (lambda v: 0 <= v < 1, "a probability in [0, 1)"),
    "finetune.backbone_lr_factor": (lambda v: v >= 0, "a number >= 0 (the backbone's lr = optimizer.lr x this)"),
    "finetune.unfreeze_at_epoch": (lambda v: v >= 0, "an epoch number >= 0"),
    "backbone.input_size": (lambda v: v >= 16, "a size in pixels >= 16, or null for the backbone's own"),
    "performance.feature_cache.batch_size": (lambda v: v >= 1, "an integer >= 1"),
    "performance.feature_cache.augmented_views": (lambda v: v >= 0, "an integer >= 0"),
}


def _lookup(values: Mapping[str, Any], dotted: str) -> tuple[bool, Any]:
    node: Any = values
    for part in dotted.split("."):
        if not isinstance(node, Mapping) or part not in node:
            return False, None
        node = node[part]
    return True, node


def check_limits(values: Mapping[str, Any]) -> None:
    for key, (ok, form) in LIMITS.items():
        found, value = _lookup(values, key)
        if found and value is not None and not (_number(value) and ok(value)):
            raise ConfigError(f"{key}: expected {form}, got {value!r}")
    trainer = values.get("trainer") or {}
    accelerator = trainer.get("accelerator")
    if isinstance(accelerator, str):
        from lightning.pytorch.accelerators import AcceleratorRegistry

        names = sorted({"auto", "gpu", *AcceleratorRegistry.available_accelerators()})
        if accelerator not in names:
            raise ConfigError(f"trainer.accelerator: expected one of {', '.join(names)}, got {accelerator!r}{close_matches(accelerator, names)}")
    finetune = values.get("finetune") or {}
    unfreeze, max_epochs = finetune.get("unfreeze_at_epoch"), trainer.get("max_epochs")
    if finetune.get("mode") == "gradual" and _number(unfreeze) and _number(max_epochs) and max_epochs != -1 and unfreeze >= max_epochs:
        raise ConfigError(f"finetune.unfreeze_at_epoch: expected an epoch below trainer.max_epochs={max_epochs} "
                          f"(else the backbone is never unfrozen), got {unfreeze}")


def validate_train_config(cfg: DictConfig) -> None:
    """Raise ConfigError naming the first bad key of a composed transferlab-train config."""
    missing = sorted(key for key in _missing_keys(cfg))
    if missing:
        raise ConfigError(f"{missing[0]}: Missing mandatory value (???); set it on the command line, e.g. {missing[0]}=...")
    values = OmegaConf.to_container(cfg, resolve=True)
    run_keys = {f.name: values.get(f.name) for f in dataclasses.fields(RunSchema) if f.name in values}
    check_dataclass("", run_keys, RunSchema)
    check_dataclass("backbone", values.get("backbone") or {}, BackboneSchema)
    performance = values.get("performance") or {}
    check_dataclass("performance", performance, PerformanceSchema)
    check_dataclass("performance.feature_cache", performance.get("feature_cache") or {}, FeatureCacheSchema)
    finetune = values.get("finetune") or {}
    check_dataclass("finetune", finetune, FinetuneSchema)
    mode = finetune.get("mode", "frozen")
    if mode not in FINETUNE_MODES:
        raise ConfigError(f"finetune.mode: expected one of {', '.join(FINETUNE_MODES)}, got {mode!r}{close_matches(mode, FINETUNE_MODES)}")
    if mode == "gradual" and finetune.get("unfreeze_at_epoch") is None:
        raise ConfigError("finetune.unfreeze_at_epoch: finetune=gradual needs the epoch at which to unfreeze, e.g. finetune.unfreeze_at_epoch=2")
    if mode == "gradual" and "ddp" in str((values.get("trainer") or {}).get("strategy", "")):
        raise ConfigError("finetune=gradual: unfreezing the backbone during a DDP run is not supported; use finetune=full or one device")
    trainer = values.get("trainer") or {}
    if str(trainer.get("precision")) == "auto":  # ours, not Lightning's: resolved by performance.resolve_precision
        trainer["precision"] = choose_precision("auto", trainer.get("accelerator"))
    for group in ("data", "trainer", "optimizer", "scheduler", "logger", "callbacks"):
        _check_targets(group, values.get(group) or {})
    check_limits(values)
    if not (values.get("data") or {}).get("_target_"):
        raise ConfigError("data: no dataset selected; choose one with data=oxford_pets|cats_dogs|image_folder")
