"""The LightningModule: a pretrained `backbone` and a `head` (linear, or models.few_shot_heads), trained frozen, fully or gradually.

Everything needed to rebuild the model travels in its hyper-parameters (plain containers, so checkpoints load
with `weights_only=True`): backbone spec, class names, preprocessing, and the data config of the run. The
calibration temperature is a buffer of the state_dict: every logit the model returns is already divided by it,
and the temperature is applied once, at the boundary where probabilities leave the model: `forward` returns the
head's raw logits (training, feature maps, attacks), `calibrated_logits` divides them by the temperature (the
evaluation steps, predict, export), and with test-time views each view is calibrated before the probabilities are
averaged (models.tta.combine_views), so "before calibration" figures never need the temperature multiplied back.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Optional

import lightning.pytorch as pl
import torch
from torchmetrics import MaxMetric, MeanMetric
from torchmetrics.classification import MulticlassAccuracy

from transferlab.core.errors import DataError, TrainingDiverged
from transferlab.core.safe_load import read_checkpoint
from transferlab.data.preprocessing import Preprocessing
from transferlab.models import distillation, lora, package
from transferlab.models.backbones import Backbone, create_backbone
from transferlab.models.evaluation import gather_in_order
from transferlab.models.few_shot_heads import build_head
from transferlab.models.optimization import optimizers_and_schedule
from transferlab.models.regularization import batch_mixer
from transferlab.models.tta import views


class TransferClassifier(pl.LightningModule):
    temperature: torch.Tensor  # buffers, registered in __init__
    loss_weights: Optional[torch.Tensor]

    def __init__(
        self,
        backbone: Mapping[str, Any],
        class_names: list[str],
        finetune: Mapping[str, Any],
        optimizer: Mapping[str, Any],
        scheduler: Optional[Mapping[str, Any]] = None,
        preprocessing: Optional[Mapping[str, Any]] = None,
        run: Optional[Mapping[str, Any]] = None,
        loss_weights: Optional[Sequence[float]] = None,
        prebuilt_backbone: Optional[Backbone] = None,
        task: str = "single",
    ) -> None:
        """`backbone`: {name, weights, source, input_size}; `optimizer`/`scheduler`: Hydra `_partial_` nodes;
        `run`: the data config, seed and precision of the run, so eval can rebuild the same test split;
        `loss_weights`: one per class for the training loss (data.class_weights=balanced; multi-label: BCE's
        pos_weight per label), or None; `task`: single (softmax over the classes) or multilabel (a sigmoid per label)."""
        super().__init__()
        self.save_hyperparameters(ignore=["prebuilt_backbone"])
        self.backbone: Backbone = prebuilt_backbone if prebuilt_backbone is not None else create_backbone(**backbone)
        if preprocessing is not None:  # the stored one wins (input_size overrides, older runs)
            self.backbone.preprocessing = Preprocessing.from_dict(preprocessing)
        self.hparams["preprocessing"] = self.backbone.preprocessing.to_dict()
        self.class_names = list(class_names)
        num_classes = len(self.class_names)
        self.head = build_head(finetune, self.backbone.num_features, num_classes, task)  # dropout + linear; knn / prototype (head_solver)
        self.mode = distillation.effective_mode(finetune)  # finetune=distill: how its student trains (frozen)
        weights = torch.tensor(list(loss_weights), dtype=torch.float32) if loss_weights is not None else None
        self.task = distillation.make_task(task, finetune, weights)  # models.tasks: loss, probabilities, metrics (distill: + the teacher)
        self.mixer = batch_mixer(finetune.get("mixup"), finetune.get("cutmix"), num_classes, self.task.multilabel)  # training images only
        self.backbone_frozen = False
        self.backbone_graph_when_frozen = False  # finetune=gradual under DDP (callbacks.unfreeze): gradients flow, then are dropped
        self.channels_last = False
        self.tta = "none"  # test-time augmentation of the test step (models.tta); a runtime choice, not a hyper-parameter
        if self.mode in ("frozen", "gradual"):
            self.freeze_backbone()
        lora.attach(self.backbone, finetune)  # finetune=lora: adapters in the body, the rest of the backbone frozen

        # 1 = uncalibrated; set by training.calibration (multi-label: one temperature per label)
        self.register_buffer("temperature", torch.ones(num_classes) if self.task.multilabel else torch.ones(()))
        self.calibration: dict[str, Any] = {}  # how the temperature was chosen (training.calibration), kept in checkpoints
        self.thresholds: dict[str, float] = {}  # multi-label decisions: label -> threshold on its calibrated probability
        self.metric_masks: dict[str, Any] = {}  # split -> [N, K] pairs the metrics count (Pascal VOC's difficult), or none
        self.split_table: Optional[dict[str, Any]] = None  # the run's stored train / val / test files (data.stored_splits)

        # Training-step metrics without input checks: each check is a GPU->CPU sync that stalls every step.
        self.train_loss = MeanMetric(nan_strategy="disable")
        self.val_loss, self.test_loss = MeanMetric(), MeanMetric()
        self.train_acc = MulticlassAccuracy(num_classes, average="micro", validate_args=False)  # single-label only
        self.val_acc = MulticlassAccuracy(num_classes, average="micro")
        self.val_acc_best = MaxMetric()
        self.val_acc_best.persistent(True)  # survives resuming, so val/acc_best covers the whole run
        # Every evaluated image's logits, in dataset order (all ranks): the metrics, intervals and prediction files.
        # Per image three rows: calibrated (views averaged), uncalibrated (views averaged), the plain image's raw logits.
        self._batches: dict[str, list[tuple[torch.Tensor, torch.Tensor]]] = {"val": [], "test": []}
        self.outputs: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}  # split -> (calibrated logits, labels)
        self.uncalibrated: dict[str, torch.Tensor] = {}  # split -> the same without the temperature
        self.plain_raw: dict[str, torch.Tensor] = {}  # split -> raw logits of the image itself (no views): what T is fitted on
        self.test_confusion_matrix = torch.zeros(num_classes, num_classes, dtype=torch.long)

    # -- freezing ----------------------------------------------------------------------------------------
    def freeze_backbone(self) -> None:
        """A true linear probe: no gradients AND BatchNorm statistics / dropout of the backbone in eval mode."""
        self.backbone.requires_grad_(False)
        self.backbone.eval()
        self.backbone_frozen = True

    def unfreeze_backbone(self) -> None:
        self.backbone.body.requires_grad_(True)  # its ImageNet head stays frozen (models.backbone)
        self.backbone.train(self.training)
        self.backbone_frozen = False

    def train(self, mode: bool = True) -> TransferClassifier:
        super().train(mode)
        if self.backbone_frozen:
            self.backbone.eval()  # Lightning calls .train() every epoch; keep the frozen backbone in eval
        elif self.mode == "lora":
            lora.train_adapters_only(self.backbone, mode)  # the base (BatchNorm statistics) stays in eval
        return self

    # -- runtime ---------------------------------------------------------------------------------------
    def configure_runtime(self, channels_last: bool = False, compile: bool = False) -> None:
        """Speed settings that do not change what the model computes (so they are not hyper-parameters)."""
        self.channels_last = bool(channels_last)
        if self.channels_last:
            self.backbone.to(memory_format=torch.channels_last)
        if compile:
            self.backbone.body.compile()  # in place: parameter names (and so checkpoints) stay as they are

    # -- forward -----------------------------------------------------------------------------------------
    def features(self, images: torch.Tensor) -> torch.Tensor:
        if self.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        with torch.set_grad_enabled(torch.is_grad_enabled() and (not self.backbone_frozen or self.backbone_graph_when_frozen)):
            return self.backbone(images)

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        """Raw logits of images [N, 3, H, W], or of the backbone's pooled features [N, D] (the feature cache)."""
        return self.head(inputs if inputs.ndim == 2 else self.features(inputs))

    def calibrated_logits(self, inputs: torch.Tensor) -> torch.Tensor:
        """Logits divided by the calibration temperature: softmax gives the calibrated probabilities."""
        return self(inputs) / self.temperature

    def evaluate(self, inputs: torch.Tensor, tta: str) -> torch.Tensor:
        """[N, 3, K]: calibrated and uncalibrated logits (test-time views averaged as probabilities), and the raw logits
        of the image itself; cached features have no views."""
        shown = views(inputs, tta) if inputs.ndim == 4 else [inputs]
        raw = [self(view).float() for view in shown]
        calibrated = self.task.combine_views(raw, self.temperature)
        return torch.stack([calibrated, self.task.combine_views(raw, torch.ones_like(self.temperature)), raw[0]], dim=1)

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """The run's stored split and how it was calibrated travel with every checkpoint (plain containers)."""
        if self.split_table is not None:
            checkpoint["transferlab_splits"] = self.split_table
        if self.calibration:
            checkpoint["transferlab_calibration"] = dict(self.calibration)
        if self.thresholds:  # multi-label decisions (training.calibration)
            checkpoint["transferlab_thresholds"] = dict(self.thresholds)
        lora.shrink_checkpoint(self.hparams["finetune"], self.hparams["backbone"], checkpoint)  # adapters + head + base record

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        lora.restore_base(self, checkpoint)  # an adapter-only LoRA checkpoint gets the live (hash-checked) base back

    def imagenet_logits(self, images: torch.Tensor) -> torch.Tensor:
        """The backbone's own ImageNet classifier (visualisation and attacks use it)."""
        return self.backbone.imagenet_logits(images)

    # -- steps -------------------------------------------------------------------------------------------
    def training_step(self, batch: Any, batch_idx: int) -> Optional[torch.Tensor]:
        inputs, labels, *teacher = batch  # finetune=distill: + the cached teacher logits of the same views
        targets = labels
        if self.mixer is not None and inputs.ndim == 4:  # mixup / cutmix: images only (not cached features)
            inputs, targets = self.mixer(inputs, labels)
        logits = self(inputs).float()
        loss = self.task.loss(logits, targets, *teacher)
        self.train_loss(loss)
        self.log("train/loss", self.train_loss, on_step=True, on_epoch=True, prog_bar=True)
        if not self.task.multilabel:
            self.train_acc(logits, labels)
            self.log("train/acc", self.train_acc, on_step=False, on_epoch=True, prog_bar=True)
        return loss

    def on_train_epoch_end(self) -> None:
        """Stop a diverged run with a clear error instead of training on NaNs (one sync per epoch, not per step)."""
        if not self.train_loss.update_called:  # no training batch this epoch
            return
        loss = float(self.train_loss.compute())
        if not math.isfinite(loss):
            lr = self.trainer.optimizers[0].param_groups[0]["lr"] if self.trainer.optimizers else float("nan")
            raise TrainingDiverged(
                f"train/loss is {loss} in epoch {self.current_epoch}: training diverged; "
                f"lower optimizer.lr (now {lr:g}) or set trainer.gradient_clip_val"
            )

    def on_train_epoch_start(self) -> None:
        if self.trainer.optimizers:
            self.log("train/lr", self.trainer.optimizers[0].param_groups[0]["lr"], on_epoch=True, on_step=False)

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        inputs, labels = batch
        evaluated = self.evaluate(inputs, "none")
        logits = evaluated[:, 0]
        self.val_loss(self.task.nll(logits, labels), weight=len(labels))
        curve = self.trainer.state.fn == "fit"  # the selected checkpoint's validation after fit adds no curve point
        self.log("val/loss", self.val_loss, on_epoch=True, prog_bar=True, logger=curve)
        if not self.task.multilabel:  # multi-label: val/map, from every image's logits at the epoch's end
            self.val_acc(logits, labels)
            self.log("val/acc", self.val_acc, on_epoch=True, prog_bar=True, logger=curve)
        self._batches["val"].append((evaluated.detach().cpu(), labels.detach().cpu()))

    def on_validation_epoch_start(self) -> None:
        self._batches["val"] = []

    def on_validation_epoch_end(self) -> None:
        if self.trainer.sanity_checking:
            return
        selected = self.trainer.state.fn == "validate"  # the selected checkpoint's validation (training.calibration)
        if not self.task.multilabel:
            self.val_acc_best(self.val_acc.compute())
            self.log("val/acc_best", self.val_acc_best.compute(), sync_dist=True, prog_bar=True, logger=not selected)
        self._log_metrics("val", per_class=selected, skip=("acc",), logger=not selected)

    def test_step(self, batch: Any, batch_idx: int) -> None:
        inputs, labels = batch
        evaluated = self.evaluate(inputs, self.tta)
        self.test_loss(self.task.nll(evaluated[:, 0], labels), weight=len(labels))
        self.log("test/loss", self.test_loss, on_epoch=True)
        self._batches["test"].append((evaluated.detach().cpu(), labels.detach().cpu()))

    def on_test_epoch_start(self) -> None:
        self._batches["test"] = []

    def on_test_epoch_end(self) -> None:
        found = self._log_metrics("test", per_class=True)
        if self.task.multilabel:
            return
        for name in self.class_names:  # the per-class accuracy is the class's recall
            self.log(f"test/acc_class/{name}", found[f"recall/{name}"], sync_dist=False)
        logits, labels = self.outputs["test"]
        n = len(self.class_names)
        cells = labels * n + logits.argmax(dim=-1)
        self.test_confusion_matrix = torch.bincount(cells, minlength=n * n).reshape(n, n)

    def _log_metrics(self, split: str, per_class: bool, skip: tuple[str, ...] = (), logger: bool = True) -> dict[str, float]:
        """Gather the split's logits from every rank (in dataset order), keep them in `outputs`, log their metrics."""
        label_shape = (len(self.class_names),) if self.task.multilabel else ()
        evaluated, labels = gather_in_order(self._batches[split], (3, len(self.class_names)), label_shape)
        self._batches[split] = []
        logits = evaluated[:, 0]
        self.outputs[split] = (logits, labels)
        self.uncalibrated[split], self.plain_raw[split] = evaluated[:, 1], evaluated[:, 2]
        thresholds = [self.thresholds.get(name, 0.5) for name in self.class_names]
        found = self.task.metrics(logits, labels, self.class_names, per_class, thresholds=thresholds, mask=self.metric_masks.get(split))
        for key, value in found.items():
            if key not in skip:  # identical on every rank: no further reduction
                self.log(f"{split}/{key}", value, sync_dist=False, prog_bar=key in ("acc", "map"), logger=logger)
        return found

    # -- optimisation ------------------------------------------------------------------------------------
    def configure_optimizers(self) -> Any:
        """Trainable parameters (gradual: the backbone's too, from the start), grouped and scheduled by models.optimization."""
        return optimizers_and_schedule(self.head, self.backbone.body, dict(self.hparams), self.mode != "frozen", self.trainer)


