"""Write a model package (models.package) from a checkpoint: safetensors, ONNX, TorchScript, config.json, card.

Every exported format is loaded back and run on sample inputs (batches of 1, 3 and 8: the ONNX batch axis is
dynamic) and must give the checkpoint's own fp32 logits to TOLERANCE (a multi-label model's sigmoid probabilities
too: what its label decisions are made on), else the export fails with one line and the output folder keeps what
it had. Files are written in a staging folder inside the output and moved into
place at the end, so a failed or interrupted export never leaves a package whose files disagree. A finetune=lora
checkpoint's adapters are merged into their layers first (models.lora.merge, checked against the adapted model to
TOLERANCE as well): the package is a plain model, config.json's `lora` says what was merged.

`format` is one format or a list (`all` = onnx + torchscript). `executorch` writes model.pte through
deploy.mobile (imported only then), checked to PTE_TOLERANCE: XNNPACK's kernels sum in another order. quantize=int8
adds model.int8.onnx / model.int8.pte, calibrated and checked on the run's own images (deploy.quantize,
deploy.int8_check) in the same staging folder, so a refused int8 model leaves the output as it was too.
"""

from __future__ import annotations

import importlib
import logging
import os
import shutil
import tempfile
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Optional, Union

import torch
from torch import nn

from transferlab.core.errors import ConfigError, ResourceError, require_packages
from transferlab.core.files import write_json
from transferlab.data.stored_splits import write_csv
from transferlab.deploy.int8_check import plan_int8, quantized
from transferlab.deploy.quantize import Int8Settings
from transferlab.models import lora, package
from transferlab.models.classifier import TransferClassifier, load_checkpoint
from transferlab.models.package_card import model_card

log = logging.getLogger(__name__)

FORMATS = ("onnx", "torchscript", "executorch", "all")  # all: onnx + torchscript (what it meant before executorch)
TOLERANCE = 1e-4  # largest |logit difference| an exported format may have to the checkpoint
PTE_TOLERANCE = 1e-3  # ExecuTorch (XNNPACK): its fused float kernels sum in another order than torch's
CHECK_BATCHES = (1, 3, 8)


class ExportMismatch(ResourceError):
    """An exported format computes something else than the checkpoint (an exporter or runtime bug): exit 1."""


class InferenceNetwork(nn.Module):
    """What a package's model.onnx / model.pt compute: normalised images [N, 3, S, S] -> calibrated logits (a
    multi-label model's divided by each label's own temperature: the buffer is [K] then)."""

    def __init__(self, model: TransferClassifier) -> None:
        super().__init__()
        self.backbone, self.head = model.backbone, model.head
        temperature = model.temperature.detach().clone()
        self.register_buffer("temperature", temperature if model.task.multilabel else temperature.reshape(()))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(images)) / self.temperature


def sample_inputs(size: int, seed: int = 0) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(n, 3, size, size, generator=generator) for n in CHECK_BATCHES]


def largest_difference(expected: list[torch.Tensor], got: list[Any]) -> float:
    return max(float((torch.as_tensor(g).float() - e).abs().max()) for e, g in zip(expected, got))


def checked_outputs(name: str, expected: list[torch.Tensor], got: list[Any], multilabel: bool, tolerance: float = TOLERANCE) -> dict[str, float]:
    """`max_abs_diff` of the logits, checked; a multi-label model's `max_abs_prob_diff` of the sigmoid probabilities
    too (its decisions compare them with thresholds: the figure a consumer cares about)."""
    found = {"max_abs_diff": _checked(name, largest_difference(expected, got), tolerance=tolerance)}
    if multilabel:
        probabilities = [torch.as_tensor(g).float().sigmoid() for g in got]
        found["max_abs_prob_diff"] = _checked(name, largest_difference([e.sigmoid() for e in expected], probabilities), "probability", tolerance)
    return found


