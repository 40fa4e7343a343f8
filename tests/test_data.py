"""Data pieces: label parsing, splits, integrity scan, safe extraction, download from a local server."""

from __future__ import annotations

import zipfile
from pathlib import Path

import pytest

from conftest import PETS, make_datamodule, make_small_copy, pet_photos
from transferlab.core.errors import DataError
from transferlab.core.files import sha256_of
from transferlab.data.download import download_file, safe_extract_zip
from transferlab.data.integrity import scan_images
from transferlab.data.oxford_pets import OxfordPetsDataModule, breed_of, species_of
from transferlab.data.preprocessing import Preprocessing
from transferlab.data.splits import hash_split, hash_unit, split_key, stratified_split


def test_oxford_labels_from_file_names():
    assert breed_of("Abyssinian_101") == "Abyssinian" and species_of("Abyssinian") == "cat"
    assert breed_of("american_pit_bull_terrier_12") == "american_pit_bull_terrier"
    assert species_of("yorkshire_terrier") == "dog"


@pytest.mark.shared
@pytest.mark.parametrize("task,classes", [("breeds", 37), ("species", 2)])
def test_oxford_sample_splits_are_by_hash_disjoint_and_cover_every_class(tmp_path, task, classes):
    dm = make_datamodule("oxford_pets", root=str(PETS), task=task, download=False, cache_dir=str(tmp_path), split_seed=3, test_fraction=0.2)
    dm.preprocessing = Preprocessing()
    dm.setup()
    assert len(dm.class_names) == classes
    paths = {k: {str(p) for p, _ in v} for k, v in dm.splits.items()}
    assert sum(map(len, paths.values())) == 370 and not (paths["train"] & paths["val"] or paths["train"] & paths["test"])
    for split in ("train", "val", "test"):  # every class of 3+ images has each split (small classes get their nearest image)
        assert {label for _, label in dm.splits[split]} == set(range(classes)), split
    assert 50 <= len(dm.splits["test"]) <= 100 and 30 <= len(dm.splits["val"]) <= 80  # 20 % and 15 % of 370, by hash
    if task == "breeds":
        assert dm.class_names[0] == "Abyssinian" and "American Pit Bull Terrier" in dm.class_names
    key = {str(p): hash_unit(split_key(p, PETS), 3) for p in paths["test"] | paths["train"]}
    assert sum(key[p] < 0.2 for p in paths["test"]) >= len(paths["test"]) - classes  # by hash, but for the rescued images
    assert all(key[p] >= 0.35 for p in paths["train"])  # nothing below the train band is trained on
    again = make_datamodule("oxford_pets", root=str(PETS), task=task, download=False, cache_dir=str(tmp_path), split_seed=3, test_fraction=0.2)
    again.preprocessing = Preprocessing()
    again.setup()
    assert again.splits == dm.splits  # a function of (split_seed, paths)


def test_stratified_split_small_classes():
    train, val, test = stratified_split([0] * 3 + [1] * 20, 0.1, 0.1, seed=0)
    assert len(test) == 1 + 2 and len(val) == 1 + 2 and len(train) == 1 + 16


def test_hash_split_never_moves_a_file_when_others_come_or_go():
    root = Path("/data")

    def key(path: Path) -> str:
        return split_key(path, root)

    files = [(root / f"c{c}" / f"{i}.jpg", c) for c, n in enumerate((1, 2, 3, 40, 200)) for i in range(n)]
    split = hash_split(files, key, 0.15, 0.15, seed=7)
    where = {str(p): s for s, items in split.items() for p, _ in items}
    assert {label for _, label in split["train"]} == {0, 1, 2, 3, 4}  # a 1- or 2-image class keeps its images in train
    assert all({label for _, label in split[s]} >= {2, 3, 4} for s in ("val", "test"))  # 3+ images: one in every split
    more = files + [(root / "c4" / f"new{i}.jpg", 4) for i in range(30)]
    fewer = [s for s in more if s[0].name not in {f"{i}.jpg" for i in range(0, 200, 20)} or s[1] != 4]
    for changed in (more, fewer):
        after = {str(p): s for s, items in hash_split(changed, key, 0.15, 0.15, seed=7).items() for p, _ in items}
        assert all(after[p] == where[p] for p in after if p in where)
    other_seed = {str(p): s for s, items in hash_split(files, key, 0.15, 0.15, seed=8).items() for p, _ in items}
    assert other_seed != where


