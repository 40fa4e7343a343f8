"""(g) The `predict` section of scripts/benchmark.py: transferlab-predict against a raw PyTorch inference loop.

Both label the same JPEG files with the same network (Lite0 + a linear head, the same weights), batch size,
precision and layout (what predict's `auto` picks for this machine), decode path (transferlab.data.images +
the backbone's eval transform) and DataLoader workers; the raw loop has no transferlab around it: no runtime,
no Hydra, no CSV. Rounds alternate the two, and the best of each is kept. onnxruntime's img/s (predict
runtime=onnx on the exported package) is measured beside them.
"""

from __future__ import annotations

import contextlib
import time
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset

from .common import LITE0, Context, Row, Target, at


class _Files(Dataset):
    def __init__(self, files: list[Path], transform: Any, size: int) -> None:
        self.files, self.transform, self.size = files, transform, size

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int) -> torch.Tensor:
        from transferlab.data.images import decode_rgb

        return self.transform(decode_rgb(self.files[i], self.size))


def raw_loop(model: Any, files: list[Path], batch: int, workers: int, bf16: bool, channels_last: bool) -> float:
    """img/s of the plain loop: DataLoader -> (channels_last) -> autocast forward -> softmax -> top-k."""
    prep = model.backbone.preprocessing
    network = torch.nn.Sequential(model.backbone, model.head).eval()
    if channels_last:
        network = network.to(memory_format=torch.channels_last)
    loader = DataLoader(
        _Files(files, prep.eval_transform(), prep.decode_size()), batch_size=batch, num_workers=workers, prefetch_factor=4 if workers else None
    )
    started = time.perf_counter()
    with torch.inference_mode():
        for images in loader:
            if channels_last:
                images = images.contiguous(memory_format=torch.channels_last)
            with torch.autocast("cpu", dtype=torch.bfloat16) if bf16 else contextlib.nullcontext():
                logits = network(images)
            logits.float().softmax(dim=-1).topk(2, dim=-1)
    return len(files) / (time.perf_counter() - started)


def predict_section(files: list[Path], work: Path, rounds: int, batch: int) -> dict[str, Any]:
    """predict_vs_raw (target >= 0.8) and onnxruntime's img/s, on the CPU."""
    from transferlab.cli import predict as predict_command
    from transferlab.core.hardware import choose_precision, default_workers
    from transferlab.deploy.export import export_package
    from transferlab.models.classifier import TransferClassifier

    torch.manual_seed(0)
    model = TransferClassifier(
        backbone={"name": LITE0, "weights": "bundled"},
        class_names=["cat", "dog"],
        finetune={"mode": "frozen", "head_dropout": 0.0},
        optimizer={"_target_": "torch.optim.SGD", "_partial_": True, "lr": 0.1},
    ).eval()
    ckpt = work / "predict_bench.ckpt"
    torch.save({"hyper_parameters": dict(model.hparams), "state_dict": model.state_dict()}, ckpt)
    package = work / "predict_bench_package"
    export_package(str(ckpt), package, "onnx", 18)
    folder = work / "predict_images"
    folder.mkdir(exist_ok=True)
    for f in files:
        (folder / f.name).write_bytes(f.read_bytes())
    precision = choose_precision("auto", "cpu")
    bf16 = precision.startswith("bf16")
    workers = default_workers()

    def ours(model_path: Path, *extra: str) -> float:
        result = predict_command.command.run_in_process(
            [f"ckpt_path={model_path}", f"input={folder}", f"output={work / 'p.csv'}", f"batch_size={batch}", *extra], work / "predict_run"
        )
        return float(result["images_per_second"])

    best = {"raw": 0.0, "transferlab": 0.0, "onnxruntime": 0.0, "before": 0.0}
    for _ in range(rounds):
        best["raw"] = max(best["raw"], raw_loop(model, files, batch, workers, bf16, channels_last=True))
        best["transferlab"] = max(best["transferlab"], ours(ckpt))
        best["onnxruntime"] = max(best["onnxruntime"], ours(package, "runtime=onnx"))
        best["before"] = max(best["before"], ours(ckpt, "precision=32-true", "channels_last=false", "num_workers=0"))  # predict's old settings
    return {
        "images": len(files),
        "batch": batch,
        "precision": precision,
        "channels_last": True,
        "workers": workers,
        "rounds": rounds,
        "raw_img_s": best["raw"],
        "transferlab_img_s": best["transferlab"],
        "onnxruntime_img_s": best["onnxruntime"],
        "fp32_no_workers_img_s": best["before"],
        "predict_vs_raw": best["transferlab"] / best["raw"],
    }


def run(ctx: Context) -> dict[str, Any]:
    return predict_section(ctx.files[:48] if ctx.quick else ctx.files, ctx.work, rounds=1 if ctx.quick else 2, batch=16 if ctx.quick else 32)


def rows(f: dict[str, Any]) -> list[Row]:
    return [
        Row(
            f"(g) label {f['images']} JPEGs, Lite0 batch {f['batch']} {f['precision']}, {f['workers']} worker(s): img/s (raw loop vs "
            f"transferlab-predict; onnxruntime {f['onnxruntime_img_s']:.1f}, fp32 without workers {f['fp32_no_workers_img_s']:.1f})",
            f"{f['raw_img_s']:.1f}",
            f"{f['transferlab_img_s']:.1f}",
            f"**{f['predict_vs_raw']:.2f}**",
            Target("predict_vs_raw", f["predict_vs_raw"], ">= 0.8"),
        )
    ]


KEYS = {"predict_vs_raw": at("predict_vs_raw"), "predict_onnxruntime_img_s": at("onnxruntime_img_s")}
