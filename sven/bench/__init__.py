"""Reproduction of the paper's experiments: tasks, baselines, sweeps, plots and the results page.

Run ``python -m sven.bench --help`` (or the ``sven-bench`` console script).
"""
