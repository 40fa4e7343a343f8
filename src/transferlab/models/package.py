"""The model package: a folder a trained model lives in outside transferlab (transferlab-export writes it).

    model.safetensors   the classifier's weights (backbone, head, calibration temperature): no pickle
    config.json         what a consumer needs: classes, preprocessing, temperature, the run's metrics, formats
    model.onnx          float32 NCHW normalised images -> logits (dynamic batch)       [format=onnx|all]
    model.int8.onnx     the same, int8 (static QDQ, calibrated on training images)     [format=onnx quantize=int8]
    model.pt            the same network as TorchScript (torch.jit.load, C++ too)     [format=torchscript|all]
    model.pte           the same network for ExecuTorch (XNNPACK), model.int8.pte int8 [format=executorch]
    int8_calibration.txt  the training files the int8 models were calibrated on        [quantize=int8]
    README.md           the model card (models.package_card)
    splits.csv          the run's stored split (data.stored_splits): what eval of the package tests on

A consumer's preprocessing is exactly: RGB; resize the shorter side to `resize_size` with `interpolation`;
centre-crop `input_size`; scale to [0, 1]; normalise with `mean` / `std`. The outputs are the classifier's
logits already divided by `temperature` (`logits_are_calibrated`: the temperature was chosen on held-out images,
whatever value the rule kept; `calibration` says how). `task` says how to read them: `single` (softmax, one class
per image) or `multilabel` (a sigmoid per label; `temperature` and `thresholds` map each label to its own, and an
image holds every label whose probability is at or over its threshold). A package without `task` is single-label.
This module reads and writes the format without importing Lightning, so an onnxruntime consumer needs no
training stack; `models.classifier.load_checkpoint` turns a package back into the LightningModule.
"""

from __future__ import annotations

import importlib.metadata
import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Optional

from torch import nn

from transferlab.core.errors import DataError
from transferlab.core.safe_load import read_checkpoint
from transferlab.data import stored_splits
from transferlab.data.preprocessing import Preprocessing

CONFIG, WEIGHTS, ONNX, TORCHSCRIPT, CARD = "config.json", "model.safetensors", "model.onnx", "model.pt", "README.md"
SPLITS = stored_splits.FILE
INT8_ONNX, PTE, INT8_PTE, INT8_CALIBRATION = "model.int8.onnx", "model.pte", "model.int8.pte", "int8_calibration.txt"
# Files an export writes only when asked (format, quantize): one it did not write this time is stale and removed.
OPTIONAL_FILES = (ONNX, TORCHSCRIPT, SPLITS, INT8_ONNX, PTE, INT8_PTE, INT8_CALIBRATION)
FORMAT_VERSION = 1
TASKS = ("single", "multilabel")
DEFAULT_THRESHOLD = 0.5  # a multi-label decision where none was chosen on held-out images (as the classifier's metrics)
# The consumer's contract (issue 17's stable interface): config.json always has these keys.
INTERFACE_KEYS = ("class_names", "input_size", "resize_size", "interpolation", "mean", "std", "temperature", "logits_are_calibrated")


def transferlab_version() -> str:
    """The installed transferlab's version: what a package records and what the server answers with."""
    try:
        return importlib.metadata.version("transferlab")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def is_package(path: str | Path) -> bool:
    folder = Path(path).expanduser()
    return folder.is_dir() and (folder / CONFIG).is_file()


def read_package(path: str | Path, key: str = "ckpt_path") -> dict[str, Any]:
    """config.json of a package folder, checked for the keys every consumer relies on."""
    folder = Path(path).expanduser()
    try:
        config = json.loads((folder / CONFIG).read_text())
    except (OSError, ValueError) as exc:
        raise DataError(f"{key}: {folder / CONFIG} is not readable JSON ({exc}); export the model again with transferlab-export") from None
    missing = [k for k in INTERFACE_KEYS if k not in config] if isinstance(config, dict) else list(INTERFACE_KEYS)
    if missing:
        raise DataError(f"{key}: {folder} is not a transferlab model package ({CONFIG} lacks {', '.join(missing)})")
    return config


def preprocessing_of(config: Mapping[str, Any]) -> Preprocessing:
    """The eval pipeline a package describes (crop_pct from input_size / resize_size when absent)."""
    crop = config.get("crop_pct") or float(config["input_size"]) / float(config["resize_size"])
    return Preprocessing(
        input_size=int(config["input_size"]),
        interpolation=str(config["interpolation"]),
        crop_pct=float(crop),
        mean=tuple(config["mean"]),
        std=tuple(config["std"]),
    )


def run_metrics(ckpt_path: str | Path) -> dict[str, Any]:
    """metrics.json of the run a checkpoint belongs to (<run>/checkpoints/best.ckpt -> <run>/metrics.json), if any."""
    ckpt = Path(ckpt_path).expanduser().resolve()
    for folder in (ckpt.parent.parent, ckpt.parent) if ckpt.is_file() else (ckpt,):
        found = folder / "metrics.json"
        if found.is_file():
            try:
                values = json.loads(found.read_text())
            except ValueError:
                return {}
            return {k: v for k, v in values.items() if k.startswith(("test/", "val/", "cv/", "calibration/")) and "/acc_class/" not in k}
    return {}


