"""Can the loaders feed the GPU? ResNet-50 fine-tuning img/s from JPEG files vs from synthetic on-device batches.

    python scripts/gpu_profile.py --out gpu_profile.json                 # one GPU machine: under 5 minutes
    python scripts/gpu_profile.py --device cpu --quick --out /tmp/p.json # tiny sizes: that the script works

Measures, with the same model and training step (TransferClassifier, full fine-tuning, AdamW, bf16-mixed
autocast, channels_last; a plain PyTorch loop, so the figures are about data feeding, not Lightning):
  (a) img/s from synthetic batches already on the device (the ceiling);
  (b) img/s end to end from JPEG files on disk through the datamodule's training loader, data.decode=cpu
      (the default workers decode and augment);
  (c) the same with data.decode=gpu (workers read bytes; batched decode_jpeg and the augmentation on the device,
      in the datamodule's on_after_batch_transfer hook);
and reports (b)/(a) and (c)/(a) (target >= 0.9), the loaders alone (no training step: what they can deliver),
and how far the device decode's eval tensors are from the CPU path's (grey levels); then (d) ViT-B/16 (timm,
weights=none: the cost does not depend on the weights) at 224 px, bf16-mixed, full fine-tuning against finetune=lora
side by side (scripts/bench/lora.py: trainable parameters, s/step, peak memory; quick: ViT-Ti/16 at 64 px).
The files are ~5,000 JPEGs
built from the shared photos by scripts/synthetic_photos.py into a temporary folder. Writes JSON (--out) and a
markdown table beside it (.md); prints the hardware.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("TRANSFERLAB_SHARED", REPO.parent / "shared")) / "data"
for _path in (REPO / "src", REPO / "scripts"):
    if str(_path) not in sys.path:
        sys.path.append(str(_path))  # after the installed package: a checkout without `pip install -e` works too


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def build_files(count: int, into: Path) -> Path:
    """`count` JPEGs in into/cat, into/dog: scripts/synthetic_photos.py's realistic variants of the shared photos."""
    import synthetic_photos
    from transferlab.core.hardware import usable_cores

    synthetic_photos.WORKERS = max(synthetic_photos.WORKERS, usable_cores())  # its default (2) suits a 2-core machine
    return synthetic_photos.build_photos(SHARED / "oxford-pets-sample", count, into)


def make_datamodule(root: Path, decode: str, batch: int, work: Path) -> Any:
    """data=image_folder as the CLI composes it (conf/data/_base.yaml defaults: augmentation, workers=auto, pinning)."""
    from hydra import compose, initialize_config_dir
    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    from transferlab.config.paths import config_dir

    overrides = [
        "data=image_folder",
        f"data.root={root}",
        f"data.decode={decode}",
        f"data.batch_size={batch}",
        "data.val_fraction=0.02",
        "data.test_fraction=0.02",
        "data.verify_images=false",  # the integrity scan is a one-off before training, not part of the throughput
        f"data.cache_dir={work / 'cache'}",
        f"paths.output_dir={work / 'unused'}",
    ]
    with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
        cfg = compose("train", overrides=overrides)
    return instantiate(OmegaConf.create(OmegaConf.to_container(cfg.data, resolve=True)))


def make_model(device: torch.device, input_size: int) -> Any:
    from transferlab.models.classifier import TransferClassifier

    model = TransferClassifier(
        backbone={"name": "resnet50", "weights": "none", "input_size": input_size},
        class_names=["cat", "dog"],
        finetune={"mode": "full", "backbone_lr_factor": 0.1, "head_dropout": 0.0},
        optimizer={"_target_": "torch.optim.AdamW", "_partial_": True, "lr": 1e-4},
        scheduler=None,
    )
    model.configure_runtime(channels_last=True)
    return model.to(device).train()


class Trainer:
    """One training step (forward, backward, AdamW) on whatever batches it is given; seconds per image."""

    def __init__(self, model: Any, device: torch.device, bf16: bool) -> None:
        self.model, self.device, self.bf16 = model, device, bf16
        self.optimizer = model.configure_optimizers()  # AdamW over the parameter groups (no scheduler: the optimiser itself)

    def step(self, x: torch.Tensor, y: torch.Tensor) -> None:
        x = x.contiguous(memory_format=torch.channels_last)
        autocast = torch.autocast(self.device.type, dtype=torch.bfloat16) if self.bf16 else contextlib.nullcontext()
        with autocast:
            logits = self.model(x)
        loss = F.cross_entropy(logits.float(), y)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()

    def images_per_s(self, batches: Iterator[tuple[torch.Tensor, torch.Tensor]], warmup: int, steps: int, train: bool = True) -> float:
        seen, started = 0, 0.0
        for i in range(warmup + steps):
            if i == warmup:
                sync(self.device)
                started, seen = time.perf_counter(), 0
            x, y = next(batches)
            if train:
                self.step(x, y)
            seen += len(y)
        sync(self.device)
        return seen / (time.perf_counter() - started)


