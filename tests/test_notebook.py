"""docs/lesson.ipynb, the lesson redone with transferlab, executes offline on the shared sample (nbclient, a real
Jupyter kernel) without an error, and its results are the lesson's outcomes."""

from __future__ import annotations

import os

import pytest

from conftest import REPO, SHARED, require_shared

nbclient = pytest.importorskip("nbclient")
pytestmark = pytest.mark.shared


def test_the_lesson_notebook_executes_offline(tmp_path):
    import nbformat

    require_shared()
    notebook = nbformat.read(REPO / "docs" / "lesson.ipynb", as_version=4)
    os.environ.setdefault("TRANSFERLAB_SHARED", str(SHARED.parent))  # the kernel inherits this process's environment
    client = nbclient.NotebookClient(notebook, timeout=900, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}})
    client.execute()
    outputs = "\n".join(
        o.get("text", "") for cell in notebook.cells if cell.cell_type == "code" for o in cell.outputs if o.get("output_type") == "stream"
    )
    pictures = sum(1 for cell in notebook.cells if cell.cell_type == "code" for o in cell.outputs if "image/png" in o.get("data", {}))
    assert "test accuracy" in outputs and "p(Siamese cat)" in outputs and "after: p(Siamese cat)" in outputs
    assert pictures >= 6  # confusion matrix, a feature map, the ideal cat, the three pictures of the attack
    probe_acc = float(outputs.split("test accuracy ")[1].split(",")[0])
    assert probe_acc >= 0.95  # cats vs dogs with the frozen Lite0 probe
    attacked = float(outputs.split("after: p(Siamese cat) = ")[1].split(",")[0])
    assert attacked >= 0.5  # the dog is called a Siamese cat within 1/255 per pixel
