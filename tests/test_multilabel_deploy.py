"""Multi-label deploy (issue 32): export, the model package, predict, serve, its page and the Python API.

The species run of `canvas_runs` (canvases of 1 to 3 shared pet photos tagged with {cat, dog}; frozen Lite0 and the
one-vs-rest probe, test mAP about 0.99) is exported once for the module. Every check compares the deployed model
with the checkpoint itself (the sigmoid of its calibrated logits, its thresholds), so these tests are about the
deploy path: a model's own mistakes cannot make them pass or fail.
"""

from __future__ import annotations

import base64
import csv
import json
import re
import shutil
from pathlib import Path

import pytest
import torch

from conftest import chromium_driver, needs_browser, run, start_server, stop_server
from test_export import consumer_inputs
from transferlab import api
from transferlab.core.errors import DataError
from transferlab.data.images import decode_rgb
from transferlab.deploy.runtime import load_runtime
from transferlab.models import package
from transferlab.models.classifier import load_checkpoint

pytestmark = pytest.mark.shared
httpx = pytest.importorskip("httpx")
TOLERANCE = 1e-4


@pytest.fixture(scope="module")
def ml_package(canvas_runs, tmp_path_factory) -> Path:
    """The species checkpoint exported with format=all (ONNX, TorchScript, safetensors)."""
    out = tmp_path_factory.mktemp("multilabel_export") / "package"
    run("export", f"ckpt_path={checkpoint(canvas_runs)}", f"output={out}", "format=all", f"hydra.run.dir={out.parent / 'run'}")
    return out


@pytest.fixture(scope="module")
def photos(canvas_runs, tmp_path_factory) -> dict[str, Path]:
    """{"cat_and_dog": the held-out canvas with a cat and a dog that the checkpoint tags with both most clearly (its
    smaller margin over the two thresholds is the largest of the run's test_predictions.csv), "two_animals": the
    fixture's held-out cat beside a held-out dog}, copied into one folder with a text file named like a photo."""
    model, _ = load_checkpoint(checkpoint(canvas_runs))
    with open(canvas_runs["species"] / "test_predictions.csv", newline="") as fh:
        both = [row for row in csv.DictReader(fh) if row["labels"] == "cat;dog"]
    margin = {row["path"]: min(float(row[f"prob_{name}"]) - model.thresholds[name] for name in ("cat", "dog")) for row in both}
    folder = tmp_path_factory.mktemp("multilabel_photos")
    found = {"cat_and_dog": folder / "cat_and_dog.jpg", "two_animals": folder / "two_animals.jpg"}
    shutil.copy(max(margin, key=margin.__getitem__), found["cat_and_dog"])
    shutil.copy(canvas_runs["two_animals"], found["two_animals"])
    (folder / "notes.jpg").write_text("not an image")
    return found


def checkpoint(canvas_runs: dict[str, Path]) -> Path:
    return canvas_runs["species"] / "checkpoints" / "best.ckpt"


def held_out_canvases(canvas_runs: dict[str, Path], n: int = 9) -> list[Path]:
    """The first `n` test canvases of the species index (9: not a batch size the export checked)."""
    with open(canvas_runs["canvases"] / "index_species.csv", newline="") as fh:
        return [canvas_runs["canvases"] / row["path"] for row in csv.DictReader(fh) if row["split"] == "test"][:n]


def checkpoint_answers(canvas_runs: dict[str, Path], files: list[Path], tta: str = "none") -> tuple[torch.Tensor, list[list[str]]]:
    """The checkpoint's own calibrated probabilities (views averaged as its test step does) and label sets, fp32."""
    model, _ = load_checkpoint(checkpoint(canvas_runs))
    prep = model.backbone.preprocessing
    transform = prep.eval_transform()
    images = torch.stack([transform(decode_rgb(f, prep.decode_size())) for f in files])
    with torch.inference_mode():
        probs = model.evaluate(images, tta)[:, 0].sigmoid()
    names = model.class_names
    return probs, [[n for n, p in zip(names, row) if p >= model.thresholds[n]] for row in probs.tolist()]