def task_of(config: Mapping[str, Any], key: str = "ckpt_path") -> str:
    """`single` or `multilabel`: how a package's outputs are read (packages from before multi-label have no `task`)."""
    task = config.get("task") or "single"
    if task not in TASKS:
        raise DataError(f"{key}: config.json's task is {task!r}, not single or multilabel; export the model again with transferlab-export")
    return str(task)


def label_thresholds(config: Mapping[str, Any]) -> list[float]:
    """A multi-label package's decision threshold per label, in class_names order (DEFAULT_THRESHOLD where none is given)."""
    given = config.get("thresholds") or {}
    return [float(given.get(name, DEFAULT_THRESHOLD)) for name in config["class_names"]]


def is_calibrated(calibration: Mapping[str, Any], metrics: Mapping[str, Any], temperature: float | Sequence[float]) -> bool:
    """Whether calibration=temperature chose the temperature on held-out images (the checkpoint's record first)."""
    if "calibrated" in calibration:
        return bool(calibration["calibrated"])
    if "calibration/rule" in metrics:
        return metrics["calibration/rule"] not in ("none", "no_held_out_images")
    values = [temperature] if isinstance(temperature, (int, float)) else list(temperature)
    return not all(math.isclose(t, 1.0) for t in values)  # a checkpoint from before the record: only a fitted temperature differs from 1


def package_config(
    hparams: Mapping[str, Any],
    preprocessing: Preprocessing,
    temperature: float | Sequence[float],
    metrics: Mapping[str, Any],
    formats: Mapping[str, Any],
    version: str,
    calibration: Optional[Mapping[str, Any]] = None,
    split_table: Optional[Mapping[str, Any]] = None,
    thresholds: Optional[Mapping[str, float]] = None,
) -> dict[str, Any]:
    """config.json: the consumer's interface keys first, then provenance (backbone, run, split, metrics) and the formats.
    A multi-label model (hparams' `task`) gives `temperature` one per label and `thresholds` (label -> threshold on
    the calibrated probability; DEFAULT_THRESHOLD for a label without one), both keyed by label name."""
    run = dict(hparams.get("run") or {})
    names = list(hparams["class_names"])
    multilabel = (hparams.get("task") or "single") == "multilabel"
    calibrated = is_calibrated(calibration or {}, metrics, temperature)
    values = [float(temperature)] if isinstance(temperature, (int, float)) else [float(t) for t in temperature]
    shown: Any = values[0] if not multilabel else dict(zip(names, values * len(names) if len(values) == 1 else values))
    decisions: dict[str, Any] = {}
    meaning = "logits / temperature; softmax gives the class probabilities"
    if multilabel:
        decisions["thresholds"] = {name: float((thresholds or {}).get(name, DEFAULT_THRESHOLD)) for name in names}
        meaning = (
            "logits / temperature (one per label); sigmoid gives each label's probability, and an image holds every label "
            "whose probability is at or over thresholds[label]"
        )
    return {
        "class_names": names,
        "task": "multilabel" if multilabel else "single",
        "input_size": preprocessing.input_size,
        "resize_size": preprocessing.resize_size,
        "interpolation": preprocessing.interpolation,
        "crop_pct": preprocessing.crop_pct,
        "mean": list(preprocessing.mean),
        "std": list(preprocessing.std),
        "temperature": shown,
        "logits_are_calibrated": bool(calibrated),
        **decisions,
        "input": {"name": "images", "dtype": "float32", "layout": "NCHW", "normalised": True, "channels": "RGB"},
        "output": {"name": "logits", "meaning": meaning},
        "backbone": {k: hparams["backbone"].get(k) for k in ("name", "source", "weights", "input_size", "pool")},
        "finetune_mode": (hparams.get("finetune") or {}).get("mode"),
        "data": {k: (run.get("data") or {}).get(k) for k in ("_target_", "root", "task", "val_fraction", "test_fraction")},
        "seed": run.get("seed"),
        "calibration": dict(calibration or {}),
        "splits": {**stored_splits.counts(split_table), "root": split_table.get("root"), "file": SPLITS} if split_table else None,
        "metrics_images": metrics_images(metrics, split_table),
        "metrics": dict(metrics),
        "formats": dict(formats),
        "transferlab_version": version,
        "format_version": FORMAT_VERSION,
        "hyper_parameters": jsonable(dict(hparams)),  # what models.classifier needs to rebuild the LightningModule
    }


