"""A package's network as an ExecuTorch program (model.pte) for phones: XNNPACK-delegated, fp32 or int8, and its runtime.

Why ExecuTorch: it is PyTorch's own way onto Android and iOS. The .pte is a flatbuffer that ExecuTorch's small C++
runtime runs without Python or libtorch; the XNNPACK delegate gives it the optimised CPU kernels (fp32 and int8) that
phones use. `export_pte` goes the documented route (torch.export -> to_edge_transform_and_lower with the
XnnpackPartitioner -> to_executorch); with calibration images it quantizes first with PT2E (XNNPACKQuantizer:
int8 weights per output channel, int8 activations whose ranges the calibration images set), about a quarter the size.
`pte_logits` runs a written .pte in executorch.runtime (the same C++ runtime, through pybind) so export.py can check it
against the checkpoint like every other format.

One program serves batches 1..MAX_BATCH (a dynamic batch dimension); a network whose batch dimension cannot be made
symbolic (torch.export or XNNPACK refuses, or the runtime cannot resize it) is written for batch 1, and `pte_logits`
then runs images one at a time (a phone classifies one photo at a time anyway). The returned info says which.

executorch and torchao are imported inside the functions: they come with the optional `mobile` extra, which the
caller checks (core.errors.require_packages) before calling.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Iterator, Sequence
from importlib import metadata
from pathlib import Path
from typing import Any, Optional

import torch

from transferlab.core.errors import DataError

log = logging.getLogger(__name__)

BACKEND = "xnnpack"
# The largest batch one program takes. Not larger: while XNNPACK lowers the graph, torch's fake convolution asks
# `batch >= 16` to choose a memory format (torch/_subclasses/fake_impls.py), which narrows a symbolic batch to
# <= 15 whatever the declared maximum; declaring 15 makes the program say what it can do. Larger batches are split.
MAX_BATCH = 15
EXAMPLE_BATCH = 2  # torch.export specialises a batch of 1 to a constant: trace with 2, then 1..MAX_BATCH run
QUANTIZER = "XNNPACKQuantizer (PT2E): symmetric int8, weights per output channel, static activations from the calibration images"
# Log records of third-party code that say nothing to a user of the export (logger name -> start of the message).
KNOWN_NOISE = (("torch.utils._pytree", "%s is an Enum subclass and is now natively supported"),)  # torchao's KernelPreference on import


class _KnownNoise(logging.Filter):
    """Drops exactly the records in KNOWN_NOISE (by their unformatted message), nothing else of the logger."""

    def __init__(self, prefix: str) -> None:
        super().__init__()
        self.prefix = prefix

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(self.prefix)


@contextlib.contextmanager
def known_noise_silenced() -> Iterator[None]:
    """While executorch / torchao import (torchao registers KernelPreference with torch's pytree, which warns once per
    process on import): only those records are dropped, and the filters are removed afterwards."""
    filters = [(logging.getLogger(name), _KnownNoise(prefix)) for name, prefix in KNOWN_NOISE]
    for logger, found in filters:
        logger.addFilter(found)
    try:
        yield
    finally:
        for logger, found in filters:
            logger.removeFilter(found)


def export_pte(network: torch.nn.Module, file: Path, size: int, calibration: Optional[Sequence[torch.Tensor]] = None) -> dict[str, Any]:
    """Write `network` (normalised images [N, 3, size, size] -> logits; eval mode, float32) as an ExecuTorch program
    at `file`: fp32 when `calibration` is None, else int8 calibrated on those normalised batches. Returns the formats
    entry for config.json. The batch dimension is dynamic when the network, XNNPACK and the runtime all allow it."""
    if calibration is not None and not any(len(x) for x in calibration):
        raise DataError("int8 ExecuTorch export: no calibration images (it needs a few normalised training images)")
    started = time.perf_counter()
    network = network.eval()
    try:
        program, batch = _program(network, size, calibration, MAX_BATCH), MAX_BATCH
        file.write_bytes(program)
        _runs_batches(file, size, (1, 3))
    except Exception as exc:  # any refusal of a symbolic batch (torch.export, lowering, the runtime) has the same answer
        log.warning("ExecuTorch: no dynamic batch for this network (%s); writing a program for batch 1", " ".join(str(exc).split())[:300])
        program, batch = _program(network, size, calibration, 1), 1
        file.write_bytes(program)
    precision = "fp32" if calibration is None else "int8"
    log.info(
        "ExecuTorch %s program written in %.0f s: %s (%.1f MB, batches 1..%d)",
        precision,
        time.perf_counter() - started,
        file,
        len(program) / 1e6,
        batch,
    )
    info: dict[str, Any] = {
        "file": file.name,
        "backend": BACKEND,
        "precision": precision,
        "input": "images",
        "dynamic_batch": batch > 1,
        "max_batch": batch,
        "bytes": len(program),
        "executorch": metadata.version("executorch"),
    }
    if calibration is not None:
        info.update(quantizer=QUANTIZER, calibration_images=sum(len(x) for x in calibration), torchao=metadata.version("torchao"))
    return info


def pte_logits(file: Path, inputs: list[torch.Tensor]) -> list[torch.Tensor]:
    """Logits of each batch in `inputs` from the .pte run in executorch.runtime: any batch size (split into the
    program's largest batch, one image at a time for a batch-1 program)."""
    method = _load_forward(file)
    capacity = int(method.metadata.input_tensor_meta(0).sizes()[0])
    results = []
    for images in inputs:
        chunks = images.detach().float().contiguous().split(capacity)
        # clone: the runtime's output tensor is its planned memory, which the next execute overwrites
        results.append(torch.cat([method.execute([chunk.contiguous()])[0].clone() for chunk in chunks]))
    return results


def _program(network: torch.nn.Module, size: int, calibration: Optional[Sequence[torch.Tensor]], max_batch: int) -> bytes:
    """The .pte bytes: (quantized) network exported with a batch of 1..max_batch (max_batch 1: a fixed batch of 1)."""
    with known_noise_silenced():
        from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner
        from executorch.exir import to_edge_transform_and_lower

    example = (torch.zeros(EXAMPLE_BATCH if max_batch > 1 else 1, 3, size, size),)
    dynamic = ({0: torch.export.Dim("batch", min=1, max=max_batch)},) if max_batch > 1 else None
    if calibration is not None:
        network = _quantized(network, example, dynamic, calibration, max_batch)
    with torch.no_grad():
        exported = torch.export.export(network, example, dynamic_shapes=dynamic)
    lowered = to_edge_transform_and_lower(exported, partitioner=[XnnpackPartitioner()])
    return bytes(lowered.to_executorch().buffer)


def _quantized(network: torch.nn.Module, example: tuple[torch.Tensor], dynamic: Any, calibration: Sequence[torch.Tensor], max_batch: int) -> Any:
    """PT2E int8: capture, insert observers (XNNPACK's quantizer), run the calibration batches, convert. The result
    is a graph with quantize / dequantize pairs that XNNPACK lowers to int8 kernels."""
    with known_noise_silenced():
        from executorch.backends.xnnpack.quantizer.xnnpack_quantizer import XNNPACKQuantizer, get_symmetric_quantization_config
        from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e

    quantizer = XNNPACKQuantizer().set_global(get_symmetric_quantization_config(is_per_channel=True))
    captured = torch.export.export(network, example, dynamic_shapes=dynamic).module()
    prepared = prepare_pt2e(captured, quantizer)
    with torch.no_grad():
        for images in calibration:
            for chunk in images.float().split(max_batch):  # the captured graph checks its batch range
                prepared(chunk)
    return convert_pt2e(prepared)


def _load_forward(file: Path) -> Any:
    with known_noise_silenced():
        from executorch.runtime import Runtime

    return Runtime.get().load_program(Path(file)).load_method("forward")


def _runs_batches(file: Path, size: int, batches: tuple[int, ...]) -> None:
    """Raise unless the runtime resizes the written program's input to each batch (checked on zeros: cheap)."""
    for batch, logits in zip(batches, pte_logits(file, [torch.zeros(n, 3, size, size) for n in batches])):
        if logits.shape[0] != batch:
            raise RuntimeError(f"the program answered {logits.shape[0]} rows for a batch of {batch}")
