"""transferlab-export: write a model package (model.onnx, model.pt, model.safetensors, config.json, README.md)."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from transferlab.cli.app import Command
from transferlab.deploy.export import export_package

log = logging.getLogger(__name__)


def export(cfg: DictConfig) -> dict[str, Any]:
    """Export, check every format against the checkpoint, and say where the package is and what it holds."""
    output = Path(str(cfg.output)).expanduser()
    config = export_package(str(cfg.ckpt_path), output, str(cfg.format), int(cfg.opset))
    checks = ", ".join(f"{name} {info['max_abs_diff']:.1e}" for name, info in config["formats"].items())
    log.info(
        "Wrote the model package %s: %s; largest |logit difference| to the checkpoint: %s",
        output,
        ", ".join(sorted(p.name for p in output.iterdir() if not p.name.startswith("."))),
        checks,
    )
    return config


command = Command("export", export)
main = command.main


if __name__ == "__main__":
    main()
