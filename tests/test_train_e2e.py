"""End-to-end runs of the real commands on the real shared photos, with the bundled ImageNet backbone.

The runs go through `run` (in this process, the same validated task as the CLI) unless the process itself is
under test: the installed console script, DDP, a multirun and the exit codes of bad configs.
"""

from __future__ import annotations

import csv
import json
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import (
    FAST,
    PETS,
    PETS_ARGS,
    corrupt_copy_tree,
    make_small_copy,
    pet_photos,
    read_metrics,
    read_splits,
    read_wandb_log,
    run,
    run_cli,
    run_mains,
)
from transferlab.models.backbones import create_backbone

pytestmark = pytest.mark.shared


@pytest.fixture(scope="module")
def breeds_run(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("breeds")
    run("train", "experiment=pets_lite0_frozen", "trainer.max_epochs=10", "seed=1", f"hydra.run.dir={out}", *PETS_ARGS)
    return out


def stored_tests(run_dir: Path) -> int:
    return list(read_splits(run_dir).values()).count("test")


def test_species_accuracy(species_run):
    metrics = read_metrics(species_run)
    assert metrics["test/acc"] >= 0.95, metrics
    # data.class_weights=balanced (SPECIES_RUN) on the 1:2 cat:dog sample: the cats are not given up for the dogs
    assert metrics["test/recall/cat"] >= metrics["test/recall/dog"] - 0.05, metrics
    low, high = metrics["test/acc_ci95"]
    assert low <= metrics["test/acc"] <= high and high - low < 0.2
    for key in ("test/balanced_acc", "test/macro_f1", "test/ece", "test/nll", "val/ece", "val/balanced_acc", "calibration/temperature"):
        assert isinstance(metrics[key], float), key
    with open(species_run / "test_predictions.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert list(rows[0]) == ["path", "label", "predicted", "prob_cat", "prob_dog"] and len(rows) == stored_tests(species_run)
    assert sum(r["label"] == r["predicted"] for r in rows) / len(rows) == pytest.approx(metrics["test/acc"])
    assert all(abs(float(r["prob_cat"]) + float(r["prob_dog"]) - 1) < 1e-5 for r in rows)
    for name in ("checkpoints/best.ckpt", "checkpoints/last.ckpt", "config.yaml", "confusion_matrix.png", "per_class_accuracy.csv"):
        assert (species_run / name).is_file(), name


@pytest.mark.slow
def test_breeds_accuracy(breeds_run):
    metrics = read_metrics(breeds_run)
    assert metrics["test/acc"] >= 0.80 and metrics["test/acc_top3"] >= 0.95, metrics
    rows = list(csv.reader(open(breeds_run / "confusion_matrix.csv")))
    assert len(rows) == 38 and sum(int(v) for row in rows[1:] for v in row[1:]) == stored_tests(breeds_run)


@pytest.mark.slow
def test_eval_reproduces_test_accuracy(breeds_run, tmp_path):
    run("eval", f"ckpt_path={breeds_run}/checkpoints/best.ckpt", f"hydra.run.dir={tmp_path}", "trainer.enable_progress_bar=false")
    assert read_metrics(tmp_path)["test/acc"] == read_metrics(breeds_run)["test/acc"]
    assert read_metrics(tmp_path)["test/acc_top3"] == read_metrics(breeds_run)["test/acc_top3"]


def test_predict_labels_good_files_and_flags_corrupt_ones(species_run, tmp_path):
    folder = tmp_path / "inbox"
    photos = pet_photos(True, 2) + pet_photos(False, 2)
    for p in photos:
        shutil.copy(p, folder / p.name) if folder.exists() else (folder.mkdir(), shutil.copy(p, folder / p.name))
    (folder / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really")
    out = tmp_path / "pred.csv"
    console_script = Path(sys.executable).parent / "transferlab-predict"  # the installed entry point, not python -m
    subprocess.run(
        [
            str(console_script),
            f"ckpt_path={species_run}/checkpoints/best.ckpt",
            f"input={folder}",
            f"output={out}",
            "topk=2",
            f"hydra.run.dir={tmp_path / 'run'}",
        ],
        check=True,
        capture_output=True,
        timeout=600,
    )
    rows = {Path(r["path"]).name: r for r in csv.DictReader(open(out))}
    assert len(rows) == 5
    assert rows["broken.jpg"]["label"] == "" and rows["broken.jpg"]["error"]
    for p in photos:
        expected = "cat" if p.name[0].isupper() else "dog"
        assert rows[p.name]["label"] == expected and rows[p.name]["top2_label"] in {"cat", "dog"} and not rows[p.name]["error"]


def backbone_state(ckpt: Path) -> dict[str, torch.Tensor]:
    state = torch.load(ckpt, map_location="cpu", weights_only=True)["state_dict"]
    return {k[len("backbone.") :]: v for k, v in state.items() if k.startswith("backbone.")}


def differing(state: dict[str, torch.Tensor], reference: dict[str, torch.Tensor], kind: str) -> list[str]:
    return [k for k, v in reference.items() if kind in k and not torch.equal(state[k], v)]


@pytest.fixture(scope="module")
def bundled_state() -> dict[str, torch.Tensor]:
    return create_backbone("tf_efficientnet_lite0", weights="bundled").state_dict()


def test_frozen_keeps_backbone_and_batchnorm_bit_identical(tiny_folder, tmp_path, bundled_state):
    run(
        "train",
        "data=image_folder",
        f"data.root={tiny_folder}",
        "finetune=frozen",
        "trainer.max_epochs=2",
        f"hydra.run.dir={tmp_path}",
        "finetune.head_solver=sgd",
        *FAST,
    )
    state = backbone_state(tmp_path / "checkpoints" / "last.ckpt")
    assert not differing(state, bundled_state, "weight") and not differing(state, bundled_state, "running_")


def test_full_changes_backbone(tiny_folder, tmp_path, bundled_state):
    run("train", "data=image_folder", f"data.root={tiny_folder}", "finetune=full", "trainer.max_epochs=1", f"hydra.run.dir={tmp_path}", *FAST)
    state = backbone_state(tmp_path / "checkpoints" / "last.ckpt")
    assert differing(state, bundled_state, "conv_stem.weight") and differing(state, bundled_state, "running_mean")


def test_gradual_changes_backbone_only_from_unfreeze_epoch(tiny_folder, tmp_path, bundled_state):
    snapshots = tmp_path / "snapshots"
    run(
        "train",
        "data=image_folder",
        f"data.root={tiny_folder}",
        "finetune=gradual",
        "finetune.unfreeze_at_epoch=1",
        "trainer.max_epochs=2",
        f"hydra.run.dir={tmp_path}",
        *FAST,
        *snapshot_every_epoch(snapshots),
    )
    epoch0, epoch1 = backbone_state(snapshots / "epoch0.ckpt"), backbone_state(snapshots / "epoch1.ckpt")
    assert not differing(epoch0, bundled_state, "weight") and not differing(epoch0, bundled_state, "running_")
    assert differing(epoch1, bundled_state, "conv_stem.weight") and differing(epoch1, bundled_state, "running_var")


def snapshot_every_epoch(folder: Path) -> list[str]:
    return [
        "+callbacks.snapshots._target_=lightning.pytorch.callbacks.ModelCheckpoint",
        f"+callbacks.snapshots.dirpath={folder}",
        "+callbacks.snapshots.save_top_k=-1",
        "+callbacks.snapshots.filename='epoch{epoch}'",
        "+callbacks.snapshots.auto_insert_metric_name=false",
    ]


def probabilities(run_dir: Path) -> list[list[str]]:
    with open(run_dir / "test_predictions.csv", newline="") as fh:
        return [row for row in csv.reader(fh)][1:]


@pytest.mark.slow
def test_gradual_under_ddp_matches_one_process(tmp_path, bundled_state):
    """finetune=gradual with two gloo ranks (8 images each a step) against one process (16): the backbone is
    bit-identical to the pretrained one through the frozen epoch, trains after it on both ranks alike (one process
    evaluating rank 0's checkpoint reproduces every test probability the two ranks gathered), and the results
    agree with one process's to what DDP changes (BatchNorm's batch statistics per rank once the backbone trains)."""
    common = [
        "data=oxford_pets",
        "data.task=species",
        f"data.root={PETS}",
        "data.augment.scale_min=1.0",  # no random crops or flips: both runs see the same pixels
        "data.augment.hflip=false",
        "finetune=gradual",
        "finetune.unfreeze_at_epoch=2",
        "trainer.max_epochs=3",
        "trainer.precision=32-true",
        "optimizer.lr=3e-3",
        "seed=3",
        *FAST,
        "backbone.input_size=128",  # 64 px features leave cats and dogs at 0.8: too many borderline photos to compare
    ]
    ddp, one = tmp_path / "ddp", tmp_path / "one"
    run_cli("train", *common, "trainer=ddp_cpu", "data.batch_size=8", f"hydra.run.dir={ddp}", *snapshot_every_epoch(ddp / "snapshots"))
    run("train", *common, "data.batch_size=16", f"hydra.run.dir={one}")
    frozen, unfrozen = backbone_state(ddp / "snapshots" / "epoch1.ckpt"), backbone_state(ddp / "snapshots" / "epoch2.ckpt")
    assert not differing(frozen, bundled_state, "weight") and not differing(frozen, bundled_state, "running_")
    assert differing(unfrozen, bundled_state, "conv_stem.weight") and differing(unfrozen, bundled_state, "running_var")

    run("eval", f"ckpt_path={ddp / 'checkpoints' / 'best.ckpt'}", f"hydra.run.dir={tmp_path / 'eval'}", "data.num_workers=0")
    gathered, alone = probabilities(ddp), probabilities(tmp_path / "eval")
    assert [r[:2] for r in gathered] == [r[:2] for r in alone] and len(gathered) > 50
    assert max(abs(float(a) - float(b)) for x, y in zip(gathered, alone) for a, b in zip(x[3:], y[3:])) <= 1e-4

    two, single = read_metrics(ddp), read_metrics(one)
    assert [r[:2] for r in probabilities(one)] == [r[:2] for r in gathered]  # the same test images, in the same order
    assert sum(a[2] != b[2] for a, b in zip(gathered, probabilities(one))) <= 2
    assert two["test/acc"] == pytest.approx(single["test/acc"], abs=2 / len(gathered) + 1e-6) and two["test/acc"] >= 0.85


def test_resume_continues_epochs_and_metrics(tiny_folder, tmp_path):
    common = ["data=image_folder", f"data.root={tiny_folder}", f"hydra.run.dir={tmp_path}", "finetune.head_solver=sgd", *FAST]
    run("train", "trainer.max_epochs=1", *common)
    first = torch.load(tmp_path / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    run("train", "trainer.max_epochs=2", "ckpt_path=last", *common)
    second = torch.load(tmp_path / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert second["global_step"] == 2 * first["global_step"]
    rows = list(csv.DictReader(open(tmp_path / "csv" / "metrics.csv")))
    assert [r["epoch"] for r in rows if r["val/acc"]] == ["0", "1"]  # both epochs kept, epoch 0 not repeated
    final = dict(csv.reader(open(tmp_path / "csv" / "final_metrics.csv")))  # every key of metrics.json, for this logger too
    assert float(final["test/acc"]) == pytest.approx(read_metrics(tmp_path)["test/acc"]) and final["selection/protocol"] == "validation_split"
    assert read_metrics(tmp_path)["epochs"] == 2


def test_multirun_writes_one_dir_per_job(tiny_folder, tmp_path):
    """Each job a 2-fold cross-validation (frozen: the cache serves both folds; full: each fold from the pretrained backbone)."""
    run_cli(
        "train",
        "-m",
        "finetune=frozen,full",
        "trainer.max_epochs=1",
        "cv.folds=2",
        "data=image_folder",
        f"data.root={tiny_folder}",
        f"hydra.sweep.dir={tmp_path}",
        *FAST,
    )
    assert sorted(p.name for p in tmp_path.iterdir() if (p / "metrics.json").is_file()) == ["0", "1"]
    for job in ("0", "1"):
        summary = json.loads((tmp_path / job / "cv_summary.json").read_text())
        assert [fold["epochs"] for fold in summary["folds"]] == ([0, 0] if job == "0" else [1, 1])  # frozen: the L-BFGS fit
        assert len((tmp_path / job / "oof_predictions.csv").read_text().splitlines()) == 1 + 16
        assert read_metrics(tmp_path / job)["val/acc_best"] == pytest.approx(summary["mean"]["val/acc_best"])
    protocols = {job: read_metrics(tmp_path / job)["selection/protocol"] for job in ("0", "1")}
    assert protocols == {"0": "cv2_mean_of_probe_inner_cv", "1": "cv2_mean_of_validation_split"}
    summary_md = (tmp_path / "summary.md").read_text()  # out-of-fold probe accuracy vs a validation split: not ranked
    assert "Not ranked: val/acc_best is measured differently" in summary_md and "| best |" not in summary_md
    assert "jobs listed by name, not ranked" in (tmp_path / "report.html").read_text()


@pytest.mark.slow
def test_ddp_cpu_aggregates_metrics_over_both_processes(tmp_path):
    # 85 test images (by hash at 0.19): the two ranks get 43 and 42, so a padded sampler or unsynced metric would show.
    # Accuracy under attack too: each rank attacks its share, the counts are summed.
    attack = ["callbacks=adversarial", "callbacks.adversarial.eps=[0,2/255]", "callbacks.adversarial.pgd_steps=3", "callbacks.progress_bar=null"]
    # fp32, so that the attack at eps=0 (always fp32) must reproduce test/acc exactly.
    common = ["data=oxford_pets", "data.task=species", "data.test_fraction=0.19", f"data.root={PETS}", "trainer.precision=32-true", *FAST]
    run_cli("train", "trainer=ddp_cpu", "trainer.max_epochs=1", f"hydra.run.dir={tmp_path / 'ddp'}", *common, *attack)
    ddp = read_metrics(tmp_path / "ddp")
    run(
        "eval",
        f"ckpt_path={tmp_path / 'ddp' / 'checkpoints' / 'best.ckpt'}",
        f"hydra.run.dir={tmp_path / 'single'}",
        "trainer.enable_progress_bar=false",
        "data.num_workers=0",
        *attack,
    )
    single = read_metrics(tmp_path / "single")
    assert ddp["test/acc"] == pytest.approx(single["test/acc"], abs=1e-6)
    for key in ("adv/fgsm_acc@eps=0/255", "adv/fgsm_acc@eps=2/255", "adv/pgd_acc@eps=2/255"):
        assert ddp[key] == pytest.approx(single[key], abs=1 / 85 + 1e-6), key
    assert ddp["adv/fgsm_acc@eps=0/255"] == pytest.approx(ddp["test/acc"], abs=1e-6)
    assert stored_tests(tmp_path / "ddp") == 85  # odd
    assert (tmp_path / "ddp" / "adversarial" / "adversarial.csv").read_text().splitlines()[1].endswith(",85")
    total = sum(int(r["total"]) for r in csv.DictReader(open(tmp_path / "ddp" / "per_class_accuracy.csv")))
    assert total == 85
    assert not list((tmp_path / "ddp").glob("metrics*.json"))[1:]  # written once, by rank 0


def test_loggers_write_real_csv_tensorboard_and_offline_wandb(tiny_folder, tmp_path):
    run_cli(  # a real process: W&B writes its offline run to disk when the process winds it up
        "train",
        "logger=many",
        f"paths.log_dir={tmp_path / 'logs'}",  # the MLflow store of logger=many
        "data=image_folder",
        f"data.root={tiny_folder}",
        "trainer.max_epochs=1",
        f"hydra.run.dir={tmp_path}",
        "tags=[e2e,wandb]",
        "finetune.head_solver=sgd",
        *FAST,
    )
    logs = list((tmp_path / "wandb").glob("offline-run-*/*.wandb"))
    assert len(logs) == 1
    records = read_wandb_log(logs[0])
    history = {}
    for r in records:
        if r.WhichOneof("record_type") == "history":
            history.update({item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in r.history.item})
    assert history["test/acc"] == pytest.approx(read_metrics(tmp_path)["test/acc"]) and "val/acc" in history
    config_keys = {u.key or "/".join(u.nested_key) for r in records if r.WhichOneof("record_type") == "config" for u in r.config.update}
    assert {"seed", "backbone", "data"} <= config_keys
    wandb_run = next(r.run for r in records if r.WhichOneof("record_type") == "run")
    assert list(wandb_run.tags) == ["e2e", "wandb"] and wandb_run.display_name == tmp_path.name
    assert any(r.WhichOneof("record_type") == "exit" for r in records)  # the run was finished

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    assert {"val/acc", "train/loss_epoch", "test/acc"} <= set(events.Tags()["scalars"])
    assert "test/confusion_matrix" in events.Tags()["images"]
    rows = list(csv.DictReader(open(tmp_path / "csv" / "metrics.csv")))
    assert any(r["val/acc"] for r in rows) and (tmp_path / "csv" / "hparams.yaml").is_file()


def test_cats_dogs_download_skips_and_reports_corrupt_files(tmp_path):
    import functools
    import http.server
    import threading
    import zipfile

    from transferlab.core.files import sha256_of

    src = tmp_path / "src" / "PetImages"
    for folder, is_cat in (("Cat", True), ("Dog", False)):
        for p in pet_photos(is_cat, 10):
            make_small_copy(p, src / folder / p.name)
    injected = corrupt_copy_tree(src)
    www = tmp_path / "www"
    www.mkdir()
    with zipfile.ZipFile(www / "kagglecatsanddogs_5340.zip", "w") as zf:
        for f in sorted(src.rglob("*")):
            if f.is_file():
                zf.write(f, f.relative_to(src.parent))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(www)))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        root, out = tmp_path / "cats_dogs", tmp_path / "run"
        url = f"http://127.0.0.1:{server.server_address[1]}/kagglecatsanddogs_5340.zip"
        run(
            "train",
            "data=cats_dogs",
            f"data.root={root}",
            f"data.url={url}",
            f"data.sha256={sha256_of(www / 'kagglecatsanddogs_5340.zip')}",
            "trainer.max_epochs=1",
            "data.val_fraction=0.2",
            "data.test_fraction=0.2",
            f"hydra.run.dir={out}",
            *FAST,
        )
    finally:
        server.shutdown()
    reported = sorted(Path(r["path"]).relative_to(root) for r in csv.DictReader(open(out / "skipped_images.csv")))
    assert reported == sorted(Path("PetImages") / p.relative_to(src) for p in injected)
    assert all((root / "PetImages" / p.relative_to(src)).exists() for p in injected)  # nothing deleted
    # Each of the 20 photos is in exactly one split, none of the 3 injected files is.
    good = sorted(Path("PetImages") / p.relative_to(src) for p in src.rglob("*.jpg") if p not in injected)
    assert len(good) == 20 and sorted(Path(p) for p in read_splits(out)) == good
    with open(out / "test_predictions.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == stored_tests(out) >= 2  # the test split was evaluated, and test/acc is over its rows
    assert read_metrics(out)["test/acc"] == pytest.approx(sum(r["label"] == r["predicted"] for r in rows) / len(rows))


def _host_resolves(host: str) -> bool:
    try:
        socket.getaddrinfo(host, 443)
        return True
    except OSError:
        return False


@pytest.mark.skipif(_host_resolves("thor.robots.ox.ac.uk"), reason="network available: the default run would download the dataset")
def test_default_run_offline_says_how_to_point_at_local_data(tmp_path):
    proc = run_cli("train", f"hydra.run.dir={tmp_path}", cwd=tmp_path, check=False)
    assert proc.returncode == 2
    line = proc.stderr.strip().splitlines()[-1]
    assert line.startswith("error: data.root:") and "download failed" in line and "set data.root=" in line


BAD_CONFIGS = [
    (["backbone.name=resnt50"], "error: backbone.name: unknown backbone 'resnt50'"),
    (["backbone=resnt50"], "error: backbone=resnt50: no such option in conf/backbone (did you mean: resnet50"),
    (["data=image_folder"], "error: data.root: Missing mandatory value"),
    (["data=image_folder", "data.root=/no/such/folder"], "error: data.root: no dataset found at /no/such/folder"),
    (["data.batch_size=big"], "error: data.batch_size: expected int, got 'big'"),
]


@pytest.fixture(scope="module")
def bad_config_outcomes(tmp_path_factory) -> list[dict]:
    """Each case through transferlab-train's real main(), all in one process."""
    base = tmp_path_factory.mktemp("bad")
    return run_mains([("train", [f"hydra.run.dir={base / str(i)}", *overrides]) for i, (overrides, _) in enumerate(BAD_CONFIGS)], base)


@pytest.mark.parametrize("case", range(len(BAD_CONFIGS)), ids=[" ".join(o) for o, _ in BAD_CONFIGS])
def test_bad_config_exits_2_with_one_line(bad_config_outcomes, case):
    expected, proc = BAD_CONFIGS[case][1], bad_config_outcomes[case]
    assert proc["code"] == 2, proc["stderr"][-2000:]
    errors = [line for line in proc["stderr"].splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and errors[0].startswith(expected), proc["stderr"][-2000:]
    if "resnt50" in expected:
        assert "did you mean" in errors[0] and "resnet50" in errors[0]
    assert "Traceback" not in proc["stderr"]