@pytest.mark.shared
def test_official_lists_are_used(tmp_path):
    images = tmp_path / "pets" / "images"
    photos = [p for p in sorted(PETS.glob("*.jpg")) if breed_of(p.stem) in ("Bengal", "boxer")]
    for p in photos:
        make_small_copy(p, images / p.name, 48)
    (tmp_path / "pets" / "annotations").mkdir()
    test_list = [p.stem for p in photos[::5]]
    (tmp_path / "pets" / "annotations" / "test.txt").write_text("".join(f"{s} 1 1 1\n" for s in test_list))
    (tmp_path / "pets" / "annotations" / "trainval.txt").write_text("".join(f"{p.stem} 1 1 1\n" for p in photos if p.stem not in test_list))
    dm = make_datamodule("oxford_pets", root=str(tmp_path / "pets"), download=False, cache_dir=str(tmp_path / "c"))
    dm.preprocessing = Preprocessing()
    dm.setup()
    assert sorted(p.stem for p, _ in dm.splits["test"]) == sorted(test_list)
    assert dm.class_names == ["Bengal", "Boxer"]


def corrupt_files(folder: Path) -> list[Path]:
    """Zero-byte, truncated and text-named-.jpg files, as in the real Cats-vs-Dogs archive."""
    folder.mkdir(parents=True, exist_ok=True)
    empty, truncated, text = folder / "666.jpg", folder / "11702.jpg", folder / "notes.jpg"
    empty.write_bytes(b"")
    truncated.write_bytes(next(PETS.glob("*.jpg")).read_bytes()[:3000])
    text.write_text("this is not an image\n")
    return [empty, truncated, text]


def test_integrity_scan_reports_and_caches(tmp_path):
    good = []
    for src in pet_photos(True, 4):
        make_small_copy(src, tmp_path / "imgs" / src.name)
        good.append(tmp_path / "imgs" / src.name)
    bad = corrupt_files(tmp_path / "imgs")
    files = sorted(good + bad)
    report = scan_images(files, tmp_path / "imgs", tmp_path / "cache")
    assert sorted(report.bad) == sorted(map(str, bad)) and sorted(report.good) == sorted(good)
    assert report.checked == 7 and all(p.exists() for p in bad)
    assert "truncated" in report.bad[str(bad[1])].lower()
    again = scan_images(files, tmp_path / "imgs", tmp_path / "cache")
    assert again.checked == 0 and again.bad == report.bad
    bad[0].write_bytes(good[0].read_bytes())  # repaired file is re-checked
    third = scan_images(files, tmp_path / "imgs", tmp_path / "cache")
    assert third.checked == 1 and str(bad[0]) not in third.bad


def test_shuffle_order_is_a_function_of_seed_and_epoch():
    from transferlab.data.sampling import EpochRandomSampler

    sampler = EpochRandomSampler(list(range(50)), seed=5)
    orders = [list(sampler) for _ in range(3)]  # a plain loop without Lightning: each pass is the next epoch
    assert len({tuple(o) for o in orders}) == 3 and all(sorted(o) == list(range(50)) for o in orders)
    for epoch, order in enumerate(orders):  # what Lightning (or a resumed run) asks for
        sampler.set_epoch(epoch)
        assert list(sampler) == order
    assert list(EpochRandomSampler(list(range(50)), seed=6)) != orders[0]


def test_safe_extract_refuses_traversal(tmp_path):
    evil = tmp_path / "evil.zip"
    with zipfile.ZipFile(evil, "w") as zf:
        zf.writestr("PetImages/Cat/1.jpg", b"x")
        zf.writestr("../escaped.txt", b"owned")
    with pytest.raises(DataError, match="unsafe member"):
        safe_extract_zip(evil, tmp_path / "out")
    assert not (tmp_path / "escaped.txt").exists()


