"""transferlab-visualize: an "ideal" image of one class, for a pretrained ImageNet head or a trained checkpoint.

`python -m transferlab.visualize backbone=tf_efficientnet_lite0 target="Siamese cat" heldout_backbone=tf_efficientnet_lite1`
writes <run>/ideal.png and <run>/result.json (target probability and total variation of the saved 8-bit PNG,
and the probability a second, held-out network gives it).
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from transferlab.cli.app import Command
from transferlab.core.files import write_json
from transferlab.core.hardware import resolve_device
from transferlab.insight.ideal import IdealSettings, ideal_image
from transferlab.insight.pixels import build_pixel_classifier, opinion_of, ranked, save_png, second_opinion, total_variation
from transferlab.training.artifacts import print_config_tree
from transferlab.training.builders import container

log = logging.getLogger(__name__)


def visualize(cfg: DictConfig) -> dict[str, Any]:
    """Optimise the image, save it as an 8-bit PNG, and judge the saved file (also by a held-out network)."""
    out_dir = Path(cfg.paths.output_dir)
    print_config_tree(cfg, save_to=out_dir / "config.yaml")
    device = resolve_device(cfg.device)
    settings = IdealSettings(**{f.name: cfg[f.name] for f in dataclasses.fields(IdealSettings)})
    model = build_pixel_classifier(container(cfg.backbone), cfg.ckpt_path).to(device)
    target = model.resolve_target(cfg.target)
    log.info("Optimising an image of %r (class %d of %s), %d steps", model.class_names[target], target, model.name, settings.steps)
    result = ideal_image(
        model, target, settings, lambda step, prob, tv: log.info("step %4d  p(target)=%.4f  TV=%.4f", step, prob, tv) if step % 64 == 0 else None
    )
    saved = save_png(result.image, out_dir / "ideal.png")
    summary: dict[str, Any] = {
        "target": model.class_names[target],
        "target_index": target,
        "target_prob": float(model.probabilities(saved[None])[0, target]),
        "top5": ranked(model, saved),
        "steps": result.steps,
        "seconds": round(result.seconds, 2),
        "total_variation": float(total_variation(saved)),
        "model": model.name,
        "image": "ideal.png",
        "settings": dataclasses.asdict(settings),
    }
    if cfg.heldout_backbone:
        heldout = opinion_of(second_opinion(cfg.heldout_backbone).to(device), model.class_names[target], saved, "heldout_backbone")
        summary.update(heldout_prob=heldout["target_prob"], heldout=heldout)
    write_json(out_dir / "result.json", summary)
    log.info(
        "%s: p(%s)=%.4f, TV=%.4f%s",
        out_dir / "ideal.png",
        summary["target"],
        summary["target_prob"],
        summary["total_variation"],
        f", held-out {cfg.heldout_backbone}: {summary['heldout_prob']:.4f}" if cfg.heldout_backbone else "",
    )
    return summary


command = Command("visualize", visualize)
main = command.main


if __name__ == "__main__":
    main()
