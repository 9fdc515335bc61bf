"""Importing the library changes no global state: no plotting backend is chosen, pyplot is not even loaded."""

from __future__ import annotations

import subprocess
import sys


def test_importing_the_library_and_its_demo_loads_no_pyplot() -> None:
    code = (
        "import sys, sven, sven.demo, sven.bench.cli, sven.bench.report, sven.bench.tables; "
        "assert 'matplotlib.pyplot' not in sys.modules, 'pyplot was imported'; "
        "import matplotlib; print(matplotlib.rcParams['backend'])"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env={"MPLBACKEND": "svg"})
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "svg"
