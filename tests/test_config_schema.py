"""One source of truth for config: the YAML holds every default, the schemas only shapes and ranges, and the two
cannot drift.

Each command's composed config (with every option of every group it composes) validates against its schema;
the schemas carry no default values; transferlab's own `_target_` classes, and the runtime and server settings
the commands build, take every value the YAML sets without a Python default of their own; a key the schema does
not know, or one the YAML lost, fails; and every range the schema declares is the one the checker enforces and
the configuration reference lists.
"""

from __future__ import annotations

import copy
import dataclasses
import inspect
import typing
from pathlib import Path
from typing import Any

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.hydra_config import HydraConfig
from hydra.utils import get_object
from omegaconf import DictConfig, OmegaConf, open_dict

from transferlab.cli.app import group_options
from transferlab.config.limits import ranges
from transferlab.config.paths import config_dir
from transferlab.config.schema import COMMANDS
from transferlab.config.validation import check_arguments, validate, validate_values
from transferlab.core.bounds import Bounds
from transferlab.core.errors import ConfigError
from transferlab.core.settings import IdealSettings
from transferlab.deploy.admission import Budgets
from transferlab.deploy.runtime import load_runtime
from transferlab.deploy.server import ServeSettings

CONF = Path(config_dir())
REQUIRED = {
    "train": [],
    "eval": ["ckpt_path=x.ckpt"],
    "predict": ["ckpt_path=x.ckpt", "input=in"],
    "visualize": ["target=zebra"],
    "attack": ["input=dog.jpg", "target=zebra"],
    "serve": ["ckpt_path=x.ckpt"],
    "export": ["ckpt_path=x.ckpt", "output=pkg"],
}
GROUPS = {
    "train": [
        "data",
        "backbone",
        "finetune",
        "optimizer",
        "scheduler",
        "trainer",
        "performance",
        "logger",
        "callbacks",
        "experiment",
        "hparams_search",
    ],
    "eval": ["trainer", "logger", "callbacks"],
    "predict": [],
    "visualize": ["backbone"],
    "attack": ["backbone"],
}


def composed(command: str, *overrides: str, tmp_path: Path) -> DictConfig:
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose(command, overrides=[*REQUIRED.get(command, []), *overrides, f"hydra.run.dir={tmp_path}"], return_hydra_config=True)
    with open_dict(cfg):
        cfg.hydra.runtime.output_dir = str(tmp_path)
    HydraConfig.instance().set_config(cfg)
    with open_dict(cfg):
        del cfg["hydra"]
    return cfg


def extra_for(group: str, option: str) -> list[str]:
    if (group, option) == ("backbone", "custom"):
        return ["backbone.name=convnext_tiny"]
    if (group, option) == ("data", "image_folder"):
        return ["data.root=/some/folder"]
    if (group, option) == ("data", "hf_dataset"):
        return ["data.path=microsoft/cats_vs_dogs"]
    return []


CASES = [
    (command, group, option) for command, groups in GROUPS.items() for group in groups for option in group_options(CONF / group) if "/" not in option
]
CASES += [(command, None, None) for command in GROUPS]


@pytest.mark.parametrize("command,group,option", CASES, ids=[f"{c}:{g}={o}" if g else f"{c}:defaults" for c, g, o in CASES])
def test_every_composed_config_matches_its_schema(tmp_path, command, group, option):
    overrides = [f"{group}={option}", *extra_for(group, option)] if group else []
    validate(composed(command, *overrides, tmp_path=tmp_path), command)


def _schemas(schema: type, seen: set[type]) -> set[type]:
    """A schema dataclass and every dataclass its fields refer to."""
    if schema in seen:
        return seen
    seen.add(schema)
    for annotation in typing.get_type_hints(schema).values():
        for candidate in (annotation, *typing.get_args(annotation)):
            if dataclasses.is_dataclass(candidate):
                _schemas(candidate, seen)  # type: ignore[arg-type]
    return seen


def test_schemas_hold_no_default_values():
    schemas = set().union(*(_schemas(s, set()) for s in COMMANDS.values())) | {IdealSettings}
    with_defaults = [
        f"{s.__name__}.{f.name}"
        for s in schemas
        for f in dataclasses.fields(s)
        if f.default is not dataclasses.MISSING or f.default_factory is not dataclasses.MISSING
    ]
    assert not with_defaults, f"defaults belong in the YAML under conf/, not in the schema: {with_defaults}"


def _target_nodes(values: Any, key: str = "") -> list[tuple[str, dict]]:
    if not isinstance(values, dict):
        return []
    found = [(key, values)] if "_target_" in values else []
    return found + [n for k, v in values.items() for n in _target_nodes(v, f"{key}.{k}" if key else k)]


