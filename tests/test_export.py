"""transferlab-export and the model package: every format equals the checkpoint, and the package is a checkpoint.

The consumer's side is coded here from config.json alone (the stable interface: resize the short side to
resize_size, centre-crop input_size, [0, 1], mean / std, float32 NCHW in, logits out), so a change of our own
preprocessing that the package does not describe fails these tests.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torchvision.transforms.v2 import functional as TF

from conftest import PETS, cli_env, pet_photos, read_splits, run, run_cli
from transferlab.core.errors import DataError
from transferlab.data.images import decode_rgb
from transferlab.deploy import export as exporter
from transferlab.models import package
from transferlab.models.classifier import load_checkpoint

pytestmark = pytest.mark.shared


def consumer_inputs(config: dict, files: list[Path]) -> torch.Tensor:
    """What the stable interface tells an outside consumer to do, step by step."""
    mode = TF.InterpolationMode[config["interpolation"].upper()]
    batch = []
    for file in files:
        image = decode_rgb(file)  # RGB, EXIF applied
        image = TF.resize(image, config["resize_size"], interpolation=mode, antialias=True)
        image = TF.center_crop(image, config["input_size"])
        image = image.float() / 255
        batch.append(TF.normalize(image, config["mean"], config["std"]))
    return torch.stack(batch)


def test_every_format_equals_the_checkpoint_on_real_photos(species_run, species_package):
    import onnxruntime

    config = json.loads((species_package / "config.json").read_text())
    for key in ("class_names", "input_size", "resize_size", "interpolation", "mean", "std", "temperature", "logits_are_calibrated"):
        assert key in config, key
    assert config["class_names"] == ["cat", "dog"] and config["resize_size"] == 256 and config["input_size"] == 224
    assert config["logits_are_calibrated"] is True and config["calibration"]["held_out_images"] > 0  # chosen on the val split
    assert config["temperature"] != 1.0 or config["calibration"]["rule"] == "capped_at_laplace_accuracy"
    assert config["splits"]["test"] == list(read_splits(species_run).values()).count("test") and "stored test images" in config["metrics_images"]
    assert config["metrics"]["test/acc_ci95"][0] <= config["metrics"]["test/acc"]  # the run's figures, with intervals
    assert config["formats"]["onnx"]["opset"] == 18 and all(f["max_abs_diff"] <= 1e-4 for f in config["formats"].values())
    names = ["README.md", "config.json", "model.onnx", "model.pt", "model.safetensors", "splits.csv"]
    assert sorted(p.name for p in species_package.iterdir()) == names
    card = (species_package / "README.md").read_text()
    assert "test/acc" in card and "onnxruntime" in card and "95 %" in card

    files = pet_photos(True, 4) + pet_photos(False, 5)  # 9: not a batch size the export checked
    inputs = consumer_inputs(config, files)
    model, _ = load_checkpoint(species_run / "checkpoints" / "best.ckpt")
    with torch.inference_mode():
        expected = model.calibrated_logits(inputs)  # the package's output: logits / temperature
    session = onnxruntime.InferenceSession(str(species_package / "model.onnx"), providers=["CPUExecutionProvider"])
    onnx_out = session.run(None, {"images": inputs.numpy()})[0]
    script_out = torch.jit.load(str(species_package / "model.pt"))(inputs)
    from_package, _ = load_checkpoint(species_package)
    with torch.inference_mode():
        package_out = from_package.calibrated_logits(inputs)
    for got in (torch.from_numpy(onnx_out), script_out.detach(), package_out):
        assert float((got - expected).abs().max()) <= 1e-4
    labels = [config["class_names"][i] for i in np.argmax(onnx_out, axis=1)]
    assert labels == ["cat"] * 4 + ["dog"] * 5


def test_the_package_is_a_checkpoint_for_eval_and_explain(species_run, species_package, tmp_path):
    from_ckpt = run("eval", f"ckpt_path={species_run / 'checkpoints' / 'best.ckpt'}", "interpret.enabled=false", f"hydra.run.dir={tmp_path / 'a'}")
    from_package = run("eval", f"ckpt_path={species_package}", "interpret.enabled=false", f"hydra.run.dir={tmp_path / 'b'}")
    assert from_package["test/acc"] == from_ckpt["test/acc"] and from_package["test/nll"] == pytest.approx(from_ckpt["test/nll"], abs=1e-5)
    photo = pet_photos(True, 1)[0]
    explained = run("explain", f"ckpt_path={species_package}", f"input={photo}", f"hydra.run.dir={tmp_path / 'explain'}")
    assert explained["images"] == 1 and (tmp_path / "explain" / f"{photo.stem}_cam.npy").is_file()


def test_onnx_runtime_needs_no_lightning_and_agrees_with_torch(species_package, tmp_path):
    """runtime=onnx imports neither Lightning nor the classifier; its labels equal the torch runtime's."""
    code = (
        "import sys, torch; from transferlab.deploy.runtime import load_runtime;"
        f"p = load_runtime({str(species_package)!r}, 'onnx', 'auto', 'auto', 'auto', 'none', None);"
        "print(p.probabilities(torch.zeros(2, 3, 224, 224)).shape[1]);"
        "print(sorted(m for m in sys.modules if m.split('.')[0] == 'lightning' or m == 'transferlab.models.classifier'))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=cli_env(), check=True).stdout.split("\n")
    assert out[0] == "2" and out[1] == "[]"
    rows = {}
    for runtime in ("onnx", "torch"):
        out_csv = tmp_path / f"{runtime}.csv"
        run(
            "predict",
            f"ckpt_path={species_package}",
            f"input={PETS}",
            f"output={out_csv}",
            f"runtime={runtime}",
            "precision=32-true",
            f"hydra.run.dir={tmp_path / runtime}",
        )
        rows[runtime] = [line.split(",")[:2] for line in out_csv.read_text().splitlines()[1:]]
    assert len(rows["onnx"]) == 370 and rows["onnx"] == rows["torch"]


def test_format_choice_replaces_the_earlier_package(species_run, tmp_path):
    ckpt = species_run / "checkpoints" / "best.ckpt"
    out = tmp_path / "pkg"
    out.mkdir()
    (out / "model.onnx").write_bytes(b"stale")  # from an earlier export with format=onnx
    config = run("export", f"ckpt_path={ckpt}", f"output={out}", "format=torchscript", f"hydra.run.dir={tmp_path / 'run'}")
    assert set(config["formats"]) == {"safetensors", "torchscript"}
    assert sorted(p.name for p in out.iterdir()) == ["README.md", "config.json", "model.pt", "model.safetensors", "splits.csv"]
    with pytest.raises(DataError, match="has no model.onnx; export with format=onnx"):
        package.onnx_file(package.read_package(out), out)


def test_bad_exports_and_packages_say_what_to_do(species_run, tmp_path):
    not_ckpt = tmp_path / "notes.ckpt"
    not_ckpt.write_text("hello")
    proc = run_cli("export", f"ckpt_path={not_ckpt}", f"output={tmp_path / 'x'}", f"hydra.run.dir={tmp_path / 'r1'}", check=False)
    assert proc.returncode == 2 and "is not a readable checkpoint" in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
    proc = run_cli(
        "predict",
        f"ckpt_path={species_run / 'checkpoints' / 'best.ckpt'}",
        f"input={PETS}",
        "runtime=onnx",
        f"hydra.run.dir={tmp_path / 'r2'}",
        check=False,
    )
    assert proc.returncode == 2 and "runtime=onnx needs a model package folder" in proc.stderr and "transferlab-export ckpt_path=" in proc.stderr
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text(json.dumps({"class_names": ["a"]}))
    with pytest.raises(DataError, match="is not a transferlab model package .*lacks input_size"):
        load_checkpoint(broken)
    with pytest.raises(exporter.ExportMismatch, match="differs from the checkpoint's by 2.00e-03"):
        exporter._checked("ONNX", 2e-3)
    with pytest.raises(exporter.ExportMismatch):
        exporter._checked("ONNX", float("nan"))