def test_export_writes_a_multilabel_package_whose_formats_give_the_checkpoints_probabilities(canvas_runs, ml_package):
    import onnxruntime

    config = json.loads((ml_package / "config.json").read_text())
    model, _ = load_checkpoint(checkpoint(canvas_runs))
    assert config["task"] == "multilabel" and config["class_names"] == ["cat", "dog"]
    assert config["thresholds"] == pytest.approx(model.thresholds) and set(config["thresholds"]) == {"cat", "dog"}
    assert config["temperature"] == pytest.approx(dict(zip(["cat", "dog"], model.temperature.tolist())))
    assert config["logits_are_calibrated"] is True and config["hyper_parameters"]["task"] == "multilabel"
    assert "sigmoid" in config["output"]["meaning"] and config["metrics"]["test/map"] > 0.9
    for name in ("onnx", "torchscript", "safetensors"):
        assert config["formats"][name]["max_abs_diff"] <= TOLERANCE and config["formats"][name]["max_abs_prob_diff"] <= TOLERANCE
    card = (ml_package / "README.md").read_text()
    assert "multi-label image classifier (2 labels)" in card and "| `test/map` |" in card and "## Label decisions" in card
    assert f"| cat | {config['thresholds']['cat']:.3f} |" in card and re.search(r"\| `test/map` \| 0\.\d{4} \| \[0\.\d{3}, [01]\.\d{3}\] \|", card)

    files = held_out_canvases(canvas_runs) + [canvas_runs["two_animals"]]
    inputs = consumer_inputs(config, files)  # coded from config.json alone
    with torch.inference_mode():
        expected = model.calibrated_logits(inputs).sigmoid()
        reloaded, hparams = load_checkpoint(ml_package)  # package -> classifier: task and thresholds come back
        from_package = reloaded.calibrated_logits(inputs).sigmoid()
    assert hparams["task"] == "multilabel" and reloaded.task.multilabel and reloaded.thresholds == pytest.approx(model.thresholds)
    session = onnxruntime.InferenceSession(str(ml_package / "model.onnx"), providers=["CPUExecutionProvider"])
    from_onnx = torch.from_numpy(session.run(None, {"images": inputs.numpy()})[0]).sigmoid()
    from_script = torch.jit.load(str(ml_package / "model.pt"))(inputs).detach().sigmoid()
    for got in (from_onnx, from_script, from_package):
        assert float((got - expected).abs().max()) <= TOLERANCE


def test_predict_writes_the_label_set_and_every_probability_with_both_runtimes(canvas_runs, ml_package, photos, tmp_path):
    folder = photos["cat_and_dog"].parent
    probs, sets = checkpoint_answers(canvas_runs, [photos["cat_and_dog"], photos["two_animals"]])
    assert sets[0] == ["cat", "dog"]
    for runtime in ("torch", "onnx"):
        out = tmp_path / f"{runtime}.csv"
        result = run(
            "predict",
            f"ckpt_path={ml_package}",
            f"input={folder}",
            f"output={out}",
            f"runtime={runtime}",
            "precision=32-true",
            "num_workers=0",
            f"hydra.run.dir={tmp_path / runtime}",
        )
        assert result["images"] == 3 and result["labelled"] == 2
        with open(out, newline="") as fh:
            reader = csv.DictReader(fh)
            assert reader.fieldnames == ["path", "labels", "error", "prob_cat", "prob_dog"]
            rows = {Path(row["path"]).name: row for row in reader}
        for i, name in enumerate(("cat_and_dog.jpg", "two_animals.jpg")):
            assert rows[name]["labels"] == ";".join(sets[i]) and rows[name]["error"] == "", (runtime, name, rows[name])
            got = [float(rows[name]["prob_cat"]), float(rows[name]["prob_dog"])]
            assert got == pytest.approx(probs[i].tolist(), abs=TOLERANCE + 1e-6), (runtime, name)
        assert rows["notes.jpg"]["error"] and rows["notes.jpg"]["labels"] == rows["notes.jpg"]["prob_cat"] == ""
    # test-time augmentation: each label's probability averaged over the views, as the checkpoint's test step does
    files = [photos["cat_and_dog"], photos["two_animals"]]
    for tta in ("hflip", "five_crop"):
        expected, _ = checkpoint_answers(canvas_runs, files, tta)
        for source, runtime in ((ml_package, "onnx"), (checkpoint(canvas_runs), "torch")):
            predictor = load_runtime(str(source), runtime, "cpu", "32-true", "auto", tta, None)
            prep = predictor.preprocessing
            images = torch.stack([prep.eval_transform()(decode_rgb(f, prep.decode_size())) for f in files])
            got = predictor.probabilities(images)
            assert float((got - expected).abs().max()) <= TOLERANCE, (tta, runtime)
            assert torch.allclose(predictor.logits(images).sigmoid(), got, atol=1e-5)  # logits: the averaged probabilities' logit


@pytest.fixture(scope="module")
def ml_server(ml_package, tmp_path_factory):
    log = tmp_path_factory.mktemp("multilabel_serve") / "server.out"
    proc, url = start_server(ml_package, log, "max_images=4")
    yield url
    stop_server(proc)


