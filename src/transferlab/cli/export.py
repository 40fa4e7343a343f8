"""transferlab-export: write a model package (model.onnx, model.pt, model.pte, model.safetensors, config.json, README.md),
with quantize=int8 also model.int8.onnx / model.int8.pte, checked against fp32 on the run's images."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, ListConfig

from transferlab.cli.app import Command
from transferlab.deploy.export import export_package
from transferlab.deploy.quantize import Int8Settings

log = logging.getLogger(__name__)


def export(cfg: DictConfig) -> dict[str, Any]:
    """Export, check every format against the checkpoint, and say where the package is and what it holds."""
    output = Path(str(cfg.output)).expanduser()
    fmt = [str(f) for f in cfg.format] if isinstance(cfg.format, ListConfig) else str(cfg.format)
    int8 = None
    if cfg.quantize == "int8":
        root = None if cfg.data_root is None else str(cfg.data_root)
        int8 = Int8Settings(calibration_images=int(cfg.int8_calibration_images), min_agreement=float(cfg.min_int8_agreement), data_root=root)
    config = export_package(str(cfg.ckpt_path), output, fmt, int(cfg.opset), int8)
    checks = ", ".join(
        f"{name} {info['max_abs_diff']:.1e}" if "max_abs_diff" in info else f"{name} top-1 agreement {info['agreement']:.4f}"
        for name, info in config["formats"].items()
    )
    log.info(
        "Wrote the model package %s: %s; largest |logit difference| to the checkpoint: %s",
        output,
        ", ".join(sorted(p.name for p in output.iterdir() if not p.name.startswith("."))),
        checks,
    )
    if config.get("int8_agreement"):
        log.info("int8: %s", int8_summary(config))
    return config


def int8_summary(config: dict[str, Any]) -> str:
    """One line of the int8 figures config.json records (the model card has them with their meaning)."""
    agreed, verdict = config["int8_agreement"], config.get("int8_verdict") or {}
    latency = config.get("int8_latency_ratio")
    return (
        f"{config['int8_model']} agrees with fp32 on {agreed['value']:.4f} of {agreed['images']} images "
        f"[{agreed['ci95'][0]:.3f}, {agreed['ci95'][1]:.3f}]; test accuracy int8 vs fp32: {verdict.get('verdict', 'no test split')}; "
        f"size {config['int8_size_ratio']:.2f}x" + (f", latency {latency:.2f}x (batch 1, this machine)" if latency is not None else "")
    )


command = Command("export", export)
main = command.main


if __name__ == "__main__":
    main()
