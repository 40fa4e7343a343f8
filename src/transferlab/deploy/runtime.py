"""Prediction runtimes behind transferlab-predict and transferlab-serve: one interface, two engines.

- `torch`: the checkpoint or package in PyTorch, with the speed settings training chooses for the hardware
  (bf16 autocast where it runs natively, channels_last), on any device;
- `onnx`: a package's model.onnx in onnxruntime (CPU); this path imports neither Lightning nor the classifier.
  `precision=int8` runs its model.int8.onnx instead (transferlab-export quantize=int8); `auto` stays fp32: int8
  changes answers (config.json's int8_agreement says how often), so it is only ever chosen by name.

Both give float32 calibrated logits of normalised batches, test-time augmentation included (models.tta), and
describe themselves (`metadata`: classes, preprocessing, metrics) the way a package's config.json does. A
multi-label model (`multilabel`) gives a sigmoid per label, its test-time views averaged as probabilities per
label (as models.tasks.MultiLabel.combine_views), and decides each label at its own threshold (`label_sets`).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Optional, Union

import torch

from transferlab.core.errors import DataError, require_packages
from transferlab.core.hardware import choose_flag, choose_precision, forward_context, resolve_device, usable_cores
from transferlab.data.labels import over_thresholds
from transferlab.data.preprocessing import Preprocessing
from transferlab.models import package
from transferlab.models.backbone import is_convolutional
from transferlab.models.tta import averaged_logits, mean_sigmoids, views

log = logging.getLogger(__name__)


class Predictor:
    """class_names, preprocessing, metadata and `logits(batch)`; `settings` says how it runs (logged, /metadata).
    `multilabel` and `thresholds` (one per label, class_names order) come from the model or package: set by the
    subclasses before any prediction."""

    class_names: list[str]
    preprocessing: Preprocessing
    metadata: dict[str, Any]
    settings: dict[str, Any]
    multilabel: bool = False
    thresholds: list[float]

    def __init__(self, tta: str) -> None:
        self.tta = tta  # one of models.tta.MODES: the config's schema (or api.load's check) guarantees it

    def view_logits(self, images: torch.Tensor) -> torch.Tensor:
        """Calibrated logits of one batch (one test-time view): the package's output, logits / temperature."""
        raise NotImplementedError

    def logits(self, images: torch.Tensor) -> torch.Tensor:
        """Float32 calibrated logits of [N, 3, S, S] normalised images (with TTA: the log of the views' averaged
        softmax, or for a multi-label model the logit of each label's averaged sigmoid)."""
        if not self.multilabel:
            return averaged_logits(self.view_logits, images, self.tta).float()
        return torch.logit(self._label_probabilities(images).double(), eps=1e-12).float()

    def probabilities(self, images: torch.Tensor) -> torch.Tensor:
        """[N, K] calibrated probabilities: softmax over the classes, or a sigmoid per label (multi-label)."""
        return self._label_probabilities(images) if self.multilabel else self.logits(images).softmax(dim=-1)

    def _label_probabilities(self, images: torch.Tensor) -> torch.Tensor:
        """Each label's sigmoid averaged over the test-time views (models.tta.mean_sigmoids, as the test step)."""
        return mean_sigmoids([self.view_logits(batch) for batch in views(images, self.tta)])

    def label_sets(self, probabilities: torch.Tensor) -> list[list[str]]:
        """A multi-label model's predicted set per image: the labels at or over their threshold, in class order."""
        decided = over_thresholds(probabilities.detach().cpu().double().numpy(), self.thresholds)
        return [[name for name, on in zip(self.class_names, row) if on] for row in decided]


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
            self.metadata["task"] = package.task_of(self.metadata)
        else:
            self.metadata = package.model_config(model, hparams, package.run_metrics(ckpt_path), {}, "")
        self.metadata.pop("hyper_parameters", None)
        self.multilabel = bool(model.task.multilabel)
        self.thresholds = [float(model.thresholds.get(name, package.DEFAULT_THRESHOLD)) for name in self.class_names]
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
    def __init__(self, ckpt_path: str, tta: str, threads: Optional[int], int8: bool) -> None:
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
        file = package.onnx_file(self.metadata, ckpt_path, int8=int8)
        self.session = onnxruntime.InferenceSession(str(file), options, providers=["CPUExecutionProvider"])
        self.input_name = self.session.get_inputs()[0].name
        self.class_names, self.preprocessing = list(self.metadata["class_names"]), package.preprocessing_of(self.metadata)
        self.metadata["task"] = package.task_of(self.metadata)
        self.multilabel, self.thresholds = self.metadata["task"] == "multilabel", package.label_thresholds(self.metadata)
        self.settings = {
            "runtime": "onnx",
            "device": "cpu",
            "precision": "int8" if int8 else "32-true",
            "model": file.name,
            "threads": options.intra_op_num_threads,
            "tta": tta,
        }

    def view_logits(self, images: torch.Tensor) -> torch.Tensor:
        array = images.detach().to("cpu", torch.float32).contiguous().numpy()
        return torch.from_numpy(self.session.run(None, {self.input_name: array})[0])


def load_runtime(
    ckpt_path: str, runtime: str, device: str, precision: str, channels_last: Union[bool, str], tta: str, threads: Optional[int]
) -> Predictor:
    """The predictor of a checkpoint or package folder. Every value comes from a config (conf/predict.yaml,
    conf/serve.yaml), already checked against its schema, or from `transferlab.api.load`, which checks its own:
    `runtime` torch | onnx, `precision`/`channels_last` as in the training configs (auto; int8: onnx only), `threads` for onnx."""
    if runtime == "onnx":
        if str(device) not in ("auto", "cpu"):
            raise DataError(f"device={device}: runtime=onnx runs on the CPU here; use runtime=torch for {device}")
        predictor: Predictor = OnnxPredictor(str(ckpt_path), tta, threads, int8=str(precision) == "int8")
    elif str(precision) == "int8":
        raise DataError(
            "precision=int8: only runtime=onnx runs int8 (a package's model.int8.onnx); use runtime=onnx precision=int8, or another precision"
        )
    else:
        predictor = TorchPredictor(str(ckpt_path), device, precision, channels_last, tta)
    kind = "labels (multi-label)" if predictor.multilabel else "classes"
    log.info("Model %s: %d %s, %s", Path(ckpt_path).name, len(predictor.class_names), kind, predictor.settings)
    return predictor
