"""Insight on multi-label runs (issue 32): the run report (headline figures with intervals, labels most missed first,
the most-missed gallery), class activation maps per label (each on its own animal), the data audit with cleanlab's
multi-label functions (corrupted label sets found), and CSV / TensorBoard / W&B / MLflow logging of label metrics
whose names MLflow refuses. The shared canvas runs (conftest.canvas_runs) and, where faster, small canvases."""

from __future__ import annotations

import csv
import json
import re
from pathlib import Path

import numpy as np
import pytest

from conftest import FAST, chromium_render, needs_browser, read_metrics, read_wandb_log, run
from evidence import quadrant_mass

pytestmark = pytest.mark.shared

HEADLINE = ("test/map", "test/f1_micro", "test/f1_macro")


def read_rows(path: Path) -> tuple[list[str], list[dict[str, str]]]:
    with open(path, newline="") as fh:
        reader = csv.DictReader(fh)
        return list(reader.fieldnames or []), list(reader)


def label_set(cell: str) -> set[str]:
    return {name for name in cell.split(";") if name}


def most_missed_order(metrics: dict, names: list[str]) -> list[str]:
    """The labels by AP, lowest first, then by recall (labels without an AP last): the report's order."""

    def key(name: str) -> tuple[bool, float, float]:
        ap, recall = metrics.get(f"test/ap/{name}"), metrics.get(f"test/recall/{name}")
        return (ap is None, ap or 0.0, 1.0 if recall is None else recall)

    return sorted(names, key=key)


# -- the run report ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("task", ["species", "breeds"])
def test_the_report_shows_headline_intervals_and_the_most_missed_labels_first(canvas_runs, task):
    out = canvas_runs[task]
    metrics, html = read_metrics(out), (out / "report.html").read_text()
    assert "http://" not in html and "https://" not in html and "<script" not in html  # self-contained
    for key in HEADLINE:
        low, high = metrics[f"{key}_ci95"]
        assert f"<td>{key}</td><td>{metrics[key]:.4f}</td><td>[{low:.3f}, {high:.3f}]</td>" in html, key
    names = [k.removeprefix("test/support/") for k in metrics if k.startswith("test/support/")]
    section = html.split("<h2>Per label, most missed first</h2>")[1].split("<h2>")[0]
    assert "lowest first" in section
    shown = re.findall(r"<tr><td>([^<]+)</td><td>", section)
    assert shown == most_missed_order(metrics, names)  # every label once, the most missed first
    assert not any(f"<td>test/ap/{name}</td>" in html for name in names)  # per-label figures only in the label table
    assert html.count('<img src="data:image/png;base64,') == 2  # precision_recall.png, most_missed.png
    for name in ("precision_recall.png", "most_missed.png", "most_missed.csv", "per_label_metrics.csv"):
        assert (out / name).is_file(), name
    assert not (out / "top_losses.png").exists() and not (out / "confusion_matrix.png").exists()


