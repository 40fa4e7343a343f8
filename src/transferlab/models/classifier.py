"""The LightningModule: a pretrained `backbone` and a linear `head`, trained frozen, fully or gradually.

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
import torch.nn.functional as F
from hydra.utils import instantiate
from torch import nn
from torchmetrics import MaxMetric, MeanMetric
from torchmetrics.classification import MulticlassAccuracy

from transferlab.core.errors import DataError, TrainingDiverged
from transferlab.core.safe_load import read_checkpoint
from transferlab.data.preprocessing import Preprocessing
from transferlab.models import lora, package
from transferlab.models.backbones import Backbone, create_backbone
from transferlab.models.evaluation import classification_metrics, gather_in_order
from transferlab.models.optimization import parameter_groups
from transferlab.models.regularization import batch_mixer
from transferlab.models.tta import combine_views, views


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
    ) -> None:
        """`backbone`: {name, weights, source, input_size}; `optimizer`/`scheduler`: Hydra `_partial_` nodes;
        `run`: the data config, seed and precision of the run, so eval can rebuild the same test split;
        `loss_weights`: one per class for the training loss (data.class_weights=balanced), or None."""
        super().__init__()
        self.save_hyperparameters(ignore=["prebuilt_backbone"])
        self.backbone: Backbone = prebuilt_backbone if prebuilt_backbone is not None else create_backbone(**backbone)
        if preprocessing is not None:  # the stored one wins (input_size overrides, older runs)
            self.backbone.preprocessing = Preprocessing.from_dict(preprocessing)
        self.hparams["preprocessing"] = self.backbone.preprocessing.to_dict()
        self.class_names = list(class_names)
        num_classes = len(self.class_names)
        dropout = float(finetune["head_dropout"])
        self.head = nn.Sequential(nn.Dropout(dropout), nn.Linear(self.backbone.num_features, num_classes))
        self.mode = finetune["mode"]
        self.label_smoothing = float(finetune.get("label_smoothing") or 0.0)  # training loss only
        self.mixer = batch_mixer(finetune.get("mixup"), finetune.get("cutmix"), num_classes)  # training images only
        self.backbone_frozen = False
        self.channels_last = False
        self.tta = "none"  # test-time augmentation of the test step (models.tta); a runtime choice, not a hyper-parameter
        if self.mode in ("frozen", "gradual"):
            self.freeze_backbone()
        lora.attach(self.backbone, finetune)  # finetune=lora: adapters in the body, the rest of the backbone frozen

        self.register_buffer("temperature", torch.ones(()))  # 1 = uncalibrated; set by training.calibration
        self.calibration: dict[str, Any] = {}  # how the temperature was chosen (training.calibration), kept in checkpoints
        self.split_table: Optional[dict[str, Any]] = None  # the run's stored train / val / test files (data.stored_splits)
        weights = torch.tensor(list(loss_weights), dtype=torch.float32) if loss_weights is not None else None
        self.register_buffer("loss_weights", weights, persistent=False)  # rebuilt from the hyper-parameters

        # Training-step metrics without input checks: each check is a GPU->CPU sync that stalls every step.
        self.train_loss = MeanMetric(nan_strategy="disable")
        self.val_loss, self.test_loss = MeanMetric(), MeanMetric()
        self.train_acc = MulticlassAccuracy(num_classes, average="micro", validate_args=False)
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
        self.backbone.requires_grad_(True)
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
        with torch.set_grad_enabled(torch.is_grad_enabled() and not self.backbone_frozen):
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
        return torch.stack([combine_views(raw, float(self.temperature)), combine_views(raw, 1.0), raw[0]], dim=1)

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """The run's stored split and how it was calibrated travel with every checkpoint (plain containers)."""
        if self.split_table is not None:
            checkpoint["transferlab_splits"] = self.split_table
        if self.calibration:
            checkpoint["transferlab_calibration"] = dict(self.calibration)
        lora.shrink_checkpoint(self.hparams["finetune"], self.hparams["backbone"], checkpoint)  # adapters + head + base record

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        lora.restore_base(self, checkpoint)  # an adapter-only LoRA checkpoint gets the live (hash-checked) base back

    def imagenet_logits(self, images: torch.Tensor) -> torch.Tensor:
        """The backbone's own ImageNet classifier (visualisation and attacks use it)."""
        return self.backbone.imagenet_logits(images)

    # -- steps -------------------------------------------------------------------------------------------
    def training_step(self, batch: Any, batch_idx: int) -> Optional[torch.Tensor]:
        inputs, labels = batch
        targets = labels
        if self.mixer is not None and inputs.ndim == 4:  # mixup / cutmix: images only (not cached features)
            inputs, targets = self.mixer(inputs, labels)
        logits = self(inputs).float()
        loss = F.cross_entropy(logits, targets, weight=self.loss_weights, label_smoothing=self.label_smoothing)
        self.train_loss(loss)
        self.train_acc(logits, labels)
        self.log("train/loss", self.train_loss, on_step=True, on_epoch=True, prog_bar=True)
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
        loss = F.cross_entropy(logits, labels)
        self.val_loss(loss, weight=len(labels))
        self.val_acc(logits, labels)
        curve = self.trainer.state.fn == "fit"  # the selected checkpoint's validation after fit adds no curve point
        self.log("val/loss", self.val_loss, on_epoch=True, prog_bar=True, logger=curve)
        self.log("val/acc", self.val_acc, on_epoch=True, prog_bar=True, logger=curve)
        self._batches["val"].append((evaluated.detach().cpu(), labels.detach().cpu()))

    def on_validation_epoch_start(self) -> None:
        self._batches["val"] = []

    def on_validation_epoch_end(self) -> None:
        if self.trainer.sanity_checking:
            return
        self.val_acc_best(self.val_acc.compute())
        selected = self.trainer.state.fn == "validate"  # the selected checkpoint's validation (training.calibration)
        self.log("val/acc_best", self.val_acc_best.compute(), sync_dist=True, prog_bar=True, logger=not selected)
        self._log_metrics("val", per_class=selected, skip=("acc",), logger=not selected)

    def test_step(self, batch: Any, batch_idx: int) -> None:
        inputs, labels = batch
        evaluated = self.evaluate(inputs, self.tta)
        loss = F.cross_entropy(evaluated[:, 0], labels)
        self.test_loss(loss, weight=len(labels))
        self.log("test/loss", self.test_loss, on_epoch=True)
        self._batches["test"].append((evaluated.detach().cpu(), labels.detach().cpu()))

    def on_test_epoch_start(self) -> None:
        self._batches["test"] = []

    def on_test_epoch_end(self) -> None:
        found = self._log_metrics("test", per_class=True)
        for name in self.class_names:  # the per-class accuracy is the class's recall
            self.log(f"test/acc_class/{name}", found[f"recall/{name}"], sync_dist=False)
        logits, labels = self.outputs["test"]
        n = len(self.class_names)
        cells = labels * n + logits.argmax(dim=-1)
        self.test_confusion_matrix = torch.bincount(cells, minlength=n * n).reshape(n, n)

    def _log_metrics(self, split: str, per_class: bool, skip: tuple[str, ...] = (), logger: bool = True) -> dict[str, float]:
        """Gather the split's logits from every rank (in dataset order), keep them in `outputs`, log their metrics."""
        evaluated, labels = gather_in_order(self._batches[split], (3, len(self.class_names)))
        self._batches[split] = []
        logits = evaluated[:, 0]
        self.outputs[split] = (logits, labels)
        self.uncalibrated[split], self.plain_raw[split] = evaluated[:, 1], evaluated[:, 2]
        found = classification_metrics(logits, labels, self.class_names, per_class=per_class)
        for key, value in found.items():
            if key not in skip:  # identical on every rank: no further reduction
                self.log(f"{split}/{key}", value, sync_dist=False, prog_bar=key == "acc", logger=logger)
        return found

    # -- optimisation ------------------------------------------------------------------------------------
    def configure_optimizers(self) -> Any:
        """Only trainable parameters, grouped by models.optimization (backbone at lr x backbone_lr_factor, layer decay);
        a scheduler with `interval: step` is stepped per optimiser step and told the run's total steps."""
        groups = parameter_groups(self.head, self.backbone.body, dict(self.hparams), backbone_trains=self.mode in ("full", "lora"))
        optimizer = instantiate(dict(self.hparams["optimizer"]))(params=groups)
        sched_cfg = dict(self.hparams["scheduler"] or {})
        if not sched_cfg.get("_target_"):
            return optimizer
        interval = str(sched_cfg.get("interval", "epoch"))
        if interval == "step":
            steps, epochs = int(self.trainer.estimated_stepping_batches), int(self.trainer.max_epochs or 1)
            scheduler = instantiate(sched_cfg)(optimizer=optimizer, total_steps=steps, epochs=epochs)
        else:
            scheduler = instantiate(sched_cfg)(optimizer=optimizer)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": interval, "monitor": "val/loss"}}


def load_checkpoint(path: str | Path) -> tuple[TransferClassifier, dict[str, Any]]:
    """Rebuild a trained classifier without downloading anything: the weights come from the checkpoint, or from
    a model package folder (transferlab-export; models.package), which is accepted wherever a checkpoint is."""
    if package.is_package(path):
        config = package.read_package(path)
        hparams = package.hyper_parameters(config, Path(path))
        hparams["backbone"] = {**hparams["backbone"], "weights": "none"}
        model = TransferClassifier(**hparams)
        package.load_weights(model, path)
        model.calibration = dict(config.get("calibration") or {})
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
    model.calibration = dict(ckpt.get("transferlab_calibration") or {})
    return model.eval(), hparams


def as_classifier(module: object) -> TransferClassifier:
    """The LightningModule a callback is given, as what every transferlab run trains (for the type checker too)."""
    if not isinstance(module, TransferClassifier):
        raise TypeError(f"transferlab's callbacks work on a TransferClassifier, got {type(module).__name__}")
    return module
