"""Side-by-side speed benchmark: transferlab against plain PyTorch loops, on the same data in one invocation.

    python scripts/benchmark.py            # full (under 45 min on 2 CPU cores; the fill section alone ~15 of them, tradeoff ~12)
    python scripts/benchmark.py --quick    # every key, smaller (under 4 min on 2 CPU cores, plus a few for tradeoff)
    python scripts/benchmark.py --device cuda --sections finetune,precision,peak   # on a GPU machine
    python scripts/benchmark.py --check    # ... and exit 1 when a target is missed
    python scripts/benchmark.py --check --from benchmark.json   # only evaluate the targets of an earlier run
    python scripts/benchmark.py --sections lora   # LoRA vs full fine-tuning: trainable parameters, peak memory, s/step
    python scripts/benchmark.py --sections tradeoff   # fp32 / int8 ONNX and ExecuTorch per model: size, latency, accuracy

Prints a markdown table and writes benchmark.json. Its top-level keys are stable (other tooling reads them):
frozen_speedup, frozen_speedup_cache, frozen_speedup_bf16, frozen_speedup_workers, frozen_acc_baseline,
frozen_acc_transferlab, finetune_overhead, bf16_speedup_resnet50_train, bf16_speedup_lite0_train, decode_speedup,
decode_draft_speedup, peak_fraction, probe_balanced_acc_sklearn, probe_balanced_acc_transferlab, hardware,
predict_vs_raw, predict_onnxruntime_img_s, fill_vs_raw, fill_img_s, fill_raw_img_s, int8_size_ratio_lite0,
int8_latency_ratio_lite0, pte_int8_size_ratio_lite0, pte_int8_latency_ratio_lite0,
targets; the measurements
behind them are under `details`. `frozen_speedup` is the lesson loop's wall time over transferlab-train's with
every speed setting; the `_cache` / `_bf16` / `_workers` ones turn on that setting alone (None where the device
has no bf16). `decode_speedup` compares the same output (Lite0's eval resize + crop) from a Pillow loop and from
our full decode; `decode_draft_speedup` our reduced (draft) decode on large JPEGs against the same Pillow loop.
`fill_vs_raw` is transferlab's feature-cache fill img/s over a raw PyTorch loop's. The `int8_*_ratio_*` keys
(tradeoff) are int8 over fp32 of the same model's package: file size, and time per image at batch 1 (ONNX in
onnxruntime, `pte_`: ExecuTorch), all files interleaved with the same threads. `targets` holds
{key: {value, target, met}} for every measured row with a target. Only ratios measured side by side in this one
run are meaningful on a shared machine.

The sections are the `bench` package beside this file, one module each (bench/frozen.py, finetune.py, precision.py,
accuracy.py, decode.py, peak.py, probe.py, predict.py, fill.py, lora.py, tradeoff.py with tradeoff_timing.py), listed in one table (bench/__init__.py: the run,
the markdown rows and the targets of each); the command line is bench/cli.py.
"""

from __future__ import annotations

import sys

# Python puts a script's own folder first on sys.path, so `python scripts/benchmark.py` finds the bench package
# beside it from any working directory; inside the package nothing depends on sys.path.
from bench.cli import main

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:], description=__doc__.split("\n\n")[0]))
