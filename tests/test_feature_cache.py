"""The feature cache at real sizes: self-checking shards, resumable fills, concurrent runs filling a store once."""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from conftest import FAST, PETS, SPECIES_RUN, cli_env, run, run_cli
from transferlab.data.features import (
    LIBRARIES,
    Extractor,
    FeatureStore,
    FillSettings,
    Inputs,
    describe,
    file_sha256,
    fill_features,
    fingerprint,
    image_key,
    library_versions,
    weights_digest,
)

ROWS = np.random.default_rng(0).standard_normal((12, 8)).astype(np.float32)
KEYS = [f"img{i}" for i in range(12)]


def overwrite_middle(path: Path, size: int = 4096) -> None:
    """4 KiB of the file's middle overwritten (a bad disk sector, a stray write): same length, other bytes."""
    data = bytearray(path.read_bytes())
    start = max(128, len(data) // 2 - size // 2)
    data[start : start + size] = bytes((b + 1) % 256 for b in data[start : start + size])
    path.write_bytes(bytes(data))


def test_a_shard_whose_bytes_changed_is_discarded_once_and_its_rows_computed_again(tmp_path, caplog):
    store = FeatureStore(tmp_path, "s")
    store.add(KEYS[:6], ROWS[:6], "a")
    store.add(KEYS[6:], ROWS[6:], "b")
    meta = json.loads((tmp_path / "s" / "b.keys.json").read_text())
    assert meta["rows"] == 6 and meta["sha256"] == file_sha256(tmp_path / "s" / "b.npy")
    overwrite_middle(tmp_path / "s" / "b.npy", size=64)
    with caplog.at_level(logging.WARNING):
        reopened = FeatureStore(tmp_path, "s")
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "b.npy" in warnings[0] and "checksum" in warnings[0], warnings
    assert reopened.missing(KEYS) == KEYS[6:]
    assert (tmp_path / "s" / "b.npy.corrupt").is_file()  # set aside, not deleted
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        again = FeatureStore(tmp_path, "s")
    assert not caplog.records and again.missing(KEYS) == KEYS[6:]  # warned about once
    again.add(KEYS[6:], ROWS[6:], "c")
    np.testing.assert_array_equal(FeatureStore(tmp_path, "s").stack(KEYS), ROWS)


def test_rows_with_nan_or_inf_are_never_stored_nor_used(tmp_path, caplog):
    bad = ROWS.copy()
    bad[2, 3], bad[5, 0] = np.nan, np.inf
    store = FeatureStore(tmp_path, "s")
    assert store.add(KEYS, bad, "a") == 2
    assert store.missing(KEYS) == ["img2", "img5"]
    memory = FeatureStore(None, "m")
    assert memory.add(KEYS, bad, "a") == 2 and memory.missing(KEYS) == ["img2", "img5"]
    # a shard written by someone else with NaN rows and a valid checksum: the rows are left out when it is opened
    import io

    buffer = io.BytesIO()
    np.save(buffer, bad)
    (tmp_path / "s2").mkdir()
    (tmp_path / "s2" / "x.npy").write_bytes(buffer.getvalue())
    import hashlib

    meta = {"keys": KEYS, "rows": 12, "sha256": hashlib.sha256(buffer.getvalue()).hexdigest()}
    (tmp_path / "s2" / "x.keys.json").write_text(json.dumps(meta))
    with caplog.at_level(logging.WARNING):
        opened = FeatureStore(tmp_path, "s2")
    assert opened.missing(KEYS) == ["img2", "img5"] and any("NaN or inf" in r.getMessage() for r in caplog.records)


def test_fingerprint_changes_with_each_library_version():
    """A new torch, torchvision, timm or Pillow can change the features: each version is part of the fingerprint."""
    import PIL
    import timm
    import torchvision

    from transferlab.models.backbones import create_backbone

    backbone = create_backbone("tf_efficientnet_lite0", weights="none")
    prep = backbone.preprocessing
    inputs, digest = Inputs(prep.eval_transform(), prep.decode_size(None)), weights_digest(backbone.body)
    installed = library_versions()
    assert installed == {
        "torch": installed["torch"],
        "torchvision": torchvision.__version__.split("+")[0],
        "timm": timm.__version__,
        "Pillow": PIL.__version__,
    }
    base = fingerprint(**describe(backbone, inputs, "32-true", digest, installed))
    assert base == fingerprint(**describe(backbone, inputs, "32-true", digest))  # by default: the installed versions
    for name in LIBRARIES:
        assert fingerprint(**describe(backbone, inputs, "32-true", digest, {**installed, name: f"{installed[name]}.post1"})) != base, name
    assert describe(backbone, inputs, "32-true", digest, installed)["versions"] == installed  # in fingerprint.json, for a reader


def test_the_fill_writes_shards_of_the_set_size_with_every_view(tiny_folder, tmp_path):
    """fill_features: `shard_images` rows per shard (the last one the rest), K views per image in [N, K, D], the
    rows of each key where a plain pass over the same inputs puts them, and the caller's random stream untouched."""
    import torch

    from transferlab.core.hardware import forward_context
    from transferlab.data.features import FeatureDataset, ViewsDataset
    from transferlab.data.images import ImageDataset
    from transferlab.models.backbones import create_backbone

    backbone = create_backbone("tf_efficientnet_lite0", weights="none", input_size=64)
    prep = backbone.preprocessing
    samples = sorted((p, int(p.parent.name == "dog")) for p in tiny_folder.rglob("*.jpg"))[:10]
    keys = [image_key(p) for p, _ in samples]
    augment = {"scale_min": 0.5, "hflip": True}
    inputs = Inputs(prep.train_transform(augment), prep.decode_size(augment), views=2, seed=5)
    store = FeatureStore(tmp_path, "views")
    extractor = Extractor(backbone, torch.device("cpu"), forward_context("32-true", torch.device("cpu")))
    torch.manual_seed(0)
    expected_draw = torch.rand(3)
    torch.manual_seed(0)
    fill = fill_features(store, samples, keys, inputs, extractor, FillSettings(batch_size=6, shard_images=4, workers=0), "train-{}-r0")
    assert torch.equal(torch.rand(3), expected_draw)
    assert fill.computed == 10 and sorted(fill.key_seconds) == sorted(keys) and fill.seconds > 0
    shards = [np.load(p) for p in sorted(tmp_path.joinpath("views").glob("train-*-r0.npy"))]
    assert sorted(len(a) for a in shards) == [2, 4, 4] and {a.shape[1:] for a in shards} == {(2, 1280)}
    assert not np.allclose(shards[0][:, 0], shards[0][:, 1])  # two different augmented views
    views = ViewsDataset(ImageDataset(samples, inputs.transform, inputs.decode_size), keys, 2, 5)
    with torch.no_grad():
        direct = backbone.eval()(views[7][0]).numpy()
    np.testing.assert_allclose(store.stack([keys[7]])[0], direct, atol=1e-4)
    dataset = FeatureDataset(FeatureStore(tmp_path, "views"), keys, [y for _, y in samples])
    assert len(dataset) == 10 and dataset.labels == [y for _, y in samples] and dataset[7][0].shape == (1280,)


def test_an_audit_and_a_frozen_run_share_one_store_and_the_shard_size(tiny_folder, tmp_path):
    """The audit fills the store a frozen training run reads (one fill loop, one fingerprint), with the shard size of
    performance.feature_cache; the training run after it computes nothing."""
    cache, settings = tmp_path / "cache", ["backbone.input_size=64", "data.num_workers=0"]
    run_cli(
        "audit",
        "data=image_folder",
        f"data.root={tiny_folder}",
        "folds=2",
        "precision=32-true",
        "+performance=default",
        "performance.feature_cache.shard_images=6",
        f"paths.cache_dir={cache}",
        *settings,
        f"hydra.run.dir={tmp_path / 'audit'}",
    )
    (store,) = (cache / "features").iterdir()
    rows = sorted(json.loads(p.read_text())["rows"] for p in store.glob("eval-*-audit.keys.json"))
    assert rows == [4, 6, 6]  # 16 images, a shard every 6
    stats = _tiny_run(tiny_folder, cache, tmp_path / "train", "trainer.precision=32-true")
    assert computed(stats) == 0 and stats["train"]["store"] == str(store)


def _tiny_run(tiny_folder: Path, cache: Path, out: Path, *extra: str) -> dict:
    run(
        "train",
        "data=image_folder",
        f"data.root={tiny_folder}",
        "trainer.max_epochs=1",
        f"paths.cache_dir={cache}",
        "logger=none",
        "interpret.enabled=false",
        "performance.feature_cache.shard_images=4",
        *FAST,
        *extra,
        f"hydra.run.dir={out}",
    )
    return json.loads((out / "feature_cache.json").read_text())


def computed(stats: dict) -> int:
    return sum(v["computed"] for v in stats.values() if isinstance(v, dict))


def test_flipped_bytes_in_a_shard_give_one_warning_and_the_clean_runs_predictions(tiny_folder, tmp_path):
    cache = tmp_path / "cache"
    clean = _tiny_run(tiny_folder, cache, tmp_path / "clean")
    assert computed(clean) == 16
    for row in (v for v in clean.values() if isinstance(v, dict)):
        assert row["seconds"] > 0 and row["images_per_second"] == pytest.approx(row["computed"] / row["seconds"], rel=0.05)
    store = Path(clean["train"]["store"])
    shards = sorted(store.glob("*.npy"))
    assert len(shards) == 4  # 16 images, a shard every 4
    overwrite_middle(shards[1])
    again = _tiny_run(tiny_folder, cache, tmp_path / "again")
    log = (tmp_path / "again" / "train.log").read_text()
    assert log.count("checksum mismatch") == 1, log[-3000:]
    assert computed(again) == 4  # only the bad shard's images
    assert all(v["images_per_second"] is None for v in again.values() if isinstance(v, dict) and v["computed"] == 0)
    assert (tmp_path / "again" / "test_predictions.csv").read_text() == (tmp_path / "clean" / "test_predictions.csv").read_text()


def _start_train(*overrides: str, log: Path) -> subprocess.Popen:
    with open(log, "w") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "transferlab.train", *overrides], stdout=out, stderr=subprocess.STDOUT, env=cli_env(), start_new_session=True
        )


