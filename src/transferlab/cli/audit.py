"""transferlab-audit: find mislabelled images, near-duplicates (and the ones that leak across splits) and outliers.

`python -m transferlab.audit data=image_folder data.root=DIR` computes frozen features of every image (through
the feature cache a frozen training run shares), runs a K-fold linear probe on them and writes, in the run
folder: label_issues.csv, duplicates.csv, outliers.csv, skipped_images.csv, audit.json, audit.html and, with
`write_exclude=[label_issues,duplicates]`, exclude.txt for `data.exclude`. No image is moved or deleted.

Multi-label data (`data.task=multilabel`, e.g. `data=image_index`) is audited as label sets: a one-vs-rest probe and
cleanlab's multi-label functions (insight.label_issues); label_issues.csv's `given` / `suggested` are sets, the
names joined by `;`.
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Any

import numpy as np
from omegaconf import DictConfig, OmegaConf

from transferlab.cli.app import Command
from transferlab.config.paths import config_dir
from transferlab.core.errors import ConfigError, require_packages
from transferlab.core.files import write_json
from transferlab.core.hardware import resolve_device, usable_cores
from transferlab.data.labels import class_index, multi_hot
from transferlab.data.splits import split_key
from transferlab.data.stored_splits import assignment
from transferlab.insight.audit import EXCLUDE_KINDS, AuditResult, AuditSettings, exclusions, run_audit, summary, write_exclude, write_tables
from transferlab.insight.audit_page import probe_line, write_audit_page
from transferlab.insight.embeddings import pooled_features
from transferlab.models.backbones import create_backbone
from transferlab.models.package import load_split_table
from transferlab.training.artifacts import print_config_tree
from transferlab.training.builders import build_datamodule, container

log = logging.getLogger(__name__)


def audit(cfg: DictConfig) -> dict[str, Any]:
    out_dir = Path(cfg.paths.output_dir)
    print_config_tree(cfg, save_to=out_dir / "config.yaml", show=False)
    require_packages("transferlab-audit", "insight", "cleanlab", "imagehash")
    kinds = list(cfg.write_exclude or [])
    unknown = [k for k in kinds if k not in EXCLUDE_KINDS]
    if unknown:
        raise ConfigError(
            f"write_exclude: {unknown[0]!r} is not a finding; choose from {', '.join(EXCLUDE_KINDS)} (e.g. write_exclude=[label_issues,duplicates])"
        )
    backbone = create_backbone(**container(cfg.backbone))
    datamodule = build_datamodule(container(cfg.data), backbone.preprocessing)
    samples = [(path, label, split) for split, items in datamodule.splits.items() for path, label in items]
    if cfg.splits:  # the split a run stored: what its model was trained and tested on
        stored = assignment(load_split_table(str(cfg.splits)))
        samples = [(path, label, stored.get(split_key(path, datamodule.root), "unlisted")) for path, label, _ in samples]
        log.info("Splits from %s: %s", cfg.splits, {s: sum(1 for *_, x in samples if x == s) for s in ("train", "val", "test", "unlisted")})
    if len(samples) < 2 * int(cfg.folds):
        raise ConfigError(f"folds: {cfg.folds} folds need at least {2 * int(cfg.folds)} images, the data has {len(samples)}")
    paths = [Path(p) for p, _, _ in samples]
    fill = fill_settings(cfg)
    multilabel = bool(getattr(datamodule, "multilabel", False))
    given = [label for _, label, _ in samples]
    labels = multi_hot(given, len(datamodule.class_names)) if multilabel else np.array(given, dtype=np.int64)
    features = pooled_features(
        backbone,
        [(p, 0 if multilabel else class_index(label)) for p, label, _ in samples],  # the features need no label
        out_dir / "features.npy",
        cache_dir=cfg.data.cache_dir if cfg.feature_cache else None,
        device=resolve_device(cfg.device),
        precision=str(cfg.precision),
        batch_size=fill.batch_size,
        workers=datamodule.workers(),
        shard_images=int(fill.shard_images),
        auto_workers=datamodule.num_workers == "auto",
    )
    settings = AuditSettings(
        folds=int(cfg.folds),
        seed=int(cfg.seed),
        threshold=float(cfg.duplicates.threshold),
        hash_distance=int(cfg.duplicates.hash_distance),
        hash_min_similarity=float(cfg.duplicates.hash_min_similarity),
        neighbours=int(cfg.duplicates.neighbours),
        outlier_z=float(cfg.outlier_z),
        workers=max(1, 2 * usable_cores()),
    )
    result = run_audit(paths, labels, [s for _, _, s in samples], datamodule.class_names, features, settings)
    result.skipped = dict(datamodule.skipped)
    files = write_tables(result, out_dir)
    exclude_file = write_exclude(exclusions(result, kinds), kinds, out_dir / "exclude.txt") if kinds else None
    facts = summary(result, settings, exclude_file)
    facts["backbone"] = backbone.name
    facts["settings"] = dataclasses.asdict(settings)
    write_json(out_dir / "audit.json", facts)
    write_audit_page(result, facts, out_dir / "audit.html", int(cfg.max_rows))
    print(one_screen(result, facts, out_dir, files))
    return facts


def fill_settings(cfg: DictConfig) -> Any:
    """performance.feature_cache (batch_size, shard_images): the audit's own when its config has the group
    (`+performance=default`), else what a training run reads, conf/performance/default.yaml: one place for both."""
    section = cfg.get("performance")
    if section is None:
        section = OmegaConf.load(Path(config_dir()) / "performance" / "default.yaml")
    return section.feature_cache


def one_screen(result: AuditResult, facts: dict[str, Any], out_dir: Path, files: dict[str, Path]) -> str:
    """What the audit found, in a terminal's height: counts, the first few of each finding, where the rest is."""
    names, text = result.class_names, result.text
    kind = "labels (multi-label)" if result.multilabel else "classes"
    lines = [
        f"Audit of {facts['images']} images, {facts['classes']} {kind} ({facts['backbone']} features, "
        f"{facts['probe']['folds']}-fold probe: out-of-fold {probe_line(facts)})",
        f"  label issues      {facts['label_issues']:>6}",
    ]
    lines += [
        f"    {result.paths[i.index]}: given {text(i.given) or '(none)'}, looks like {text(i.suggested) or '(none)'} ({i.score:.2f})"
        for i in result.label_issues[:5]
    ]
    lines.append(f"  near-duplicates   {facts['duplicates']:>6}  ({facts['cross_split_duplicates']} across train/val/test: leakage)")
    lines += [
        f"    {result.paths[p.a]} ~ {result.paths[p.b]} ({p.similarity:.3f}, {result.splits[p.a]}/{result.splits[p.b]})" for p in result.leaks[:5]
    ]
    lines.append(f"  outliers          {facts['outliers']:>6}")
    lines += [f"    {result.paths[o.index]} (nearest class {names[o.nearest]}, neighbour similarity {o.similarity:.2f})" for o in result.outliers[:3]]
    lines.append(f"  unusable files    {facts['skipped']:>6}" + (f"  ({files['skipped']})" if "skipped" in files else ""))
    lines.append(f"Details: {out_dir / 'audit.html'}; CSVs: " + ", ".join(p.name for k, p in files.items() if k != "skipped"))
    if facts["exclude_file"]:
        lines.append(f"Train without the flagged files: data.exclude={facts['exclude_file']}  (nothing was moved or deleted)")
    else:
        lines.append("Nothing was moved or deleted; write_exclude=[label_issues,duplicates] writes a list for data.exclude")
    return "\n".join(lines)


command = Command("audit", audit)
main = command.main


if __name__ == "__main__":
    main()