def make_cats_dogs_zip(path: Path, n: int = 4) -> None:
    with zipfile.ZipFile(path, "w") as zf:
        for folder, is_cat in (("Cat", True), ("Dog", False)):
            for i, src in enumerate(pet_photos(is_cat, n)):
                tmp = path.parent / f"{folder}{i}.jpg"
                make_small_copy(src, tmp, 64)
                zf.write(tmp, f"PetImages/{folder}/{i}.jpg")
                tmp.unlink()


def test_download_verifies_checksum(tmp_path, http_server):
    www, url = http_server
    make_cats_dogs_zip(www / "cats.zip")
    digest = sha256_of(www / "cats.zip")
    with pytest.raises(DataError, match="checksum mismatch"):
        download_file(f"{url}/cats.zip", tmp_path / "a" / "cats.zip", sha256="0" * 64)
    assert not (tmp_path / "a" / "cats.zip").exists()
    assert download_file(f"{url}/cats.zip", tmp_path / "b" / "cats.zip", sha256=digest).is_file()
    with pytest.raises(DataError, match="could not download"):
        download_file(f"{url}/missing.zip", tmp_path / "c" / "missing.zip")


def test_cats_dogs_downloads_from_local_server(tmp_path, http_server):
    www, url = http_server
    make_cats_dogs_zip(www / "kagglecatsanddogs.zip")
    root = tmp_path / "cd"
    dm = make_datamodule(
        "cats_dogs",
        root=str(root),
        url=f"{url}/kagglecatsanddogs.zip",
        sha256=sha256_of(www / "kagglecatsanddogs.zip"),
        cache_dir=str(tmp_path / "cache"),
        val_fraction=0.25,
        test_fraction=0.25,
    )
    dm.preprocessing = Preprocessing(input_size=32)
    dm.setup()
    assert dm.class_names == ["cat", "dog"] and sum(map(len, dm.splits.values())) == 8
    assert (root / "PetImages" / "Dog" / "3.jpg").is_file()
    images, labels = next(iter(dm.train_dataloader()))
    assert images.shape[1:] == (3, 32, 32)


def test_missing_root_without_download_is_one_clear_line(tmp_path):
    dm = make_datamodule("oxford_pets", root=str(tmp_path / "nowhere"), download=False)
    with pytest.raises(DataError, match=r"data.root: no dataset found at .*nowhere \(no such folder\); expected images/.*; set data.root="):
        dm.setup()


def test_a_failed_setup_leaves_no_splits_so_a_retry_fails_the_same_way(tmp_path):
    """setup() used to store its splits before checking them: a second setup() then returned with empty splits."""
    for label in ("cat", "dog"):
        (tmp_path / "images" / label).mkdir(parents=True)
        (tmp_path / "images" / label / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not an image")
    dm = make_datamodule("image_folder", root=str(tmp_path / "images"), cache_dir=str(tmp_path / "cache"))
    dm.preprocessing = Preprocessing(input_size=32)
    for _ in range(2):
        with pytest.raises(DataError, match="none of the 2 file"):
            dm.setup()
        assert dm.splits == {} and dm.class_names == []


def test_failed_download_says_how_to_point_at_local_copy(tmp_path, monkeypatch):
    # The real download code, aimed at a closed port on this machine: fails the same way everywhere.
    dead = tuple((f"http://127.0.0.1:9/{Path(url).name}", md5) for url, md5 in OxfordPetsDataModule.resources)
    monkeypatch.setattr(OxfordPetsDataModule, "resources", dead)
    dm = make_datamodule("oxford_pets", root=str(tmp_path / "pets"), download=True)
    with pytest.raises(DataError, match=r"download failed .* set data.root="):
        dm.setup()


def test_progress_bars_count_images_on_a_terminal_and_stay_out_of_pipes(monkeypatch, capsys):
    from transferlab.core.progress import progress

    batches = [(list(range(4)), "labels")] * 3
    monkeypatch.setenv("TRANSFERLAB_PROGRESS", "always")  # as on a terminal
    assert list(progress(iter(batches), 12, "Computing features", size=lambda b: len(b[0]))) == batches
    shown = capsys.readouterr().err
    assert "Computing features" in shown and "12/12" in shown
    monkeypatch.setenv("TRANSFERLAB_PROGRESS", "auto")  # pytest's captured stderr is a pipe, not a terminal
    assert list(progress(iter(batches), 12, "Computing features")) == batches
    assert capsys.readouterr().err == ""
