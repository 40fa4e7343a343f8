"""transferlab-audit on a copy of the shared sample with planted faults: label flips, near-duplicates that straddle the
split, an image unlike every class, a truncated file; the blocked searches against brute force; data.exclude."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import PETS, chromium_render, needs_browser, require_shared, run_cli
from planted import plant_faults
from transferlab.core.errors import DataError

pytestmark = pytest.mark.shared


def read_rows(path: Path) -> tuple[list[str], list[dict[str, str]]]:
    with open(path, newline="") as fh:
        reader = csv.DictReader(fh)
        return list(reader.fieldnames or []), list(reader)


def folder_datamodule(root: Path, **values):
    """data=image_folder as conf/data/_base.yaml configures it, with `values` replaced."""
    from omegaconf import OmegaConf

    from transferlab.data.image_folder import ImageFolderDataModule

    base = OmegaConf.to_container(OmegaConf.load(Path(__file__).parents[1] / "conf" / "data" / "_base.yaml"))
    defaults = {k: v for k, v in base.items() if not (isinstance(v, str) and "${" in v)}
    return ImageFolderDataModule(**{**defaults, "root": str(root), "split_seed": 0, "shots_seed": 0, "cache_dir": None, **values})


def straddling_seed(root: Path, pairs: list[tuple[Path, Path]]) -> int:
    """A data.split_seed under which every planted (original, copy) pair falls in two different splits, found with
    the datamodule's own discovery and split (so the audit's cross_split can be checked against the truth)."""
    from transferlab.data.splits import hash_split, split_key

    found = folder_datamodule(root).discover()
    pool = [(p, y) for p, y in found.samples if p.name != "broken_download.jpg"]  # the integrity scan drops it
    for seed in range(1, 100_000):
        split = {str(p): name for name, items in hash_split(pool, lambda path: split_key(path, root), 0.15, 0.15, seed).items() for p, _ in items}
        if all(split[str(a)] != split[str(b)] for a, b in pairs):
            return seed
    raise AssertionError("no seed puts every planted pair across splits")


@pytest.fixture(scope="module")
def audited(tmp_path_factory):
    """One audit run (the real CLI, `python -m transferlab.audit`) over the planted folder."""
    require_shared()
    base = tmp_path_factory.mktemp("audit")
    planted = plant_faults(PETS, base / "images")
    noise = np.random.default_rng(0).integers(0, 256, (300, 400, 3), dtype=np.uint8)  # unlike every class
    Image.fromarray(noise).save(planted.root / "cat" / "static_noise.png")
    seed = straddling_seed(planted.root, planted.duplicates)
    out = base / "out"
    proc = run_cli(
        "audit",
        "data=image_folder",
        f"data.root={planted.root}",
        f"seed={seed}",
        "write_exclude=[label_issues,duplicates]",
        f"paths.cache_dir={base / 'cache'}",
        f"hydra.run.dir={out}",
    )
    return planted, out, proc.stdout


def test_planted_label_flips_rank_among_the_most_suspicious(audited):
    planted, out, _ = audited
    columns, rows = read_rows(out / "label_issues.csv")
    assert columns == ["path", "given", "suggested", "score"]
    scores = [float(r["score"]) for r in rows]
    assert scores == sorted(scores, reverse=True)  # most suspicious first
    top = {r["path"] for r in rows[:20]}
    found = [str(p) for p in planted.flipped if str(p) in top]
    assert len(found) >= 8, (found, rows[:20])
    flipped = {str(p): p.parent.name for p in planted.flipped}
    for row in rows:
        if row["path"] in flipped:
            assert row["given"] == flipped[row["path"]] and row["suggested"] != row["given"]


def test_planted_near_duplicates_are_found_as_cross_split_leakage(audited):
    planted, out, stdout = audited
    columns, rows = read_rows(out / "duplicates.csv")
    assert columns == ["path_a", "path_b", "similarity", "cross_split"]
    pairs = {frozenset((r["path_a"], r["path_b"])): r for r in rows}
    truth = [frozenset((str(a), str(b))) for a, b in planted.duplicates]
    leaked = [t for t in truth if t in pairs and pairs[t]["cross_split"] == "true"]
    assert len(leaked) >= 9, [t for t in truth if t not in leaked]
    false_pairs = [r for key, r in pairs.items() if key not in truth]
    assert len(false_pairs) <= 5, false_pairs
    assert all(0.0 <= float(r["similarity"]) <= 1.0 + 1e-6 for r in rows)
    assert "across train/val/test: leakage" in stdout and "near-duplicates" in stdout


def test_outliers_and_unusable_files_are_reported_and_nothing_is_deleted(audited):
    planted, out, stdout = audited
    _, outliers = read_rows(out / "outliers.csv")
    assert str(planted.root / "cat" / "static_noise.png") in {r["path"] for r in outliers[:3]}, outliers[:5]
    _, skipped = read_rows(out / "skipped_images.csv")
    assert [r["path"] for r in skipped] == [str(p) for p in planted.broken] and all(p.exists() for p in planted.broken)
    assert all(p.exists() for p in planted.flipped) and all(b.exists() for _, b in planted.duplicates)
    assert "unusable files" in stdout and "Nothing was moved or deleted" not in stdout  # an exclude list was written
    assert "data.exclude=" in stdout


def test_exclude_list_trains_without_the_flagged_files(audited):
    planted, out, _ = audited
    listed = [line for line in (out / "exclude.txt").read_text().splitlines() if line and not line.startswith("#")]
    assert sum(str(p) in listed for p in planted.flipped) >= 8
    # one image of each pair: path_b, the one in the later split (val / test), so no evaluation image has a twin in train
    assert sum((str(a) in listed) + (str(b) in listed) == 1 for a, b in planted.duplicates) >= 9

    def pool(exclude):
        dm = folder_datamodule(planted.root, exclude=exclude)
        dm.setup()
        return {str(p) for p, _ in dm.pool}

    everything, kept = pool(None), pool(str(out / "exclude.txt"))
    assert everything - kept == set(listed) & everything and not kept & set(listed)
    with pytest.raises(DataError, match=r"data.exclude: .*missing.txt is not a file"):
        pool(str(out / "missing.txt"))


def test_audit_json_and_features_are_memory_mapped(audited):
    import json

    _, out, _ = audited
    facts = json.loads((out / "audit.json").read_text())
    assert facts["images"] == 381 and facts["classes"] == 2 and facts["skipped"] == 1
    assert facts["probe"]["out_of_fold_accuracy"] > 0.9  # 10 flipped labels and one noise picture among 381 photos
    features = np.load(out / "features.npy", mmap_mode="r")
    assert isinstance(features, np.memmap) and features.shape == (381, 1280)


@needs_browser
def test_audit_page_renders_in_headless_chromium(audited, tmp_path):
    _, out, _ = audited
    page = out / "audit.html"
    html = page.read_text()
    assert "http://" not in html and "https://" not in html and "<script" not in html  # self-contained
    for heading in ("Label issues", "Near-duplicates", "Outliers", "Unusable files"):
        assert f"<h2>{heading}</h2>" in html
    console, widths = chromium_render(page, tmp_path / "audit.png")
    assert not [m for m in console if m["level"] in ("SEVERE", "WARNING")], console
    assert len(widths) >= 30 and all(w > 0 for w in widths), widths  # every thumbnail decoded


# -- the searches, against brute force -------------------------------------------------------------------
def test_blocked_neighbour_search_equals_the_full_similarity_matrix():
    from transferlab.insight.duplicates import hash_neighbours, nearest_neighbours

    rng = np.random.default_rng(0)
    features = rng.standard_normal((700, 24)).astype(np.float32)
    sims, idxs = nearest_neighbours(features, k=5, block=64)  # 11 x 11 blocks, never the 700 x 700 matrix
    x = features / np.linalg.norm(features, axis=1, keepdims=True)
    full = x @ x.T
    np.fill_diagonal(full, -np.inf)
    expected = np.sort(full, axis=1)[:, ::-1][:, :5]
    assert np.allclose(sims, expected, atol=1e-5)
    assert np.allclose(np.take_along_axis(full, idxs, axis=1), sims, atol=1e-5)

    hashes = rng.integers(0, 2**63, 500, dtype=np.uint64)
    hashes[7] = hashes[300] ^ np.uint64(0b1011)  # 3 bits apart
    found = hash_neighbours(hashes, 3, block=50)
    bits = np.array([[bin(int(a) ^ int(b)).count("1") for b in hashes] for a in hashes])
    brute = [(a, b, int(bits[a, b])) for a in range(500) for b in range(a + 1, 500) if bits[a, b] <= 3]
    assert sorted(found) == brute and (7, 300, 3) in found


def test_wrong_write_exclude_kind_is_one_line(tmp_path, tiny_folder):
    proc = run_cli("audit", f"data.root={tiny_folder}", "write_exclude=[typos]", f"hydra.run.dir={tmp_path}", check=False)
    assert proc.returncode == 2
    assert "write_exclude: 'typos' is not a finding; choose from label_issues, duplicates, outliers" in proc.stderr