def load_checkpoint(path: str | Path) -> tuple[TransferClassifier, dict[str, Any]]:
    """Rebuild a trained classifier without downloading anything: the weights come from the checkpoint, or from
    a model package folder (transferlab-export; models.package), which is accepted wherever a checkpoint is."""
    if package.is_package(path):
        config = package.read_package(path)
        hparams = package.hyper_parameters(config, Path(path))
        hparams["backbone"] = {**hparams["backbone"], "weights": "none"}
        model = TransferClassifier(**hparams)
        package.load_weights(model, path)
        model.calibration, model.thresholds = dict(config.get("calibration") or {}), dict(config.get("thresholds") or {})
        model.split_table = package.read_split_table(path)
        return model.eval(), hparams
    ckpt = read_checkpoint(path)
    try:
        hparams = dict(ckpt["hyper_parameters"])
        hparams["class_names"], hparams["backbone"]["name"]  # noqa: B018 - what every transferlab checkpoint holds
    except (KeyError, TypeError) as exc:
        raise DataError(f"ckpt_path: {path} is not a transferlab checkpoint (no {exc} in its hyper_parameters)") from None
    model = lora.rebuild(TransferClassifier, hparams, ckpt)  # weights=none, or a LoRA checkpoint's recorded base
    state = dict(ckpt["state_dict"])
    state.setdefault("temperature", torch.ones(()))  # checkpoints from before calibration existed
    model.load_state_dict(state, strict=True)
    model.split_table = ckpt.get("transferlab_splits")
    model.calibration, model.thresholds = dict(ckpt.get("transferlab_calibration") or {}), dict(ckpt.get("transferlab_thresholds") or {})
    return model.eval(), hparams


def as_classifier(module: object) -> TransferClassifier:
    """The LightningModule a callback is given, as what every transferlab run trains (for the type checker too)."""
    if not isinstance(module, TransferClassifier):
        raise TypeError(f"transferlab's callbacks work on a TransferClassifier, got {type(module).__name__}")
    return module
