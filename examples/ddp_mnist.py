"""Sven on MNIST label regression across processes: the exact global-batch step, one shard per rank.

    torchrun --nproc_per_node 2 examples/ddp_mnist.py --data-dir /path/to/mnist

Trains the 784→32→32→32→10 GELU MLP on one-hot squared error with a global batch of
64 (each rank forwards its shard of 64 / world_size samples) using the gloo backend on
CPU, nccl when every rank has a GPU. The model is wrapped in DistributedDataParallel to
show that the two compose: ``DistributedSvenWrapper`` runs DDP's ``.module`` and sums
the update over ranks itself. Every rank takes the step one process would take on the
whole batch; the script checks at the end that all ranks hold the same parameters.
The MNIST IDX files are read with ``sven.bench.tasks`` (``sven.bench.mnist.read_idx``).
"""

from __future__ import annotations

import argparse
import os
import time

import torch
import torch.distributed as dist
from torch import Tensor
from torch.nn.parallel import DistributedDataParallel

from sven import Sven
from sven.bench.tasks import build_task
from sven.distributed import DistributedSvenWrapper


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", required=True, help="folder with the four MNIST IDX .gz files")
    parser.add_argument("--steps", type=int, default=300, help="Sven steps (default 300)")
    parser.add_argument("--batch-size", type=int, default=64, help="global batch, split over the ranks (default 64)")
    parser.add_argument("--lr", type=float, default=0.1)
    parser.add_argument("--k", type=int, default=64, help="singular values kept at most (default 64)")
    parser.add_argument("--rtol", type=float, default=1e-3)
    parser.add_argument("--engine", choices=("gram", "functorch"), default="gram",
                        help="Jacobian engine: gram gathers layer factors, functorch gathers Jacobian rows")
    parser.add_argument("--seed", type=int, default=0, help="model initialisation and batch order (every rank)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads per process")
    parser.add_argument("--log-every", type=int, default=50)
    return parser.parse_args()


def shard_rows(batch_size: int, rank: int, world_size: int) -> slice:
    """This rank's contiguous rows of a global batch (rank 0's first; the first ranks take one more when uneven)."""
    base, extra = divmod(batch_size, world_size)
    start = rank * base + min(rank, extra)
    return slice(start, start + base + (rank < extra))


def global_batches(num_samples: int, batch_size: int, seed: int):
    """Index tensors (batch_size,) of an endless shuffled pass over the data, the same on every rank."""
    generator = torch.Generator().manual_seed(seed)
    while True:
        order = torch.randperm(num_samples, generator=generator)
        for start in range(0, num_samples - batch_size + 1, batch_size):
            yield order[start:start + batch_size]


def accuracy(model: torch.nn.Module, images: Tensor, labels: Tensor) -> float:
    """Fraction of argmax predictions equal to the argmax of the one-hot targets."""
    with torch.no_grad():
        return float((model(images).argmax(dim=1) == labels.argmax(dim=1)).double().mean())


def main() -> None:
    args = parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    use_cuda = torch.cuda.is_available()
    dist.init_process_group("nccl" if use_cuda else "gloo")
    rank, world_size = dist.get_rank(), dist.get_world_size()
    device = torch.device(f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}" if use_cuda else "cpu")
    if args.batch_size < world_size:
        raise ValueError(f"--batch-size {args.batch_size} leaves some of the {world_size} ranks without samples")

    task = build_task("mnist-regression", args.data_dir).to(device)
    torch.manual_seed(args.seed)
    model = task.build_model().to(device)
    ddp_model = DistributedDataParallel(model, device_ids=[device.index] if use_cuda else None)
    wrapped = DistributedSvenWrapper(ddp_model, task.per_sample_loss, device=device, engine=args.engine)
    optimizer = Sven(wrapped, lr=args.lr, k=args.k, rtol=args.rtol)
    wrapped.comm.take_stats()

    rows = shard_rows(args.batch_size, rank, world_size)
    train_x, train_y = task.train
    batches = global_batches(train_x.shape[0], args.batch_size, args.seed)
    step_times, step_stats = [], []
    for step in range(1, args.steps + 1):
        indices = next(batches)[rows].to(device)
        started = time.perf_counter()
        wrapped.loss_and_grad((train_x[indices], train_y[indices]))
        optimizer.step()
        if use_cuda:
            torch.cuda.synchronize(device)
        step_times.append(time.perf_counter() - started)
        step_stats.append(wrapped.comm.take_stats())
        if rank == 0 and (step % args.log_every == 0 or step == 1):
            print(f"step {step:5d}  global mean loss {optimizer.last_step['mean_loss']:.4f}  "
                  f"rank kept {optimizer.last_step.get('rank_kept', '-')}  step {1e3 * step_times[-1]:.1f} ms",
                  flush=True)

    flat = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    wrapped.comm.require_replicated(flat, "the parameters after training")
    if rank == 0:
        warm = min(10, len(step_times) - 1)
        timed = torch.tensor(step_times[warm:])
        in_collectives = torch.tensor([stats.seconds for stats in step_stats[warm:]])
        print(f"world size {world_size}, engine {args.engine}, {torch.get_num_threads()} thread(s) per process, "
              f"global batch {args.batch_size} ({rows.stop - rows.start} on rank 0)")
        print(f"step time after 10 warm-up steps: median {1e3 * timed.median():.2f} ms, "
              f"mean {1e3 * timed.mean():.2f} ms, of which in collectives (rank 0) median "
              f"{1e3 * in_collectives.median():.2f} ms")
        mean_bytes = sum(stats.total_bytes for stats in step_stats) / len(step_stats)
        mean_calls = sum(stats.calls for stats in step_stats) / len(step_stats)
        print(f"payload communicated per step per rank: {mean_bytes:,.0f} bytes in {mean_calls:.0f} collectives")
        print(f"parameters identical on all ranks; validation accuracy {accuracy(model, *task.val):.4f}")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
