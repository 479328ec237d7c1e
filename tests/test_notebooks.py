"""Every notebook runs top to bottom, so none can rot (the training one at its smallest
setting: GXPO_NOTEBOOK_SMOKE=1, a tiny random model for two steps)."""

from pathlib import Path

import nbclient
import nbformat
import pytest

NOTEBOOKS = Path(__file__).resolve().parents[1] / "notebooks"


@pytest.mark.parametrize("name", ["quadratic_sanity.ipynb", "train_cpu_default.ipynb"])
def test_notebook_executes(name, tmp_path, monkeypatch):
    monkeypatch.setenv("GXPO_NOTEBOOK_SMOKE", "1")  # the kernel inherits it
    nb = nbformat.read(NOTEBOOKS / name, as_version=4)
    nbclient.NotebookClient(
        nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}
    ).execute()  # raises CellExecutionError on any error
    outputs = [o for cell in nb.cells if cell.cell_type == "code" for o in cell.outputs]
    assert any("image/png" in o.get("data", {}) for o in outputs)
