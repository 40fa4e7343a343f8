"""transferlab-export quantize=int8: model.int8.onnx calibrated on the run's training images, checked against fp32 on
every other image of the run, refused (nothing written) below min_int8_agreement; predict / serve run it only when
asked by name (precision=int8). format as a list, and ExecuTorch where deploy.mobile exists."""

from __future__ import annotations

import csv
import importlib.util
import json
import shutil
from pathlib import Path

import pytest
import torch
from PIL import Image

from conftest import PETS, read_splits, run
from transferlab.core.errors import ConfigError, DataError, exit_code
from transferlab.deploy import export as exporter
from transferlab.deploy.int8_check import plan_int8
from transferlab.deploy.quantize import Int8Settings
from transferlab.deploy.runtime import load_runtime
from transferlab.models import package

pytestmark = pytest.mark.shared
MOBILE = importlib.util.find_spec("executorch") is not None  # the `mobile` extra: then the package carries .pte files too


@pytest.fixture(scope="module")
def int8_package(species_run, tmp_path_factory) -> Path:
    """The species run's best checkpoint as format=onnx quantize=int8 (the defaults: 64 calibration images, 0.98),
    and with the `mobile` extra format=[onnx,executorch]: one export for every test here (lowering to XNNPACK twice
    is most of its minute of CPU)."""
    root = tmp_path_factory.mktemp("int8")
    out = root / "package"
    run(
        "export",
        f"ckpt_path={species_run / 'checkpoints' / 'best.ckpt'}",
        f"output={out}",
        "format=[onnx,executorch]" if MOBILE else "format=onnx",
        "quantize=int8",
        f"hydra.run.dir={root / 'run'}",
    )
    return out


def package_copy(source: Path, folder: Path, root: Path, rows: list[list[str]] | None = None) -> Path:
    """A package that needs no ONNX (config.json, weights, splits.csv) whose images live under `root`; `rows`
    replaces its split table (path, split, size, sha256)."""
    folder.mkdir(parents=True)
    for name in (package.CONFIG, package.WEIGHTS, package.SPLITS):
        shutil.copy(source / name, folder / name)
    config = json.loads((folder / package.CONFIG).read_text())
    config["splits"]["root"] = str(root)
    (folder / package.CONFIG).write_text(json.dumps(config))
    if rows is not None:
        with open(folder / package.SPLITS, "w", newline="") as fh:
            csv.writer(fh).writerows([["path", "split", "size", "sha256"], *rows])
    return folder


def one_line_exit_2(exc: BaseException) -> str:
    message = str(exc)
    assert exit_code(exc) == 2 and "\n" not in message, message
    return message


def test_int8_onnx_is_small_agrees_with_fp32_and_is_compared_on_the_test_split(int8_package, species_run):
    config = json.loads((int8_package / "config.json").read_text())
    fp32, int8 = (int8_package / "model.onnx").stat().st_size, (int8_package / "model.int8.onnx").stat().st_size
    assert int8 <= 0.35 * fp32 and config["int8_size_ratio"] == pytest.approx(int8 / fp32)
    splits = read_splits(int8_package)
    assert splits == read_splits(species_run)
    calibration = (int8_package / "int8_calibration.txt").read_text().splitlines()
    assert len(calibration) == len(set(calibration)) == 64 and all(splits.get(path) == "train" for path in calibration)  # never val / test

    agreed = config["int8_agreement"]
    assert agreed["images"] == len(splits) - 64  # every image of the run that did not calibrate it
    assert agreed["value"] >= 0.98 and agreed["ci95"][0] <= agreed["value"] <= agreed["ci95"][1]
    tests = list(splits.values()).count("test")
    for key in ("int8_accuracy", "fp32_accuracy"):
        assert config[key]["images"] == tests and config[key]["ci95"][0] <= config[key]["value"] <= config[key]["ci95"][1]
    assert config["fp32_accuracy"]["value"] == pytest.approx(config["metrics"]["test/acc"], abs=0.02)  # the run's own test figure
    verdict = config["int8_verdict"]
    assert verdict["verdict"] in ("indistinguishable", "worse", "better") and verdict["images"] == tests
    assert verdict["ci95"][0] <= verdict["difference"] <= verdict["ci95"][1]
    assert verdict["difference"] == pytest.approx(config["int8_accuracy"]["value"] - config["fp32_accuracy"]["value"])
    assert config["int8_latency_ratio"] > 0 and config["int8_latency"]["batch"] == 1
    assert config["formats"]["onnx_int8"]["file"] == "model.int8.onnx" and config["formats"]["onnx"]["max_abs_diff"] <= 1e-4
    card = (int8_package / "README.md").read_text()
    assert "## int8" in card and "top-1 agreement with fp32" in card and "this machine's figure" in card and verdict["verdict"] in card


