"""Start-up validation, the same for every command: typos, wrong types and values out of range fail before any work.

`validate(cfg, command)` walks the composed config along the command's schema (config.schema): unknown keys with close matches, types,
`???` values, the ranges declared on the schema's fields (config.limits), and every `_target_` node against the signature of the class
it instantiates (then the ranges declared for its keys). Then the rules that relate two keys (`check_rules`). The first problem is raised
as a ConfigError naming the full key: one line, exit 2. The checker is a small table of annotation kinds on purpose: OmegaConf's
structured configs know no Literal and report a bad value over several lines.
"""

from __future__ import annotations

import dataclasses
import inspect
import os
import types
import typing
from collections.abc import Callable, Mapping
from typing import Any, Literal, Optional

from hydra.utils import get_object
from omegaconf import DictConfig, OmegaConf

from transferlab.config.limits import check_range, declared, literals
from transferlab.config.schema import COMMANDS, OPEN_NODES, OUR_VALUES, Target, Targets
from transferlab.core.bounds import Bounds, Params
from transferlab.core.errors import ConfigError, close_matches


def _describe(value: Any) -> str:
    return f"{value!r} ({type(value).__name__})"


def _is_list(value: Any) -> bool:
    return isinstance(value, (list, tuple))


# What a value must be for each plain type an annotation names (list[str] and dict[str, int] by their origin);
# an annotation outside this table (a Tensor, a Callable) is not checked.
_KINDS: dict[Any, Callable[[Any], bool]] = {
    type(None): lambda v: v is None,
    bool: lambda v: isinstance(v, bool),
    int: lambda v: isinstance(v, int) and not isinstance(v, bool),
    float: lambda v: isinstance(v, (int, float)) and not isinstance(v, bool),
    str: lambda v: isinstance(v, str),
    list: _is_list,
    tuple: _is_list,
    dict: lambda v: isinstance(v, Mapping),
    Mapping: lambda v: isinstance(v, Mapping),
}


def _matches(value: Any, annotation: Any) -> bool | None:
    """True/False when the annotation is simple enough to check, None when it is not."""
    origin = typing.get_origin(annotation)
    if origin is Literal:
        return value in typing.get_args(annotation) or str(value) in map(str, typing.get_args(annotation))
    if origin in (typing.Union, types.UnionType):
        results = [_matches(value, arg) for arg in typing.get_args(annotation)]
        return None if any(r is None for r in results) else any(results)
    check = _KINDS.get(origin or annotation) if isinstance(origin or annotation, typing.Hashable) else None
    return None if check is None else check(value)


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


def check_fields(key: str, values: Mapping[str, Any], params: Mapping[str, Any], open_ended: bool, extra: Mapping[str, tuple] = {}) -> None:
    """Unknown keys (with close matches) and values whose type contradicts the annotation."""
    for name, value in values.items():
        if name.startswith("_"):
            continue
        if name not in params:
            if open_ended:
                continue
            raise ConfigError(f"{_join(key, name)}: unknown key{close_matches(name, params)}; valid keys: {', '.join(sorted(params))}")
        if value in extra.get(name, ()):
            continue
        if _matches(value, params[name]) is False:
            choices = [str(a) for a in literals(params[name])]
            hint = close_matches(value, choices) if isinstance(value, str) else ""
            raise ConfigError(f"{_join(key, name)}: expected {_type_name(params[name])}, got {_describe(value)}{hint}")


def _admits_none(annotation: Any) -> bool:
    return annotation is type(None) or (
        typing.get_origin(annotation) in (typing.Union, types.UnionType) and type(None) in typing.get_args(annotation)
    )


def check_node(key: str, values: Mapping[str, Any], schema: type) -> None:
    """A node against a schema dataclass: every field present (unless it may be None), types, declared ranges,
    then each child by its type."""
    declarations = typing.get_type_hints(schema, include_extras=True)
    hints = typing.get_type_hints(schema)  # the same without Annotated's ranges
    fields = {f.name: hints[f.name] for f in dataclasses.fields(schema)}
    for name, annotation in fields.items():
        if name not in values and not _admits_none(annotation):
            raise ConfigError(f"{_join(key, name)}: required value is missing")
    structured = {n: t for n, a in fields.items() if (t := _node_type(a)) is not None}
    check_fields(key, values, {n: (dict if n in structured else a) for n, a in fields.items()}, open_ended=schema in OPEN_NODES)
    for name, annotation in fields.items():
        bounds = declared(declarations[name], Bounds)
        if bounds is not None and name in values:
            check_range(_join(key, name), values[name], annotation, bounds)
    for name in structured:
        if values.get(name) is not None:
            params = declared(declarations[name], Params) or Params()
            check_child(_join(key, name), values[name], structured[name], may_be_empty=_admits_none(fields[name]), params=params)


