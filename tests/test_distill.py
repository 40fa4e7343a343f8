"""finetune=distill (issue 35): a frozen student's head trained on a teacher's softened probabilities and the labels.

The loss and the view pairing first (no training), then real runs: the teacher's forward passes counted (one per
training image and view, none when a second run reads the cache), the one-line errors, and on the shared photos'
37 breeds a student that learns from a teacher beating the same student without one, by a paired comparison of
their out-of-fold predictions; the teacher never saw any image the student is tested on."""

from __future__ import annotations

import csv
import json
import logging
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from conftest import FAST, PETS, run, run_cli

TINY = ["data=image_folder", *FAST, "interpret.enabled=false", "seed=3"]


# -- the loss and the pairing --------------------------------------------------------------------------------
def test_the_loss_is_hintons_weighted_sum_with_t_squared():
    from transferlab.models.distillation import DistillationLoss, kd_term

    torch.manual_seed(0)
    student, teacher, labels = torch.randn(6, 5), 3 * torch.randn(6, 5), torch.randint(5, (6,))
    t = 4.0
    soft_teacher = F.softmax(teacher / t, dim=-1)
    expected_kd = (soft_teacher * (soft_teacher.log() - F.log_softmax(student / t, dim=-1))).sum(-1).mean() * t * t
    assert torch.allclose(kd_term(student, teacher, t), expected_kd, atol=1e-5)
    loss = DistillationLoss({"mode": "distill", "temperature": t, "kd_weight": 0.7, "ce_weight": 0.3}, None)
    assert torch.allclose(loss.loss(student, labels, teacher), 0.3 * F.cross_entropy(student, labels) + 0.7 * expected_kd, atol=1e-5)
    assert float(kd_term(teacher, teacher, t)) == pytest.approx(0.0, abs=1e-6)  # the teacher's own answer costs nothing
    with pytest.raises(RuntimeError, match="without the teacher's logits"):
        loss.loss(student, labels)


def test_each_training_row_pairs_the_student_view_with_the_teacher_logits_of_that_view():
    from transferlab.data.features import DistillDataset, FeatureDataset, FeatureStore

    keys = [f"img{i}" for i in range(5)]
    views = np.arange(3, dtype=np.float32)
    features, logits = FeatureStore(None, "s"), FeatureStore(None, "t")
    features.add(keys, np.stack([np.stack([np.full(4, 10 * i + v) for v in views]) for i in range(5)]), "f")  # [5, 3 views, 4]
    logits.add(keys, np.stack([np.stack([np.full(2, 10 * i + v) for v in views]) for i in range(5)]), "l")  # [5, 3 views, 2]
    paired = DistillDataset(FeatureDataset(features, keys, [0, 1, 0, 1, 0]), logits, keys)
    seen = set()
    for _ in range(20):
        for index in range(len(paired)):
            x, label, teacher = paired[index]
            assert float(x[0]) == float(teacher[0]) and int(float(x[0])) // 10 == index and label == index % 2
            seen.add(int(float(x[0])) % 10)
    assert seen == {0, 1, 2}  # every view is drawn, and always with its own teacher logits


@pytest.mark.shared
def test_the_teachers_view_k_is_the_students_view_k_at_the_teachers_size_and_normalisation(tiny_folder):
    """The student's and the teacher's k-th augmented view come from the same seeded draws (crop box, flip): the
    teacher's view, resized to the student's size and normalised the student's way, is the student's view."""
    from transferlab.data.features import ViewsDataset, image_key
    from transferlab.data.images import ImageDataset
    from transferlab.data.preprocessing import Preprocessing

    augment = {"scale_min": 0.3, "hflip": True}
    student = Preprocessing(input_size=64, mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))
    teacher = Preprocessing(input_size=128, mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225))
    samples = [(path, 0) for path in sorted(tiny_folder.rglob("*.jpg"))[:4]]
    keys = [image_key(path) for path, _ in samples]
    decode = student.decode_size(augment)  # both from the file decoded at the student's size (callbacks.distill_cache)
    views = [ViewsDataset(ImageDataset(samples, prep.train_transform(augment), decode), keys, 3, seed=5) for prep in (student, teacher)]
    for index in range(len(samples)):
        mine, theirs = views[0][index][0], views[1][index][0]  # [3 views, 3, H, W]
        pixels = theirs * torch.tensor(teacher.std)[:, None, None] + torch.tensor(teacher.mean)[:, None, None]
        shrunk = F.interpolate(pixels, size=(64, 64), mode="bilinear", antialias=True, align_corners=False)
        as_student = (shrunk - torch.tensor(student.mean)[:, None, None]) / torch.tensor(student.std)[:, None, None]
        errors = (as_student - mine).abs().mean(dim=(1, 2, 3))  # per view: the same crop at two sizes
        assert float(errors.max()) < 0.1, errors
        assert float((mine[0] - mine[1]).abs().mean()) > 0.1 or float((mine[1] - mine[2]).abs().mean()) > 0.1  # the views differ


