"""``python -m sven.bench``: see ``sven.bench.cli``."""

from sven.bench.cli import main

main()
