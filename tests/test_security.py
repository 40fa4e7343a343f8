"""Hostile files and leaked credentials: pickles that run code, archives that escape, secrets in run outputs."""

from __future__ import annotations

import io
import os
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import pytest
import torch

from conftest import FAST, PETS, cli_env, make_datamodule, make_small_copy, pet_photos, run_cli, run_mains
from transferlab.core.errors import DataError
from transferlab.data.download import safe_extract_tar, safe_extract_zip
from transferlab.data.oxford_pets import OxfordPetsDataModule


class _RunsCode:
    """Unpickling this runs `touch <marker>`: the classic checkpoint exploit."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def craft_checkpoint(source: Path, folder: Path) -> tuple[Path, Path]:
    """A real transferlab checkpoint with one extra entry whose unpickling would create `marker`."""
    folder.mkdir(parents=True, exist_ok=True)
    marker = folder / "code_was_run"
    ckpt = torch.load(source, map_location="cpu", weights_only=True)
    ckpt["hyper_parameters"]["payload"] = _RunsCode(marker)
    path = folder / "evil.ckpt"
    torch.save(ckpt, path)
    return path, marker


HOSTILE_USES = {
    "train resume": ("train", ["ckpt_path={ckpt}", "data=oxford_pets", "data.task=species", f"data.root={PETS}"]),
    "eval": ("eval", ["ckpt_path={ckpt}"]),
    "predict": ("predict", ["ckpt_path={ckpt}", f"input={PETS}/Abyssinian_101.jpg"]),
    "backbone weights": ("train", ["backbone.weights={ckpt}", "data=oxford_pets", "data.task=species", f"data.root={PETS}"]),
}


@pytest.fixture(scope="module")
def hostile_outcomes(species_run, tmp_path_factory) -> dict[str, tuple[Path, Path, dict]]:
    """Each command given its own crafted checkpoint, all through the real main()s in one process."""
    base = tmp_path_factory.mktemp("hostile")
    crafted = {name: craft_checkpoint(species_run / "checkpoints" / "best.ckpt", base / str(i)) for i, name in enumerate(HOSTILE_USES)}
    first_path, first_marker = next(iter(crafted.values()))
    # The file really is hostile: an unsafe load (weights_only=False) runs the command.
    subprocess.run([sys.executable, "-c", f"import torch; torch.load({str(first_path)!r}, weights_only=False)"], check=True, env=cli_env())
    assert first_marker.exists()
    first_marker.unlink()
    calls = [
        (command, [*(a.format(ckpt=crafted[name][0]) for a in args), f"hydra.run.dir={base / str(i) / 'run'}"])
        for i, (name, (command, args)) in enumerate(HOSTILE_USES.items())
    ]
    results = run_mains(calls, base)
    return {name: (*crafted[name], result) for name, result in zip(HOSTILE_USES, results)}


@pytest.mark.shared
@pytest.mark.parametrize("use", list(HOSTILE_USES))
def test_a_checkpoint_that_would_run_code_is_refused(hostile_outcomes, use):
    path, marker, proc = hostile_outcomes[use]
    errors = [line for line in proc["stderr"].splitlines() if line.startswith("error:")]
    assert proc["code"] == 2 and len(errors) == 1, proc["stderr"][-3000:]
    assert f"{path} refused: loading it would call posix.system" in errors[0] and "weights_only=True" in errors[0]
    assert not marker.exists() and "Traceback" not in proc["stderr"]


# -- archives ------------------------------------------------------------------------------------------------
def _tar(path: Path, members: list[tuple[str, str, str]]) -> Path:
    """members: (kind, name, data or link target); kind in file | symlink | hardlink | fifo."""
    with tarfile.open(path, "w:gz") as tar:
        for kind, name, payload in members:
            info = tarfile.TarInfo(name)
            if kind == "file":
                info.size = len(payload)
                tar.addfile(info, io.BytesIO(payload.encode()))
                continue
            info.type = {"symlink": tarfile.SYMTYPE, "hardlink": tarfile.LNKTYPE, "fifo": tarfile.FIFOTYPE}[kind]
            info.linkname = payload
            tar.addfile(info)
    return path


HOSTILE_TARS = {
    "dot-dot": ([("file", "images/ok.jpg", "x"), ("file", "../escaped.txt", "owned")], "path outside"),
    "absolute path": ([("file", "/tmp/transferlab_escaped.txt", "owned")], "absolute path"),
    "symlink out": ([("symlink", "images/passwd", "/etc/passwd")], "link to '/etc/passwd'"),
    "relative symlink out": ([("symlink", "images/up", "../../..")], "outside"),
    "hardlink out": ([("hardlink", "images/shadow", "../../etc/shadow")], "outside"),
    "write through a link": ([("symlink", "images/inside", "."), ("file", "images/inside/x.txt", "x")], "through a link member"),
    "fifo": ([("fifo", "images/pipe", "")], "special file"),
}


@pytest.mark.parametrize("name", sorted(HOSTILE_TARS))
def test_tar_extraction_refuses_members_that_escape(tmp_path, name):
    members, reason = HOSTILE_TARS[name]
    archive = _tar(tmp_path / "evil.tar.gz", members)
    target = tmp_path / "data" / "pets"
    with pytest.raises(DataError, match="refusing unsafe member") as info:
        safe_extract_tar(archive, target)
    assert reason in str(info.value) and "\n" not in str(info.value)
    assert not (tmp_path / "data" / "escaped.txt").exists() and not Path("/tmp/transferlab_escaped.txt").exists()
    assert not any(target.rglob("*"))  # nothing extracted: the checks run before the first byte is written


@pytest.mark.parametrize(
    "name,reason",
    [("../escaped.txt", "path outside"), ("/abs.txt", "absolute path"), ("C:/windows.txt", "absolute path"), ("link", "a symbolic link")],
)
def test_zip_extraction_refuses_members_that_escape(tmp_path, name, reason):
    archive = tmp_path / "evil.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        zf.writestr("PetImages/Cat/1.jpg", b"x")
        info = zipfile.ZipInfo(name)
        if name == "link":
            info.external_attr = 0o120777 << 16
        zf.writestr(info, "/etc/passwd" if name == "link" else "owned")
    with pytest.raises(DataError, match=f"refusing unsafe member.*{reason}"):
        safe_extract_zip(archive, tmp_path / "out")
    assert not (tmp_path / "escaped.txt").exists() and not (tmp_path / "out").exists()


def test_oxford_pets_downloads_verify_md5_and_extract_safely(tmp_path, monkeypatch, http_server):
    """The real download path against a local server: official layout, md5 checked, wrong checksum discarded."""
    import hashlib

    www, url = http_server
    staging = tmp_path / "staging"
    for src in pet_photos(True, 3) + pet_photos(False, 3):
        make_small_copy(src, staging / "images" / src.name, 64)
    (staging / "annotations").mkdir()
    (staging / "annotations" / "README").write_text("annotations\n")
    resources = []
    for part in ("images", "annotations"):
        with tarfile.open(www / f"{part}.tar.gz", "w:gz") as tar:
            tar.add(staging / part, arcname=part)
        resources.append((f"{url}/{part}.tar.gz", hashlib.md5((www / f"{part}.tar.gz").read_bytes()).hexdigest()))

    monkeypatch.setattr(OxfordPetsDataModule, "resources", tuple(resources))
    dm = make_datamodule("oxford_pets", root=str(tmp_path / "pets"), task="species", download=True, cache_dir=str(tmp_path / "cache"))
    dm.setup()
    assert sum(len(v) for v in dm.splits.values()) == 6 and (tmp_path / "pets" / "images.tar.gz.sha256").exists()

    monkeypatch.setattr(OxfordPetsDataModule, "resources", ((resources[0][0], "0" * 32),))
    bad = make_datamodule("oxford_pets", root=str(tmp_path / "pets2"), task="species", download=True)
    with pytest.raises(DataError, match="checksum mismatch .* expected md5 0{32}, got .* the file was discarded"):
        bad.setup()
    assert not list((tmp_path / "pets2").glob("*.tar.gz*"))


# -- secrets -------------------------------------------------------------------------------------------------
PLANTED = {
    "WANDB_API_KEY": "planted-wandb-0123456789abcdef",
    "HF_TOKEN": "planted-hf-token-5551234",
    "AWS_SECRET": "planted-aws-secret-777",
    "DATASET_KEY": "planted-dataset-key-31337",
}


def test_planted_secrets_never_reach_configs_logs_or_checkpoints(tiny_folder, tmp_path):
    run_dir = tmp_path / "run"
    env = cli_env(**PLANTED, WANDB_MODE="offline", WANDB_DIR=str(tmp_path / "wandb_home"))
    proc = run_cli(
        "train",
        "data=image_folder",
        f"data.root={tiny_folder}",
        f"hydra.run.dir={run_dir}",
        "trainer.max_epochs=1",
        "logger=many",
        f"paths.log_dir={tmp_path / 'logs'}",  # the MLflow store of logger=many
        "tags=[dev,${oc.env:HF_TOKEN}]",
        "+run_note=${oc.env:DATASET_KEY}",
        "+logger.wandb.notes=${oc.env:AWS_SECRET}",
        "optimized_metric=${oc.env:WANDB_API_KEY}",
        f"+literal_on_command_line={PLANTED['DATASET_KEY']}",
        *FAST,
        env=env,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    files = [p for p in [*run_dir.rglob("*"), *(tmp_path / "wandb_home").rglob("*"), *(tmp_path / "logs").rglob("*")] if p.is_file()]
    kinds = {p.suffix for p in files}
    assert {
        ".ckpt",
        ".yaml",
        ".log",
        ".csv",
        ".json",
        ".wandb",
        ".db",
    } <= kinds  # .db: the MLflow store (params, tags) and any(p.name.startswith("events.out") for p in files)
    leaks = [(p, name) for p in files for name, value in PLANTED.items() if value.encode() in p.read_bytes()]
    for name, value in PLANTED.items():
        if value in proc.stdout + proc.stderr:
            leaks.append(("console", name))
    assert not leaks, leaks
    assert "***" in (run_dir / "config.yaml").read_text()  # the masked values are there, as ***
