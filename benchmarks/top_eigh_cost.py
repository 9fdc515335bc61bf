"""Cost of the top-k eigenpairs of a B × B float64 Gram matrix by each exact LAPACK route (CPU, 1 thread).

    .venv/bin/python benchmarks/top_eigh_cost.py [--repeats 7]

Routes: ``torch.linalg.eigh`` (all pairs; what the gram route used for k < B), ``scipy.linalg.eigh``
with driver "evd" (all pairs), "evr" and "evx" with ``subset_by_index`` (top k), and
``sven.opt.eigen.top_eigh`` (``dsytrd`` + ``dstevd`` + ``torch.ormqr`` on the top k vectors), and
``dsytrd`` + ``dstemr`` for the top k (MRRR on an index range) + ``torch.ormqr``;
the Cholesky factorisation of the certified k ≥ B route for scale. The matrix is G = A Aᵀ for a
Gaussian A (B × 2B): a Marchenko–Pastur spectrum, no clusters. Process CPU time, median of the repeats.
Prints a markdown table.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import numpy as np
import scipy.linalg
import scipy.linalg.lapack as lapack
import torch

from sven.opt.eigen import top_eigh

SIZES = (256, 512, 1024)


def cpu_ms(call: Callable[[], object], repeats: int) -> float:
    """Median process CPU time of ``call`` in ms."""
    times = []
    for _ in range(repeats):
        started = time.process_time()
        call()
        times.append(time.process_time() - started)
    return 1e3 * statistics.median(times)


def tridiagonal_mrrr(gram: torch.Tensor, k: int) -> tuple[np.ndarray, torch.Tensor]:
    """Top k eigenpairs by ``dsytrd``, ``dstemr`` on the index range n−k+1..n, and ``torch.ormqr``."""
    n = gram.shape[0]
    reflectors, diagonal, off_diagonal, tau, _ = lapack.dsytrd(gram.numpy(), lower=1,
                                                               lwork=int(lapack.dsytrd_lwork(n, lower=1)[0]))
    off_diagonal = np.append(off_diagonal, 0.0)
    work, iwork, _ = lapack.dstemr_lwork(diagonal, off_diagonal, 2, 0.0, 0.0, n - k + 1, n)
    _, values, vectors, _ = lapack.dstemr(diagonal, off_diagonal, 2, 0.0, 0.0, n - k + 1, n,
                                          lwork=int(work), liwork=int(iwork))
    top = torch.from_numpy(np.ascontiguousarray(vectors[:, :k]))
    top[1:] = torch.ormqr(torch.from_numpy(reflectors)[1:, :-1], torch.from_numpy(tau), top[1:])
    return values[:k], top


def routes(gram: torch.Tensor, k: int) -> dict[str, Callable[[], object]]:
    """Each exact route for the top k eigenpairs of ``gram`` (n, n)."""
    array, n = gram.numpy(), gram.shape[0]
    subset = dict(subset_by_index=[n - k, n - 1], check_finite=False)
    return {
        "torch eigh (all)": lambda: torch.linalg.eigh(gram),
        "scipy evd (all)": lambda: scipy.linalg.eigh(array, driver="evd", check_finite=False),
        "scipy evr (top k)": lambda: scipy.linalg.eigh(array, driver="evr", **subset),
        "scipy evx (top k)": lambda: scipy.linalg.eigh(array, driver="evx", **subset),
        "dsytrd + dstemr (top k) + ormqr": lambda: tridiagonal_mrrr(gram, k),
        "top_eigh: dsytrd + dstevd + ormqr (top k)": lambda: top_eigh(gram, k),
        "Cholesky (certified k ≥ B route)": lambda: torch.linalg.cholesky(gram),
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    columns = [(n, k) for n in SIZES for k in (n // 2, n // 4)]
    times: dict[str, list[float]] = {}
    for n, k in columns:
        a = torch.randn(n, 2 * n, generator=torch.Generator().manual_seed(n), dtype=torch.float64)
        for name, call in routes(a @ a.T, k).items():
            times.setdefault(name, []).append(cpu_ms(call, args.repeats))
    print("| route | " + " | ".join(f"B = {n}, k = {k}" for n, k in columns) + " |")
    print("|---|" + "---|" * len(columns))
    for name, row in times.items():
        print(f"| {name} | " + " | ".join(f"{t:.1f}" for t in row) + " |")


if __name__ == "__main__":
    main()