def synthetic(device: torch.device, batch: int, size: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    x = torch.randn(batch, 3, size, size, device=device).contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 2, (batch,), device=device)
    while True:
        yield x, y


def from_loader(dm: Any, device: torch.device) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """The training loader's batches, epoch after epoch, through the datamodule's transfer hooks (as Lightning calls them)."""
    loader = dm.train_dataloader()
    while True:
        for batch in loader:
            batch = dm.transfer_batch_to_device(batch, device, 0)
            yield dm.on_after_batch_transfer(batch, 0)


def agreement(files: list[Path], prep: Any, device: torch.device) -> dict[str, Any]:
    """Eval tensors of decode_batch on `device` against the CPU path at full size: grey levels (0-255) apart."""
    import warnings

    from torchvision.io import ImageReadMode, decode_jpeg

    from transferlab.data.gpu_decode import EncodedImageDataset, collate_encoded, decode_batch
    from transferlab.data.images import ImageDataset

    found: dict[str, Any] = {"images": len(files)}
    try:  # whether this torchvision decodes JPEGs on this device at all (else decode=gpu falls back to the CPU per image)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            decode_jpeg([torch.from_numpy(np.fromfile(files[0], dtype=np.uint8))], mode=ImageReadMode.RGB, device=device)
        found["device_decoder"] = "ok"
    except Exception as exc:  # noqa: BLE001 - reported
        found["device_decoder"] = f"{type(exc).__name__}: {exc}"[:300]
    samples = [(f, 0) for f in files]
    cpu = ImageDataset(samples, prep.eval_transform(), None)
    reference = torch.stack([cpu[i][0] for i in range(len(cpu))])
    encoded = EncodedImageDataset(ImageDataset(samples, prep.eval_transform(), prep.decode_size()), train=False)
    batch = collate_encoded([encoded[i] for i in range(len(encoded))])
    out = decode_batch(batch.images, device, prep.eval_transform(), batch.orientations).float().cpu()
    grey = (out - reference).abs() * torch.tensor(prep.std).view(1, 3, 1, 1) * 255
    found.update(max_grey_levels=round(float(grey.max()), 2), mean_grey_levels=round(float(grey.mean()), 4))
    found["p99_grey_levels"] = round(float(grey.flatten().kthvalue(max(1, int(grey.numel() * 0.99))).values), 2)
    return found


