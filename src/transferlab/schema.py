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
from collections.abc import Mapping
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


def _type_name(annotation: Any) -> str:
    text = str(annotation).replace("typing.", "")
    return getattr(annotation, "__name__", text) if typing.get_origin(annotation) is None else text


def check_fields(key: str, values: Mapping[str, Any], params: Mapping[str, Any], open_ended: bool) -> None:
    """Unknown keys (with close matches) and values whose type contradicts the annotation."""
    for name, value in values.items():
        if name.startswith("_"):
            continue
        if name not in params:
            if open_ended:
                continue
            raise ConfigError(
                f"{key}.{name}: unknown key{close_matches(name, params)}; valid keys: {', '.join(sorted(params))}"
            )
        ok = _matches(value, params[name])
        if ok is False:
            raise ConfigError(f"{key}.{name}: expected {_type_name(params[name])}, got {_describe(value)}")


def check_dataclass(key: str, values: Mapping[str, Any], schema: type) -> None:
    hints = typing.get_type_hints(schema)
    fields = {f.name: hints[f.name] for f in dataclasses.fields(schema)}
    for f in dataclasses.fields(schema):
        if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING and f.name not in values:
            raise ConfigError(f"{key}.{f.name}: required value is missing")
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


def validate_train_config(cfg: DictConfig) -> None:
    """Raise ConfigError naming the first bad key of a composed transferlab-train config."""
    missing = sorted(key for key in _missing_keys(cfg))
    if missing:
        raise ConfigError(f"{missing[0]}: Missing mandatory value (???); set it on the command line, e.g. {missing[0]}=...")
    values = OmegaConf.to_container(cfg, resolve=True)
    run_keys = {f.name: values.get(f.name) for f in dataclasses.fields(RunSchema) if f.name in values}
    check_dataclass("<root>", run_keys, RunSchema)
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
    if not (values.get("data") or {}).get("_target_"):
        raise ConfigError("data: no dataset selected; choose one with data=oxford_pets|cats_dogs|image_folder")
