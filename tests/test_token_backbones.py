"""Token backbones (vision transformers with register or distillation tokens, Swin, the foundation-model presets)
through every command and picture.

No hub weights here: tiny timm ViTs are *trained* on a task whose right answer is known (tests/evidence.py: the
colour of one square decides the class), once per module, so that the assertions mean something: a correct class
activation map puts its mass where the square is, and a model that learned nothing, or maps that ignore the
prefix tokens' offset, would not.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import run, start_server, stop_server
from evidence import quadrant_mass, write_probes, write_training_folder
from transferlab.core.errors import ConfigError
from transferlab.models.backbones import create_backbone

# name, timm.create_model arguments, prefix tokens: DINOv2-style (class + 4 registers), DeiT (class + distillation).
# One block: trained from scratch on a few hundred images, deeper ViTs copy the evidence into every token (after two
# blocks every patch token says "red"), and no attribution at the last block can point at the square any more.
MODELS = {
    "registers": ("vit_tiny_patch16_224", "{img_size:64,patch_size:8,depth:1,reg_tokens:4,no_embed_class:true}", 5),
    "distilled": ("deit_tiny_distilled_patch16_224", "{img_size:64,patch_size:8,depth:1}", 2),
}
TOKEN_ARGS = ["backbone=custom", "backbone.source=timm", "backbone.weights=none", "backbone.input_size=64", "backbone.crop_pct=1.0"]


@pytest.fixture(scope="module")
def evidence(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("evidence")
    write_training_folder(root / "train")
    write_probes(root / "probes")
    return root


@pytest.fixture(scope="module")
def runs() -> dict[str, Path]:
    """The trained models of this module by kind, each trained once, when a test first asks for it."""
    return {}


def trained_model(kind: str, runs: dict[str, Path], evidence: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny ViT trained from scratch on the evidence task, pooled by its class token, with feature maps."""
    if kind in runs:
        return runs[kind]
    name, model_args, _ = MODELS[kind]
    out = tmp_path_factory.mktemp(f"trained_{kind}")
    run(
        "train",
        "data=image_folder",
        f"data.root={evidence / 'train'}",
        *TOKEN_ARGS,
        f"backbone.name={name}",
        f"backbone.model_args={model_args}",
        "backbone.pool=cls",  # DeiT's own head averages the class and distillation tokens; both models: the class token
        "finetune=full",
        "finetune.backbone_lr_factor=1.0",
        "optimizer=adamw",
        "optimizer.lr=1e-3",
        "trainer.max_epochs=10",
        "data.augment.hflip=false",
        "data.augment.scale_min=1.0",
        "data.num_workers=0",
        "data.batch_size=16",
        "callbacks=feature_maps",
        "callbacks.feature_maps.num_images=2",
        "callbacks.feature_maps.at_start=false",
        "callbacks.progress_bar=null",
        "trainer.enable_progress_bar=false",
        "logger=csv",
        f"hydra.run.dir={out}",
    )
    runs[kind] = out
    return out


@pytest.fixture(scope="module", params=list(MODELS))
def trained(request, runs, evidence, tmp_path_factory) -> tuple[str, Path]:
    return request.param, trained_model(request.param, runs, evidence, tmp_path_factory)


@pytest.fixture(scope="module")
def registers(runs, evidence, tmp_path_factory) -> Path:
    """The register-token model (five prefix tokens): the one every command runs on."""
    return trained_model("registers", runs, evidence, tmp_path_factory)


def test_the_trained_model_learned_the_task(trained):
    _, out = trained
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["test/acc"] >= 0.9, metrics


def explain_probes(ckpt: Path, probes: Path, method: str, out: Path) -> dict[str, np.ndarray]:
    """`transferlab-explain` over the probes: {stem: map}; every map has the input crop's shape."""
    summary = run("explain", f"ckpt_path={ckpt}", f"input={probes}", f"method={method}", f"hydra.run.dir={out}")
    rows = {Path(row["path"]).stem: row for row in csv.DictReader(open(out / "explain.csv"))}
    maps = {}
    for stem, row in rows.items():
        cam = np.load(out / f"{stem}_cam.npy")
        assert cam.shape == (64, 64) and np.isfinite(cam).all() and row["target"] == stem.split("_")[0]
        maps[stem] = cam
    assert len(maps) == 10 and summary["layer"] == "blocks.0.norm1"  # the last block's patch tokens, as they enter its attention
    return maps


