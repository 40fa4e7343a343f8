"""The cost-growth measurement (scripts/scale.py) and the realistic photo folders it builds (scripts/synthetic_photos.py)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from conftest import PETS, REPO

FEATURE_BYTES = 1280 * 4  # tf_efficientnet_lite0, the default backbone: 1280-d float32 pooled features


def _listing(folder: Path) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(folder)): (p.stat().st_size, p.stat().st_mtime_ns) for p in folder.rglob("*")}


def _jpegs(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*.jpg"))}


@pytest.mark.shared
def test_build_photos_is_deterministic_balanced_varied_and_writes_only_its_folder(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(REPO / "scripts"))
    from synthetic_photos import build_photos

    shared_before = _listing(PETS)
    first = build_photos(PETS, 20, tmp_path / "a", seed=3)
    again = build_photos(PETS, 20, tmp_path / "b", seed=3)

    assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "b"]  # nothing beside the folders asked for
    assert _listing(PETS) == shared_before
    photos = _jpegs(first)
    assert photos == _jpegs(again)  # same seed, same bytes
    assert sorted(p.name for p in first.iterdir()) == ["cat", "dog"]
    assert len(list((first / "cat").iterdir())) == len(list((first / "dog").iterdir())) == 10
    sizes = set()
    for name in photos:
        with Image.open(first / name) as img:
            assert img.format == "JPEG"
            img.load()
            sizes.add(img.size)
    assert len(sizes) >= 10  # random crops and output sizes

    listing = _listing(first)
    assert build_photos(PETS, 20, first, seed=3) == first and _listing(first) == listing  # reused, not rewritten
    build_photos(PETS, 10, first, seed=3)
    assert len(_jpegs(first)) == 10  # a smaller count leaves exactly that many
    assert _jpegs(build_photos(PETS, 20, tmp_path / "c", seed=4)) != photos  # another seed, other variants
    for forbidden in (REPO / "scale-photos", PETS / "out"):
        with pytest.raises(ValueError, match="refusing"):
            build_photos(PETS, 4, forbidden)
        assert not forbidden.exists()


@pytest.mark.shared
def test_scale_quick_measures_one_frozen_run_on_1000_real_photos(tmp_path):
    out, work = tmp_path / "scale.json", tmp_path / "work"
    proc = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "scale.py"), "--quick", "--out", str(out), "--work", str(work)],
        capture_output=True,
        text=True,
        timeout=600,  # 1.5 min measured here (OMP_NUM_THREADS=1 per xdist worker); 4 min with 2 threads on 2 busy cores
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    assert "| images | wall s | img/s | fill img/s | peak RSS MB |" in proc.stdout
    result = json.loads(out.read_text())
    (size,) = result["sizes"]
    assert size["images"] == 1000 and size["wall_seconds"] > 0 and size["images_per_second"] > 0
    assert f"| 1000 | {size['wall_seconds']:.1f} |" in proc.stdout
    assert 100 < size["peak_rss_mb"] < 8000
    assert 0.5 * 1000 * FEATURE_BYTES < size["cache_bytes"] < 2 * 1000 * FEATURE_BYTES
    assert size["fill_images"] == 1000 and size["fill_images_per_second"] > 0
    assert size["test_acc"] >= 0.9  # cats vs dogs, pretrained Lite0: 0.973 measured (150 test photos)
    assert result["slope_time"] is None and result["rss_mb_per_1k_images"] is None  # one size: no slope
    assert result["targets"] == {"slope_time": 1.1} and "memory-mapped" in result["rss_formula"]

    photos = sorted(Path(size["dataset_dir"]).rglob("*.jpg"))
    assert len(photos) == 1000 and {p.parent.name for p in photos} == {"cat", "dog"}
    assert size["dataset_bytes"] == sum(p.stat().st_size for p in photos)
    decoded = set()
    for photo in photos[::97]:
        with Image.open(photo) as img:
            img.load()
            decoded.add(img.size)
    assert len(decoded) > 1