# -- real runs --------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def teacher(tiny_folder, tmp_path_factory) -> Path:
    """A cat / dog teacher on the tiny photos, at a larger input size than the student's (its own preprocessing)."""
    out = tmp_path_factory.mktemp("teacher")
    run("train", *TINY, f"data.root={tiny_folder}", "backbone.input_size=80", f"hydra.run.dir={out}")
    return out / "checkpoints" / "best.ckpt"


def count_teacher_rows(monkeypatch) -> list[int]:
    """Rows the loaded teacher's head computes, counted by a forward hook (independent of the cache's own counter)."""
    import transferlab.callbacks.distill_cache as distill_cache

    counted: list[int] = []
    original = distill_cache.load_checkpoint

    def load_and_hook(path):
        model, hparams = original(path)
        model.head.register_forward_hook(lambda module, args, out: counted.append(len(out)))
        return model, hparams

    monkeypatch.setattr(distill_cache, "load_checkpoint", load_and_hook)
    return counted


@pytest.mark.shared
def test_the_teacher_runs_once_per_image_and_view_and_a_second_run_reads_its_logits(teacher, tiny_folder, tmp_path, monkeypatch, caplog):
    student = [*TINY, f"data.root={tiny_folder}", "finetune=distill", f"finetune.teacher={teacher}", f"paths.cache_dir={tmp_path / 'cache'}"]
    student += ["performance.feature_cache.augmented_views=2", "data.augment.scale_min=0.5", "data.augment.hflip=true", "trainer.max_epochs=2"]
    counted = count_teacher_rows(monkeypatch)
    caplog.set_level(logging.INFO)
    run("train", *student, f"hydra.run.dir={tmp_path / 'first'}")
    first = json.loads((tmp_path / "first" / "feature_cache.json").read_text())["teacher"]
    images = first["images"]
    assert images == len(read_train(tmp_path / "first")) > 0
    assert first["computed"] == images and first["reused"] == 0 and first["views"] == 2
    assert first["forward_images"] == 2 * images and sum(counted) == 2 * images  # one pass per image and view
    counted.clear()
    run("train", *student, f"hydra.run.dir={tmp_path / 'second'}")
    second = json.loads((tmp_path / "second" / "feature_cache.json").read_text())["teacher"]
    assert second["computed"] == 0 and second["reused"] == images and second["forward_images"] == 0 and sum(counted) == 0
    assert (tmp_path / "second" / "checkpoints" / "best.ckpt").is_file()
    before, after = (json.loads((tmp_path / run_dir / "metrics.json").read_text()) for run_dir in ("first", "second"))
    assert after["test/loss"] == pytest.approx(before["test/loss"], rel=1e-5)  # the cached teacher logits are the ones computed
    assert not [r for r in caplog.records if "among the teacher's training images" in r.getMessage()]  # the teacher's own split: no leak

    caplog.clear()  # another split: some test images were the teacher's training images, and the log says so in one line
    run("train", *student, "data.split_seed=11", f"hydra.run.dir={tmp_path / 'leaky'}")
    leaks = [r.getMessage() for r in caplog.records if "among the teacher's training images" in r.getMessage()]
    assert len(leaks) == 1 and "\n" not in leaks[0] and re.match(r"finetune.teacher: \d+ of the \d+ test images", leaks[0]), leaks


def read_train(run_dir: Path) -> list[str]:
    with open(run_dir / "splits.csv", newline="") as fh:
        return [row["path"] for row in csv.DictReader(fh) if row["split"] == "train"]


@pytest.mark.shared
def test_a_teacher_of_other_classes_is_refused_in_one_line_naming_both(teacher, tiny_folder, tmp_path):
    from transferlab.core.errors import ConfigError

    other = tmp_path / "images"
    for old, new in (("cat", "kitten"), ("dog", "puppy")):
        shutil.copytree(tiny_folder / old, other / new)
    with pytest.raises(ConfigError) as raised:
        run("train", *TINY, f"data.root={other}", "finetune=distill", f"finetune.teacher={teacher}", f"hydra.run.dir={tmp_path / 'run'}")
    message = str(raised.value)
    assert "\n" not in message and message.startswith("finetune.teacher: its classes ['cat', 'dog'] differ from the data's ['kitten', 'puppy']")


@pytest.mark.shared
def test_a_missing_teacher_exits_2_in_one_line(tiny_folder, tmp_path):
    proc = run_cli("train", *TINY, f"data.root={tiny_folder}", "finetune=distill", f"hydra.run.dir={tmp_path}", check=False)
    assert proc.returncode == 2 and proc.stderr.count("error:") == 1 and "Traceback" not in proc.stderr, proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert last == "error: finetune.teacher: finetune=distill needs a teacher: finetune.teacher=<a checkpoint or a model package folder>", proc.stderr