def wanted_formats(fmt: Union[str, Sequence[str]]) -> set[str]:
    """`format=onnx`, `format=[onnx,executorch]`, `format=all` as the set of formats to write."""
    given = [fmt] if isinstance(fmt, str) else [str(f) for f in fmt]
    unknown = [f for f in given if f not in FORMATS]
    if unknown or not given:
        raise ConfigError(
            f"format: {unknown[0] if unknown else 'an empty list'!r} is not a format; use {', '.join(FORMATS)} or a list, e.g. format=[onnx,executorch]"
        )
    return {part for f in given for part in (("onnx", "torchscript") if f == "all" else (f,))}


def load_mobile() -> Any:
    """deploy.mobile (ExecuTorch), imported only for format=executorch: its extra is heavy and optional."""
    require_packages("format=executorch (ExecuTorch export and its check)", "mobile", "executorch", "transferlab.deploy.mobile")
    return importlib.import_module("transferlab.deploy.mobile")


def export_onnx(network: InferenceNetwork, file: Path, size: int, opset: int) -> None:
    """TorchScript-based exporter (dynamo=False): one graph, a dynamic batch axis, no onnxscript needed at run time."""
    example = torch.zeros(2, 3, size, size)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the exporter's deprecation and tracer notices
        torch.onnx.export(
            network,
            (example,),
            str(file),
            input_names=["images"],
            output_names=["logits"],
            dynamic_axes={"images": {0: "batch"}, "logits": {0: "batch"}},
            opset_version=opset,
            dynamo=False,
        )


def onnx_logits(file: Path, inputs: list[torch.Tensor]) -> list[Any]:
    import onnxruntime

    session = onnxruntime.InferenceSession(str(file), providers=["CPUExecutionProvider"])
    return [session.run(["logits"], {"images": x.numpy()})[0] for x in inputs]


def export_torchscript(network: InferenceNetwork, file: Path, size: int) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.jit.trace's deprecation notice (torch.export has no C++ loader yet)
        traced = torch.jit.trace(network, torch.zeros(2, 3, size, size), check_trace=False)
    traced.save(str(file))


def torchscript_logits(file: Path, inputs: list[torch.Tensor]) -> list[torch.Tensor]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch.jit.load's deprecation notice
        loaded = torch.jit.load(str(file), map_location="cpu")
    return [loaded(x) for x in inputs]


def _checked(name: str, difference: float, what: str = "logit", tolerance: float = TOLERANCE) -> float:
    if not difference <= tolerance:  # NaN fails too
        raise ExportMismatch(
            f"export: the {name} output differs from the checkpoint's by {difference:.2e} (> {tolerance:g}); nothing was written. "
            f"Try another opset (opset=17) or format, and report the backbone if it persists"
        )
    log.info("Checked %s: largest |%s difference| to the checkpoint %.2e on batches of %s", name, what, difference, CHECK_BATCHES)
    return difference


def merge_adapters(model: TransferClassifier, network: InferenceNetwork, inputs: list[torch.Tensor], expected: list[torch.Tensor]) -> dict[str, Any]:
    """finetune=lora: fold the adapters into their layers (a package is a plain model), checked against the adapted
    model's logits to TOLERANCE; {} for any other model."""
    layers = lora.merge(model)
    if not layers:
        return {}
    with torch.inference_mode():
        difference = _checked("model with merged LoRA adapters", largest_difference(expected, [network(x) for x in inputs]))
    return {"merged_layers": layers, "max_abs_diff": difference, "finetune": dict(model.hparams["finetune"]["lora"])}