@pytest.mark.parametrize("task", ["species", "breeds"])
def test_most_missed_images_are_the_surest_misses_and_wrongest_additions(canvas_runs, task):
    out = canvas_runs[task]
    metrics = read_metrics(out)
    columns, rows = read_rows(out / "most_missed.csv")
    assert columns == ["label", "kind", "path", "prob", "threshold", "labels", "predicted"]
    _, predictions = read_rows(out / "test_predictions.csv")
    by_path = {r["path"]: r for r in predictions}
    names = [k.removeprefix("test/support/") for k in metrics if k.startswith("test/support/")]
    errors = {}  # label -> (misses, additions): (prob, path) of the test images it was wrong on
    for name in names:
        missed = sorted((float(r[f"prob_{name}"]), r["path"]) for r in predictions if name in label_set(r["labels"]) - label_set(r["predicted"]))
        added = sorted((-float(r[f"prob_{name}"]), r["path"]) for r in predictions if name in label_set(r["predicted"]) - label_set(r["labels"]))
        errors[name] = (missed, added)
    expected_labels = [n for n in most_missed_order(metrics, names) if errors[n][0] or errors[n][1]][:4]  # interpret.top_losses 12 / 3
    assert list(dict.fromkeys(r["label"] for r in rows)) == expected_labels
    for label in expected_labels:
        picked = [r for r in rows if r["label"] == label]
        missed, added = errors[label]
        shown_missed = [float(r["prob"]) for r in picked if r["kind"] == "missed"]  # the lowest probabilities, lowest first
        shown_added = [float(r["prob"]) for r in picked if r["kind"] == "wrongly added"]  # the highest, highest first
        assert shown_missed == pytest.approx([p for p, _ in missed][: len(shown_missed)], abs=2e-6)
        assert shown_added == pytest.approx([-p for p, _ in added][: len(shown_added)], abs=2e-6)
        assert len(picked) == min(3, len(missed) + len(added)) and len(shown_missed) >= min(2, len(missed))
    for row in rows:
        truth, predicted, source = label_set(row["labels"]), label_set(row["predicted"]), by_path[row["path"]]
        assert (truth, predicted) == (label_set(source["labels"]), label_set(source["predicted"]))
        assert float(row["prob"]) == pytest.approx(float(source[f"prob_{row['label']}"]), abs=2e-6)
        assert float(row["threshold"]) == pytest.approx(metrics[f"threshold/{row['label']}"], abs=2e-6)
        if row["kind"] == "missed":
            assert row["label"] in truth - predicted and float(row["prob"]) < float(row["threshold"])
        else:
            assert row["kind"] == "wrongly added" and row["label"] in predicted - truth and float(row["prob"]) >= float(row["threshold"])


# -- class activation maps per label ----------------------------------------------------------------------
def test_explain_draws_a_map_per_label_each_on_its_own_animal(canvas_runs, tmp_path):
    """On a held-out cat (left) beside a held-out dog (right): the `cat` map's mass lies on the left half, the `dog`
    map's (explained with target=dog: the small dog of this canvas is under its threshold) on the right half."""
    ckpt = canvas_runs["species"] / "checkpoints" / "best.ckpt"
    _, predictions = read_rows(canvas_runs["species"] / "test_predictions.csv")
    photos = tmp_path / "photos"
    photos.mkdir()
    (photos / "two_animals.jpg").symlink_to(canvas_runs["two_animals"])
    for row in predictions[:3]:
        (photos / Path(row["path"]).name).symlink_to(row["path"])
    out = tmp_path / "maps"
    summary = run("explain", f"ckpt_path={ckpt}", f"input={photos}", f"hydra.run.dir={out}")
    columns, rows = read_rows(out / "explain.csv")
    assert columns == ["path", "target", "prob", "threshold", "predicted"]
    assert summary["task"] == "multilabel" and summary["images"] == 4 and summary["maps"] == len(rows)
    assert json.loads((out / "explain.json").read_text()) == summary
    by_image: dict[str, list[dict[str, str]]] = {}
    for row in rows:
        by_image.setdefault(Path(row["path"]).stem, []).append(row)
        cam = np.load(out / f"{Path(row['path']).stem}_{row['target']}_cam.npy")
        assert cam.dtype == np.float32 and cam.shape == (224, 224) and cam.max() > 0.5
        assert (out / f"{Path(row['path']).stem}_{row['target']}_cam.png").is_file()
        assert row["predicted"] == str(float(row["prob"]) >= float(row["threshold"])).lower()
    for row in predictions[:3]:  # every predicted label of a test canvas, as the run's own test predicted it
        explained = {r["target"]: float(r["prob"]) for r in by_image[Path(row["path"]).stem]}
        assert set(explained) == label_set(row["predicted"]) or (not label_set(row["predicted"]) and len(explained) == 1)
        for name, prob in explained.items():
            assert prob == pytest.approx(float(row[f"prob_{name}"]), abs=0.1)  # the same crop, resized by PIL instead
    cat = quadrant_mass(np.load(out / "two_animals_cat_cam.npy"))
    assert cat["top_left"] + cat["bottom_left"] >= 0.7, cat

    dog_out = tmp_path / "dog"
    run("explain", f"ckpt_path={ckpt}", f"input={canvas_runs['two_animals']}", "target=dog", f"hydra.run.dir={dog_out}")
    (row,) = read_rows(dog_out / "explain.csv")[1]
    assert row["target"] == "dog" and sorted(p.name for p in dog_out.glob("*_cam.*")) == ["two_animals_dog_cam.npy", "two_animals_dog_cam.png"]
    dog = quadrant_mass(np.load(dog_out / "two_animals_dog_cam.npy"))
    assert dog["top_right"] + dog["bottom_right"] >= 0.7, dog


