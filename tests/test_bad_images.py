"""A dirty image collection through the integrity scan, training and predict: nothing crashes, every bad file is
reported once with its reason, every good file is used, EXIF orientation holds, bombs are refused undecoded."""

from __future__ import annotations

import csv
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageFile

from conftest import FAST, cli_env, read_splits, run_mains
from corpus import build_corpus
from transferlab.data.images import check_image, decode_rgb

# Root reads any file whatever its mode: drop the capabilities that allow it, so the unreadable file is unreadable.
UNPRIVILEGED = ("setpriv", "--bounding-set=-dac_override,-dac_read_search") if os.geteuid() == 0 else ()


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> tuple[Path, dict[str, str], list[str]]:
    root = tmp_path_factory.mktemp("corpus") / "images"
    bad, good = build_corpus(root)
    return root, bad, good


def test_the_corpus_holds_every_kind_of_file(corpus):
    root, bad, good = corpus
    assert len(bad) == 11 and len(good) == 17
    assert (root / "cat" / "loop.jpg").is_symlink() and (root / "dog" / "locked.jpg").stat().st_mode & 0o777 == 0
    assert Image.open(root / "dog" / "gray16.png").mode == "I;16" and Image.open(root / "dog" / "cmyk.jpg").mode == "CMYK"
    assert Image.open(root / "cat" / "palette.png").mode == "P" and Image.open(root / "cat" / "alpha.png").mode == "RGBA"


SCAN = """
import json, sys
from pathlib import Path
from transferlab.data.images import list_files
from transferlab.data.integrity import scan_images
root = Path(sys.argv[1])
files = [p for d in sorted(root.iterdir()) for p in list_files(d)]
report = scan_images(files, root, None)
print(json.dumps({"good": [str(p.relative_to(root)) for p in report.good],
                  "bad": {str(Path(p).relative_to(root)): r for p, r in report.bad.items()}}))
"""


def test_integrity_scan_reports_each_bad_file_once_with_its_reason(corpus):
    root, bad, good = corpus
    proc = subprocess.run(
        [*UNPRIVILEGED, sys.executable, "-c", SCAN, str(root)], capture_output=True, text=True, env=cli_env(), check=True, timeout=300
    )
    result = json.loads(proc.stdout)
    assert sorted(result["good"]) == sorted(good)
    assert sorted(result["bad"]) == sorted(bad)
    for name, reason in bad.items():
        assert reason in result["bad"][name], (name, result["bad"][name])
        assert str(root) not in result["bad"][name]  # the reason, not the path again


def test_bombs_are_refused_from_their_header_without_decoding(corpus, monkeypatch):
    root, bad, _ = corpus
    decoded = []
    original = ImageFile.ImageFile.load
    monkeypatch.setattr(ImageFile.ImageFile, "load", lambda self: (decoded.append(self.size), original(self))[1])
    bombs = [root / name for name in bad if "bomb" in name]
    assert len(bombs) == 3
    for path in bombs:
        assert "decompression-bomb limit" in check_image(path)
        with pytest.raises((Image.DecompressionBombError, Image.DecompressionBombWarning)):
            decode_rgb(path, min_short_side=64)
        with pytest.raises((Image.DecompressionBombError, Image.DecompressionBombWarning)):
            decode_rgb(path)
    assert decoded == []  # not a single pixel decoded


def _close(a: torch.Tensor, b: torch.Tensor, tolerance: float) -> bool:
    return a.shape == b.shape and (a.float() - b.float()).abs().mean().item() <= tolerance


