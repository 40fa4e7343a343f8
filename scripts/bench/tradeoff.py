"""(j) The `tradeoff` section of scripts/benchmark.py: what int8 and ExecuTorch give and cost, per model.

Lite0, Lite2, the ensemble (`backbone=ensemble`: Lite0 + Lite1 + Lite2 side by side) and a Lite0 student distilled
from the ensemble (`finetune=distill`) are each trained frozen on the species task of the photos and exported with
`format=[onnx,executorch] quantize=int8`, as a user would. Then, per model, its four files are compared: fp32 ONNX
(model.onnx), int8 ONNX (model.int8.onnx), fp32 ExecuTorch (model.pte) and int8 ExecuTorch (model.int8.pte):

- size: the file's bytes;
- latency: time per image at batch 1; throughput: img/s at predict's batch size (32; a .pte takes at most
  deploy.mobile.MAX_BATCH images a call, so its 32 are split as pte_logits splits them). The four run with the same
  threads (onnxruntime's intra-op threads and ExecuTorch's threadpool both set to torch's), interleaved round by
  round with the order rotated every round, medians: drift and other load hit all four alike. This machine's figures;
- accuracy on the package's stored test split (splits.csv), with its exact Clopper-Pearson interval
  (core.statistics.proportion_interval), and each file's top-1 agreement with fp32 ONNX on the same images.

A model whose export fails in some format keeps its row: the formats that did export are measured, and the reason
the others did not is recorded (the export's own one line). The models are trained on the benchmark's photos
(`--quick`: 3 per breed), so the accuracy intervals are wide; the sizes and the speed ratios are what the table is for.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Optional

import torch

from .common import Context, Row, Target, at, fmt, transferlab_run
from .tradeoff_timing import BATCH, FILES, measure, set_executorch_threads

LABELS = {"onnx_fp32": "ONNX fp32", "onnx_int8": "ONNX int8", "pte_fp32": ".pte fp32", "pte_int8": ".pte int8"}
NAMES = {"lite0": "Lite0", "lite2": "Lite2", "ensemble": "ensemble (Lite0+1+2)", "distilled": "Lite0 distilled from the ensemble"}
# What each export tries, in order, until one works: the row keeps the reason of every attempt that failed.
# The ones after the first say which format (and int8 or not) a model cannot take, and why.
ATTEMPTS = (
    ("format=[onnx,executorch]", "quantize=int8"),
    ("format=onnx", "quantize=int8"),
    ("format=executorch", "quantize=int8"),
    ("format=[onnx,executorch]", "quantize=none"),
    ("format=onnx", "quantize=none"),
    ("format=executorch", "quantize=none"),
)
# --quick: 3 photos per breed leave about 72 training images, and 64 of them would calibrate, leaving 47 to check the
# int8 model on, where a single changed answer is under the 0.98 guard; the quick run calibrates on 16 and only asks
# 0.95 (a smoke run: its figures are not the table's). The full run uses transferlab-export's defaults.
QUICK_EXPORT = ("int8_calibration_images=16", "min_int8_agreement=0.95")
SIZE_TARGET = "<= 0.35"  # int8 about a quarter of fp32 (int8 weights; the graph's scales and zero points on top)


def _reason(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {' '.join(str(exc).split())[:400]}"


def train(name: str, root: Path, work: Path, epochs: int, teacher: Optional[Path]) -> dict[str, Any]:
    """A frozen species run (a transferlab-train in this process); `checkpoint` None and `error` when it failed."""
    backbone = "ensemble" if name == "ensemble" else ("tf_efficientnet_lite2" if name == "lite2" else "tf_efficientnet_lite0")
    overrides = [
        "data=oxford_pets",
        f"data.root={root}",
        "data.task=species",
        "data.download=false",
        "data.class_weights=balanced",
        f"backbone={backbone}",
        "finetune=distill" if name == "distilled" else "finetune=frozen",
        "finetune.head_solver=sgd",
        f"trainer.max_epochs={epochs}",
        "seed=1",
        "callbacks.progress_bar=null",
        "trainer.enable_progress_bar=false",
        f"paths.cache_dir={work / 'tradeoff-cache'}",
    ]
    if name == "distilled":
        overrides.append(f"finetune.teacher={teacher}")
    else:
        overrides.append("optimizer.lr=3e-3")
    out = work / f"tradeoff-{name}"
    try:
        found = transferlab_run(overrides, out)
    except Exception as exc:  # noqa: BLE001 - the row says why the model is missing
        return {"checkpoint": None, "error": _reason(exc), "overrides": overrides}
    return {"checkpoint": out / "checkpoints" / "best.ckpt", "seconds": found["seconds"], "test_acc": found["test_acc"], "overrides": overrides}


def export(checkpoint: Path, out: Path, work: Path, extra: tuple[str, ...] = ()) -> dict[str, Any]:
    """transferlab-export of the checkpoint: the first of ATTEMPTS that works, and why each earlier one did not."""
    from transferlab.cli import export as export_command

    failed: dict[str, str] = {}
    for i, attempt in enumerate(ATTEMPTS):
        started = time.perf_counter()
        try:
            config = export_command.command.run_in_process(
                [f"ckpt_path={checkpoint}", f"output={out}", *attempt, *extra], work / f"{out.name}-run-{i}"
            )
        except Exception as exc:  # noqa: BLE001 - recorded; the next attempt asks for less
            failed[" ".join(attempt)] = _reason(exc)
            continue
        return {"overrides": " ".join(attempt), "seconds": time.perf_counter() - started, "failed": failed, "config": config}
    return {"overrides": None, "failed": failed, "config": None}


def failures(failed: dict[str, str]) -> str:
    """The distinct reasons of the failed export attempts, each with the first attempt that gave it."""
    seen: dict[str, str] = {}
    for attempt, reason in failed.items():
        seen.setdefault(reason, attempt)
    return "; ".join(f"{attempt}: {reason[:160]}" for reason, attempt in seen.items())


def ratios(files: dict[str, Any], fp32: str, int8: str) -> dict[str, Optional[float]]:
    if fp32 not in files or int8 not in files:
        return {"size": None, "latency": None, "img_s": None}
    a, b = files[fp32], files[int8]
    return {"size": b["mb"] / a["mb"], "latency": b["latency_ms"] / a["latency_ms"], "img_s": b["img_s"] / a["img_s"]}


def tradeoff_section(root: Path, work: Path, quick: bool) -> dict[str, Any]:
    threads = torch.get_num_threads()
    pte_threads = set_executorch_threads(threads)
    epochs, rounds, throughput_rounds = (2, 10, 3) if quick else (4, 30, 7)
    models: dict[str, Any] = {}
    for name in NAMES:
        started = time.perf_counter()
        teacher = (models.get("ensemble") or {}).get("checkpoint")
        if name == "distilled" and teacher is None:
            models[name] = {"error": "no ensemble checkpoint to distil from (its training failed)"}
            continue
        run = train(name, root, work, epochs, Path(teacher) if teacher else None)
        entry: dict[str, Any] = {"train": {k: (str(v) if isinstance(v, Path) else v) for k, v in run.items()}}
        if run["checkpoint"] is None:
            models[name] = {**entry, "error": f"training failed: {run['error']}"}
            continue
        entry["checkpoint"] = str(run["checkpoint"])
        if quick and name == "ensemble":  # its six export attempts all fail (in-network resize), minutes apiece: a full run shows why
            models[name] = {
                **entry,
                "error": "not exported by --quick: ONNX and ExecuTorch both fail on its in-network resize (a full run records why)",
            }
            continue
        package_dir = work / f"tradeoff-{name}-package"
        exported = export(run["checkpoint"], package_dir, work, QUICK_EXPORT if quick else ())
        config = exported.pop("config")
        entry["export"] = exported
        if config is None:
            models[name] = {**entry, "error": f"every export failed: {failures(exported['failed'])}"}
            continue
        entry["int8_agreement"] = (config.get("int8_agreement") or {}).get("value")
        entry["int8_verdict"] = (config.get("int8_verdict") or {}).get("verdict")
        entry["test_images"] = (config.get("fp32_accuracy") or {}).get("images")
        try:
            entry["files"] = measure(package_dir, threads, rounds, throughput_rounds)
        except Exception as exc:  # noqa: BLE001 - the row says why
            entry["error"] = f"measuring failed: {_reason(exc)}"
            entry["files"] = {}
        entry["onnx_int8"] = ratios(entry["files"], "onnx_fp32", "onnx_int8")
        entry["pte_int8"] = ratios(entry["files"], "pte_fp32", "pte_int8")
        entry["seconds"] = time.perf_counter() - started
        models[name] = entry
    return {
        "task": "species",
        "images": len(sorted(root.glob("*.jpg"))),
        "epochs": epochs,
        "export_overrides": list(QUICK_EXPORT) if quick else [],
        "batch": BATCH,
        "threads": threads,
        "executorch_threads": pte_threads,
        "latency_rounds": rounds,
        "throughput_rounds": throughput_rounds,
        "timing": "the package's four files interleaved round by round (order rotated), same threads, medians",
        "models": models,
    }


def run(ctx: Context) -> dict[str, Any]:
    """--quick: the 3-per-breed subset, 2 epochs, fewer timing rounds, QUICK_EXPORT."""
    return tradeoff_section(ctx.root, ctx.work, ctx.quick)


def markdown_table(f: dict[str, Any]) -> str:
    """The section's figures as one table per file (what docs/deploy.md shows)."""
    lines = [
        "| model | file | size MB | batch 1 ms/image | batch 32 img/s | test accuracy [95 % CI] | agrees with ONNX fp32 |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for name, m in f["models"].items():
        files = m.get("files") or {}
        for key in FILES:
            if key in files:
                x = files[key]
                acc = x["accuracy"]
                lines.append(
                    f"| {NAMES[name]} | {LABELS[key]} | {x['mb']:.1f} | {x['latency_ms']:.1f} | {x['img_s']:.1f} | "
                    f"{acc['value']:.3f} [{acc['ci95'][0]:.3f}, {acc['ci95'][1]:.3f}] | {fmt(x['agreement_with_onnx_fp32'], 3)} |"
                )
        missing = [LABELS[key] for key in FILES if key not in files]
        if missing:
            why = m.get("error") or failures((m.get("export") or {}).get("failed") or {})
            lines.append(f"| {NAMES[name]} | {', '.join(missing)} | – | – | – | – | not exported: {why} |")
    return "\n".join(lines)


def rows(f: dict[str, Any]) -> list[Row]:
    out = []
    for name, m in f["models"].items():
        files = m.get("files") or {}
        for runtime, label in (("onnx", "ONNX"), ("pte", ".pte")):
            r = m.get(f"{runtime}_int8") or {}
            fp32, int8 = files.get(f"{runtime}_fp32"), files.get(f"{runtime}_int8")
            what = f"(j) {NAMES[name]} species, {label} fp32 vs int8"
            if fp32 is None or int8 is None:
                why = m.get("error") or failures((m.get("export") or {}).get("failed") or {}) or "not exported"
                out.append(Row(f"{what}: not measured ({why[:400]})"))
                continue
            target = Target(f"int8_size_ratio_{name}" if runtime == "onnx" else f"pte_int8_size_ratio_{name}", r["size"], SIZE_TARGET)
            a, b = fp32["accuracy"], int8["accuracy"]
            out.append(
                Row(
                    f"{what}: MB (batch 1 ms {fp32['latency_ms']:.1f} vs {int8['latency_ms']:.1f}: **{r['latency']:.2f}x**; batch {f['batch']} "
                    f"img/s {fp32['img_s']:.1f} vs {int8['img_s']:.1f}; test acc {a['value']:.3f} vs {b['value']:.3f} on {a['images']}; "
                    f"{f['threads']} thread(s))",
                    f"{fp32['mb']:.1f}",
                    f"{int8['mb']:.1f}",
                    f"**{r['size']:.2f}x**",
                    target if name == "lite0" else None,
                )
            )
    return out


KEYS = {
    "int8_size_ratio_lite0": at("models", "lite0", "onnx_int8", "size"),
    "int8_latency_ratio_lite0": at("models", "lite0", "onnx_int8", "latency"),
    "pte_int8_size_ratio_lite0": at("models", "lite0", "pte_int8", "size"),
    "pte_int8_latency_ratio_lite0": at("models", "lite0", "pte_int8", "latency"),
}
