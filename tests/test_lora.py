"""finetune=lora (models.lora): real training through the in-process CLI on a ViT (random base, stored whole) and on
Lite0 (bundled base, adapter-only checkpoints); only adapters and head move, BatchNorm statistics included; the merged
export equals the adapted model; the checkpoint is small and every command loads it; bad target names say what to do."""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any, ClassVar

import lightning.pytorch as pl
import pytest
import torch

from conftest import FAST, run
from transferlab.core.errors import ConfigError, DataError
from transferlab.models import lora
from transferlab.models.backbones import create_backbone
from transferlab.models.classifier import load_checkpoint

pytestmark = pytest.mark.shared

VIT = [
    "backbone=custom",
    "backbone.name=vit_tiny_patch16_224",
    "backbone.weights=none",
    "backbone.source=timm",
    "backbone.model_args={img_size:64}",
]
LORA = {"r": 8, "alpha": 16, "dropout": 0.05, "target_modules": "auto"}
QUICK = ["+trainer.limit_train_batches=1", "+trainer.limit_val_batches=1", "interpret.enabled=false"]


class Snapshot(pl.Callback):
    """The module's state when fit starts and when training ends (clones): what moved, what did not."""

    states: ClassVar[dict[str, dict[str, torch.Tensor]]] = {}

    def on_fit_start(self, trainer: Any, pl_module: Any) -> None:
        Snapshot.states["start"] = {k: v.detach().clone() for k, v in pl_module.state_dict().items()}

    def on_train_end(self, trainer: Any, pl_module: Any) -> None:
        Snapshot.states["end"] = {k: v.detach().clone() for k, v in pl_module.state_dict().items()}


SNAPSHOT = ["+callbacks.snapshot._target_=test_lora.Snapshot"]


def moved(start: dict[str, torch.Tensor], end: dict[str, torch.Tensor]) -> set[str]:
    """The model's tensors that changed (not the metrics' states, such as val_acc_best)."""
    return {k for k, v in start.items() if k.startswith(("backbone.", "head.")) and not torch.equal(v, end[k])}


def adapter_or_head(key: str) -> bool:
    return ".lora_" in key or key.startswith("head.")


def train(folder: Path, out: Path, *overrides: str) -> None:
    run("train", "data=image_folder", f"data.root={folder}", "finetune=lora", f"hydra.run.dir={out}", *FAST, *overrides)


def logits_of(model: Any, seed: int = 0) -> torch.Tensor:
    size = model.backbone.preprocessing.input_size
    with torch.inference_mode():
        return model.float().eval()(torch.randn(4, 3, size, size, generator=torch.Generator().manual_seed(seed)))


@pytest.fixture(scope="module")
def lite0_run(tiny_folder, tmp_path_factory) -> Path:
    """Lite0 (bundled) with LoRA, AdamW and the recipe's per-step warm-up + cosine: one epoch, then resumed to two."""
    out = tmp_path_factory.mktemp("lite0_lora")
    common = ["optimizer=adamw", "scheduler=warmup_cosine", *SNAPSHOT]
    train(tiny_folder, out, "trainer.max_epochs=1", *common)
    train(tiny_folder, out, "trainer.max_epochs=2", "ckpt_path=last", *common)  # resuming fills the base back in too
    return out


def test_lite0_lora_moves_only_adapters_and_head_and_keeps_batchnorm_statistics(lite0_run):
    start, end = Snapshot.states["start"], Snapshot.states["end"]  # of the resumed (second) fit
    changed = moved(start, end)
    assert changed and all(adapter_or_head(k) for k in changed), sorted(k for k in changed if not adapter_or_head(k))[:5]
    assert any(".lora_B." in k for k in changed) and "head.1.weight" in changed
    assert any("running_mean" in k for k in start) and any("num_batches_tracked" in k for k in start)  # buffers compared too
    bundled = create_backbone("tf_efficientnet_lite0", weights="bundled").state_dict()
    base = {k.removeprefix("backbone.").replace(".base_layer.", "."): v for k, v in end.items() if lora.is_base(k)}
    assert base.keys() == bundled.keys() and all(torch.equal(base[k], bundled[k]) for k in bundled)  # bit-identical to the shipped weights
    adapted = {k.split(".lora_")[0] for k in end if ".lora_A." in k}
    assert adapted and all(k.split(".")[-1] in ("conv_pw", "conv_pwl", "conv_head") for k in adapted)  # the 1x1 convolutions only


def test_lite0_lora_checkpoint_holds_adapters_head_and_the_base_record_under_a_tenth(lite0_run, tiny_folder, tmp_path):
    ckpt = lite0_run / "checkpoints" / "best.ckpt"
    saved = torch.load(ckpt, map_location="cpu", weights_only=True)
    record = saved[lora.CHECKPOINT_KEY]
    assert record["stored"] == "adapter_and_head" and (record["name"], record["weights"]) == ("tf_efficientnet_lite0", "bundled")
    assert len(record["sha256"]) == 64 and not any(lora.is_base(k) for k in saved["state_dict"])
    assert any(".lora_A." in k for k in saved["state_dict"]) and "head.1.weight" in saved["state_dict"]
    run("train", "data=image_folder", f"data.root={tiny_folder}", "finetune=full", "trainer.max_epochs=1", f"hydra.run.dir={tmp_path}", *FAST, *QUICK)
    full = (tmp_path / "checkpoints" / "best.ckpt").stat().st_size
    assert ckpt.stat().st_size < 0.10 * full, (ckpt.stat().st_size, full)

    tampered = tmp_path / "tampered.ckpt"
    torch.save({**saved, lora.CHECKPOINT_KEY: {**record, "sha256": "0" * 64}}, tampered)
    with pytest.raises(DataError, match=r"^ckpt_path: this LoRA checkpoint was trained on tf_efficientnet_lite0 .*weights changed"):
        load_checkpoint(tampered)