def test_default_maps_put_their_mass_on_the_evidence(trained, evidence, tmp_path):
    """method=auto (HiResCAM on a token model), computed on the patch grid with the prefix tokens dropped: for a
    square in a quadrant, >= 0.5 of the map in that quadrant on average over the probes of both classes, where a
    centred blob puts <= 0.3 (so the bound tells a map that follows the evidence from one that does not). Per class
    it varies with the training run (threads, order): docs/backbones.md has the measured ranges; a centred square,
    aligned to the patch grid, is not asserted on."""
    rows, cols = np.mgrid[0:64, 0:64]
    blob = np.exp(-((rows - 31.5) ** 2 + (cols - 31.5) ** 2) / (2 * 12.0**2))
    assert max(quadrant_mass(blob).values()) <= 0.3
    _, out = trained
    maps = explain_probes(out / "checkpoints" / "best.ckpt", evidence / "probes", "auto", tmp_path)
    assert json.loads((tmp_path / "explain.json").read_text())["method"] == "hirescam"
    on_evidence = [quadrant_mass(cam)[stem.split("_", 1)[1]] for stem, cam in maps.items() if not stem.endswith("_centre")]
    assert len(on_evidence) == 8 and np.mean(on_evidence) >= 0.5, on_evidence  # a map on the wrong grid: about 0.25


@pytest.mark.parametrize("method", ["gradcam", "gradcam++", "scorecam"])
def test_the_other_methods_run_on_the_patch_grid(trained, evidence, method, tmp_path):
    """Grad-CAM, Grad-CAM++ and Score-CAM on the same grid, maps of the crop's shape. Their quality on token models
    is not asserted: Grad-CAM's channel weights (gradients averaged over positions) assume non-negative activations,
    and on signed, layer-normed tokens a class's map can come out inverted (measured: docs/backbones.md), which is
    why `auto` picks HiResCAM for token models."""
    _, out = trained
    explain_probes(out / "checkpoints" / "best.ckpt", evidence / "probes", method, tmp_path)


def test_feature_maps_are_per_block_patch_maps_and_attention(trained):
    """Evenly spaced blocks' patch tokens as maps and principal components, the class token's attention; never an
    attention internal ([B, heads, tokens, dim])."""
    _, out = trained
    written = sorted(p.name for p in (out / "feature_maps" / "end").glob("*.png"))
    assert {"00_blocks.0.png", "00_blocks.0_pca.png", "01_blocks.0.png", "00_attention.png", "00_lesson_view.png"} <= set(written), written
    assert not [name for name in written if "attn" in name]


def test_feature_map_layers_of_a_deep_vit_and_a_swin_are_blocks_and_stages():
    from transferlab.insight.tokens import check_token_layers, class_attention, token_blocks

    vit = create_backbone("vit_tiny_patch16_224", "none", "timm", 64, model_args={"img_size": 64}).body.eval()
    assert token_blocks(vit, 64, 4) == ["blocks.0", "blocks.4", "blocks.7", "blocks.11"]
    attention = class_attention(vit, torch.randn(2, 3, 64, 64))
    rolled = class_attention(vit, torch.randn(2, 3, 64, 64), rollout=True)
    assert attention is not None and rolled is not None and attention.shape == rolled.shape == (2, 4, 4)
    assert torch.all(attention > 0) and torch.all(attention.sum(dim=(1, 2)) <= 1 + 1e-5)  # softmax weights, patches only
    swin = create_backbone("swin_tiny_patch4_window7_224", "none", "timm").body.eval()
    assert token_blocks(swin, 224, 4) == ["layers.0", "layers.1", "layers.2", "layers.3"]
    assert class_attention(swin, torch.randn(1, 3, 224, 224)) is None  # no class token
    with pytest.raises(ConfigError, match=r"'blocks.11.attn.k_norm' does not give one token per patch.*use blocks or stages such as .*blocks.11"):
        check_token_layers(vit, 64, ["blocks.11.attn.k_norm"], "callbacks.feature_maps.layers")


