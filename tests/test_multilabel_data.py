"""Multi-label data, no training: the index file (CSV, JSON lines, its errors, its split column), image_folder's
merged copies, hf_dataset's sequence columns, Pascal VOC 2007 (labels, difficult objects, the official test list),
and the iterative-stratified folds on the real-photo canvases (tests/canvases.py)."""

from __future__ import annotations

import io
import json
import logging
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from canvases import VOC_OBJECTS, load_metadata, write_canvases, write_two_animal_canvas, write_voc_folder
from conftest import make_datamodule, require_shared
from transferlab.core.errors import ConfigError, DataError
from transferlab.data.folds import fold_splits
from transferlab.data.labels import counts
from transferlab.data.preprocessing import Preprocessing
from transferlab.data.stored_splits import counts as table_counts
from transferlab.data.voc2007 import CLASSES


def jpeg(path: Path, colour: tuple[int, int, int] = (90, 120, 150), size: tuple[int, int] = (24, 16)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, colour).save(path, quality=90)
    return path


def images(root: Path, n: int) -> list[str]:
    """n small JPEGs of distinct colours under root/img; their paths relative to root."""
    return [jpeg(root / "img" / f"{i:03d}.jpg", (10 * i % 256, 255 - 7 * i % 256, 40)).relative_to(root).as_posix() for i in range(n)]


def index_module(tmp_path: Path, index: Path | str, task: str = "multilabel", **values):
    values = {"root": str(tmp_path / "data"), "cache_dir": str(tmp_path / "cache"), **values}
    dm = make_datamodule("image_index", index=str(index), task=task, **values)
    dm.preprocessing = Preprocessing()
    return dm


