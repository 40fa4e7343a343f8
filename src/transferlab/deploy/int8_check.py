"""The int8 models of a package, made and checked against fp32 on the run's own images; the figures config.json keeps.

An int8 model is a different model: the logit check of the fp32 formats (1e-4) cannot hold, so what is checked is
what a user sees, the top-1 class, on every stored image of the run that did not calibrate it (deploy.quantize):
`int8_agreement` with its exact interval, and below `min_int8_agreement` the export refuses (nothing written). On
the test split the int8 and fp32 accuracies get their intervals, and a paired bootstrap over the same test images
says whether int8 is distinguishable from fp32 at all (core.statistics): agreement alone cannot tell a harmless
disagreement on images fp32 gets wrong from a harmful one. The latency ratio is measured on the exporting machine,
batch 1, the two sessions interleaved with the same threads, so drift and other load hit both alike.
"""

from __future__ import annotations

import logging
import statistics as stats
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
from torch import nn

from transferlab.core.errors import DataError
from transferlab.core.hardware import detect
from transferlab.core.statistics import paired_bootstrap, proportion_interval
from transferlab.data.preprocessing import Preprocessing
from transferlab.deploy.quantize import (
    CHECK_BATCH,
    Int8Settings,
    RunImages,
    batches,
    calibration_batches,
    quantize_onnx,
    run_images,
    true_labels,
    write_calibration_list,
)
from transferlab.models import package

log = logging.getLogger(__name__)

Logits = Callable[[torch.Tensor], Any]  # normalised [N, 3, S, S] -> [N, K] logits (numpy or torch)
LATENCY_IMAGES, LATENCY_ROUNDS, WARMUP = 8, 24, 2
BOOTSTRAP_SEED = 0


class Int8Refused(DataError):
    """An int8 model disagrees with fp32 too often: the export writes nothing (exit 2)."""


@dataclass
class Int8Model:
    """One int8 file of the package and how to run it: `key` is its formats entry, `fp32_file` its fp32 sibling."""

    key: str
    name: str
    file: Path
    fp32_file: Path
    run: Logits
    info: dict[str, Any]


def plan_int8(multilabel: bool, table: Optional[Mapping[str, Any]], wanted: set[str], settings: Int8Settings, seed: int) -> RunImages:
    """What quantize=int8 will calibrate and check on, decided before any file is written: a request it cannot
    honour (a multi-label model, no format to quantise, the run's images gone) stops here with one line."""
    if multilabel:
        raise DataError(
            "quantize=int8: multi-label models are not quantised (their label sets at the package thresholds are not checked yet); "
            "export with quantize=none"
        )
    if not wanted & {"onnx", "executorch"}:
        raise DataError(
            "quantize=int8 quantises the onnx and executorch formats, and none is asked for: e.g. format=[onnx,torchscript] quantize=int8"
        )
    return run_images(table, settings, seed)


