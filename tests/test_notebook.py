"""notebooks/walkthrough.ipynb runs top to bottom in the venv's `python3` kernel (demo set, tiny model)."""

from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

NOTEBOOK = Path(__file__).parents[1] / "notebooks" / "walkthrough.ipynb"


def test_notebook_is_committed_without_outputs():
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    code = [cell for cell in notebook.cells if cell.cell_type == "code"]
    assert code and all(not cell.outputs and cell.execution_count is None for cell in code)


@pytest.mark.slow  # trains a tiny model on one demo category and tests it: a few minutes on the shared 2-core CPU
def test_notebook_executes_top_to_bottom(tmp_path):
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    client = NotebookClient(notebook, kernel_name="python3", timeout=900, resources={"metadata": {"path": str(tmp_path)}})
    client.execute()  # a failing cell raises CellExecutionError with its traceback
    images = [o for cell in notebook.cells for o in cell.get("outputs", []) if "image/png" in o.get("data", {})]
    assert len(images) == 6 + 2 + 1  # a heatmap figure per head with a map, the two ablation plots, the API maps
    assert (tmp_path / "runs" / "ablation" / "ablation.csv").is_file()
    assert len((tmp_path / "runs" / "ablation" / "ablation.csv").read_text().splitlines()) == 1 + 6
