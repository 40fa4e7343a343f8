"""transferlab-rank: which pretrained backbone for these images, in minutes and before any training.

`transferlab-rank data=image_folder data.root=DIR backbones=[tf_efficientnet_lite0,tf_efficientnet_lite2,
{name: tf_efficientnet_lite0, weights: none}]` computes each candidate's frozen features once, through the feature
cache a frozen training run of the same data reads (a later `transferlab-train` computes none of them again), and
scores them on the same images and folds (training.ranking). In the run folder: ranking.csv, ranking.md,
ranking.html, ranking.json; on the console the table, the recommendation and the `transferlab-train` line for it.
"""

from __future__ import annotations

import logging
import shlex
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from transferlab.cli.app import Command
from transferlab.config.paths import config_dir
from transferlab.core.errors import ConfigError
from transferlab.insight.ranking_page import summary_lines, write_outputs
from transferlab.models.backbones import create_backbone
from transferlab.training.artifacts import print_config_tree
from transferlab.training.builders import build_datamodule, container
from transferlab.training.ranking import RankSettings, agreements, rank_backbones, resolve_candidates

log = logging.getLogger(__name__)


def data_overrides() -> list[str]:
    """The command line's data.* (and seed) overrides: what the train line needs to see the same images."""
    from hydra.core.hydra_config import HydraConfig

    given = list(HydraConfig.get().overrides.task)
    return [o for o in given if o.lstrip("+~").startswith(("data=", "data.", "seed="))]


def rank(cfg: DictConfig) -> dict[str, Any]:
    out_dir = Path(cfg.paths.output_dir)
    print_config_tree(cfg, save_to=out_dir / "config.yaml", show=False)
    items = OmegaConf.to_container(cfg.backbones, resolve=True)
    if not isinstance(items, list) or not items:
        raise ConfigError("backbones: give a list of candidates, e.g. backbones=[tf_efficientnet_lite0,tf_efficientnet_lite2]")
    if cfg.data.get("shots") not in (None, "all"):
        raise ConfigError("data.shots: transferlab-rank scores each backbone on every image outside an official test list; remove data.shots")
    candidates = resolve_candidates(items, Path(config_dir()))
    first = next((c for c in candidates if not c.error), None)
    if first is None:
        raise ConfigError(f"backbones: no candidate names a backbone config: {candidates[0].error}")
    # The images and their split do not depend on the backbone: one datamodule, with the first candidate's preprocessing.
    datamodule = build_datamodule(container(cfg.data), create_backbone(**first.settings).preprocessing)
    cache = cfg.performance.feature_cache
    settings = RankSettings(
        folds=int(cfg.folds),
        c_folds=int(cfg.c_folds),
        seed=int(cfg.seed),
        alpha=float(cfg.alpha),
        device=str(cfg.device),
        precision=str(cfg.precision),
        cache_dir=str(cfg.paths.cache_dir) if cache.enabled and cache.storage == "disk" and cfg.paths.cache_dir else None,
        batch_size=cache.batch_size,
        shard_images=int(cache.shard_images),
    )
    scored, chosen = rank_backbones(candidates, datamodule, settings, out_dir)
    rows = [s.row for s in scored]
    train_line = None
    if chosen is not None:
        train_line = shlex.join(["transferlab-train", *data_overrides(), *candidates[chosen].overrides])
    facts = {
        "images": len(datamodule.pool),
        "classes": len(datamodule.class_names),
        "multilabel": bool(datamodule.multilabel),
        "metric": "mAP" if datamodule.multilabel else "accuracy",
        "folds": settings.folds,
        "c_folds": settings.c_folds,
        "alpha": settings.alpha,
        "seed": settings.seed,
        "recommended": rows[chosen]["backbone"] if chosen is not None else None,
        "train_command": train_line,
        "agreement": agreements(rows),
        "features_computed": sum(s.computed for s in scored),
        "official_test_images": len(datamodule.splits.get("test", [])) if datamodule.has_official_test else 0,
    }
    files = write_outputs(out_dir, rows, facts)
    print("\n".join(summary_lines(rows, facts)))
    print(f"Files: {', '.join(str(p) for p in files.values())}")
    return {**facts, "rows": rows}


command = Command("rank", rank)
main = command.main

if __name__ == "__main__":
    main()