def quantized(
    network: nn.Module,
    staging: Path,
    wanted: set[str],
    images: RunImages,
    settings: Int8Settings,
    preprocessing: Preprocessing,
    run_data: Mapping[str, Any],
    class_names: Sequence[str],
    mobile: Any,
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Write the int8 files into `staging` and check them (check_int8) against fp32: model.onnx in onnxruntime
    when the package has it (what int8 replaces), else the checkpoint's network. Threads: torch's, for both."""
    threads = torch.get_num_threads()
    models = build_int8_models(network, staging, wanted, images, preprocessing, mobile, threads)
    reference = onnx_session(staging / package.ONNX, threads) if "onnx" in wanted else network
    tests = any(split == "test" for _, split in images.evaluation)
    labels = true_labels(run_data, images.root, class_names) if tests else None
    return check_int8(models, reference, images, preprocessing, labels, settings, threads)


def onnx_session(file: Path, threads: int) -> Logits:
    """An onnxruntime CPU session (its notices about unused initialisers silenced) as a function of a batch."""
    import onnxruntime

    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = threads
    options.log_severity_level = 3
    session = onnxruntime.InferenceSession(str(file), options, providers=["CPUExecutionProvider"])
    return lambda x: session.run(["logits"], {"images": x.detach().float().contiguous().numpy()})[0]


def build_int8_models(
    network: nn.Module, staging: Path, wanted: set[str], images: RunImages, preprocessing: Preprocessing, mobile: Any, threads: int
) -> list[Int8Model]:
    """model.int8.onnx (format onnx) and model.int8.pte (format executorch), calibrated on the same training images."""
    calibration = calibration_batches(images, preprocessing)
    models = []
    if "onnx" in wanted:
        info = quantize_onnx(staging / package.ONNX, staging / package.INT8_ONNX, calibration)
        models.append(
            Int8Model(
                "onnx_int8", "ONNX", staging / package.INT8_ONNX, staging / package.ONNX, onnx_session(staging / package.INT8_ONNX, threads), info
            )
        )
    if "executorch" in wanted:
        file = staging / package.INT8_PTE
        info = dict(mobile.export_pte(network, file, preprocessing.input_size, calibration))
        models.append(Int8Model("executorch_int8", "ExecuTorch", file, staging / package.PTE, lambda x: mobile.pte_logits(file, [x])[0], info))
    write_calibration_list(staging / package.INT8_CALIBRATION, images)
    return models


def top1_over(images: RunImages, preprocessing: Preprocessing, runners: Mapping[str, Logits]) -> tuple[dict[str, np.ndarray], list[torch.Tensor]]:
    """Every runner's top-1 class of every check image (decoded once per batch), and a few images for the latency."""
    paths = [path for path, _ in images.evaluation]
    found: dict[str, list[np.ndarray]] = {name: [] for name in runners}
    kept: list[torch.Tensor] = []
    with torch.inference_mode():
        for batch in batches(images.root, paths, preprocessing, CHECK_BATCH):
            kept += [image[None] for image in batch[: LATENCY_IMAGES - len(kept)]]
            for name, run in runners.items():
                found[name].append(np.asarray(torch.as_tensor(run(batch)).float().argmax(dim=-1)))
    return {name: np.concatenate(values) for name, values in found.items()}, kept


def agreement(reference: np.ndarray, got: np.ndarray) -> dict[str, Any]:
    same = int(np.sum(reference == got))
    return {
        "value": same / len(got),
        "ci95": proportion_interval(same, len(got)),
        "images": len(got),
        "disagreements": len(got) - same,
        "interval": "Clopper-Pearson (exact)",
    }


def accuracy(correct: np.ndarray) -> dict[str, Any]:
    right = int(correct.sum())
    return {
        "value": right / len(correct),
        "ci95": proportion_interval(right, len(correct)),
        "images": len(correct),
        "interval": "Clopper-Pearson (exact)",
    }


def verdict(fp32_correct: np.ndarray, int8_correct: np.ndarray) -> dict[str, Any]:
    """int8 - fp32 accuracy on the same test images: the paired bootstrap's difference, interval and verdict."""
    comparison = paired_bootstrap(fp32_correct.tolist(), int8_correct.tolist(), seed=BOOTSTRAP_SEED)
    return {
        "verdict": comparison.verdict(),
        "difference": comparison.difference,
        "ci95": comparison.ci95,
        "p_value": comparison.p_value,
        "images": comparison.images,
        "test": "paired bootstrap over the test images (int8 - fp32 accuracy), 2000 resamples",
    }


def refuse_below(model: Int8Model, found: Mapping[str, Any], threshold: float, calibrated: int) -> None:
    if found["value"] < threshold:
        low, high = found["ci95"]
        raise Int8Refused(
            f"quantize=int8: the int8 {model.name} model gives the fp32 top-1 class on {found['value']:.3f} of {found['images']} of the run's "
            f"images (95 % [{low:.3f}, {high:.3f}]), under min_int8_agreement={threshold:g}; nothing was written. Try more calibration images "
            f"(int8_calibration_images={2 * calibrated}), check the training images look like what the model will see, or keep fp32 (quantize=none)"
        )


def latency(fp32: Logits, int8: Logits, images: Sequence[torch.Tensor], threads: int) -> dict[str, Any]:
    """Batch-1 time per image of both sessions, interleaved (the order swapped every round), medians."""
    times: dict[str, list[float]] = {"fp32": [], "int8": []}
    with torch.inference_mode():
        for round_ in range(WARMUP + LATENCY_ROUNDS):
            image = images[round_ % len(images)]
            for name, run in (("fp32", fp32), ("int8", int8)) if round_ % 2 == 0 else (("int8", int8), ("fp32", fp32)):
                started = time.perf_counter()
                run(image)
                if round_ >= WARMUP:
                    times[name].append(time.perf_counter() - started)
    fp32_s, int8_s = stats.median(times["fp32"]), stats.median(times["int8"])
    machine = detect()
    return {
        "ratio": int8_s / fp32_s,
        "fp32_ms": fp32_s * 1e3,
        "int8_ms": int8_s * 1e3,
        "batch": 1,
        "threads": threads,
        "rounds": LATENCY_ROUNDS,
        "machine": f"{machine.cpu_model}, {machine.cores} usable cores",
        "note": "measured at export on the exporting machine (onnxruntime CPU, interleaved, medians): this machine's figure, not a promise elsewhere",
    }


def check_int8(
    models: list[Int8Model],
    reference: Logits,
    images: RunImages,
    preprocessing: Preprocessing,
    labels: Optional[dict[str, int]],
    settings: Int8Settings,
    threads: int,
) -> tuple[dict[str, Any], dict[str, Any]]:
    """(formats entries of the int8 files, config.json's top-level int8 keys), or Int8Refused below the threshold.
    The top-level keys describe model.int8.onnx, or model.int8.pte when the package has no ONNX."""
    top1, kept = top1_over(images, preprocessing, {"fp32": reference, **{m.key: m.run for m in models}})
    tested = [(i, labels[path]) for i, (path, split) in enumerate(images.evaluation) if split == "test" and labels and path in labels]
    rows, truth = np.asarray([i for i, _ in tested], dtype=np.int64), np.asarray([label for _, label in tested], dtype=np.int64)
    formats: dict[str, Any] = {}
    keys: dict[str, Any] = {}
    for model in models:
        agreed = agreement(top1["fp32"], top1[model.key])
        refuse_below(model, agreed, settings.min_agreement, len(images.calibration))
        size_ratio = model.file.stat().st_size / model.fp32_file.stat().st_size
        log.info(
            "Checked int8 %s: top-1 agreement with fp32 %.4f on %d images, size %.2fx fp32", model.name, agreed["value"], agreed["images"], size_ratio
        )
        formats[model.key] = {
            "file": model.file.name,
            "input": "images",
            "output": "logits",
            **model.info,
            "agreement": agreed["value"],
            "size_ratio": size_ratio,
        }
        if keys:
            continue
        fp32_right, int8_right = top1["fp32"][rows] == truth, top1[model.key][rows] == truth
        keys = {
            "int8_model": model.file.name,
            "int8_agreement": agreed,
            "int8_accuracy": accuracy(int8_right) if len(rows) else None,
            "fp32_accuracy": accuracy(fp32_right) if len(rows) else None,
            "int8_verdict": verdict(fp32_right, int8_right) if len(rows) else None,
            "int8_size_ratio": size_ratio,
            "int8_latency_ratio": None,
        }
        if model.key == "onnx_int8":
            keys["int8_latency"] = latency(reference, model.run, kept, threads)
            keys["int8_latency_ratio"] = keys["int8_latency"].pop("ratio")
    keys["int8_calibration"] = {
        "file": package.INT8_CALIBRATION,
        "images": len(images.calibration),
        "split": "train",
        "seed": images.seed,
        "checked_on": len(images.evaluation),
        "left_out_missing": images.missing,
    }
    return formats, keys