def test_label_file_names_stay_distinct():
    from transferlab.cli.explain import label_tokens

    assert label_tokens(["cat", "great pyrenees", "t-shirt/top", "猫", "犬", "a b", "a_b"]) == [
        "cat",
        "great_pyrenees",
        "t-shirt_top",
        "__3",
        "__4",
        "a_b_5",
        "a_b_6",
    ]


# -- the data audit ----------------------------------------------------------------------------------------
def test_the_audit_finds_corrupted_label_sets(canvas_runs, tmp_path):
    """Four training canvases relabelled: a cat+dog canvas as `cat` only and one as `dog` only, a dog-only canvas as
    `cat`, a cat-only canvas as `dog`. cleanlab's multi-label filter on the one-vs-rest probe's out-of-fold
    probabilities flags at least 3 of them, among few flagged canvases."""
    canvases = canvas_runs["canvases"]
    _, rows = read_rows(canvases / "index_species.csv")
    train = [r for r in rows if r["split"] != "test"]
    both = [r for r in train if r["labels"] == "cat;dog"]
    corrupted = {
        both[0]["path"]: "cat",
        both[1]["path"]: "dog",
        next(r for r in train if r["labels"] == "dog")["path"]: "cat",
        next(r for r in train if r["labels"] == "cat")["path"]: "dog",
    }
    index = tmp_path / "index.csv"
    with open(index, "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["path", "labels", "split"])
        writer.writerows([r["path"], corrupted.get(r["path"], r["labels"]), r["split"]] for r in rows)
    out = tmp_path / "audit"
    facts = run("audit", "data=image_index", "data.task=multilabel", f"data.root={canvases}", f"data.index={index}", f"hydra.run.dir={out}")
    assert facts["task"] == "multilabel" and facts["images"] == len(rows) and facts["classes"] == 2
    assert facts["probe"]["out_of_fold_map"] > 0.9 and "out_of_fold_accuracy" not in facts["probe"]
    columns, issues = read_rows(out / "label_issues.csv")
    assert columns == ["path", "given", "suggested", "score"]
    scores = [float(r["score"]) for r in issues]
    assert scores == sorted(scores, reverse=True)
    flagged = {r["path"]: r for r in issues}
    found = [p for p in corrupted if str(canvases / p) in flagged]
    assert len(found) >= 3, (found, issues[:8])
    assert len(issues) <= 0.15 * len(rows), len(issues)  # not most of the data: 4 corrupted of 340
    for path in found:
        row = flagged[str(canvases / path)]
        truth = next(r["labels"] for r in rows if r["path"] == path)
        assert row["given"] == corrupted[path] and row["suggested"] != row["given"]
        assert label_set(row["suggested"]) & (label_set(truth) - label_set(corrupted[path]))  # the label that was taken away
    page = (out / "audit.html").read_text()
    assert "2 labels (multi-label)" in page and "mAP" in page and "cleanlab's multi-label filter" in page
    _, outliers = read_rows(out / "outliers.csv")
    assert all(set(label_set(r["given"])) <= {"cat", "dog"} for r in outliers)


# -- logging -------------------------------------------------------------------------------------------------
def test_mlflow_names_are_valid_stable_and_distinct():
    from transferlab.training.loggers import mlflow_key, mlflow_keys

    assert mlflow_key("test/ap/american_bulldog") == "test/ap/american_bulldog"
    assert mlflow_key("test/ap/great pyrenees") == "test/ap/great pyrenees"
    assert mlflow_key("adv/fgsm_acc@eps=4/255") == "adv/fgsm_acceps4/255"  # as Lightning's logger has always named it
    assert mlflow_key("test/ap/chien (dog)") == "test/ap/chien dog" and mlflow_key("test/ap/café") == "test/ap/cafe"
    names = mlflow_keys(["test/ap/猫", "test/ap/犬", "test/ap/a(b)", "test/ap/ab", "threshold/..", "x/" + "y" * 300])
    assert len(set(names.values())) == 6 and names["test/ap/ab"] == "test/ap/ab"
    assert names["test/ap/猫"] == mlflow_key("test/ap/猫") and names["test/ap/猫"].startswith("test/ap/_-")
    from mlflow.utils.validation import _validate_metric_name, _validate_param_name

    for name in names.values():
        _validate_metric_name(name)
        _validate_param_name(name)
        assert len(name) <= 250


@pytest.mark.filterwarnings("ignore:Glyph .* missing from font")  # 猫 in the pictures' titles: DejaVu Sans has no CJK
def test_a_multilabel_run_logs_label_metrics_to_every_logger(tmp_path):
    """A small multi-label run (64 px canvases, labels `猫` and `chien (dog)`) with callbacks=cam, logger=many: every
    test/ap/<label> reaches CSV, TensorBoard, W&B (offline) and MLflow (a local sqlite store, read back), the maps of
    the callback and the run's most-missed gallery are drawn."""
    from canvases import write_canvases

    small = tmp_path / "canvases"
    write_canvases(small, seed=3, per_split={"train": 48, "test": 16}, size=160, task="species")
    renamed = {"cat": "猫", "dog": "chien (dog)"}
    _, rows = read_rows(small / "index_species.csv")
    index = small / "index_renamed.csv"
    with open(index, "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["path", "labels", "split"])
        writer.writerows([r["path"], ";".join(renamed[n] for n in r["labels"].split(";")), r["split"]] for r in rows)
    out, logs = tmp_path / "run", tmp_path / "logs"
    run(
        "train",
        "data=image_index",
        "data.task=multilabel",
        f"data.root={small}",
        f"data.index={index}",
        "callbacks=cam",
        "callbacks.cam.num_images=2",
        "logger=many",
        f"paths.log_dir={logs}",
        *FAST,
        f"hydra.run.dir={out}",
    )
    metrics = read_metrics(out)
    keys = [f"test/ap/{name}" for name in renamed.values()]
    assert all(key in metrics for key in keys)
    assert len(list((out / "cams" / "end").glob("*.png"))) == 2
    assert (out / "most_missed.csv").is_file() and (out / "report.html").is_file()

    final = dict(tuple(r) for r in csv.reader(open(out / "csv" / "final_metrics.csv")))
    assert all(float(final[key]) == pytest.approx(metrics[key]) for key in keys)

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(out / "tensorboard"))
    events.Reload()
    assert all(events.Scalars(key)[-1].value == pytest.approx(metrics[key], abs=1e-6) for key in keys)

    history = {}
    for record in read_wandb_log(next((out / "wandb").glob("offline-run-*/*.wandb"))):
        if record.WhichOneof("record_type") == "history":
            history.update({i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in record.history.item})
    assert all(history[key] == pytest.approx(metrics[key]) for key in keys)

    from mlflow.tracking import MlflowClient

    from transferlab.training.loggers import mlflow_key

    client = MlflowClient(f"sqlite:///{logs / 'mlflow.db'}")
    (found,) = client.search_runs([client.get_experiment_by_name("train").experiment_id])
    assert found.info.status == "FINISHED"
    assert all(found.data.metrics[mlflow_key(key)] == pytest.approx(metrics[key]) for key in keys)
    assert mlflow_key("test/ap/chien (dog)") == "test/ap/chien dog"
    assert {"most_missed.png", "per_label_metrics.csv", "report.html"} <= {a.path for a in client.list_artifacts(found.info.run_id)}


@needs_browser
def test_the_multilabel_report_renders_in_headless_chromium(canvas_runs, tmp_path):
    console, widths = chromium_render(canvas_runs["breeds"] / "report.html", tmp_path / "report.png")
    assert not [m for m in console if m["level"] in ("SEVERE", "WARNING")], console
    assert len(widths) == 2 and all(w > 0 for w in widths), widths  # precision_recall.png, most_missed.png