def test_predict_runs_int8_only_when_asked_and_agrees_with_fp32(int8_package, tmp_path):
    auto = load_runtime(str(int8_package), "onnx", "auto", "auto", "auto", "none", 1)
    int8 = load_runtime(str(int8_package), "onnx", "auto", "int8", "auto", "none", 1)
    assert (auto.settings["precision"], auto.settings["model"]) == ("32-true", "model.onnx")
    assert (int8.settings["precision"], int8.settings["model"]) == ("int8", "model.int8.onnx")
    photos = tmp_path / "photos"  # every third photo of the sample (124): the export checked all of them already
    photos.mkdir()
    for photo in sorted(PETS.glob("*.jpg"))[::3]:
        (photos / photo.name).symlink_to(photo)
    labels = {}
    for precision in ("auto", "int8"):
        out = tmp_path / f"{precision}.csv"
        run(
            "predict",
            f"ckpt_path={int8_package}",
            f"input={photos}",
            f"output={out}",
            "runtime=onnx",
            f"precision={precision}",
            f"hydra.run.dir={tmp_path / precision}",
        )
        labels[precision] = [row[:2] for row in csv.reader(out.open())][1:]
    assert len(labels["int8"]) == len(labels["auto"]) == 124
    same = sum(a == b for a, b in zip(labels["auto"], labels["int8"]))
    assert same >= 0.97 * 124, same

    with pytest.raises(DataError) as refused:
        load_runtime(str(int8_package), "torch", "cpu", "int8", "auto", "none", None)
    assert "runtime=onnx precision=int8" in one_line_exit_2(refused.value)
    without = tmp_path / "without_int8"
    shutil.copytree(int8_package, without)
    (without / "model.int8.onnx").unlink()
    with pytest.raises(DataError) as missing:
        load_runtime(str(without), "onnx", "auto", "int8", "auto", "none", None)
    assert "has no model.int8.onnx; export with format=onnx quantize=int8" in one_line_exit_2(missing.value)


def test_the_guard_refuses_int8_calibrated_on_constant_images_and_writes_nothing(int8_package, tmp_path):
    """A run whose training images are one grey picture: the int8 ranges fit nothing real, the check on the real
    val / test photos catches it, and the output folder keeps exactly what it had."""
    root = tmp_path / "images"
    root.mkdir()
    rows = list(csv.reader((int8_package / "splits.csv").open()))[1:]
    train = [r for r in rows if r[1] == "train"][:16]
    held_out = [r for r in rows if r[1] != "train"][:24]
    for row in train:
        Image.new("RGB", (320, 240), (128, 128, 128)).save(root / row[0], quality=95)
    for row in held_out:
        (root / row[0]).symlink_to(PETS / row[0])
    table = [[r[0], r[1], str((root / r[0]).stat().st_size), r[3]] for r in train + held_out]
    source = package_copy(int8_package, tmp_path / "grey_run", root, table)
    out = tmp_path / "out"
    out.mkdir()
    (out / "model.onnx").write_bytes(b"an earlier export")
    with pytest.raises(DataError) as refused:
        run(
            "export",
            f"ckpt_path={source}",
            f"output={out}",
            "format=onnx",
            "quantize=int8",
            "int8_calibration_images=16",
            f"hydra.run.dir={tmp_path / 'r'}",
        )
    message = one_line_exit_2(refused.value)
    assert "int8 ONNX model gives the fp32 top-1 class on" in message and "of 24 of the run's images" in message
    assert "min_int8_agreement=0.98" in message and "nothing was written" in message and "quantize=none" in message
    assert [p.name for p in out.iterdir()] == ["model.onnx"] and (out / "model.onnx").read_bytes() == b"an earlier export"


