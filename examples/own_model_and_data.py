"""Train your own nn.Module on your own tensors with dpsgs: K=2 pipeline stages on 2 ranks.

    mpirun -n 2 python -m mpi4py examples/own_model_and_data.py             # from any folder
    mpirun -n 4 python -m mpi4py examples/own_model_and_data.py -N 2        # 2 stages x 2 replicas

The model's forward does more than call its layers in order: a functional op (F.relu) between
them and a skip connection. dpsgs trains that forward as written (it traces the module into
stages, and refuses in one line what it cannot split). The data are plain tensors (x, y):
three noisy rings of 2-D points, one class per ring, which no linear model separates. Rank 0
then trains the same Net on the same data in plain PyTorch, for comparison.
"""

from __future__ import annotations

import argparse
import math

import torch
import torch.nn.functional as F
from mpi4py import MPI
from torch import nn

import dpsgs

__all__ = ["Net", "main", "plain_pytorch", "rings"]


class Net(nn.Module):
    """A residual MLP: its forward applies F.relu between the layers and adds a skip."""

    def __init__(self, width: int = 64, classes: int = 3) -> None:
        super().__init__()
        self.stem = nn.Linear(2, width)
        self.fc1 = nn.Linear(width, width)
        self.fc2 = nn.Linear(width, width)
        self.head = nn.Linear(width, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.relu(self.stem(x))
        h = h + self.fc2(F.relu(self.fc1(h)))       # the skip connection
        return self.head(F.relu(h))


def rings(n: int, seed: int, classes: int = 3) -> tuple[torch.Tensor, torch.Tensor]:
    """n points (x: n x 2 float32, y: n int64): class c lies on the ring of radius c + 1."""
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, classes, (n,), generator=g)
    angle = 2 * math.pi * torch.rand(n, generator=g)
    radius = (y + 1).float() + 0.15 * torch.randn(n, generator=g)
    return torch.stack([radius * angle.cos(), radius * angle.sin()], dim=1), y


def plain_pytorch(train: tuple[torch.Tensor, torch.Tensor], test: tuple[torch.Tensor, torch.Tensor],
                  epochs: int, batch: int, lr: float) -> float:
    """The same Net and data trained by plain PyTorch (SGD, momentum 0.9, cosine): test accuracy."""
    torch.manual_seed(0)
    net = Net()
    opt = torch.optim.SGD(net.parameters(), lr=lr, momentum=0.9)
    steps = epochs * (len(train[1]) // batch)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    g = torch.Generator().manual_seed(0)
    for _ in range(epochs):
        order = torch.randperm(len(train[1]), generator=g)
        for i in range(len(order) // batch):
            idx = order[i * batch:(i + 1) * batch]
            opt.zero_grad()
            F.cross_entropy(net(train[0][idx]), train[1][idx]).backward()
            opt.step()
            sched.step()
    with torch.no_grad():
        return (net(test[0]).argmax(1) == test[1]).float().mean().item()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("-K", "--stages", type=int, default=2)
    p.add_argument("-N", "--replicas", type=int, default=1)
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--run-dir", default=None, help="a folder for the run's files (default: none)")
    args = p.parse_args()

    train, test = rings(4096, seed=1), rings(1024, seed=2)      # your tensors
    torch.manual_seed(0)                                        # the same Net on every rank
    config = dpsgs.TrainConfig(stages=args.stages, replicas=args.replicas, epochs=args.epochs,
                               batch_size=32, lr=0.05, weight_decay=0.0, run_dir=args.run_dir,
                               progress=False)
    summary = dpsgs.train(config, MPI.COMM_WORLD, model=Net(), data=(train, test))
    if MPI.COMM_WORLD.Get_rank() == 0:
        print(f"dpsgs fdg K={args.stages} N={args.replicas}: test accuracy "
              f"{summary['test_accuracy']:.4f}", flush=True)
        plain = plain_pytorch(train, test, args.epochs, 32 * args.replicas, 0.05)
        print(f"plain PyTorch, same Net and data: test accuracy {plain:.4f}", flush=True)


if __name__ == "__main__":
    main()
