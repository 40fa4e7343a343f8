"""What this machine is good at, and the speed settings that follow from it (`auto` in the configs).

Measured on the 2-core AVX-512-bf16 CPU this was built on (scripts/benchmark.py): bf16 autocast plus
channels_last is several times faster than fp32 for CNN training and inference there, whereas on a CPU
without bf16 instructions bf16 is emulated and slower than fp32. So `auto` picks bf16-mixed where the
hardware has it (GPUs with bf16, CPUs with avx512_bf16 / AMX), 32-true elsewhere.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import platform
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any, ContextManager, Optional, Union

import torch

from transferlab.core.errors import ConfigError

log = logging.getLogger(__name__)

# CPU flags that decide which precision and kernels are fast.
RELEVANT_FLAGS = ("avx2", "fma", "avx512f", "avx512_bf16", "avx512_vnni", "avx512_fp16", "amx_tile", "amx_bf16", "amx_int8")
BF16_FLAGS = ("avx512_bf16", "amx_bf16")


@dataclass(frozen=True)
class Hardware:
    cpu_model: str
    cores: int
    flags: list[str] = field(default_factory=list)
    gpu: Optional[str] = None
    gpu_count: int = 0
    gpu_bf16: bool = False

    @property
    def cpu_bf16(self) -> bool:
        return any(flag in self.flags for flag in BF16_FLAGS)

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "cpu_bf16": self.cpu_bf16, "torch": torch.__version__}


def usable_cores() -> int:
    """Cores this process may run on (respects taskset / cgroup cpusets, unlike os.cpu_count)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS, Windows
        return os.cpu_count() or 1


def _cpu_info() -> tuple[str, list[str]]:
    model, flags = platform.processor() or platform.machine(), []
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                key, _, value = line.partition(":")
                if key.strip() == "model name" and model in ("", platform.machine(), platform.processor()):
                    model = value.strip()
                elif key.strip() == "flags":
                    present = set(value.split())
                    flags = [f for f in RELEVANT_FLAGS if f in present]
                    break
    except OSError:
        pass
    return model, flags


@functools.cache
def detect() -> Hardware:
    model, flags = _cpu_info()
    gpu, count, gpu_bf16 = None, 0, False
    if torch.cuda.is_available():
        count = torch.cuda.device_count()
        gpu = torch.cuda.get_device_name(0)
        gpu_bf16 = bool(torch.cuda.is_bf16_supported())
    return Hardware(cpu_model=model, cores=usable_cores(), flags=flags, gpu=gpu, gpu_count=count, gpu_bf16=gpu_bf16)


def on_gpu(accelerator: Any) -> bool:
    accelerator = str(accelerator or "auto")
    return accelerator in ("gpu", "cuda") or (accelerator == "auto" and detect().gpu is not None)


def choose_precision(requested: Any, accelerator: Any) -> str:
    """`auto` -> bf16-mixed where bf16 runs natively, else 32-true (16-mixed on GPUs without bf16)."""
    if str(requested) != "auto":
        return str(requested)
    hw = detect()
    if on_gpu(accelerator):
        return "bf16-mixed" if hw.gpu_bf16 else "16-mixed"
    return "bf16-mixed" if hw.cpu_bf16 else "32-true"


def choose_flag(key: str, requested: Union[bool, str], auto: bool) -> bool:
    if isinstance(requested, bool):
        return requested
    if str(requested) == "auto":
        return auto
    raise ConfigError(f"{key}: expected true, false or auto, got {requested!r}")


def default_workers(processes_per_node: int = 1, gpu: bool = False) -> int:
    """DataLoader workers per training process.

    On a GPU the CPU only decodes, so every core but the main process's one decodes. On a CPU the model
    and the decoding share the cores: half of a process's share goes to decoding (at least one worker).
    """
    share = max(1, usable_cores() // max(1, processes_per_node))
    if gpu:
        return min(16, max(1, share - 1))
    return min(8, max(1, share // 2))


def inference_batch_size(requested: Union[int, str], gpu: bool) -> int:
    """Images per inference pass (the feature-cache fill): `auto` = 256 on a GPU; 16 on a CPU, where small batches
    keep the activations in the caches (Lite0 bf16 on 2 AVX-512 cores: ~150 img/s at 8-16, 105 at 32, 72 at 64)."""
    if str(requested) == "auto":
        return 256 if gpu else 16
    return int(requested)


def inference_workers(auto_workers: int, gpu: bool) -> int:
    """DataLoader workers for a pass of inference over image files (the feature-cache fill) when data.num_workers=auto.

    On a CPU with 2 cores the backbone's two intra-op threads keep both busy, and a decoding worker only takes turns
    with them: measured on 8,000 JPEGs, Lite0 bf16 batch 16, 84.5 img/s without workers against 68-77 with one or two
    (scripts/benchmark.py --sections fill). From 3 cores on, and on a GPU, the workers decode while the model runs."""
    return 0 if not gpu and usable_cores() <= 2 else auto_workers


def resolve_device(name: str) -> torch.device:
    """`auto` = the first GPU when there is one; else what the user wrote (cpu, cuda, cuda:1, mps)."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def forward_context(precision: str, device: torch.device) -> Callable[[], ContextManager]:
    """What Lightning's precision plugin does around a forward pass, for `32-true` and `bf16-mixed` / `16-mixed`."""
    if precision.startswith(("bf16", "16")):
        dtype = torch.bfloat16 if precision.startswith("bf16") else torch.float16
        return lambda: torch.autocast(device.type, dtype=dtype)
    return contextlib.nullcontext