@pytest.mark.parametrize("command", list(GROUPS))
def test_our_classes_take_their_values_from_the_yaml_only(tmp_path, command):
    """Where the YAML sets a parameter of one of transferlab's own classes, the class has no default of its own."""
    nodes = []
    for cmd, group, option in CASES:
        if cmd == command:
            overrides = [f"{group}={option}", *extra_for(group, option)] if group else []
            values = OmegaConf.to_container(composed(command, *overrides, tmp_path=tmp_path), resolve=True)
            nodes += _target_nodes(values)
    ours = [(key, node) for key, node in nodes if str(node["_target_"]).startswith("transferlab.")]
    assert ours or command in ("predict", "visualize", "attack")
    doubled = set()
    for key, node in ours:
        cls = get_object(node["_target_"])
        for klass in inspect.getmro(cls):
            if "__init__" not in vars(klass) or not klass.__module__.startswith("transferlab."):
                continue
            for name, param in inspect.signature(klass.__init__).parameters.items():
                if name in node and param.default is not param.empty:
                    doubled.add(f"{key}.{name} ({klass.__name__} says {param.default!r})")
    assert not doubled, f"a second default in Python beside the YAML's: {sorted(doubled)}"


def test_dataset_options_extend_one_base_config():
    base = OmegaConf.load(CONF / "data" / "_base.yaml")
    for option in group_options(CONF / "data"):
        text = OmegaConf.load(CONF / "data" / f"{option}.yaml")
        assert "_base" in list(text.defaults), option
        repeated = [k for k in text if k not in ("defaults", "_target_") and k in base and text[k] == base[k]]
        assert not repeated, f"conf/data/{option}.yaml repeats {repeated} from _base.yaml"


def test_a_key_the_schema_does_not_know_or_one_the_yaml_lost_fails(tmp_path):
    cfg = composed("train", tmp_path=tmp_path)
    with open_dict(cfg):
        cfg.finetune.head_dropuot = 0.1
    with pytest.raises(ConfigError, match=r"finetune.head_dropuot: unknown key \(did you mean: head_dropout\?\)"):
        validate(cfg, "train")
    cfg = composed("train", tmp_path=tmp_path)
    with open_dict(cfg):
        del cfg.finetune["backbone_lr_factor"]
    with pytest.raises(ConfigError, match="finetune.backbone_lr_factor: required value is missing"):
        validate(cfg, "train")
    cfg = composed("train", tmp_path=tmp_path)
    with open_dict(cfg):
        del cfg.data["val_fraction"]
    with pytest.raises(ConfigError, match=r"data.val_fraction: required value is missing \(transferlab.data.oxford_pets"):
        validate(cfg, "train")


@pytest.mark.parametrize(
    "command,override,message",
    [
        ("predict", "topk=0", "topk: expected an integer >= 1"),
        ("visualize", "steps=0", "steps: expected an integer >= 1"),
        ("visualize", "parameterization=fourierr", "parameterization: expected one of fourier, pixel"),
        ("attack", "stop_prob=1.5", "stop_prob: expected a probability in (0, 1]"),
        ("eval", "data.batch_size=many", "data.batch_size: expected int or null"),
        ("eval", "+data.val_fraction=0.3", None),  # eval passes any data key on to the stored dataset config
        ("train", "finetune.select_c=null", "finetune.select_c: head_solver=lbfgs needs how C is chosen"),
        ("train", "finetune.c_folds=null", "finetune.c_folds: select_c=cv needs the number of inner folds"),
        ("train", "paths.cache_dir=null", "performance.feature_cache.storage=disk needs paths.cache_dir; set it or use storage=memory"),
        ("train", "finetune=full paths.cache_dir=null", None),  # the cache serves frozen features only
        ("train", "finetune.c_folds=1", "finetune.c_folds: expected an integer >= 2 or null (inner folds that choose the probe's C), got 1"),
        ("serve", "max_batch=0", "max_batch: expected an integer >= 1 (images per forward pass), got 0"),
        ("export", "opset=9", "opset: expected an ONNX opset in [13, 23], e.g. opset=18, got 9"),
    ],
)
def test_every_command_is_validated_the_same_way(tmp_path, command, override, message):
    cfg = composed(command, *override.split(), tmp_path=tmp_path)
    if message is None:
        validate(cfg, command)
        return
    with pytest.raises(ConfigError) as info:
        validate(cfg, command)
    assert str(info.value).startswith(message), str(info.value)