def write_csv(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


# -- data=image_index ----------------------------------------------------------------------------------------------------
def test_a_csv_index_gives_label_sets_and_its_test_rows_are_the_test_set(tmp_path, caplog):
    files = images(tmp_path / "data", 12)
    rows = ["path,labels,split"]
    for i, f in enumerate(files):
        labels = ["cat;dog", "dog", "cat", ""][i % 4]
        rows.append(f"{f},{labels},{'test' if i >= 9 else ('val' if i == 0 else '')}")
    rows.append(f"{tmp_path / 'data' / files[0]}x,cat,")  # an absolute path to a file that is not there
    index = write_csv(tmp_path / "data" / "index.csv", "\n".join(rows) + "\n")
    dm = index_module(tmp_path, index)
    found = dm.discover()
    assert found.class_names == ["cat", "dog"]
    assert [label for _, label in found.samples][:4] == [(0, 1), (1,), (0,), ()]
    assert [p.name for p, _ in found.test_samples] == ["009.jpg", "010.jpg", "011.jpg"]
    with caplog.at_level(logging.INFO, logger="transferlab"):
        dm.setup()
    assert sorted(p.name for p, _ in dm.splits["test"]) == ["009.jpg", "010.jpg", "011.jpg"]  # the split column, as given
    assert "not used" in caplog.text  # the row marked val is hash-split like the others
    unlabelled = sum(1 for split in dm.splits.values() for _, label in split if label == ())
    assert unlabelled == 3 and "Images with none of the labels" in caplog.text  # kept and counted
    assert list(dm.skipped) == [f"{tmp_path / 'data' / files[0]}x"]  # missing file: reported, not fatal
    assert sum(map(len, dm.splits.values())) == 12


def test_a_single_label_index_and_json_lines(tmp_path, monkeypatch):
    files = images(tmp_path / "data", 6)
    write_csv(tmp_path / "data" / "single.csv", "path,label\n" + "".join(f"{f},{'bird' if i % 2 else 'ant'}\n" for i, f in enumerate(files)))
    monkeypatch.chdir(tmp_path)  # a relative data.index: the current directory first, then data.root
    dm = index_module(tmp_path, "single.csv", task="single")
    found = dm.discover()
    assert found.class_names == ["ant", "bird"] and [label for _, label in found.samples] == [0, 1, 0, 1, 0, 1] and found.test_samples is None
    lines = [
        {"path": files[0], "labels": ["b", "a"]},
        {"path": files[1], "labels": "a;c", "split": "test"},
        {"path": files[2], "labels": []},
        {"path": files[3], "labels": None, "extra": 1},
    ]
    write_csv(tmp_path / "data" / "index.jsonl", "\n".join(json.dumps(line) for line in lines) + "\n\n")
    found = index_module(tmp_path, "index.jsonl").discover()
    assert found.class_names == ["a", "b", "c"]
    assert [label for _, label in found.samples] == [(0, 1), (), ()] and found.test_samples == [(tmp_path / "data" / files[1], (0, 2))]
    # data.root left null: the index file's own folder
    alone = make_datamodule("image_index", index=str(tmp_path / "data" / "index.jsonl"), task="multilabel", cache_dir=str(tmp_path / "c"))
    assert alone.root == tmp_path / "data" and alone.discover().class_names == ["a", "b", "c"]


@pytest.mark.parametrize(
    "text,task,error,message",
    [
        (None, "multilabel", DataError, r"data.index: no index file at .*missing.csv"),
        ("file,labels\na.jpg,x\n", "multilabel", DataError, r"has no 'path' column \(found: file, labels\); data.task=multilabel needs"),
        ("path,labels\na.jpg,x\n", "single", ConfigError, r"has a 'labels' column but no 'label' column .*set data.task=multilabel"),
        ("path,label\na.jpg,x\n", "multilabel", ConfigError, r"has a 'label' column but no 'labels' column .*set data.task=single"),
        ("path,tags\na.jpg,x\n", "single", DataError, r"no 'label' column \(found: path, tags\); data.task=single needs the columns path and label"),
        ("path,labels\nimg/000.jpg,x\n ,y\n", "multilabel", DataError, r"index.csv row 3: empty path"),
        ("path,labels\nimg/000.jpg,x\nimg/001.jpg,y\n./img/000.jpg,y\n", "multilabel", DataError, r"rows 2 and 4 both list"),
        ("path,labels\nimg/000.jpg,x\nimg/001.jpg,x;\n", "multilabel", DataError, r"names 1 labels \(x\); expected at least 2"),
        ("path,label\nimg/000.jpg,x\nimg/001.jpg,\n", "single", DataError, r"row 3: blank label"),
        ("path,labels,split\nimg/000.jpg,x,test\nimg/001.jpg,y,holdout\n", "multilabel", DataError, r"row 3: split 'holdout'"),
    ],
)
def test_index_errors_are_one_line_naming_file_and_row(tmp_path, text, task, error, message):
    images(tmp_path / "data", 2)
    index = tmp_path / "data" / ("missing.csv" if text is None else "index.csv")
    if text is not None:
        write_csv(index, text)
    with pytest.raises(error, match=message) as info:
        index_module(tmp_path, index, task=task).setup()
    assert "\n" not in str(info.value)


# -- data=image_folder, data=hf_dataset ----------------------------------------------------------------------------------
def test_image_folder_multilabel_merges_copies_of_one_file(tmp_path, caplog):
    for folder in ("cat", "dog"):
        jpeg(tmp_path / folder / "both.jpg")
    jpeg(tmp_path / "cat" / "only_cat.jpg")
    jpeg(tmp_path / "dog" / "sub" / "only_dog.jpg")
    jpeg(tmp_path / "cat" / "odd.jpg")
    jpeg(tmp_path / "dog" / "odd.jpg", (1, 2, 3), (40, 30))  # another picture under the same name
    multi = make_datamodule("image_folder", root=str(tmp_path), task="multilabel", cache_dir=str(tmp_path / ".c"))
    with caplog.at_level(logging.WARNING, logger="transferlab"):
        found = multi.discover()
    named = {p.relative_to(tmp_path).as_posix(): label for p, label in found.samples}
    assert named == {"cat/both.jpg": (0, 1), "cat/only_cat.jpg": (0,), "cat/odd.jpg": (0, 1), "dog/sub/only_dog.jpg": (1,)}
    assert "1 copy(ies) of the same file name differ in size" in caplog.text and "odd.jpg" in caplog.text
    single = make_datamodule("image_folder", root=str(tmp_path), cache_dir=str(tmp_path / ".c")).discover()
    assert len(single.samples) == 6 and all(isinstance(label, int) for _, label in single.samples)  # as before: one file, one class


def _jpeg_bytes(colour: tuple[int, int, int]) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (20, 20), colour).save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


