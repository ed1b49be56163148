"""GGN of a digits classifier over a data set sharded across processes.

Every process loads scikit-learn's 8×8 digits (no download), keeps every
``world_size``-th batch (its shard) and builds the same curvature objects as
one process over all batches would; each product and each ``from_data`` sums
over the ranks with ``all_reduce``. Rank 0 prints the results, which are the
same (up to rounding) for any number of processes:

    torchrun --nproc_per_node=2 examples/distributed_ggn.py
    python examples/distributed_ggn.py          # one process, for comparison

See docs/distributed.md.
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist
from sklearn.datasets import load_digits
from torch import nn

from curvext.linalg import hutchinson_trace
from curvext.operators import DiagonalOperator, GGNOperator


def main() -> None:
    if "RANK" in os.environ:  # started by torchrun
        dist.init_process_group("gloo")  # "nccl" for CUDA tensors
    rank = dist.get_rank() if dist.is_initialized() else 0
    world_size = dist.get_world_size() if dist.is_initialized() else 1

    torch.manual_seed(0)  # the same model and the same probes on every rank
    digits = load_digits()
    X = torch.tensor(digits.data, dtype=torch.float32) / 16
    y = torch.tensor(digits.target)
    model = nn.Sequential(nn.Linear(64, 32), nn.Tanh(), nn.Linear(32, 10))
    loss_fn = nn.CrossEntropyLoss()
    batches = list(zip(X.split(128), y.split(128)))
    shard = batches[rank::world_size]  # 15 batches in all; unequal shards are fine

    params = list(model.parameters())
    G = GGNOperator(model, loss_fn, params, shard, num_data=len(X))
    trace = hutchinson_trace(G, num_matvecs=100, generator=torch.Generator().manual_seed(1))
    exact = DiagonalOperator.from_data(model, loss_fn, shard).diag().sum()
    if rank == 0:
        print(f"{world_size} process(es), {len(X)} samples, {G.shape[0]} parameters")
        print(f"GGN trace: Hutchinson (100 probes) {trace.item():.6f}, exact {exact.item():.6f}")
    if dist.is_initialized():
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
