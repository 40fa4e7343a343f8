"""README.md of a model package: the model card (data, metrics with their intervals, intended use, how to load)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

HEADLINE = ("test/acc", "test/balanced_acc", "test/macro_f1", "test/acc_top3", "test/ece", "test/nll", "val/acc", "cv/acc")
# A multi-label model has no accuracy: mAP (with its interval) leads where test/acc does for one class per image.
HEADLINE_MULTILABEL = (
    "test/map",
    "test/f1_micro",
    "test/f1_macro",
    "test/subset_acc",
    "test/hamming_loss",
    "test/ece",
    "test/nll",
    "val/map",
    "cv/map",
)
INTERVALS = {
    False: "accuracy: exact Clopper-Pearson; balanced accuracy and macro-F1: Clopper-Pearson at the jackknife effective sample size",
    True: "mAP and the F1s: percentile bootstrap over test images",
}
SHOWN_LABELS = 40


def _metric_rows(metrics: Mapping[str, Any], multilabel: bool = False) -> list[str]:
    rows = []
    for key in HEADLINE_MULTILABEL if multilabel else HEADLINE:
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
    temperature = config["temperature"]
    if isinstance(temperature, Mapping):  # multi-label: one per label
        values = [float(t) for t in temperature.values()]
        return f"calibrated: a temperature per label, {min(values):.3f} to {max(values):.3f} ({how})"
    return f"calibrated: temperature {temperature:.3f} ({how})"


def threshold_rows(config: Mapping[str, Any]) -> list[str]:
    """A multi-label package's decisions: each label's threshold and temperature (and test AP when measured)."""
    thresholds, temperatures = config.get("thresholds") or {}, config.get("temperature") or {}
    metrics = config.get("metrics") or {}
    rows = ["| label | threshold | temperature | test AP |", "| --- | --- | --- | --- |"]
    for name in list(thresholds)[:SHOWN_LABELS]:
        ap = metrics.get(f"test/ap/{name}")
        rows.append(
            f"| {name} | {thresholds[name]:.3f} | {float(temperatures.get(name, 1.0)):.3f} | {f'{ap:.3f}' if isinstance(ap, (int, float)) else '-'} |"
        )
    if len(thresholds) > SHOWN_LABELS:
        rows.append(f"| ... | {len(thresholds)} labels in all: config.json has every one | | |")
    return rows


def model_card(config: Mapping[str, Any]) -> str:
    """Markdown; every figure comes from config.json (so the card and the machine-readable file cannot disagree)."""
    classes = list(config["class_names"])
    multilabel = config.get("task") == "multilabel"
    data = config.get("data") or {}
    backbone = config.get("backbone") or {}
    formats = config.get("formats") or {}
    metrics = config.get("metrics") or {}
    shown_classes = ", ".join(classes[:40]) + (f", ... ({len(classes)} in all)" if len(classes) > 40 else "")
    rows = _metric_rows(metrics, multilabel)
    checks = ", ".join(f"{name} {info['max_abs_diff']:.1e}" for name, info in formats.items() if isinstance(info, Mapping) and "max_abs_diff" in info)
    kind = f"multi-label image classifier ({len(classes)} labels)" if multilabel else f"image classifier ({len(classes)} classes)"
    lines = [
        f"# {backbone.get('name', 'transferlab')} {kind}",
        "",
        f"Exported by transferlab {config.get('transferlab_version', '?')} (package format {config.get('format_version', '?')}).",
        "",
        "## Data",
        f"- Dataset: `{data.get('_target_') or '?'}`, root `{data.get('root') or '-'}`, task `{data.get('task') or '-'}`; seed {config.get('seed')}.",
        f"- {'Labels' if multilabel else 'Classes'}: {shown_classes}.",
        f"- Backbone: `{backbone.get('name')}` ({backbone.get('source')}; weights `{backbone.get('weights')}`, pool `{backbone.get('pool') or 'auto'}`), "
        f"fine-tuning mode `{config.get('finetune_mode')}`{merged_note(config)}.",
        "",
        "## Metrics",
    ]
    if rows:
        lines += [
            f"Measured on {config.get('metrics_images') or 'the run' + chr(39) + 's held-out test split'}; 95 % intervals ({INTERVALS[multilabel]}).",
            "",
            "| metric | value | 95 % interval |",
            "| --- | --- | --- |",
            *rows,
        ]
    else:
        lines.append("No metrics.json was found beside the checkpoint: this model has no measured figures. Evaluate it before use.")
    if multilabel:
        lines += [
            "",
            "## Label decisions",
            "A label is predicted when its calibrated probability is at or over its threshold:",
            "",
            *threshold_rows(config),
        ]
    lines += int8_lines(config)
    lines += ["", "## Intended use and limits", *use_lines(multilabel)]
    lines += [
        "- The figures hold for images drawn like the test split; check on your own data before relying on them.",
        f"- Probabilities are {calibration_text(config)}.",
        "",
        "## Preprocessing (exactly what the model expects)",
        f"RGB; resize the shorter side to {config['resize_size']} px ({config['interpolation']}); centre-crop {config['input_size']} px;",
        f"scale to [0, 1]; normalise with mean {config['mean']} and std {config['std']}. Input: float32 NCHW. Output: logits",
        "(already divided by the temperature, one per label): a sigmoid per label gives the probabilities."
        if multilabel
        else "(already divided by the temperature): softmax gives the probabilities.",
        "",
        "## Files",
        *[
            f"- `{info.get('file')}`: {name}" + (f", opset {info['opset']}" if "opset" in info else "") + (", int8" if "agreement" in info else "")
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
        *(
            [
                "probs = 1 / (1 + np.exp(-logits[0]))",
                "print([n for n, p in zip(cfg['class_names'], probs) if p >= cfg['thresholds'][n]])",
            ]
            if multilabel
            else ["print(cfg['class_names'][int(logits.argmax())])"]
        ),
        "```",
        "PyTorch: `torch.jit.load('model.pt')(x)`; or in transferlab, this folder is a checkpoint:",
        "`transferlab-predict ckpt_path=<this folder> input=photos/`, `transferlab-serve ckpt_path=<this folder>`.",
        "",
    ]
    return "\n".join(lines)


def use_lines(multilabel: bool) -> list[str]:
    """What the answers mean, and the limit that follows from it."""
    if multilabel:
        return [
            "- Tagging photos like the training images with the labels above. Each label is decided on its own (a sigmoid",
            "  and its threshold): an image may get none, one or several labels; out-of-domain images may still get some.",
        ]
    return [
        "- Classifying photos like the training images into the classes above. Every input gets one of these classes:",
        "  there is no 'none of these' answer, so out-of-domain images get confident wrong labels.",
    ]


def merged_note(config: Mapping[str, Any]) -> str:
    """finetune=lora: the package's weights have its adapters merged in (a plain model, no peft needed)."""
    merged = config.get("lora") or {}
    return f" (LoRA rank {merged['finetune'].get('r')} on {merged['merged_layers']} layers, merged into the weights)" if merged else ""


