"""Loud costs: the warning a step gives before it leaves the Gram step's fast path for a far dearer route.

Every option either runs at about the cost of the Gram step (O(activations) + one B × B float64 matrix
within ``gram_memory``) or says, before paying, what it costs and what to use instead.
"""

from __future__ import annotations

import warnings

SIDE_MODES = ("gram", "randomized", "randomized_v2", "scipy", "lobpcg")
"""svd_modes that form the smaller side of M (n × n float64, n = min(rows, cols)) and factorise or decompose it."""
DENSE_MODES = ("torch", "lq")
"""svd_modes that materialise M itself (rows × cols, cast to float64)."""
ENTRYWISE_GRAM_LIMIT = 10**11
"""float64 multiply-adds B²·n of a masked Gram matrix summed entry by entry above which it warns (about 10 s per
step on one CPU core: benchmarks/mask_cost.py measured 3.3e9 in 0.35 s)."""
MULTIPLY_ADDS_PER_SECOND = 10**10
"""What one CPU core does in float64, for the seconds a warning quotes."""


class SvenCostWarning(UserWarning):
    """An option whose step costs far more time or memory than the Gram step; the message says how much and what
    to use instead."""


def warn_cost(message: str) -> None:
    """Issue ``message`` as a ``SvenCostWarning`` (attributed to the routine that found the cost)."""
    warnings.warn(f"Sven: {message}", SvenCostWarning, stacklevel=3)


def gram_fits(rows: int, gram_memory: int) -> bool:
    """Whether three float64 (rows, rows) matrices fit in ``gram_memory`` bytes: G, G + λI (or the certificate's
    G − τI) and its Cholesky factor."""
    return 3 * rows * rows * 8 <= gram_memory


def _gib(elements: float) -> str:
    return f"{elements * 8 / 2**30:.1f} GiB"


def route_cost(mode: str, shape: tuple[int, int], k: int, damping: float, gram_memory: int) -> str | None:
    """Why solving M (rows, cols) by ``mode`` is far off the fast path, or None when it is not.

    A side mode past ``gram_memory`` (three float64 n × n matrices) forms an n × n matrix and spends O(n³)
    flops on it; a dense mode past it materialises M in float64. ``k`` and ``damping`` (the smallest λ the
    step may use) choose the advice: only a damped step keeping every row (k ≥ rows) can go matrix-free.
    """
    rows, cols = shape
    side = min(rows, cols)
    if mode in SIDE_MODES and not gram_fits(side, gram_memory):
        cost = (f"svd_mode {mode!r} forms the {side} × {side} float64 side of M ({_gib(side * side)}, above "
                f"gram_memory = {gram_memory / 2**20:.0f} MiB for it, its copy and its factor) and spends "
                f"~{side}³ = {float(side) ** 3:.1e} flops on it (minutes on a CPU)")
    elif mode in DENSE_MODES and rows * cols * 8 > gram_memory:
        cost = (f"svd_mode {mode!r} materialises M ({rows} × {cols}: {_gib(rows * cols)} in float64, above "
                f"gram_memory = {gram_memory / 2**20:.0f} MiB)")
    else:
        return None
    if rows > cols:
        advice = "use fewer rows per step (a smaller batch, or microbatch_size > 1)"
    elif damping > 0 and k >= rows:
        advice = ("svd_mode 'cg' (what 'auto' takes for this step) solves it matrix-free in O(activations + "
                  "rows·128) memory")
    else:
        advice = ("a damped step keeping every row (damping > 0, k ≥ rows, svd_mode 'auto') is solved matrix-free "
                  "(svd_mode 'cg'); a rank cut (k < rows) or an undamped cut needs the spectrum of the whole "
                  "matrix; or use a smaller batch. Raise gram_memory to accept this cost")
    return f"{cost}; {advice}."


def regularized_cost(rows: int, gram_memory: int) -> str | None:
    """Why the weight-decay solve of ``rows`` rows is far off the fast path (its rows × rows float64 matrices
    exceed ``gram_memory``), or None."""
    if gram_fits(rows, gram_memory):
        return None
    return (f"weight_decay / fisher_decay solve in rows × rows form: the {rows} × {rows} float64 Gram matrix "
            f"({_gib(rows * rows)}), one more per decay class, above gram_memory = {gram_memory / 2**20:.0f} MiB, "
            f"and an eigendecomposition of ~{float(rows) ** 3:.1e} flops (minutes on a CPU); use fewer rows per "
            "step, decoupled_weight_decay (no extra matrix), or raise gram_memory to accept this cost.")


def entrywise_gram_cost(rows: int, entries: int) -> str | None:
    """Why a masked Gram matrix summing ``entries`` kept entries one by one is far off the fast path, or None."""
    multiply_adds = rows * rows * entries
    if multiply_adds <= ENTRYWISE_GRAM_LIMIT:
        return None
    return (f"the param_fraction Gram matrix sums {entries} kept entries one by one ({rows}² · {entries} = "
            f"{multiply_adds:.1e} float64 multiply-adds, about {multiply_adds / MULTIPLY_ADDS_PER_SECOND:.0f} s per "
            "step on a CPU core): a random entry mask (mask_mode='elementwise') has no factored form. "
            "mask_mode='rows' or 'tensor' keeps the factored Gram at the full step's cost.")