def _outside(bounds: Bounds) -> float:
    """A value just outside the range (below it when it has a lower bound)."""
    if bounds.ge is not None:
        return bounds.ge - 1
    if bounds.gt is not None:
        return bounds.gt
    return bounds.le + 1 if bounds.le is not None else bounds.lt  # type: ignore[operator,return-value]


def _inside(bounds: Bounds) -> float:
    """The range's own edge where it is closed, else a value past the open edge."""
    for edge in (bounds.ge, bounds.le):
        if edge is not None:
            return edge
    if bounds.gt is not None and bounds.lt is not None:  # open at both ends: the middle
        return (bounds.gt + bounds.lt) / 2
    return bounds.gt + 1 if bounds.gt is not None and bounds.lt is None else bounds.lt - 1  # type: ignore[operator]


def _set(values: dict, dotted: str, value: Any) -> dict:
    node = values
    *parents, last = dotted.split(".")
    for part in parents:
        node = node[part]
    node[last] = value
    return values


RANGE_CASES = [(c, []) for c in COMMANDS if c != "report"] + [
    ("train", ["optimizer=sgd"]),
    ("train", ["finetune=lora"]),
    ("train", ["finetune=distill"]),
]


def test_every_declared_range_is_enforced_in_the_words_the_reference_prints(tmp_path):
    """For every range on every command's schema (core.bounds on a field, Params on a `_target_` node): a value
    just outside fails with `key: expected <form>, got <value>` in the range's words (the reference's column),
    and the range's edge passes."""
    declared = {key for command in COMMANDS for key in ranges(COMMANDS[command])}
    exercised = set()
    for command, overrides in RANGE_CASES:
        base = OmegaConf.to_container(composed(command, *overrides, tmp_path=tmp_path), resolve=True)
        for key, (bounds, words) in ranges(COMMANDS[command]).items():
            try:
                node: Any = base
                for part in key.split(".")[:-1]:
                    node = node[part]
                if key.split(".")[-1] not in node:
                    continue  # a group option without this parameter (momentum beside adam)
            except (KeyError, TypeError):
                continue
            exercised.add(key)
            bad = _outside(bounds)
            with pytest.raises(ConfigError) as info:
                validate_values(_set(copy.deepcopy(base), key, bad), command)
            message = str(info.value)
            assert message.startswith(f"{key}: expected ") and message.endswith(f"got {bad!r}"), message
            assert bounds.range() in message and bounds.note in message, (words, message)
            validate_values(_set(copy.deepcopy(base), key, _inside(bounds)), command)
    assert exercised == declared, f"ranges no composed config has: {sorted(declared - exercised)}"


def test_the_runtime_and_server_settings_take_every_value_from_the_yaml():
    """load_runtime and ServeSettings have no default of their own: each value is a key of conf/predict.yaml and
    conf/serve.yaml (max_request_bytes: serve's max_request_mb in bytes; budgets: four keys; keys: read from
    api_key and api_keys_file)."""
    runtime = inspect.signature(load_runtime).parameters
    assert [n for n, p in runtime.items() if p.default is not p.empty] == []
    serve = OmegaConf.load(CONF / "serve.yaml")
    predict = OmegaConf.load(CONF / "predict.yaml")
    assert {n for n in runtime if n != "ckpt_path"} <= set(serve) & set(predict)
    fields = dataclasses.fields(ServeSettings)
    assert [f.name for f in fields if f.default is not dataclasses.MISSING] == []
    assert {f.name for f in fields} - set(serve) == {"max_request_bytes", "budgets", "keys"} and "max_request_mb" in serve
    budgets = dataclasses.fields(Budgets)
    assert [f.name for f in budgets if f.default is not dataclasses.MISSING] == [] and {f.name for f in budgets} <= set(serve)
    assert {"api_key", "api_keys_file"} <= set(serve)  # `keys`: read from both


@pytest.mark.parametrize(
    "values,message",
    [
        ({"runtime": "torch", "device": "auto", "precision": "auto", "tta": "none"}, None),
        ({"tta": "hflp"}, "tta: expected one of none, hflip, five_crop, got 'hflp' (str) (did you mean: hflip?)"),
        ({"runtime": "tf"}, "runtime: expected one of torch, onnx, got 'tf' (str)"),
        ({"threads": 0}, "threads: expected an integer >= 1 or null (null: every usable core), got 0"),
        ({"topk": 0}, "topk: expected an integer >= 1, got 0"),
    ],
)
def test_values_given_from_python_are_checked_by_the_same_schema(values, message):
    """transferlab.api.load's arguments against conf/predict.yaml's schema: what deploy.runtime no longer re-checks."""
    if message is None:
        check_arguments("predict", values)
        return
    with pytest.raises(ConfigError) as info:
        check_arguments("predict", values)
    assert str(info.value) == message
