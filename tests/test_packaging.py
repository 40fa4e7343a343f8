"""A normal (non-editable) install finds conf/ and the experiment presets inside the wheel."""

from __future__ import annotations

import os
import subprocess
import sys
import zipfile

from conftest import REPO


def test_wheel_ships_configs_and_experiments(tmp_path):
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(tmp_path / "dist"), str(REPO)],
        check=True,
        capture_output=True,
        timeout=300,
    )
    wheel = next((tmp_path / "dist").glob("transferlab-*.whl"))
    names = zipfile.ZipFile(wheel).namelist()
    assert "transferlab/conf/train.yaml" in names and "transferlab/conf/experiment/pets_lite0_frozen.yaml" in names
    assert "hydra_plugins/transferlab_optuna/optuna_sweeper.py" in names  # Hydra finds sweepers only there
    assert "transferlab/conf/hparams_search/lite0_frozen.yaml" in names
    target = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(target)
    # Run from an unrelated folder with only the unpacked wheel ahead of the editable install on the path.
    env = {**os.environ, "PYTHONPATH": str(target)}
    out = subprocess.run(
        [sys.executable, "-m", "transferlab.train", "experiment=pets_lite0_frozen", "--cfg", "job", "--resolve"],
        cwd=tmp_path,
        env=env,
        check=True,
        capture_output=True,
        text=True,
        timeout=300,
    ).stdout
    assert "pets" in out and "max_epochs: 15" in out
    where = subprocess.run(
        [sys.executable, "-c", "import transferlab.config.paths as c; print(c.config_dir())"],
        cwd=tmp_path,
        env=env,
        check=True,
        capture_output=True,
        text=True,
    ).stdout.strip()
    assert where.startswith(str(target))