def _node_type(annotation: Any) -> Optional[type]:
    """The schema dataclass, Target or Targets an annotation (or Optional[...] of one) stands for."""
    for candidate in (annotation, *typing.get_args(annotation)):
        if isinstance(candidate, type) and (dataclasses.is_dataclass(candidate) or issubclass(candidate, (Target, Targets))):
            return candidate
    return None


def check_child(key: str, value: Any, kind: type, may_be_empty: bool, params: Params) -> None:
    if not isinstance(value, Mapping):
        raise ConfigError(f"{key}: expected a config node (key: value lines), got {_describe(value)}")
    if kind is Targets:
        for name, child in value.items():
            if child is not None:
                check_child(_join(key, name), child, Target, False, Params())
    elif kind is Target:
        if "_target_" in value:
            annotations = check_target(key, value)
            for name, bounds in params.items():
                if name in value:
                    check_range(_join(key, name), value[name], annotations.get(name, Any), bounds)
        elif value or not may_be_empty:
            what = "no dataset selected" if key == "data" else "no _target_ (the class this node builds)"
            raise ConfigError(
                f"{key}: {what}; choose an option of conf/{key.split('.')[0]}, e.g. "
                + ("data=oxford_pets|cats_dogs|image_folder" if key == "data" else f"{key.split('.')[0]}=<option>")
            )
    else:
        check_node(key, value, kind)


def _signature_params(func: Any) -> tuple[dict[str, Any], set[str], bool, Optional[str]]:
    """(annotated parameters, required ones, accepts **kwargs, first parameter name) of one function."""
    signature = inspect.signature(func)
    try:
        hints = typing.get_type_hints(func)
    except Exception:  # noqa: BLE001 - unresolvable forward references: check names only
        hints = {}
    named = {name: p for name, p in signature.parameters.items() if name != "self" and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)}
    params = {name: hints.get(name, p.annotation) for name, p in named.items()}
    required = {name for name, p in named.items() if p.default is p.empty}
    open_ended = any(p.kind == p.VAR_KEYWORD for p in signature.parameters.values())
    return params, required, open_ended, next(iter(named), None)


def check_target(key: str, node: Mapping[str, Any]) -> dict[str, Any]:
    """Check a `_target_` node against the signature of what it instantiates (following **kwargs to base classes);
    returns the parameters' annotations."""
    target = str(node.get("_target_"))
    try:
        obj = get_object(target)
    except Exception:
        raise ConfigError(f"{key}._target_: cannot import {target!r}; check the spelling or install its package") from None
    try:
        if inspect.isclass(obj):
            params: dict[str, Any] = {}
            required: set[str] = set()
            open_ended, first = True, None
            for klass in inspect.getmro(obj):
                if not open_ended or klass is object or "__init__" not in vars(klass):
                    continue
                own, own_required, open_ended, own_first = _signature_params(vars(klass)["__init__"])
                first = first or own_first
                # A base class's required parameter is still required when the class forwards **kwargs to it (ours
                # do); a third-party subclass may fill it itself (TensorBoardLogger: save_dir -> root_dir).
                if klass is obj or klass.__module__.startswith("transferlab."):
                    required |= own_required - set(params)
                params = {**own, **params}
        else:
            params, required, open_ended, first = _signature_params(obj)
    except (TypeError, ValueError):
        return {}
    if node.get("_partial_") and first:
        params.pop(first, None)  # supplied at call time: optimizer params / scheduler optimizer
        required.discard(first)
        required -= set(getattr(obj, "supplied_at_run", ()))  # e.g. a per-step schedule's total step count
    missing = sorted(required - set(node))
    if missing:
        raise ConfigError(f"{_join(key, missing[0])}: required value is missing ({target} needs it)")
    path = f"{getattr(obj, '__module__', '')}.{getattr(obj, '__qualname__', '')}"
    extra = {param: values for (owner, param), values in OUR_VALUES.items() if owner in (target, path)}
    check_fields(key, node, params, open_ended, extra)
    return params