def test_eval_predict_and_export_load_a_lite0_lora_checkpoint(lite0_run, tiny_folder, tmp_path):
    ckpt = lite0_run / "checkpoints" / "best.ckpt"
    found = run("eval", f"ckpt_path={ckpt}", "logger=none", f"hydra.run.dir={tmp_path / 'eval'}")
    trained = json.loads((lite0_run / "metrics.json").read_text())
    assert found["test/acc"] == pytest.approx(trained["test/acc"])  # the same model on the same stored test split
    out = tmp_path / "predictions.csv"
    run("predict", f"ckpt_path={ckpt}", f"input={tiny_folder}", f"output={out}", f"hydra.run.dir={tmp_path / 'predict'}")
    assert len(list(csv.DictReader(out.open()))) == 16

    package = tmp_path / "package"
    run("export", f"ckpt_path={ckpt}", f"output={package}", f"hydra.run.dir={tmp_path / 'export'}")
    config = json.loads((package / "config.json").read_text())
    assert config["finetune_mode"] == "lora" and config["lora"]["merged_layers"] == 32 and config["lora"]["max_abs_diff"] <= 1e-4
    assert config["hyper_parameters"]["finetune"]["lora"]["merged"] is True
    assert all(f["max_abs_diff"] <= 1e-4 for f in config["formats"].values())
    unmerged, _ = load_checkpoint(ckpt)
    merged, _ = load_checkpoint(package)
    assert lora.lora_layers(unmerged) and not lora.lora_layers(merged)  # the package is a plain model
    assert (logits_of(merged) - logits_of(unmerged)).abs().max() <= 1e-4


def test_vit_lora_with_ema_keeps_its_random_base_stored_whole_and_exports_merged(tiny_folder, tmp_path):
    run_dir = tmp_path / "run"
    train(tiny_folder, run_dir, *VIT, "trainer.max_epochs=2", "finetune.ema_decay=0.9", *QUICK, *SNAPSHOT)
    start, end = Snapshot.states["start"], Snapshot.states["end"]
    changed = moved(start, end)
    assert changed and all(adapter_or_head(k) for k in changed), sorted(k for k in changed if not adapter_or_head(k))[:5]
    adapted = {k.split(".lora_")[0] for k in end if ".lora_A." in k}
    assert len(adapted) == 48 and {".".join(name.split(".")[-2:]) for name in adapted} == {"attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2"}

    ckpt = run_dir / "checkpoints" / "best.ckpt"
    saved = torch.load(ckpt, map_location="cpu", weights_only=True)
    assert saved[lora.CHECKPOINT_KEY]["stored"] == "whole" and "weights=none" in saved[lora.CHECKPOINT_KEY]["why"]
    for part in ("state_dict", "current_model_state"):  # the EMA average and the raw weights: the same base, to the bit
        base = {k: v for k, v in saved[part].items() if lora.is_base(k)}
        assert base and all(torch.equal(v, start[k]) for k, v in base.items()), part

    package = tmp_path / "package"
    run("export", f"ckpt_path={ckpt}", f"output={package}", f"hydra.run.dir={tmp_path / 'export'}")
    config = json.loads((package / "config.json").read_text())
    assert config["lora"]["merged_layers"] == 48 and all(f["max_abs_diff"] <= 1e-4 for f in config["formats"].values())
    unmerged, _ = load_checkpoint(ckpt)
    merged, _ = load_checkpoint(package)
    assert not lora.lora_layers(merged) and (logits_of(merged) - logits_of(unmerged)).abs().max() <= 1e-4


def test_a_target_module_that_matches_nothing_fails_with_one_line(tiny_folder, tmp_path):
    with pytest.raises(ConfigError) as typo:
        train(tiny_folder, tmp_path / "typo", *VIT, "finetune.lora.target_modules=[qvk,fc1]")
    message = str(typo.value)
    assert "\n" not in message and message.startswith("finetune.lora.target_modules: 'qvk' matches no module of vit_tiny_patch16_224")
    assert "did you mean: qkv" in message
    depthwise = r"^finetune.lora.target_modules: 'conv_dw' matches only layers of tf_efficientnet_lite0 no adapter merges into \(blocks.0.0.conv_dw: a Conv2d with groups=32, and 15 more\)"
    with pytest.raises(ConfigError, match=depthwise):
        train(tiny_folder, tmp_path / "depthwise", "finetune.lora.target_modules=[conv_dw]")


def test_auto_targets_follow_the_family():
    import timm

    resnet = timm.create_model("resnet18", pretrained=False)
    targets = lora.auto_targets(resnet, 8)  # its 1x1 convolutions (the downsamples) hold a sliver: every dense conv
    assert "layer1.0.conv1" in targets and "layer2.0.downsample.0" in targets and "conv1" in targets
    lite0 = timm.create_model("tf_efficientnet_lite0", pretrained=False)
    chosen = lora.auto_targets(lite0, 8)
    assert "conv_head" in chosen and not any("conv_dw" in t or t == "conv_stem" for t in chosen)
    attention = torch.nn.Sequential(torch.nn.MultiheadAttention(16, 2), torch.nn.Linear(16, 16))
    assert lora.adaptable_layers(attention).keys() == {"1"}  # MultiheadAttention reads out_proj's weight directly
    assert lora.settings({"mode": "full"}) is None and lora.settings({"mode": "lora", "lora": {**LORA, "merged": True}}) is None
    with pytest.raises(
        ConfigError, match=r"^finetune.lora: finetune.mode=lora needs the adapter's r, alpha, dropout and target_modules; use finetune=lora$"
    ):
        lora.settings({"mode": "lora"})