@pytest.mark.parametrize("command", ["eval", "predict", "export_and_serve", "visualize", "attack", "audit"])
def test_every_command_runs_with_a_token_backbone(registers, evidence, command, tmp_path):
    out = registers
    ckpt = out / "checkpoints" / "best.ckpt"
    probes = evidence / "probes"
    if command == "eval":
        found = run("eval", f"ckpt_path={ckpt}", "interpret.top_losses=4", f"hydra.run.dir={tmp_path}")  # with the interpretation
        assert found["test/acc"] >= 0.9
        assert (tmp_path / "top_losses.png").is_file()
    elif command == "predict":
        run("predict", f"ckpt_path={ckpt}", f"input={probes}", f"output={tmp_path / 'p.csv'}", f"hydra.run.dir={tmp_path}")
        rows = list(csv.DictReader(open(tmp_path / "p.csv")))
        assert sum(Path(r["path"]).stem.startswith(r["label"]) for r in rows) >= 9
    elif command == "export_and_serve":
        export_predict_and_serve_agree(ckpt, probes, tmp_path)
    elif command == "visualize":
        run("visualize", f"ckpt_path={ckpt}", "target=red", "steps=16", "views=1", f"hydra.run.dir={tmp_path}")
        assert json.loads((tmp_path / "result.json").read_text())["target"] == "red"
    elif command == "attack":
        run("attack", f"ckpt_path={ckpt}", f"input={probes / 'blue_centre.png'}", "target=red", "eps=8/255", "steps=10", f"hydra.run.dir={tmp_path}")
        assert json.loads((tmp_path / "result.json").read_text())["source_label"] == "blue"
    else:  # the audit builds the backbone from its config: the same architecture, untrained
        name, model_args, _ = MODELS["registers"]
        run(
            "audit",
            "data=image_folder",
            f"data.root={evidence / 'train'}",
            *TOKEN_ARGS,
            f"backbone.name={name}",
            f"backbone.model_args={model_args}",
            "backbone.pool=cls_mean",
            f"paths.cache_dir={tmp_path / 'cache'}",
            f"hydra.run.dir={tmp_path}",
        )
        found = json.loads((tmp_path / "audit.json").read_text())
        assert (found["images"], found["classes"]) == (144, 3)  # 48 per class
        assert np.load(tmp_path / "features.npy", mmap_mode="r").shape == (144, 2 * 192)  # cls_mean: class + mean patch token


def export_predict_and_serve_agree(ckpt: Path, probes: Path, tmp_path: Path) -> None:
    """The package (ONNX and TorchScript checked to 1e-4 by the export itself) predicts what the checkpoint
    predicts, through the ONNX runtime and through the server."""
    import httpx

    package = tmp_path / "package"
    run("export", f"ckpt_path={ckpt}", f"output={package}", f"hydra.run.dir={tmp_path / 'export'}")
    probabilities = {}
    for runtime, source in (("torch", ckpt), ("onnx", package)):
        output = tmp_path / f"{runtime}.csv"
        run(
            "predict",
            f"ckpt_path={source}",
            f"input={probes}",
            f"output={output}",
            f"runtime={runtime}",
            "precision=32-true",  # bf16 autocast (auto, where the CPU has it) is another model to 1e-3
            f"hydra.run.dir={tmp_path / runtime}",
        )
        probabilities[runtime] = {Path(r["path"]).name: (r["label"], float(r["score"])) for r in csv.DictReader(open(output))}
    assert probabilities["torch"].keys() == probabilities["onnx"].keys()
    for name, (label, prob) in probabilities["torch"].items():
        assert probabilities["onnx"][name][0] == label and abs(probabilities["onnx"][name][1] - prob) < 1e-4
    (tmp_path / "serve").mkdir()
    proc, url = start_server(package, tmp_path / "serve" / "serve.log", "precision=32-true")
    try:
        for image in sorted(probes.glob("*.png"))[:3]:
            answer = httpx.post(f"{url}/predict", files={"file": (image.name, image.read_bytes(), "image/png")}, timeout=60).json()
            label, prob = probabilities["torch"][image.name]
            assert answer["predictions"][0]["label"] == label and abs(answer["predictions"][0]["prob"] - prob) < 1e-4
    finally:
        stop_server(proc)