def _missing_keys(node: Any, prefix: str = "") -> list[str]:
    """Full keys of every `???` value."""
    found = []
    for key in node.keys() if isinstance(node, DictConfig) else []:
        full = f"{prefix}{key!s}"
        if OmegaConf.is_missing(node, key):
            found.append(full)
        elif isinstance(node.get(key), DictConfig):
            found += _missing_keys(node[key], f"{full}.")
    return found


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def check_rules(values: Mapping[str, Any]) -> None:
    """What no single key's type or range can say: a value another library registers, and keys that depend on each other."""
    trainer = values.get("trainer") or {}
    accelerator = trainer.get("accelerator")
    if isinstance(accelerator, str):
        from lightning.pytorch.accelerators import AcceleratorRegistry

        names = sorted({"auto", "gpu", *AcceleratorRegistry.available_accelerators()})
        if accelerator not in names:
            raise ConfigError(f"trainer.accelerator: expected one of {', '.join(names)}, got {accelerator!r}{close_matches(accelerator, names)}")
    finetune = values.get("finetune") or {}
    unfreeze, max_epochs = finetune.get("unfreeze_at_epoch"), trainer.get("max_epochs")
    if finetune.get("mode") == "gradual":
        if unfreeze is None:
            raise ConfigError("finetune.unfreeze_at_epoch: finetune=gradual needs the epoch at which to unfreeze, e.g. finetune.unfreeze_at_epoch=2")
        if _number(unfreeze) and _number(max_epochs) and max_epochs != -1 and unfreeze >= max_epochs:
            raise ConfigError(
                f"finetune.unfreeze_at_epoch: expected an epoch below trainer.max_epochs={max_epochs} "
                f"(else the backbone is never unfrozen), got {unfreeze}"
            )
    if finetune.get("head_solver") == "lbfgs":  # the values training.fit hands the probe: the YAML's, never a fallback
        if finetune.get("select_c") is None:
            raise ConfigError("finetune.select_c: head_solver=lbfgs needs how C is chosen: finetune.select_c=cv (inner folds) or val")
        if finetune["select_c"] == "cv" and finetune.get("c_folds") is None:
            raise ConfigError("finetune.c_folds: select_c=cv needs the number of inner folds, e.g. finetune.c_folds=5")
    shots, folds = (values.get("data") or {}).get("shots"), (values.get("cv") or {}).get("folds")
    if folds and shots not in (None, "all"):  # data.shots: the folds would each need K per class, their test images would move with K
        raise ConfigError(f"data.shots={shots} with cv.folds={folds}: not both; repeat over seeds instead: -m seed=1,2,3 data.split_seed=0")
    cache = (values.get("performance") or {}).get("feature_cache") or {}
    solver = finetune.get("head_solver")
    if solver in ("knn", "prototype"):  # solved on the cached features of a frozen backbone (training.probe), as lbfgs is
        if finetune.get("mode") != "frozen" or not cache.get("enabled"):
            raise ConfigError(
                f"finetune.head_solver={solver}: needs finetune=frozen and performance.feature_cache.enabled=true (it is solved on cached features)"
            )
        if finetune.get("loss") == "asl":
            raise ConfigError(f"finetune.loss=asl: head_solver={solver} has no loss to train; use finetune.head_solver=sgd for the asymmetric loss")
        if finetune.get("select_c") is None:
            raise ConfigError(f"finetune.select_c: head_solver={solver} needs where held-out logits come from: cv (leave-one-out) or val")
    teacher = finetune.get("teacher")  # finetune=distill (its other rules: training.performance.check_distill)
    if finetune.get("mode") == "distill" and teacher and not os.path.exists(os.path.expanduser(str(teacher))):
        raise ConfigError(f"finetune.teacher: no such checkpoint or model package: {teacher}")
    if finetune.get("mode") in ("frozen", "distill") and cache.get("enabled") and cache.get("storage") == "disk":  # as training.performance uses it
        if not (values.get("paths") or {}).get("cache_dir"):
            raise ConfigError("performance.feature_cache.storage=disk needs paths.cache_dir; set it or use storage=memory")


def validate_values(values: Mapping[str, Any], command: str) -> None:
    """Plain values (resolved) against the command's schema (types and ranges), then the rules between keys."""
    check_node("", values, COMMANDS[command])
    check_rules(values)


def check_arguments(command: str, values: Mapping[str, Any]) -> None:
    """Some keys of a command given from Python (transferlab.api.load: runtime, device, precision, tta), each
    against its field's type and declared range, as the command's config would be: the code below trusts them."""
    schema = COMMANDS[command]
    declarations, hints = typing.get_type_hints(schema, include_extras=True), typing.get_type_hints(schema)
    check_fields("", values, hints, open_ended=False)
    for name, value in values.items():
        bounds = declared(declarations[name], Bounds)
        if bounds is not None:
            check_range(name, value, hints[name], bounds)
    check_rules(values)


def validate(cfg: DictConfig, command: str) -> None:
    """Raise ConfigError naming the first bad key of a composed config of `command` (train, eval, predict, ...)."""
    missing = sorted(_missing_keys(cfg))
    if missing:
        raise ConfigError(f"{missing[0]}: Missing mandatory value (???); set it on the command line, e.g. {missing[0]}=...")
    values = OmegaConf.to_container(cfg, resolve=True)
    assert isinstance(values, dict)
    validate_values({str(k): v for k, v in values.items()}, command)