def test_decoded_pixels_match_what_the_file_shows(corpus):
    root, _, _ = corpus
    upright = decode_rgb(root / "dog" / "cmyk.jpg")  # the upright dog photo (CMYK copy)
    reference = torch.from_numpy(np.array(Image.open(root / "dog" / "cmyk.jpg").convert("RGB"))).permute(2, 0, 1)
    assert _close(upright, reference, 1.0)
    rotated = root / "dog" / "exif_rotated.jpg"  # stored turned 90 degrees, EXIF says how to show it
    for min_side in (None, 16):  # the torchvision path and Pillow's reduced (draft) path
        shown = decode_rgb(rotated, min_side)
        assert shown.shape[1] < shown.shape[2]  # landscape, as the dog photo is, not the stored portrait
    assert _close(decode_rgb(rotated), upright, 12.0)  # same picture (two JPEG generations apart)
    gray16 = decode_rgb(root / "dog" / "gray16.png")
    gray8 = torch.from_numpy(np.asarray(Image.open(root / "dog" / "gray16.png"), dtype=np.float64) / 257).round()
    assert _close(gray16[0], gray8, 0.5) and gray16.float().mean() > 20  # scaled to 8 bits, not clipped to white
    alpha = decode_rgb(root / "cat" / "alpha.png")
    assert bool((alpha[:, :, : alpha.shape[2] // 2] == 255).all())  # the transparent half shows as white
    assert decode_rgb(root / "dog" / "one_pixel.png").tolist() == [[[200]], [[120]], [[40]]]


def _data_counts(log: str) -> dict[str, int]:
    line = re.search(r"Data: 2 classes; train (\d+), val (\d+), test (\d+)", log)
    return dict(zip(("train", "val", "test"), map(int, line.groups())))


@pytest.fixture(scope="module")
def corpus_runs(corpus, tmp_path_factory) -> tuple[Path, Path, dict, dict]:
    """Training on the corpus and predict over it with the model it trained, both through the real main()s in one
    process without root's right to read any file (the mode-000 file must be unreadable). Its own checkpoint, not the
    suite's species run: that one trains 4 epochs on 370 photos at 224 px (most of the module's 16 min fixture setup
    measured alone on busy cores); predict's handling of each file does not depend on which cats-vs-dogs model runs."""
    root, _, _ = corpus
    base = tmp_path_factory.mktemp("corpus_runs")
    train, predict = run_mains(
        [
            ("train", ["data=image_folder", f"data.root={root}", f"hydra.run.dir={base / 'train'}", "trainer.max_epochs=1", *FAST]),
            (
                "predict",
                [
                    f"ckpt_path={base / 'train' / 'checkpoints' / 'best.ckpt'}",
                    f"input={root}",
                    f"output={base / 'predictions.csv'}",
                    f"hydra.run.dir={base / 'predict'}",
                ],
            ),
        ],
        base,
        prefix=UNPRIVILEGED,
    )
    return base / "train", base / "predictions.csv", train, predict


def test_training_uses_every_good_file_and_lists_every_bad_one_once(corpus, corpus_runs):
    root, bad, good = corpus
    run_dir, _, proc, _ = corpus_runs
    assert proc["code"] == 0, proc["stderr"][-3000:]
    rows = list(csv.DictReader(open(run_dir / "skipped_images.csv")))
    assert sorted(str(Path(r["path"]).relative_to(root)) for r in rows) == sorted(bad)  # each once
    for row in rows:
        assert bad[str(Path(row["path"]).relative_to(root))] in row["reason"]
    counts = _data_counts((run_dir / "train.log").read_text())
    assert sum(counts.values()) == len(good)
    splits = read_splits(run_dir)  # every good file in exactly one split, no bad one anywhere
    stored = [list(splits.values()).count(s) for s in ("train", "val", "test")]
    assert sorted(splits) == sorted(good) and stored == [counts["train"] + counts["val"], 0, counts["test"]]  # select_c=cv: val trains
    # The test split was evaluated, each good test image once, and test/acc is the share of its rows that are right.
    with open(run_dir / "test_predictions.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert sorted(str(Path(r["path"]).relative_to(root)) for r in rows) == sorted(p for p, s in splits.items() if s == "test")
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["test/acc"] == pytest.approx(sum(r["label"] == r["predicted"] for r in rows) / len(rows))
    assert all((root / name).is_symlink() or (root / name).exists() for name in bad)  # nothing deleted


def test_predict_gives_every_file_one_row(corpus, corpus_runs):
    root, bad, good = corpus
    _, out, _, proc = corpus_runs
    assert proc["code"] == 0, proc["stderr"][-3000:]
    rows = {str(Path(r["path"]).relative_to(root)): r for r in csv.DictReader(open(out))}
    assert sorted(rows) == sorted([*bad, *good])
    for name, reason in bad.items():
        assert rows[name]["label"] == "" and reason in rows[name]["error"], (name, rows[name]["error"])
    for name in good:
        assert rows[name]["label"] in ("cat", "dog") and rows[name]["error"] == ""
