"""finetune=distill: the teacher's logits of every training image and view, computed once and cached like features.

The student is frozen (finetune.student=frozen): its head trains by epochs on the cached student features, so the
teacher needs answering only for the same fixed inputs: with `performance.feature_cache.augmented_views` K = 0 the
image itself (the eval transform), with K > 0 the same K seeded views the student's cache holds. This callback is
the FeatureCache (same stores, fill loop, lock, DDP shares and storage) plus one more store per teacher, and hands the
datamodule (features, label, teacher logits) triples of the same view (data.features.DistillDataset).

The teacher's logits are computed with the teacher's own preprocessing: K = 0 its eval transform (its resize, crop
and normalisation) from the decoded file; K > 0 its train transform (its input size and normalisation) drawn with
the student's view seeds from the file decoded at the student's decode size, so each random draw (crop box,
flip, colour) is the student's: the two see the same region of the same image, each at its own resolution.

A teacher store's fingerprint holds a sha256 of everything the teacher computes with (backbone, head, calibration
temperature: not the file's path), the inputs (transform, views, seed) and the library versions; its rows are
found by image key as features are. The logits stored are the teacher's calibrated ones (raw / its temperature):
its own best-calibrated probabilities are what finetune.temperature then softens.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Optional, Union

import lightning.pytorch as pl
import torch
from torch import nn

from transferlab.callbacks.feature_cache import FeatureCache
from transferlab.core.errors import ConfigError
from transferlab.data.features import DistillDataset, FeatureStore, Inputs, describe, fingerprint, image_key, weights_digest
from transferlab.data.integrity import sizes_and_digests
from transferlab.data.stored_splits import SEEN
from transferlab.models.classifier import TransferClassifier, load_checkpoint

log = logging.getLogger(__name__)


class TeacherLogits(nn.Module):
    """images -> the teacher's calibrated logits; `images_seen` counts every image it is run on (the tests count
    teacher passes with it: one per image and view, none when the cache has them)."""

    temperature: torch.Tensor

    def __init__(self, teacher: TransferClassifier) -> None:
        super().__init__()
        self.backbone, self.head = teacher.backbone, teacher.head
        self.register_buffer("temperature", teacher.temperature.detach().clone())
        self.images_seen = 0

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        self.images_seen += len(images)
        return self.head(self.backbone(images)) / self.temperature


class DistillCache(FeatureCache):
    """The feature cache of a frozen student, plus the teacher's logits of its training images (same views)."""

    def __init__(self, *, teacher: str, **settings: Union[int, str, None]) -> None:
        """`teacher`: finetune.teacher, a checkpoint or model package (config.validation checked that it exists);
        `settings`: FeatureCache's. The teacher is loaded once, at the first fit, and kept for every fold."""
        super().__init__(**settings)  # type: ignore[arg-type]
        self.teacher_path = str(Path(teacher).expanduser())
        self._teacher: Optional[TeacherLogits] = None
        self._teacher_classes: list[str] = []
        self._teacher_train: set[str] = set()  # sha256 of the files the teacher was fitted or selected on (its split table)
        self._digest = ""
        self._warned = False

    @property
    def teacher_forward_images(self) -> int:
        """Images the teacher has been run on by this callback so far (every fold and stage)."""
        return self._teacher.images_seen if self._teacher is not None else 0

    def _load_teacher(self) -> TeacherLogits:
        if self._teacher is None:
            model, _ = load_checkpoint(self.teacher_path)
            if model.task.multilabel:
                raise ConfigError(
                    f"finetune.teacher: {self.teacher_path} is a multi-label model; finetune=distill distils single-label teachers only"
                )
            self._teacher = TeacherLogits(model).eval()
            self._teacher.requires_grad_(False)
            self._teacher_classes = list(model.class_names)
            table = model.split_table or {}
            self._teacher_train = {str(row[3]) for row in table.get("rows", []) if row[1] in SEEN and row[3]}
            self._digest = weights_digest(self._teacher)
        return self._teacher

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        datamodule = trainer.datamodule  # type: ignore[attr-defined]
        fresh = stage == "fit" and "train" not in datamodule.feature_sets and bool(datamodule.splits.get("train"))
        super().setup(trainer, pl_module, stage)
        if fresh:
            self._add_teacher(trainer, pl_module, datamodule)

    def _add_teacher(self, trainer: pl.Trainer, pl_module: pl.LightningModule, datamodule: Any) -> None:
        """The teacher store's rows for the training images (computed where missing); the train set becomes triples."""
        if datamodule.multilabel:
            raise ConfigError("finetune=distill: the data is multi-label (data.task=multilabel); distillation here is single-label (softmax) only")
        teacher = self._load_teacher()
        if self._teacher_classes != list(datamodule.class_names):
            raise ConfigError(
                f"finetune.teacher: its classes {self._teacher_classes} differ from the data's {list(datamodule.class_names)} "
                "(the same names in the same order are needed: each teacher logit is a student class)"
            )
        self._warn_overlap(datamodule)
        teacher.to(trainer.strategy.root_device)
        store = self._teacher_store(datamodule, str(trainer.precision), teacher)
        samples = list(datamodule.splits["train"])
        seen_before = teacher.images_seen
        missing, fill = self.ensure(trainer, pl_module, datamodule, store, samples, teacher, "teacher")
        keys = [image_key(path) for path, _ in samples]
        datamodule.feature_sets["train"] = DistillDataset(datamodule.feature_sets["train"], store, keys)
        self.stats["teacher"] = {
            "checkpoint": self.teacher_path,
            "images": len(keys),
            "computed": len(missing),
            "reused": len(keys) - len(missing),
            "forward_images": teacher.images_seen - seen_before,
            "views": self.views,
            "seconds": round(fill.seconds, 4),
            "store": str(store.folder or "memory"),
        }
        self.write_stats(trainer)
        log.info(
            "Distillation: teacher logits of %d training image(s) x %d view(s): %d computed, %d reused (%s)",
            len(keys),
            max(1, self.views),
            len(missing),
            len(keys) - len(missing),
            store.folder or "memory",
        )

    def _teacher_store(self, datamodule: Any, precision: str, teacher: TeacherLogits) -> FeatureStore:
        """The store of this teacher's logits for these inputs (module docstring: which transform, which decode size)."""
        prep = teacher.backbone.preprocessing
        augment = datamodule.augment if self.views else None
        if self.views:
            inputs = Inputs(prep.train_transform(augment), datamodule.preprocessing.decode_size(augment), self.views, self.seed)
        else:
            inputs = Inputs(prep.eval_transform(), prep.decode_size(None), 0, self.seed)
        description = {**describe(teacher.backbone, inputs, precision, self._digest), "kind": "teacher_logits", "calibrated": True}
        key = fingerprint(**description)
        if key not in self._stores:
            self._stores[key] = FeatureStore(self.root, key, {**description, "teacher": self.teacher_path})
            self._inputs[key] = inputs
        return self._stores[key]

    def _warn_overlap(self, datamodule: Any) -> None:
        """One line when the teacher was fitted on images this run tests on: its soft labels would carry their answers."""
        if self._warned or not self._teacher_train or not datamodule.splits.get("test"):
            return
        tested = [Path(path) for path, _ in datamodule.splits["test"]]
        digests = sizes_and_digests(tested, datamodule.root, datamodule.cache_dir)
        overlap = sum(1 for path in tested if digests.get(str(path), (0, ""))[1] in self._teacher_train)
        if overlap:
            self._warned = True
            log.warning(
                "finetune.teacher: %d of the %d test images here (a cross-validation: of this fold) are among the teacher's training images "
                "(its split table): the student's test figures are optimistic; use a teacher trained on other images",
                overlap,
                len(tested),
            )
