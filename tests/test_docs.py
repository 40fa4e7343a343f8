"""The user guide: the README stays a short tour, the configuration reference matches conf/, the site builds."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys

import pytest

from conftest import REPO


def test_the_configuration_reference_is_generated_from_conf():
    proc = subprocess.run([sys.executable, str(REPO / "scripts" / "config_reference.py"), "--check"], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    reference = (REPO / "docs" / "configuration.md").read_text()
    for key in ("`ckpt_path`", "`data.image_column`", "`mlflow.tracking_uri`", "`backbone.weights`", "`max_request_mb`"):
        assert key in reference, key


def test_the_readme_is_a_short_guide_whose_links_exist():
    readme = (REPO / "README.md").read_text()
    assert len(readme.splitlines()) <= 250
    assert "python -m pytest -q" in readme  # the test command CI runs
    for target in re.findall(r"\]\(([^)#]+)(?:#[^)]*)?\)", readme):
        if not target.startswith("http"):
            assert (REPO / target).exists(), target


@pytest.mark.skipif(shutil.which("mkdocs") is None and not os.environ.get("CI"), reason="mkdocs not installed (transferlab[docs])")
def test_the_site_builds_strictly(tmp_path):
    proc = subprocess.run(
        ["mkdocs", "build", "--strict", "-d", str(tmp_path / "site")],
        cwd=REPO,
        capture_output=True,
        text=True,
        env={**os.environ, "NO_MKDOCS_2_WARNING": "1"},
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (tmp_path / "site" / "configuration" / "index.html").is_file()
