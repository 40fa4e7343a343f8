"""The ranges declared in the schema, read out: the one range check and the list the reference prints.

A range is declared where the key's type is (config.schema, core.settings): `Annotated[int, Bounds(ge=1)]` on
a field, `Annotated[Target, Params(lr=Bounds(gt=0))]` on a `_target_` node whose types come from the class.
config.validation checks every value against it after the types; scripts/config_reference.py lists it.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from typing import Annotated, Any, Literal, Optional, TypeVar

from transferlab.core.bounds import Bounds, Params
from transferlab.core.errors import ConfigError

Declared = TypeVar("Declared", Bounds, Params)


def _is_union(annotation: Any) -> bool:
    return typing.get_origin(annotation) in (typing.Union, types.UnionType)


def declared(annotation: Any, kind: type[Declared]) -> Optional[Declared]:
    """The Bounds (or Params) an annotation declares, also inside Optional[...] / Union[...]."""
    if typing.get_origin(annotation) is Annotated:
        found = [m for m in annotation.__metadata__ if isinstance(m, kind)]
        if found:
            return found[0]
        annotation = typing.get_args(annotation)[0]
    for arg in typing.get_args(annotation) if _is_union(annotation) else ():
        inner = declared(arg, kind)
        if inner is not None:
            return inner
    return None


def literals(annotation: Any) -> list[Any]:
    """Every Literal value inside an annotation (through Optional/Union)."""
    if typing.get_origin(annotation) is Literal:
        return list(typing.get_args(annotation))
    if _is_union(annotation):
        return [v for arg in typing.get_args(annotation) for v in literals(arg)]
    return []


def _alternatives(annotation: Any) -> tuple[str, ...]:
    """What a key accepts besides a number: its Literal values, then null."""
    nullable = _is_union(annotation) and type(None) in typing.get_args(annotation)
    return (*dict.fromkeys(map(str, literals(annotation))), *(["null"] if nullable else []))


def _integer(annotation: Any) -> bool:
    kinds = set(typing.get_args(annotation)) if _is_union(annotation) else {annotation}
    return int in kinds and float not in kinds


def check_range(key: str, value: Any, annotation: Any, bounds: Bounds) -> None:
    """One value against its declared range; None and the annotation's Literal values (auto) are the type's business."""
    if value is None or value in literals(annotation) or bounds.admits(value):
        return
    raise ConfigError(f"{key}: expected {bounds.form(_integer(annotation), _alternatives(annotation), key)}, got {value!r}")


def ranges(schema: type, prefix: str = "") -> dict[str, tuple[Bounds, str]]:
    """Every range a schema declares, by dotted key: (the Bounds, in words: `trainer.max_epochs`: `>= 1 or -1
    (-1: no limit)`). `_target_` nodes' keys included; what their class's annotation adds is not known here."""
    found: dict[str, tuple[Bounds, str]] = {}
    hints, plain = typing.get_type_hints(schema, include_extras=True), typing.get_type_hints(schema)
    for field in dataclasses.fields(schema):
        key, annotation = prefix + field.name, hints[field.name]
        bounds, params = declared(annotation, Bounds), declared(annotation, Params)
        if bounds is not None:
            found[key] = (bounds, bounds.summary(_alternatives(plain[field.name])))
        for name, inner in (params or {}).items():
            found[f"{key}.{name}"] = (inner, inner.summary())
        for candidate in (plain[field.name], *typing.get_args(plain[field.name])):
            if dataclasses.is_dataclass(candidate) and isinstance(candidate, type):
                found.update(ranges(candidate, f"{key}."))
    return found