def _figure(found: Any) -> str:
    """`0.9935 [0.977, 0.999] (306 images)` of a config.json entry with value, ci95 and images; `-` for null."""
    if not isinstance(found, Mapping):
        return "- (no test split)"
    low, high = found["ci95"]
    return f"{found['value']:.4f} [{low:.3f}, {high:.3f}] ({found['images']} images)"


def int8_lines(config: Mapping[str, Any]) -> list[str]:
    """quantize=int8: what the int8 model was calibrated on, how often it agrees with fp32, and what it costs."""
    agreed = config.get("int8_agreement")
    if not isinstance(agreed, Mapping):
        return []
    calibration, verdict = config.get("int8_calibration") or {}, config.get("int8_verdict")
    latency, details = config.get("int8_latency_ratio"), config.get("int8_latency") or {}
    compared = (
        f"{verdict['verdict']} (int8 - fp32 = {verdict['difference']:+.4f}, 95 % [{verdict['ci95'][0]:+.4f}, {verdict['ci95'][1]:+.4f}], "
        f"p = {verdict['p_value']:.3f}; {verdict['test']})"
        if isinstance(verdict, Mapping)
        else "- (no test split)"
    )
    speed = (
        f"{latency:.2f}x fp32's time per image at batch 1 ({details.get('int8_ms', 0):.1f} vs {details.get('fp32_ms', 0):.1f} ms, "
        f"{details.get('threads')} thread(s), {details.get('machine')}): this machine's figure (the one that exported it); measure on yours"
        if isinstance(latency, (int, float))
        else "not measured"
    )
    return [
        "",
        "## int8",
        f"`{config.get('int8_model')}` is statically quantised (int8 weights per channel, uint8 activations), its activation ranges fixed on "
        f"{calibration.get('images')} of the run's training images (seed {calibration.get('seed')}, listed in `{calibration.get('file')}`); "
        "it was checked against fp32 on every other stored image of the run (95 % Clopper-Pearson intervals):",
        "",
        "| figure | value |",
        "| --- | --- |",
        f"| top-1 agreement with fp32 | {_figure(agreed)} |",
        f"| test accuracy, int8 | {_figure(config.get('int8_accuracy'))} |",
        f"| test accuracy, fp32 | {_figure(config.get('fp32_accuracy'))} |",
        f"| int8 vs fp32 on the same test images | {compared} |",
        f"| size | {config.get('int8_size_ratio', 0):.2f}x the fp32 file |",
        f"| latency | {speed} |",
        "",
        "Use it with `transferlab-predict ckpt_path=<this folder> runtime=onnx precision=int8` (precision=auto stays fp32)."
        if str(config.get("int8_model")).endswith(".onnx")
        else "Load it with ExecuTorch's runtime (XNNPACK).",
    ]