def test_hf_dataset_multilabel_columns(tmp_path):
    datasets = pytest.importorskip("datasets")
    pictures = [{"bytes": _jpeg_bytes((30 * i, 80, 200 - 30 * i)), "path": f"p{i}.jpg"} for i in range(5)]

    def saved(name: str, labels: list, feature) -> str:
        features = datasets.Features({"image": datasets.Image(), "labels": feature})
        datasets.Dataset.from_dict({"image": pictures, "labels": labels}, features=features).save_to_disk(str(tmp_path / name))
        return str(tmp_path / name)

    def module(path: str, task: str):
        return make_datamodule("hf_dataset", path=path, label_column="labels", task=task, root=str(tmp_path / "store"), cache_dir=str(tmp_path / "c"))

    class_labels = saved("ids", [[0, 2], [1], [], [2, 1], [0]], datasets.Sequence(datasets.ClassLabel(names=["zebra", "ant", "cow"])))
    found = module(class_labels, "multilabel").discover()
    assert found.class_names == ["zebra", "ant", "cow"]  # the ClassLabel's own order
    assert [label for _, label in found.samples] == [(0, 2), (1,), (), (1, 2), (0,)]
    again = module(class_labels, "multilabel").discover()  # from the written store (samples.json)
    assert [label for _, label in again.samples] == [label for _, label in found.samples]
    strings = saved("names", [["dog", "cat"], ["cat"], [], ["bird"], ["dog"]], datasets.Sequence(datasets.Value("string")))
    found = module(strings, "multilabel").discover()
    assert found.class_names == ["bird", "cat", "dog"] and [label for _, label in found.samples] == [(1, 2), (1,), (), (0,), (2,)]
    with pytest.raises(ConfigError, match=r"holds a list of labels per image .*; set data.task=multilabel$"):
        module(strings, "single").discover()
    plain = saved("plain", [0, 1, 1, 0, 1], datasets.ClassLabel(names=["cat", "dog"]))
    assert [label for _, label in module(plain, "multilabel").discover().samples] == [(0,), (1,), (1,), (0,), (1,)]
    assert [label for _, label in module(plain, "single").discover().samples] == [0, 1, 1, 0, 1]  # the same store, as before


# -- data=voc2007 --------------------------------------------------------------------------------------------------------
def voc_module(tmp_path: Path, root: Path, **values):
    dm = make_datamodule("voc2007", root=str(root), download=False, cache_dir=str(tmp_path / "cache"), **values)
    dm.preprocessing = Preprocessing()
    return dm


def expected_voc(ids: list[str]) -> tuple[list[tuple[int, ...]], np.ndarray]:
    """The label sets and the ignore mask VOC_OBJECTS means, by hand: any object = label; all difficult = ignored."""
    labels, mask = [], np.ones((len(ids), 20), dtype=np.int64)
    for row, image_id in enumerate(ids):
        objects = VOC_OBJECTS[image_id][0]
        labels.append(tuple(sorted({CLASSES.index(n) for n, _ in objects})))
        for name in {n for n, _ in objects}:
            if all(d for n, d in objects if n == name):
                mask[row, CLASSES.index(name)] = 0
    return labels, mask


def test_voc2007_labels_difficult_objects_and_the_official_test_list(tmp_path, caplog):
    voc = write_voc_folder(tmp_path / "voc")
    dm = voc_module(tmp_path, tmp_path / "voc")
    assert dm.multilabel and dm.is_present()
    with caplog.at_level(logging.INFO, logger="transferlab"):
        dm.setup()
    assert dm.class_names == list(CLASSES) and CLASSES[0] == "aeroplane" and CLASSES[-1] == "tvmonitor"
    test_ids = [i for i, (_, listed) in VOC_OBJECTS.items() if listed == "test"]
    assert [p.stem for p, _ in dm.splits["test"]] == test_ids
    pool = sorted(dm.splits["train"] + dm.splits["val"], key=lambda s: s[0].stem)
    assert [p.stem for p, _ in pool] == [i for i, (_, listed) in VOC_OBJECTS.items() if listed == "trainval"]
    for samples in (pool, dm.splits["test"]):
        labels, mask = expected_voc([p.stem for p, _ in samples])
        assert [label for _, label in samples] == labels
        assert np.array_equal(dm.ignore_mask(samples), mask)
    chair, person = CLASSES.index("chair"), CLASSES.index("person")
    assert dm.difficult_only[str((voc / "JPEGImages" / "000003.jpg").resolve())] == (chair,)
    assert dm.difficult_only[str((voc / "JPEGImages" / "000004.jpg").resolve())] == (person,)  # car: one easy object
    assert str((voc / "JPEGImages" / "000001.jpg").resolve()) not in dm.difficult_only
    assert "Images with none of the labels" in caplog.text  # 000012: no object of the 20 classes
    # data.root at VOC2007 itself: the same photos, the same split (hashed by image id)
    direct = voc_module(tmp_path, voc)
    direct.setup()
    assert {k: [p.stem for p, _ in v] for k, v in direct.splits.items()} == {k: [p.stem for p, _ in v] for k, v in dm.splits.items()}


