"""What every section of the benchmark shares: the run's context, the table's row and target records, and the
helpers several sections call (the species split, a transferlab-train run in this process, a classifier)."""

from __future__ import annotations

import contextlib
import importlib.util
import json
import math
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any, Callable, Optional

import torch
import torch.nn.functional as F

SCRIPTS = Path(__file__).resolve().parents[1]
REPO = SCRIPTS.parent
SHARED = Path(os.environ.get("TRANSFERLAB_SHARED", REPO.parent / "shared")) / "data"
LITE0 = "tf_efficientnet_lite0"


# ------------------------------------------------------------------------------------------- records
@dataclass
class Context:
    """What a section's run gets: the photos, a scratch folder, the device, the mode, the sections run before it."""

    data: Path  # --data: the shared sample (the fill section makes its photos from it)
    root: Path  # the folder the sections train on: the sample, or 3 photos of each breed with --quick
    files: list[Path]  # root's JPEGs, sorted
    work: Path  # scratch, removed after the run
    device: torch.device
    quick: bool
    compile: bool = False  # --compile: the accuracy section also runs performance.compile=true
    details: dict[str, Any] = field(default_factory=dict)  # the sections already run (peak reads precision's)

    @property
    def gpu(self) -> bool:
        return self.device.type == "cuda"


def meets(value: Optional[float], target: str) -> bool:
    """Whether a value satisfies a target written as `>= X` or `<= X`; an unmeasured value (None) never does."""
    op, bound = target.split()
    if value is None or not math.isfinite(value):
        return False
    return value >= float(bound) if op == ">=" else value <= float(bound)


def fmt(value: Any, digits: int = 2) -> str:
    return "–" if value is None else (f"{value:.{digits}f}" if isinstance(value, float) else str(value))


@dataclass(frozen=True)
class Target:
    """A measured value and its bound, declared once: the table's target cell and `targets[key]` (what --check
    judges) are both made from it."""

    key: str  # its name in benchmark.json's `targets`
    value: Optional[float]
    bound: str  # ">= 10": the text --check parses, kept as written in benchmark.json
    unit: str = ""  # shown after the bound in the table: ">= 10x"
    relative_to: str = ""  # a difference from this, shown as such in the table: ">= baseline - 0.01"

    @property
    def cell(self) -> str:
        if not self.relative_to:
            return f"{self.bound}{self.unit}"
        op, number = self.bound.split()
        return f"{op} {self.relative_to} {'-' if number.startswith('-') else '+'} {number.lstrip('+-')}{self.unit}"

    def entry(self) -> dict[str, Any]:
        return {"value": self.value, "target": self.bound, "met": meets(self.value, self.bound)}


@dataclass(frozen=True)
class Row:
    """One line of the markdown table; `target` (if any) fills its last cell and is one of `targets`."""

    label: str
    baseline: str = ""
    transferlab: str = ""
    ratio: str = ""
    target: Optional[Target] = None

    def line(self) -> str:
        cells = (self.label, self.baseline, self.transferlab, self.ratio, self.target.cell if self.target else "")
        return "|" + "|".join(f" {cell} " if cell else " " for cell in cells) + "|"


def at(*path: str) -> Callable[[Optional[dict[str, Any]]], Any]:
    """A benchmark.json key read from a section's details by its path; None where the path is missing."""

    def pick(node: Any) -> Any:
        for part in path:
            if not isinstance(node, dict) or part not in node:
                return None
            node = node[part]
        return node

    return pick


# ------------------------------------------------------------------------------------------ helpers
def script(name: str) -> ModuleType:
    """scripts/<name>.py, imported from its file: the sections need no particular sys.path. It is registered under
    its own name, so the worker processes of its pools (fork) and a later plain import find the same module."""
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, SCRIPTS / f"{name}.py")
        assert spec is not None and spec.loader is not None, name
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name]


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def autocast(device: torch.device, bf16: bool) -> contextlib.AbstractContextManager:
    return torch.autocast(device.type, dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()


def subset_folder(source: Path, per_breed: Optional[int], into: Path) -> Path:
    """The shared sample, or `per_breed` photos of each breed (symlinks: nothing is copied)."""
    if per_breed is None:
        return source
    into.mkdir(parents=True, exist_ok=True)
    seen: dict[str, int] = {}
    for path in sorted(source.glob("*.jpg")):
        breed = path.stem.rsplit("_", 1)[0]
        if seen.get(breed, 0) < per_breed:
            seen[breed] = seen.get(breed, 0) + 1
            (into / path.name).symlink_to(path.resolve())
    return into


def species_splits(root: Path, cache_dir: Path, seed: int) -> tuple[Any, list[str]]:
    """The split transferlab-train makes for data.task=species with the default fractions and this seed."""
    from hydra.utils import instantiate

    from transferlab.cli.train import command
    from transferlab.models.backbones import create_backbone

    cfg = command.compose(
        [f"data.root={root}", "data.task=species", f"seed={seed}", "data.download=false", f"paths.cache_dir={cache_dir}"], cache_dir / "unused-run"
    )
    dm = instantiate(cfg.data)
    dm.preprocessing = create_backbone(LITE0, weights="bundled").preprocessing
    dm.setup()
    return dm, dm.class_names


def tensor_batches(files: list[Path], prep: Any, count: int) -> torch.Tensor:
    """`count` preprocessed images from the files, decoded once: training-step benchmarks exclude decoding."""
    from transferlab.data.images import decode_rgb

    transform = prep.eval_transform()
    return torch.stack([transform(decode_rgb(f)) for f in files[:count]])


def transferlab_run(overrides: list[str], out_dir: Path) -> dict[str, Any]:
    """transferlab-train in this process (Hydra's compose API), timed from the validated config to metrics.json."""
    from transferlab.cli.train import command

    cfg = command.compose(overrides, out_dir)
    started = time.perf_counter()
    command.run(cfg)
    seconds = time.perf_counter() - started
    metrics = json.loads((out_dir / "metrics.json").read_text())
    cache = out_dir / "feature_cache.json"
    return {
        "seconds": seconds,
        "val_acc": metrics.get("val/acc"),
        "test_acc": metrics.get("test/acc"),
        "feature_cache": json.loads(cache.read_text()) if cache.is_file() else None,
    }


def make_classifier(name: str, weights: str, classes: int) -> Any:
    from transferlab.models.classifier import TransferClassifier

    return TransferClassifier(
        backbone={"name": name, "weights": weights},
        class_names=[f"c{i}" for i in range(classes)],
        finetune={"mode": "full", "backbone_lr_factor": 0.1, "head_dropout": 0.0},
        optimizer={"_target_": "torch.optim.Adam", "_partial_": True, "lr": 1e-4},
        scheduler=None,
    )


def train_step(model: Any, optimizer: Any, images: torch.Tensor, labels: torch.Tensor, device: torch.device, bf16: bool) -> None:
    """One optimiser step of a classifier (forward in autocast, fp32 cross-entropy, backward, step): what the timing
    sections measure."""
    with autocast(device, bf16):
        logits = model(images)
    loss = F.cross_entropy(logits.float(), labels)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
