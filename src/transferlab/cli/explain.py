"""transferlab-explain: class activation maps of image files, for a checkpoint or a backbone's ImageNet head.

`python -m transferlab.explain ckpt_path=CKPT input=DIR hydra.run.dir=OUT` writes, per image, OUT/<stem>_cam.npy
(float32 [S, S] in [0, 1] over the model's input crop, S = its input size), OUT/<stem>_cam.png (the map over
that crop) and a row of OUT/explain.csv (path, target, prob); files that cannot be read are listed in
OUT/skipped_images.csv with their reason.

A multi-label checkpoint has one map per label explained, each in its own files, <stem>_<label>_cam.npy / .png
(the label with characters other than letters, digits, `.`, `-`, `_` as `_`): every label the model predicts
(calibrated probability at or over its threshold; none: the most probable one, so each image gets a map), or only
`target`, predicted or not. Each label has its own map because each has its own logit: the cat's map need not
look like the dog's on a picture of both. explain.csv gains `threshold` and `predicted` (true / false) per row.
"""

from __future__ import annotations

import csv
import logging
import re
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig
from PIL import Image

from transferlab.cli.app import Command
from transferlab.cli.predict import collect_inputs
from transferlab.core.errors import DataError
from transferlab.core.files import write_json
from transferlab.core.hardware import resolve_device
from transferlab.insight.cam import CamExplainer, backbone_of, body_of, overlay, target_layer
from transferlab.insight.pixels import PixelClassifier, build_pixel_classifier, load_pixels
from transferlab.training.artifacts import print_config_tree, write_skipped
from transferlab.training.builders import container

log = logging.getLogger(__name__)


def output_stems(files: list[Path], root: Path) -> list[str]:
    """<stem> per file; where two files share a stem (sub-folders), their relative path with `__` instead."""
    counts = Counter(f.stem for f in files)
    return [f.stem if counts[f.stem] == 1 else "__".join(f.relative_to(root).with_suffix("").parts) for f in files]


def label_tokens(names: list[str]) -> list[str]:
    """Each label as it appears in a file name (letters, digits, `.`, `-`, `_`; anything else `_`); two labels that
    would share one get their index appended, so no map overwrites another."""
    tokens = [re.sub(r"[^A-Za-z0-9._-]", "_", name).strip(".") or "label" for name in names]
    repeated = Counter(tokens)
    return [f"{token}_{k}" if repeated[token] > 1 else token for k, token in enumerate(tokens)]


def explained(model: PixelClassifier, probs: torch.Tensor, target: int | None) -> list[tuple[int, int]]:
    """(image, class) pairs to draw: single-label, `target` or each image's top class; multi-label, `target` or each
    label over its threshold (none over: the most probable label)."""
    if not model.multilabel:
        return [(j, target if target is not None else int(p.argmax())) for j, p in enumerate(probs)]
    return [(j, k) for j, p in enumerate(probs) for k in ([target] if target is not None else model.predicted(p) or [int(p.argmax())])]


def explain(cfg: DictConfig) -> dict[str, Any]:
    out_dir = Path(cfg.paths.output_dir)
    print_config_tree(cfg, save_to=out_dir / "config.yaml", show=False)
    device = resolve_device(cfg.device)
    model = build_pixel_classifier(container(cfg.backbone), cfg.ckpt_path).to(device)
    target = None if cfg.target is None else model.resolve_target(cfg.target)
    body = body_of(model)
    layer = target_layer(backbone_of(model), model.input_size, cfg.target_layer)
    explainer = CamExplainer(model, body, layer, str(cfg.method), int(cfg.batch_size))
    files = collect_inputs(cfg.input)
    if not files:
        raise DataError(f"input: no files under {cfg.input}; give an image file or a folder of images")
    root = Path(cfg.input).expanduser() if Path(cfg.input).expanduser().is_dir() else files[0].parent
    stems = output_stems(files, root)
    log.info(
        "%s of %d image(s): %s, layer %s%s",
        explainer.method,
        len(files),
        model.name,
        layer,
        f", class {model.class_names[target]}" if target is not None else "",
    )
    skipped: dict[str, str] = {}
    rows = []
    tokens = label_tokens(model.class_names) if model.multilabel else []
    step = 1 if explainer.method == "scorecam" else max(1, int(cfg.batch_size))
    for start in range(0, len(files), step):
        batch, names, pixels = [], [], []
        for file, stem in zip(files[start : start + step], stems[start : start + step]):
            try:
                pixels.append(load_pixels(file, model.preprocessing))
            except DataError as exc:
                skipped[str(file)] = str(exc).removeprefix("input: ")
                continue
            batch.append(file)
            names.append(stem)
        if not batch:
            continue
        images = torch.stack(pixels)
        probs = model.probabilities(images).cpu()
        pairs = explained(model, probs, target)
        maps = np.concatenate([explainer(images[[j for j, _ in part]], [k for _, k in part]) for part in chunks(pairs, step)])
        for (j, k), cam in zip(pairs, maps):
            stem = f"{names[j]}_{tokens[k]}" if model.multilabel else names[j]
            np.save(out_dir / f"{stem}_cam.npy", cam.astype(np.float32))
            Image.fromarray(overlay(images[j], cam, float(cfg.image_weight))).save(out_dir / f"{stem}_cam.png")
            row = [str(batch[j]), model.class_names[k], f"{float(probs[j, k]):.6f}"]
            if model.multilabel:
                row += [f"{model.thresholds[k]:.6f}", str(float(probs[j, k]) >= model.thresholds[k]).lower()]
            rows.append(row)
    explainer.close()
    with open(out_dir / "explain.csv", "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["path", "target", "prob", *(["threshold", "predicted"] if model.multilabel else [])])
        writer.writerows(rows)
    if skipped:
        write_skipped(out_dir / "skipped_images.csv", skipped)
        log.warning("%d file(s) could not be read (nothing was deleted); list in %s", len(skipped), out_dir / "skipped_images.csv")
    summary = {"model": model.name, "method": explainer.method, "layer": layer, "images": len(rows), "skipped": len(skipped)}
    if model.multilabel:  # a row per map: images and maps counted apart
        summary.update(task="multilabel", images=len({row[0] for row in rows}), maps=len(rows))
    write_json(out_dir / "explain.json", summary)
    log.info("Wrote %d map(s) to %s (explain.csv: path, target, prob)", len(rows), out_dir)
    return summary


def chunks(pairs: list[tuple[int, int]], size: int) -> list[list[tuple[int, int]]]:
    """At most `size` maps per pass (a multi-label image can ask for several)."""
    return [pairs[i : i + size] for i in range(0, len(pairs), size)]


command = Command("explain", explain)
main = command.main


if __name__ == "__main__":
    main()
