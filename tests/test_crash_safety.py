"""Killed runs resume to the same result; checkpoints are never half-written; full disks and dead workers are named.

Every fault is real: SIGKILL to the training process group mid-epoch, SIGKILL during a checkpoint write, a
tmpfs that really runs out of space (a private mount namespace via `unshare`), SIGKILL to a DataLoader worker.
"""

from __future__ import annotations

import csv
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from conftest import FAST, cli_env, deterministic_run, read_metrics, run, run_cli
from transferlab.training.checkpointing import AtomicCheckpointIO

DETERMINISTIC = deterministic_run(epochs=4)  # the kill-and-resume runs
COMPARED = ["val/acc", "val/acc_best", "val/loss", "test/acc", "test/loss"]


def start_cli(*overrides: str, log: Path) -> subprocess.Popen:
    """`python -m transferlab.train` in its own process group, so a kill takes its workers with it."""
    with open(log, "w") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "transferlab.train", *overrides], stdout=out, stderr=subprocess.STDOUT, env=cli_env(), start_new_session=True
        )


def wait_for(path: Path, proc: subprocess.Popen, log: Path, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            raise AssertionError(f"{path} never appeared (exit {proc.returncode}):\n{log.read_text()[-4000:]}")
        time.sleep(0.05)


def pause(epoch: int, batch: int, marker: Path, resume_file: Path | None = None) -> list[str]:
    args = [
        "+callbacks.pause._target_=faults.PauseAt",
        f"+callbacks.pause.epoch={epoch}",
        f"+callbacks.pause.batch={batch}",
        f"+callbacks.pause.marker={marker}",
    ]
    return args + ([f"+callbacks.pause.resume_file={resume_file}"] if resume_file else [])


@pytest.mark.slow
def test_killed_mid_epoch_resumes_to_the_uninterrupted_result(tiny_folder, tmp_path):
    common = [f"data.root={tiny_folder}", *DETERMINISTIC]
    reference = tmp_path / "reference"
    run_cli("train", *common, f"hydra.run.dir={reference}")

    expected = read_metrics(reference)
    for resume in ("last", "auto"):
        killed, marker = tmp_path / f"killed_{resume}", tmp_path / f"paused_{resume}"
        log = tmp_path / f"killed_{resume}.log"
        proc = start_cli(*common, f"hydra.run.dir={killed}", *pause(2, 2, marker), log=log)
        wait_for(marker, proc, log)
        os.killpg(proc.pid, signal.SIGKILL)  # in epoch 2, batch 2: epochs 0-1 are checkpointed, epoch 2 is half done
        assert proc.wait(60) == -signal.SIGKILL
        assert torch.load(killed / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)["epoch"] == 1
        assert not (killed / "metrics.json").exists()

        run_cli("train", *common, f"hydra.run.dir={killed}", f"ckpt_path={resume}")
        got = read_metrics(killed)
        assert got["epochs"] == expected["epochs"] == 4
        for key in COMPARED:
            assert got[key] == pytest.approx(expected[key], abs=1e-6), (resume, key, got[key], expected[key])
        val = [r for r in csv.DictReader(open(killed / "csv" / "metrics.csv")) if r["val/acc"]]
        assert [r["epoch"] for r in val] == ["0", "1", "2", "3"]  # the half-done epoch 2 ran once, from its start
    ref_head = torch.load(reference / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)["state_dict"]
    got_head = torch.load(tmp_path / "killed_last" / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)["state_dict"]
    assert max((ref_head[k].float() - got_head[k].float()).abs().max().item() for k in ref_head) <= 1e-6


def test_ctrl_c_exits_130_with_one_line_saying_what_was_kept(tiny_folder, tmp_path):
    """SIGINT to the process group, as a terminal sends it: Lightning stops, we say what is kept and how to resume."""
    out, marker, log = tmp_path / "run", tmp_path / "paused", tmp_path / "run.log"
    proc = start_cli(f"data.root={tiny_folder}", *DETERMINISTIC, f"hydra.run.dir={out}", *pause(1, 1, marker), log=log)
    wait_for(marker, proc, log)
    os.killpg(proc.pid, signal.SIGINT)
    assert proc.wait(180) == 130, log.read_text()[-3000:]  # an upper bound for a hang, not a speed check (a loaded 2-core CI)
    text = log.read_text()
    last = text.strip().splitlines()[-1]
    assert (
        last
        == f"interrupted (Ctrl-C): what was written is in {out}; resume with: transferlab-train <the same arguments> hydra.run.dir={out} ckpt_path=auto"
    )
    assert "Traceback" not in text and "litlogger" not in text and "💡" not in text
    assert torch.load(out / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)["epoch"] == 0


def test_auto_resume_without_a_checkpoint_starts_fresh_and_skips_unreadable_ones(tiny_folder, tmp_path):
    run_dir = tmp_path / "run"
    (run_dir / "checkpoints").mkdir(parents=True)
    (run_dir / "checkpoints" / "last.ckpt").write_bytes(b"PK\x03\x04 truncated")
    run(
        "train",
        "data=image_folder",
        f"data.root={tiny_folder}",
        f"hydra.run.dir={run_dir}",
        "ckpt_path=auto",
        "trainer.max_epochs=1",
        "finetune.head_solver=sgd",
        *FAST,
    )
    log = (run_dir / "train.log").read_text()
    assert "starting fresh" in log and "Not resuming from" in log
    assert read_metrics(run_dir)["epochs"] == 1


WRITER = """
import sys, torch
from transferlab.training.checkpointing import AtomicCheckpointIO
atomic = AtomicCheckpointIO()
for version in range(1000):
    checkpoint = {"version": version, "weights": torch.full((12_500_000,), float(version))}
    if sys.argv[1] == "atomic":
        atomic.save_checkpoint(checkpoint, sys.argv[2])
    else:
        torch.save(checkpoint, sys.argv[2])  # what a hand-written training loop does
    print(version, flush=True)
"""


def _kill_during_save(kind: str, target: Path) -> None:
    """Write 50 MB checkpoints over `target` again and again; SIGKILL while the second one is being written."""
    proc = subprocess.Popen([sys.executable, "-c", WRITER, kind, str(target)], stdout=subprocess.PIPE, text=True, env=cli_env())
    assert proc.stdout.readline().strip() == "0"  # version 0 is complete
    first_size = target.stat().st_size
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:  # the next write has started: a temporary file, or the target rewritten
        if kind == "atomic" and any(p.stat().st_size > 0 for p in target.parent.glob(f".{target.name}.*.tmp")):
            break
        if kind == "naive" and target.stat().st_size < first_size:
            break
        time.sleep(0.001)
    proc.kill()
    proc.wait(30)
    if kind == "atomic":  # the kill landed inside a save: its temporary file is still there
        assert list(target.parent.glob(f".{target.name}.*.tmp"))


def test_a_kill_during_a_checkpoint_save_leaves_the_previous_one_whole(tmp_path):
    from transferlab.core.errors import DataError
    from transferlab.core.safe_load import read_checkpoint

    atomic = tmp_path / "atomic" / "last.ckpt"
    atomic.parent.mkdir()
    for _ in range(2):
        _kill_during_save("atomic", atomic)
        ckpt = torch.load(atomic, map_location="cpu", weights_only=True)
        assert ckpt["weights"].numel() == 12_500_000 and bool((ckpt["weights"] == ckpt["version"]).all())
    # the next save clears what a killed one left behind
    AtomicCheckpointIO().save_checkpoint({"version": -1}, atomic)
    assert [p.name for p in atomic.parent.iterdir()] == ["last.ckpt"]

    # The same kill against a plain torch.save over the file: a truncated checkpoint (what the atomic write prevents).
    naive = tmp_path / "naive" / "last.ckpt"
    naive.parent.mkdir()
    _kill_during_save("naive", naive)
    with pytest.raises(DataError, match="not a readable checkpoint"):
        read_checkpoint(naive)


def _private_tmpfs_prefix() -> list[str]:
    """`unshare` into a private mount namespace (as root, or as an unprivileged user mapped to root)."""
    prefix = ["unshare", "--mount"] if os.geteuid() == 0 else ["unshare", "--user", "--map-root-user", "--mount"]
    probe = subprocess.run([*prefix, "sh", "-c", "mount -t tmpfs -o size=1m tmpfs /mnt"], capture_output=True)
    if probe.returncode != 0:
        if os.environ.get("TRANSFERLAB_REQUIRE_FAULTS"):  # set by .ci/run: there this test must run
            raise AssertionError(f"cannot mount a private tmpfs to fill: {probe.stderr!r}")
        pytest.skip("no private mount namespaces here (unshare --mount failed)")
    return prefix


def test_disk_full_during_a_checkpoint_save_is_one_line_and_keeps_the_previous_checkpoint(tiny_folder, tmp_path):
    prefix = _private_tmpfs_prefix()
    common = ["data=image_folder", f"data.root={tiny_folder}", "trainer.max_epochs=3", "optimizer.lr=3e-2", "finetune.head_solver=sgd", *FAST]
    probe = tmp_path / "probe"
    run_cli("train", *common, "trainer.max_epochs=1", f"hydra.run.dir={probe}")
    size = (probe / "checkpoints" / "last.ckpt").stat().st_size  # best.ckpt and last.ckpt fit, a third file does not

    run_dir, kept = tmp_path / "run", tmp_path / "kept"
    (run_dir / "checkpoints").mkdir(parents=True)
    kept.mkdir()
    train = " ".join([sys.executable, "-m", "transferlab.train", *common, f"hydra.run.dir={run_dir}"])
    script = (
        f"mount -t tmpfs -o size={int(size * 2.5)} tmpfs {run_dir}/checkpoints && {train}; rc=$?; "
        f"cp -a {run_dir}/checkpoints/. {kept}/; ls -a {run_dir}/checkpoints; exit $rc"
    )
    proc = subprocess.run([*prefix, "sh", "-c", script], capture_output=True, text=True, env=cli_env(), timeout=600)
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert len(errors) == 1 and "no space left on the device while saving checkpoint" in errors[0], proc.stderr[-3000:]
    assert "the previous one is intact" in errors[0] and "Traceback" not in proc.stderr
    assert sorted(p.name for p in kept.iterdir()) == ["best.ckpt", "last.ckpt"]  # no temporary file left behind
    for name in ("best.ckpt", "last.ckpt"):
        assert torch.load(kept / name, map_location="cpu", weights_only=True)["epoch"] == 0


def test_a_killed_dataloader_worker_is_named_with_its_cause(tiny_folder, tmp_path):
    marker, resume = tmp_path / "paused", tmp_path / "go"
    log = tmp_path / "run.log"
    proc = start_cli(
        "data=image_folder",
        f"data.root={tiny_folder}",
        f"hydra.run.dir={tmp_path / 'run'}",
        "trainer.max_epochs=3",
        "finetune=full",
        *FAST,
        "data.batch_size=2",
        "data.num_workers=1",
        *pause(1, 1, marker, resume),
        log=log,
    )
    wait_for(marker, proc, log)
    workers = Path(f"/proc/{proc.pid}/task/{proc.pid}/children").read_text().split()
    assert len(workers) == 2  # the persistent training and validation workers, as the OOM killer would find them
    for pid in workers:
        os.kill(int(pid), signal.SIGKILL)
    resume.touch()
    assert proc.wait(120) == 1, log.read_text()[-3000:]
    errors = [line for line in log.read_text().splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "DataLoader worker (pid " in errors[0] and "was killed by SIGKILL" in errors[0], log.read_text()[-3000:]
    assert errors[0].split("(pid ")[1].split(")")[0] in workers
    assert "out-of-memory" in errors[0] and "data.num_workers" in errors[0] and "Traceback" not in log.read_text()


# -- the one atomic write (core.files.atomic_write): JSON results, feature-cache shards and checkpoints ---------------
def test_atomic_write_fsyncs_the_file_then_the_folder_and_leaves_the_old_file_on_error(tmp_path, monkeypatch):
    """bytes or a writer callback; the temporary file is fsynced before the rename and the folder after it (each
    fsync recorded by what it was called on, then done for real); a writer that fails keeps the old file whole."""
    from transferlab.core.files import atomic_write, write_json

    synced: list[str] = []
    real_fsync = os.fsync

    def recording_fsync(fd: int) -> None:
        path = Path(os.readlink(f"/proc/self/fd/{fd}"))
        synced.append("folder" if path.is_dir() else ("temporary" if path.name.endswith(".tmp") else str(path)))
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", recording_fsync)
    target = tmp_path / "out" / "result.json"
    write_json(target, {"a": 1})
    assert target.read_text() == '{\n  "a": 1\n}\n' and synced == ["temporary", "folder"]
    synced.clear()
    atomic_write(target, lambda fh: torch.save({"w": torch.arange(3)}, fh))  # streamed into the file handle
    assert torch.load(target, weights_only=True)["w"].tolist() == [0, 1, 2] and synced == ["temporary", "folder"]

    def failing(fh) -> None:
        fh.write(b"half of a new file")
        raise OSError(28, "No space left on device")

    before = target.read_bytes()
    with pytest.raises(OSError, match="No space left"):
        atomic_write(target, failing)
    assert target.read_bytes() == before and [p.name for p in target.parent.iterdir()] == ["result.json"]
