"""The worked example notebook runs top to bottom (slow: it trains three models)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")

NOTEBOOK = Path(__file__).resolve().parents[1] / "examples" / "toy_1d_regression.ipynb"


@pytest.mark.slow
def test_toy_1d_notebook_runs_top_to_bottom_and_damped_sven_beats_adam() -> None:
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    stored = [output for cell in notebook.cells if cell.cell_type == "code" for output in cell.outputs]
    assert any("image/png" in output.get("data", {}) for output in stored), "the notebook is stored without outputs"
    nbclient.NotebookClient(notebook, timeout=600, kernel_name="python3",
                            resources={"metadata": {"path": str(NOTEBOOK.parent)}}).execute()
    namespace_output = notebook.cells[-2].outputs[-1]["data"]["text/plain"]
    final = ast.literal_eval(namespace_output)  # the last expression of the plotting cell: a dict of floats
    assert set(final) == {"sven exact", "sven damped", "adam"}
    assert final["sven damped"] < 0.2 * final["adam"]
