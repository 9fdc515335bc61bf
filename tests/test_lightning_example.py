"""examples/lightning_manual.py: Lightning's manual optimisation drives Sven through step(closure)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

pytest.importorskip("lightning", reason="lightning is optional: pip install lightning")

EXAMPLE = Path(__file__).parents[1] / "examples" / "lightning_manual.py"


def test_lightning_manual_optimisation_trains_with_sven() -> None:
    spec = importlib.util.spec_from_file_location("lightning_manual", EXAMPLE)
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    before, after = example.train(epochs=2, size=256)
    assert after < before / 10, f"validation MSE {before:.3g} → {after:.3g}"
