"""README.md of a model package: the model card (data, metrics with their intervals, intended use, how to load)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

HEADLINE = ("test/acc", "test/balanced_acc", "test/macro_f1", "test/acc_top3", "test/ece", "test/nll", "val/acc", "cv/acc")


def _metric_rows(metrics: Mapping[str, Any]) -> list[str]:
    rows = []
    for key in HEADLINE:
        value = metrics.get(key)
        if not isinstance(value, (int, float)):
            continue
        interval = metrics.get(f"{key}_ci95")
        shown = f"[{interval[0]:.3f}, {interval[1]:.3f}]" if isinstance(interval, (list, tuple)) and len(interval) == 2 else "-"
        rows.append(f"| `{key}` | {value:.4f} | {shown} |")
    return rows


def calibration_text(config: Mapping[str, Any]) -> str:
    if not config.get("logits_are_calibrated"):
        return "not calibrated (temperature 1: the network's own confidence)"
    record = config.get("calibration") or {}
    how = (
        f"chosen on {record['held_out_images']} {record.get('fitted_on') or 'held-out images'}, rule `{record.get('rule')}`"
        if record.get("held_out_images")
        else "fitted on held-out images"
    )
    return f"calibrated: temperature {config['temperature']:.3f} ({how})"


def model_card(config: Mapping[str, Any]) -> str:
    """Markdown; every figure comes from config.json (so the card and the machine-readable file cannot disagree)."""
    classes = list(config["class_names"])
    data = config.get("data") or {}
    backbone = config.get("backbone") or {}
    formats = config.get("formats") or {}
    metrics = config.get("metrics") or {}
    shown_classes = ", ".join(classes[:40]) + (f", ... ({len(classes)} in all)" if len(classes) > 40 else "")
    rows = _metric_rows(metrics)
    checks = ", ".join(f"{name} {info.get('max_abs_diff', 0):.1e}" for name, info in formats.items() if isinstance(info, Mapping))
    lines = [
        f"# {backbone.get('name', 'transferlab')} image classifier ({len(classes)} classes)",
        "",
        f"Exported by transferlab {config.get('transferlab_version', '?')} (package format {config.get('format_version', '?')}).",
        "",
        "## Data",
        f"- Dataset: `{data.get('_target_') or '?'}`, root `{data.get('root') or '-'}`, task `{data.get('task') or '-'}`; seed {config.get('seed')}.",
        f"- Classes: {shown_classes}.",
        f"- Backbone: `{backbone.get('name')}` ({backbone.get('source')}; weights `{backbone.get('weights')}`, pool `{backbone.get('pool') or 'auto'}`), "
        f"fine-tuning mode `{config.get('finetune_mode')}`{merged_note(config)}.",
        "",
        "## Metrics",
    ]
    if rows:
        lines += [
            f"Measured on {config.get('metrics_images') or 'the run' + chr(39) + 's held-out test split'}; 95 % intervals (accuracy: exact "
            "Clopper-Pearson; balanced accuracy and macro-F1: Clopper-Pearson at the jackknife effective sample size).",
            "",
            "| metric | value | 95 % interval |",
            "| --- | --- | --- |",
            *rows,
        ]
    else:
        lines.append("No metrics.json was found beside the checkpoint: this model has no measured figures. Evaluate it before use.")
    lines += [
        "",
        "## Intended use and limits",
        "- Classifying photos like the training images into the classes above. Every input gets one of these classes:",
        "  there is no 'none of these' answer, so out-of-domain images get confident wrong labels.",
        "- The figures hold for images drawn like the test split; check on your own data before relying on them.",
        f"- Probabilities are {calibration_text(config)}.",
        "",
        "## Preprocessing (exactly what the model expects)",
        f"RGB; resize the shorter side to {config['resize_size']} px ({config['interpolation']}); centre-crop {config['input_size']} px;",
        f"scale to [0, 1]; normalise with mean {config['mean']} and std {config['std']}. Input: float32 NCHW. Output: logits",
        "(already divided by the temperature): softmax gives the probabilities.",
        "",
        "## Files",
        *[
            f"- `{info.get('file')}`: {name}" + (f", opset {info['opset']}" if "opset" in info else "")
            for name, info in formats.items()
            if isinstance(info, Mapping)
        ],
        f"- Export check (largest |logit difference| to the checkpoint on sample inputs): {checks or '-'}.",
        "",
        "## Load it",
        "onnxruntime (no PyTorch needed):",
        "```python",
        "import json, numpy as np, onnxruntime as ort",
        "from PIL import Image",
        "cfg = json.load(open('config.json'))",
        "img = Image.open('photo.jpg').convert('RGB')",
        "s = cfg['resize_size'] / min(img.size)",
        "img = img.resize((round(img.width * s), round(img.height * s)), Image.Resampling[cfg['interpolation'].upper()])",
        "left, top = (img.width - cfg['input_size']) // 2, (img.height - cfg['input_size']) // 2",
        "img = img.crop((left, top, left + cfg['input_size'], top + cfg['input_size']))",
        "x = (np.asarray(img, np.float32) / 255 - cfg['mean']) / cfg['std']",
        "logits = ort.InferenceSession('model.onnx').run(None, {'images': x.transpose(2, 0, 1)[None].astype(np.float32)})[0]",
        "print(cfg['class_names'][int(logits.argmax())])",
        "```",
        "PyTorch: `torch.jit.load('model.pt')(x)`; or in transferlab, this folder is a checkpoint:",
        "`transferlab-predict ckpt_path=<this folder> input=photos/`, `transferlab-serve ckpt_path=<this folder>`.",
        "",
    ]
    return "\n".join(lines)


def merged_note(config: Mapping[str, Any]) -> str:
    """finetune=lora: the package's weights have its adapters merged in (a plain model, no peft needed)."""
    merged = config.get("lora") or {}
    return f" (LoRA rank {merged['finetune'].get('r')} on {merged['merged_layers']} layers, merged into the weights)" if merged else ""