def test_a_teacher_file_that_is_not_there_is_refused_before_any_work(tmp_path):
    from transferlab.core.errors import ConfigError

    with pytest.raises(ConfigError, match=r"^finetune.teacher: no such checkpoint or model package: /no/such/t.ckpt$"):
        run("train", "finetune=distill", "finetune.teacher=/no/such/t.ckpt", f"hydra.run.dir={tmp_path}")


@pytest.mark.shared
@pytest.mark.parametrize(
    ("overrides", "start"),
    [
        (["finetune.student=full"], "finetune.student=full: not supported"),
        (["performance.feature_cache.enabled=false"], "performance.feature_cache.enabled=false: finetune=distill trains on cached"),
    ],
)
def test_a_student_distill_cannot_train_is_refused_in_one_line(teacher, tiny_folder, tmp_path, overrides, start):
    from transferlab.core.errors import ConfigError

    with pytest.raises(ConfigError, match=f"^{re.escape(start)}") as raised:
        run("train", *TINY, f"data.root={tiny_folder}", "finetune=distill", f"finetune.teacher={teacher}", *overrides, f"hydra.run.dir={tmp_path}")
    assert "\n" not in str(raised.value)


# -- the breeds: a teacher that knows more makes a better student ------------------------------------------------
BREEDS = ["data=oxford_pets", "data.task=breeds", "data.num_workers=0", "interpret.enabled=false", "callbacks.progress_bar=null"]
BREEDS += ["trainer.enable_progress_bar=false", "trainer.precision=bf16-mixed", "backbone=tf_efficientnet_lite0"]
STUDENT = ["finetune=distill", "cv.folds=4", "trainer.max_epochs=40"]


def split_by_number(root: Path, teacher_per_breed: int) -> None:
    """root/teacher: the first `teacher_per_breed` photos of each breed (by number); root/student: the others."""
    by_breed: dict[str, list[Path]] = {}
    for path in PETS.glob("*.jpg"):
        by_breed.setdefault(path.name.rsplit("_", 1)[0], []).append(path)
    for photos in by_breed.values():
        for rank, path in enumerate(sorted(photos, key=lambda p: int(p.stem.rsplit("_", 1)[1]))):
            folder = root / ("teacher" if rank < teacher_per_breed else "student")
            folder.mkdir(parents=True, exist_ok=True)
            (folder / path.name).symlink_to(path)


def out_of_fold_correct(run_dir: Path) -> dict[str, bool]:
    with open(run_dir / "oof_predictions.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    return {row["path"]: row["predicted"] == row["label"] for row in rows}


@pytest.mark.slow
@pytest.mark.shared
def test_distilling_a_teacher_that_saw_more_breeds_photos_beats_the_same_student_alone(tmp_path):
    from transferlab.core.statistics import corrected_paired_t, fold_test_to_train, paired_bootstrap

    split_by_number(tmp_path / "photos", teacher_per_breed=6)  # teacher: 6 photos per breed; student: the other 4
    run("train", *BREEDS, f"data.root={tmp_path / 'photos' / 'teacher'}", "data.test_fraction=0", f"hydra.run.dir={tmp_path / 'teacher'}")
    teacher = tmp_path / "teacher" / "checkpoints" / "best.ckpt"
    student = [*BREEDS, f"data.root={tmp_path / 'photos' / 'student'}", *STUDENT, f"finetune.teacher={teacher}"]
    run("train", *student, f"hydra.run.dir={tmp_path / 'distilled'}")
    run("train", *student, "finetune.kd_weight=0", "finetune.ce_weight=1", f"hydra.run.dir={tmp_path / 'alone'}")  # the same student, no teacher

    distilled, alone = out_of_fold_correct(tmp_path / "distilled"), out_of_fold_correct(tmp_path / "alone")
    assert sorted(distilled) == sorted(alone) and len(distilled) == 37 * 4  # every student photo tested once, by a fold that did not train on it
    files = sorted(distilled)
    comparison = paired_bootstrap([alone[f] for f in files], [distilled[f] for f in files], seed=0)
    folds = [[f["test/acc"] for f in json.loads((tmp_path / name / "cv_summary.json").read_text())["folds"]] for name in ("alone", "distilled")]
    gain, p_folds = corrected_paired_t(folds[0], folds[1], fold_test_to_train(4))
    print(
        f"distilled - alone: out of fold {comparison.difference:+.3f} {comparison.ci95} (p={comparison.p_value}); folds {gain:+.3f} (p={p_folds:.3f})"
    )
    assert comparison.ci95[0] > 0, comparison  # the paired interval of the accuracy gain excludes 0
    assert gain > 0