def test_voc2007_bad_annotations_are_skipped_and_single_label_refused(tmp_path):
    voc = write_voc_folder(tmp_path / "voc")
    (voc / "Annotations" / "000002.xml").write_text("<annotation><object><name>train</name>")  # truncated XML
    (voc / "Annotations" / "000009.xml").unlink()
    dm = voc_module(tmp_path, tmp_path / "voc")
    dm.setup()
    assert {Path(p).stem for p in dm.skipped} == {"000002", "000009"} and "annotation 000002.xml" in dm.skipped[
        str(voc / "JPEGImages" / "000002.jpg")
    ]
    assert "000009" not in [p.stem for p, _ in dm.splits["test"]] and len(dm.splits["test"]) == 2
    with pytest.raises(Exception) as info:  # Hydra's InstantiationException around it; the commands raise the cause (exit 2)
        voc_module(tmp_path, tmp_path / "voc", task="single")
    assert isinstance(info.value.__cause__, ConfigError)
    assert str(info.value.__cause__).startswith("data.task=single: Pascal VOC 2007 photos hold several object classes each")
    with pytest.raises(DataError, match="no dataset found"):
        voc_module(tmp_path, tmp_path / "empty").setup()
    (voc / "ImageSets" / "Main" / "test.txt").unlink()  # only the trainval part: with download on, the test part is fetched
    assert voc_module(tmp_path, tmp_path / "voc").is_present() and not make_datamodule("voc2007", root=str(tmp_path / "voc")).is_present()


# -- the real-photo canvases, iterative stratification --------------------------------------------------------------------
@pytest.fixture(scope="module")
def canvases(tmp_path_factory) -> Path:
    require_shared()
    out = tmp_path_factory.mktemp("canvases")
    write_canvases(out, seed=0, per_split={"train": 240, "test": 60}, size=96, task="breeds")
    return out


@pytest.mark.shared
def test_canvases_hold_held_out_photos_only_in_the_test_rows(canvases, tmp_path):
    meta = load_metadata(canvases)
    train, test = set(meta["photos"]["train"]), set(meta["photos"]["test"])
    assert len(train) == 259 and len(test) == 111 and not train & test  # 7 + 3 of each breed's 10
    rows = meta["canvases"]
    assert all(set(r["photos"]) <= (test if r["split"] == "test" else train) for r in rows)
    assert sum(r["split"] == "test" for r in rows) == 60 and len(rows) == 300
    together = sum(r["species"] == ["cat", "dog"] for r in rows) / len(rows)
    assert 0.2 <= together <= 0.5 and any(len(r["photos"]) == 1 for r in rows)
    breeds = {k: {name.rsplit("_", 1)[0] for name in v} for k, v in meta["photos"].items()}
    assert breeds["train"] == breeds["test"] and len(breeds["test"]) == 37  # every breed on both sides of the photo split
    with Image.open(canvases / rows[0]["path"]) as img:
        assert img.size == (96, 96) and img.mode == "RGB"
    assert (canvases / "index_species.csv").read_text().splitlines()[0] == "path,labels,split"
    two = write_two_animal_canvas(tmp_path / "two.jpg", seed=0, size=96)
    assert set(two["photos"]) <= test and two["species"] == ["cat", "dog"] and Path(two["path"]).is_file()


@pytest.mark.shared
def test_iterative_stratified_folds_test_every_label_in_every_fold(canvases, tmp_path):
    dm = index_module(tmp_path, canvases / "index_breeds.csv", root=str(canvases))
    dm.setup()
    assert len(dm.class_names) == 37 and len(dm.splits["test"]) == 60 and dm.has_official_test
    folds = fold_splits(dm.pool, dm.class_names, 3, seed=0, val_fraction=0.15)
    frequent = {k for k, n in enumerate(counts([label for _, label in dm.pool], 37)) if n >= 3}
    assert len(frequent) == 37
    for fold in folds:
        assert {k for _, label in fold["test"] for k in label} >= frequent
        assert not {str(p) for p, _ in fold["test"]} & {str(p) for p, _ in fold["train"] + fold["val"]}
    assert sorted(str(p) for fold in folds for p, _ in fold["test"]) == sorted(str(p) for p, _ in dm.pool)  # each out-of-fold once
    table = dm.split_table()
    assert table_counts(table) == {split: len(dm.splits[split]) for split in ("train", "val", "test")}
    assert {row[0] for row in table["rows"] if row[1] == "test"} == {r["path"] for r in load_metadata(canvases)["canvases"] if r["split"] == "test"}
    species = index_module(tmp_path, canvases / "index_species.csv", root=str(canvases))
    species.setup()
    assert species.class_names == ["cat", "dog"] and {label for _, label in species.usable} == {(0,), (1,), (0, 1)}
