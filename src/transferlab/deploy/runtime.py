"""Prediction runtimes behind transferlab-predict and transferlab-serve: one interface, two engines.

- `torch`: the checkpoint or package in PyTorch, with the speed settings training chooses for the hardware
  (bf16 autocast where it runs natively, channels_last), on any device;
- `onnx`: a package's model.onnx in onnxruntime (CPU); this path imports neither Lightning nor the classifier.

Both give float32 calibrated logits of normalised batches, test-time augmentation included (models.tta), and
describe themselves (`metadata`: classes, preprocessing, metrics) the way a package's config.json does.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Optional, Union

import torch

from transferlab.core.errors import DataError, require_packages
from transferlab.core.hardware import choose_flag, choose_precision, forward_context, resolve_device, usable_cores
from transferlab.data.preprocessing import Preprocessing
from transferlab.models import package
from transferlab.models.backbone import is_convolutional
from transferlab.models.tta import averaged_logits

log = logging.getLogger(__name__)


class Predictor:
    """class_names, preprocessing, metadata and `logits(batch)`; `settings` says how it runs (logged, /metadata)."""

    class_names: list[str]
    preprocessing: Preprocessing
    metadata: dict[str, Any]
    settings: dict[str, Any]

    def __init__(self, tta: str) -> None:
        self.tta = tta  # one of models.tta.MODES: the config's schema (or api.load's check) guarantees it

    def view_logits(self, images: torch.Tensor) -> torch.Tensor:
        """Calibrated logits of one batch (one test-time view): the package's output, logits / temperature."""
        raise NotImplementedError

    def logits(self, images: torch.Tensor) -> torch.Tensor:
        """Float32 calibrated logits of [N, 3, S, S] normalised images (log of the averaged probabilities with TTA)."""
        return averaged_logits(self.view_logits, images, self.tta).float()

    def probabilities(self, images: torch.Tensor) -> torch.Tensor:
        return self.logits(images).softmax(dim=-1)


class TorchPredictor(Predictor):
    def __init__(self, ckpt_path: str, device: str, precision: str, channels_last: Union[bool, str], tta: str) -> None:
        super().__init__(tta)
        from transferlab.models.classifier import load_checkpoint

        model, hparams = load_checkpoint(ckpt_path)
        self.device = resolve_device(device)
        gpu = self.device.type == "cuda"
        self.precision = choose_precision(precision, "gpu" if gpu else "cpu")
        model.configure_runtime(channels_last=choose_flag("channels_last", channels_last, is_convolutional(model.backbone)))
        self.model = model.to(self.device).eval()
        self.autocast = forward_context(self.precision, self.device)
        self.class_names, self.preprocessing = list(model.class_names), model.backbone.preprocessing
        if package.is_package(ckpt_path):
            self.metadata = package.read_package(ckpt_path)
        else:
            metrics = package.run_metrics(ckpt_path)
            temperature = float(model.temperature)
            self.metadata = package.package_config(hparams, self.preprocessing, temperature, metrics, {}, "", model.calibration, model.split_table)
        self.metadata.pop("hyper_parameters", None)
        self.settings = {
            "runtime": "torch",
            "device": str(self.device),
            "precision": self.precision,
            "channels_last": model.channels_last,
            "tta": tta,
        }

    def view_logits(self, images: torch.Tensor) -> torch.Tensor:
        with torch.inference_mode(), self.autocast():
            return self.model.calibrated_logits(images.to(self.device, non_blocking=True)).float().cpu()


class OnnxPredictor(Predictor):
    def __init__(self, ckpt_path: str, tta: str, threads: Optional[int]) -> None:
        super().__init__(tta)
        if not package.is_package(ckpt_path):
            raise DataError(
                f"ckpt_path: runtime=onnx needs a model package folder, and {ckpt_path} is not one; "
                f"export it first: transferlab-export ckpt_path={ckpt_path} output=<folder>"
            )
        require_packages("runtime=onnx", "export", "onnxruntime")
        import onnxruntime

        self.metadata = package.read_package(ckpt_path)
        self.metadata.pop("hyper_parameters", None)
        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = int(threads or usable_cores())
        file = package.onnx_file(self.metadata, ckpt_path)
        self.session = onnxruntime.InferenceSession(str(file), options, providers=["CPUExecutionProvider"])
        self.input_name = self.session.get_inputs()[0].name
        self.class_names, self.preprocessing = list(self.metadata["class_names"]), package.preprocessing_of(self.metadata)
        self.settings = {"runtime": "onnx", "device": "cpu", "precision": "32-true", "threads": options.intra_op_num_threads, "tta": tta}

    def view_logits(self, images: torch.Tensor) -> torch.Tensor:
        array = images.detach().to("cpu", torch.float32).contiguous().numpy()
        return torch.from_numpy(self.session.run(None, {self.input_name: array})[0])


def load_runtime(
    ckpt_path: str, runtime: str, device: str, precision: str, channels_last: Union[bool, str], tta: str, threads: Optional[int]
) -> Predictor:
    """The predictor of a checkpoint or package folder. Every value comes from a config (conf/predict.yaml,
    conf/serve.yaml), already checked against its schema, or from `transferlab.api.load`, which checks its own:
    `runtime` torch | onnx, `precision`/`channels_last` as in the training configs (auto), `threads` for onnx."""
    if runtime == "onnx":
        if str(device) not in ("auto", "cpu"):
            raise DataError(f"device={device}: runtime=onnx runs on the CPU here; use runtime=torch for {device}")
        predictor: Predictor = OnnxPredictor(str(ckpt_path), tta, threads)
    else:
        predictor = TorchPredictor(str(ckpt_path), device, precision, channels_last, tta)
    log.info("Model %s: %d classes, %s", Path(ckpt_path).name, len(predictor.class_names), predictor.settings)
    return predictor