def markdown(result: dict[str, Any]) -> str:
    r, s = result["img_s"], result["settings"]
    rows = [
        ("(a) synthetic on-device batches", r["synthetic"], "1.00"),
        ("(b) JPEG files, data.decode=cpu", r["decode_cpu"], f"{result['ratio_cpu']:.2f}"),
        ("(c) JPEG files, data.decode=gpu", r["decode_gpu"], f"{result['ratio_gpu']:.2f}"),
        ("loader alone, data.decode=cpu", r["loader_cpu"], ""),
        ("loader alone, data.decode=gpu (decode + augment on the device)", r["loader_gpu"], ""),
    ]
    hw = result["hardware"]
    lines = [
        f"ResNet-50 full fine-tuning, batch {s['batch']}, {s['input_size']} px, {s['precision']}, channels_last, AdamW; "
        f"{s['images']} JPEGs, {s['workers']} workers; {hw.get('gpu') or 'no GPU'}, {hw['cores']} cores ({hw['cpu_model']})",
        "",
        "| input | img/s | vs (a) |",
        "| --- | ---: | ---: |",
        *[f"| {name} | {value:.1f} | {ratio} |" for name, value, ratio in rows],
        "",
        f"Target (b)/(a) and (c)/(a) >= 0.9. Device decode vs CPU path (eval tensors, {result['agreement']['images']} images): "
        f"max {result['agreement']['max_grey_levels']} grey levels, p99 {result['agreement']['p99_grey_levels']}, "
        f"mean {result['agreement']['mean_grey_levels']}; device decoder: {result['agreement']['device_decoder']}.",
    ]
    v = result.get("vit_lora")
    if v:
        lines += [
            "",
            f"(d) {v['model']} at {v['input_size']} px, batch {v['batch']}, {v['precision']}: full fine-tuning vs finetune=lora",
            "",
            "| | full | LoRA | LoRA / full |",
            "| --- | ---: | ---: | ---: |",
            f"| trainable parameters | {v['full']['trainable']:,} | {v['lora']['trainable']:,} | {v['trainable_fraction']:.3f} |",
            f"| s/step | {v['full']['step_s']:.3f} | {v['lora']['step_s']:.3f} | {1 / v['step_speedup']:.2f} |",
            f"| peak MB ({v['lora']['peak_kind']}) | {v['full']['peak_mb']:.0f} | {v['lora']['peak_mb']:.0f} | {v['peak_fraction'] or 0:.2f} |",
        ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="auto", help="auto | cuda | cuda:N | cpu")
    parser.add_argument("--quick", action="store_true", help="tiny sizes (a CPU check that the script works)")
    parser.add_argument("--out", type=Path, default=Path("gpu_profile.json"))
    parser.add_argument("--images", type=int, help="JPEGs to build (default 5000; quick 48)")
    parser.add_argument("--batch", type=int, help="batch size (default 256; quick 8)")
    parser.add_argument("--steps", type=int, help="measured steps per figure (default 30; quick 3)")
    parser.add_argument("--warmup", type=int, help="steps before measuring (default 5; quick 2)")
    parser.add_argument("--input-size", type=int, help="input size (default 224; quick 64)")
    parser.add_argument("--work", type=Path, help="where the JPEGs go (default: a temporary folder, removed after)")
    args = parser.parse_args(argv)
    quick = args.quick
    images = args.images or (48 if quick else 5000)
    batch, steps = args.batch or (8 if quick else 256), args.steps or (3 if quick else 30)
    warmup, size = args.warmup or (2 if quick else 5), args.input_size or (64 if quick else 224)

    from transferlab.core.hardware import detect, resolve_device

    hw = detect()
    device = resolve_device(args.device)
    bf16 = hw.gpu_bf16 if device.type == "cuda" else hw.cpu_bf16
    print("hardware:", json.dumps(hw.to_dict()), flush=True)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    started = time.perf_counter()
    with contextlib.ExitStack() as stack:
        work = args.work or Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="gpu_profile_")))
        root = build_files(images, work / "photos")
        print(f"{images} JPEGs in {root} ({time.perf_counter() - started:.0f} s)", flush=True)
        model = make_model(device, size)
        trainer = Trainer(model, device, bf16)
        prep = model.backbone.preprocessing
        trainer.images_per_s(synthetic(device, batch, size), warmup, 1)  # kernels picked, caches warm: (a) is not the first
        img_s: dict[str, float] = {"synthetic": trainer.images_per_s(synthetic(device, batch, size), warmup, steps)}
        print(f"(a) synthetic: {img_s['synthetic']:.1f} img/s", flush=True)
        workers = 0
        for decode in ("cpu", "gpu"):
            dm = make_datamodule(root, decode, batch, work)
            dm.preprocessing = prep
            dm.setup()
            workers = dm.workers()
            img_s[f"decode_{decode}"] = trainer.images_per_s(from_loader(dm, device), warmup, steps)
            img_s[f"loader_{decode}"] = trainer.images_per_s(from_loader(dm, device), warmup, steps, train=False)
            print(
                f"data.decode={decode}: {img_s[f'decode_{decode}']:.1f} img/s training, {img_s[f'loader_{decode}']:.1f} img/s loader alone",
                flush=True,
            )
            del dm
        from bench import lora

        vit = ("vit_tiny_patch16_224", 64, 4, 2, 1) if quick else ("vit_base_patch16_224", 224, 64, 20, 5)
        vit_lora = lora.compare(vit[0], "none", vit[1], vit[2], vit[3], vit[4], device, bf16=bf16)
        print(f"(d) {vit[0]}: LoRA {vit_lora['step_speedup']:.2f}x faster per step, peak x {vit_lora['peak_fraction']}", flush=True)
        files = sorted(root.rglob("*.jpg"))[: 16 if quick else 256]
        result: dict[str, Any] = {
            "ratio_cpu": img_s["decode_cpu"] / img_s["synthetic"],
            "ratio_gpu": img_s["decode_gpu"] / img_s["synthetic"],
            "target": 0.9,
            "img_s": img_s,
            "agreement": agreement(files, prep, device),
            "vit_lora": vit_lora,
            "settings": {
                "device": str(device),
                "batch": batch,
                "steps": steps,
                "warmup": warmup,
                "input_size": size,
                "images": images,
                "workers": workers,
                "precision": "bf16-mixed" if bf16 else "32-true",
                "quick": quick,
            },
            "hardware": hw.to_dict(),
            "seconds": round(time.perf_counter() - started, 1),
        }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    table = markdown(result)
    args.out.with_suffix(".md").write_text(table)
    print(table + f"\n{args.out} ({result['seconds']} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