def test_serve_answers_the_label_set_and_probabilities_and_refuses_bad_uploads(canvas_runs, ml_package, ml_server, photos):
    url = ml_server
    probs, sets = checkpoint_answers(canvas_runs, [photos["cat_and_dog"], photos["two_animals"]])
    both = photos["cat_and_dog"].read_bytes()
    answer = httpx.post(f"{url}/predict", files={"file": ("cat_and_dog.jpg", both, "image/jpeg")}, timeout=60)
    assert answer.status_code == 200, answer.text
    result = answer.json()["results"][0]
    assert result["labels"] == ["cat", "dog"] and set(result["probabilities"]) == {"cat", "dog"}
    assert [result["probabilities"][n] for n in ("cat", "dog")] == pytest.approx(probs[0].tolist(), abs=0.02)  # bf16 on CPU
    assert [p["label"] for p in result["predictions"]] == sorted(result["probabilities"], key=lambda n: -result["probabilities"][n])
    assert answer.json()["labels"] == result["labels"] and answer.json()["probabilities"] == result["probabilities"]  # one image
    multipart = [("file", (f.name, f.read_bytes(), "image/jpeg")) for f in (photos["two_animals"], photos["cat_and_dog"])]
    many = httpx.post(f"{url}/predict", files=multipart, timeout=60).json()
    assert [r["labels"] for r in many["results"]] == [sets[1], sets[0]] and "labels" not in many
    as_json = httpx.post(f"{url}/predict", json={"images": [base64.b64encode(both).decode()]}, timeout=60).json()
    assert as_json["results"][0]["labels"] == ["cat", "dog"]

    refused = httpx.post(f"{url}/predict", files={"file": ("notes.jpg", b"hello, this is text", "image/jpeg")}, timeout=60)
    assert refused.status_code == 415 and "\n" not in refused.json()["error"]
    assert httpx.get(f"{url}/health", timeout=10).json()["status"] == "ok"
    again = httpx.post(f"{url}/predict", files={"file": ("again.jpg", both, "image/jpeg")}, timeout=60)
    assert again.status_code == 200 and again.json()["labels"] == ["cat", "dog"]

    meta = httpx.get(f"{url}/metadata").json()
    config = json.loads((ml_package / "config.json").read_text())
    assert meta["task"] == "multilabel" and meta["thresholds"] == config["thresholds"]
    schema = httpx.get(f"{url}/openapi.json").json()["components"]["schemas"]
    assert {"labels", "probabilities"} <= set(schema["ImageResult"]["properties"]) and {"labels", "probabilities"} <= set(
        schema["PredictAnswer"]["properties"]
    )
    assert schema["ImageResult"]["required"] == ["file", "predictions"]  # what a single-label answer holds stays required
    page = httpx.get(f"{url}/").text
    assert "2 labels (multi-label)" in page and "test mAP" in page


@needs_browser
def test_the_page_shows_the_predicted_set_as_tags(ml_server, photos):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    with chromium_driver() as driver:
        driver.get(f"{ml_server}/")
        driver.find_element(By.ID, "file").send_keys(str(photos["cat_and_dog"]))
        WebDriverWait(driver, 60).until(lambda d: d.find_elements(By.CSS_SELECTOR, "#tags .tag"))
        tags = [tag.text for tag in driver.find_elements(By.CSS_SELECTOR, "#tags .tag")]
        assert [t.split()[0] for t in tags] == ["cat", "dog"] and all(t.endswith("%") for t in tags)
        assert driver.find_element(By.ID, "top1").text == "" and len(driver.find_elements(By.CSS_SELECTOR, "#rows tr")) == 2
        errors = [m for m in driver.get_log("browser") if m["level"] == "SEVERE" and "favicon" not in m["message"]]
        assert not errors, errors


def test_the_api_gives_the_predicted_set(canvas_runs, ml_package, photos):
    _, sets = checkpoint_answers(canvas_runs, [photos["cat_and_dog"], photos["two_animals"]])
    model = api.load(ml_package, runtime="onnx")
    assert model.multilabel and set(model.thresholds) == {"cat", "dog"}
    found = model.predict([photos["cat_and_dog"], photos["two_animals"]], topk=2)
    assert [p.labels for p in found] == sets and found[0].labels == ["cat", "dog"]
    for p in found:
        assert p.label == p.top[0][0] and p.prob == p.top[0][1] and p.top[0][1] >= p.top[1][1]


def test_a_single_label_package_says_task_single(species_package):
    config = json.loads((species_package / "config.json").read_text())
    assert config["task"] == "single" and "thresholds" not in config and isinstance(config["temperature"], float)
    assert config["output"]["meaning"] == "logits / temperature; softmax gives the class probabilities"
    assert all("max_abs_prob_diff" not in info for info in config["formats"].values())
    model, hparams = load_checkpoint(species_package)
    assert hparams["task"] == "single" and not model.task.multilabel
    assert package.task_of({}) == "single"  # packages from before multi-label
    with pytest.raises(DataError, match="task is 'tags', not single or multilabel"):
        package.task_of({"task": "tags"})
