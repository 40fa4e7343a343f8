"""data=hf_dataset on a `datasets` folder the test builds from the shared photos (offline): the same test/acc as
data=image_folder on the same images and split; an undecodable image is reported, not used, not deleted."""

from __future__ import annotations

import csv
import json
import os
from pathlib import Path

import pytest

from conftest import FAST, PETS, read_metrics, require_shared, run

datasets = pytest.importorskip("datasets")
pytestmark = pytest.mark.shared

BROKEN = b"\xff\xd8\xff\xe0 not really a JPEG"
# The real 224 px pipeline and the default L-BFGS probe: the accuracy is the one a user gets.
ARGS = ["seed=5", "data.num_workers=0", "trainer.precision=bf16-mixed", "callbacks.progress_bar=null", "trainer.enable_progress_bar=false"]


@pytest.fixture(scope="module")
def same_images(tmp_path_factory):
    """The species task as an image_folder tree and as a saved `datasets` dataset, rows in the folder's order."""
    require_shared()
    root = tmp_path_factory.mktemp("hf")
    folder = root / "folder"
    files = {"cat": sorted(p for p in PETS.glob("*.jpg") if p.name[0].isupper()), "dog": sorted(p for p in PETS.glob("*.jpg") if p.name[0].islower())}
    images, labels = [], []
    for label, name in enumerate(("cat", "dog")):
        (folder / name).mkdir(parents=True)
        for file in files[name]:
            os.symlink(file, folder / name / file.name)
            images.append({"bytes": file.read_bytes(), "path": file.name})
            labels.append(label)
        (folder / name / "zz_broken.jpg").write_bytes(BROKEN)
        images.append({"bytes": BROKEN, "path": "zz_broken.jpg"})
        labels.append(label)
    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=["cat", "dog"])})
    datasets.Dataset.from_dict({"image": images, "label": labels}, features=features).save_to_disk(str(root / "saved"))
    return folder, root / "saved"


def test_a_saved_dataset_trains_like_the_same_image_folder(same_images, tmp_path):
    folder, saved = same_images
    as_folder = run("train", "data=image_folder", f"data.root={folder}", *ARGS, f"hydra.run.dir={tmp_path / 'folder'}")
    as_hf = run("train", "data=hf_dataset", f"data.path={saved}", f"data.root={tmp_path / 'store'}", *ARGS, f"hydra.run.dir={tmp_path / 'hf'}")
    a, b = read_metrics(tmp_path / "folder"), read_metrics(tmp_path / "hf")
    assert a["test/acc"] == b["test/acc"] >= 0.95 and as_folder == as_hf
    assert b["test/nll"] == pytest.approx(a["test/nll"], abs=1e-5)
    skipped = list(csv.DictReader(open(tmp_path / "hf" / "skipped_images.csv")))
    assert len(skipped) == 2 and all(row["path"].endswith(".jpg") for row in skipped)  # one per class, with the reason
    stored = json.loads(next((tmp_path / "store").glob("*/samples.json")).read_text())
    assert sum(len(v) for v in stored.values()) == 372 and all(os.path.isfile(p) for v in stored.values() for p, *_ in v)  # nothing deleted
    key_of = {path: key for rows in stored.values() for path, _, key in rows}  # the dataset's name of each written file
    tested = {run_name: {r["path"] for r in csv.DictReader(open(tmp_path / run_name / "test_predictions.csv"))} for run_name in ("folder", "hf")}
    folder_names = {"/".join(Path(p).parts[-2:]) for p in tested["folder"]}
    assert folder_names == {key_of[p] for p in tested["hf"]}  # the same photos tested: folder or dataset, the same split


def test_the_own_test_split_is_the_test_set_and_bad_columns_say_what_to_set(same_images, tmp_path):
    _, saved = same_images
    whole = datasets.load_from_disk(str(saved))
    parts = whole.train_test_split(test_size=40, seed=0, stratify_by_column="label")
    parts.save_to_disk(str(tmp_path / "split"))
    run("train", "data=hf_dataset", f"data.path={tmp_path / 'split'}", f"data.root={tmp_path / 'store'}", *ARGS, f"hydra.run.dir={tmp_path / 'run'}")
    tested = list(csv.DictReader(open(tmp_path / "run" / "test_predictions.csv")))
    skipped_test = [r for r in csv.DictReader(open(tmp_path / "run" / "skipped_images.csv")) if "/test/" in r["path"]]
    assert len(tested) + len(skipped_test) == 40 and all("/test/" in r["path"] for r in tested)  # the dataset's own test split
    from transferlab.core.errors import DataError

    with pytest.raises(DataError, match="has the columns image, label, not 'image' and 'labels'; set them"):
        run(
            "train",
            "data=hf_dataset",
            f"data.path={saved}",
            "data.label_column=labels",
            f"data.root={tmp_path / 's2'}",
            *FAST,
            f"hydra.run.dir={tmp_path / 'bad'}",
        )
