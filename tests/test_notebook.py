"""The example notebooks run top to bottom and end with Sven below Adam (slow: each trains models)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


@pytest.mark.slow
@pytest.mark.parametrize("name, timeout, sven, adam_factor", [
    ("toy_1d_regression.ipynb", 600, "sven damped", 0.2),
    ("poisson_pinn.ipynb", 120, "sven", 0.05),
])
def test_notebook_runs_top_to_bottom_and_sven_ends_below_adam(name: str, timeout: int, sven: str,
                                                              adam_factor: float) -> None:
    """The last expression of the plotting cell is a dict of final errors; Sven's is a fraction of Adam's."""
    notebook = nbformat.read(EXAMPLES / name, as_version=4)
    stored = [output for cell in notebook.cells if cell.cell_type == "code" for output in cell.outputs]
    assert any("image/png" in output.get("data", {}) for output in stored), "the notebook is stored without outputs"
    nbclient.NotebookClient(notebook, timeout=timeout, kernel_name="python3",
                            resources={"metadata": {"path": str(EXAMPLES)}}).execute()
    final = ast.literal_eval(notebook.cells[-2].outputs[-1]["data"]["text/plain"])
    assert sven in final and "adam" in final
    assert final[sven] < adam_factor * final["adam"]
