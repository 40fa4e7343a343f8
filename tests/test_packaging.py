"""A normal (non-editable) install finds conf/ and the experiment presets inside the wheel."""

from __future__ import annotations

import json
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
    # The quickstart, as on a fresh machine: from the installed wheel alone, no source tree, no ../shared, no
    # caches, no network; the photos it trains on ship inside the wheel with their licence.
    sample = [n for n in names if n.startswith("transferlab/data/quickstart_sample/")]
    assert "transferlab/data/quickstart_sample/LICENSE.md" in sample and len(sample) == 112
    assert sum(zipfile.ZipFile(wheel).getinfo(n).file_size for n in sample) <= 10 * 2**20
    fresh = {**env, "HOME": str(tmp_path / "home"), "TRANSFERLAB_PROGRESS": "never"}
    fresh.pop("TRANSFERLAB_CACHE_DIR", None)
    fresh.pop("TRANSFERLAB_DATA_DIR", None)
    subprocess.run(
        [sys.executable, "-m", "transferlab.train", "experiment=quickstart"], cwd=tmp_path, env=fresh, check=True, capture_output=True, timeout=600
    )
    (metrics_file,) = (tmp_path / "logs" / "train" / "runs").glob("*/metrics.json")
    metrics = json.loads(metrics_file.read_text())
    assert metrics["test/acc"] >= 0.9 and metrics["test/acc_ci95"][0] <= metrics["test/acc"]
    assert f"root: {target}" in (metrics_file.parent / "config.yaml").read_text()  # the photos inside the install
    readme = (REPO / "README.md").read_text()
    assert readme.index("transferlab-train experiment=quickstart") == readme.index("transferlab-train")  # the README's first example
