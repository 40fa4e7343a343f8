"""transferlab-attack: a targeted, L-infinity-bounded attack on one image, judged on the saved 8-bit PNG.

`python -m transferlab.attack input=dog.jpg crop=[200,20,600,420] target="Siamese cat" eps=1/255` writes
original.png, adversarial.png, difference.png (amplified) and result.json to the run dir.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from transferlab.cli.app import Command
from transferlab.core.files import write_json
from transferlab.core.hardware import resolve_device
from transferlab.insight.attacks import parse_eps, targeted_attack
from transferlab.insight.pixels import build_pixel_classifier, load_pixels, opinion_of, ranked, save_png, second_opinion
from transferlab.training.artifacts import print_config_tree
from transferlab.training.builders import container

log = logging.getLogger(__name__)


def attack(cfg: DictConfig) -> dict[str, Any]:
    """Attack, save the three PNGs, and measure the result again on the saved 8-bit file."""
    out_dir = Path(cfg.paths.output_dir)
    print_config_tree(cfg, save_to=out_dir / "config.yaml")
    device = resolve_device(cfg.device)
    eps = parse_eps(cfg.eps)
    step_size = parse_eps(cfg.step_size, "step_size") if cfg.step_size is not None else None
    model = build_pixel_classifier(container(cfg.backbone), cfg.ckpt_path).to(device)
    target = model.resolve_target(cfg.target)
    original = load_pixels(cfg.input, model.preprocessing, list(cfg.crop) if cfg.crop else None).to(device)
    ((source_label, source_prob),) = model.top(original, 1)
    log.info(
        "%s is %r (%.3f) to %s; attacking towards %r with eps=%s",
        cfg.input,
        source_label,
        source_prob,
        model.name,
        model.class_names[target],
        cfg.eps,
    )

    result = targeted_attack(
        model, original, target, eps, steps=cfg.steps, step_size=step_size, random_start=cfg.random_start, stop_prob=cfg.stop_prob, seed=cfg.seed
    )
    original_saved = save_png(original, out_dir / "original.png")
    adversarial = save_png(result.adversarial, out_dir / "adversarial.png")
    change = adversarial - original_saved
    amplify = float(cfg.amplify) if cfg.amplify else 0.5 / max(eps, 1 / 255)
    save_png(0.5 + amplify * change, out_dir / "difference.png")

    summary: dict[str, Any] = {
        "source_label": source_label,
        "source_prob": source_prob,
        "target": model.class_names[target],
        "target_index": target,
        "target_prob": float(model.probabilities(adversarial[None])[0, target]),  # re-measured on the saved PNG
        "adversarial_top5": ranked(model, adversarial),
        "eps": eps,
        "linf": float(change.abs().max()),
        "l2": float(change.norm()),
        "changed_fraction": float((change != 0).float().mean()),
        "steps": result.steps,
        "seconds": round(result.seconds, 2),
        "model": model.name,
        "input": str(cfg.input),
        "crop": list(cfg.crop) if cfg.crop else None,
        "difference_amplification": amplify,
    }
    if cfg.transfer_backbone:
        other = second_opinion(cfg.transfer_backbone).to(device)
        summary["transfer"] = {
            "original": opinion_of(other, summary["target"], original_saved, "transfer_backbone"),
            "adversarial": opinion_of(other, summary["target"], adversarial, "transfer_backbone"),
        }
        summary["transfer"]["fooled"] = summary["transfer"]["adversarial"]["top5"][0]["name"] == summary["target"]
    write_json(out_dir / "result.json", summary)
    log.info(
        "%s: p(%s)=%.4f on the saved PNG, linf=%.1f/255, l2=%.3f, %d steps",
        out_dir / "adversarial.png",
        summary["target"],
        summary["target_prob"],
        summary["linf"] * 255,
        summary["l2"],
        result.steps,
    )
    return summary


command = Command("attack", attack)
main = command.main


if __name__ == "__main__":
    main()