def model_config(model: Any, hparams: Mapping[str, Any], metrics: Mapping[str, Any], formats: Mapping[str, Any], version: str) -> dict[str, Any]:
    """package_config of a loaded classifier: its temperature(s), calibration record, label thresholds and stored split,
    so export and the runtimes describe a model the same way."""
    multilabel = bool(model.task.multilabel)
    temperature = model.temperature.detach().float().cpu().reshape(-1).tolist()
    return package_config(
        {**hparams, "task": "multilabel" if multilabel else "single"},
        model.backbone.preprocessing,
        temperature if multilabel else temperature[0],
        metrics,
        formats,
        version,
        model.calibration,
        model.split_table,
        model.thresholds if multilabel else None,
    )


def metrics_images(metrics: Mapping[str, Any], split_table: Optional[Mapping[str, Any]]) -> str:
    """Which images `metrics`' test/* figures come from, so a card never passes out-of-fold figures off as a test."""
    if not any(k.startswith("test/") for k in metrics):
        return "none: the run has no test figures"
    if "cv/folds" in metrics and (split_table is None or not stored_splits.counts(split_table)["test"]):
        return f"out-of-fold predictions of {metrics.get('cv/folds')}-fold cross-validation over {metrics.get('cv/images')} images (the model was refit on all of them)"
    tested = stored_splits.counts(split_table)["test"] if split_table else None
    return f"the run's test split ({tested} stored test images)" if tested is not None else "the run's test split"


def read_split_table(folder: str | Path) -> Optional[dict[str, Any]]:
    """The package's splits.csv as a table (its data root from config.json), or None for packages without one."""
    file = Path(folder).expanduser() / SPLITS
    if not file.is_file():
        return None
    table = stored_splits.read_csv(file)
    table["root"] = ((read_package(folder).get("splits") or {}).get("root")) if is_package(folder) else None
    return table


def load_split_table(source: str | Path, key: str = "splits") -> dict[str, Any]:
    """A run's stored split from its splits.csv, its run folder, a checkpoint or a model package."""
    path = Path(source).expanduser()
    if path.is_dir() and (path / SPLITS).is_file():
        return stored_splits.read_csv(path / SPLITS)
    if path.is_file() and path.suffix == ".csv":
        return stored_splits.read_csv(path)
    if path.is_file():
        try:
            table = read_checkpoint(path, key).get("transferlab_splits")
        except DataError:  # not a checkpoint at all
            table = None
        if table:
            return dict(table)
    raise DataError(f"{key}: {path} holds no stored split; give a run's splits.csv, its run folder, or a checkpoint written since splits are stored")


def jsonable(value: Any) -> Any:
    """Hyper-parameters as JSON (they are plain containers already; anything else becomes its text)."""
    return json.loads(json.dumps(value, default=str))


def save_weights(model: nn.Module, file: Path) -> None:
    """The state_dict as safetensors (tied tensors stored once: safetensors.torch.save_model)."""
    from safetensors.torch import save_model

    save_model(model, str(file), metadata={"format": "pt", "producer": "transferlab"})


def load_weights(model: nn.Module, folder: str | Path, key: str = "ckpt_path") -> None:
    from safetensors.torch import load_model

    file = Path(folder).expanduser() / WEIGHTS
    if not file.is_file():
        raise DataError(f"{key}: {file} is missing; this package has no weights for torch (export it again with transferlab-export)")
    try:
        missing, unexpected = load_model(model, str(file), strict=False)
    except Exception as exc:  # noqa: BLE001 - a truncated or foreign file: one line
        raise DataError(f"{key}: {file} is not readable safetensors of this model ({' '.join(str(exc).split())[:200]})") from None
    if missing or unexpected:
        raise DataError(f"{key}: {file} does not match the model in {CONFIG} (missing {list(missing)[:3]}, unexpected {list(unexpected)[:3]})")


def onnx_file(config: Mapping[str, Any], folder: str | Path, key: str = "ckpt_path", int8: bool = False) -> Path:
    """model.onnx, or with `int8` model.int8.onnx (precision=int8): one line saying how to export it when absent."""
    name, default = ("onnx_int8", INT8_ONNX) if int8 else ("onnx", ONNX)
    info = (config.get("formats") or {}).get(name)
    file = Path(folder).expanduser() / str(info.get("file", default) if isinstance(info, Mapping) else default)
    if not info or not file.is_file():
        how = "format=onnx quantize=int8, or use precision=auto (fp32)" if int8 else "format=onnx (or all), or use runtime=torch"
        raise DataError(f"{key}: {Path(folder)} has no {file.name}; export with {how}")
    return file


def hyper_parameters(config: Mapping[str, Any], folder: Path, key: str = "ckpt_path") -> dict[str, Any]:
    found: Optional[Mapping[str, Any]] = config.get("hyper_parameters")
    if not isinstance(found, Mapping) or "backbone" not in found:
        raise DataError(f"{key}: {folder / CONFIG} has no hyper_parameters; it is usable with runtime=onnx only")
    task = task_of({"task": config.get("task") or found.get("task")}, key)  # the head the package was exported with
    return {**found, "task": task}
