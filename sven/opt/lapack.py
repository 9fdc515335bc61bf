"""scipy's BLAS and LAPACK on the CPU, run on torch's thread count.

scipy ships its own OpenBLAS, which ignores ``torch.set_num_threads`` and would take every core
(on a loaded machine its threads spin: the top-k eigenpairs of a 256 × 256 matrix took 38 ms of CPU
time instead of 6). Every call here holds it to ``torch.get_num_threads()``.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor


@functools.cache
def _controller() -> Any:
    """threadpoolctl's controller of the BLAS libraries loaded when first asked (after scipy's)."""
    import scipy.linalg.blas  # noqa: F401  (loads scipy's OpenBLAS before the controller looks)
    from threadpoolctl import ThreadpoolController

    return ThreadpoolController()


@contextmanager
def torch_threads() -> Iterator[None]:
    """scipy's BLAS/LAPACK limited to ``torch.get_num_threads()`` threads inside the block."""
    with _controller().limit(limits=torch.get_num_threads(), user_api="blas"):
        yield


def column_gram(tall: Tensor) -> Tensor:
    """Mᵀ M (cols, cols) of M (rows, cols): BLAS ``dsyrk`` for float64 on the CPU (half a matmul's flops,
    the lower triangle, mirrored), else a matmul."""
    if tall.device.type != "cpu" or tall.dtype != torch.float64:
        return tall.T @ tall
    from scipy.linalg.blas import dsyrk

    with torch_threads():
        lower = torch.from_numpy(dsyrk(1.0, tall.numpy().T, lower=1))
    return lower.tril() + lower.tril(-1).T
