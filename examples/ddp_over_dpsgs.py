"""A plain PyTorch DDP script trained over dpsgs's MPI core: only the init line is dpsgs's.

    mpirun -n 2 python examples/ddp_over_dpsgs.py              # after scripts/setup.sh
    mpirun -n 4 python examples/ddp_over_dpsgs.py --epochs 10

No MASTER_ADDR/MASTER_PORT, RANK or WORLD_SIZE: `init_method="mpi://"` takes rank and world
size from MPI and rendezvouses through MPI messages, so no port is opened. Swap the backend
name for "gloo" and the script is the usual DDP example (gloo can use mpi:// too).
"""

from __future__ import annotations

import argparse

import torch
import torch.distributed as dist
from sklearn.datasets import load_digits
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

import dpsgs.distributed  # noqa: F401  registers the "dpsgs" backend and mpi://

__all__ = ["main"]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--epochs", type=int, default=5)
    p.add_argument("--batch", type=int, default=32, help="samples per rank per step")
    args = p.parse_args()

    dist.init_process_group("dpsgs", init_method="mpi://")   # the one dpsgs line
    rank, world = dist.get_rank(), dist.get_world_size()

    digits = load_digits()   # 1797 8x8 handwritten digits, shipped with scikit-learn
    x = torch.tensor(digits.data, dtype=torch.float32) / 16.0
    y = torch.tensor(digits.target)
    train = TensorDataset(x[:1500], y[:1500])
    test_x, test_y = x[1500:], y[1500:]
    sampler = DistributedSampler(train, shuffle=True, seed=0)
    loader = DataLoader(train, batch_size=args.batch, sampler=sampler)

    torch.manual_seed(0)
    model = DDP(nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 10)))
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    loss_fn = nn.CrossEntropyLoss()
    for epoch in range(args.epochs):
        sampler.set_epoch(epoch)
        total = torch.zeros(2)   # summed loss, batches
        for xb, yb in loader:
            opt.zero_grad()
            loss = loss_fn(model(xb), yb)
            loss.backward()
            opt.step()
            total += torch.tensor([loss.item(), 1.0])
        with torch.no_grad():   # every rank scores a slice of the test set; the counts are summed
            part = slice(rank, None, world)
            score = torch.tensor([(model(test_x[part]).argmax(1) == test_y[part]).sum().item(),
                                  len(test_y[part])], dtype=torch.float64)
        dist.all_reduce(total)
        dist.all_reduce(score)
        if rank == 0:
            print(f"epoch {epoch}: train loss {total[0] / total[1]:.4f}, "
                  f"test accuracy {score[0] / score[1]:.4f} ({world} ranks, backend {dist.get_backend()})",
                  flush=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