def test_int8_without_the_runs_images_or_for_a_multilabel_model_stops_with_one_line(int8_package, tmp_path):
    source = package_copy(int8_package, tmp_path / "moved", tmp_path / "gone")
    out = tmp_path / "out"
    with pytest.raises(DataError) as gone:
        run("export", f"ckpt_path={source}", f"output={out}", "format=onnx", "quantize=int8", f"hydra.run.dir={tmp_path / 'r'}")
    message = one_line_exit_2(gone.value)
    assert "the run's images are gone" in message and "data_root=" in message and "quantize=none" in message
    assert not out.exists()  # refused before anything was written
    settings = Int8Settings(calibration_images=64, min_agreement=0.98, data_root=None)
    with pytest.raises(DataError, match="multi-label models are not quantised"):
        plan_int8(True, {"root": str(PETS), "rows": []}, {"onnx"}, settings, 0)
    with pytest.raises(DataError, match="quantises the onnx and executorch formats"):
        plan_int8(False, {"root": str(PETS), "rows": []}, {"torchscript"}, settings, 0)


def test_format_is_one_name_or_a_list_and_stale_files_go(tmp_path):
    assert exporter.wanted_formats("all") == {"onnx", "torchscript"}
    assert exporter.wanted_formats(["onnx", "executorch"]) == {"onnx", "executorch"}
    assert exporter.wanted_formats(["all", "executorch"]) == {"onnx", "torchscript", "executorch"}
    with pytest.raises(ConfigError, match="'tflite' is not a format"):
        exporter.wanted_formats(["onnx", "tflite"])
    staging, out = tmp_path / "staging", tmp_path / "out"
    staging.mkdir()
    out.mkdir()
    (staging / "config.json").write_text("{}")
    for name in ("model.int8.onnx", "model.pte", "model.int8.pte", "int8_calibration.txt", "model.onnx"):
        (out / name).write_text("stale")
    exporter._move_into(staging, out)
    assert [p.name for p in out.iterdir()] == ["config.json"]


@pytest.mark.skipif(not MOBILE, reason="the `mobile` extra (executorch) is not installed")
def test_executorch_fp32_and_int8_beside_onnx(int8_package, species_run):
    """model.pte runs in ExecuTorch's own runtime and equals the checkpoint on real photos to 1e-3; model.int8.pte
    agrees with fp32 on the run's other images (the guard) at under 0.35x the size."""
    from transferlab.deploy.mobile import pte_logits
    from transferlab.deploy.quantize import load_batch
    from transferlab.models.classifier import load_checkpoint

    out = int8_package
    config = json.loads((out / "config.json").read_text())
    assert {"onnx", "executorch", "onnx_int8", "executorch_int8"} <= set(config["formats"])
    assert config["formats"]["executorch"]["file"] == "model.pte" and config["formats"]["executorch"]["max_abs_diff"] <= 1e-3
    assert config["formats"]["executorch_int8"]["file"] == "model.int8.pte" and config["formats"]["executorch_int8"]["agreement"] >= 0.98
    assert config["int8_model"] == "model.int8.onnx"
    assert (out / "model.int8.pte").stat().st_size <= 0.35 * (out / "model.pte").stat().st_size
    model, _ = load_checkpoint(species_run / "checkpoints" / "best.ckpt")
    network = exporter.InferenceNetwork(model.float().eval()).eval()
    test = sorted(f for f, split in read_splits(species_run).items() if split == "test")[:12]
    images = load_batch(PETS, test, model.backbone.preprocessing)
    with torch.inference_mode():
        expected = network(images)
    got = pte_logits(out / "model.pte", [images[:1], images[1:]])
    assert exporter.largest_difference([expected[:1], expected[1:]], got) <= 1e-3