def test_token_maps_drop_the_prefix_tokens_and_follow_a_non_square_grid():
    """Token i of the patches lands at row i // cols, column i % cols, whatever the prefix and the input's shape."""
    from transferlab.insight.tokens import on_grid
    from transferlab.models.pooling import Layout

    layout = Layout("tokens", prefix=5, patch=(8, 8), class_token=True)
    rows, cols = 4, 6  # a 32 x 48 input
    tokens = torch.cat([torch.full((1, 5, 2), -1.0), torch.arange(rows * cols, dtype=torch.float32).view(1, -1, 1).repeat(1, 1, 2)], dim=1)
    grid = on_grid(tokens, layout, 32, 48)
    assert grid.shape == (1, 2, rows, cols) and grid.min() >= 0
    assert grid[0, 0, 2, 3] == 2 * cols + 3


def test_pool_widths_and_the_cache_fingerprint_follow_the_pooling():
    from transferlab.data.features import Inputs, describe, fingerprint

    widths, prints = {}, set()
    for pool in ("cls", "mean", "cls_mean", "avg", "auto"):
        backbone = create_backbone("vit_tiny_patch16_224", "none", "timm", 64, pool=pool, model_args={"depth": 2})
        assert backbone(torch.zeros(2, 3, 64, 64)).shape == (2, backbone.num_features)
        widths[pool] = backbone.num_features
        prints.add(fingerprint(**describe(backbone, Inputs("eval", 64, 0, 0), "32-true", "digest", versions={})))
    assert widths == {"cls": 192, "mean": 192, "cls_mean": 384, "avg": 192, "auto": 192}
    assert len(prints) == 4  # avg is mean on a token model: one store
    tokens = create_backbone("vit_tiny_patch16_224", "none", "timm", 64, pool="mean", model_args={"depth": 2, "reg_tokens": 4})
    features = tokens.body.forward_features(torch.randn(1, 3, 64, 64))
    assert torch.allclose(tokens.pool(features), features[:, 5:].mean(dim=1))  # class and register tokens excluded
    with pytest.raises(ConfigError, match="backbone.pool=cls: tf_efficientnet_lite0 is not a token model"):
        create_backbone("tf_efficientnet_lite0", "bundled", "timm", pool="cls")


@pytest.mark.parametrize(
    ("preset", "width", "mean"),
    [
        ("dinov2_vits14", 768, (0.485, 0.456, 0.406)),  # auto = cls_mean (the card's linear probe): 2 x 384
        ("clip_vitb16", 768, (0.48145466, 0.4578275, 0.40821073)),
        ("siglip_vitb16", 768, (0.5, 0.5, 0.5)),
        ("convnextv2_tiny", 768, (0.485, 0.456, 0.406)),
    ],
)
def test_foundation_presets_build_offline_with_their_own_preprocessing(preset, width, mean, tmp_path):
    """backbone=<preset> with weights=none (no hub here): the architecture, its pooling's width and the weight's own
    normalisation from its pretrained_cfg."""
    from omegaconf import OmegaConf

    from test_configs import compose_train

    cfg = OmegaConf.to_container(compose_train(tmp_path, f"backbone={preset}").backbone, resolve=True)
    assert cfg["weights"] == "pretrained"
    backbone = create_backbone(**{**cfg, "weights": "none"})
    size = backbone.preprocessing.input_size
    assert backbone.num_features == width and backbone.preprocessing.mean == pytest.approx(mean)
    assert backbone(torch.zeros(1, 3, size, size)).shape == (1, width)
