"""Bad configurations: each exits 2 with one line naming the key, the expected form and the given value."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import make_small_copy, pet_photos, run_mains

# (id, overrides, the line's start, further parts it must contain). "{empty}" / "{one_class}" are data folders.
CASES = [
    ("unknown group option", ["backbone=resnt50"], "error: backbone=resnt50: no such option", ["did you mean: resnet50"]),
    ("unknown optimizer option", ["optimizer=adamm"], "error: optimizer=adamm: no such option", ["did you mean: adam", "options:"]),
    ("mistyped key", ["data.batchsize=8"], "error: data.batchsize: unknown key", ["did you mean: batch_size", "+data.batchsize=8"]),
    ("key at the wrong level", ["max_epochs=3"], "error: max_epochs: unknown key", ["did you mean: trainer.max_epochs", "+max_epochs=3"]),
    ("wrong type", ["data.batch_size=big"], "error: data.batch_size: expected int", ["got 'big'"]),
    ("wrong type for the seed", ["seed=abc"], "error: seed: expected int", ["got 'abc'"]),
    ("negative learning rate", ["optimizer.lr=-0.01"], "error: optimizer.lr: expected a number > 0", ["got -0.01"]),
    ("learning rate not a number", ["optimizer.lr=fast"], "error: optimizer.lr: expected a number > 0", ["got 'fast'"]),
    ("zero epochs", ["trainer.max_epochs=0"], "error: trainer.max_epochs: expected an integer >= 1", ["got 0"]),
    ("dropout out of range", ["finetune.head_dropout=1.5"], "error: finetune.head_dropout: expected a probability in [0, 1)", ["got 1.5"]),
    ("split fractions out of range", ["data.val_fraction=1.2"], "error: data.val_fraction: expected a fraction in [0, 1)", ["got 1.2"]),
    ("missing required value", ["data=image_folder"], "error: data.root: Missing mandatory value", ["data.root=..."]),
    (
        "nonexistent data root",
        ["data=image_folder", "data.root=/no/such/folder"],
        "error: data.root: no dataset found at /no/such/folder",
        ["(no such folder)", "expected one sub-folder of images per class"],
    ),
    (
        "empty dataset",
        ["data=image_folder", "data.root={empty}"],
        "error: data.root: no dataset found at {empty}",
        ["(an empty folder)", "expected one sub-folder"],
    ),
    (
        "a class with no images",
        ["data=image_folder", "data.root={one_class}"],
        "error: data.root: class 'dog' has no usable training images",
        ["(0 file(s) found, 0 refused)", "expected at least one image per class"],
    ),
    ("unknown backbone", ["backbone.name=resnt50"], "error: backbone.name: unknown backbone 'resnt50'", ["did you mean", "resnet50"]),
    (
        "gradual without an unfreeze epoch",
        ["finetune=gradual", "finetune.unfreeze_at_epoch=null"],
        "error: finetune.unfreeze_at_epoch:",
        ["finetune=gradual needs the epoch", "finetune.unfreeze_at_epoch=2"],
    ),
    (
        "unfreeze epoch after the last epoch",
        ["finetune=gradual", "finetune.unfreeze_at_epoch=8", "trainer.max_epochs=5"],
        "error: finetune.unfreeze_at_epoch: expected an epoch below trainer.max_epochs=5",
        ["got 8"],
    ),
    ("unknown precision", ["trainer.precision=fp8"], "error: trainer.precision: expected one of", ["bf16-mixed", "got 'fp8'"]),
    ("unknown accelerator", ["trainer.accelerator=gpuu"], "error: trainer.accelerator: expected one of", ["got 'gpuu'", "did you mean: gpu"]),
    ("unknown task", ["data.task=bread"], "error: data.task: expected one of breeds, species", ["got 'bread'", "did you mean: breeds"]),
    (
        "unknown cache storage",
        ["performance.feature_cache.storage=ram"],
        "error: performance.feature_cache.storage: expected one of disk, memory",
        ["got 'ram'"],
    ),
    ("unknown finetune mode", ["finetune.mode=freeze"], "error: finetune.mode: expected one of frozen, full, gradual", ["did you mean: frozen"]),
    ("override syntax", ["optimizer.lr=[1,"], "error: optimizer.lr: expected key=value in Hydra's override syntax", ["got 'optimizer.lr=[1,'"]),
    ("nonexistent checkpoint", ["ckpt_path=/no/such/run/last.ckpt"], "error: ckpt_path: /no/such/run/last.ckpt does not exist", []),
]


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> dict[str, str]:
    base = tmp_path_factory.mktemp("bad_data")
    (base / "empty").mkdir()
    for src in pet_photos(True, 3):
        make_small_copy(src, base / "one_class" / "cat" / src.name)
    (base / "one_class" / "dog").mkdir()
    return {"empty": str(base / "empty"), "one_class": str(base / "one_class")}


def _run(overrides: list[str], out: Path, full_error: bool = False) -> subprocess.CompletedProcess:
    env = {**os.environ, "HYDRA_FULL_ERROR": "1" if full_error else "0"}
    return subprocess.run(
        [sys.executable, "-m", "transferlab.train", *COMMON, *overrides, f"hydra.run.dir={out}"], env=env, capture_output=True, text=True, timeout=300
    )


COMMON = ["trainer.max_epochs=1"]  # every case fails before any data is read


@pytest.fixture(scope="module")
def outcomes(folders, tmp_path_factory) -> dict[str, tuple[list[str], dict]]:
    """Every case through the real `main()` of transferlab-train, all in one process (conftest.run_mains)."""
    base = tmp_path_factory.mktemp("bad_configs")
    argvs = [[*COMMON, *(o.format(**folders) for o in case[1]), f"hydra.run.dir={base / str(i)}"] for i, case in enumerate(CASES)]
    results = run_mains([("train", argv) for argv in argvs], base, env={**os.environ, "HYDRA_FULL_ERROR": "0"})
    return {case[0]: (argv, result) for case, argv, result in zip(CASES, argvs, results)}


def test_at_least_15_kinds_of_bad_config():
    assert len(CASES) >= 15 and len({c[0] for c in CASES}) == len(CASES)


@pytest.mark.parametrize("name,overrides,start,parts", CASES, ids=[c[0] for c in CASES])
def test_bad_config_exits_2_with_one_line(outcomes, folders, name, overrides, start, parts):
    args, result = outcomes[name]
    output = result["stdout"] + result["stderr"]
    assert result["code"] == 2, output[-3000:]
    errors = [line for line in result["stderr"].splitlines() if line.startswith("error:")]
    assert len(errors) == 1, output[-3000:]
    line = errors[0]
    assert line.startswith(start.format(**folders)), line
    for part in parts:
        assert part in line, line
    assert "Traceback" not in output and "HYDRA_FULL_ERROR" not in output


EXIT_CASES = {"hydra's error": ["data.batchsize=8"], "ours": ["optimizer.lr=-0.01"]}


@pytest.fixture(scope="module")
def full_error_outcomes(tmp_path_factory) -> dict[str, dict]:
    """The same cases with HYDRA_FULL_ERROR=1, both through the real main() in one process."""
    base = tmp_path_factory.mktemp("full_error")
    calls = [("train", [*COMMON, *overrides, f"hydra.run.dir={base / str(i)}"]) for i, overrides in enumerate(EXIT_CASES.values())]
    return dict(zip(EXIT_CASES, run_mains(calls, base, env={**os.environ, "HYDRA_FULL_ERROR": "1"})))


@pytest.mark.parametrize("case", list(EXIT_CASES))
def test_process_exit_code_and_full_error_traceback(tmp_path, full_error_outcomes, case):
    proc = _run(EXIT_CASES[case], tmp_path / "plain")  # the exit status of a real process
    assert proc.returncode == 2 and proc.stderr.count("error:") == 1 and "Traceback" not in proc.stderr
    full = full_error_outcomes[case]
    assert full["code"] != 0 and "Traceback" in full["stderr"]
