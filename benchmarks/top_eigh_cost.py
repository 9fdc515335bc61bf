"""Cost of the top-k eigenpairs of a B × B float64 Gram matrix by each exact LAPACK route, and of one use
of them (CPU, 1 thread).

    .venv/bin/python benchmarks/top_eigh_cost.py [--repeats 7]

Routes: ``torch.linalg.eigh`` (all pairs), ``scipy.linalg.eigh`` with driver "evd" (all pairs), "evr"
and "evx" with ``subset_by_index`` (top k), ``dsytrd`` + ``dstemr`` for the top k (MRRR on an index
range) + ``torch.ormqr``, ``dsytrd`` + ``dstevd`` + ``torch.ormqr`` on the top k vectors (``top_eigh``
before the reflected basis), and ``sven.opt.eigen.top_eigh`` (``dsytrd`` + ``dstevd``, the vectors kept
as reflectors: ``sven.opt.basis.ReflectedBasis``); the Cholesky factorisation of the certified k ≥ B
route for scale. Every eigen route is timed with one use of its pairs, V diag(1/λ) Vᵀ x for one vector
(what a step's direction does; the reflected basis applies Q twice there). The matrix is G = A Aᵀ for
a Gaussian A (B × 2B): a Marchenko–Pastur spectrum, no clusters. Process CPU time, median of the
repeats, scipy's BLAS held to one thread. Prints a markdown table.
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
from threadpoolctl import threadpool_limits

from sven.opt.basis import Basis, as_basis
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


def back_transformed(gram: torch.Tensor, k: int) -> tuple[np.ndarray, torch.Tensor]:
    """Top k eigenpairs by ``dsytrd``, ``dstevd`` and ``torch.ormqr`` on the top k vectors."""
    n = gram.shape[0]
    reflectors, diagonal, off_diagonal, tau, _ = lapack.dsytrd(gram.numpy(), lower=1,
                                                               lwork=int(lapack.dsytrd_lwork(n, lower=1)[0]))
    values, vectors, _ = lapack.dstevd(diagonal, off_diagonal, compute_v=1)
    top = torch.from_numpy(np.ascontiguousarray(vectors[:, n - k:]))
    top[1:] = torch.ormqr(torch.from_numpy(reflectors)[1:, :-1], torch.from_numpy(tau), top[1:])
    return values[n - k:], top


def used(pairs: tuple, k: int, x: torch.Tensor) -> torch.Tensor:
    """V diag(1/λ) Vᵀ x over the top k pairs (values ascending, vectors a tensor or a ``Basis``)."""
    values, vectors = pairs
    top = torch.as_tensor(np.asarray(values))[-k:]
    basis = as_basis(torch.as_tensor(np.asarray(vectors))[:, -k:] if not isinstance(vectors, Basis) else vectors)
    return basis.combine(basis.project(x) / top)


def routes(gram: torch.Tensor, k: int) -> dict[str, Callable[[], object]]:
    """Each exact route for the top k eigenpairs of ``gram`` (n, n), with one use of them."""
    array, n = gram.numpy(), gram.shape[0]
    subset = dict(subset_by_index=[n - k, n - 1], check_finite=False)
    x = torch.randn(n, dtype=torch.float64)
    return {
        "torch eigh (all)": lambda: used(torch.linalg.eigh(gram), k, x),
        "scipy evd (all)": lambda: used(scipy.linalg.eigh(array, driver="evd", check_finite=False), k, x),
        "scipy evr (top k)": lambda: used(scipy.linalg.eigh(array, driver="evr", **subset), k, x),
        "scipy evx (top k)": lambda: used(scipy.linalg.eigh(array, driver="evx", **subset), k, x),
        "dsytrd + dstemr (top k) + ormqr": lambda: used(tridiagonal_mrrr(gram, k), k, x),
        "dsytrd + dstevd + ormqr (top k)": lambda: used(back_transformed(gram, k), k, x),
        "top_eigh: dsytrd + dstevd, reflected basis": lambda: used(top_eigh(gram, k), k, x),
        "Cholesky (certified k ≥ B route)": lambda: torch.linalg.cholesky(gram),
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    threadpool_limits(1)
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
