"""sven.opt.lapack: Mᵀ M by syrk against the matmul, and scipy's BLAS held to torch's thread count."""

from __future__ import annotations

import pytest
import torch
from threadpoolctl import threadpool_info

from sven.opt.lapack import column_gram, torch_threads


@pytest.mark.parametrize("layout", ["contiguous", "transposed_view", "float32"])
def test_column_gram_is_the_symmetric_product(layout: str) -> None:
    generator = torch.Generator().manual_seed(0)
    tall = torch.randn(300, 70, generator=generator, dtype=torch.float64)
    if layout == "transposed_view":
        tall = torch.randn(70, 300, generator=generator, dtype=torch.float64).T
    if layout == "float32":
        tall = tall.float()
    gram = column_gram(tall)
    expected = tall.double().T @ tall.double()
    tolerance = 1e-5 if layout == "float32" else 1e-13
    assert gram.dtype == tall.dtype and torch.equal(gram, gram.T)
    assert float((gram.double() - expected).abs().max()) <= tolerance * float(expected.abs().max())


def test_scipy_blas_runs_on_torch_threads_inside_the_block() -> None:
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with torch_threads():
            inside = [pool["num_threads"] for pool in threadpool_info() if "scipy" in pool["filepath"]]
    finally:
        torch.set_num_threads(previous)
    assert inside and set(inside) == {1}
