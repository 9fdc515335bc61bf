"""The PINN example notebook runs top to bottom and Sven ends far below Adam (slow: it trains two models)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")

NOTEBOOK = Path(__file__).resolve().parents[1] / "examples" / "poisson_pinn.ipynb"


@pytest.mark.slow
def test_poisson_notebook_runs_top_to_bottom_and_sven_beats_adam() -> None:
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    stored = [output for cell in notebook.cells if cell.cell_type == "code" for output in cell.outputs]
    assert any("image/png" in output.get("data", {}) for output in stored), "the notebook is stored without outputs"
    nbclient.NotebookClient(notebook, timeout=120, kernel_name="python3",
                            resources={"metadata": {"path": str(NOTEBOOK.parent)}}).execute()
    final = ast.literal_eval(notebook.cells[-2].outputs[-1]["data"]["text/plain"])
    assert set(final) == {"sven", "adam"}
    assert final["sven"] < 0.05 * final["adam"]