def _wait_for_shards(folder: Path, count: int, proc: subprocess.Popen, log: Path, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while len(list(folder.glob("*/*.keys.json"))) < count:
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            raise AssertionError(f"{count} shards never appeared under {folder} (exit {proc.returncode}):\n{log.read_text()[-4000:]}")
        time.sleep(0.05)


def _rows_on_disk(folder: Path) -> int:
    return sum(json.loads(p.read_text())["rows"] for p in folder.glob("*/*.keys.json"))


@pytest.mark.shared
def test_interrupted_fills_keep_their_shards_and_the_rerun_computes_only_the_rest(tmp_path):
    """Ctrl-C, then SIGKILL, in the middle of filling 370 full-size photos: each keeps its finished shards; the
    last run computes exactly the images no earlier run finished."""
    cache = tmp_path / "cache"
    common = [
        "data=oxford_pets",
        f"data.root={PETS}",
        "data.task=species",
        "finetune=frozen",
        "trainer.max_epochs=1",
        "trainer.precision=32-true",  # slower than bf16: a fill that lasts long enough to be interrupted
        "data.num_workers=0",
        "performance.feature_cache.batch_size=8",
        "performance.feature_cache.shard_images=8",
        f"paths.cache_dir={cache}",
        "logger=none",
        "interpret.enabled=false",
        "callbacks.progress_bar=null",
        "trainer.enable_progress_bar=false",
    ]
    features = cache / "features"
    log = tmp_path / "ctrl_c.log"
    proc = _start_train(*common, f"hydra.run.dir={tmp_path / 'ctrl_c'}", log=log)
    _wait_for_shards(features, 2, proc, log)
    os.killpg(proc.pid, signal.SIGINT)
    assert proc.wait(120) == 130, log.read_text()[-3000:]
    kept = _rows_on_disk(features)
    last = log.read_text().strip().splitlines()[-1]
    assert last.startswith(f"interrupted (Ctrl-C): the feature cache kept {kept} of 370 images' features in {features}"), last
    assert f"the next run computes only the other {370 - kept}" in last and 0 < kept < 370

    log = tmp_path / "killed.log"
    proc = _start_train(*common, f"hydra.run.dir={tmp_path / 'killed'}", log=log)
    _wait_for_shards(features, len(list(features.glob("*/*.keys.json"))) + 2, proc, log)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(60)
    kept_after_kill = _rows_on_disk(features)
    assert kept < kept_after_kill < 370

    out = tmp_path / "rest"
    run("train", *common, f"hydra.run.dir={out}")
    stats = json.loads((out / "feature_cache.json").read_text())
    assert computed(stats) == 370 - kept_after_kill
    assert sum(v["images"] for v in stats.values() if isinstance(v, dict)) == 370 and _rows_on_disk(features) == 370


@pytest.mark.shared
def test_two_cold_runs_at_once_compute_the_dataset_once_and_match_a_lone_run(species_run, tmp_path):
    """Two runs started together on one empty cache: one fills while the other waits on the store's lock, then
    reuses; together they compute each image once, and both give the lone run's predictions."""
    cache = tmp_path / "cache"
    procs, logs = [], []
    for name in ("a", "b"):
        logs.append(tmp_path / f"{name}.log")
        procs.append(_start_train(*SPECIES_RUN, f"paths.cache_dir={cache}", f"hydra.run.dir={tmp_path / name}", log=logs[-1]))
    for proc, log in zip(procs, logs):
        assert proc.wait(600) == 0, log.read_text()[-4000:]
    stats = [json.loads((tmp_path / name / "feature_cache.json").read_text()) for name in ("a", "b")]
    images = sum(v["images"] for v in stats[0].values() if isinstance(v, dict))
    assert computed(stats[0]) + computed(stats[1]) <= 1.1 * images
    assert "waiting for it" in logs[0].read_text() + logs[1].read_text()  # they did overlap: one waited
    expected = (species_run / "test_predictions.csv").read_text()
    for name in ("a", "b"):
        assert (tmp_path / name / "test_predictions.csv").read_text() == expected, name