def export_package(ckpt_path: str, output: Path, fmt: Union[str, Sequence[str]], opset: int, int8: Optional[Int8Settings] = None) -> dict[str, Any]:
    """Write the package into `output` (created; an earlier package there is replaced); returns its config.json.
    `int8`: quantize=int8's settings (None: no int8 files)."""
    wanted = wanted_formats(fmt)
    if "onnx" in wanted:
        require_packages("format=onnx (ONNX export and its check)", "export", "onnx", "onnxruntime")
    mobile = load_mobile() if "executorch" in wanted else None
    model, hparams = load_checkpoint(ckpt_path)
    model = model.float().eval()
    multilabel = bool(model.task.multilabel)
    run = dict(hparams.get("run") or {})
    images = plan_int8(multilabel, model.split_table, wanted, int8, int(run.get("seed") or 0)) if int8 else None
    size = model.backbone.preprocessing.input_size
    network = InferenceNetwork(model).eval()
    inputs = sample_inputs(size)
    with torch.inference_mode():
        expected = [network(x) for x in inputs]
    merged = merge_adapters(model, network, inputs, expected)
    if merged:
        hparams = {**hparams, "finetune": dict(model.hparams["finetune"])}  # finetune.lora.merged: rebuilt as a plain model
    created = not output.exists()
    output.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".export-", dir=output))
    try:
        formats: dict[str, Any] = {"safetensors": {"file": package.WEIGHTS}}
        config = package.model_config(model, hparams, package.run_metrics(ckpt_path), formats, package.transferlab_version())
        package.save_weights(model, staging / package.WEIGHTS)
        if model.split_table is not None:
            write_csv(staging / package.SPLITS, model.split_table)
        write_json(staging / package.CONFIG, config)
        reloaded, _ = load_checkpoint(staging)
        with torch.inference_mode():
            formats["safetensors"].update(checked_outputs("safetensors", expected, [InferenceNetwork(reloaded)(x) for x in inputs], multilabel))
        if "onnx" in wanted:
            export_onnx(network, staging / package.ONNX, size, opset)
            found = checked_outputs("ONNX (onnxruntime)", expected, onnx_logits(staging / package.ONNX, inputs), multilabel)
            formats["onnx"] = {"file": package.ONNX, "opset": opset, "input": "images", "output": "logits", **found}
        if "torchscript" in wanted:
            export_torchscript(network, staging / package.TORCHSCRIPT, size)
            with torch.inference_mode():
                found = checked_outputs("TorchScript", expected, torchscript_logits(staging / package.TORCHSCRIPT, inputs), multilabel)
            formats["torchscript"] = {"file": package.TORCHSCRIPT, "kind": "torch.jit.trace", **found}
        if mobile is not None:
            info = dict(mobile.export_pte(network, staging / package.PTE, size))
            found = checked_outputs("ExecuTorch", expected, mobile.pte_logits(staging / package.PTE, inputs), multilabel, PTE_TOLERANCE)
            formats["executorch"] = {"file": package.PTE, "input": "images", "output": "logits", **info, **found, "tolerance": PTE_TOLERANCE}
        if images is not None and int8 is not None:
            prep, names = model.backbone.preprocessing, model.class_names
            int8_formats, int8_keys = quantized(network, staging, wanted, images, int8, prep, run.get("data") or {}, names, mobile)
            formats.update(int8_formats)
            config.update(int8_keys)
        config["formats"] = formats
        if merged:
            config["lora"] = merged
        config["export_check"] = {"tolerance": TOLERANCE, "batches": list(CHECK_BATCHES), "inputs": "seeded standard normal, float32"}
        if mobile is not None:
            config["export_check"]["tolerance_executorch"] = PTE_TOLERANCE
        write_json(staging / package.CONFIG, config)
        (staging / package.CARD).write_text(model_card(config))
        _move_into(staging, output)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
        if created and output.is_dir() and not any(output.iterdir()):
            output.rmdir()  # a failed export into a new folder leaves no empty folder behind either
    return config


def _move_into(staging: Path, output: Path) -> None:
    """Replace the package files in `output`; a format file this export did not write is removed (it would be stale)."""
    for name in package.OPTIONAL_FILES:
        if not (staging / name).exists():
            (output / name).unlink(missing_ok=True)
    for file in sorted(staging.iterdir(), key=lambda f: f.name == package.CONFIG):  # config.json last: it names the rest
        file.chmod(0o644)
        os.replace(file, output / file.name)
