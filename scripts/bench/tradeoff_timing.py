"""The timing and accuracy half of the `tradeoff` section (bench/tradeoff.py): a package's four files (fp32 / int8
ONNX, fp32 / int8 ExecuTorch) run side by side with the same threads, interleaved round by round, medians; and each
file's top-1 accuracy on the package's stored test split."""

from __future__ import annotations

import statistics as stats
import time
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np
import torch

BATCH = 32  # predict's batch size
FILES = {"onnx_fp32": "model.onnx", "onnx_int8": "model.int8.onnx", "pte_fp32": "model.pte", "pte_int8": "model.int8.pte"}

Runner = Callable[[torch.Tensor], Any]


def onnx_runner(file: Path, threads: int) -> Runner:
    import onnxruntime

    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.log_severity_level = 3
    session = onnxruntime.InferenceSession(str(file), options, providers=["CPUExecutionProvider"])
    return lambda x: session.run(["logits"], {"images": x.numpy()})[0]


def pte_runner(file: Path) -> Runner:
    """The program loaded once (executorch.runtime); a batch larger than its own split as deploy.mobile.pte_logits does."""
    from transferlab.deploy import mobile

    with mobile.known_noise_silenced():
        from executorch.runtime import Runtime

    method = Runtime.get().load_program(file).load_method("forward")
    capacity = int(method.metadata.input_tensor_meta(0).sizes()[0])
    return lambda x: torch.cat([method.execute([chunk.contiguous()])[0].clone() for chunk in x.split(capacity)])


def set_executorch_threads(threads: int) -> Optional[int]:
    """ExecuTorch's (XNNPACK's) threadpool to `threads`, as onnxruntime's; the count it reports afterwards."""
    try:
        from executorch.extension.pybindings import portable_lib
    except ImportError:
        return None
    portable_lib._unsafe_reset_threadpool(threads)
    return int(portable_lib._threadpool_get_thread_count())


def interleaved(runners: dict[str, Runner], inputs: list[torch.Tensor], rounds: int, warmup: int) -> dict[str, float]:
    """Median seconds per call of each runner: every round runs each once on the round's input, the order rotated."""
    names = list(runners)
    times: dict[str, list[float]] = {name: [] for name in names}
    with torch.inference_mode():
        for round_ in range(warmup + rounds):
            x = inputs[round_ % len(inputs)]
            shift = round_ % len(names)
            for name in names[shift:] + names[:shift]:
                started = time.perf_counter()
                runners[name](x)
                if round_ >= warmup:
                    times[name].append(time.perf_counter() - started)
    return {name: stats.median(found) for name, found in times.items()}


def test_images(package_dir: Path) -> tuple[torch.Tensor, np.ndarray, list[str]]:
    """The package's stored test split, decoded with its own eval preprocessing, and the species labels of its files."""
    from transferlab.deploy.quantize import load_batch
    from transferlab.models import package
    from transferlab.models.classifier import load_checkpoint

    model, _ = load_checkpoint(package_dir)
    table = package.read_split_table(package_dir)
    assert table is not None, "the package has no splits.csv"
    paths = sorted(row[0] for row in table["rows"] if row[1] == "test")
    names = list(model.class_names)
    labels = np.asarray([names.index("cat" if Path(p).name[:1].isupper() else "dog") for p in paths])  # shared/README.md
    return load_batch(Path(table["root"]), paths, model.backbone.preprocessing), labels, paths


def measure(package_dir: Path, threads: int, rounds: int, throughput_rounds: int) -> dict[str, Any]:
    """Size, batch-1 latency, batch-32 img/s and test accuracy of each file the package has."""
    from transferlab.core.statistics import proportion_interval

    present = {key: package_dir / file for key, file in FILES.items() if (package_dir / file).is_file()}
    runners = {key: (onnx_runner(file, threads) if key.startswith("onnx") else pte_runner(file)) for key, file in present.items()}
    images, labels, _ = test_images(package_dir)
    top1: dict[str, np.ndarray] = {}
    with torch.inference_mode():
        for key, run in runners.items():
            top1[key] = np.concatenate([np.asarray(torch.as_tensor(run(x)).argmax(dim=-1)) for x in images.split(BATCH)])
    single = [images[i : i + 1].contiguous() for i in range(min(8, len(images)))]
    full = images.repeat((BATCH + len(images) - 1) // len(images), 1, 1, 1)[:BATCH].contiguous()  # 32 test images (repeated if fewer)
    latency = interleaved(runners, single, rounds, warmup=2)
    throughput = interleaved(runners, [full], throughput_rounds, warmup=1)
    reference = top1.get("onnx_fp32")
    found: dict[str, Any] = {}
    for key, file in present.items():
        right = int((top1[key] == labels).sum())
        found[key] = {
            "file": file.name,
            "mb": file.stat().st_size / 1e6,
            "latency_ms": latency[key] * 1e3,
            "img_s": BATCH / throughput[key],
            "accuracy": {"value": right / len(labels), "ci95": proportion_interval(right, len(labels)), "images": len(labels)},
            "agreement_with_onnx_fp32": None if reference is None else float(np.mean(top1[key] == reference)),
        }
    return found
