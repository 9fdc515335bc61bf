"""Distributed Sven on 2 gloo processes (CPU) against one process on the concatenated batch.

One spawned run (process start-up dominates the time) trains every scenario for
3 steps in float64 on both ranks and saves what each rank saw; the tests then
rerun each scenario in this process with a plain ``SvenWrapper`` on the whole
batch and compare. The single-process step itself is held to the dense
reference by the core tests (tests/test_exact_modes.py).
"""

from __future__ import annotations

import datetime
import os
import socket
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from conftest import flat_parameters, make_batch, make_mlp, per_sample_mse
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel

from sven import Sven, SvenWrapper
from sven.bench.mnist import MNIST_FILES
from sven.bench.tasks import DEFAULT_MNIST_DIR
from sven.distributed import DistributedSvenWrapper, gathered_operator
from sven.jacobian import GramEngine, ParamSpace, functorch_jacobian

WORLD_SIZE = 2
STEPS = 3
D_IN, WIDTH, D_OUT = 4, 6, 3
VOCAB = 20
TOLERANCE = 1e-10
COLLECTIVE_TIMEOUT = datetime.timedelta(seconds=30)
"""Ranks that disagree on the sequence of collectives fail after this instead of hanging."""


class ScaleShift(nn.Module):
    """x · weight + bias elementwise: a parametrised layer with no Gram rule (the functorch fallback)."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.linspace(0.5, 1.5, width, dtype=torch.float64))
        self.bias = nn.Parameter(torch.linspace(-0.2, 0.2, width, dtype=torch.float64))

    def forward(self, x: Tensor) -> Tensor:
        return x * self.weight + self.bias


class PooledEmbedding(nn.Module):
    """Tokens (B, T) → embedding (B, T, dim) → LayerNorm → Linear (B, T, d_out) → mean over T, (B, d_out)."""

    def __init__(self, vocab: int, dim: int, d_out: int = 2) -> None:
        super().__init__()
        self.embedding = nn.Embedding(vocab, dim)
        self.norm = nn.LayerNorm(dim)
        self.linear = nn.Linear(dim, d_out)

    def forward(self, tokens: Tensor) -> Tensor:
        return self.linear(self.norm(self.embedding(tokens))).mean(dim=1)


def build_model(kind: str) -> nn.Module:
    """'mlp': 4 → 6 → 6 → 3 Tanh; 'custom': the same with a ScaleShift layer (fallback) after the first Linear;
    'embedding': PooledEmbedding over VOCAB tokens, output D_OUT."""
    mlp = make_mlp([D_IN, WIDTH, WIDTH, D_OUT], dtype=torch.float64, seed=0)
    if kind == "mlp":
        return mlp
    if kind == "embedding":
        return PooledEmbedding(VOCAB, 3, D_OUT).double()
    return nn.Sequential(mlp[0], ScaleShift(WIDTH), *mlp[1:])


@dataclass(frozen=True)
class Scenario:
    """One training run: model kind, rank shard sizes, wrapper and optimizer options.

    ``rank_seeds``: torch's global seed on each rank before the wrapper is built (the
    single-process run uses rank 0's); ``nan_step``: the step whose last sample (on
    rank 1) gets a NaN input; ``ddp``: pass the model inside DistributedDataParallel.
    """

    model: str
    shard_sizes: tuple[int, int]
    wrapper: dict = field(default_factory=dict)
    optimizer: dict = field(default_factory=dict)
    rank_seeds: tuple[int, int] = (0, 0)
    nan_step: int | None = None
    ddp: bool = False

    @property
    def batch_size(self) -> int:
        return sum(self.shard_sizes)

    def rows(self, rank: int) -> slice:
        start = sum(self.shard_sizes[:rank])
        return slice(start, start + self.shard_sizes[rank])

    def batch(self, step: int) -> tuple[Tensor, Tensor]:
        x, y = make_batch(self.batch_size, D_IN, D_OUT, seed=10 + step)
        if self.model == "embedding":
            x = (x.abs() * VOCAB).long() % VOCAB
        if step == self.nan_step:
            x[-1, 0] = float("nan")
        return x, y


SCENARIOS = {
    "gram_mlp": Scenario("mlp", (5, 5), dict(engine="gram"), dict(lr=0.5, k=8)),
    "gram_mlp_microbatch_kappa1": Scenario(
        "mlp", (6, 4), dict(engine="gram", microbatch_size=4, kappa=1.0), dict(lr=0.5, k=8)
    ),
    "gram_fallback_microbatch_dense_svd": Scenario(
        "custom", (7, 3), dict(engine="gram", microbatch_size=2), dict(lr=0.5, k=8, svd_mode="torch")
    ),
    "functorch_fraction_microbatch": Scenario(
        "mlp", (6, 4), dict(engine="functorch", param_fraction=0.5, microbatch_size=3), dict(lr=0.5, k=8),
        rank_seeds=(0, 1),
    ),
    "gram_rows_fraction_microbatch": Scenario(
        "mlp", (6, 4), dict(engine="gram", param_fraction=0.5, mask_mode="rows", microbatch_size=3),
        dict(lr=0.5, k=8),
    ),
    "randomized_seeded_alike": Scenario(
        "mlp", (5, 5), dict(engine="gram"), dict(lr=0.5, k=10, svd_mode="randomized", oversampling=5)
    ),
    "adaptive_damping": Scenario("mlp", (6, 4), dict(engine="gram"), dict(lr=1.0, k=8, damping="adaptive")),
    "rmsprop_momentum": Scenario(
        "mlp", (6, 4), dict(engine="gram"), dict(lr=0.5, k=8, rmsprop="pre", momentum=0.5)
    ),
    "variable_k": Scenario("mlp", (6, 4), dict(engine="gram"), dict(lr=1.0, k=8, variable_k=True)),
    "embedding_microbatch": Scenario("embedding", (6, 4), dict(engine="gram", microbatch_size=2), dict(lr=0.5, k=8)),
    "ddp_module": Scenario("mlp", (4, 6), dict(engine="gram"), dict(lr=0.5, k=8), ddp=True),
    "nonfinite_on_rank1": Scenario("mlp", (5, 5), dict(engine="gram"), dict(lr=0.5, k=8), nan_step=1),
}
RANDOMIZED_SEEDED_APART = Scenario(
    "mlp", (5, 5), dict(engine="gram"), dict(lr=0.5, k=10, svd_mode="randomized"), rank_seeds=(0, 1)
)


def train(scenario: Scenario, rank: int | None) -> dict:
    """STEPS Sven steps; rank None is the single process on the whole batch.

    Returns parameters after each step (STEPS, P), the skip flags and, for ranks, the
    bytes counted per step.
    """
    model = build_model(scenario.model)
    torch.manual_seed(scenario.rank_seeds[rank or 0])
    if rank is None:
        wrapped = SvenWrapper(model, per_sample_mse, **scenario.wrapper)
    else:
        wrapped = DistributedSvenWrapper(
            DistributedDataParallel(model) if scenario.ddp else model, per_sample_mse, **scenario.wrapper
        )
        wrapped.comm.take_stats()
    optimizer = Sven(wrapped, **scenario.optimizer)
    params, skipped, step_bytes = [], [], []
    for step in range(STEPS):
        x, y = scenario.batch(step)
        rows = slice(None) if rank is None else scenario.rows(rank)
        wrapped.loss_and_grad((x[rows], y[rows]))
        optimizer.step()
        params.append(flat_parameters(model))
        skipped.append(optimizer.last_step["skipped"])
        if rank is not None:
            step_bytes.append(wrapped.comm.take_stats())
    return {"params": torch.stack(params), "skipped": skipped, "stats": step_bytes}


def error_message(scenario: Scenario, rank: int, broken_rank: int | None) -> str:
    """The message of the error one step raises on this rank ('' if none); ``broken_rank`` passes a bad target."""
    model = build_model(scenario.model)
    torch.manual_seed(scenario.rank_seeds[rank])
    wrapped = DistributedSvenWrapper(model, per_sample_mse, **scenario.wrapper)
    optimizer = Sven(wrapped, **scenario.optimizer)
    x, y = scenario.batch(0)
    rows = scenario.rows(rank)
    target = y[0, 0] if rank == broken_rank else y[rows]
    try:
        wrapped.loss_and_grad((x[rows], target))
        optimizer.step()
    except (RuntimeError, ValueError) as error:
        return f"{type(error).__name__}: {error}"
    return ""


def worker(rank: int, port: int, out_dir: str) -> None:
    """One rank: every scenario, then the two error cases; results saved to out_dir/rank{rank}.pt.

    After a clean finish the process leaves by ``os._exit``: in interpreter teardown gloo's
    threads sometimes abort ("terminate called without an active exception", about 1 run in 8
    here) after all work is done, which would fail the spawn.
    """
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD_SIZE,
                            timeout=COLLECTIVE_TIMEOUT)
    try:
        results = {name: train(scenario, rank) for name, scenario in SCENARIOS.items()}
        results["randomized_seeded_apart"] = train(RANDOMIZED_SEEDED_APART, rank)
        results["bad_target_on_rank1"] = error_message(SCENARIOS["gram_mlp"], rank, 1)
        torch.save(results, Path(out_dir) / f"rank{rank}.pt")
        dist.barrier()
    finally:
        dist.destroy_process_group()
    os._exit(0)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def ranks(tmp_path_factory: pytest.TempPathFactory) -> list[dict]:
    """What each of the 2 ranks saw, from one spawned run."""
    out_dir = tmp_path_factory.mktemp("distributed")
    mp.spawn(worker, args=(free_port(), str(out_dir)), nprocs=WORLD_SIZE, join=True)
    return [torch.load(out_dir / f"rank{rank}.pt", weights_only=False) for rank in range(WORLD_SIZE)]


@pytest.mark.parametrize("name", sorted(SCENARIOS))
def test_ranks_take_the_single_process_step(ranks: list[dict], name: str) -> None:
    single = train(SCENARIOS[name], rank=None)
    assert not all(single["skipped"]), "the scenario must move the parameters"
    start = flat_parameters(build_model(SCENARIOS[name].model))
    assert float((single["params"][-1] - start).abs().max()) > 1e-3
    for rank in ranks:
        assert rank[name]["skipped"] == single["skipped"]
        assert float((rank[name]["params"] - single["params"]).abs().max()) < TOLERANCE
    assert torch.equal(ranks[0][name]["params"], ranks[1][name]["params"]), "ranks must stay bit-identical"


def test_nonfinite_shard_makes_every_rank_skip(ranks: list[dict]) -> None:
    for rank in ranks:
        run = rank["nonfinite_on_rank1"]
        assert run["skipped"] == [False, True, False]
        assert torch.equal(run["params"][1], run["params"][0]), "a skipped step changes no parameter"
    assert torch.equal(ranks[0]["nonfinite_on_rank1"]["params"], ranks[1]["nonfinite_on_rank1"]["params"])


def test_an_error_on_one_rank_is_raised_on_every_rank(ranks: list[dict]) -> None:
    assert ranks[1]["bad_target_on_rank1"].startswith("ValueError: batch (x, y, *extra) needs a target tensor")
    assert ranks[0]["bad_target_on_rank1"] == (
        "RuntimeError: loss_and_grad raised on rank(s) [1] (see their error); "
        "rank 0 stops too so that no rank waits for the others"
    )


def test_randomized_solver_with_ranks_seeded_apart_still_takes_one_step_on_every_rank(ranks: list[dict]) -> None:
    """The randomized modes sketch the replicated Gram matrix; Mᵀ c broadcasts c from the first rank."""
    first, second = (rank["randomized_seeded_apart"] for rank in ranks)
    assert torch.equal(first["params"], second["params"]) and not any(first["skipped"])


def test_bytes_per_step_follow_the_formula(ranks: list[dict]) -> None:
    """Gram engine, float64, equal shards: 8·(2W + B + B·Σ_layers (d_in + d_out) + B + P) bytes."""
    model = build_model("mlp")
    batch = SCENARIOS["gram_mlp"].batch_size
    factors = sum(layer.in_features + layer.out_features for layer in model if isinstance(layer, nn.Linear))
    parameters = sum(p.numel() for p in model.parameters())
    expected = 8 * (2 * WORLD_SIZE + batch + batch * factors + batch + parameters)
    for rank in ranks:
        for stats in rank["gram_mlp"]["stats"]:
            assert stats.all_reduce_bytes == 8 * parameters
            assert stats.broadcast_bytes == 8 * batch
            assert stats.total_bytes == expected


def two_shard_gather(shard_b: object) -> Callable[[Tensor], Tensor]:
    """A stand-in for an all-gather over two ranks, on rank 0: each call appends rank 1's matching tensor.

    ``shard_b`` (rank 1's operator) is gathered first with a recorder, so its tensors come in call order.
    """
    recorded: list[Tensor] = []
    gathered_operator(shard_b, lambda t: recorded.append(t) or t, shard_b.shape[0])
    return lambda t: torch.cat([t, recorded.pop(0)])


def block_test_case(kind: str) -> tuple[nn.Module, tuple[Tensor, Tensor]]:
    """Models whose blocks take each branch of ``gathered_block`` (factors or per-sample gradients), 8 samples."""
    torch.manual_seed(0)
    generator = torch.Generator().manual_seed(3)
    targets = torch.randn(8, 2, generator=generator, dtype=torch.float64)
    if kind == "embedding_factors_linear_materialised":
        return PooledEmbedding(50, 3).double(), (torch.randint(0, 50, (8, 4), generator=generator), targets)
    if kind == "embedding_materialised":
        return PooledEmbedding(3, 2).double(), (torch.randint(0, 3, (8, 6), generator=generator), targets)
    model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), ScaleShift(5), nn.Linear(5, 2)).double()
    return model, (torch.randn(8, 4, generator=generator, dtype=torch.float64), targets)


@pytest.mark.parametrize("engine", ["gram", "functorch"])
@pytest.mark.parametrize(
    "kind", ["embedding_factors_linear_materialised", "embedding_materialised", "fallback_mlp"]
)
def test_gathered_operator_equals_the_full_batch_operator(kind: str, engine: str) -> None:
    model, (x, y) = block_test_case(kind)
    params = ParamSpace.of_module(model)

    def operator(rows: slice):
        if engine == "gram":
            return GramEngine(model, params).compute(per_sample_mse, (x[rows], y[rows]))[2]
        return functorch_jacobian(model, per_sample_mse, (x[rows], y[rows]), params)[2]

    full = operator(slice(None))
    gathered = gathered_operator(operator(slice(0, 5)), two_shard_gather(operator(slice(5, 8))), 8)
    assert type(gathered) is type(full)
    assert torch.allclose(gathered.dense(), full.dense(), rtol=0, atol=1e-14)
    assert torch.allclose(gathered.gram(), full.gram(), rtol=1e-13, atol=1e-14)


@pytest.mark.skipif(not all((DEFAULT_MNIST_DIR / name).is_file() for name in MNIST_FILES.values()),
                    reason=f"MNIST files not in {DEFAULT_MNIST_DIR}")
def test_the_ddp_mnist_example_runs_under_torchrun() -> None:
    """examples/ddp_mnist.py, 2 CPU ranks (gloo), 3 steps: it finishes and checks that the ranks agree."""
    script = Path(__file__).resolve().parents[1] / "examples" / "ddp_mnist.py"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(script),
               "--data-dir", str(DEFAULT_MNIST_DIR), "--steps", "3", "--threads", "1", "--log-every", "1"]
    finished = subprocess.run(command, capture_output=True, text=True, timeout=300,
                              env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert finished.returncode == 0, finished.stderr[-3000:]
    assert "parameters identical on all ranks" in finished.stdout
    assert finished.stdout.count("global mean loss") == 3
